"""Content-addressed rows on the same traffic as today's lazy logging: the same examples, byte for byte.

One simulated run drives a lean pipeline of today's layout (in memory) beside lean pipelines with
shared rows on the in-process store, on a real Redis server and on a real Redis Cluster: each
pipeline logs the same rankings and receives the same client calls, so their warehouses must hold
identical examples.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from leanrec.clock import ManualClock
from leanrec.funnel import Funnel
from leanrec.sim.demo import check_examples, run_demo
from leanrec.sim.pipeline import PipelineConfig, Plumbing, build_pipeline
from leanrec.sim.traffic import TrafficConfig, TrafficSim
from leanrec.world import World, WorldConfig

from ..contract.conftest import REDIS_TEST_URL, flush_redis, require_redis

WORLD = WorldConfig(n_users=300, n_items=3_000, n_creators=200, seed=13)


@pytest.mark.parametrize("backend", ["memory", "redis", "redis-cluster"])
def test_shared_rows_give_todays_examples_on_the_same_traffic(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    url = "memory://"
    if backend == "redis":
        require_redis(REDIS_TEST_URL)
        flush_redis(REDIS_TEST_URL)
        url = REDIS_TEST_URL
    elif backend == "redis-cluster":
        url = request.getfixturevalue("cluster_url")
    world = World(WORLD)
    clock = ManualClock()
    today = PipelineConfig()
    shared = PipelineConfig(store_url=url, shared_rows=True)
    pipes = [
        build_pipeline(Plumbing.LEAN, world.featureset, clock, tmp_path / "today", today),
        build_pipeline(Plumbing.LEAN, world.featureset, clock, tmp_path / "shared", shared),
    ]
    traffic = TrafficConfig(requests=250, seed=3)
    sim = TrafficSim(world, Funnel(world), pipes, clock, traffic, today)
    stats = sim.run()
    tables = [p.warehouse.read_examples() for p in pipes]
    assert tables[0].num_rows > 250
    assert tables[0].equals(tables[1])  # the same examples, byte for byte (invariants 1 and 3)
    for pipe, table in zip(pipes, tables, strict=True):
        assert pipe.joiner.stats.labels_lost == 0  # invariant 2
        assert pipe.joiner.stats.requests_without_features == 0
        assert pipe.logger.stats.write_failures == 0
        assert check_examples(world.featureset, table, sim.scored, world)[0] == 0  # nothing skewed
    logger = pipes[1].logger
    assert logger.stats.rows_written > 0 and logger.stats.rows_reused > 0
    assert stats.viewed - pipes[1].joiner.stats.examples <= stats.late_batches * 20
    if backend == "memory":  # exact bookkeeping: the rows take less than the pages they replace
        held = [p.store.stats().peak_bytes_held for p in pipes]
        assert held[1] < held[0]
    for pipe in pipes:
        close = getattr(pipe.store, "close", None)
        if callable(close):
            close()


def test_the_demo_runs_its_lean_path_with_shared_rows(tmp_path: Path) -> None:
    result = run_demo(requests=150, seed=5, out=tmp_path, world_config=WORLD, shared_rows=True)
    report = result.report
    assert report["shared_rows"] is True
    assert report["identical_examples"] is True
    for path in ("naive", "lean"):
        assert report["labels_lost"][path] == 0
        assert report["skewed_examples"][path] == 0
    assert result.pipelines[Plumbing.LEAN].logger.stats.rows_written > 0
