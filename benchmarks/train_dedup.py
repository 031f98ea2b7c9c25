"""Training that computes each distinct item row once, against request-level and impression-level.

    python benchmarks/train_distinct_items.py [--requests 5000] [--epochs 3] [--seed 7]
        [--batch-requests 128 1024] [--markdown]

Builds the warehouses of ``leanrec demo`` (identical examples in both layouts) and, at each batch size
(requests per batch), trains the same model from the same seed on the same batches three ways:
impression-level (a user side per impression), request-level (a user side per request) and with
distinct items (request-level, and an item side per distinct item row of the batch, gathered for each
impression that shows it). It prints held-out AUC of each, and examples per CPU second timed as
``train_request_level.py`` times them: one-epoch runs of each way in alternation (rotating the
order), on one thread, the median over the rounds. Because the saving depends on how often an item
row repeats within a batch, it also prints the share of distinct rows per batch, and where a step's
time goes: the CPU time of the item tower (forward and backward) on every row against on the distinct
rows only, beside the whole training step. Exits non-zero if the AUC with distinct items is not
within 0.002 of request-level's at some batch size (they train the same model up to float rounding).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from leanrec.models import LateRanker, RankerConfig, distinct_rows
from leanrec.schema import FeatureSet
from leanrec.sim.demo import run_demo
from leanrec.train.reader import ReadStats
from leanrec.train.trainer import TrainConfig, _batches, train
from leanrec.world import World, WorldConfig

WAYS = {
    "impression-level": ("naive", {"request_level": False}),
    "request-level": ("lean", {"request_level": True}),
    "distinct items": ("lean", {"request_level": True, "distinct_items": True}),
}
"""Each way of training: the warehouse it reads and its ``TrainConfig`` settings."""

ROUNDS = 3
"""One-epoch runs of each way that :func:`throughput` times in alternation."""


def throughput(
    fs: FeatureSet, uris: dict[str, Path], batch_requests: int, seed: int, rounds: int = ROUNDS
) -> dict[str, list[float]]:
    """Examples per CPU second of one training epoch of each way, the ways timed in alternation.

    As in ``train_request_level.paired_throughput``: one thread (a second one would compete with the
    machine's other jobs and count their waits as its own time), the wide part left unsolved (it is
    setup, which examples per second does not count), and the order of the ways rotated each round
    so that a load that comes and goes does not favour one of them.
    """
    cpu: dict[str, list[float]] = {name: [] for name in WAYS}
    names = list(WAYS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for k in range(rounds):
            for name in names[k % len(names) :] + names[: k % len(names)]:
                where, settings = WAYS[name]
                cfg = TrainConfig(
                    epochs=1, patience=1, seed=seed, wide_iters=0, batch_requests=batch_requests, **settings
                )
                _, res = train(str(uris[where]), fs, cfg)
                cpu[name].append(res.examples_per_cpu_second)
    finally:
        torch.set_num_threads(threads)
    return cpu


def where_time_goes(fs: FeatureSet, lean: Path, batch_requests: int, seed: int) -> dict[str, float]:
    """Over one epoch's training batches: distinct rows, and CPU seconds of the item tower and of a step.

    The item tower (``LateRanker.item_side``, forward and backward) is timed on every item row and on
    the distinct rows only; a whole request-level training step (forward, loss, backward, optimiser)
    beside it says what share of a step the tower is, which bounds what computing it once per distinct
    row can save; ``optimizer`` is the step's AdamW update, a cost per step whatever its size.
    ``find`` is the time :func:`~leanrec.models.ranker.distinct_rows` takes to find the distinct rows.
    """
    torch.manual_seed(seed)
    model = LateRanker(fs, RankerConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    bce = torch.nn.BCEWithLogitsLoss()
    cfg = TrainConfig(batch_requests=batch_requests, seed=seed)
    keys = ("items", "distinct", "batches", "find", "tower_all", "tower_distinct", "step", "optimizer")
    out = dict.fromkeys(keys, 0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for b in _batches(str(lean), fs, cfg, 0, ReadStats(), seed):
            c0 = time.process_time()
            found = distinct_rows(b.item_floats, b.item_ints)
            c1 = time.process_time()
            first = found[0] if found is not None else torch.arange(b.n_items)
            timed = {}
            for key, rows in (("tower_all", None), ("tower_distinct", first)):
                floats, ints = (
                    (b.item_floats, b.item_ints) if rows is None else (b.item_floats[rows], b.item_ints[rows])
                )
                t = time.process_time()
                side = model.item_side(floats, ints)
                (side.vector.sum() + side.query.sum() + side.linear.sum()).backward()
                timed[key] = time.process_time() - t
            t = time.process_time()
            logits = model(b.req_floats, b.req_ints, b.item_floats, b.item_ints, b.item_request)
            loss = bce(logits[:, 0], b.click) + 0.5 * bce(logits[:, 1], b.like)
            opt.zero_grad()
            loss.backward()
            t_opt = time.process_time()
            opt.step()
            step = time.process_time() - t
            out["optimizer"] += time.process_time() - t_opt
            out["items"] += b.n_items
            out["distinct"] += len(first)
            out["batches"] += 1
            out["find"] += c1 - c0
            out["tower_all"] += timed["tower_all"]
            out["tower_distinct"] += timed["tower_distinct"]
            out["step"] += step
    finally:
        torch.set_num_threads(threads)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=5_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--batch-requests", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--out", default=None)
    ap.add_argument("--markdown", action="store_true", help="also print the README's table as Markdown")
    args = ap.parse_args()
    if args.requests < 1 or args.epochs < 1 or args.rounds < 1 or min(args.batch_requests) < 1:
        ap.error("--requests, --epochs, --rounds and --batch-requests must be at least 1")
    root = Path(args.out or tempfile.mkdtemp(prefix="leanrec-distinct-"))
    console = Console()
    cfg = WorldConfig(seed=args.seed, history_len=50)
    run_demo(args.requests, args.seed, root, world_config=cfg)
    fs = World(cfg).featureset
    uris = {"lean": root / "warehouse" / "lean", "naive": root / "warehouse" / "naive"}
    train(
        str(uris["lean"]), fs, TrainConfig(epochs=1, patience=1)
    )  # warm-up: one-time imports and allocations

    rows, failures = [], []
    for br in args.batch_requests:
        aucs = {}
        for name, (where, settings) in WAYS.items():
            tc = TrainConfig(
                epochs=args.epochs, patience=args.epochs, seed=args.seed, batch_requests=br, **settings
            )
            _, res = train(str(uris[where]), fs, tc)
            aucs[name] = res.test["auc"]
            console.print(f"{br} requests per batch, {name}: held-out AUC {aucs[name]:.4f}")
        cpu = throughput(fs, uris, br, args.seed, args.rounds)
        for name, xs in cpu.items():
            console.print(
                f"{br} requests per batch, {name}: {', '.join(f'{x:,.0f}' for x in xs)} examples/CPU s"
            )
        per = {name: float(np.median(xs)) for name, xs in cpu.items()}
        spent = where_time_goes(fs, uris["lean"], br, args.seed)
        rounds = [a / b for a, b in zip(cpu["distinct items"], cpu["request-level"], strict=True)]
        rows.append((br, per, aucs, rounds, spent))
        gap = abs(aucs["distinct items"] - aucs["request-level"])
        if gap > 0.002:
            failures.append(f"{br} requests per batch: AUC with distinct items differs by {gap:.4f} > 0.002")

    table = Table(title=f"late ranker, {args.requests} requests, {args.epochs} epochs, same seed and batches")
    for col in (
        "requests / batch",
        "way",
        "examples / CPU s",
        "vs request-level",
        "held-out AUC",
    ):
        table.add_column(col, justify="right")
    for br, per, aucs, _, _ in rows:
        for name in WAYS:
            table.add_row(
                str(br),
                name,
                f"{per[name]:,.0f}",
                f"{per[name] / per['request-level']:.2f}x",
                f"{aucs[name]:.4f}",
            )
    console.print(table)
    spent_table = Table(title="where a request-level step's time goes (one epoch, one thread, CPU seconds)")
    for col in (
        "requests / batch",
        "item rows / batch",
        "distinct",
        "step",
        "item tower, all rows",
        "item tower, distinct rows",
        "finding them",
        "optimizer",
    ):
        spent_table.add_column(col, justify="right")
    for br, _, _, _, s in rows:
        spent_table.add_row(
            str(br),
            f"{s['items'] / s['batches']:,.0f}",
            f"{s['distinct'] / s['items']:.1%}",
            f"{s['step']:.2f}",
            f"{s['tower_all']:.2f} ({s['tower_all'] / s['step']:.0%})",
            f"{s['tower_distinct']:.2f}",
            f"{s['find']:.3f}",
            f"{s['optimizer']:.2f} ({s['optimizer'] / s['step']:.0%})",
        )
    console.print(spent_table)
    for br, _, aucs, rounds, _ in rows:
        gap = abs(aucs["distinct items"] - aucs["request-level"])
        # Faster or slower only when every round agrees: the rounds' spread is the machine's noise.
        verdict = "faster" if min(rounds) > 1 else "slower" if max(rounds) < 1 else "no clear difference"
        console.print(
            f"{br} requests per batch: distinct items {np.median(rounds):.2f}x request-level's examples per "
            f"CPU second (rounds {', '.join(f'{r:.2f}' for r in rounds)}: {verdict}), AUC within {gap:.4f}"
        )
    for f in failures:
        console.print(f"[red]FAIL[/red] {f}")
    if args.markdown:
        command = (
            f"python benchmarks/train_distinct_items.py --requests {args.requests} --epochs {args.epochs} "
            f"--seed {args.seed} --batch-requests {' '.join(map(str, args.batch_requests))} "
            f"--rounds {args.rounds}"
        )
        print(f"\n`{command}` (median of {args.rounds} alternating one-epoch runs on one thread):\n")
        print(
            "| requests / batch | distinct item rows | way | examples / CPU s | vs request-level "
            "| held-out AUC |"
            "\n|---:|---:|---|---:|---:|---:|"
        )
        for br, per, aucs, _, s in rows:
            for name in WAYS:
                print(
                    f"| {br} | {s['distinct'] / s['items']:.1%} | {name} | {per[name]:,.0f} | "
                    f"{per[name] / per['request-level']:.2f}× | {aucs[name]:.4f} |"
                )
        print("\nWhere a request-level step's time goes (one epoch, one thread, CPU seconds):\n")
        print(
            "| requests / batch | item rows / batch | distinct | step | item tower, all rows "
            "| item tower, distinct rows | finding them | optimizer |"
            "\n|---:|---:|---:|---:|---:|---:|---:|---:|"
        )
        for br, _, _, _, s in rows:
            print(
                f"| {br} | {s['items'] / s['batches']:,.0f} | {s['distinct'] / s['items']:.1%} "
                f"| {s['step']:.2f} "
                f"| {s['tower_all']:.2f} ({s['tower_all'] / s['step']:.0%}) | {s['tower_distinct']:.2f} "
                f"| {s['find']:.3f} | {s['optimizer']:.2f} ({s['optimizer'] / s['step']:.0%}) |"
            )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
