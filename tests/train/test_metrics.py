"""Ranking metrics against brute force on small cases."""

from __future__ import annotations

import numpy as np
import pytest

from leanrec.train.metrics import auc, log_loss, per_request


def test_auc_equals_the_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    s = np.round(y + rng.normal(size=300), 1)  # rounded: many ties
    pos, neg = s[y], s[~y]
    brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
        len(pos) * len(neg)
    )
    assert auc(y, s) == pytest.approx(brute)


def test_auc_of_perfect_reversed_and_single_class() -> None:
    y = np.array([0, 0, 1, 1])
    assert auc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert np.isnan(auc(np.ones(3), np.array([0.1, 0.2, 0.3])))


def test_log_loss_of_known_values() -> None:
    assert log_loss(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(np.log(2))


def test_per_request_metrics_by_hand() -> None:
    # request 0: positive ranked 2nd of 3; request 1: positive ranked 2nd of 2; request 2: no positive
    groups = np.array([0, 0, 0, 1, 1, 2])
    labels = np.array([0, 1, 0, 1, 0, 0])
    scores = np.array([3, 2, 1, 1, 2, 5])
    m = per_request(groups, labels, scores, k=2)
    assert m["ndcg@2"] == pytest.approx(1 / np.log2(3))
    assert m["mrr"] == pytest.approx(0.5)
    assert m["recall@2"] == pytest.approx(1.0)
    m1 = per_request(groups, labels, scores, k=1)
    assert m1["recall@1"] == 0.0 and m1["ndcg@1"] == 0.0
