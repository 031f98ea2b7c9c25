"""Warehouse bytes of one traffic in three layouts: impression rows by request, request-level, deduplicated.

    python benchmarks/warehouse_dedup.py --warehouse leanrec-demo/warehouse/lean
    python benchmarks/warehouse_dedup.py --requests 5000 --seed 7

Reads the request-level warehouse a ``leanrec demo`` wrote (or runs the demo first, into a temporary
folder), writes its files again with the deduplicated layout's writer, file by file
(:func:`~leanrec.warehouse.store.dedup_copy`), reads them back, checks that every example is the
same as the request-level warehouse's, and prints the bytes of the three layouts beside the
strongest naive one (impression rows sorted by request and position,
:func:`~leanrec.warehouse.store.sorted_impression_bytes`), all written with the same zstd Parquet
options (:func:`~leanrec.warehouse.tables.parquet_options`; the request-level files are written
again with them, so that a warehouse of an older version compares fairly); then what the
deduplicated files hold: the request rows, the distinct item feature rows and the distinct slow
request feature rows. Exits non-zero if the examples differ.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from leanrec.errors import InputError
from leanrec.sim.demo import run_demo
from leanrec.train.reader import warehouse_files
from leanrec.warehouse.store import (
    ParquetWarehouse,
    dedup_copy,
    featureset_of,
    sorted_impression_bytes,
    warehouse_bytes,
)
from leanrec.warehouse.tables import DedupTable, TableLayout, parquet_options


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def _rewritten_bytes(warehouse: str) -> int:
    """Bytes of a warehouse's files written again, one by one, with today's Parquet options."""
    total = 0
    for path in warehouse_files(warehouse):
        table = pq.read_table(path)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **parquet_options(table))
        total += sink.getvalue().size
    return total


SIDE_TABLES = {
    DedupTable.USERS: "user rows",
    DedupTable.SLOW: "slow request rows",
    DedupTable.ITEMS: "item rows",
    DedupTable.ITEMS_SLOW: "slow item rows",
}


def measure(warehouse: str, work: Path, console: Console, top: int = 0) -> bool:
    """Print the three layouts' bytes for one request-level warehouse; whether the examples matched.

    With ``top``, also the largest columns of the deduplicated files: what a layout cannot shrink.
    """
    fs = featureset_of(warehouse)
    request = ParquetWarehouse(warehouse, fs, TableLayout.REQUEST)
    dedup_uri = str(work / "dedup")
    dedup_copy(warehouse, dedup_uri, fs)
    dedup = ParquetWarehouse(dedup_uri, fs, TableLayout.DEDUP)
    same = dedup.read_examples().equals(request.read_examples())

    sizes = {
        "impression rows sorted by request": sorted_impression_bytes(warehouse, fs),
        "request-level": _rewritten_bytes(warehouse),
        "deduplicated": warehouse_bytes(dedup_uri),
    }
    best = sizes["impression rows sorted by request"]
    table = Table(title=f"warehouse bytes of {warehouse}")
    for col in ("layout", "bytes", "vs sorted impression rows"):
        table.add_column(col, justify="left" if col == "layout" else "right")
    for name, size in sizes.items():
        table.add_row(name, _mib(size), f"{size / best:.3f}x")
    console.print(table)

    files = requests = viewed = 0
    parts = {"request rows": 0, **{t.value: 0 for t in DedupTable}}
    counts = {t.value: 0 for t in DedupTable}
    columns: Counter[tuple[str, str]] = Counter()
    for path in Path(dedup_uri).rglob("*.parquet"):
        name = path.name
        table_name = name.split(".")[1] if name.startswith("_") else "request rows"
        meta = pq.ParquetFile(path).metadata
        parts[table_name] += path.stat().st_size
        for g in range(meta.num_row_groups):
            for i in range(meta.num_columns):
                chunk = meta.row_group(g).column(i)
                parts_of = chunk.path_in_schema.split(".")
                column = f"items.{parts_of[-1]}" if parts_of[0] == "items" else parts_of[0]
                columns[(table_name, column)] += chunk.total_compressed_size
        if table_name == "request rows":
            requests += meta.num_rows
            items = pq.read_table(path, columns=["items"]).column("items")
            viewed += int(pc.sum(pc.list_value_length(items)).as_py() or 0)
            files += 1
        else:
            counts[table_name] += meta.num_rows
    held = Table(title=f"what the deduplicated files hold ({files} request files, their side files)")
    for col in ("table", "rows", "bytes", "share"):
        held.add_column(col, justify="left" if col == "table" else "right")
    total = sum(parts.values())
    held.add_row(
        "request rows",
        f"{requests:,} requests, {viewed:,} viewed items",
        _mib(parts["request rows"]),
        f"{parts['request rows'] / total:.1%}",
    )
    for side in DedupTable:
        if counts[side.value]:
            held.add_row(
                f"{side.value} ({SIDE_TABLES[side]})",
                f"{counts[side.value]:,}",
                _mib(parts[side.value]),
                f"{parts[side.value] / total:.1%}",
            )
    console.print(held)
    if top:
        biggest = Table(title=f"the {top} largest columns of the deduplicated files (compressed)")
        for col in ("table", "column", "bytes", "share"):
            biggest.add_column(col, justify="left" if col in ("table", "column") else "right")
        for (table_name, column), size in columns.most_common(top):
            biggest.add_row(table_name, column, _mib(size), f"{size / total:.1%}")
        console.print(biggest)
    console.print(f"identical examples in both layouts: {same}")
    return same


def main() -> int:
    """Measure the warehouse given, or that of a demo run of the requests given."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--warehouse", help="a request-level warehouse (e.g. leanrec-demo/warehouse/lean)")
    ap.add_argument("--requests", type=int, default=5000, help="without --warehouse: the demo's requests")
    ap.add_argument("--seed", type=int, default=7, help="without --warehouse: the demo's seed")
    ap.add_argument("--columns", type=int, default=0, help="print the N largest columns deduplicated")
    args = ap.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="leanrec-dedup-bench-") as tmp:
        warehouse = args.warehouse
        try:
            if warehouse is None:
                console.print(
                    f"leanrec demo --requests {args.requests} --seed {args.seed} (into a temporary folder)"
                )
                run_demo(requests=args.requests, seed=args.seed, out=Path(tmp) / "demo")
                warehouse = str(Path(tmp) / "demo" / "warehouse" / "lean")
            return 0 if measure(warehouse, Path(tmp), console, args.columns) else 1
        except InputError as exc:  # no request-level warehouse there, a demo too large: one line
            console.print(f"warehouse_dedup: {exc}")
            return 2


if __name__ == "__main__":
    sys.exit(main())
