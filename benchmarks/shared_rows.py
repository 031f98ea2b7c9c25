"""Today's lazy logging against content-addressed rows (``--shared-rows``) on the same traffic.

    python benchmarks/shared_rows.py --repeat 3 [--requests 5000] [--seed 7] [--cluster-requests 1000]
                                     [--markdown]

The synthetic world of ``leanrec demo --requests 5000 --seed 7``, its traffic driving two lean
pipelines in one simulation: one logging today's pages and request sides, one logging
content-addressed rows (on the embedded store, whose byte counts are exact). Then the same traffic,
``--cluster-requests`` of it, through each layout in turn on a local Redis Cluster (3 masters), to
count what a join reads there. Prints, as medians of ``--repeat`` runs, each figure both ways and
the ratio shared / today:

- transient-store bytes held at the peak (keys and values; the run's whole traffic is held at once,
  as in the demo: 5,000 requests arrive within the attribution window);
- serving-side CPU per ranked request spent logging (the ledger's ``serialize`` and ``kv_write``:
  encoding, hashing rows, the store calls);
- joiner CPU per example (``kv_read``, ``deserialize``, ``join``, ``kv_delete``);
- on the cluster: store round trips and shards touched per joined request, MGET commands per joined
  request (one per hash slot), and the joiner's CPU per example.

Exits non-zero if the examples differ between the layouts, a label is lost, or the peak bytes held
with shared rows are above 0.7x today's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
from rich.console import Console
from rich.table import Table

from demo_figures import markdown  # a sibling script: benchmarks/ is first on the path
from leanrec.clock import ManualClock
from leanrec.funnel import Funnel
from leanrec.sim.demo import plan_holding, sized_for
from leanrec.sim.pipeline import Pipeline, PipelineConfig, Plumbing, build_pipeline
from leanrec.sim.traffic import TrafficConfig, TrafficSim
from leanrec.world import World, WorldConfig

TARGET = 0.7
LOG_STAGES = ("serialize", "kv_write")
JOIN_STAGES = ("kv_read", "deserialize", "join", "kv_delete")


def _cpu(pipe: Pipeline, stages: tuple[str, ...]) -> float:
    return sum(pipe.ledger.stages[s].cpu_seconds for s in stages if s in pipe.ledger.stages)


def _figures(pipe: Pipeline, requests: int) -> dict[str, float]:
    js = pipe.joiner.stats
    return {
        "peak_bytes": pipe.store.stats().peak_bytes_held,
        "log_us_per_request": 1e6 * _cpu(pipe, LOG_STAGES) / requests,
        "join_us_per_example": 1e6 * _cpu(pipe, JOIN_STAGES) / max(js.examples, 1),
        "examples": js.examples,
        "labels_lost": js.labels_lost,
    }


def synthetic(requests: int, seed: int, root: Path) -> tuple[dict[str, dict[str, float]], bool]:
    """One run of the world's traffic through both layouts at once; figures per layout, and equality."""
    world = World(WorldConfig(seed=seed))
    clock = ManualClock()
    traffic = TrafficConfig(requests=requests, seed=seed)
    # Bounds sized to what the run holds, as the demo sizes them: at 50,000 requests the defaults
    # would release contexts and refuse entries, and both layouts would lose labels.
    hold = plan_holding(world.featureset, requests, traffic, PipelineConfig())
    conf = sized_for(hold, requests, world.featureset, PipelineConfig(), root)
    pipes = {
        name: build_pipeline(Plumbing.LEAN, world.featureset, clock, root / name, conf_of)
        for name, conf_of in (("today", conf), ("shared", replace(conf, shared_rows=True)))
    }
    TrafficSim(world, Funnel(world), list(pipes.values()), clock, traffic, conf, track_scored=False).run()
    tables = {k: p.warehouse.read_examples() for k, p in pipes.items()}
    figs = {k: _figures(p, requests) for k, p in pipes.items()}
    rows = pipes["shared"].logger.stats
    figs["shared"].update(
        rows_written=rows.rows_written, rows_reused=rows.rows_reused, rows_extended=rows.rows_extended
    )
    return figs, tables["today"].equals(tables["shared"])


