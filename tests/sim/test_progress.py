"""The demo's progress: each step reported as it goes, in small steps, and the run the same without it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from leanrec.sim.demo import CHECK_STEP, SETUP_STEP, DemoResult, run_demo
from leanrec.sim.traffic import EVENT_STEP, JOIN_STEP, PROGRESS_EVERY, RANK_STEP
from leanrec.world import WorldConfig

CONFIG = WorldConfig(n_users=400, n_items=3_000, n_creators=200, seed=11)
REQUESTS = 150  # about 1,000 arrive per simulated second: one tick ranks them all in one funnel call

# Figures that depend on the machine's timing, not on the traffic; everything else must be equal.
TIMED = ("cpu", "seconds", "joules", "gco2e", "peak_rss", "spill_dir")


def _figures(report: dict, prefix: str = "") -> dict[str, object]:
    """Every figure of a report, flattened, but those measured in time (CPU seconds and their energy)."""
    out: dict[str, object] = {}
    for key, value in report.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_figures(value, f"{name}."))
        elif not any(t in name for t in TIMED) and not name.endswith(".total"):  # a stage's CPU included
            out[name] = value
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoResult, DemoResult, list[tuple]]:
    """The same demo without progress, and with every report recorded."""
    plain = run_demo(REQUESTS, 5, tmp_path_factory.mktemp("plain"), world_config=CONFIG)
    calls: list[tuple] = []
    shown = run_demo(
        REQUESTS,
        5,
        tmp_path_factory.mktemp("shown"),
        world_config=CONFIG,
        progress=lambda *report: calls.append(report),
    )
    return plain, shown, calls


def test_reporting_progress_changes_no_figure(runs) -> None:
    plain, shown, _ = runs
    a, b = _figures(plain.report), _figures(shown.report)
    assert len(a) > 100  # the traffic, both paths' counts, bytes, examples, warehouse sizes …
    assert a == b
    assert plain.traffic.viewed == shown.traffic.viewed
    assert np.array_equal(plain.traffic.viewed_by_position, shown.traffic.viewed_by_position)
    tables = [r.pipelines[p].warehouse.read_examples() for r in (plain, shown) for p in plain.pipelines]
    assert tables[0].equals(tables[2]) and tables[1].equals(tables[3])


def test_the_setup_is_its_own_step_and_comes_first(runs) -> None:
    calls = runs[2]
    assert calls[0][:3] == (SETUP_STEP, 0, 1) and calls[0][3]  # said before the world is built
    assert calls[1][:3] == (SETUP_STEP, 1, 1)
    assert all(c[0] != SETUP_STEP for c in calls[2:])


def _of(calls: list[tuple], step: str) -> list[tuple]:
    return [c for c in calls if c[0] == step]


def test_ranking_and_logging_move_in_small_steps(runs) -> None:
    rank = _of(runs[2], RANK_STEP)
    done = [c[1] for c in rank]
    assert done[-1] == REQUESTS and all(c[2] == REQUESTS for c in rank)
    assert done == sorted(done)
    steps = np.diff(done)
    # One tick's arrivals are ranked in one funnel call, yet logged and reported a slice at a time.
    assert steps.max() <= PROGRESS_EVERY
    assert (steps > 0).sum() >= REQUESTS // PROGRESS_EVERY
    # While the funnel ranks, the step says so.
    assert any("funnel ranks" in c[3] for c in rank if len(c) > 3)


def test_each_path_reports_its_joins_as_it_goes(runs) -> None:
    calls = runs[2]
    for path in ("naive", "lean"):
        join = _of(calls, f"{JOIN_STEP}, {path}")
        done = [c[1] for c in join]
        assert done[0] == 0 and done[-1] == REQUESTS and done == sorted(done)
        assert np.diff(done).max() <= PROGRESS_EVERY
    # Every client call is delivered in the end: event batches, their duplicates and retries, signals.
    events, t = _of(calls, EVENT_STEP), runs[1].traffic
    sent = t.event_batches + t.duplicate_batches + t.retried_batches + t.signals_sent
    assert events[-1][1:3] == (sent, sent)
    assert len(events) > 10  # reported tick by tick, not at the end only


def test_checking_the_warehouses_is_the_last_step(runs) -> None:
    calls = runs[2]
    check = _of(calls, CHECK_STEP)
    assert calls[-1][0] == CHECK_STEP and calls[-1][1] == calls[-1][2]
    assert [c[1] for c in check] == list(range(check[-1][2] + 1))


def test_the_demo_command_shows_a_line_per_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rich.console import Console

    from leanrec.cli import _steps

    console = Console(record=True, width=120, force_terminal=True)
    with _steps(console) as shown:
        shown(SETUP_STEP, 0, 1, "the world")
        shown(RANK_STEP, 64, 200)
        shown(f"{JOIN_STEP}, naive", 0, 200)
        console.print()  # make the live display render once
    text = console.export_text()
    for words in (SETUP_STEP, "the world", RANK_STEP, "64/200", f"{JOIN_STEP}, naive", "0/200"):
        assert words in text, words
