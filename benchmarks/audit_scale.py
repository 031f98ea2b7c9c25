"""A feature audit at production scale: 10,000 registered features on 2 cores, in under 10 minutes.

    python benchmarks/audit_scale.py [--features 10000] [--requests 2500] [--seed 7]

Builds a world whose FeatureSet registers ``--features`` features in total (the demo's 212 plus
pure-noise fillers, ``WorldConfig.extra_noise``), serves ``--requests`` requests of lean traffic into
a request-level warehouse, trains the late ranker for one epoch, and then times the audit alone:
screening permutations by blocks of each feature family, splitting only blocks that could change the
prune decision, and planning what to retire within the AUC budget. Prints the audit's wall and CPU
seconds, the shuffles it scored, how many features were decided in blocks and how many singly, what
it retired against the known truth, and the setup phases' wall seconds. Exits non-zero if the audit
took 600 s or more.

The world is smaller than the demo's (users and items): every entity holds every registered feature,
so its feature store grows with users x features, and the audit's cost depends on the features and
the held-out requests, not on the corpus.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from leanrec.audit import AuditConfig, against_truth, audit
from leanrec.clock import ManualClock
from leanrec.funnel.ranker import Funnel
from leanrec.sim.pipeline import PipelineConfig, Plumbing, build_pipeline
from leanrec.sim.traffic import TrafficConfig, TrafficSim
from leanrec.train.trainer import TrainConfig, train
from leanrec.world import World, WorldConfig, default_featureset

LIMIT_SECONDS = 600.0
BUDGET = 0.001


def serve_lean(world: World, requests: int, seed: int, folder: Path) -> int:
    """Lean traffic ranked by the stand-in into a request-level warehouse; the requests served."""
    pconf = PipelineConfig()
    clock = ManualClock()
    pipe = build_pipeline(Plumbing.LEAN, world.featureset, clock, folder, pconf)
    traffic = TrafficConfig(requests=requests, seed=seed)
    sim = TrafficSim(world, Funnel(world), [pipe], clock, traffic, pconf, track_scored=False)
    return sim.run().requests


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=int, default=10_000, help="registered features in total")
    ap.add_argument("--requests", type=int, default=2_500)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--users", type=int, default=2_000)
    ap.add_argument("--items", type=int, default=5_000)
    ap.add_argument("--creators", type=int, default=500)
    ap.add_argument(
        "--out", default=None, help="keep the warehouse in this folder (default: a temporary one)"
    )
    args = ap.parse_args()
    base = len(default_featureset()[0])
    if args.features < base:
        ap.error(f"--features must be at least the demo's {base}")
    if args.out:
        return run(args, Path(args.out))
    with tempfile.TemporaryDirectory(prefix="leanrec-audit-scale-") as tmp:
        return run(args, Path(tmp))


def run(args: argparse.Namespace, root: Path) -> int:
    """Build, serve, train and audit under ``root``; print the figures; 1 if the audit was too slow."""
    base = len(default_featureset()[0])
    console = Console()
    setup: dict[str, float] = {}

    t0 = time.perf_counter()
    cfg = WorldConfig(
        n_users=args.users,
        n_items=args.items,
        n_creators=args.creators,
        extra_noise=args.features - base,
        seed=args.seed,
    )
    world = World(cfg)
    fs = world.featureset
    setup["world"] = time.perf_counter() - t0
    console.print(f"world: {len(fs):,} features ({len(world.noise_features):,} pure noise)")

    t0 = time.perf_counter()
    uri = root / "warehouse"
    served = serve_lean(world, args.requests, args.seed, uri)
    setup["lean traffic"] = time.perf_counter() - t0
    console.print(f"served {served:,} requests into {uri}")

    t0 = time.perf_counter()
    train_config = TrainConfig(epochs=1, seed=0)
    model, result = train(str(uri), fs, train_config)
    setup["training (1 epoch)"] = time.perf_counter() - t0
    console.print(f"trained: held-out AUC {result.test['auc']:.4f}")

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        tasks: dict[str, int] = {}

        def tick(phase: str, n: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.advance(tasks[phase], n)

        cpu0, t0 = time.process_time(), time.perf_counter()
        found = audit(
            model, str(uri), AuditConfig(budget=BUDGET, seed=args.seed), train_config, progress=tick
        )
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0

    names = [f.name for f in fs.features]
    truth = against_truth(found.plan.retire, world.noise_features, names)
    in_blocks = sum(len(i.block) > 1 for i in found.importance.values())
    table = Table(title=f"feature audit of {len(fs):,} registered features (budget {BUDGET} AUC)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = (
        ("registered features", f"{len(fs):,}"),
        ("of which pure noise", f"{len(world.noise_features):,}"),
        ("held-out requests", f"{found.heldout_requests:,}"),
        ("held-out examples", f"{found.heldout_examples:,}"),
        ("audit wall seconds", f"{wall:,.1f}"),
        ("audit CPU seconds", f"{cpu:,.1f}"),
        ("shuffles scored", f"{found.evaluations:,}"),
        ("features decided in blocks", f"{in_blocks:,}"),
        ("features decided singly", f"{len(found.importance) - in_blocks:,}"),
        ("retired", f"{len(found.plan.retire):,}"),
        ("noise recall", f"{truth['noise_recall']:.1%}"),
        (
            "noise kept as explained by valuable features",
            f"{len(world.noise_features & set(found.plan.related)):,}",
        ),
        ("informative kept as explained", f"{len(set(found.plan.related) - world.noise_features):,}"),
        ("informative share of retired", f"{truth['informative_share']:.1%}"),
        ("plan loss / budget", f"{found.plan.loss:.5f} / {BUDGET}"),
        ("base held-out AUC", f"{found.base_auc:.4f}"),
        *((f"setup: {phase} wall seconds", f"{s:,.1f}") for phase, s in setup.items()),
    )
    for label, value in rows:
        table.add_row(label, value)
    console.print(table)

    if wall >= LIMIT_SECONDS:
        console.print(f"[red]FAIL[/red] the audit took {wall:,.0f} s, not under {LIMIT_SECONDS:.0f} s")
        return 1
    console.print(f"PASS audited {len(fs):,} features in {wall:,.0f} s (< {LIMIT_SECONDS:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
