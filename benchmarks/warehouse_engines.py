"""A request-level warehouse read by leanrec's reader, by DuckDB and by Spark SQL: the same examples.

    python benchmarks/warehouse_engines.py [--requests 5000] [--seed 7] [--warehouse DIR] [--out DIR]
        [--repeat 3] [--markdown]

Builds a request-level warehouse with ``leanrec demo``'s pipelines (or reads the one ``--warehouse``
names), then counts its requests, examples and labels three ways: with leanrec's training reader
(``iter_batches``, the examples training sees, with the click and like labels it reads), with DuckDB
and with Spark SQL in local mode (``local[2]``), each flattening the request rows into impression
rows with the queries of ``leanrec.warehouse.sql`` (``UNNEST`` in DuckDB, ``inline`` in Spark). Prints
the three engines' counts side by side with the time each took (its first run, and the median of the
runs after it, ``--repeat`` runs in all; Spark's session start apart), and exits non-zero unless every
count the engines share agrees exactly.
``--markdown`` also prints the README's table under the command line that reproduces it.

Spark and DuckDB are not dependencies of leanrec: ``pip install -e '.[warehouse]'`` installs them
(pyspark needs Java 17 or later on the PATH).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from leanrec.errors import InputError
from leanrec.train.reader import iter_batches
from leanrec.warehouse.sql import (
    COUNTED,
    DUCKDB_COUNTS,
    DUCKDB_IMPRESSIONS,
    SPARK_COUNTS,
    SPARK_IMPRESSIONS,
    duckdb_requests_view,
)
from leanrec.warehouse.store import featureset_of
from leanrec.warehouse.tables import TableLayout

if TYPE_CHECKING:  # pyspark is optional: imported when Spark starts, after its absence is reported
    from pyspark.sql import SparkSession

INSTALL = "pip install -e '.[warehouse]' (pyspark needs Java 17 or later)"
Counts = dict[str, int]


def leanrec_counts(warehouse: str) -> Counts:
    """Requests, examples, clicks and likes as leanrec's training reader yields them."""
    fs = featureset_of(warehouse)
    requests: set[str] = set()
    counts = {"examples": 0, "click": 0, "like": 0}
    for batch in iter_batches(warehouse, fs, layout=TableLayout.REQUEST):
        requests.update(batch.request_ids)
        counts["examples"] += batch.n_items
        counts["click"] += int(batch.click.sum().item())
        counts["like"] += int(batch.like.sum().item())
    return {"requests": len(requests), **counts}


def duckdb_counts(warehouse: str) -> Counts:
    """The counts of :data:`DUCKDB_COUNTS` over the flattened request rows, in a fresh connection."""
    import duckdb

    with duckdb.connect() as con:
        con.execute(duckdb_requests_view(warehouse))
        con.execute(f"CREATE VIEW impressions AS {DUCKDB_IMPRESSIONS}")
        row = con.execute(DUCKDB_COUNTS).fetchone()
    return dict(zip(COUNTED, (int(x) for x in row), strict=True))


@contextlib.contextmanager
def jvm_output_to(log: Path) -> Iterator[None]:
    """Send what the JVM prints (Spark's startup notices and log) to ``log`` rather than the terminal.

    The JVM is started as a child of this process while this block runs and keeps the file
    descriptors it inherits, so pointing this process's stdout and stderr at the file for the
    duration of the start is enough; Python's own output is back on the terminal afterwards.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log, "ab") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def start_spark(log: Path) -> SparkSession:
    """A local Spark session on two cores, its console progress off and its log in ``log``."""
    from pyspark.sql import SparkSession

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # no notice that the hostname is a loopback
    builder = (
        SparkSession.builder.master("local[2]")
        .appName("leanrec-warehouse-engines")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.driver.memory", "2g")
    )
    with jvm_output_to(log):
        spark = builder.getOrCreate()
        spark.sparkContext.setLogLevel("ERROR")
    return spark


def spark_counts(spark: SparkSession, warehouse: str) -> Counts:
    """The counts of :data:`SPARK_COUNTS` over the flattened request rows."""
    spark.read.parquet(warehouse).createOrReplaceTempView("requests")
    spark.sql(f"CREATE OR REPLACE TEMPORARY VIEW impressions AS {SPARK_IMPRESSIONS}")
    row = spark.sql(SPARK_COUNTS).collect()[0]
    return {name: int(row[name]) for name in COUNTED}


def timed(run: Callable[[], Counts], repeat: int) -> tuple[Counts, list[float]]:
    """``run``'s counts and its wall-clock seconds in each of ``repeat`` runs (counts must not change)."""
    seconds, first = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        got = run()
        seconds.append(time.perf_counter() - t0)
        if first is not None and got != first:
            raise RuntimeError(f"counts changed between runs: {first} then {got}")
        first = got
    return first or {}, seconds


def command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run's figures."""
    source = (
        f"--warehouse {args.warehouse}"
        if args.warehouse
        else f"--requests {args.requests} --seed {args.seed}"
    )
    return f"python benchmarks/warehouse_engines.py {source} --repeat {args.repeat}"


