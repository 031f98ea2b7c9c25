"""pack_ranked: a ranker's own arrays as a RankedBatch, and the scores it gives (or not)."""

from __future__ import annotations

import numpy as np
import pytest

from leanrec.featurelog.inputs import FeatureInputError, pack_ranked
from leanrec.schema import FeatureSet, Side
from leanrec.world import WorldConfig, default_featureset


@pytest.fixture(scope="module")
def fs(small_config: WorldConfig) -> FeatureSet:
    return default_featureset(small_config)[0]


def _features(fs: FeatureSet, n: int) -> dict[str, np.ndarray]:
    """Every feature of ``fs``: zeros of the right shape (ids 0 lie in every vocabulary)."""
    out = {}
    for side, rows in ((Side.REQUEST, ()), (Side.ITEM, (n,))):
        for slot in fs.layout(side).slots:
            f = slot.feature
            out[f.name] = np.zeros((*rows, f.size), np.float32 if f.is_float else np.int64)
    return out


def test_the_scores_given_are_packed_as_float32_in_ranked_order(fs: FeatureSet) -> None:
    scores = np.array([0.9, 0.5, 0.75, -2.0, 1e-9])  # float64, and not descending: kept as given
    batch = pack_ranked(fs, 7, np.arange(5), _features(fs, 5), scores)
    assert batch.scores.dtype == np.float32 and batch.scores.shape == (1, 5)
    assert np.array_equal(batch.scores[0], scores.astype(np.float32))
    ints = pack_ranked(fs, 7, np.arange(5), _features(fs, 5), [5, 4, 3, 2, 1])
    assert ints.scores[0].tolist() == [5.0, 4.0, 3.0, 2.0, 1.0]


def test_no_scores_are_nan_not_a_made_up_order(fs: FeatureSet) -> None:
    batch = pack_ranked(fs, 7, np.arange(4), _features(fs, 4))
    assert batch.scores.dtype == np.float32 and batch.scores.shape == (1, 4)
    assert np.isnan(batch.scores).all()


@pytest.mark.parametrize(
    "scores",
    [np.zeros(3), np.zeros((1, 4)), np.array(["a", "b", "c", "d"]), np.ones(4) * 1j, [1.0, None, 2.0, 3.0]],
    ids=["short", "2-d", "strings", "complex", "a-null"],
)
def test_scores_that_are_not_one_number_per_item_are_refused(fs: FeatureSet, scores: object) -> None:
    with pytest.raises(FeatureInputError, match="scores: expected 4 numbers, one per item") as err:
        pack_ranked(fs, 7, np.arange(4), _features(fs, 4), scores)
    assert err.value.feature == "scores"


def test_a_retired_feature_sent_anyway_is_refused_with_why_it_was_retired(fs: FeatureSet) -> None:
    gone = fs.layout(Side.ITEM).slots[-1].feature.name
    pruned = fs.retire({gone: "earned nothing in the audit"})
    features = _features(fs, 3)  # the parent's features, the retired one included
    with pytest.raises(
        FeatureInputError, match=f"{gone} is not in .* retired \\(earned nothing in the audit\\)"
    ):
        pack_ranked(pruned, 7, np.arange(3), features)
    del features[gone]
    assert pack_ranked(pruned, 7, np.arange(3), features).n_items == 3
