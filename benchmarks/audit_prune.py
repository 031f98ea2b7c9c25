"""Audit, prune, retrain, serve again: the pruned FeatureSet against the full one on the same traffic.

Round 0 ranks with the stand-in and fills the warehouse; a model trained on it serves round 1 under
the full FeatureSet; the audit prunes within the AUC budget, a model retrained under the pruned
version serves round 2 on the same seeded traffic. Prints logged bytes per request, warehouse bytes
per example, late-ranker p99 latency (both models timed in alternation on the same requests) and
held-out AUC, full against pruned, as ratios; and how the retired set compares with the world's
known noise. Exits non-zero if a judged bound is missed.

    python benchmarks/audit_prune.py [--requests 5000] [--seed 7] [--budget 0.001] [--markdown]

With ``--markdown`` it also prints the README's tables (the saving, and the retired set against the
known noise) as Markdown, each under the command line that reproduces it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from leanrec.report.demo_report import render_audit
from leanrec.sim.demo import run_demo
from leanrec.sim.loop import close_loop


def command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run's figures (every judged setting spelled out)."""
    return (
        f"python benchmarks/audit_prune.py --requests {args.requests} --seed {args.seed} "
        f"--budget {args.budget}"
    )


def print_markdown(args: argparse.Namespace, audit: dict) -> None:
    """The README's tables: the pruned FeatureSet against the full one, then the retired set."""
    before, after, ratio = audit["before"], audit["after"], audit["ratio"]
    print(f"\n`{command(args)}`:\n")
    print("| figure | full | pruned | pruned / full |\n|---|---:|---:|---:|")
    for key, label, fmt in (
        ("logged_bytes_per_request", "logged bytes per request", "{:,.0f}"),
        ("warehouse_bytes_per_example", "warehouse bytes per example", "{:,.1f}"),
        ("p99_latency_ms", "late-ranker p99 latency, ms", "{:.2f}"),
        ("test_auc", "held-out AUC", "{:.4f}"),
    ):
        print(f"| {label} | {fmt.format(before[key])} | {fmt.format(after[key])} | {ratio[key]:.3f} |")
    t = audit["truth"]
    print(f"\n`{command(args)}`:\n")
    print("| features | count | share |\n|---|---:|---:|")
    rows = (
        ("registered", audit["features"]["before"], ""),
        ("retired", t["retired"], f"{t['retired'] / audit['features']['before']:.0%} of registered"),
        ("pure noise, retired", f"{t['noise_retired']} of {t['noise_features']}", f"{t['noise_recall']:.1%}"),
        ("informative, retired", t["informative_retired"], f"{t['informative_share']:.1%} of retired"),
        ("of no measurable value, kept as related", len(audit["kept_related"]), ""),
    )
    for label, count, share in rows:
        print(f"| {label} | {count} | {share} |")
    print(f"\nheld-out AUC change {audit['auc_change']:+.4f} (budget {args.budget})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--budget", type=float, default=0.001)
    parser.add_argument("--out", default=None, help="keep the run's folders here (default: a temp folder)")
    parser.add_argument("--markdown", action="store_true", help="also print the README's tables as Markdown")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        with console.status("round 0: stand-in ranker, naive and lean"):
            round0 = run_demo(args.requests, args.seed, out)
        with console.status("round 1, audit, retrain, round 2"):
            loop = close_loop(round0, args.requests, args.seed, out, audit_budget=args.budget)
    audit = loop["audit"]
    console.print(render_audit(audit))
    checks = Table(title="judged bounds")
    checks.add_column("bound")
    checks.add_column("measured", justify="right")
    checks.add_column("holds")
    t, r = audit["truth"], audit["ratio"]
    bounds = [
        ("pure-noise features retired ≥ 90%", f"{t['noise_recall']:.1%}", t["noise_recall"] >= 0.9),
        (
            "informative share of retired ≤ 10%",
            f"{t['informative_share']:.1%}",
            t["informative_share"] <= 0.1,
        ),
        ("AUC change ≥ −budget", f"{audit['auc_change']:+.4f}", audit["auc_change"] >= -args.budget),
        (
            "logged bytes / request lower",
            f"{r['logged_bytes_per_request']:.3f}",
            r["logged_bytes_per_request"] < 1,
        ),
        (
            "warehouse bytes / example lower",
            f"{r['warehouse_bytes_per_example']:.3f}",
            r["warehouse_bytes_per_example"] < 1,
        ),
        ("late-ranker p99 latency lower", f"{r['p99_latency_ms']:.3f}", r["p99_latency_ms"] < 1),
    ]
    for name, value, ok in bounds:
        checks.add_row(name, value, "[green]yes[/green]" if ok else "[red]no[/red]")
    console.print(checks)
    console.print(
        f"weight-norm vs permutation rank agreement (Spearman, dense features): "
        f"{audit['weight_vs_permutation_spearman']:.2f}"
    )
    if args.markdown:
        print_markdown(args, audit)
    return 0 if all(ok for *_, ok in bounds) else 1


if __name__ == "__main__":
    sys.exit(main())
