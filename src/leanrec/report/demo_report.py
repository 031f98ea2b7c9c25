"""What ``leanrec demo`` shows: a side-by-side table, ``report.json`` and ``report.html``.

Every figure is a pair measured in the same run, naive and lean, with the ratio lean / naive.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt
import numpy as np
from rich.table import Table

from leanrec.report.tables import Col, fitted

# (key in report.json, label, unit) of the rows shown side by side, in order.
ROWS: tuple[tuple[str, str, str], ...] = (
    ("kv_writes", "transient-store writes", "count"),
    ("kv_bytes_written", "transient-store bytes written", "bytes"),
    ("kv_bytes_read", "transient-store bytes read", "bytes"),
    ("bytes_serialized", "bytes serialized", "bytes"),
    ("serialize_cpu_seconds", "serialization CPU", "seconds"),
    ("plumbing_cpu_seconds", "plumbing CPU, all stages", "seconds"),
    ("kv_peak_bytes_held", "transient store held, peak", "bytes"),
    ("kv_peak_bytes_spilled", "  of it spilled to disk (embedded store)", "bytes"),
    ("context_peak_bytes", "ranked contexts held by the logger, peak", "bytes"),
    ("context_byte_seconds", "ranked contexts held by the logger", "byte·s"),
    ("examples", "training examples", "count"),
    ("labels_lost", "labels lost", "count"),
    ("skewed_examples", "skewed examples", "count"),
    ("fresh_join_would_skew", "examples a fresh feature lookup would skew", "count"),
    ("warehouse_bytes", "warehouse bytes", "bytes"),
    ("warehouse_bytes_per_example", "warehouse bytes per example", "bytes"),
    ("events_refused", "events refused at ingest (malformed, wrong item)", "count"),
    ("mismatched_events", "events naming another item, dropped at the join", "count"),
    ("duplicate_events", "duplicate events absorbed", "count"),
    ("late_events", "late events counted", "count"),
    ("joules_per_1k_requests", "energy per 1,000 requests (estimated)", "joules"),
    ("gco2e_per_1k_requests", "gCO2e per 1,000 requests (estimated)", "grams"),
)


def _fmt(value: float, unit: str) -> str:
    if unit == "bytes" or unit == "byte·s":
        for scale, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if abs(value) >= scale:
                suffix = "·s" if unit == "byte·s" else ""
                return f"{value / scale:,.2f} {name}{suffix}"
        return f"{value:,.0f} B" + ("·s" if unit == "byte·s" else "")
    if unit == "seconds":
        return f"{value:,.3f} s"
    if unit == "joules":
        return f"{value:,.1f} J"
    if unit == "grams":
        return f"{value:,.4f} g"
    return f"{value:,.0f}"


def _ratio(naive: float, lean: float) -> str:
    if naive == 0:
        return "—" if lean == 0 else "n/a"
    return f"{lean / naive:.3f}"


def summary_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(label, naive, lean, lean/naive) per row, formatted.

    Beside the warehouse bytes stands the impression layout at its best, rows sorted by request
    (``sorted_impression_bytes``), in the naive column: the saving of the request-level layout alone;
    and against it the deduplicated layout (``dedup_bytes``: each distinct user and item feature
    row, split by how often its features change, stored once per partition) in the lean column.
    """
    out = []
    for key, label, unit in ROWS:
        pair = report.get(key)
        if not isinstance(pair, dict):
            continue
        out.append(
            (label, _fmt(pair["naive"], unit), _fmt(pair["lean"], unit), _ratio(pair["naive"], pair["lean"]))
        )
        if key == "warehouse_bytes" and "sorted_impression_bytes" in report:
            best = report["sorted_impression_bytes"]
            out.append(
                (
                    "  vs impression rows sorted by request",
                    _fmt(best, "bytes"),
                    _fmt(pair["lean"], "bytes"),
                    _ratio(best, pair["lean"]),
                )
            )
            if "dedup_bytes" in report:  # distinct user and item feature rows once per partition
                out.append(
                    (
                        "  deduplicated vs impression rows sorted",
                        _fmt(best, "bytes"),
                        _fmt(report["dedup_bytes"], "bytes"),
                        _ratio(best, report["dedup_bytes"]),
                    )
                )
    return out


