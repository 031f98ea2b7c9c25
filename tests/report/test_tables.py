"""Terminal tables in an 80-column terminal (or narrower, or a log): every name and number printed whole."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace as NS

import numpy as np
import pytest
from rich.console import Console

from leanrec.report.tables import Col, fitted

ELLIPSIS = "…"


def _text(renderable, width: int) -> str:
    console = Console(width=width, file=io.StringIO(), color_system=None)
    console.print(renderable)
    return console.file.getvalue()


def _tokens(text: str) -> set[str]:
    """Every run of non-space characters, with the table's rules and frame stripped off."""
    return set(re.sub(r"[│┃┏┓┗┛┡┩┣┫╇╋━─┳┻┼├┤└┘┌┐]", " ", text).split())


def _whole(text: str, *values: str) -> None:
    assert ELLIPSIS not in text, text
    missing = [v for v in values if not all(part in _tokens(text) for part in v.split())]
    assert not missing, (missing, text)


def _audit_result(n: int = 40):
    """An AuditResult's parts that its table reads, with the long names real FeatureSets have."""
    rng = np.random.default_rng(0)
    names = [f"u_noise_id_{k:02d}" for k in range(n - 4)] + [
        "i_followers_log",
        "u_hist_creator",
        "u_top_category",
        "i_emb",
    ]
    loss = dict(zip(names, rng.normal(0, 0.002, n), strict=True)) | {"i_emb": 0.20622}
    return NS(
        base_auc=0.7445,
        heldout_requests=59,
        weights={m: float(rng.uniform(0, 5)) for m in names},
        importance={m: NS(loss=float(v), ci=0.00011, block=[0] * 16) for m, v in loss.items()},
        costs={m: NS(logged_bytes=36.0, stored_bytes=4.28, work_share=0.00096) for m in names},
        plan=NS(
            order=[(m, 0.0, 0.0) for m in sorted(names, key=lambda m: loss[m])],
            reasons={m: "noise" for m in names if loss[m] < 0.001},
            retire=[m for m in names if loss[m] < 0.001],
            loss=-0.0041,
            budget=0.001,
            related=[],
        ),
        weight_vs_permutation=0.31,
    )


@pytest.mark.parametrize("width", [80, 60])
def test_the_audit_table_shows_every_feature_name_and_number_whole(width: int) -> None:
    from leanrec.audit.report import audit_table

    result = _audit_result()
    text = _text(audit_table(result, width=width), width)
    order = [m for m, _, _ in result.plan.order]
    shown = order[:12] + order[-6:]
    _whole(text, *shown)
    for name in shown:
        imp = result.importance[name]
        _whole(text, f"{imp.loss:+.5f}")
    if width >= 80:  # what an 80-column terminal has room for, besides names and values
        _whole(text, *(f"{result.weights[m]:.3f}" for m in shown), "0.00011", "36", "4.28", "0.096", "16")
    assert max(len(line.rstrip()) for line in text.splitlines()) <= width


def test_a_narrow_audit_table_says_what_its_short_headers_mean_and_what_it_left_out() -> None:
    from leanrec.audit.report import audit_table

    text = " ".join(_text(audit_table(_audit_result(), width=60), 60).split())
    assert "legend:" in text and "bytes logged per request" in text
    assert "not shown in a terminal this narrow" in text
    wide = _text(audit_table(_audit_result(), width=140), 140)
    assert "legend" not in wide and "ΔAUC shuffled" in wide  # full headers where they fit


def _zoo(mark: str = "estimated"):
    def reading(joules: float, cpu: float = 0.0):
        return NS(cpu_seconds=cpu, total=NS(joules=joules, mark=mark))

    return [
        NS(
            name=name,
            epochs=epochs,
            metrics={"recall": r, "ndcg": r + 0.03, "mrr": r + 0.2, "hit": r + 0.4},
            fit=reading(joules, cpu),
            query=reading(query),
            query_joules=query,
        )
        for name, epochs, r, cpu, joules, query in (
            ("Pop", 1, 0.1270, 0.0, 0.0, 0.016),
            ("ItemKNN", 1, 0.2406, 0.18, 1.8, 0.547),
            ("BPR", 20, 0.2045, 3.66, 37.2, 0.081),
            ("LightGCN", 20, 0.1842, 8.20, 83.3, 0.063),
            ("TwoTower", 20, 0.1696, 21.72, 221.0, 0.081),
        )
    ]


@pytest.mark.parametrize("width", [80, 64])
def test_the_retrieval_tables_show_every_model_name_and_number_whole(width: int) -> None:
    from leanrec.report.retrieval_report import breakeven_view, zoo_table
    from leanrec.retrieval.lifecycle import Lifecycle

    results = _zoo()
    text = _text(zoo_table(results, "ml-100k: models, test metrics and energy", width), width)
    for r in results:
        _whole(
            text, r.name, f"{r.metrics['recall']:.4f}", f"{r.metrics['ndcg']:.4f}", f"{r.fit.cpu_seconds:.2f}"
        )
        _whole(text, f"{r.fit.total.joules:,.1f}", f"{r.query_joules:.3f}")
        if width >= 80:
            _whole(text, f"{r.metrics['mrr']:.4f}", f"{r.metrics['hit']:.4f}")
    assert "energy: all estimated" in " ".join(text.split())
    lives = [Lifecycle(r.name, r.fit.total.joules, r.query_joules, "estimated") for r in results]
    text = _text(breakeven_view(lives, width), width)
    _whole(text, *(r.name for r in results))
    assert "never" in text


def test_mixed_energy_marks_are_starred_not_spelled_in_every_cell() -> None:
    from leanrec.report.retrieval_report import zoo_table

    results = _zoo()
    results[0].fit.total.mark = "measured"
    text = _text(zoo_table(results, "t", 80), 80)
    _whole(text, "37.2*", "0.0", "energy: * estimated, the rest measured")


def _demo_report() -> dict:
    pair = {"naive": 523_215, "lean": 38_299}
    return {
        "requests": 5000,
        "seed": 7,
        "identical_examples": True,
        "wall_seconds": 61.9,
        "kv_writes": pair,
        "kv_bytes_written": {"naive": 1_438_000_000, "lean": 39_600_000},
        "context_byte_seconds": {"naive": 0, "lean": 18_120_000_000},
        "examples": {"naive": 48_732, "lean": 48_732},
        "joules_per_1k_requests": {"naive": 79.0, "lean": 8.6},
        "warehouse_bytes": {"naive": 33_650_000, "lean": 15_980_000},
    }


@pytest.mark.parametrize("width", [80, 60])
def test_the_demo_table_shows_every_figure_whole(width: int) -> None:
    from leanrec.report.demo_report import render_table, summary_rows

    report = _demo_report()
    text = _text(render_table(report, width), width)
    for _, naive, lean, ratio in summary_rows(report):
        _whole(text, naive, lean, ratio)
    assert max(len(line.rstrip()) for line in text.splitlines()) <= width


def test_the_widest_form_that_fits_is_chosen() -> None:
    cols = (Col("a very long name column", kind="name"), Col("a long header", "L", "a long header"))
    rows = [["short", "1"]]
    assert "a long header" in _text(fitted("t", cols, rows, 100), 100)
    narrow = " ".join(_text(fitted("t", cols, rows, 24), 24).split())
    assert "legend: L = a long header" in narrow
