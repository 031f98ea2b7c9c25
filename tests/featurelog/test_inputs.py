"""pack_ranked: a ranker's own arrays as a RankedBatch, and the scores it gives (or not)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from leanrec.featurelog.inputs import FeatureInputError, pack_ranked
from leanrec.ids import beyond_int64, string_ids
from leanrec.schema import PAD_ID, Feature, FeatureSet, Kind, Owner, Role, Side
from leanrec.world import WorldConfig, default_featureset


@pytest.fixture(scope="module")
def fs(small_config: WorldConfig) -> FeatureSet:
    return default_featureset(small_config)[0]


def _features(fs: FeatureSet, n: int) -> dict[str, np.ndarray]:
    """Every feature of ``fs``: zeros of the right shape (0 is an id like any other)."""
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


# ----------------------------------------------------------------------------------- raw 64-bit ids
def _fnv1a_64(text: str) -> int:
    """FNV-1a 64 of ``text``'s UTF-8 bytes, as the uint64 it is, written out byte by byte."""
    h = 0xCBF29CE484222325
    for b in text.encode():
        h = ((h ^ b) * 0x100000001B3) % 2**64
    return h


def test_string_ids_are_fnv1a_64_of_the_utf8_bytes_as_int64() -> None:
    got = string_ids(["a", "", "sku-1234", "ünïcode ✓", "a" * 300])
    assert got.dtype == np.int64
    assert got.view(np.uint64)[0] == 0xAF63DC4C8601EC8C  # the published FNV-1a 64 of "a"
    assert got.view(np.uint64)[1] == 0xCBF29CE484222325  # of nothing: the offset basis
    assert got.view(np.uint64).tolist() == [
        _fnv1a_64(t) for t in ("a", "", "sku-1234", "ünïcode ✓", "a" * 300)
    ]
    assert got[0] == 0xAF63DC4C8601EC8C - 2**64  # read as two's-complement int64: negative
    assert string_ids(np.array(["b", "a"])).tolist() == [*string_ids(["b"]).tolist(), got[0]]
    with pytest.raises(ValueError, match="missing"):
        string_ids(["a", None])


def _string_shop() -> FeatureSet:
    """A FeatureSet whose user, item and history ids are strings, beside raw and dense features."""
    U, I, C = Owner.USER, Owner.ITEM, Owner.CONTEXT
    return FeatureSet(
        "shop",
        1,
        (
            Feature("buyer", U, Kind.SPARSE, 1, 50, string_ids=True, role=Role.USER_ID),
            Feature("seen", U, Kind.SEQUENCE, 3, 100, string_ids=True, role=Role.HISTORY),
            Feature("sku", I, Kind.SPARSE, 1, 100, string_ids=True, role=Role.ITEM_ID),
            Feature("tags", I, Kind.MULTI_HOT, 2, 30, map="hash", string_ids=True),
            Feature("price", I, Kind.DENSE, 1),
            Feature("hour", C, Kind.SPARSE, 1, 24),
        ),
    )


def _shop_features(**over: object) -> dict[str, object]:
    features: dict[str, object] = {
        "buyer": "user-7",
        "seen": ["sku-2", "sku-9", -1],  # a short history, padded
        "sku": ["sku-1", "sku-2"],
        "tags": [["red", -1], ["blue", "big"]],
        "price": [9.5, 3.0],
        "hour": 8,
    }
    features.update(over)
    return features


