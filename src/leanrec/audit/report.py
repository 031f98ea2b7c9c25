"""The audit's table for the terminal, and its report: JSON, the pruned FeatureSet, HTML with plots."""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from rich.table import Table

from leanrec.audit.run import AuditResult
from leanrec.featurefile import dump_featureset
from leanrec.report.demo_report import _png
from leanrec.report.tables import Col, fitted
from leanrec.schema import FeatureSet

AUDIT_COLUMNS = (
    Col("feature", kind="name"),
    Col("weight norm", "weight", "first-layer weight norm", drop=5),
    Col("ΔAUC shuffled", "ΔAUC", "held-out AUC lost when shuffled"),
    Col("± 95%", drop=2),
    Col("logged B/req", "log B", "bytes logged per request"),
    Col("stored B/ex", "sto B", "warehouse bytes per example", drop=3),
    Col("work %", meaning="share of the late ranker's work", drop=1),
    Col("decision", kind="name"),
    Col("block", "blk", "features decided with it by one joint shuffle", drop=4),
)


def audit_table(result: AuditResult, head: int = 12, tail: int = 6, width: int | None = None) -> Table:
    """The ``head`` features first in the prune order, then the ``tail`` most worth their cost.

    Args:
        result: The audit.
        head: Features shown from the start of the prune order.
        tail: Features shown from its end, the most worth their cost first.
        width: The terminal's width (None: this process's); a narrow one gets short headers with a
            legend, never cut cells.

    """
    order = [n for n, _, _ in result.plan.order]
    rows: list[list[str] | None] = []
    for k, name in enumerate(order[:head] + order[max(head, len(order) - tail) :][::-1]):
        if k == head:
            rows.append(None)
        imp, cost = result.importance[name], result.costs[name]
        rows.append(
            [
                name,
                f"{result.weights[name]:.3f}",
                f"{imp.loss:+.5f}",
                f"{imp.ci:.5f}",
                f"{cost.logged_bytes:,.0f}",
                f"{cost.stored_bytes:.2f}",
                f"{100 * cost.work_share:.3f}",
                "retire" if name in result.plan.reasons else "keep",
                f"{len(imp.block)}",
            ]
        )
    caption = (
        f"retire {len(result.plan.retire)} of {len(result.importance)} features; their joint shuffle "
        f"costs {result.plan.loss:+.5f} AUC (budget {result.plan.budget}); {len(result.plan.related)} of "
        "no measurable value are kept because valuable features explain them (informative, redundant); "
        f"weight-norm vs permutation rank agreement on dense features (Spearman) "
        f"{result.weight_vs_permutation:.2f}; a block is decided by one joint shuffle of its features"
    )
    title = f"feature audit: held-out AUC {result.base_auc:.4f} on {result.heldout_requests:,} requests"
    return fitted(title, AUDIT_COLUMNS, rows, width, caption)