def engagement_line(report: dict) -> str:
    """The engagement rates drawn on viewed items, each beside its sourced range."""
    rates = report.get("engagement")
    if not rates:
        return ""
    parts = [
        f"{name.replace('_', ' ')} {r['rate']:.2%} ({r['low']:.2%}–{r['high']:.2%})"
        for name, r in rates.items()
    ]
    return "engagement on viewed items (sourced range): " + ", ".join(parts)


def holding_line(report: dict) -> str:
    """How much each path held, and for how long, and the process's peak memory."""
    h = report.get("holding")
    if not h:
        return ""
    plan = h["planned"]
    spilled = report["kv_peak_bytes_spilled"]["naive"]
    where = f" ({_fmt(spilled, 'bytes')} of it spilled to disk)" if spilled else ""
    naive, lean = (_fmt(report["kv_peak_bytes_held"][p], "bytes") for p in ("naive", "lean"))
    return (
        f"held: {plan['store_open_requests']:,} requests' transient entries at once, each until its join "
        f"{plan['store_hold_s']:.0f} s after ranking: naive {naive}{where}, lean {lean}; lean's logger held "
        f"{_fmt(report['context_peak_bytes']['lean'], 'bytes')} of ranked contexts, each until its pages "
        f"were logged or {plan['context_hold_s']:.0f} s idle; peak memory of the process "
        f"{_fmt(report.get('peak_rss_bytes', 0), 'bytes')}"
    )


def _pair_columns(a: str, b: str, ratio: str) -> tuple[Col, ...]:
    """A label column, two figures side by side, and their ratio (``R`` in a narrow terminal)."""
    return (Col("figure", kind="label"), Col(a), Col(b), Col(ratio, "R", ratio, style="bold"))


def render_table(report: dict, width: int | None = None) -> Table:
    """The side-by-side table for the terminal, fitted to ``width`` columns (no cell is ever cut)."""
    caption = (
        f"identical examples on both paths: {report['identical_examples']} · "
        f"wall time {report['wall_seconds']:.1f} s"
        + "".join(f"\n{line}" for line in (engagement_line(report), holding_line(report)) if line)
        + _energy_caption(report)
    )
    title = f"leanrec demo — {report['requests']:,} requests, seed {report['seed']}: naive vs lean"
    return fitted(title, _pair_columns("naive", "lean", "lean / naive"), summary_rows(report), width, caption)


def _energy_caption(report: dict) -> str:
    """Where the energy figures' power model and grid intensity come from."""
    e = report.get("energy", {}).get("lean")
    if not e:
        return ""
    return f"\nenergy estimated: CPU at {e['power_source']}; grid {e['grid_source']}"


def render_loop(loop: dict, width: int | None = None) -> Table:
    """Round 0 (stand-in ranker) against round 1 (the model trained on round 0's warehouse)."""
    rows = []
    for key in ("clicks_per_request", "likes_per_request", "viewed_per_request"):
        a, b = loop["round0"][key], loop["round1"][key]
        rows.append([key.replace("_", " "), f"{a:.3f}", f"{b:.3f}", f"{b / a:.3f}" if a else "—"])
    m = loop["model"]
    kept = f"epoch {m['best_epoch']}" if m.get("best_epoch") else "the solved wide part"
    caption = (
        f"model held-out AUC {m['test_auc']:.4f}, oracle AUC {m['oracle_auc']:.4f} (gap {m['auc_gap']:.4f}); "
        f"{m['epochs_run']} epochs at {m['examples_per_second']:,.0f} examples/s, kept {kept}; training "
        f"{m['training_cpu_seconds']:,.1f} CPU s, {m['training_joules']:,.0f} J (estimated)"
    )
    title = "closing the loop: round 0 ranks with the stand-in, round 1 with the trained model"
    return fitted(title, _pair_columns("round 0", "round 1", "round 1 / round 0"), rows, width, caption)