def test_string_ids_are_hashed_where_the_featureset_declares_them() -> None:
    fs = _string_shop()
    batch = pack_ranked(fs, "user-7", ["sku-1", "sku-2"], _shop_features())
    names = ["user-7", "sku-1", "sku-2", "sku-9", "red", "blue", "big"]
    h = dict(zip(names, string_ids(names).tolist(), strict=True))
    assert batch.user_ids.tolist() == [h["user-7"]]
    assert batch.item_ids.dtype == np.int64 and batch.item_ids.tolist() == [[h["sku-1"], h["sku-2"]]]
    assert fs.layout(Side.REQUEST).names == ["buyer", "seen", "hour"]
    assert batch.request.ints.tolist() == [[h["user-7"], h["sku-2"], h["sku-9"], PAD_ID, 8]]  # padding kept
    assert batch.items.ints.tolist() == [[h["sku-1"], h["red"], PAD_ID], [h["sku-2"], h["blue"], h["big"]]]
    # ids given as their int64 already are taken as they are, and numpy strings hash as lists do
    same = pack_ranked(
        fs,
        h["user-7"],
        np.array(["sku-1", "sku-2"]),
        _shop_features(buyer=h["user-7"], sku=np.array(["sku-1", "sku-2"])),
    )
    assert (
        same.user_ids.tolist() == batch.user_ids.tolist()
        and same.item_ids.tolist() == batch.item_ids.tolist()
    )
    assert same.request.same_bytes(batch.request) and same.items.same_bytes(batch.items)


@pytest.mark.parametrize(
    ("change", "feature", "says"),
    [
        (
            {"seen": ["sku-2", 1.5, -1]},
            "seen",
            "feature seen holds string ids: expected strings or integer ids, got float",
        ),
        ({"seen": ["sku-2", None, -1]}, "seen", "got NoneType"),
        ({"seen": ["sku-2", True, -1]}, "seen", "got bool"),
        ({"seen": ["sku-2", 2**63, -1]}, "seen", "feature seen: ids are int64, got 9223372036854775808"),
        ({"tags": [["red", ["x"]], ["blue", "big"]]}, "tags", "feature tags holds string ids"),
        ({"hour": "8"}, "hour", "feature hour holds ids: expected integers, got <U1"),  # raw ids: no strings
        ({"price": ["9.5", "3"]}, "price", "feature price is dense: expected numbers"),
    ],
)
def test_string_ids_beside_what_is_no_id_are_refused_naming_the_feature(
    change: dict, feature: str, says: str
) -> None:
    with pytest.raises(FeatureInputError, match=re.escape(says)) as err:
        pack_ranked(_string_shop(), "user-7", ["sku-1", "sku-2"], _shop_features(**change))
    assert err.value.feature == feature


def test_string_item_and_user_ids_need_a_featureset_that_declares_them(fs: FeatureSet) -> None:
    with pytest.raises(
        FeatureInputError, match='string ids need an item_id feature declared with dtype = "string"'
    ) as err:
        pack_ranked(fs, 7, ["sku-1", "sku-2"], _features(fs, 2))
    assert err.value.feature == "items"
    with pytest.raises(FeatureInputError, match="user_id: expected a 64-bit integer, got 'user-7'") as err:
        pack_ranked(fs, "user-7", np.arange(2), _features(fs, 2))
    assert err.value.feature == "user_id"
    some_id = next(s.feature.name for s in fs.layout(Side.ITEM).slots if not s.feature.is_float)
    with pytest.raises(
        FeatureInputError, match=f"feature {some_id} holds ids: expected integers, got <U"
    ) as err:
        pack_ranked(fs, 7, np.arange(2), {**_features(fs, 2), some_id: np.array(["a", "b"])})
    assert err.value.feature == some_id


