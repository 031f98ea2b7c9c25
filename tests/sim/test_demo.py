"""run_demo end to end on a small world: both paths, same traffic, same examples, no skew."""

from __future__ import annotations

from pathlib import Path

import pytest

from leanrec.sim.demo import DemoResult, run_demo
from leanrec.sim.pipeline import Plumbing
from leanrec.sim.traffic import TrafficConfig
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
    result = demo[0]
    report = result.report
    kv = report["kv_bytes_written"]
    assert 0 < kv["lean"] <= 0.15 * kv["naive"]
    assert report["kv_writes"]["lean"] < report["kv_writes"]["naive"]
    naive_log = result.pipelines[Plumbing.NAIVE].logger.stats
    lean_log = result.pipelines[Plumbing.LEAN].logger.stats
    # The naive path logs every ranked item of every request, the lean one a fraction of them.
    assert naive_log.entries_written == 200 * 100
    assert naive_log.write_failures == lean_log.write_failures == 0
    assert lean_log.entries_written < 0.15 * naive_log.entries_written
    # Beside the features, both paths append the same event batches: one write each.
    appends = {
        path: report["kv_writes"][path] - result.pipelines[plumbing].logger.stats.entries_written
        for path, plumbing in (("naive", Plumbing.NAIVE), ("lean", Plumbing.LEAN))
    }
    assert appends["naive"] == appends["lean"] > 200
    sent = result.traffic.event_batches + result.traffic.duplicate_batches
    assert appends["naive"] <= sent
    if result.traffic.late_batches == 0:
        assert appends["naive"] == sent  # every batch carries a good event, none arrived late


def test_batches_after_the_window_are_refused_at_ingest_and_reported(tmp_path: Path) -> None:
    config = WorldConfig(n_users=400, n_items=3_000, n_creators=200, seed=11)
    traffic = TrafficConfig(late_share=0.2, duplicate_share=0.0, bad_event_share=0.3)
    result = run_demo(requests=60, seed=4, out=tmp_path, world_config=config, traffic_config=traffic)
    report = result.report
    assert result.traffic.late_batches > 10
    for path, plumbing in (("naive", Plumbing.NAIVE), ("lean", Plumbing.LEAN)):
        pipe = result.pipelines[plumbing]
        refused = pipe.service.stats.events_refused
        assert report["late_events"][path] == refused["window_closed"] > 0
        assert report["events_refused_by_reason"][path] == dict(refused)
        assert report["events_refused"][path] == sum(refused.values()) - refused["window_closed"]
        # Every late batch was refused whole, and nothing else was: the rest were appended.
        appended = report["kv_writes"][path] - pipe.logger.stats.entries_written
        assert appended == result.traffic.event_batches - result.traffic.late_batches
        assert pipe.joiner.stats.labels_lost == 0
    # Both paths refuse the same events, but for the wrong items: lean refuses them at ingest while it
    # holds the ranked list, naive holds none and its join drops them. Each is counted once.
    naive, lean = (dict(report["events_refused_by_reason"][p]) for p in ("naive", "lean"))
    assert "wrong_item" not in naive
    assert {k: v for k, v in lean.items() if k != "wrong_item"} == naive
    mismatched = report["mismatched_events"]
    assert lean.get("wrong_item", 0) + mismatched["lean"] == mismatched["naive"] > 0
    assert report["identical_examples"] is True
    # Views reported only by a late batch are missing; every other view became an example.
    viewed = result.traffic.viewed
    assert viewed - report["late_events"]["lean"] <= report["examples"]["lean"] < viewed


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


def test_an_unavailable_store_makes_clients_send_again_and_nothing_is_lost(
    small_config, tmp_path: Path
) -> None:
    from leanrec.clock import ManualClock
    from leanrec.funnel import Funnel
    from leanrec.serve.service import LoggingUnavailable
    from leanrec.sim.pipeline import PipelineConfig, Plumbing, build_pipeline
    from leanrec.sim.traffic import TrafficConfig, TrafficSim
    from leanrec.world import World

    world, clock, pconf = World(small_config), ManualClock(), PipelineConfig()
    pipe = build_pipeline(Plumbing.LEAN, world.featureset, clock, tmp_path / "wh", pconf)
    real, seen = pipe.service.events, set()

    def flaky(ref, batch, batch_id=None):  # the first delivery of every batch meets a 503
        key = (ref.request_id, batch.ts_ms.tobytes(), batch.position.tobytes())
        if key not in seen:
            seen.add(key)
            raise LoggingUnavailable("store briefly full")
        return real(ref, batch, batch_id)

    pipe.service.events = flaky  # type: ignore[method-assign]
    cfg = TrafficConfig(requests=80, seed=2, duplicate_share=0.0, late_share=0.0, bad_event_share=0.0)
    stats = TrafficSim(world, Funnel(world), [pipe], clock, cfg, pconf).run()
    assert stats.retried_batches == stats.event_batches > 0
    assert stats.dropped_batches == 0
    assert pipe.joiner.stats.labels_lost == 0
    assert pipe.joiner.stats.examples == stats.viewed  # every viewed item still became an example


