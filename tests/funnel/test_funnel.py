"""The ranking funnel: 100 distinct items in score order, and the exact features it scored."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from leanrec.funnel import Funnel, RankedBatch
from leanrec.schema import PAD_ID, Feature, FeatureBlock, FeatureSet, Kind, Owner, Side
from leanrec.world import World, WorldConfig

T_MS = 1_700_000_000_000


def _rank(world: World, users: np.ndarray, funnel: Funnel | None = None) -> RankedBatch:
    funnel = funnel or Funnel(world)
    b = len(users)
    return funnel.rank(users, T_MS + np.arange(b) * 3_600_000, np.arange(b) % 3)


def _users(world: World, rows: list[int] | np.ndarray) -> np.ndarray:
    """Raw ids of the world's users of these rows."""
    return world.user_ids[np.asarray(rows)]


@pytest.fixture
def users(small_world: World) -> np.ndarray:
    return _users(small_world, [0, 17, 17, 399, 123, 250])  # a user twice: two requests, same features


def test_rank_returns_100_distinct_items_per_request_in_score_order(small_world: World, users) -> None:
    batch = _rank(small_world, users)
    assert len(batch) == len(users)
    assert batch.n_items == 100
    assert batch.item_ids.shape == batch.scores.shape == (len(users), 100)
    assert batch.item_ids.dtype == np.int64
    assert np.array_equal(batch.user_ids, users)
    for row in batch.item_ids:
        assert len(np.unique(row)) == 100
        assert np.isin(row, small_world.item_ids).all()  # raw ids of the world's items
    assert (np.diff(batch.scores, axis=1) <= 0).all()
    assert np.isfinite(batch.scores).all()


def test_returned_blocks_equal_the_store_rows_at_rank_time(small_world: World, users) -> None:
    fs = small_world.featureset
    batch = _rank(small_world, users)
    assert batch.request.floats.shape == (len(users), fs.layout(Side.REQUEST).float_width)
    assert batch.request.ints.shape == (len(users), fs.layout(Side.REQUEST).int_width)
    assert batch.items.floats.shape == (len(users) * 100, fs.layout(Side.ITEM).float_width)
    store = small_world.store
    context = small_world.context_block(T_MS + np.arange(len(users)) * 3_600_000, np.arange(len(users)) % 3)
    want_request = FeatureBlock.hstack([store.get_many(Owner.USER, users), context])
    assert batch.request.same_bytes(want_request)
    want_items = store.get_many(Owner.ITEM, batch.item_ids.ravel())
    assert batch.items.same_bytes(want_items)
    # the item rows really are those items: their id feature says so
    i_id = fs.owner_slots(Owner.ITEM)["i_id"]
    assert np.array_equal(batch.items.ints[:, i_id.offset], batch.item_ids.ravel())


def test_the_funnel_returns_raw_item_ids_the_store_knows(small_world: World, users) -> None:
    batch = _rank(small_world, users)
    ids = batch.item_ids.ravel()
    assert ids.dtype == np.int64 and not (ids == PAD_ID).any()
    # not row numbers: a world's raw ids spread over int64, and rows are never among them
    assert (np.abs(ids.astype(np.float64)) > 2.0**32).all()
    assert not np.isin(ids, np.arange(small_world.config.n_items)).any()
    rows = small_world.store.rows(Owner.ITEM, ids)  # raises KeyError for an id the store lacks
    assert np.array_equal(small_world.item_ids[rows], ids)
    assert np.array_equal(small_world.items.rows(ids), rows)
    # the oracle and engagement take them as they are
    assert small_world.click_probability(batch.user_ids, batch.item_ids).shape == batch.item_ids.shape
    with pytest.raises(KeyError, match="no item"):
        small_world.store.get_many(Owner.ITEM, small_world.items.rows(ids[:3]))


def test_scores_are_the_scorers_scores_of_the_returned_features(small_world: World, users) -> None:
    funnel = Funnel(small_world)
    batch = _rank(small_world, users, funnel)
    again = funnel.scorer.score(batch.request, batch.items, batch.n_items)
    assert np.allclose(again, batch.scores, rtol=1e-5, atol=1e-4)


