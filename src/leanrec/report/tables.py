"""Terminal tables that fit their terminal with every name and number printed whole.

Rich shrinks a table wider than the terminal by cutting its cells (``i_nois…``, ``Recal…``), which
loses exactly what a table is for. :func:`fitted` builds a table at the widest form that fits:
full headers first; then short headers, with a legend line saying what each stands for; then a
compact frame without vertical rules; then without its optional columns, least valuable first, the
caption naming those left out. Numbers never wrap and labels wrap at their spaces; only a table
that fits in none of these forms lets its cells fold onto a second line, and a cell is never cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table


@dataclass(frozen=True)
class Col:
    """One column of a fitted table.

    Attributes:
        header: The header when the table fits with it.
        short: The header in a narrow terminal (its meaning goes into the legend); None keeps ``header``.
        meaning: What ``short`` stands for, in the legend (default: ``header``).
        kind: ``number`` (right-justified, never wrapped), ``name`` (left, folded only as a last
            resort) or ``label`` (left, wrapped at its spaces).
        style: Rich style of the column's cells.
        drop: Where a narrow terminal may do without it: 0 never, else the order of leaving out (1
            first).

    """

    header: str
    short: str | None = None
    meaning: str | None = None
    kind: Literal["number", "name", "label"] = "number"
    style: str | None = None
    drop: int = 0


def _build(
    title: str | None,
    cols: Sequence[Col],
    rows: Sequence[Sequence[str] | None],
    caption: str | None,
    short: bool,
    compact: bool,
    dropped: int = 0,
    fold: bool = False,
) -> Table:
    keep = [i for i, c in enumerate(cols) if not 0 < c.drop <= dropped]
    left_out = [cols[i] for i in range(len(cols)) if i not in keep]
    legend = [f"{c.short} = {c.meaning or c.header}" for c in (cols[i] for i in keep) if short and c.short]
    lines = [caption] if caption else []
    if legend:
        lines.append("legend: " + "; ".join(legend))
    if left_out:
        lines.append(
            "not shown in a terminal this narrow: " + ", ".join(c.meaning or c.header for c in left_out)
        )
    cols = [cols[i] for i in keep]
    rows = [None if r is None else [r[i] for i in keep] for r in rows]
    table = Table(
        title=title,
        caption="\n".join(lines) or None,
        box=box.SIMPLE_HEAD if compact else box.HEAVY_HEAD,
        show_edge=not compact,
        pad_edge=not compact,
        collapse_padding=compact,
    )
    for c in cols:
        table.add_column(
            c.short if short and c.short else c.header,
            justify="right" if c.kind == "number" else "left",
            no_wrap=c.kind != "label" and not fold,
            overflow="fold",  # never an ellipsis: a cell that must give way goes onto a second line
            style=c.style,
        )
    for row in rows:
        if row is None:
            table.add_section()
        else:
            table.add_row(*row)
    return table


LABEL_WIDTH = 24
"""Columns a label may wrap to before a table counts as too wide for its terminal."""


def needed_width(table: Table, cols: Sequence[Col], rows: Sequence[Sequence[str] | None]) -> int:
    """Columns ``table`` needs: every cell on one line, but labels wrapped to ``LABEL_WIDTH``.

    Its title and caption wrap to whatever width it gets, so they do not count.
    """
    console = Console(width=10_000)
    natural = Measurement.get(console, console.options, table).maximum
    for i, col in enumerate(cols):
        if col.kind != "label":
            continue
        cells = [col.header, *(r[i] for r in rows if r is not None)]
        longest = max(cell_len(c) for c in cells)
        word = max(cell_len(w) for c in cells for w in c.split() or [""])
        natural -= longest - min(longest, max(LABEL_WIDTH, word))
    return natural


def fitted(
    title: str | None,
    cols: Sequence[Col],
    rows: Sequence[Sequence[str] | None],
    width: int | None = None,
    caption: str | None = None,
) -> Table:
    """The widest form of the table that fits ``width`` columns (see the module's docstring).

    Args:
        title: Above the table.
        cols: Its columns.
        rows: Cells, formatted; ``None`` starts a new section.
        width: The terminal's width (``console.width``); None: this process's terminal's (80 in a log).
        caption: Below the table; a legend of the short headers is added to it when they are used.

    """
    width = Console().width if width is None else width
    forms = [
        dict(short=False, compact=False),
        dict(short=True, compact=False),
        dict(short=True, compact=True),
    ]
    forms += [dict(short=True, compact=True, dropped=d) for d in sorted({c.drop for c in cols} - {0})]
    for form in forms:
        table = _build(title, cols, rows, caption, **form)
        kept = [c for c in cols if not 0 < c.drop <= form.get("dropped", 0)]
        shown = [None if r is None else [r[i] for i, c in enumerate(cols) if c in kept] for r in rows]
        if needed_width(table, kept, shown) <= width:
            return table
    return _build(title, cols, rows, caption, **forms[-1], fold=True)
