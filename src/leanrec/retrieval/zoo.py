"""The retrieval models on one dataset: each trained and metered, evaluated, and its query metered.

Shared by ``leanrec breakeven`` and ``benchmarks/retrieval_zoo.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leanrec.energy.meter import EnergyMeter, Reading
from leanrec.retrieval.atomic import load_interactions, side_features
from leanrec.retrieval.lifecycle import Lifecycle, query_energy
from leanrec.retrieval.metrics import evaluate
from leanrec.retrieval.models import MODELS, Retriever, TwoTower
from leanrec.retrieval.protocol import Split, random_split

TRAINED = ("BPR", "LightGCN", "TwoTower")
"""Models trained for several epochs (the others fit in one pass)."""


@dataclass
class ZooResult:
    """One model's figures.

    Attributes:
        name: The model.
        epochs: Epochs trained.
        metrics: Test metrics @10.
        fit: The meter's reading of training.
        query: The meter's median reading of one query.
        query_joules: Its energy.

    """

    name: str
    epochs: int
    metrics: dict[str, float]
    fit: Reading
    query: Reading
    query_joules: float

    @property
    def lifecycle(self) -> Lifecycle:
        """Training and query energy, for break-even."""
        return Lifecycle(self.name, self.fit.total.joules, self.query_joules, self.fit.total.mark)


def makers(folder: Path, data_tokens: tuple[np.ndarray, np.ndarray]) -> dict[str, Callable[[], Retriever]]:
    """Every model by name; the two-tower reads the folder's ``.user`` and ``.item`` files when made."""
    stem = folder / folder.name

    def two_tower() -> TwoTower:
        users = side_features(f"{stem}.user", "user_id", data_tokens[0])
        return TwoTower(users, side_features(f"{stem}.item", "item_id", data_tokens[1]))

    return {**MODELS, "TwoTower": two_tower}


def run_zoo(
    folder: Path,
    epochs: int = 20,
    seed: int = 2020,
    names: list[str] | None = None,
    meter: EnergyMeter | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Split, list[ZooResult]]:
    """Train, evaluate and meter ``names`` (default: all) on the RecBole dataset in ``folder``.

    Raises:
        ValueError: An unknown model name.
        AtomicError: Unreadable dataset files.

    """
    data = load_interactions(folder)
    split = random_split(data, seed=seed)
    every = makers(folder, (data.user_tokens, data.item_tokens))
    names = names or list(every)
    unknown = [n for n in names if n not in every]
    if unknown:
        raise ValueError(f"unknown models {unknown}; known: {list(every)}")
    meter = meter or EnergyMeter()
    target, seen = split.matrix(2), split.matrix(0, 1)
    pop = np.bincount(split.train[1], minlength=split.n_items)
    users = np.flatnonzero(np.diff(target.indptr) > 0)
    out = []
    for name in names:
        if progress:
            progress(name)
        model = every[name]()
        n = epochs if name in TRAINED else 1
        with meter.measure() as fit:
            model.fit(split, n, seed)
        got = evaluate(model.scores, target, seen, pop, metrics=("recall", "ndcg", "mrr", "hit"))
        q_joules, q = query_energy(model, users, meter)
        out.append(ZooResult(name, n, got, fit, q, q_joules))
    return split, out
