"""The ``leanrec`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**32-1, got {value}")
    return value


def _demo(args: argparse.Namespace, console: Console) -> int:
    from leanrec.report.demo_report import render_table, write_html, write_json
    from leanrec.sim.demo import run_demo

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        console.print(f"[red]error:[/red] --out {out} exists and is not a folder")
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".leanrec-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        console.print(f"[red]error:[/red] cannot write to --out {out}: {exc.strerror or exc}")
        return 2
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("ranking, logging, joining", total=args.requests)
        result = run_demo(args.requests, args.seed, out, progress=lambda n: progress.advance(task, n))
    report = result.report
    write_json(report, out / "report.json")
    write_html(report, out / "report.html")
    console.print(render_table(report))
    console.print(
        f"reports: {out / 'report.json'}, {out / 'report.html'}; warehouses: "
        f"{out / 'warehouse' / 'naive'}, {out / 'warehouse' / 'lean'}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="leanrec", description="Lean data plumbing for feed recommenders.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="run the same seeded traffic through naive and lean plumbing and compare them",
        description="Simulate a feed: rank, log features, collect engagement, join, store training data, "
        "once with naive plumbing and once with lean plumbing, on the same traffic. Prints a side-by-side "
        "table and writes report.json, report.html and both warehouses under --out.",
    )
    demo.add_argument("--requests", type=_positive, default=5_000, help="ranked requests (default 5000)")
    demo.add_argument("--seed", type=_seed, default=7, help="seed of the world and the traffic (default 7)")
    demo.add_argument("--out", default="leanrec-demo", help="output folder (default ./leanrec-demo)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``leanrec`` command."""
    args = build_parser().parse_args(argv)
    console = Console()
    if args.command == "demo":
        return _demo(args, console)
    return 2  # argparse refuses unknown commands before this


if __name__ == "__main__":
    sys.exit(main())
