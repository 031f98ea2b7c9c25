"""``leanrec demo``: the same seeded traffic through naive and lean plumbing, side by side.

Both pipelines run in one process on embedded backends, driven in lockstep by one simulation. After
the run, both warehouses are read back and checked: every example must hold the exact bytes the late
ranker scored (no skew), and the two paths must hold the same examples.
"""

from __future__ import annotations

import math
import resource
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from leanrec.clock import ManualClock
from leanrec.energy.stages import EnergyModel, ledger_energy
from leanrec.errors import InputError
from leanrec.featurelog import codec
from leanrec.funnel.ranker import Funnel
from leanrec.schema import FeatureSet, Owner, Side
from leanrec.sim.pipeline import Pipeline, PipelineConfig, Plumbing, build_pipeline
from leanrec.sim.traffic import Scored, Steps, TrafficConfig, TrafficSim, TrafficStats
from leanrec.warehouse.store import dedup_bytes, sorted_impression_bytes
from leanrec.warehouse.tables import arrays_block
from leanrec.world import ENGAGEMENT_TARGETS, World, WorldConfig, default_featureset


@dataclass
class DemoResult:
    """Everything a demo run measured.

    Attributes:
        report: JSON-ready figures (what ``report.json`` holds).
        traffic: What the simulated clients did.
        pipelines: The two pipelines, after the run.

    """

    report: dict
    traffic: TrafficStats
    pipelines: dict[Plumbing, Pipeline]


SETUP_STEP = "build the world and the pipelines"
CHECK_STEP = "check the warehouses"


class DemoTooLarge(InputError, ValueError):
    """A demo size this machine cannot run fairly (both paths holding what they must), said up front."""


@dataclass(frozen=True)
class Holding:
    """What each path will hold at its peak, estimated before a run from the FeatureSet's sizes.

    Requests arrive at ``rate_per_s``; an entry in the transient store waits until its request is
    joined (the attribution window, the lateness and the joiner's next round after it), a lean
    ranked context until its pages are logged or it goes idle. A run shorter than those waits
    holds every request it ranked; a longer one reaches the steady state ``rate × wait``.

    Attributes:
        store_open_requests: Requests whose transient entries are held at once, at the peak.
        naive_store_keys: Keys the naive store holds then (one per ranked item, and the events').
        store_hold_s: How long a request's transient entries are held.
        naive_store_bytes: Peak of the naive store: every ranked item, user side repeated.
        lean_store_bytes: Peak of the lean store, bounded above by every page being logged.
        context_open_requests: Ranked contexts the lean logger holds at once, at the peak.
        context_hold_s: Longest a context is held when the user stops scrolling.
        context_bytes: Peak bytes of those contexts.

    """

    store_open_requests: int
    naive_store_keys: int
    store_hold_s: float
    naive_store_bytes: int
    lean_store_bytes: int
    context_open_requests: int
    context_hold_s: float
    context_bytes: int


def plan_holding(
    fs: FeatureSet, requests: int, traffic: TrafficConfig, plumbing: PipelineConfig, n_rank: int = 100
) -> Holding:
    """Estimate each path's peak holding for a run of ``requests`` (see :class:`Holding`)."""
    rate = traffic.rate_per_s
    store_hold_ms = plumbing.window_ms + plumbing.lateness_ms + 2_000 + traffic.join_every_ms
    context_hold_ms = plumbing.context_idle_ms + 60_000  # idle, after the longest ordinary session
    # Requests ranked in one tick arrive together: one tick more than the rate alone.
    store_open = min(requests, math.ceil(rate * (store_hold_ms + traffic.tick_ms) / 1000))
    context_open = min(requests, math.ceil(rate * (context_hold_ms + traffic.tick_ms) / 1000))
    req, item = fs.layout(Side.REQUEST), fs.layout(Side.ITEM)
    impression = len(codec.encode_impressions(fs, np.zeros(1, np.int64), req.zeros(1), item.zeros(1))[0])
    key_bytes = 24  # lr:{<12 hex digits>}:i<position>
    events = 4_096  # a session's event batches and replay guards, the same on both paths
    naive = n_rank * (impression + key_bytes) + events
    # Each ranked item is its features, its id (8 B) and its score (4 B), in a page or a context.
    lean = codec.HEADER_BYTES * (2 + n_rank) + req.row_bytes + n_rank * (item.row_bytes + 12) + events
    context = n_rank * (item.row_bytes + 12) + req.row_bytes + 64
    return Holding(
        store_open,
        store_open * (n_rank + 2),
        store_hold_ms / 1000,
        store_open * naive,
        store_open * lean,
        context_open,
        context_hold_ms / 1000,
        context_open * context,
    )


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes, or None where there is no such file."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _gib(n: float) -> str:
    return f"{n / (1 << 30):,.1f} GiB"


