"""Request-level against impression-level training of the same late ranker on the same examples.

    python benchmarks/train_request_level.py [--requests 5000] [--epochs 3] [--curve-requests 2000]

Builds both warehouses with ``leanrec demo``'s pipelines (identical examples, request-level and
impression-level), trains the same model from the same seed for the same epochs on each, and prints
side by side: examples per second, CPU seconds, bytes read from the warehouse, held-out AUC, and the
oracle AUC that the world's true click probabilities give on the same held-out examples. Then the
speed-up as the user history grows (10, 50 and 200 items), one epoch each. Exits non-zero if
request-level is not at least 2x faster at the default history, its AUC is not within 0.002 of
impression-level, or the model's AUC is not within 0.03 of the oracle's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from leanrec.sim.demo import run_demo
from leanrec.sim.loop import oracle_auc
from leanrec.train.trainer import TrainConfig, train
from leanrec.world import World, WorldConfig


def build(root: Path, requests: int, seed: int, history: int) -> tuple[World, Path, Path]:
    cfg = WorldConfig(seed=seed, history_len=history)
    run_demo(requests, seed, root, world_config=cfg)
    return World(cfg), root / "warehouse" / "lean", root / "warehouse" / "naive"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=5_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--curve-requests", type=int, default=2_000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="leanrec-train-"))
    console = Console()

    world, lean, naive = build(root / "h50", args.requests, args.seed, 50)
    fs = world.featureset
    train(str(lean), fs, TrainConfig(epochs=1, patience=1))  # warm-up: one-time imports and allocations
    runs = {}
    for name, uri, request_level in (("request-level", lean, True), ("impression-level", naive, False)):
        cfg = TrainConfig(
            epochs=args.epochs, patience=args.epochs, request_level=request_level, seed=args.seed
        )
        _, res = train(str(uri), fs, cfg)
        runs[name] = res
        console.print(f"{name}: {res.examples_per_second:,.0f} examples/s, test AUC {res.test['auc']:.4f}")
    oracle = oracle_auc(world, lean, TrainConfig())
    table = Table(
        title=f"late ranker, {args.requests} requests, {args.epochs} epochs, same seed and examples"
    )
    for col in ("figure", "request-level", "impression-level", "request / impression"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    r, i = runs["request-level"], runs["impression-level"]
    rows = (
        ("examples / s", r.examples_per_second, i.examples_per_second, "{:,.0f}"),
        ("training CPU seconds", r.train_cpu_seconds, i.train_cpu_seconds, "{:,.1f}"),
        ("setup CPU seconds (wide-part solve)", r.setup_cpu_seconds, i.setup_cpu_seconds, "{:,.1f}"),
        ("bytes read from the warehouse", r.bytes_read, i.bytes_read, "{:,.0f}"),
        ("held-out AUC", r.test["auc"], i.test["auc"], "{:.4f}"),
        ("held-out log loss", r.test["log_loss"], i.test["log_loss"], "{:.4f}"),
        ("held-out NDCG@10", r.test["ndcg@10"], i.test["ndcg@10"], "{:.4f}"),
    )
    for label, a, b, fmt in rows:
        table.add_row(label, fmt.format(a), fmt.format(b), f"{a / b:.3f}")
    console.print(table)
    console.print(
        f"oracle AUC (true click probabilities, same held-out examples): {oracle:.4f}; "
        f"model {r.test['auc']:.4f} (gap {oracle - r.test['auc']:.4f}); validation AUC of the solved "
        f"wide part {r.wide_valid_auc:.4f}, after each epoch {[round(a, 4) for a in r.valid_auc]} "
        f"(kept: epoch {r.best_epoch})"
    )

    curve = Table(title=f"speed-up as the history grows ({args.curve_requests} requests, 1 epoch)")
    for col in ("history length", "request-level ex/s", "impression-level ex/s", "speed-up"):
        curve.add_column(col, justify="right")
    for hl in (10, 50, 200):
        w, lv, nv = build(root / f"c{hl}", args.curve_requests, args.seed, hl)
        speeds = []
        for uri, rl in ((lv, True), (nv, False)):
            _, res = train(
                str(uri), w.featureset, TrainConfig(epochs=1, patience=1, request_level=rl, seed=args.seed)
            )
            speeds.append(res.examples_per_second)
        curve.add_row(str(hl), f"{speeds[0]:,.0f}", f"{speeds[1]:,.0f}", f"{speeds[0] / speeds[1]:.2f}x")
    console.print(curve)

    speedup = r.examples_per_second / i.examples_per_second
    failures = []
    if speedup < 2.0:
        failures.append(f"request-level is {speedup:.2f}x impression-level, below 2x")
    if abs(r.test["auc"] - i.test["auc"]) > 0.002:
        failures.append(f"AUC differs by {abs(r.test['auc'] - i.test['auc']):.4f} > 0.002")
    if oracle - r.test["auc"] > 0.03:
        failures.append(
            f"model AUC {r.test['auc']:.4f} is {oracle - r.test['auc']:.4f} below the oracle's, > 0.03"
        )
    for f in failures:
        console.print(f"[red]FAIL[/red] {f}")
    if not failures:
        console.print(
            f"PASS request-level {speedup:.2f}x faster, AUC within {abs(r.test['auc'] - i.test['auc']):.4f}; "
            f"model within {oracle - r.test['auc']:.4f} of the oracle"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
