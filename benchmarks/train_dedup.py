"""Deduplicated training against request-level and impression-level, on the same examples.

    python benchmarks/train_dedup.py [--requests 5000] [--epochs 3] [--seed 7]
        [--batch-requests 128 1024] [--rounds 5] [--markdown]

Builds the warehouses of ``leanrec demo`` (identical examples in both layouts, the same held-out
split) and, at each batch size (requests per batch), trains the same model from the same seed on the
same batches three ways: impression-level (a user side per impression), request-level (a user side
per request, broadcast to its impressions) and deduplicated (``TrainConfig.dedup``: besides the user
side once per request, the item side once per distinct item row, the top MLP's user and item terms
once per request and item row, target attention over each request's history where it lies; see
``LateRanker.score_rows``). It prints held-out AUC of each (full training runs with early stopping),
and examples per CPU second and per wall-clock second as ``train_request_level.py`` times them:
one-epoch runs of each way in alternation (rotating the order), on one thread, the median over the
rounds, with each round's ratio to request-level. Then where a step's CPU time goes in request-level
and deduplicated training: the forward, the backward and the optimizer, over one epoch's batches.

Exits non-zero if, at some batch size, the deduplicated AUC is not within 0.002 of request-level's
(they train the same model up to float rounding) or its median examples per CPU second is not above
request-level's.
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
from leanrec.schema import FeatureSet, Side
from leanrec.sim.demo import run_demo
from leanrec.train.reader import ReadStats
from leanrec.train.trainer import TrainConfig, _batches, train
from leanrec.world import World, WorldConfig

WAYS = {
    "impression-level": ("naive", {"request_level": False, "dedup": False}),
    "request-level": ("lean", {"request_level": True, "dedup": False}),
    "deduplicated": ("lean", {"request_level": True, "dedup": True}),
}
"""Each way of training: the warehouse it reads and its ``TrainConfig`` settings."""

ROUNDS = 5
"""One-epoch runs of each way that :func:`throughput` times in alternation."""


def throughput(
    fs: FeatureSet, uris: dict[str, Path], batch_requests: int, seed: int, rounds: int = ROUNDS
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Examples per CPU second and per wall-clock second of one training epoch of each way, in alternation.

    As in ``train_request_level.paired_throughput``: one thread (a second one would compete with the
    machine's other jobs and count their waits as its own time), the wide part left unsolved (it is
    setup, which examples per second does not count), and the order of the ways rotated each round
    so that a load that comes and goes does not favour one of them.

    Returns:
        Per way, examples per CPU second and per wall-clock second, one per round.

    """
    cpu: dict[str, list[float]] = {name: [] for name in WAYS}
    wall: dict[str, list[float]] = {name: [] for name in WAYS}
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
                wall[name].append(res.examples_per_second)
    finally:
        torch.set_num_threads(threads)
    return cpu, wall


def where_time_goes(
    fs: FeatureSet, lean: Path, batch_requests: int, seed: int
) -> dict[str, dict[str, float]]:
    """CPU seconds of a training step's parts over one epoch's batches, request-level and deduplicated.

    Two models of the same initial weights train on the same batches, a step of each in turn (the
    order alternating), so that the machine's load falls on both alike: ``forward`` (with the loss
    and its group-lasso penalty, as the trainer computes them), ``backward`` and ``optimizer`` (the
    AdamW update, a cost per step that no restructuring of the model changes). Beside them, item
    rows per batch and the share of them that are distinct.
    """
    torch.manual_seed(seed)
    models = {"request-level": LateRanker(fs, RankerConfig())}
    models["deduplicated"] = LateRanker(fs, RankerConfig())
    models["deduplicated"].load_state_dict(models["request-level"].state_dict())
    opts = {name: torch.optim.AdamW(m.parameters(), lr=5e-4, fused=True) for name, m in models.items()}
    bce = torch.nn.BCEWithLogitsLoss()
    cfg = TrainConfig(batch_requests=batch_requests, seed=seed)
    out = {name: dict.fromkeys(("forward", "backward", "optimizer"), 0.0) for name in models}
    rows = {"items": 0.0, "distinct": 0.0, "batches": 0.0}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, b in enumerate(_batches(str(lean), fs, cfg, 0, ReadStats(), seed)):
            found = distinct_rows(b.item_floats, b.item_ints)
            rows["items"] += b.n_items
            rows["distinct"] += b.n_items if found is None else len(found[0])
            rows["batches"] += 1
            for name in list(models)[:: 1 if i % 2 else -1]:
                model, opt, spent = models[name], opts[name], out[name]
                t0 = time.process_time()
                logits = model(
                    b.req_floats,
                    b.req_ints,
                    b.item_floats,
                    b.item_ints,
                    b.item_request,
                    dedup=name == "deduplicated",
                )
                loss = bce(logits[:, 0], b.click) + cfg.like_weight * bce(logits[:, 1], b.like)
                loss = loss + cfg.group_lasso * sum(model.dense_input_norms(s).sum() for s in Side)
                t1 = time.process_time()
                opt.zero_grad()
                loss.backward()
                t2 = time.process_time()
                opt.step()
                t3 = time.process_time()
                spent["forward"] += t1 - t0
                spent["backward"] += t2 - t1
                spent["optimizer"] += t3 - t2
    finally:
        torch.set_num_threads(threads)
    return {**out, "rows": rows}


