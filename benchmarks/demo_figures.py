"""Run ``leanrec demo`` and print the lean/naive figures, with medians over repeats.

    python benchmarks/demo_figures.py --repeat 3 [--requests 5000] [--seed 7] [--markdown]

Exits non-zero if a judged figure misses its bound (labels lost or skewed examples on either path,
unequal examples, lean transient bytes above 15% of naive, lean warehouse bytes above 60% of naive,
an engagement rate outside its sourced range, wall time of a run at ``--max-wall`` seconds or more).
``--markdown`` prints the README's tables, with the command that printed them above each.
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

from leanrec.report.demo_report import holding_line, summary_rows


def run_once(requests: int, seed: int, out: Path) -> dict:
    subprocess.run(
        ["leanrec", "demo", "--requests", str(requests), "--seed", str(seed), "--out", str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return json.loads((out / "report.json").read_text())


def median_report(reports: list[dict]) -> dict:
    """One report whose every naive/lean pair and number is the median over the runs."""
    out = dict(reports[0])
    for key, value in reports[0].items():
        if isinstance(value, dict) and set(value) == {"naive", "lean"}:
            if all(isinstance(value[p], int | float) for p in ("naive", "lean")):
                out[key] = {p: statistics.median(r[key][p] for r in reports) for p in ("naive", "lean")}
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in reports)
    return out


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-wall", type=float, default=60.0, help="bound on one run's wall seconds")
    parser.add_argument("--markdown", action="store_true", help="print the README's tables as Markdown")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="leanrec-bench-"))
    reports = [run_once(args.requests, args.seed, root / f"run{i}") for i in range(args.repeat)]

    med = median_report(reports)
    rows = [list(row) for row in summary_rows(med)]
    engagement = [
        [
            name.replace("_", " "),
            f"{statistics.median(r['engagement'][name]['rate'] for r in reports):.2%}",
            f"{band['low']:.2%} – {band['high']:.2%}",
        ]
        for name, band in reports[0]["engagement"].items()
    ]
    wall = med["wall_seconds"]
    flags = f"--requests {args.requests} --seed {args.seed} --repeat {args.repeat}"
    command = f"python benchmarks/demo_figures.py {flags}"
    console = Console()
    if args.markdown:
        print(f"`{command}` (median of {args.repeat}):\n")
        print(markdown(["figure", "naive", "lean", "lean / naive"], rows))
        print("\nengagement on viewed items (the world's, the same on both paths):\n")
        print(markdown(["signal", "rate drawn", "sourced range"], engagement))
        print(f"\n{holding_line(med)}; wall time {wall:.1f} s")
    else:
        table = Table(
            title=f"leanrec demo, {args.requests} requests, seed {args.seed}, median of {args.repeat}"
        )
        for col in ("figure", "naive", "lean", "lean / naive"):
            table.add_column(col, justify="left" if col == "figure" else "right", overflow="fold")
        for row in rows:
            table.add_row(*row)
        console.print(table)
        rates = Table(title="engagement on viewed items")
        for col in ("signal", "rate drawn", "sourced range"):
            rates.add_column(col, justify="left" if col == "signal" else "right")
        for row in engagement:
            rates.add_row(*row)
        console.print(rates)
        console.print(f"{holding_line(med)}; wall time {wall:.1f} s")

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
        for name, band in r["engagement"].items():
            if not band["low"] <= band["rate"] <= band["high"]:
                failures.append(f"{name} rate {band['rate']:.4f} outside [{band['low']}, {band['high']}]")
        if r["wall_seconds"] >= args.max_wall:
            failures.append(f"wall_seconds {r['wall_seconds']:.1f} >= {args.max_wall:g}")
    for f in failures:
        console.print(f"[red]FAIL[/red] {f}")
    if not failures:
        console.print("all judged figures within their bounds")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
