"""Validation overhead: one validation metric (MRR@10) against the full suite of twelve, same epochs.

    python benchmarks/validation_overhead.py [--data ../shared/data/ml-100k] [--epochs 20]

Trains BPR and LightGCN on MovieLens 100K (RecBole's protocol, seed 2020) with a validation pass after
every epoch, once computing MRR@10 alone and once the twelve metrics (Recall, MRR, NDCG, Hit, MAP,
Precision, GAUC, item coverage, average popularity, Gini index, Shannon entropy, tail percentage).
Prints, per model and suite, the run's energy, the share spent validating, and the epoch each run
would keep (best validation MRR@10); then the ratio of the two suites' validation energy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from leanrec.energy.meter import EnergyMeter
from leanrec.retrieval.atomic import load_interactions
from leanrec.retrieval.metrics import ALL
from leanrec.retrieval.models import BPR, LightGCN
from leanrec.retrieval.protocol import random_split
from leanrec.retrieval.validation import validated_training

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "ml-100k")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=2020)
    args = parser.parse_args()
    console = Console()
    split = random_split(load_interactions(args.data), seed=args.seed)
    meter = EnergyMeter()
    table = Table(title=f"validation after each of {args.epochs} epochs: MRR@10 alone against twelve metrics")
    for c in (
        "model",
        "metrics",
        "run J",
        "validation J",
        "validation share",
        "kept epoch",
        "best valid MRR@10",
    ):
        table.add_column(c, justify="left" if c in ("model", "metrics") else "right")
    ratios = []
    for make in (BPR, LightGCN):
        runs = [validated_training(make, split, args.epochs, m, meter, args.seed) for m in (("mrr",), ALL)]
        for run in runs:
            table.add_row(
                make.name,
                "MRR@10" if len(run.metrics) == 1 else f"all {len(run.metrics)}",
                f"{run.total_joules:,.1f} ({run.mark[:4]}.)",
                f"{run.validation_joules:,.1f}",
                f"{run.validation_share:.1%}",
                str(run.best_epoch + 1),
                f"{max(run.valid_mrr):.4f}",
            )
        one, twelve = runs
        ratios.append(
            (make.name, twelve.validation_joules / one.validation_joules, one.best_epoch == twelve.best_epoch)
        )
    console.print(table)
    for name, ratio, same in ratios:
        console.print(
            f"{name}: the twelve metrics cost {ratio:.1f}× the validation energy of MRR@10 alone; "
            f"the kept epoch is {'the same' if same else 'different'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
