"""Terminal tables of the retrieval models: their figures, and break-even for every pair."""

from __future__ import annotations

from rich.table import Table

from leanrec.report.tables import Col, fitted
from leanrec.retrieval.lifecycle import Lifecycle, breakeven_table
from leanrec.retrieval.zoo import ZooResult

ZOO_COLUMNS = (
    Col("model", kind="name"),
    Col("epochs", "ep", "epochs trained"),
    Col("Recall@10", "R@10", "Recall@10"),
    Col("NDCG@10", "N@10", "NDCG@10"),
    Col("MRR@10", "MRR", "MRR@10", drop=2),
    Col("Hit@10", "Hit", "Hit@10", drop=1),
    Col("train CPU s", "CPU s", "training CPU seconds"),
    Col("train J", "J", "training energy, joules"),
    Col("J / query", "J/q", "joules of one query"),
)


def zoo_table(results: list[ZooResult], title: str, width: int | None = None) -> Table:
    """Per model: test metrics @10, training CPU seconds and energy, energy of one query.

    Whether each energy figure was measured or estimated goes into the caption when all agree, and
    as a star on each estimated one when they do not, so the numbers stay narrow.

    Args:
        results: The models' figures.
        title: Above the table.
        width: The terminal's width (None: this process's); a narrow one gets short headers with a
            legend, never cut cells.

    """
    marks = {r.fit.total.mark for r in results} | {r.query.total.mark for r in results}
    mixed = len(marks) > 1

    def star(mark: str) -> str:
        return "*" if mixed and mark == "estimated" else ""

    rows = [
        [
            r.name,
            str(r.epochs),
            *(f"{r.metrics[m]:.4f}" for m in ("recall", "ndcg", "mrr", "hit")),
            f"{r.fit.cpu_seconds:.2f}",
            f"{r.fit.total.joules:,.1f}{star(r.fit.total.mark)}",
            f"{r.query_joules:.3f}{star(r.query.total.mark)}",
        ]
        for r in results
    ]
    caption = "energy: * estimated, the rest measured" if mixed else f"energy: all {next(iter(marks), '')}"
    return fitted(title, ZOO_COLUMNS, rows, width, caption)


def breakeven_view(lives: list[Lifecycle], width: int | None = None) -> Table:
    """For every pair: the queries after which the model dearer to train is the cheaper one overall."""
    rows = [
        [dear, cheap, "never (not cheaper per query)" if n is None else f"{n:,.0f}"]
        for dear, cheap, n in breakeven_table(lives)
    ]
    cols = (
        Col("dearer to train", kind="name"),
        Col("cheaper to train", kind="name"),
        Col("queries n*", kind="label"),
    )
    return fitted(
        "break-even: queries after which the model dearer to train is cheaper overall", cols, rows, width
    )