def sized_for(
    hold: Holding, requests: int, fs: FeatureSet, pconf: PipelineConfig, out: Path
) -> PipelineConfig:
    """Bounds that let both paths hold what ``hold`` says, spilling the naive store past its memory.

    Raises:
        DemoTooLarge: If this machine has not the memory or the disk for it.

    """
    held = max(hold.naive_store_bytes, hold.lean_store_bytes)
    sized = replace(
        pconf,
        store_max_bytes=max(pconf.store_max_bytes, int(1.25 * held)),
        context_max_bytes=max(pconf.context_max_bytes, int(1.25 * hold.context_bytes)),
        spill_dir=pconf.spill_dir or str(out / "spill"),
    )
    examples = requests * 12  # viewed items, with room: the median session views about six
    example_bytes = fs.layout(Side.REQUEST).row_bytes + fs.layout(Side.ITEM).row_bytes
    # In memory at once: the naive store's resident part and its index (a key per ranked item), the
    # lean store, the contexts, and both paths' examples read back as Arrow tables, sorted and
    # unpacked for the comparison after the run (five copies at the most, as measured at 50,000).
    memory = (
        min(hold.naive_store_bytes, sized.store_memory_bytes)
        + hold.naive_store_keys * 200  # a key, its entry and its expiry, in Python objects
        + hold.lean_store_bytes
        + hold.context_bytes
        + 5 * examples * example_bytes
        + (2 << 30)  # the world, the funnel and the interpreter
    )
    disk = max(hold.naive_store_bytes - sized.store_memory_bytes, 0) + examples * example_bytes
    available = _available_memory()
    if available is not None and memory > available:
        raise DemoTooLarge(
            f"--requests {requests:,} needs about {_gib(memory)} of memory (the lean logger holds "
            f"{hold.context_open_requests:,} ranked requests, the naive store part of "
            f"{hold.store_open_requests:,}) and {_gib(available)} is available: ask for fewer requests"
        )
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())  # out may be made later
    free = shutil.disk_usage(existing).free
    if disk > free:
        raise DemoTooLarge(
            f"--requests {requests:,} needs about {_gib(disk)} of disk in {out} (the naive transient "
            f"store spills {hold.store_open_requests:,} open requests' ranked items there) and "
            f"{_gib(free)} is free: ask for fewer requests or give --out on a larger disk"
        )
    return sized


def check_examples(
    fs: FeatureSet, table: pa.Table, scored: dict[str, Scored], world: World
) -> tuple[int, int]:
    """Count examples whose features differ from what was scored, and those a fresh join would skew.

    Args:
        fs: The FeatureSet the examples were logged under: the world's or a retirement of it.
        table: Impression-level examples.
        scored: Fingerprints of the scored rows, by request id.
        world: Its feature store now holds the features as they are after the run.

    Returns:
        ``(skewed, fresh_skew)``: examples not holding the scored bytes; examples whose features in
        the feature store have changed since they were scored (a join that looked features up again
        would have trained on those).

    """
    n = table.num_rows
    cols = {name: table.column(name) for name in table.column_names}
    req_fp = arrays_block(fs.layout(Side.REQUEST), cols, n).row_fingerprints()
    item_fp = arrays_block(fs.layout(Side.ITEM), cols, n).row_fingerprints()
    rids = table.column("request_id").to_pylist()
    positions = table.column("position").to_numpy()
    want_req = np.array([scored[r].request_fp for r in rids], np.uint64)
    want_item = np.array([scored[r].item_fps[p] for r, p in zip(rids, positions, strict=True)], np.uint64)
    skewed = int(((req_fp != want_req) | (item_fp != want_item)).sum())
    # The store holds the world's FeatureSet; cut its rows to fs's layout (a no-op cut for the same).
    stored = world.store.get_many(Owner.ITEM, table.column("item_id").to_numpy())
    items_now = fs.project(stored, world.featureset, Side.ITEM).row_fingerprints()
    return skewed, int((items_now != item_fp).sum())


