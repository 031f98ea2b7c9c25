"""``leanrec demo``: the same seeded traffic through naive and lean plumbing, side by side.

Both pipelines run in one process on embedded backends, driven in lockstep by one simulation. After
the run, both warehouses are read back and checked: every example must hold the exact bytes the late
ranker scored (no skew), and the two paths must hold the same examples.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from leanrec.clock import ManualClock
from leanrec.energy.stages import EnergyModel, ledger_energy
from leanrec.funnel.ranker import Funnel
from leanrec.schema import FeatureSet, Owner, Side
from leanrec.sim.pipeline import Pipeline, PipelineConfig, Plumbing, build_pipeline
from leanrec.sim.traffic import Scored, TrafficConfig, TrafficSim, TrafficStats
from leanrec.warehouse.tables import arrays_block
from leanrec.world import ENGAGEMENT_TARGETS, World, WorldConfig


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
    progress: Callable[[int], None] | None = None,
    energy: EnergyModel | None = None,
) -> DemoResult:
    """Run naive and lean on the same traffic and measure both.

    Args:
        requests: Ranked requests to simulate.
        seed: Seeds the world and the traffic.
        out: Folder for the warehouses (``warehouse/naive``, ``warehouse/lean``) and reports.
        world_config: World size and shape (defaults: 10,000 users, 50,000 items).
        pipeline_config: Plumbing settings shared by both paths.
        traffic_config: Client behaviour; ``requests`` and ``seed`` override its own.
        progress: Called with the number of requests issued in each step.
        energy: Prices each path's ledger in joules and gCO2e (default: ``EnergyModel.default()``).

    """
    if requests < 1:
        raise ValueError(f"--requests must be at least 1, got {requests}")
    t0 = time.perf_counter()
    out = Path(out)
    wconf = world_config or WorldConfig(seed=seed)
    pconf = pipeline_config or PipelineConfig()
    base = traffic_config or TrafficConfig()
    tconf = TrafficConfig(**{**base.__dict__, "requests": requests, "seed": seed})
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
    traffic = sim.run(progress)
    sim_seconds = time.perf_counter() - t0

    tables = {k: p.warehouse.read_examples() for k, p in pipes.items()}
    naive_t, lean_t = tables[Plumbing.NAIVE], tables[Plumbing.LEAN]
    identical = naive_t.num_rows == lean_t.num_rows and naive_t.equals(lean_t)
    paths: dict[str, dict] = {}
    energy_model = energy or EnergyModel.default()
    energy_report = {}
    for plumbing, p in pipes.items():
        skewed, fresh = check_examples(fs, tables[plumbing], sim.scored, world)
        paths[plumbing.value] = _path_figures(p, skewed, fresh)
        # A transient entry waits in memory until its request is joined, when the window closes.
        e = energy_report[plumbing.value] = ledger_energy(
            p.ledger, energy_model, requests, pconf.window_ms / 1e3
        )
        paths[plumbing.value]["joules_per_1k_requests"] = e["joules_per_1k_requests"]
        paths[plumbing.value]["gco2e_per_1k_requests"] = e["gco2e_per_1k_requests"]
    report = {
        "requests": requests,
        "seed": seed,
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
        "sim_seconds": sim_seconds,
    }
    metrics = sorted(paths["lean"])
    for m in metrics:
        report[m] = {"naive": paths["naive"][m], "lean": paths["lean"][m]}
    report["energy"] = energy_report
    report["wall_seconds"] = time.perf_counter() - t0
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
