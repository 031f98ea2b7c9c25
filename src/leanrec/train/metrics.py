"""Ranking metrics, vectorised: AUC, log loss, and per-request NDCG@k, MRR and recall@k."""

from __future__ import annotations

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties get the average rank); NaN when one class is missing."""
    labels = np.asarray(labels, bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(len(scores), np.float64)
    # Average ranks over ties: first and last index of each run of equal scores.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy."""
    p = np.clip(np.asarray(probs, np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(labels, np.float64)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def per_request(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray, k: int = 10) -> dict[str, float]:
    """NDCG@k, MRR and recall@k averaged over requests with at least one positive.

    Args:
        groups: ``(N,)`` request index of each item.
        labels: ``(N,)`` 0/1.
        scores: ``(N,)`` model scores.
        k: Cut-off.

    """
    groups, labels, scores = np.asarray(groups), np.asarray(labels, np.float64), np.asarray(scores)
    order = np.lexsort((-scores, groups))  # by request, best score first
    g, y = groups[order], labels[order]
    first = np.r_[0, np.flatnonzero(np.diff(g)) + 1]
    rank = np.arange(len(g)) - np.repeat(first, np.diff(np.r_[first, len(g)]))  # 0-based rank in request
    n_req = len(first)
    req = np.repeat(np.arange(n_req), np.diff(np.r_[first, len(g)]))
    positives = np.bincount(req, weights=y, minlength=n_req)
    has = positives > 0
    if not has.any():
        return {f"ndcg@{k}": float("nan"), "mrr": float("nan"), f"recall@{k}": float("nan")}
    gain = np.where(rank < k, y / np.log2(rank + 2), 0.0)
    dcg = np.bincount(req, weights=gain, minlength=n_req)
    ideal_n = np.minimum(positives, k).astype(int)
    discounts = np.r_[0.0, np.cumsum(1 / np.log2(np.arange(2, k + 2)))]
    idcg = discounts[ideal_n]
    first_pos = np.full(n_req, np.inf)
    np.minimum.at(first_pos, req[y > 0], rank[y > 0])
    hits = np.bincount(req, weights=np.where(rank < k, y, 0.0), minlength=n_req)
    return {
        f"ndcg@{k}": float((dcg[has] / idcg[has]).mean()),
        "mrr": float((1 / (first_pos[has] + 1)).mean()),
        f"recall@{k}": float((hits[has] / positives[has]).mean()),
    }