def test_raw_ids_of_any_int64_value_are_packed_as_given(fs: FeatureSet) -> None:
    items = np.array([2**63 - 1, -(2**63), -2, 0, 2**40])
    features = _features(fs, len(items))
    ids = [s.feature for s in fs.layout(Side.ITEM).slots if not s.feature.is_float]
    for k, f in enumerate(ids):  # far outside any feature's rows: rows size a table, not the values
        features[f.name] = np.full((len(items), f.size), items[k % len(items)])
    batch = pack_ranked(fs, -(2**63), items, features)
    assert batch.user_ids.tolist() == [-(2**63)]
    assert batch.item_ids.tolist() == [items.tolist()]
    lay = {s.feature.name: s for s in fs.layout(Side.ITEM).slots}
    for k, f in enumerate(ids):
        col = batch.items.ints[:, lay[f.name].offset : lay[f.name].stop]
        assert (col == items[k % len(items)]).all(), f.name
    # the same ids from JSON: Python ints, the int64 extremes among them
    as_json = pack_ranked(
        fs, 2**63 - 1, items.tolist(), {n: np.asarray(v).tolist() for n, v in features.items()}
    )
    assert as_json.item_ids.tolist() == batch.item_ids.tolist() and as_json.items.same_bytes(batch.items)


@pytest.mark.parametrize("items", [[3, -1, 4], np.array([-1]), [-1]], ids=["among-ids", "numpy", "alone"])
def test_the_padding_id_is_refused_as_a_ranked_item(fs: FeatureSet, items: object) -> None:
    with pytest.raises(FeatureInputError, match=r"items: -1 is the padding id, not an item") as err:
        pack_ranked(fs, 7, items, _features(fs, len(items)))
    assert err.value.feature == "items"


def test_the_padding_id_among_string_items_is_refused_not_hashed() -> None:
    features = _shop_features(sku=["sku-1", -1])
    with pytest.raises(FeatureInputError, match=r"items: -1 is the padding id, not an item") as err:
        pack_ranked(_string_shop(), "user-7", ["sku-1", -1], features)
    assert err.value.feature == "items"
    # the string "-1" is an id like any other: its hash
    got = pack_ranked(_string_shop(), "user-7", ["sku-1", "-1"], _shop_features(sku=["sku-1", "-1"]))
    assert got.item_ids.tolist() == [string_ids(["sku-1", "-1"]).tolist()]


def test_beyond_int64_marks_only_unsigned_ids_no_int64_holds() -> None:
    got = beyond_int64(np.array([0, 2**63 - 1, 2**63, 2**64 - 1], dtype=np.uint64))
    assert got.tolist() == [False, False, True, True]
    assert not beyond_int64(np.array([-(2**63), -1, 2**63 - 1], dtype=np.int64)).any()
    assert beyond_int64(np.zeros((2, 0), np.uint64)).shape == (2, 0)


def test_unsigned_ids_past_2_63_are_refused_naming_the_feature_not_wrapped(fs: FeatureSet) -> None:
    big = np.array([1, 2**63], np.uint64)
    with pytest.raises(FeatureInputError, match=r"items: ids are int64, got 9223372036854775808") as err:
        pack_ranked(fs, 7, big, _features(fs, 2))
    assert err.value.feature == "items"
    with pytest.raises(FeatureInputError, match=r"items: ids are int64"):
        pack_ranked(fs, 7, [2**63], _features(fs, 1))  # a JSON number past int64
    f = next(s.feature for s in fs.layout(Side.ITEM).slots if not s.feature.is_float and s.feature.size == 1)
    for values in (big, [1, 2**63]):
        with pytest.raises(
            FeatureInputError, match=rf"feature {f.name}: ids are int64, got 9223372036854775808"
        ) as err:
            pack_ranked(fs, 7, np.arange(2), {**_features(fs, 2), f.name: values})
        assert err.value.feature == f.name
    # unsigned ids that int64 holds are ids like any other
    small = pack_ranked(
        fs,
        7,
        np.array([1, 2**63 - 1], np.uint64),
        {**_features(fs, 2), f.name: np.array([5, 2**63 - 1], np.uint64)},
    )
    assert small.item_ids.tolist() == [[1, 2**63 - 1]]
    for bad_user in (2**63, True, 1.5):
        with pytest.raises(FeatureInputError, match="user_id: expected a 64-bit integer") as err:
            pack_ranked(fs, bad_user, np.arange(2), _features(fs, 2))
        assert err.value.feature == "user_id"