def value_cost_figure(result: AuditResult, named: int = 5) -> plt.Figure:
    """Permutation importance against cost, retired features marked, on linear axes from zero.

    The left panel shows every feature to scale; the right one the band around zero where the
    plan decides (five budgets either way), on its own linear scale, with the budget drawn. The
    ``named`` features worth the most are named.
    """
    names = list(result.importance)
    cost = np.array([result.costs[n].logged_bytes + result.costs[n].stored_bytes for n in names])
    value = np.array([result.importance[n].loss for n in names])
    retired = np.array([n in result.plan.reasons for n in names])
    band = 5 * max(result.plan.budget, 1e-6)
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax in (full, zoom):
        ax.scatter(cost[~retired], value[~retired], s=14, color="tab:blue", label="kept")
        ax.scatter(cost[retired], value[retired], s=14, color="tab:red", marker="x", label="retired")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlim(0, 1.05 * max(cost.max(initial=0), 1.0))
        ax.set_xlabel("bytes logged per request + stored per example")
    for k in np.argsort(-value)[:named]:
        full.annotate(names[k], (cost[k], value[k]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    top = max(value.max(initial=0), 0.0)
    low = min(value.min(initial=0), 0.0)
    full.set_ylim(low - 0.05 * (top - low or 1), top + 0.1 * (top - low or 1))
    full.set_ylabel("held-out AUC lost when shuffled")
    full.set_title("every feature, to scale")
    full.legend(fontsize=8)
    zoom.set_ylim(-band, band)
    zoom.axhline(result.plan.budget, color="tab:red", ls="--", lw=0.8, label=f"budget {result.plan.budget:g}")
    zoom.set_title(f"zoom: AUC lost within ±{band:g}")
    zoom.legend(fontsize=8)
    fig.suptitle("What each feature earns against what it costs")
    fig.tight_layout()
    return fig


def weight_rank_figure(result: AuditResult) -> plt.Figure:
    """Features ranked by weight norm against ranked by permutation importance, 1 the largest.

    Ranks are what the Spearman agreement compares; on linear axes the diagonal is perfect
    agreement, and a feature far from it is one the weight-based audit ranks wrongly.
    """
    names = [n for n in result.importance if result.costs[n].input_share and result.weights[n] > 0]
    weight = np.array([result.weights[n] for n in names])
    loss = np.array([result.importance[n].loss for n in names])
    by_weight = np.argsort(np.argsort(-weight, kind="stable"), kind="stable") + 1
    by_loss = np.argsort(np.argsort(-loss, kind="stable"), kind="stable") + 1
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.scatter(by_weight, by_loss, s=12)
    ax.plot([0, len(names) + 1], [0, len(names) + 1], color="grey", lw=0.8, ls="--", label="same rank")
    ax.set_xlim(0, len(names) + 1)
    ax.set_ylim(0, len(names) + 1)
    ax.set_aspect("equal")
    ax.set_xlabel("rank by weight norm (1 = largest; first layer, standardised; ids: pooled embedding)")
    ax.set_ylabel("rank by held-out AUC lost when shuffled (1 = largest)")
    ax.set_title(f"Weight norm against permutation, ranked: {len(names)} features")
    ax.legend(fontsize=8)
    return fig


def plot_value_cost(result: AuditResult) -> str:
    """:func:`value_cost_figure` as a base64 PNG."""
    return _png(value_cost_figure(result))


def plot_weight_vs_permutation(result: AuditResult) -> str:
    """:func:`weight_rank_figure` as a base64 PNG."""
    return _png(weight_rank_figure(result))


def write_audit(result: AuditResult, fs: FeatureSet, out: Path) -> FeatureSet:
    """Write ``audit.json``, ``featureset.toml`` (the pruned version), ``audit.html``; return the version."""
    out.mkdir(parents=True, exist_ok=True)
    pruned = result.plan.featureset(fs)
    (out / "audit.json").write_text(json.dumps(result.to_dict(), indent=1))
    (out / "featureset.toml").write_text(dump_featureset(pruned))
    related = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{r.r2:.3f}</td><td>{r.null_mean:.3f} ± {r.null_sd:.3f}</td></tr>"
        for n, r in sorted(result.related.items(), key=lambda kv: -kv[1].r2)
        if r.related
    )
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(v))}</td>"
            for v in (n, f"{result.importance[n].loss:+.5f}", f"{c:.4%}", n in result.plan.reasons)
        )
        + "</tr>"
        for n, _, c in result.plan.order
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>leanrec feature audit</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:2em auto}}td{{padding:2px 8px}}</style>
</head><body>
<h1>Feature audit of {html.escape(fs.name)} v{fs.version}</h1>
<p>Held-out AUC {result.base_auc:.4f} on {result.heldout_requests:,} requests
({result.heldout_examples:,} examples).
The plan retires {len(result.plan.retire)} of {len(result.importance)} features; shuffled together they cost
{result.plan.loss:+.5f} AUC against a budget of {result.plan.budget}. The pruned FeatureSet is
{html.escape(pruned.name)} v{pruned.version} (<code>featureset.toml</code>). Late-ranker p99 latency
{result.latency_p99_ms:.2f} ms per request; work shares are attributions of it, not measurements.</p>
<img src="data:image/png;base64,{plot_value_cost(result)}">
<p>Features ranked by weight norm against ranked by permutation importance (Spearman rank
agreement on dense features {result.weight_vs_permutation:.2f}): features far from the diagonal are
where the weight-based audit misleads.</p>
<img src="data:image/png;base64,{plot_weight_vs_permutation(result)}">
<h2>Kept although worth nothing measurable: explained by valuable features</h2>
<p>Shuffling these costs no measurable AUC, yet the valuable dense features of their side explain
their variation (share of variance explained, against the same share for unrelated values that
repeat as the rows do). They carry information the model reads elsewhere; retiring them is a
modelling decision for an ablation, not a cleanup.</p>
<table><tr><th>feature</th><th>explained</th><th>unrelated values</th></tr>{related}</table>
<h2>Prune order (value per cost, least first)</h2>
<table><tr><th>feature</th><th>ΔAUC shuffled</th><th>cost weight</th><th>retired</th></tr>{rows}</table>
</body></html>"""
    (out / "audit.html").write_text(page)
    return pruned
