"""The prune plan: retire features in order of value per cost while the AUC loss stays in budget.

Features are ordered by permutation value per unit of cost (those of no measurable value first, the
dearest of them first). Going down that order, each feature (or each block screened as a whole) is
shuffled together with everything retired so far; it joins the retired set if the joint loss on the
held-out requests stays within the budget, and is kept otherwise. Every accepted set was measured, so
a plan never exceeds its budget, and one feature whose value hid in a noisy estimate does not stop
the features after it from being retired. Ablation (retraining without the retired features) then
confirms the plan before it is adopted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from leanrec.audit.cost import FeatureCost, totals
from leanrec.audit.importance import Importance, PermutationAuditor
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

    """

    budget: float
    retire: list[str]
    loss: float
    order: list[tuple[str, float, float]]
    probes: list[tuple[int, float]] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)

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
    retire: list[str] = []
    loss, probes = 0.0, []

    def trial(names: list[str]) -> float:
        # The same shuffles for every trial (common random numbers): trials differ by their features.
        out = float(auditor.losses(names, repeats, seed).mean()) if names else 0.0
        probes.append((len(names), out))
        if progress:
            progress(1)
        return out

    # First the units of no measurable value, together: the longest prefix within budget, by bisection.
    worthless = [u for u in units if sum(value[n] for n in u) == 0.0]
    flat = [[n for u in worthless[:k] for n in u] for k in range(len(worthless) + 1)]
    lo, hi, at = 0, len(worthless), {0: 0.0}
    while lo < hi:
        mid = (lo + hi + 1) // 2
        at[mid] = trial(flat[mid])
        lo, hi = (mid, hi) if at[mid] <= budget else (lo, mid - 1)
    retire, loss = flat[lo], at[lo]
    # Then every other unit in order, each kept out if it would take the joint loss over budget.
    for unit in worthless[lo:] + units[len(worthless) :]:
        tried = trial([*retire, *unit])
        if tried <= budget:
            retire, loss = [*retire, *unit], tried
    reasons = {
        n: (
            f"audit: shuffling it cost {importance[n].loss:+.5f} AUC (±{importance[n].ci:.5f}), "
            f"{weight[n]:.2%} of the cost; retired with {len(retire) - 1} others costing {loss:+.5f} AUC "
            f"together, budget {budget}"
        )
        for n in retire
    }
    return PrunePlan(budget, retire, loss, order, probes, reasons)


def measurable_value(imp: Importance) -> float:
    """The AUC a feature is worth for ordering a plan: 0 unless its loss is measurably above 0.

    A feature decided inside a block is worth nothing measurable (the whole block cost less than the
    screening tolerance); a feature measured on its own is worth its mean loss when the lower end of
    its confidence interval is above 0. Dividing noise-level values by small costs would otherwise
    put cheap worthless features behind dear useful ones.
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