def build(args: argparse.Namespace, console: Console) -> str:
    """The warehouse to read: ``--warehouse``, or the lean (request-level) one of a demo run."""
    if args.warehouse:
        return str(args.warehouse)
    from leanrec.sim.demo import run_demo

    out = Path(args.out or tempfile.mkdtemp(prefix="leanrec-engines-"))
    console.print(
        f"building a warehouse: leanrec demo --requests {args.requests} --seed {args.seed} --out {out}"
    )
    run_demo(args.requests, args.seed, out)
    return str(out / "warehouse" / "lean")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=5_000, help="requests of the demo run (default 5000)")
    ap.add_argument("--seed", type=int, default=7, help="seed of the demo run (default 7)")
    ap.add_argument("--warehouse", default=None, help="read this request-level warehouse, run no demo")
    ap.add_argument("--out", default=None, help="folder of the demo run (default: a temporary folder)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each engine (default 3)")
    ap.add_argument("--markdown", action="store_true", help="also print the README's table as Markdown")
    args = ap.parse_args()
    if args.repeat < 1 or args.requests < 1:
        print(
            f"--repeat and --requests must be at least 1, got {args.repeat} and {args.requests}",
            file=sys.stderr,
        )
        return 2
    for module in ("duckdb", "pyspark"):
        try:
            __import__(module)
        except ImportError:
            print(f"{module} is not installed; {INSTALL}", file=sys.stderr)
            return 2
    import pyspark

    if int(pyspark.__version__.split(".")[0]) < 4:  # Spark 3 parses no SELECT * EXCEPT
        print(f"pyspark {pyspark.__version__} is older than 4.0; {INSTALL}", file=sys.stderr)
        return 2
    console = Console()
    try:
        warehouse = build(args, console)
        fs = featureset_of(warehouse)
        # Checks the layout and the first file's FeatureSet as it is called: a wrong folder is refused
        # before Spark starts.
        iter_batches(warehouse, fs, layout=TableLayout.REQUEST)
    except InputError as exc:
        print(exc, file=sys.stderr)
        return 2

    log = Path(tempfile.mkdtemp(prefix="leanrec-spark-")) / "spark.log"
    t0 = time.perf_counter()
    try:
        spark = start_spark(log)
    except Exception as exc:  # pyspark raises its own errors when the JVM does not start
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"Spark did not start: {reason} (its log: {log}); {INSTALL}", file=sys.stderr)
        return 2
    spark_start = time.perf_counter() - t0
    try:
        results = {
            "leanrec reader": timed(lambda: leanrec_counts(warehouse), args.repeat),
            "DuckDB": timed(lambda: duckdb_counts(warehouse), args.repeat),
            "Spark local[2]": timed(lambda: spark_counts(spark, warehouse), args.repeat),
        }
    finally:
        spark.stop()

    engines = list(results)
    rows, failures = [], []
    for name in COUNTED:
        got = {e: results[e][0][name] for e in engines if name in results[e][0]}
        agree = len(set(got.values())) == 1 and len(got) >= 2
        if not agree:
            failures.append(f"{name}: " + ", ".join(f"{e} {v:,}" for e, v in got.items()))
        cells = [f"{got[e]:,}" if e in got else "—" for e in engines]
        rows.append((name, cells, "yes" if agree else "NO"))
    # The first run of each engine pays for what a query engine does once (Spark compiles its plan and
    # warms the JVM); the later runs show what a query costs once it is warm.
    times = [("seconds, first run", [f"{results[e][1][0]:.2f} s" for e in engines])]
    if args.repeat > 1:
        later = f"seconds, median of runs 2-{args.repeat}" if args.repeat > 2 else "seconds, run 2"
        times.append((later, [f"{statistics.median(results[e][1][1:]):.2f} s" for e in engines]))

    table = Table(title=f"{warehouse}: request rows flattened into examples by three engines")
    for col in ("figure", *engines, "agree"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    for name, cells, agree in rows:
        table.add_row(name, *cells, agree)
    for label, cells in times:
        table.add_row(label, *cells, "")
    console.print(table)
    console.print(
        f"Spark session start (JVM, local[2]): {spark_start:.2f} s, not counted above; Spark's log: {log}. "
        "leanrec's reader yields click and like only (the labels training reads): — where it has no count."
    )
    if args.markdown:
        print(f"\n`{command(args)}`:\n")
        print("| figure | " + " | ".join(engines) + " | agree |\n|---|" + "---:|" * len(engines) + "---|")
        for name, cells, agree in rows:
            print(f"| {name} | " + " | ".join(cells) + f" | {agree} |")
        for label, cells in times:
            print(f"| {label} | " + " | ".join(cells) + " | |")
        print(f"| Spark session start | | | {spark_start:.2f} s | |")
    if failures:
        console.print("[red]the engines disagree:[/red] " + "; ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