def test_returned_blocks_are_copies_a_later_store_change_does_not_reach(small_world: World, users) -> None:
    batch = _rank(small_world, users)
    want_request, want_items = batch.request.copy(), batch.items.copy()
    store = small_world.store
    for owner in (Owner.USER, Owner.ITEM):
        block = store.blocks[owner]
        assert not np.shares_memory(batch.request.floats, block.floats)
        assert not np.shares_memory(batch.items.floats, block.floats)
        assert not np.shares_memory(batch.items.ints, block.ints)
    # overwrite every row the ranking read, then let traffic move the world too
    items = np.unique(batch.item_ids)
    junk = store.get_many(Owner.ITEM, items)
    junk.floats[:] = 42.0
    junk.ints[:] = 3
    store.put_many(Owner.ITEM, items, junk)
    ujunk = store.get_many(Owner.USER, users)
    ujunk.floats[:] = -7.0
    store.put_many(Owner.USER, users, ujunk)
    assert (store.get_many(Owner.ITEM, batch.item_ids[0]).floats == 42.0).all()
    eng = small_world.engage(batch.user_ids, batch.item_ids, np.random.default_rng(0))
    small_world.apply(batch.user_ids, batch.item_ids, eng)
    assert batch.request.same_bytes(want_request)
    assert batch.items.same_bytes(want_items)


def test_same_world_same_ranking(small_world: World, users) -> None:
    a = _rank(small_world, users)
    b = _rank(small_world, users)
    assert np.array_equal(a.item_ids, b.item_ids)
    # a user ranked twice in one batch at different times: the request rows differ only by context
    assert np.array_equal(a.request.floats[1], a.request.floats[2])


def test_ranking_is_personal(small_world: World) -> None:
    batch = _rank(small_world, _users(small_world, [1, 2, 3, 4]))
    overlaps = [len(np.intersect1d(batch.item_ids[0], row)) for row in batch.item_ids[1:]]
    assert min(overlaps) < 100


def test_ranking_favours_what_the_user_would_click(small_world: World) -> None:
    rng = np.random.default_rng(2)
    users = _users(small_world, rng.choice(small_world.config.n_users, 40, replace=False))
    batch = _rank(small_world, users)
    ranked_p = small_world.click_probability(users, batch.item_ids).mean()
    random_items = np.stack([rng.choice(small_world.item_ids, 100, replace=False) for _ in users])
    random_p = small_world.click_probability(users, random_items).mean()
    assert ranked_p > 1.5 * random_p


def _head_share(world: World, item_ids: np.ndarray, head: float = 1 / 16) -> float:
    """Share of ranked slots that go to the ``head`` most popular fraction of the corpus."""
    top = world.item_ids[np.argsort(-world.popularity)[: round(head * world.config.n_items)]]
    return float(np.isin(item_ids, top).mean())


def test_exposure_popularity_piles_rankings_up_on_popular_items(small_config: WorldConfig) -> None:
    users = np.arange(0, 400, 5)
    plain = World(small_config)
    popular = World(dataclasses.replace(small_config, exposure_popularity=1.0))
    a, b = _rank(plain, _users(plain, users)), _rank(popular, _users(popular, users))
    # A small corpus (retrieval takes a third of it) mutes the term: 1.6x to 2x on seeds 11 to 13.
    assert _head_share(popular, b.item_ids) > 1.4 * _head_share(plain, a.item_ids)
    assert len(np.unique(b.item_ids)) < len(np.unique(a.item_ids))  # fewer items shown at all
    # Retrieval only: the features and everything the world draws stay as they were.
    for owner in (Owner.USER, Owner.ITEM):
        assert popular.store.blocks[owner].same_bytes(plain.store.blocks[owner])


def test_exposure_popularity_zero_is_the_plain_funnel(small_config: WorldConfig, users) -> None:
    plain = World(small_config)
    zero = World(dataclasses.replace(small_config, exposure_popularity=0.0))
    assert np.array_equal(_rank(plain, users).item_ids, _rank(zero, users).item_ids)


def test_world_refuses_a_negative_exposure_popularity(small_config: WorldConfig) -> None:
    with pytest.raises(ValueError, match="exposure_popularity must be at least 0"):
        World(dataclasses.replace(small_config, exposure_popularity=-1.0))


@pytest.mark.parametrize(("n_retrieve", "n_rank"), [(1000, 0), (50, 100), (5000, 100)])
def test_funnel_refuses_impossible_sizes(small_world: World, n_retrieve: int, n_rank: int) -> None:
    with pytest.raises(ValueError, match="n_rank"):
        Funnel(small_world, n_retrieve=n_retrieve, n_rank=n_rank)


