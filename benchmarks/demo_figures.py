"""Run ``leanrec demo`` at its judged size and print the lean/naive figures, with medians over repeats.

    python benchmarks/demo_figures.py --repeat 3

Exits non-zero if a judged figure misses its bound (labels lost or skewed examples on either path,
unequal examples, lean transient bytes above 15% of naive, lean warehouse bytes above 60% of naive,
wall time of a run 60 s or more).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table


def run_once(requests: int, seed: int, out: Path) -> dict:
    subprocess.run(
        ["leanrec", "demo", "--requests", str(requests), "--seed", str(seed), "--out", str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return json.loads((out / "report.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="leanrec-bench-"))
    reports = [run_once(args.requests, args.seed, root / f"run{i}") for i in range(args.repeat)]

    def med(key: str, side: str) -> float:
        return statistics.median(r[key][side] for r in reports)

    table = Table(title=f"leanrec demo, {args.requests} requests, seed {args.seed}, median of {args.repeat}")
    for col in ("figure", "naive", "lean", "lean / naive"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    keys = (
        "kv_writes",
        "kv_bytes_written",
        "serialize_cpu_seconds",
        "plumbing_cpu_seconds",
        "examples",
        "labels_lost",
        "skewed_examples",
        "warehouse_bytes",
        "joules_per_1k_requests",
        "gco2e_per_1k_requests",
    )
    for key in keys:
        n, lean = med(key, "naive"), med(key, "lean")
        table.add_row(
            key,
            f"{n:,.3f}" if n % 1 else f"{n:,.0f}",
            f"{lean:,.3f}" if lean % 1 else f"{lean:,.0f}",
            f"{lean / n:.3f}" if n else "—",
        )
    wall = statistics.median(r["wall_seconds"] for r in reports)
    console = Console()
    console.print(table)
    console.print(f"wall_seconds (median): {wall:.1f}")

    failures = []
    for r in reports:
        for key in ("labels_lost", "skewed_examples"):
            if r[key]["naive"] or r[key]["lean"]:
                failures.append(f"{key} is not 0: {r[key]}")
        if r["examples"]["naive"] != r["examples"]["lean"] or not r["identical_examples"]:
            failures.append(f"examples differ: {r['examples']}, identical={r['identical_examples']}")
        if r["kv_bytes_written"]["lean"] > 0.15 * r["kv_bytes_written"]["naive"]:
            failures.append(f"lean kv_bytes_written above 15% of naive: {r['kv_bytes_written']}")
        if r["warehouse_bytes"]["lean"] > 0.60 * r["warehouse_bytes"]["naive"]:
            failures.append(f"lean warehouse_bytes above 60% of naive: {r['warehouse_bytes']}")
        if r["wall_seconds"] >= 60:
            failures.append(f"wall_seconds {r['wall_seconds']:.1f} >= 60")
    for f in failures:
        console.print(f"[red]FAIL[/red] {f}")
    if not failures:
        console.print("all judged figures within their bounds")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
