"""Full-ranking top-k metrics, RecBole's definitions, computed for batches of users at once.

Accuracy metrics compare each user's top ``k`` (seen items masked) with the user's held-out items:
Recall, Precision, Hit, MRR, NDCG, MAP and GAUC (the AUC of each user's held-out items against every
other unmasked item, averaged with the users' held-out counts as weights). The beyond-accuracy ones
describe all the lists together: item coverage, average popularity (training interactions of the
recommended items), the Gini index and Shannon entropy of how often each item is recommended, and
the share of recommendations that go to tail items. Two of them differ from RecBole's on purpose:
coverage divides by the items that exist (RecBole counts its padding id too), and the entropy is
Shannon's (RecBole divides it by the number of distinct items recommended).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp
import torch

ACCURACY = ("recall", "mrr", "ndcg", "hit", "map", "precision", "gauc")
BEYOND = ("itemcoverage", "averagepopularity", "giniindex", "shannonentropy", "tailpercentage")
ALL = ACCURACY + BEYOND
"""The twelve metrics of the full suite."""


def _rows(m: sp.csr_matrix, users: np.ndarray) -> torch.Tensor:
    """Dense ``(len(users), n_items)`` bool rows of a sparse matrix."""
    return torch.from_numpy(m[users].toarray() > 0)


def evaluate(
    score: Callable[[np.ndarray], torch.Tensor],
    target: sp.csr_matrix,
    seen: sp.csr_matrix,
    item_pop: np.ndarray,
    metrics: Sequence[str] = ALL,
    k: int = 10,
    batch: int = 512,
    tail_ratio: float = 0.1,
) -> dict[str, float]:
    """Metrics@k of a scorer over every user with a held-out item.

    Args:
        score: Maps ``(B,)`` user ids to ``(B, n_items)`` scores.
        target: Users × items held-out interactions (the positives).
        seen: Users × items interactions to mask (the earlier parts).
        item_pop: ``(n_items,)`` training interactions per item.
        metrics: Names among :data:`ALL`.
        k: List length.
        batch: Users scored at once.
        tail_ratio: Share of the items seen in training, least popular first, that are tail items.

    Raises:
        ValueError: An unknown metric name.

    """
    unknown = sorted(set(metrics) - set(ALL))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {list(ALL)}")
    users = np.flatnonzero(np.diff(target.indptr) > 0)
    n_items = target.shape[1]
    beyond = bool(set(metrics) & set(BEYOND))
    sums = dict.fromkeys(ACCURACY, 0.0)
    gauc_weight = 0.0
    counts = torch.zeros(n_items, dtype=torch.float64)
    pop = torch.from_numpy(item_pop.astype(np.float64))
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))  # (k,)
    for start in range(0, len(users), batch):
        u = users[start : start + batch]
        with torch.inference_mode():
            s = score(u).to(torch.float64)
        mask, pos = _rows(seen, u), _rows(target, u)
        s = s.masked_fill(mask, -torch.inf)
        top = torch.topk(s, k, dim=1).indices  # (B, k)
        hit = pos.gather(1, top).to(torch.float64)  # (B, k)
        n_pos = pos.sum(1).to(torch.float64)
        hits = hit.sum(1)
        # Only what is asked for is computed: a validation pass that needs one metric pays for one.
        if "recall" in metrics:
            sums["recall"] += float((hits / n_pos).sum())
        if "precision" in metrics:
            sums["precision"] += float((hits / k).sum())
        if "hit" in metrics:
            sums["hit"] += float((hits > 0).sum())
        if "mrr" in metrics:
            first = torch.where(hit.any(1), hit.argmax(1) + 1, 0).to(torch.float64)
            sums["mrr"] += float(torch.where(first > 0, 1.0 / first.clamp_min(1), 0.0).sum())
        if "ndcg" in metrics:
            ideal = (torch.arange(k)[None, :] < n_pos[:, None]).to(torch.float64)
            sums["ndcg"] += float(((hit * discount).sum(1) / (ideal * discount).sum(1)).sum())
        if "map" in metrics:
            precision_at = hit.cumsum(1) / torch.arange(1, k + 1, dtype=torch.float64)
            sums["map"] += float(
                ((precision_at * hit).sum(1) / torch.minimum(n_pos, torch.tensor(float(k)))).sum()
            )
        if "gauc" in metrics:
            auc, weight = _gauc(s, pos, mask)
            sums["gauc"] += auc
            gauc_weight += weight
        if beyond:
            counts += torch.bincount(top.flatten(), minlength=n_items).to(torch.float64)
    n = len(users)
    out = {m: sums[m] / n for m in ACCURACY if m in metrics and m != "gauc"}
    if "gauc" in metrics:
        out["gauc"] = sums["gauc"] / gauc_weight if gauc_weight else float("nan")
    total = float(counts.sum())
    if "itemcoverage" in metrics:
        out["itemcoverage"] = float((counts > 0).sum()) / n_items
    if "averagepopularity" in metrics:
        out["averagepopularity"] = float((counts * pop).sum()) / total
    if "giniindex" in metrics:
        c = torch.sort(counts).values
        idx = torch.arange(1, n_items + 1, dtype=torch.float64)
        out["giniindex"] = float(((2 * idx - n_items - 1) * c).sum() / (n_items * c.sum()))
    if "shannonentropy" in metrics:
        p = counts[counts > 0] / total
        out["shannonentropy"] = float(-(p * p.log()).sum())
    if "tailpercentage" in metrics:
        out["tailpercentage"] = (
            float(counts[torch.from_numpy(tail_items(item_pop, tail_ratio))].sum()) / total
        )
    return {m: out[m] for m in metrics}


def _gauc(s: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Sum over users of (AUC × positives), and the positives, among each user's unmasked items."""
    valid = ~mask
    n_pos = (pos & valid).sum(1).to(torch.float64)
    n_neg = (valid & ~pos).sum(1).to(torch.float64)
    # Rank of every item in its row (1 = lowest score); masked items sit at -inf, below all others.
    ranks = torch.empty_like(s, dtype=torch.float64)
    order = s.argsort(1)
    ranks.scatter_(1, order, torch.arange(1, s.shape[1] + 1, dtype=torch.float64).expand_as(s).contiguous())
    n_masked = mask.sum(1).to(torch.float64)
    pos_rank_sum = torch.where(pos & valid, ranks - n_masked[:, None], 0.0).sum(1)
    ok = (n_pos > 0) & (n_neg > 0)
    auc = (pos_rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg).clamp_min(1)
    return float((auc * n_pos)[ok].sum()), float(n_pos[ok].sum())


def tail_items(item_pop: np.ndarray, ratio: float = 0.1) -> np.ndarray:
    """RecBole's tail: the ``ratio`` least popular of the items seen in training (at least one)."""
    seen = np.flatnonzero(item_pop > 0)
    order = seen[np.lexsort((seen, item_pop[seen]))]  # by count, then id
    return order[: max(int(ratio * len(seen)), 1)]
