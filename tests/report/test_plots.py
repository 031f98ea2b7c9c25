"""The report's plots read correctly: linear axes from zero, bars labelled, each pair's ratio written."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from leanrec.report.demo_report import _fmt, bytes_figure, cpu_figure, positions_figure, write_html

# Figures of a demo run, shaped as report.json holds them; warehouse lean / naive is 0.49, the pair a
# log axis with a cut base made look like 0.1.
STAGE_BYTES = {
    "naive": {
        "serialized": 860_000_000,
        "kv_written": 861_000_000,
        "kv_read": 83_000_000,
        "warehouse_written": 33_600_000,
    },
    "lean": {
        "serialized": 21_600_000,
        "kv_written": 21_700_000,
        "kv_read": 20_000_000,
        "warehouse_written": 16_464_000,
    },
}
CPU = {
    "naive": {"serialize": 1.16, "kv_write": 1.07, "join": 0.61, "context": 0.0},
    "lean": {"serialize": 0.13, "kv_write": 0.09, "join": 0.54, "context": 0.0},
}


@pytest.fixture
def report() -> dict:
    views = [1000, 800, 600, 400, 300, 200, 150, 100, 50, 20]
    return {
        "requests": 1000,
        "seed": 7,
        "identical_examples": True,
        "wall_seconds": 1.0,
        "featureset": {
            "name": "demo",
            "version": 1,
            "features": 3,
            "request_side_bytes": 8,
            "item_side_bytes": 4,
        },
        "traffic": {"views_by_position": views},
        "logged_by_position": {"naive": [1000] * 10, "lean": [1000] * 6 + [400] * 4},
        "stage_bytes": STAGE_BYTES,
        "ledger": {p: {s: {"cpu_seconds": v} for s, v in CPU[p].items()} for p in ("naive", "lean")},
    }


def _axes(fig: plt.Figure) -> list[plt.Axes]:
    return [ax for ax in fig.axes if ax.has_data()]


@pytest.mark.parametrize("make", [positions_figure, bytes_figure, cpu_figure])
def test_every_plot_has_linear_axes_from_zero(report: dict, make) -> None:
    fig = make(report)
    try:
        assert _axes(fig)
        for ax in _axes(fig):
            assert ax.get_yscale() == "linear" and ax.get_xscale() == "linear"
            bottom, top = ax.get_ylim()
            assert bottom == 0 and top > 0
            # every bar and line fits inside the axis: nothing is cut off at the top
            for patch in ax.patches:
                assert patch.get_height() <= top
    finally:
        plt.close(fig)


def test_bytes_by_stage_label_every_bar_and_write_each_ratio(report: dict) -> None:
    fig = bytes_figure(report)
    try:
        axes = _axes(fig)
        assert len(axes) == len(STAGE_BYTES["naive"])  # a panel per stage, each on its own scale
        for ax, stage in zip(axes, STAGE_BYTES["naive"], strict=True):
            naive, lean = STAGE_BYTES["naive"][stage], STAGE_BYTES["lean"][stage]
            labels = [t.get_text() for t in ax.texts]
            assert _fmt(naive, "bytes") in labels and _fmt(lean, "bytes") in labels
            ticks = " ".join(t.get_text() for t in ax.get_xticklabels())
            assert f"{lean / naive:.3f}" in ticks, ticks
            # bar heights compare as the values do
            heights = sorted(p.get_height() for p in ax.patches)
            assert heights[0] / heights[1] == pytest.approx(min(naive, lean) / max(naive, lean))
        warehouse = " ".join(t.get_text() for t in axes[-1].get_xticklabels())
        assert "0.490" in warehouse
    finally:
        plt.close(fig)


def test_cpu_by_stage_labels_every_bar_and_each_ratio(report: dict) -> None:
    fig = cpu_figure(report)
    try:
        (ax,) = _axes(fig)
        labels = [t.get_text() for t in ax.texts]
        for path in ("naive", "lean"):
            for value in CPU[path].values():
                assert f"{value:.2f}" in labels
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        by_stage = dict(zip(sorted(CPU["naive"]), ticks, strict=True))
        assert by_stage["serialize"].endswith(f"{0.13 / 1.16:.3f}")
        assert by_stage["context"].endswith("—")  # nothing on either path: no ratio to show
    finally:
        plt.close(fig)


def test_the_views_plot_gives_each_total_and_lean_as_a_share_of_naive(report: dict) -> None:
    fig = positions_figure(report)
    try:
        legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert any("3,620" in t for t in legend)  # items viewed
        assert any("naive: 10,000 items" in t for t in legend)
        assert any("lean: 7,600 items" in t and "0.760" in t for t in legend)
    finally:
        plt.close(fig)


def test_the_html_report_holds_the_three_plots(report: dict, tmp_path) -> None:
    write_html(report, tmp_path / "report.html")
    assert (tmp_path / "report.html").read_text().count("data:image/png;base64,") == 3


def _audit_result():
    """The parts of an AuditResult the audit's plots read: two valuable features, noise, a retired set."""
    from types import SimpleNamespace as NS

    loss = {"u_emb_0": 0.12, "i_emb": 0.2, "u_taste_01": 0.004, "u_noise_00": -0.0004, "i_noise_00": 0.0001}
    weight = {"u_emb_0": 2.0, "i_emb": 0.5, "u_taste_01": 0.6, "u_noise_00": 0.9, "i_noise_00": 1.1}
    cost = {"u_emb_0": 64.0, "i_emb": 640.0, "u_taste_01": 4.0, "u_noise_00": 4.0, "i_noise_00": 36.0}
    return NS(
        importance={n: NS(loss=v) for n, v in loss.items()},
        costs={n: NS(logged_bytes=c, stored_bytes=c / 8, input_share=0.1) for n, c in cost.items()},
        weights=weight,
        plan=NS(reasons={"u_noise_00": "noise", "i_noise_00": "noise"}, budget=0.001),
    )


def test_the_audit_plots_have_linear_axes_from_zero_and_name_what_matters() -> None:
    from leanrec.audit.report import value_cost_figure, weight_rank_figure

    result = _audit_result()
    fig = value_cost_figure(result)
    try:
        full, zoom = _axes(fig)
        for ax in (full, zoom):
            assert ax.get_yscale() == "linear" and ax.get_xscale() == "linear"
            assert ax.get_xlim()[0] == 0
            bottom, top = ax.get_ylim()
            assert bottom < 0 < top  # zero on the axis: a feature worth nothing sits on the line
        assert full.get_ylim()[1] >= 0.2  # the most valuable feature is drawn to scale, not clipped
        assert zoom.get_ylim() == (-0.005, 0.005)  # the band where the plan decides, five budgets
        assert {"i_emb", "u_emb_0"} <= {t.get_text() for t in full.texts}
    finally:
        plt.close(fig)
    fig = weight_rank_figure(result)
    try:
        (ax,) = _axes(fig)
        assert ax.get_xscale() == ax.get_yscale() == "linear"
        assert ax.get_xlim()[0] == ax.get_ylim()[0] == 0
        ranks = ax.collections[0].get_offsets()
        # i_emb, the most valuable, has the smallest weight norm: the case the weight audit gets wrong
        assert [5, 1] in ranks.tolist() and [1, 2] in ranks.tolist()  # u_emb_0: largest weight, second
        assert sorted(ranks[:, 0].tolist()) == [1, 2, 3, 4, 5]
    finally:
        plt.close(fig)
