"""Retrieval models on MovieLens 100K: accuracy, training and query energy, break-even, against RecBole.

    python benchmarks/retrieval_zoo.py [--data ../shared/data/ml-100k] [--epochs 20]
        [--recbole-python /path/to/recbole-venv/bin/python]

Loads RecBole's atomic files, splits every user's interactions at random 8:1:1 (RecBole's default
protocol, seed 2020), trains Pop, ItemKNN, BPR, LightGCN and the two-tower (the embedding models for
``--epochs`` epochs, no early stopping; the two-tower reads the ``.user`` and ``.item`` features),
and prints per model: test Recall@10, NDCG@10, MRR@10 and Hit@10 (full
ranking, seen items masked), training CPU seconds and energy, and the energy of one query (top 10 for
every test user, the median of 5 after a warm-up). Energy is marked measured (RAPL) or estimated
(CPU seconds × the power model). Then the break-even table for every pair.

With ``--recbole-python`` (the interpreter of a venv with RecBole installed:
``pip install torch==2.13.0 recbole 'numpy<2' 'pandas<3' 'scipy<1.12'``), the same models run
through RecBole with the same data, protocol and epochs (``benchmarks/recbole_reference.py``), and
the table adds RecBole's figures and the ratios. Exits non-zero if a leanrec model's Recall@10 or
NDCG@10 is more than 5% below RecBole's, or its training CPU seconds above half of RecBole's.
RecBole's Pop counts an item once per training batch it appears in (negatives included), not its
interactions; its accuracy is shown but not judged against.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from leanrec.energy.meter import EnergyMeter
from leanrec.report.retrieval_report import breakeven_view
from leanrec.retrieval.lifecycle import breakeven_table
from leanrec.retrieval.models import MODELS
from leanrec.retrieval.zoo import run_zoo

HERE = Path(__file__).resolve().parent
JUDGED = ("recall", "ndcg")


def recbole(python: str, model: str, epochs: int, data: Path) -> dict:
    """RecBole's figures for one model (see ``recbole_reference.py``)."""
    cmd = [python, str(HERE / "recbole_reference.py"), model, "--epochs", str(epochs), "--data", str(data)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"RecBole run of {model} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_markdown(args: argparse.Namespace, rows: list, lives: list) -> None:
    """The README's tables: leanrec beside RecBole, then the break-even of every pair."""
    flags = f" --recbole-python {args.recbole_python}" if args.recbole_python else ""
    print(f"\n`python benchmarks/retrieval_zoo.py{flags}` (seed {args.seed}, {args.epochs} epochs):\n")
    head = ["model", "Recall@10", "NDCG@10", "train CPU s", "train J", "J per query"]
    head += ["RecBole Recall@10", "RecBole NDCG@10", "RecBole train CPU s", "CPU leanrec / RecBole"]
    print("| " + " | ".join(head) + " |")
    print("|---" + "|---:" * (len(head) - 1) + "|")
    for r, ref in rows:
        cells = [r.name, f"{r.metrics['recall']:.4f}", f"{r.metrics['ndcg']:.4f}", f"{r.fit.cpu_seconds:.2f}"]
        cells += [f"{r.fit.total.joules:,.1f}", f"{r.query_joules:.3f}"]
        if ref:
            cpu = ref["train_cpu_s"]
            cells += [f"{ref['test']['recall']:.4f}", f"{ref['test']['ndcg']:.4f}", f"{cpu:.2f}"]
            cells.append(f"{r.fit.cpu_seconds / cpu:.3f}" if cpu > 0.05 else "—")
        else:
            cells += ["—"] * 4
        print("| " + " | ".join(cells) + " |")
    print("\n| dearer to train | cheaper to train | queries n* |\n|---|---|---:|")
    for dear, cheap, n in breakeven_table(lives):
        print(f"| {dear} | {cheap} | {'never' if n is None else f'{n:,.0f}'} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "ml-100k")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--recbole-python", help="python of a venv with RecBole installed")
    parser.add_argument("--markdown", action="store_true", help="print the README's tables as Markdown")
    args = parser.parse_args()
    console = Console()
    meter = EnergyMeter()
    split, results = run_zoo(args.data, args.epochs, args.seed, meter=meter)
    console.print(
        f"{args.data.name}: {split.n_users:,} users, {split.n_items:,} items; split "
        f"{[len(p[0]) for p in split.parts]}; energy: CPU at {meter.power.source}"
        + (" (RAPL readable: measured)" if meter.rapl.available else " (no readable RAPL: estimated)")
    )
    rows, failures = [], []
    for r in results:
        ref = (
            recbole(args.recbole_python, r.name, r.epochs, args.data)
            if args.recbole_python and r.name in MODELS
            else None
        )
        rows.append((r, ref))
        if ref and r.name != "Pop":
            for m in JUDGED:
                if r.metrics[m] < 0.95 * ref["test"][m]:
                    failures.append(
                        f"{r.name} {m}@10 {r.metrics[m]:.4f} is below RecBole's {ref['test'][m]:.4f} less 5%"
                    )
            if r.fit.cpu_seconds > 0.5 * ref["train_cpu_s"]:
                failures.append(f"{r.name} trains in {r.fit.cpu_seconds:.2f} CPU s, above half of RecBole's")
    table = Table(title=f"retrieval on {args.data.name}: test metrics @10, training and query energy")
    cols = ["model", "epochs", "Recall", "NDCG", "MRR", "Hit", "train CPU s", "train J", "J / query"]
    if args.recbole_python:
        cols += ["RecBole Recall", "RecBole NDCG", "RecBole train CPU s", "train CPU leanrec / RecBole"]
    for c in cols:
        table.add_column(c, justify="left" if c == "model" else "right")
    for r, ref in rows:
        row = [
            r.name,
            str(r.epochs),
            *(f"{r.metrics[m]:.4f}" for m in ("recall", "ndcg", "mrr", "hit")),
            f"{r.fit.cpu_seconds:.2f}",
            f"{r.fit.total.joules:,.1f} ({r.fit.total.mark[:4]}.)",
            f"{r.query_joules:.3f} ({r.query.total.mark[:4]}.)",
        ]
        if args.recbole_python and not ref:
            row += ["—"] * 4  # RecBole has no such model for general recommendation
        if ref:
            row += [
                f"{ref['test']['recall']:.4f}",
                f"{ref['test']['ndcg']:.4f}",
                f"{ref['train_cpu_s']:.2f}",
                f"{r.fit.cpu_seconds / ref['train_cpu_s']:.3f}" if ref["train_cpu_s"] > 0.05 else "—",
            ]
        table.add_row(*row)
    console.print(table)
    console.print(breakeven_view([r.lifecycle for r in results]))
    if args.markdown:
        print_markdown(args, rows, [r.lifecycle for r in results])
    for f in failures:
        console.print(f"[red]FAIL[/red] {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