def render_audit(audit: dict, width: int | None = None) -> Table:
    """Round 1 (full FeatureSet) against round 2 (audited, pruned, retrained) on the same traffic."""
    rows = []
    for key, fmt in (
        ("logged_bytes_per_request", "{:,.0f}"),
        ("warehouse_bytes_per_example", "{:,.1f}"),
        ("p99_latency_ms", "{:.2f}"),
        ("test_auc", "{:.4f}"),
        ("clicks_per_request", "{:.3f}"),
    ):
        a, b = audit["before"][key], audit["after"][key]
        rows.append([key.replace("_", " "), fmt.format(a), fmt.format(b), f"{audit['ratio'][key]:.3f}"])
    t = audit["truth"]
    caption = (
        f"held-out AUC change {audit['auc_change']:+.4f}; retired {t['retired']}: {t['noise_retired']} of "
        f"{t['noise_features']} pure-noise features ({t['noise_recall']:.0%}), {t['informative_retired']} "
        f"informative ({t['informative_share']:.0%} of retired); kept {len(audit.get('kept_related', []))} "
        f"of no measurable value that valuable features explain; audit {audit['audit_seconds']:.0f} s"
    )
    title = (
        f"audit round: v{audit['featureset']['before']} ({audit['features']['before']} features) → "
        f"v{audit['featureset']['after']} ({audit['features']['after']}), budget {audit['budget']}"
    )
    return fitted(title, _pair_columns("full", "pruned", "pruned / full"), rows, width, caption)


def write_json(report: dict, path: Path) -> None:
    """Write ``report.json``."""
    path.write_text(json.dumps(report, indent=2, sort_keys=False))