def test_each_path_reports_its_energy_per_stage_and_the_lean_one_spends_less(
    demo: tuple[DemoResult, Path],
) -> None:
    report = demo[0].report
    naive, lean = report["energy"]["naive"], report["energy"]["lean"]
    for e in (naive, lean):
        assert e["mark"] == "estimated" and e["power_source"] and e["grid_source"]
        assert e["joules"] == pytest.approx(sum(s["total"] for s in e["stages"].values()))
        assert e["joules_per_1k_requests"] == pytest.approx(e["joules"] * 1000 / 200)
    # The naive path serializes, writes and holds far more; every one of those stages costs more.
    for stage in ("serialize", "kv_write"):
        assert lean["stages"][stage]["total"] < naive["stages"][stage]["total"], stage
    assert report["joules_per_1k_requests"]["lean"] < report["joules_per_1k_requests"]["naive"]
    assert report["gco2e_per_1k_requests"]["lean"] < report["gco2e_per_1k_requests"]["naive"]


# ------------------------------------------------------------------ sizes past the machine's memory
SMALL = WorldConfig(n_users=400, n_items=3_000, n_creators=200, seed=11)


def test_a_store_that_spills_to_disk_keeps_every_label_and_the_same_examples(tmp_path: Path) -> None:
    from leanrec.sim.pipeline import PipelineConfig

    spill = tmp_path / "spill"
    # The naive store holds every ranked item (tens of MB here); 1 MiB of memory makes it spill.
    conf = PipelineConfig(store_memory_bytes=1 << 20, spill_dir=str(spill))
    report = run_demo(requests=300, seed=3, out=tmp_path, world_config=SMALL, pipeline_config=conf).report
    assert report["kv_peak_bytes_spilled"]["naive"] > 10 * (1 << 20)
    assert report["kv_peak_bytes_held"]["naive"] > report["kv_peak_bytes_spilled"]["naive"]
    for path in ("naive", "lean"):
        assert report["labels_lost"][path] == 0 and report["skewed_examples"][path] == 0
    assert report["examples"]["naive"] == report["examples"]["lean"] and report["identical_examples"]
    assert not list(spill.rglob("*.seg"))  # what spilled is gone once the run is over


def test_the_plan_of_what_each_path_holds_matches_what_it_held(tmp_path: Path) -> None:
    report = run_demo(requests=300, seed=3, out=tmp_path, world_config=SMALL).report
    planned = report["holding"]["planned"]
    # Every request of so short a run is open at once; the plan is within 5% of the measured peaks.
    assert planned["store_open_requests"] == 300
    naive, context = report["kv_peak_bytes_held"]["naive"], report["context_peak_bytes"]["lean"]
    assert 0.95 * planned["naive_store_bytes"] <= naive <= 1.05 * planned["naive_store_bytes"]
    assert 0.95 * planned["context_bytes"] <= context <= 1.05 * planned["context_bytes"]
    assert report["kv_peak_bytes_held"]["lean"] <= planned["lean_store_bytes"]


def test_a_run_the_machine_cannot_hold_is_refused_before_it_starts(tmp_path: Path, monkeypatch) -> None:
    import leanrec.sim.demo as demo_module
    from leanrec.sim.demo import DemoTooLarge

    monkeypatch.setattr(demo_module, "_available_memory", lambda: 1 << 30)  # a machine of 1 GiB
    with pytest.raises(DemoTooLarge, match=r"--requests 50,000 needs about .* of memory"):
        run_demo(requests=50_000, seed=3, out=tmp_path / "big")
    assert not (tmp_path / "big" / "warehouse").exists()  # refused before anything was written