def run_demo(
    requests: int = 5_000,
    seed: int = 7,
    out: Path | str = "leanrec-demo",
    world_config: WorldConfig | None = None,
    pipeline_config: PipelineConfig | None = None,
    traffic_config: TrafficConfig | None = None,
    progress: Steps | None = None,
    energy: EnergyModel | None = None,
    shared_rows: bool = False,
) -> DemoResult:
    """Run naive and lean on the same traffic and measure both.

    Args:
        requests: Ranked requests to simulate.
        seed: Seeds the world and the traffic.
        out: Folder for the warehouses (``warehouse/naive``, ``warehouse/lean``) and reports.
        world_config: World size and shape (defaults: 10,000 users, 50,000 items).
        pipeline_config: Plumbing settings shared by both paths.
        traffic_config: Client behaviour; ``requests`` and ``seed`` override its own.
        progress: Called as each step of the run moves (see :class:`~leanrec.sim.traffic.Steps`):
            building the world and the pipelines (``SETUP_STEP``), then the simulation's steps, then
            reading both warehouses back and checking them (``CHECK_STEP``). The run is the same with
            it as without it.
        energy: Prices each path's ledger in joules and gCO2e (default: ``EnergyModel.default()``).
        shared_rows: The lean path logs content-addressed rows (``PipelineConfig.shared_rows``).

    """
    if requests < 1:
        raise ValueError(f"--requests must be at least 1, got {requests}")
    t0 = time.perf_counter()
    steps = progress or (lambda *_: None)
    steps(SETUP_STEP, 0, 1, "users, items, features and the funnel's index")
    out = Path(out)
    wconf = world_config or WorldConfig(seed=seed)
    base = traffic_config or TrafficConfig()
    tconf = TrafficConfig(**{**base.__dict__, "requests": requests, "seed": seed})
    fs, _ = default_featureset(wconf)
    hold = plan_holding(fs, requests, tconf, pipeline_config or PipelineConfig())
    # Sized to what both paths must hold, unless the caller set the bounds (to test what overflows).
    pconf = pipeline_config or sized_for(hold, requests, fs, PipelineConfig(), out)
    if shared_rows:
        pconf = replace(pconf, shared_rows=True)
    world = World(wconf)
    fs = world.featureset
    clock = ManualClock()
    pipes = {}
    for plumbing in Plumbing:
        folder = out / "warehouse" / plumbing.value
        if folder.exists():
            shutil.rmtree(folder)
        pipes[plumbing] = build_pipeline(plumbing, fs, clock, folder, pconf)
    sim = TrafficSim(world, Funnel(world), list(pipes.values()), clock, tconf, pconf)
    steps(SETUP_STEP, 1, 1)
    traffic = sim.run(steps=progress)
    sim_seconds = time.perf_counter() - t0

    checks = 2 + len(pipes)  # read back, each path's examples, the impression layout compared
    steps(CHECK_STEP, 0, checks, "reading both warehouses back")
    tables = {k: p.warehouse.read_examples() for k, p in pipes.items()}
    scored = "every example against the bytes the ranker scored"
    steps(CHECK_STEP, 1, checks, scored)
    naive_t, lean_t = tables[Plumbing.NAIVE], tables[Plumbing.LEAN]
    identical = naive_t.num_rows == lean_t.num_rows and naive_t.equals(lean_t)
    paths: dict[str, dict] = {}
    energy_model = energy or EnergyModel.default()
    energy_report = {}
    for plumbing, p in pipes.items():
        skewed, fresh = check_examples(fs, tables[plumbing], sim.scored, world)
        paths[plumbing.value] = _path_figures(p, skewed, fresh)
        close = getattr(p.store, "close", None)
        if callable(close):
            close()  # what it spilled goes
        # A transient entry waits in memory until its request is joined, when the window closes.
        e = energy_report[plumbing.value] = ledger_energy(
            p.ledger, energy_model, requests, pconf.window_ms / 1e3
        )
        paths[plumbing.value]["joules_per_1k_requests"] = e["joules_per_1k_requests"]
        paths[plumbing.value]["gco2e_per_1k_requests"] = e["gco2e_per_1k_requests"]
        last = len(paths) == len(pipes)
        steps(CHECK_STEP, 1 + len(paths), checks, "the impression layout" if last else scored)
    report = {
        "requests": requests,
        "seed": seed,
        "shared_rows": pconf.shared_rows,
        "featureset": {
            "name": fs.name,
            "version": fs.version,
            "features": len(fs),
            "request_side_bytes": fs.layout(Side.REQUEST).row_bytes,
            "item_side_bytes": fs.layout(Side.ITEM).row_bytes,
        },
        "identical_examples": bool(identical),
        "traffic": {
            "rate_per_s": tconf.rate_per_s,
            "viewed_items": traffic.viewed,
            "ranked_per_request": pipes[Plumbing.NAIVE].logger.stats.entries_written / requests,
            "median_depth": int((traffic.viewed_by_position >= traffic.requests / 2).sum()),
            "fast_scroll_sessions": traffic.fast_scroll_sessions,
            "signals_sent": traffic.signals_sent,
            "signals_lost": traffic.signals_lost,
            "event_batches": traffic.event_batches,
            "duplicate_batches": traffic.duplicate_batches,
            "bad_events": traffic.bad_events,
            "late_batches": traffic.late_batches,
            "retried_batches": traffic.retried_batches,
            "dropped_batches": traffic.dropped_batches,
            "views_by_position": traffic.viewed_by_position.tolist(),
        },
        "engagement": engagement_rates(traffic),
        "holding": {
            "planned": hold.__dict__,
            "store_memory_bytes": pconf.store_memory_bytes,
            "spill_dir": pconf.spill_dir,
        },
        # The impression layout at its best (rows grouped by request), from the lean files.
        "sorted_impression_bytes": sorted_impression_bytes(str(pipes[Plumbing.LEAN].warehouse.uri), fs),
        # And the deduplicated layout, the lean files written again by its writer.
        "dedup_bytes": dedup_bytes(str(pipes[Plumbing.LEAN].warehouse.uri), fs),
        "sim_seconds": sim_seconds,
    }
    metrics = sorted(paths["lean"])
    for m in metrics:
        report[m] = {"naive": paths["naive"][m], "lean": paths["lean"][m]}
    report["energy"] = energy_report
    report["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    report["wall_seconds"] = time.perf_counter() - t0
    steps(CHECK_STEP, checks, checks)
    return DemoResult(report, traffic, pipes)


def engagement_rates(stats: TrafficStats) -> dict[str, dict[str, float]]:
    """Each signal's rate on viewed items, beside the sourced range it should land in."""
    drawn = {
        "click": stats.clicks,
        "long_watch": stats.long_watches,
        "like": stats.likes,
        "share": stats.shares,
    }
    views = max(stats.viewed, 1)
    return {
        name: {"rate": count / views, "low": ENGAGEMENT_TARGETS[name][0], "high": ENGAGEMENT_TARGETS[name][1]}
        for name, count in drawn.items()
    }


def _path_figures(p: Pipeline, skewed: int, fresh_skew: int) -> dict:
    """Per-path figures for the report."""
    st, js, ls = p.store.stats(), p.joiner.stats, p.logger.stats
    led = p.ledger
    refused = p.service.stats.events_refused
    fig = {
        "kv_writes": st.writes,
        "kv_bytes_written": st.bytes_written,
        "kv_reads": st.reads,
        "kv_bytes_read": st.bytes_read,
        "kv_expiries": st.expiries,
        "kv_bytes_held_after": st.bytes_held,
        "kv_peak_bytes_held": st.peak_bytes_held,
        "kv_peak_bytes_spilled": st.peak_bytes_spilled,
        "serialize_cpu_seconds": led["serialize"].cpu_seconds,
        "bytes_serialized": led["serialize"].bytes_serialized,
        "plumbing_cpu_seconds": led.total().cpu_seconds,
        "context_byte_seconds": led["context"].byte_seconds_held,
        "labels_lost": js.labels_lost,
        "skewed_examples": skewed,
        "fresh_join_would_skew": fresh_skew,
        "examples": js.examples,
        "positives": js.positives,
        "requests_joined": js.requests_joined,
        "duplicate_events": js.duplicate_events,
        "mismatched_events": js.mismatched_events,
        "late_events": refused.get("window_closed", 0),
        "events_refused": sum(refused.values()) - refused.get("window_closed", 0),
        "events_refused_by_reason": dict(refused),
        "pages_on_signal": ls.pages_on_signal,
        "pages_on_touch": ls.pages_on_touch,
        "warehouse_bytes": p.warehouse.bytes_stored(),
        "warehouse_bytes_per_example": p.warehouse.bytes_stored() / max(js.examples, 1),
        "logged_by_position": ls.logged_by_position.tolist(),
        "warehouse_files": len(p.warehouse.files),
        "stage_bytes": {
            "serialized": led["serialize"].bytes_serialized,
            "kv_written": led["kv_write"].bytes_written,
            "kv_read": led["kv_read"].bytes_read,
            "warehouse_written": led["warehouse_write"].bytes_written,
        },
        "ledger": led.to_dict(),
    }
    if p.plumbing is Plumbing.LEAN:
        cs = p.logger.contexts.stats  # type: ignore[attr-defined]
        fig["context_peak_bytes"] = cs.peak_bytes
    else:
        fig["context_peak_bytes"] = 0
    return fig