class _ReadCounter:
    """Counts a joiner's reads on a cluster: round trips, shards and MGET commands (one per slot)."""

    def __init__(self, store: Any) -> None:
        self.client = store._client
        self.round_trips = self.shards = self.commands = 0
        self._wrap(store, "get_many")
        self._wrap(store, "get_lists_many")

    def _wrap(self, store: Any, name: str) -> None:
        real: Callable[..., Any] = getattr(store, name)

        def counted(keys: list[str], *args: Any) -> Any:
            if keys:
                slots = {self.client.keyslot(k) for k in keys}
                nodes = {self.client.nodes_manager.get_node_from_slot(s).name for s in slots}
                self.round_trips += 1
                self.shards += len(nodes)
                self.commands += len(slots) if name == "get_many" else len(keys)
            return real(keys, *args)

        setattr(store, name, counted)


def cluster(requests: int, seed: int, root: Path, url: str, shared: bool) -> dict[str, float]:
    """The traffic through one layout on the cluster; per joined request, what the joiner read."""
    import redis

    from leanrec.stores.redis_common import connect

    client = connect(url)
    client.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
    client.close()
    world = World(WorldConfig(seed=seed))
    clock = ManualClock()
    conf = PipelineConfig(store_url=url, shared_rows=shared)
    pipe = build_pipeline(Plumbing.LEAN, world.featureset, clock, root / f"cluster-{shared}", conf)
    sim = TrafficSim(
        world,
        Funnel(world),
        [pipe],
        clock,
        TrafficConfig(requests=requests, seed=seed),
        conf,
        track_scored=False,
    )
    # Rank and log first (the joiner reads nothing before a window closes), then count the joins.
    counter: _ReadCounter | None = None
    real_tick = pipe.joiner.join_due

    def join_due(*args: Any, **kw: Any) -> int:
        nonlocal counter
        if counter is None:
            counter = _ReadCounter(pipe.store)
        return real_tick(*args, **kw)

    pipe.joiner.join_due = join_due  # type: ignore[method-assign]
    sim.run()
    joined = max(pipe.joiner.stats.requests_joined, 1)
    assert counter is not None
    out = {
        "round_trips": counter.round_trips / joined,
        "shards": counter.shards / joined,
        "commands": counter.commands / joined,
        "join_us_per_example": 1e6 * _cpu(pipe, JOIN_STAGES) / max(pipe.joiner.stats.examples, 1),
        "labels_lost": pipe.joiner.stats.labels_lost,
        "examples": pipe.joiner.stats.examples,
    }
    pipe.store.close()  # type: ignore[attr-defined]
    return out


def _thread_timed(logger: Any) -> list[float]:
    """Wrap the logger's entry points to add their thread CPU seconds into the returned cell."""
    import time

    spent = [0.0]
    for name in ("log_ranked", "paginate", "touch", "touch_and_append_once"):
        real = getattr(logger, name)

        def timed(*args: Any, _real: Callable[..., Any] = real, **kw: Any) -> Any:
            t0 = time.thread_time()
            try:
                return _real(*args, **kw)
            finally:
                spent[0] += time.thread_time() - t0

        setattr(logger, name, timed)
    return spent