def test_smaller_funnel(small_world: World) -> None:
    batch = Funnel(small_world, n_retrieve=200, n_rank=20).rank(
        _users(small_world, [5, 6]), np.array([0, 0]), np.array([0, 1])
    )
    assert batch.item_ids.shape == (2, 20)
    assert len(batch.items) == 40
    assert all(len(np.unique(r)) == 20 for r in batch.item_ids)


# --------------------------------------------------------------------------- a retired FeatureSet
RETIRED = {
    "u_taste_03": "audit",  # the stand-in's own inputs: it must do without them
    "i_taste_07": "audit",
    "i_click_rate": "audit",
    "u_noise_05": "noise",
    "u_emb_2": "stale",
    "u_hist_age": "no gain",
    "c_dow": "no gain",
    "i_noise_emb": "stale",
    "i_tags": "no gain",
}


def test_a_pruned_funnel_returns_the_full_rankings_columns_of_its_featureset(
    small_world: World, users: np.ndarray
) -> None:
    fs = small_world.featureset
    pruned = fs.retire(RETIRED)
    funnel = Funnel(small_world, featureset=pruned)
    assert funnel.fs is pruned
    got, full = _rank(small_world, users, funnel), _rank(small_world, users)
    req, item = pruned.layout(Side.REQUEST), pruned.layout(Side.ITEM)
    assert got.request.floats.shape == (len(users), req.float_width)
    assert got.request.ints.shape == (len(users), req.int_width)
    assert got.items.floats.shape == (len(users) * 100, item.float_width)
    assert got.items.ints.shape == (len(users) * 100, item.int_width)
    assert got.request.same_bytes(pruned.project(full.request, fs, Side.REQUEST))
    # retrieval and the early ranker are untouched: the same 100 items, maybe in another late order
    by_id = np.argsort(got.item_ids, axis=1)
    full_by_id = np.argsort(full.item_ids, axis=1)
    assert np.array_equal(
        np.take_along_axis(got.item_ids, by_id, 1), np.take_along_axis(full.item_ids, full_by_id, 1)
    )
    rows = (by_id + 100 * np.arange(len(users))[:, None]).ravel()
    full_rows = (full_by_id + 100 * np.arange(len(users))[:, None]).ravel()
    want = pruned.project(full.items.take(full_rows), fs, Side.ITEM)
    assert got.items.take(rows).same_bytes(want)
    # the scores are those of the returned (pruned) blocks
    again = funnel.scorer.score(got.request, got.items, got.n_items)
    assert np.allclose(again, got.scores, rtol=1e-5, atol=1e-4)


def test_the_stand_in_still_ranks_well_without_some_of_its_inputs(small_world: World) -> None:
    pruned = small_world.featureset.retire(RETIRED)
    rng = np.random.default_rng(2)
    users = _users(small_world, rng.choice(small_world.config.n_users, 40, replace=False))
    batch = _rank(small_world, users, Funnel(small_world, featureset=pruned))
    ranked_p = small_world.click_probability(users, batch.item_ids).mean()
    random_items = np.stack([rng.choice(small_world.item_ids, 100, replace=False) for _ in users])
    assert ranked_p > 1.5 * small_world.click_probability(users, random_items).mean()


def test_the_stand_in_of_the_worlds_featureset_is_the_default_one(small_world: World, users) -> None:
    a = _rank(small_world, users, Funnel(small_world, featureset=small_world.featureset))
    b = _rank(small_world, users)
    assert np.array_equal(a.item_ids, b.item_ids) and np.array_equal(a.scores, b.scores)
    assert a.request.same_bytes(b.request) and a.items.same_bytes(b.items)


def test_a_funnel_refuses_a_featureset_not_cut_from_the_worlds(small_world: World) -> None:
    fs = small_world.featureset
    with pytest.raises(ValueError, match="another lineage"):
        Funnel(small_world, featureset=FeatureSet("other", 2, fs.features))
    added = FeatureSet(fs.name, 2, (*fs.features, Feature("u_new", Owner.USER, Kind.DENSE)))
    with pytest.raises(ValueError, match=r"not a retirement of the world's demo v1: .*\['u_new'\]"):
        Funnel(small_world, featureset=added)
