"""The library's way in: a FeatureSet of one's own, logged, paginated, engaged with and joined."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

import leanrec
from leanrec.clock import ManualClock
from leanrec.featurefile import parse_featureset
from leanrec.featurelog.inputs import FeatureInputError
from leanrec.ids import scrambled_ids
from leanrec.schema import Side
from leanrec.serve.config import ConfigError
from leanrec.serve.tokens import TokenError
from leanrec.warehouse.store import ParquetWarehouse
from leanrec.warehouse.tables import TableLayout

T0 = 1_700_000_000_000


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def urls(request: pytest.FixtureRequest) -> tuple[str, str]:
    if request.param == "memory":
        return "memory://", "memory://"
    url = request.getfixturevalue("cluster_url" if request.param == "redis-cluster" else "redis_url")
    return url, url


@pytest.mark.parametrize("logging", ["lazy", "eager"])
def test_a_ranker_of_its_own_logs_through_the_library_and_gets_its_features_back_joined(
    tmp_path: Path, urls: tuple[str, str], logging: str, shop_toml: str, shop_features
) -> None:
    (tmp_path / "shop.toml").write_text(shop_toml)
    clock = ManualClock(T0)
    log = leanrec.open_logging(
        tmp_path / "shop.toml", *urls, logging=logging, clock=clock, window_ms=60_000, lateness_ms=5_000
    )
    joiner = log.joiner(tmp_path / "wh")
    rng = np.random.default_rng(4)
    catalog = scrambled_ids(5000, 7)  # raw 64-bit item ids, spread over the whole int64 range
    users = [2**63 - 1, -(2**63), -2, 0, 12_345_678_901_234, 7]  # raw user ids, both ends of int64
    sent, viewed = {}, {}
    for user, user_id in enumerate(users):
        items = catalog[rng.choice(5000, size=40, replace=False)]
        feats, scores = shop_features(rng, items), np.sort(rng.random(40))[::-1]
        if user == 5:
            scores = None  # a ranker that gives no scores: null in the warehouse
        logged = log.ranked(user_id, items, feats, scores)
        sent[logged.request_id] = (feats, items, scores, user_id)
        assert logged.n_items == 40
        # The head is seen; user 0..2 scroll to 14 with a signal; users 3..5 scroll fast: their first
        # signal comes after events on items of a page never signalled.
        seen = [0, 2, 5]
        if user < 3:
            log.paginate(logged.request_id, logged.token, 14)
            seen += [9, 14]
        seen += [22] if user >= 3 else []
        events = [
            {"position": p, "item_id": int(items[p]), "kind": "click", "ts_ms": clock.now_ms()} for p in seen
        ]
        result = log.events(logged.request_id, logged.token, events, batch_id=f"b{user}")
        assert result.accepted == len(seen) and result.refused == {}
        viewed[logged.request_id] = seen
        clock.advance(100)
    clock.advance(60_000 + 5_000 + 10_000)
    joiner.poll()
    assert joiner.join_due() == 6
    joiner.flush()
    assert joiner.stats.labels_lost == 0
    layout = TableLayout.REQUEST if logging == "lazy" else TableLayout.IMPRESSION
    wh = ParquetWarehouse(str(tmp_path / "wh"), log.featureset, layout)
    rows = wh.read_examples()
    assert rows.num_rows == sum(len(v) for v in viewed.values())
    fs = log.featureset
    for rid, seen in viewed.items():
        feats, items, scores, user_id = sent[rid]
        mine = rows.filter(pc.equal(rows["request_id"], rid))
        assert mine["position"].to_pylist() == seen
        assert mine["item_id"].to_pylist() == items[seen].tolist()  # the raw ids, unchanged
        assert mine["user_id"].to_pylist() == [user_id] * len(seen)
        if scores is None:
            assert mine["score"].null_count == len(seen)
        else:  # the ranker's score at each viewed position, as float32
            np.testing.assert_array_equal(mine["score"].to_numpy(), scores[seen].astype(np.float32))
        # Frozen byte for byte: the request side once, each viewed item's row as the ranker scored it.
        np.testing.assert_array_equal(
            np.stack(mine["taste"].to_numpy(zero_copy_only=False)), np.tile(feats["taste"], (len(seen), 1))
        )
        np.testing.assert_array_equal(mine["price"].to_numpy(), feats["price"][seen].astype(np.float32))
        np.testing.assert_array_equal(
            np.stack(mine["look"].to_numpy(zero_copy_only=False)), feats["look"][seen]
        )
        assert mine["bought"].to_pylist()[0] == feats["bought"].tolist()
        assert all(mine["click"].to_pylist())
    assert set(fs.layout(Side.REQUEST).names) <= set(rows.column_names)


@pytest.fixture
def shop_log(shop_toml: str):
    def opened(**settings: object):
        return leanrec.open_logging(parse_featureset(shop_toml), clock=ManualClock(T0), **settings)

    return opened


@pytest.mark.parametrize(
    ("change", "message", "status"),
    [
        (lambda f: f.pop("price"), r"feature price \(item, one row per item\) is missing", 422),
        (lambda f: f.update(look=f["look"][:, :7]), "feature look: expected 40 rows of 8, got 40x7", 422),
        (lambda f: f.update(taste=np.zeros(9)), "feature taste: expected 8 values, got 9", 422),
        (lambda f: f.update(region=np.array(2.5)), "feature region holds ids: expected integers", 422),
        (lambda f: f.update(price=np.array(["a"] * 40)), "feature price is dense: expected numbers", 422),
        (lambda f: f.update(colour=np.zeros(40)), "feature colour is not in FeatureSet shop v1", 422),
        # ids are raw int64: an unsigned id past 2**63 is refused, never wrapped into a negative one
        (
            lambda f: f.update(sku=np.full(40, 2**63 + 3, np.uint64)),
            r"feature sku: ids are int64, got 9223372036854775811; give unsigned ids past 2\*\*63",
            422,
        ),
        # ... and so is an id beyond 64 bits either way
        (
            lambda f: f.update(region=np.asarray(-(2**63) - 1)),
            r"feature region\W.*(int64|integers)",
            422,
        ),
        # strings only where the feature declares string ids
        (
            lambda f: f.update(bought=np.array(["sku-1"] * 12)),
            "feature bought holds ids: expected integers, got <U5",
            422,
        ),
    ],
)
def test_arrays_that_do_not_match_the_featureset_are_refused_naming_the_feature(
    change, message: str, status: int, shop_log, shop_features
) -> None:
    log = shop_log()
    rng = np.random.default_rng(0)
    items = rng.choice(5000, size=40, replace=False)
    good = log.ranked(1, items, shop_features(rng, items))
    feats = shop_features(rng, items)
    change(feats)
    with pytest.raises(FeatureInputError, match=message) as caught:
        log.ranked(2, items, feats)
    assert caught.value.status == status
    # Nothing accepted before is lost: the good request still paginates and takes events.
    assert log.paginate(good.request_id, good.token, 10) >= 1
    ok = log.events(
        good.request_id, good.token, [{"position": 3, "item_id": int(items[3]), "kind": "click", "ts_ms": T0}]
    )
    assert ok.accepted == 1


@pytest.mark.parametrize(
    ("user", "items", "message"),
    [
        (1, [5, -1, 7], "items: -1 is the padding id, not an item"),
        (1, np.array([5, 2**63], np.uint64), "items: ids are int64, got 9223372036854775808"),
        (1, [5, 2**63], r"items\W.*(int64|integer)"),  # beyond int64: refused, not wrapped
        (1, [5, 2**64], r"items\W.*(int64|integer)"),
        (1, ["sku-5", "sku-7"], 'string ids need an item_id feature declared with dtype = "string"'),
        ("alice", [5, 7], "user_id: expected a 64-bit integer, got 'alice'"),
        (2**63, [5, 7], "user_id: expected a 64-bit integer, got 9223372036854775808"),
        (True, [5, 7], "user_id: expected a 64-bit integer, got True"),
    ],
)
def test_ids_of_the_request_that_int64_cannot_hold_are_refused(
    user: object, items: object, message: str, shop_log, shop_features
) -> None:
    log = shop_log()
    rng = np.random.default_rng(2)
    good = np.array([5, 7] if len(items) == 2 else [5, 6, 7], np.int64)
    feats = shop_features(rng, good)
    feats.pop("sku")  # the item id feature is the items themselves
    with pytest.raises(FeatureInputError, match=message) as caught:
        log.ranked(user, items, {**feats, "sku": good})
    assert caught.value.status == 422
    # The same request with ids int64 holds, at both ends of the range, is logged.
    ends = np.array([2**63 - 1, -(2**63), -2][: len(good)], np.int64)
    assert log.ranked(-(2**63), ends, {**feats, "sku": ends}).n_items == len(good)


def test_a_list_over_the_limit_and_a_forged_token_are_refused(shop_log, shop_features) -> None:
    log = shop_log(max_items=30)
    rng = np.random.default_rng(1)
    items = rng.choice(5000, size=40, replace=False)
    with pytest.raises(FeatureInputError, match="40 ranked items, limit 30") as caught:
        log.ranked(1, items, shop_features(rng, items))
    assert caught.value.status == 413
    ok = log.ranked(1, items[:30], shop_features(rng, items[:30]))
    with pytest.raises(TokenError, match="for request"):
        log.paginate("another", ok.token, 5)
    with pytest.raises(ConfigError, match="logging must be lazy or eager"):
        shop_log(logging="off")
    with pytest.raises(ConfigError, match="unknown setting"):
        shop_log(window=5)


@pytest.mark.parametrize("logging", ["lazy", "eager"])
def test_an_event_naming_another_item_than_the_one_ranked_there(
    logging: str, shop_log, shop_features
) -> None:
    log = shop_log(logging=logging)
    rng = np.random.default_rng(5)
    items = rng.choice(5000, size=40, replace=False)
    logged = log.ranked(1, items, shop_features(rng, items))
    good = {"position": 2, "item_id": int(items[2]), "kind": "click", "ts_ms": T0}
    wrong = {**good, "position": 3}  # the item of position 2, reported at position 3
    result = log.events(logged.request_id, logged.token, [good, wrong], batch_id="b1")
    if logging == "lazy":  # the ranked list is held in the process: refused at once, and said why
        assert result.accepted == 1 and result.refused == {"wrong_item": 1}
        assert any("item_id is not the item ranked at its position" in m for m in result.messages)
    else:  # eager holds no list: accepted here, dropped and counted by the join
        assert result.accepted == 2 and result.refused == {}
