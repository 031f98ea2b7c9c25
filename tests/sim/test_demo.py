"""run_demo end to end on a small world: both paths, same traffic, same examples, no skew."""

from __future__ import annotations

from pathlib import Path

import pytest

from leanrec.sim.demo import DemoResult, run_demo
from leanrec.sim.pipeline import Plumbing
from leanrec.world import WorldConfig

PER_PATH = (
    "kv_writes",
    "kv_bytes_written",
    "serialize_cpu_seconds",
    "labels_lost",
    "skewed_examples",
    "examples",
    "warehouse_bytes",
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoResult, Path]:
    out = tmp_path_factory.mktemp("demo")
    config = WorldConfig(n_users=400, n_items=3_000, n_creators=200, seed=11)
    return run_demo(requests=200, seed=5, out=out, world_config=config), out


def test_the_report_has_every_figure_for_both_paths(demo: tuple[DemoResult, Path]) -> None:
    report = demo[0].report
    for name in PER_PATH:
        assert set(report[name]) == {"naive", "lean"}, name
        for path in ("naive", "lean"):
            assert isinstance(report[name][path], int | float), (name, path)
    assert isinstance(report["wall_seconds"], float)
    assert report["wall_seconds"] > 0
    assert report["requests"] == 200


def test_no_label_is_lost_and_no_example_is_skewed(demo: tuple[DemoResult, Path]) -> None:
    result = demo[0]
    report = result.report
    for path in ("naive", "lean"):
        assert report["labels_lost"][path] == 0
        assert report["skewed_examples"][path] == 0
        assert report["serialize_cpu_seconds"][path] > 0
    assert report["examples"]["naive"] == report["examples"]["lean"]
    # Every view the clients made became an example (but for views reported only by a batch sent
    # after the join), and the paths agree example by example.
    viewed = result.traffic.viewed
    assert viewed > 200
    assert viewed - report["late_events"]["lean"] <= report["examples"]["lean"] <= viewed
    if result.traffic.late_batches == 0:
        assert report["examples"]["lean"] == viewed
    assert report["identical_examples"] is True


def test_the_lean_path_writes_a_fraction_of_the_naive_bytes(demo: tuple[DemoResult, Path]) -> None:
    report = demo[0].report
    kv = report["kv_bytes_written"]
    assert 0 < kv["lean"] <= 0.15 * kv["naive"]
    assert report["kv_writes"]["lean"] < report["kv_writes"]["naive"]
    # The naive path logs every ranked item of every request.
    assert report["kv_writes"]["naive"] == 200 * 100


def test_both_warehouses_are_on_disk_and_their_bytes_are_counted(demo: tuple[DemoResult, Path]) -> None:
    result, out = demo
    for plumbing in Plumbing:
        folder = out / "warehouse" / plumbing.value
        files = sorted(folder.rglob("*.parquet"))
        assert files, plumbing
        assert all(not f.name.startswith(".") for f in files)
        assert result.report["warehouse_bytes"][plumbing.value] == sum(f.stat().st_size for f in files)
        assert result.pipelines[plumbing].warehouse.uri == str(folder)
    lean = result.pipelines[Plumbing.LEAN].warehouse.read()
    naive = result.pipelines[Plumbing.NAIVE].warehouse.read()
    assert naive.num_rows == result.report["examples"]["naive"]
    assert lean.num_rows <= 200  # one row per request that had a viewed item


def test_a_second_run_replaces_the_warehouses(tmp_path: Path) -> None:
    config = WorldConfig(n_users=400, n_items=3_000, n_creators=200, seed=11)
    first = run_demo(requests=40, seed=2, out=tmp_path, world_config=config)
    second = run_demo(requests=40, seed=2, out=tmp_path, world_config=config)
    for plumbing in ("naive", "lean"):
        assert second.report["examples"][plumbing] == first.report["examples"][plumbing]
        assert second.report["warehouse_bytes"][plumbing] == sum(
            f.stat().st_size for f in (tmp_path / "warehouse" / plumbing).rglob("*.parquet")
        )
    assert second.pipelines[Plumbing.NAIVE].warehouse.read().num_rows == first.report["examples"]["naive"]


@pytest.mark.parametrize("requests", [0, -3])
def test_a_run_needs_at_least_one_request(tmp_path: Path, requests: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        run_demo(requests=requests, out=tmp_path)
    assert not (tmp_path / "warehouse").exists()
