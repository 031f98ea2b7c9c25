"""Terminal tables of the retrieval models: their figures, and break-even for every pair."""

from __future__ import annotations

from rich.table import Table

from leanrec.retrieval.lifecycle import Lifecycle, breakeven_table
from leanrec.retrieval.zoo import ZooResult


def zoo_table(results: list[ZooResult], title: str) -> Table:
    """Per model: test metrics @10, training CPU seconds and energy, energy of one query (with marks)."""
    table = Table(title=title)
    for c in (
        "model",
        "epochs",
        "Recall@10",
        "NDCG@10",
        "MRR@10",
        "Hit@10",
        "train CPU s",
        "train J",
        "J / query",
    ):
        table.add_column(c, justify="left" if c == "model" else "right")
    for r in results:
        table.add_row(
            r.name,
            str(r.epochs),
            *(f"{r.metrics[m]:.4f}" for m in ("recall", "ndcg", "mrr", "hit")),
            f"{r.fit.cpu_seconds:.2f}",
            f"{r.fit.total.joules:,.1f} ({r.fit.total.mark})",
            f"{r.query_joules:.3f} ({r.query.total.mark})",
        )
    return table


def breakeven_view(lives: list[Lifecycle]) -> Table:
    """For every pair: the queries after which the model dearer to train is the cheaper one overall."""
    table = Table(title="break-even: queries after which the model dearer to train is cheaper overall")
    for c in ("dearer to train", "cheaper to train", "queries n*"):
        table.add_column(c, justify="right" if c == "queries n*" else "left")
    for dear, cheap, n in breakeven_table(lives):
        table.add_row(dear, cheap, "never (not cheaper per query)" if n is None else f"{n:,.0f}")
    return table