def movielens(work: Path, redis_url: str, root: Path) -> tuple[dict[str, dict[str, float]], bool]:
    """MovieLens 100K's round-1 sessions (chunks 1 and 2) replayed through both layouts in-process.

    Two catalog services (``create_app``, embedded transient store and bus) rank the MovieLens catalog
    from the FeatureStore at ``redis_url`` database 8 (loaded per chunk, as ``examples/movielens/run.py``
    does) and are replayed the same sessions; each is then joined to its own warehouse.
    """
    import os
    import subprocess

    import httpx
    import redis

    from leanrec.clock import SystemClock
    from leanrec.energy.ledger import CostLedger
    from leanrec.join.joiner import LabelJoiner
    from leanrec.serve.app import create_app
    from leanrec.serve.config import ServeConfig
    from leanrec.sim.replay import replay
    from leanrec.warehouse.store import ParquetWarehouse
    from leanrec.warehouse.tables import TableLayout

    os.environ.setdefault("LEANREC_SECRET", "shared-rows-benchmark-secret-0123456789")
    features = f"{redis_url}/8"
    redis.Redis.from_url(features).flushdb()
    fs_file = str(work / "featureset.toml")
    apps = {
        name: create_app(
            ServeConfig(
                featureset=fs_file,
                features_url=features,
                retrieval=str(work / "retrieval.npz"),
                n_retrieve=300,
                n_rank=100,
                shared_rows=name == "shared",
            )
        )
        for name in ("today", "shared")
    }
    # The services rank and answer on other threads of this process at the same time, so the
    # ledger's process CPU would charge their work to logging: time the logger's own thread instead.
    log_cpu = {name: _thread_timed(app.state.leanrec.logger) for name, app in apps.items()}
    for k in (1, 2):
        subprocess.run(
            [sys.executable, "-m", "leanrec.cli", "features", "load", "--featureset", fs_file, "--users",
             str(work / f"users_{k}.parquet"), "--items", str(work / f"items_{k}.parquet"),
             "--store-url", features],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        for app in apps.values():
            replay(
                "http://127.0.0.1",
                work / f"sessions_{k}.parquet",
                fs_file,
                transport=httpx.ASGITransport(app=app),
            )
            app.state.leanrec.lane.drain()
    figs, tables = {}, {}
    for name, app in apps.items():
        st = app.state.leanrec
        cfg = st.config
        ledger = CostLedger()
        clock = ManualClock(SystemClock().now_ms() + cfg.window_ms + cfg.lateness_ms + 10_000)
        wh = ParquetWarehouse(str(root / f"ml-{name}"), st.featureset, TableLayout.REQUEST, ledger)
        joiner = LabelJoiner(st.logger, st.bus, wh, ledger, clock, cfg.window_ms, cfg.lateness_ms)
        joiner.poll()
        joiner.join_due()
        joiner.flush()
        examples = max(joiner.stats.examples, 1)
        join_cpu = sum(ledger.stages[s].cpu_seconds for s in JOIN_STAGES if s in ledger.stages)
        figs[name] = {
            "peak_bytes": st.store.stats().peak_bytes_held,
            "log_us_per_request": 1e6 * log_cpu[name][0] / max(st.ranked, 1),
            "join_us_per_example": 1e6 * join_cpu / examples,
            "examples": joiner.stats.examples,
            "labels_lost": joiner.stats.labels_lost,
        }
        wall = {"request_id", "ts_ms", "view_ms"}
        t = wh.read_examples()
        t = t.select([c for c in t.column_names if c not in wall])
        scalar = [c for c in t.column_names if not pa.types.is_nested(t.schema.field(c).type)]
        tables[name] = t.sort_by([(c, "ascending") for c in scalar])
    return figs, tables["today"].equals(tables["shared"])


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cluster-requests", type=int, default=1_000, help="0: no cluster runs")
    parser.add_argument(
        "--movielens", help="a folder examples/movielens/prepare.py wrote: replay its sessions both ways too"
    )
    parser.add_argument(
        "--redis", default="redis://127.0.0.1:6379", help="with --movielens: its FeatureStore"
    )
    parser.add_argument("--markdown", action="store_true", help="print the README's table as Markdown")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="leanrec-shared-rows-"))
    console = Console(stderr=True)
    failures: list[str] = []

    runs = []
    for i in range(args.repeat):
        console.print(f"synthetic run {i + 1} of {args.repeat}")
        figs, same = synthetic(args.requests, args.seed, root / f"run{i}")
        runs.append(figs)
        if not same:
            failures.append(f"run {i}: the examples differ between the layouts")
        if figs["today"]["labels_lost"] or figs["shared"]["labels_lost"]:
            failures.append(
                f"run {i}: labels lost {figs['today']['labels_lost']}, {figs['shared']['labels_lost']}"
            )
    today = _median([r["today"] for r in runs])
    shared = _median([r["shared"] for r in runs])
    rows = [
        ["transient store held, peak (MB)", today["peak_bytes"] / 1e6, shared["peak_bytes"] / 1e6],
        ["logging CPU per request (µs)", today["log_us_per_request"], shared["log_us_per_request"]],
        ["joiner CPU per example (µs)", today["join_us_per_example"], shared["join_us_per_example"]],
    ]
    if shared["peak_bytes"] > TARGET * today["peak_bytes"]:
        failures.append(
            f"peak bytes held {shared['peak_bytes'] / today['peak_bytes']:.3f}x today's, above {TARGET}"
        )

    if args.movielens:
        ml = []
        for i in range(args.repeat):
            console.print(f"MovieLens run {i + 1} of {args.repeat}")
            figs, same = movielens(Path(args.movielens), args.redis, root / f"ml{i}")
            ml.append(figs)
            if not same or figs["today"]["labels_lost"] or figs["shared"]["labels_lost"]:
                failures.append(f"MovieLens run {i}: examples equal {same}, {figs}")
        mt, ms = _median([r["today"] for r in ml]), _median([r["shared"] for r in ml])
        rows += [
            ["MovieLens: transient store held, peak (MB)", mt["peak_bytes"] / 1e6, ms["peak_bytes"] / 1e6],
            ["MovieLens: logging CPU per request (µs)", mt["log_us_per_request"], ms["log_us_per_request"]],
            ["MovieLens: joiner CPU per example (µs)", mt["join_us_per_example"], ms["join_us_per_example"]],
        ]
        if ms["peak_bytes"] > TARGET * mt["peak_bytes"]:
            failures.append(f"MovieLens peak bytes held {ms['peak_bytes'] / mt['peak_bytes']:.3f}x today's")

    if args.cluster_requests:
        from leanrec.stores.local_cluster import LocalRedisCluster

        with LocalRedisCluster(root / "cluster", masters=3, replicas=0) as redis_cluster:
            both: dict[bool, list[dict[str, float]]] = {False: [], True: []}
            for i in range(args.repeat):
                for flag in (False, True):
                    console.print(f"cluster run {i + 1} of {args.repeat}, shared rows {flag}")
                    both[flag].append(
                        cluster(args.cluster_requests, args.seed, root, redis_cluster.url, flag)
                    )
        ct, cs = _median(both[False]), _median(both[True])
        if ct["examples"] != cs["examples"] or ct["labels_lost"] or cs["labels_lost"]:
            failures.append(
                f"cluster: examples {ct['examples']} vs {cs['examples']}, labels lost {cs['labels_lost']}"
            )
        rows += [
            ["cluster: store round trips per joined request", ct["round_trips"], cs["round_trips"]],
            ["cluster: shards touched per joined request", ct["shards"], cs["shards"]],
            ["cluster: MGET/LRANGE commands per joined request", ct["commands"], cs["commands"]],
            ["cluster: joiner CPU per example (µs)", ct["join_us_per_example"], cs["join_us_per_example"]],
        ]

    flags = f"--requests {args.requests} --seed {args.seed} --repeat {args.repeat}"
    flags += f" --cluster-requests {args.cluster_requests}"
    flags += " --movielens ML-WORK" if args.movielens else ""
    command = f"python benchmarks/shared_rows.py {flags}"
    text = [[name, f"{a:,.2f}", f"{b:,.2f}", f"{b / a:.3f}x" if a else "-"] for name, a, b in rows]
    header = ["figure", "today's lazy", "shared rows", "shared / today"]
    rows_line = (
        f"shared rows (median): {shared['rows_written']:,.0f} written, {shared['rows_reused']:,.0f} uses "
        f"found them alive, {shared['rows_extended']:,.0f} extended; "
        f"examples {today['examples']:,.0f} both ways"
    )
    if args.markdown:
        print(f"`{command}` (median of {args.repeat}):\n")
        print(markdown(header, text))
        print(f"\n{rows_line}")
    else:
        table = Table(title=f"content-addressed rows, {args.requests} requests, seed {args.seed}")
        for col in header:
            table.add_column(col, justify="left" if col == "figure" else "right")
        for row in text:
            table.add_row(*row)
        Console().print(table)
        print(rows_line)
    for f in failures:
        console.print(f"[red]FAIL[/red] {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