def _rounds(xs: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=5_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--batch-requests", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--out", default=None)
    ap.add_argument("--markdown", action="store_true", help="also print the README's tables as Markdown")
    args = ap.parse_args()
    if args.requests < 1 or args.epochs < 1 or args.rounds < 1 or min(args.batch_requests) < 1:
        ap.error("--requests, --epochs, --rounds and --batch-requests must be at least 1")
    root = Path(args.out or tempfile.mkdtemp(prefix="leanrec-dedup-"))
    console = Console()
    cfg = WorldConfig(seed=args.seed, history_len=50)
    run_demo(args.requests, args.seed, root, world_config=cfg)
    fs = World(cfg).featureset
    uris = {"lean": root / "warehouse" / "lean", "naive": root / "warehouse" / "naive"}
    train(str(uris["lean"]), fs, TrainConfig(epochs=1, patience=1))  # warm-up: one-time imports, allocations

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
        cpu, wall = throughput(fs, uris, br, args.seed, args.rounds)
        for name in WAYS:
            console.print(
                f"{br} requests per batch, {name}: {', '.join(f'{x:,.0f}' for x in cpu[name])} "
                f"examples/CPU s, {', '.join(f'{x:,.0f}' for x in wall[name])} examples/s"
            )
        ratios = {
            name: [a / b for a, b in zip(cpu[name], cpu["request-level"], strict=True)] for name in WAYS
        }
        per = {name: float(np.median(xs)) for name, xs in cpu.items()}
        per_wall = {name: float(np.median(xs)) for name, xs in wall.items()}
        spent = where_time_goes(fs, uris["lean"], br, args.seed)
        rows.append((br, per, per_wall, aucs, ratios, spent))
        gap = abs(aucs["deduplicated"] - aucs["request-level"])
        if gap > 0.002:
            failures.append(f"{br} requests per batch: deduplicated AUC differs by {gap:.4f} > 0.002")
        if per["deduplicated"] <= per["request-level"]:
            failures.append(f"{br} requests per batch: deduplicated is not faster than request-level")

    table = Table(title=f"late ranker, {args.requests} requests, {args.epochs} epochs, same seed and batches")
    for col in (
        "requests / batch",
        "way",
        "examples / CPU s",
        "vs request-level",
        "examples / s",
        "vs request-level ",
        "held-out AUC",
    ):
        table.add_column(col, justify="right")
    for br, per, per_wall, aucs, _, _ in rows:
        for name in WAYS:
            table.add_row(
                str(br),
                name,
                f"{per[name]:,.0f}",
                f"{per[name] / per['request-level']:.2f}x",
                f"{per_wall[name]:,.0f}",
                f"{per_wall[name] / per_wall['request-level']:.2f}x",
                f"{aucs[name]:.4f}",
            )
    console.print(table)
    spent_table = Table(title="where a step's CPU time goes (one epoch, one thread, CPU seconds)")
    parts = ("requests / batch", "item rows / batch", "distinct", "way", "forward", "backward", "optimizer")
    for col in parts:
        spent_table.add_column(col, justify="right")
    for br, _, _, _, _, s in rows:
        r = s["rows"]
        for name in ("request-level", "deduplicated"):
            spent_table.add_row(
                str(br),
                f"{r['items'] / r['batches']:,.0f}",
                f"{r['distinct'] / r['items']:.1%}",
                name,
                *(f"{s[name][part]:.2f}" for part in ("forward", "backward", "optimizer")),
            )
    console.print(spent_table)
    for br, _, _, aucs, ratios, _ in rows:
        gap = abs(aucs["deduplicated"] - aucs["request-level"])
        dedup = ratios["deduplicated"]
        verdict = "faster in every round" if min(dedup) > 1 else "not faster in every round"
        console.print(
            f"{br} requests per batch: deduplicated {np.median(dedup):.2f}x request-level's examples per CPU "
            f"second (rounds {_rounds(dedup)}: {verdict}), AUC within {gap:.4f}; impression-level "
            f"{np.median(ratios['impression-level']):.2f}x"
        )
    for f in failures:
        console.print(f"[red]FAIL[/red] {f}")
    if args.markdown:
        command = (
            f"python benchmarks/train_dedup.py --requests {args.requests} --epochs {args.epochs} "
            f"--seed {args.seed} --batch-requests {' '.join(map(str, args.batch_requests))} "
            f"--rounds {args.rounds}"
        )
        print(f"\n`{command}` (median of {args.rounds} alternating one-epoch runs on one thread):\n")
        print(
            "| requests / batch | way | examples / CPU s | vs request-level | examples / s "
            "| vs request-level | rounds vs request-level (CPU) | held-out AUC |"
            "\n|---:|---|---:|---:|---:|---:|---|---:|"
        )
        for br, per, per_wall, aucs, ratios, _ in rows:
            for name in WAYS:
                print(
                    f"| {br} | {name} | {per[name]:,.0f} | {per[name] / per['request-level']:.2f}× "
                    f"| {per_wall[name]:,.0f} | {per_wall[name] / per_wall['request-level']:.2f}× "
                    f"| {_rounds(ratios[name])} | {aucs[name]:.4f} |"
                )
        print("\nWhere a step's CPU time goes (one epoch, one thread, CPU seconds):\n")
        print(
            "| requests / batch | item rows / batch | distinct | way | forward | backward | optimizer |"
            "\n|---:|---:|---:|---|---:|---:|---:|"
        )
        for br, _, _, _, _, s in rows:
            r = s["rows"]
            for name in ("request-level", "deduplicated"):
                print(
                    f"| {br} | {r['items'] / r['batches']:,.0f} | {r['distinct'] / r['items']:.1%} | {name} "
                    + "".join(f"| {s[name][part]:.2f} " for part in ("forward", "backward", "optimizer"))
                    + "|"
                )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
