"""The prune plan: retire features in order of value per cost while the AUC loss stays in budget.

Features are ordered by permutation value per unit of cost (those of no measurable value first, the
dearest of them first). Features of no measurable value that the valuable features explain (see
:mod:`leanrec.audit.related`) are not candidates: they are informative, and the model only reads
their information elsewhere. Going down the order, features are retired while their joint shuffle
on the held-out requests stays within the budget: the features of no measurable value first (the
longest affordable run found by bisection, then each of the rest that still fits), then one feature
(or one block screened as a whole) of measurable value at a time until the first that would take
the joint loss over budget. Every accepted set was measured, so a plan never exceeds its budget;
stopping at the first refusal among valuable features, rather than trying every later one, keeps a
plan from collecting informative features whose joint loss only looked affordable in one noisy draw.
Ablation (retraining without the retired features) then confirms the plan before it is adopted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from leanrec.audit.cost import FeatureCost, totals
from leanrec.audit.importance import Importance, PermutationAuditor, Shuffled
from leanrec.schema import FeatureSet


@dataclass
class PrunePlan:
    """Which features to retire, and why.

    Attributes:
        budget: Most held-out AUC the plan may lose.
        retire: Features to retire, in the order they were taken.
        loss: Measured AUC loss of shuffling all of ``retire`` together (mean of the repeats).
        order: Every candidate in value-per-cost order, with its value and cost weight.
        probes: Sizes of the sets tried, with their measured joint loss.
        reasons: Per retired feature, the figures it was retired on.
        related: Features of no measurable value kept because valuable features explain them.

    """

    budget: float
    retire: list[str]
    loss: float
    order: list[tuple[str, float, float]]
    probes: list[tuple[int, float]] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    related: list[str] = field(default_factory=list)

    def featureset(self, fs: FeatureSet) -> FeatureSet:
        """The next version of ``fs`` with the plan's features retired (``fs`` itself if none)."""
        return fs.retire(self.reasons) if self.reasons else fs


def make_plan(
    auditor: PermutationAuditor,
    importance: Mapping[str, Importance],
    costs: Mapping[str, FeatureCost],
    budget: float = 0.001,
    repeats: int = 3,
    keep: frozenset[str] = frozenset(),
    related: frozenset[str] = frozenset(),
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> PrunePlan:
    """Retire features in order of value per cost while the joint AUC loss stays within ``budget``.

    Args:
        auditor: Scores joint shuffles on the held-out requests.
        importance: Permutation importance per feature.
        costs: Cost per feature.
        budget: Most AUC the plan may lose (>= 0).
        repeats: Shuffles per tried set.
        keep: Features the model cannot do without (never retired).
        related: Features of no measurable value that valuable features explain (never retired).
        seed: Seeds the shuffles.
        progress: Called once per decision unit tried.

    Raises:
        ValueError: A negative budget.

    """
    if not budget >= 0:
        raise ValueError(f"the AUC budget must be at least 0, got {budget}")
    total = totals(dict(costs))
    weight = {n: max(costs[n].weight(total), 1e-12) for n in importance}
    value = {n: measurable_value(importance[n]) for n in importance}
    spared = {n for n in related if n in importance and value[n] == 0.0}
    keep = keep | spared
    # Decision units: a block screened as a whole is taken or left as a whole; others one by one.
    units: list[tuple[str, ...]] = []
    seen: set[str] = set()
    for n in importance:
        if n in seen or n in keep:
            continue
        unit = (
            tuple(m for m in importance[n].block if m not in keep) if len(importance[n].block) > 1 else (n,)
        )
        seen.update(unit)
        units.append(unit)

    def unit_key(u: tuple[str, ...]) -> tuple[float, float, str]:
        v, w = sum(value[n] for n in u), sum(weight[n] for n in u)
        return v / w, -w, u[0]  # value per cost, least first; among worthless units, the dearest first

    units.sort(key=unit_key)
    order = [(n, value[n], weight[n]) for u in units for n in u]
    probes: list[tuple[int, float]] = []

    def trial(names: list[str], base: Shuffled | None = None) -> tuple[float, Shuffled | None]:
        # The same shuffles for every trial (common random numbers): trials differ by their features.
        state = auditor.shuffle(names, repeats, seed, base) if names else None
        out = float(auditor.score(state).mean()) if state else 0.0
        probes.append((len(state.names) if state else 0, out))
        if progress:
            progress(1)
        return out, state

    # First the units of no measurable value, together: the longest prefix within budget, by bisection.
    worthless = [u for u in units if sum(value[n] for n in u) == 0.0]
    flat = [[n for u in worthless[:k] for n in u] for k in range(len(worthless) + 1)]
    lo, hi, at = 0, len(worthless), {0: (0.0, None)}
    while lo < hi:
        mid = (lo + hi + 1) // 2
        at[mid] = trial(flat[mid])
        lo, hi = (mid, hi) if at[mid][0] <= budget else (lo, mid - 1)
    retire, (loss, state) = flat[lo], at[lo]
    # The rest of them one by one, each left out if it would break the budget: they are as empty of
    # information as the others, only dearer to measure together. Each trial adds one unit's shuffle
    # to the retired set's, so it costs that unit alone.
    for unit in worthless[lo:]:
        tried, grown = trial(list(unit), state)
        if tried <= budget:
            retire, loss, state = [*retire, *unit], tried, grown
    # Then the units of measurable value in order, until the first that would break the budget.
    for unit in units[len(worthless) :]:
        tried, grown = trial(list(unit), state)
        if tried > budget:
            break
        retire, loss, state = [*retire, *unit], tried, grown
    reasons = {
        n: (
            f"audit: shuffling it cost {importance[n].loss:+.5f} AUC (±{importance[n].ci:.5f}), "
            f"{weight[n]:.2%} of the cost; retired with {len(retire) - 1} others costing {loss:+.5f} AUC "
            f"together, budget {budget}"
        )
        for n in retire
    }
    return PrunePlan(budget, retire, loss, order, probes, reasons, sorted(spared))


def measurable_value(imp: Importance) -> float:
    """The AUC a feature is worth for ordering a plan: 0 unless its loss is measurably above 0.

    A feature decided inside a block is worth nothing measurable (the whole block cost less than the
    screening tolerance); a feature measured on its own is worth its mean loss when that loss is
    above the interval a feature worth nothing stays within (``Importance.ci``). Dividing
    noise-level values by small costs would otherwise put cheap worthless features behind dear
    useful ones.
    """
    if len(imp.block) > 1 or imp.loss - imp.ci <= 0:
        return 0.0
    return imp.loss


def against_truth(retired: list[str], noise: frozenset[str], audited: list[str]) -> dict[str, float]:
    """How a retired set compares with a known truth: share of the noise found, share informative."""
    r, audited_noise = set(retired), noise & set(audited)
    found = len(r & audited_noise)
    return {
        "noise_features": len(audited_noise),
        "noise_retired": found,
        "noise_recall": found / max(len(audited_noise), 1),
        "retired": len(r),
        "informative_retired": len(r - noise),
        "informative_share": len(r - noise) / max(len(r), 1),
    }


def rank_agreement(a: Mapping[str, float], b: Mapping[str, float], names: list[str]) -> float:
    """Spearman correlation of two importance rankings over ``names``."""
    ra = np.argsort(np.argsort([a[n] for n in names]))
    rb = np.argsort(np.argsort([b[n] for n in names]))
    return float(np.corrcoef(ra, rb)[0, 1]) if len(names) > 1 else float("nan")
