"""Lifecycle energy of retrieval models: training once, then queries, and when a dearer model pays off.

A model that costs more to train can cost less over its life if each query is cheaper: after
``n* = (E_train,A − E_train,B) / (e_query,B − e_query,A)`` queries, A (the dearer to train) has spent
less in all than B. If A is not cheaper per query, it never catches up.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch

from leanrec.energy.meter import EnergyMeter, Reading
from leanrec.retrieval.models import Retriever


@dataclass(frozen=True)
class Lifecycle:
    """One model's energy: training once, and one query.

    Attributes:
        name: The model.
        train_joules: Energy of training.
        query_joules: Energy of one query (median of the repeats after a warm-up).
        mark: ``measured`` or ``estimated``, as the meter said.

    """

    name: str
    train_joules: float
    query_joules: float
    mark: str


def breakeven(a: Lifecycle, b: Lifecycle) -> tuple[str, str, float | None]:
    """``(dearer, cheaper, n*)``: queries after which the model dearer to train is cheaper overall.

    ``n*`` is ``None`` when the dearer model is not cheaper per query (it never catches up), and 0
    when the two cost the same to train and the first is no dearer per query.
    """
    dear, cheap = (a, b) if a.train_joules >= b.train_joules else (b, a)
    saving = cheap.query_joules - dear.query_joules
    if saving <= 0:
        return dear.name, cheap.name, None
    return dear.name, cheap.name, (dear.train_joules - cheap.train_joules) / saving


def breakeven_table(models: list[Lifecycle]) -> list[tuple[str, str, float | None]]:
    """:func:`breakeven` for every pair."""
    return [breakeven(a, b) for a, b in combinations(models, 2)]


def top_k(model: Retriever, users: np.ndarray, k: int = 10, batch: int = 1024) -> torch.Tensor:
    """One query: the top ``k`` items of every user in ``users``, ``(len(users), k)``.

    Training items are not masked here: a query is what serving computes, the scores and the top.
    """
    out = []
    with torch.inference_mode():
        for s in range(0, len(users), batch):
            out.append(torch.topk(model.scores(users[s : s + batch]), k, dim=1).indices)
    return torch.cat(out)


def query_energy(
    model: Retriever, users: np.ndarray, meter: EnergyMeter, repeats: int = 5, k: int = 10
) -> tuple[float, Reading]:
    """Joules of one query after a warm-up, and its reading: the median of ``repeats`` (odd) readings."""
    top_k(model, users, k)  # warm-up: caches, lazily built tensors
    readings = []
    for _ in range(repeats):
        with meter.measure() as r:
            top_k(model, users, k)
        readings.append(r)
    mid = sorted(readings, key=lambda r: r.total.joules)[len(readings) // 2]
    return mid.total.joules, mid
