"""A retrieval index file: the same top items as its model's scores, masked, and refused when unusable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from leanrec.ids import scrambled_ids
from leanrec.retrieval.index import RetrievalIndex, RetrievalIndexError, embeddings_of, save_index


def test_top_is_the_brute_force_order_with_what_was_seen_masked(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    users, items = rng.normal(size=(20, 6)), rng.normal(size=(300, 6))
    # Raw 64-bit ids, not rows: anywhere in int64, the extremes included.
    item_ids = scrambled_ids(300, 2)[rng.permutation(300)]
    item_ids[:2] = 2**63 - 1, -(2**63)
    user_ids = scrambled_ids(20, 1)
    user_ids[4] = -(2**63)
    seen = (np.array([4, 4, 9]), np.array([10, 11, 12]))
    save_index(tmp_path / "i.npz", users, items, user_ids=user_ids, item_ids=item_ids, seen=seen)
    index = RetrievalIndex.load(tmp_path / "i.npz")
    assert index.item_ids.dtype == np.int64
    unknown = int(scrambled_ids(21, 1)[20])
    got, scores = index.top(np.array([user_ids[4], user_ids[0], unknown], np.int64), 25)
    assert got.dtype == np.int64
    full = users.astype(np.float32) @ items.astype(np.float32).T
    full[4, [10, 11]] = -np.inf
    for b, row in enumerate((4, 0)):
        want = np.argsort(-full[row], kind="stable")[:25]
        np.testing.assert_array_equal(got[b], item_ids[want])
        assert np.all(np.diff(scores[b]) <= 0)
    assert not set(item_ids[[10, 11]]) & set(got[0].tolist())
    mean = users.astype(np.float32).mean(0) @ items.astype(np.float32).T  # an unknown user: the mean user
    np.testing.assert_array_equal(got[2], item_ids[np.argsort(-mean, kind="stable")[:25]])
    everything, _ = index.top(user_ids[:1], 300)
    assert sorted(everything[0].tolist()) == sorted(item_ids.tolist())  # the extremes come back whole


def test_a_trained_model_exports_the_scores_it_gives() -> None:
    torch = pytest.importorskip("torch")
    from leanrec.retrieval.models import BPR
    from leanrec.retrieval.protocol import Split

    rng = np.random.default_rng(0)
    u, i = rng.integers(0, 30, 400), rng.integers(0, 50, 400)
    split = Split(30, 50, ((u, i), (u[:1], i[:1]), (u[:1], i[:1])))
    model = BPR()
    model.fit(split, epochs=1, seed=0)
    users, items = embeddings_of(model)
    ids = np.arange(30)
    np.testing.assert_allclose(users @ items.T, model.scores(ids).detach().numpy(), rtol=1e-5, atol=1e-6)
    assert torch.is_tensor(model.scores(ids))


def test_unusable_files_are_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(RetrievalIndexError, match="does not exist"):
        RetrievalIndex.load(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(RetrievalIndexError, match="not a retrieval index"):
        RetrievalIndex.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(RetrievalIndexError, match="not a retrieval index"):
        RetrievalIndex.load(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="embeddings"):
        save_index(tmp_path / "x.npz", np.zeros((3, 4)), np.zeros((5, 2)))