def _png(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


PATHS = (("naive", "tab:red"), ("lean", "tab:green"))
"""The two paths and their colours, in the order every plot draws them."""


def pair_bars(
    ax: plt.Axes, names: list[str], naive: list[float], lean: list[float], fmt: Callable[[float], str]
) -> None:
    """Naive and lean bars side by side on a linear axis from zero, each labelled with its value.

    Under each pair stands its ratio lean / naive, so no reading depends on the bars' lengths alone;
    the axis starts at zero so that the lengths compare as the values do.
    """
    x = np.arange(len(names))
    for i, ((path, color), values) in enumerate(zip(PATHS, (naive, lean), strict=True)):
        bars = ax.bar(x + (i - 0.5) * 0.4, values, 0.4, color=color, label=path)
        ax.bar_label(bars, labels=[fmt(v) for v in values], padding=2, fontsize=7)
    ax.set_xticks(
        x, [f"{n}\nlean / naive\n{_ratio(a, b)}" for n, a, b in zip(names, naive, lean, strict=True)]
    )
    ax.set_yscale("linear")
    ax.set_ylim(0, 1.15 * max([*naive, *lean, 0.0]) or 1.0)  # room above for the labels


def positions_figure(report: dict) -> plt.Figure:
    """Views by scroll position against the positions each policy logged, on a linear axis from zero.

    The legend gives each line's total, and lean's as a share of naive's: the area between the lines
    is what the naive path logs for no one.
    """
    views = np.array(report["traffic"]["views_by_position"], float)
    pos = np.arange(1, len(views) + 1)
    logged = {name: np.array(report["logged_by_position"][name], float) for name, _ in PATHS}
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(pos, views, color="black", lw=2, label=f"items viewed: {views.sum():,.0f}")
    for name, color in PATHS:
        share = (
            "" if name == "naive" else f", lean / naive {_ratio(logged['naive'].sum(), logged[name].sum())}"
        )
        ax.step(
            np.arange(1, len(logged[name]) + 1),
            logged[name],
            where="mid",
            color=color,
            label=f"features logged, {name}: {logged[name].sum():,.0f} items{share}",
        )
    ax.set_ylim(0, 1.05 * max(views.max(initial=0), *(v.max(initial=0) for v in logged.values())) or 1.0)
    ax.set_xlim(0.5, len(views) + 0.5)
    ax.set_xlabel("scroll position")
    ax.set_ylabel("requests")
    ax.set_title("What users saw, and what each policy logged")
    ax.legend()
    return fig


def _byte_unit(value: float) -> tuple[float, str]:
    """The binary unit ``value`` reads best in: (bytes per unit, its name)."""
    for scale, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if abs(value) >= scale:
            return float(scale), name
    return 1.0, "bytes"


def bytes_figure(report: dict) -> plt.Figure:
    """Bytes by stage, a panel per stage (each its own linear axis from zero), values and ratios written.

    Stages differ by orders of magnitude; a panel each keeps every pair readable without a log axis.
    """
    stages = list(report["stage_bytes"]["naive"])
    fig, axes = plt.subplots(1, len(stages), figsize=(2.4 * len(stages), 3.6), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        naive, lean = (float(report["stage_bytes"][path][stage]) for path, _ in PATHS)
        scale, unit = _byte_unit(max(naive, lean))
        pair_bars(
            ax,
            [stage.replace("_", " ")],
            [naive / scale],
            [lean / scale],
            lambda v, s=scale: _fmt(v * s, "bytes"),
        )
        ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8)
    fig.suptitle("Bytes by stage (a panel per stage, each from zero)")
    fig.tight_layout()
    return fig


def cpu_figure(report: dict) -> plt.Figure:
    """CPU seconds by stage for each path, one linear axis from zero, values and ratios written."""
    ledgers = {name: report["ledger"][name] for name, _ in PATHS}
    stages = sorted(set(ledgers["naive"]) | set(ledgers["lean"]))
    naive, lean = (
        [float(ledgers[path].get(s, {}).get("cpu_seconds", 0.0)) for s in stages] for path, _ in PATHS
    )
    fig, ax = plt.subplots(figsize=(11, 4.2))
    pair_bars(ax, [s.replace("_", " ") for s in stages], naive, lean, lambda v: f"{v:.2f}")
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylabel("CPU seconds")
    ax.set_title("Plumbing CPU by stage")
    ax.legend()
    return fig


def plot_positions(report: dict) -> str:
    """:func:`positions_figure` as a base64 PNG."""
    return _png(positions_figure(report))


def plot_bytes(report: dict) -> str:
    """:func:`bytes_figure` as a base64 PNG."""
    return _png(bytes_figure(report))


def plot_cpu(report: dict) -> str:
    """:func:`cpu_figure` as a base64 PNG."""
    return _png(cpu_figure(report))


def write_html(report: dict, path: Path) -> None:
    """Write ``report.html``: the table and three plots, self-contained."""
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in summary_rows(report)
    )
    plots = "".join(
        f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{png}"></figure>'
        for alt, png in (
            ("views and logged positions by scroll position", plot_positions(report)),
            ("bytes by stage", plot_bytes(report)),
            ("CPU seconds by stage", plot_cpu(report)),
        )
    )
    fs = report["featureset"]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>leanrec demo report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ padding: .3rem .8rem; border-bottom: 1px solid #ddd; }}
td:not(:first-child) {{ text-align: right; font-variant-numeric: tabular-nums; }}
td:last-child {{ font-weight: bold; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>leanrec demo: naive vs lean plumbing</h1>
<p>{report["requests"]:,} ranked requests (seed {report["seed"]}), the same traffic through both paths in one
process. FeatureSet <code>{html.escape(fs["name"])}</code> v{fs["version"]}: {fs["features"]} features,
{fs["request_side_bytes"]:,} B per request side, {fs["item_side_bytes"]:,} B per item.
Identical examples on both paths: <b>{report["identical_examples"]}</b>.
Wall time {report["wall_seconds"]:.1f} s.</p>
<p>Naive: every ranked item logged at rank time with the whole scored vector, impression-level warehouse.
Lean: user features once per request, head of the list at rank time and later pages when the user
scrolls there (or an event touches them), request-level warehouse.</p>
<table><tr><th>figure</th><th>naive</th><th>lean</th><th>lean / naive</th></tr>{rows}</table>
<p>{html.escape(engagement_line(report))}.</p>
<p>{html.escape(holding_line(report))}.</p>
{plots}
</body></html>"""
    path.write_text(page)
