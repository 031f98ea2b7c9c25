"""What validation costs: training with one validation metric against the full suite, same epochs.

Each epoch ends with a validation pass on the validation split (training items masked); the epoch
with the best MRR@10 is the one a run would keep. The passes are metered apart from the training
steps, so a run reports the share of its energy that went to validation, and whether computing
twelve metrics instead of one changed the model it would keep.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from leanrec.energy.meter import EnergyMeter
from leanrec.retrieval.metrics import evaluate
from leanrec.retrieval.models import Retriever
from leanrec.retrieval.protocol import Split


@dataclass
class ValidatedRun:
    """One training run with a validation pass after every epoch.

    Attributes:
        metrics: The metrics each pass computed.
        total_joules: Energy of the whole run.
        validation_joules: Energy of the validation passes.
        validation_cpu_seconds: Their CPU seconds.
        total_cpu_seconds: CPU seconds of the whole run.
        mark: ``measured`` or ``estimated``.
        valid_mrr: MRR@10 after each epoch.
        best_epoch: The epoch with the best MRR@10 (the model the run keeps).

    """

    metrics: tuple[str, ...]
    total_joules: float = 0.0
    validation_joules: float = 0.0
    validation_cpu_seconds: float = 0.0
    total_cpu_seconds: float = 0.0
    mark: str = ""
    valid_mrr: list[float] = field(default_factory=list)

    @property
    def validation_share(self) -> float:
        """Share of the run's energy spent validating."""
        return self.validation_joules / self.total_joules if self.total_joules else 0.0

    @property
    def best_epoch(self) -> int:
        """Epoch of the best MRR@10 (the first of equals)."""
        return int(np.argmax(self.valid_mrr))


def validated_training(
    make: Callable[[], Retriever],
    split: Split,
    epochs: int,
    metrics: Sequence[str],
    meter: EnergyMeter,
    seed: int = 2020,
) -> ValidatedRun:
    """Train ``make()`` for ``epochs``, validating with ``metrics`` (MRR@10 among them) after each.

    Raises:
        ValueError: ``metrics`` without ``mrr``, which chooses the epoch.

    """
    if "mrr" not in metrics:
        raise ValueError(
            f"the epoch is chosen by MRR@10: include 'mrr' in the validation metrics, got {metrics}"
        )
    run = ValidatedRun(tuple(metrics))
    target, seen = split.matrix(1), split.matrix(0)
    pop = np.bincount(split.train[1], minlength=split.n_items)
    model = make()

    def validate(_epoch: int) -> None:
        with meter.measure() as r:
            got = evaluate(model.scores, target, seen, pop, metrics=metrics)
        run.validation_joules += r.total.joules
        run.validation_cpu_seconds += r.cpu_seconds
        run.valid_mrr.append(got["mrr"])

    with meter.measure() as whole:
        model.fit(split, epochs, seed, validate)
    run.total_joules, run.total_cpu_seconds, run.mark = (
        whole.total.joules,
        whole.cpu_seconds,
        whole.total.mark,
    )
    return run
