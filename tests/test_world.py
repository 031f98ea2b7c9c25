"""The synthetic world: reproducible, power-law popularity, scroll depth, engagement, drift."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from leanrec.schema import PAD_ID, FeatureBlock, Kind, Owner
from leanrec.world import HISTORY_LEN, World, WorldConfig, default_featureset


def _col(world: World, owner: Owner, name: str) -> np.ndarray:
    slot = world.featureset.owner_slots(owner)[name]
    block = world.store.blocks[owner]
    src = block.floats if slot.feature.is_float else block.ints
    return src[:, slot.offset : slot.stop].copy()


# ----------------------------------------------------------------------------------- reproducibility
def test_same_config_gives_the_same_world(small_world: World, small_config: WorldConfig) -> None:
    again = World(small_config)
    for owner in (Owner.USER, Owner.ITEM):
        assert again.store.blocks[owner].same_bytes(small_world.store.blocks[owner])
    assert np.array_equal(again.popularity, small_world.popularity)
    assert np.array_equal(again.item_category, small_world.item_category)
    assert np.array_equal(again.user_ids, small_world.user_ids)
    assert np.array_equal(again.item_ids, small_world.item_ids)
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    items = np.tile(small_world.item_ids[:100], (5, 1))
    users = small_world.user_ids[:5]
    ea, eb = small_world.engage(users, items, rng_a), again.engage(users, items, rng_b)
    assert np.array_equal(ea.click, eb.click)
    assert np.array_equal(ea.depth, eb.depth)


def test_another_seed_gives_another_world(small_world: World, small_config: WorldConfig) -> None:
    other = World(dataclasses.replace(small_config, seed=small_config.seed + 1))
    for owner in (Owner.USER, Owner.ITEM):
        a, b = other.store.blocks[owner], small_world.store.blocks[owner]
        assert a.floats.shape == b.floats.shape
        assert not np.array_equal(a.floats, b.floats)
    assert not np.array_equal(other.popularity, small_world.popularity)


def test_store_blocks_have_the_featureset_widths(small_world: World, small_config: WorldConfig) -> None:
    fs = small_world.featureset
    for owner, n in ((Owner.USER, small_config.n_users), (Owner.ITEM, small_config.n_items)):
        block = small_world.store.blocks[owner]
        assert (block.floats.shape, block.ints.shape) == ((n, fs.widths(owner)[0]), (n, fs.widths(owner)[1]))
        assert np.isfinite(block.floats).all()
    # row k of a block is the entity of raw id ids[owner][k], and its id feature says so
    assert np.array_equal(small_world.store.ids[Owner.ITEM], small_world.item_ids)
    assert np.array_equal(small_world.store.ids[Owner.USER], small_world.user_ids)
    assert np.array_equal(_col(small_world, Owner.ITEM, "i_id").ravel(), small_world.item_ids)
    assert np.array_equal(_col(small_world, Owner.USER, "u_id").ravel(), small_world.user_ids)


def _spread_raw_ids(ids: np.ndarray, what: str) -> None:
    """Distinct raw 64-bit ids, none the padding id, spread over int64 rather than numbering rows."""
    assert ids.dtype == np.int64, what
    assert len(np.unique(ids)) == len(ids), what
    assert not (ids == PAD_ID).any(), what
    assert not np.array_equal(np.sort(ids), np.arange(len(ids))), what
    assert (ids < 0).any() and (ids > 0).any(), what  # both halves of int64
    assert (np.abs(ids.astype(np.float64)) > 2.0**62).any(), what  # up to the top bits
    assert (np.abs(ids.astype(np.float64)) > 2.0**32).mean() > 0.99, what  # not small numbers


def test_user_item_and_creator_ids_are_raw_64_bit_ids(small_world: World, small_config: WorldConfig) -> None:
    w = small_world
    for ids, n, what in (
        (w.user_ids, small_config.n_users, "user"),
        (w.item_ids, small_config.n_items, "item"),
        (w.creator_ids, small_config.n_creators, "creator"),
    ):
        assert ids.shape == (n,), what
        _spread_raw_ids(ids, what)
    assert not np.intersect1d(w.user_ids, w.item_ids).size  # users and items are told apart
    assert not np.intersect1d(w.item_ids, w.creator_ids).size
    assert np.array_equal(w.users.rows(w.user_ids[::-1]), np.arange(small_config.n_users)[::-1])
    assert np.array_equal(w.items.rows(w.item_ids[[7, 3]]), [7, 3])
    with pytest.raises(KeyError, match="no item"):
        w.items.rows(np.arange(3))  # row numbers are not item ids
    creators = _col(w, Owner.ITEM, "i_creator").ravel()
    assert np.array_equal(creators, w.creator_ids[w.item_creator])


# Features holding the world's raw ids (of which entity); the others are small categorical ids.
RAW_ID_FEATURES = {
    "u_id": "user_ids",
    "i_id": "item_ids",
    "u_hist": "item_ids",
    "i_creator": "creator_ids",
    "u_hist_creator": "creator_ids",
}


def test_id_features_hold_raw_ids_or_stay_inside_their_rows(small_world: World) -> None:
    fs = small_world.featureset
    seen = set()
    for owner in (Owner.USER, Owner.ITEM):
        for name, slot in fs.owner_slots(owner).items():
            if slot.feature.is_float:
                continue
            ids = _col(small_world, owner, name)
            real = ids[ids != PAD_ID]
            assert real.size, name
            if name in RAW_ID_FEATURES:
                assert np.isin(real, getattr(small_world, RAW_ID_FEATURES[name])).all(), name
                seen.add(name)
            else:
                assert real.min() >= 0, name
                assert real.max() < slot.feature.rows, name
    assert seen == set(RAW_ID_FEATURES)
    # a history's categories and creators are those of its (raw) items
    hist = _col(small_world, Owner.USER, "u_hist")
    real = hist != PAD_ID
    rows = small_world.items.rows(hist[real])
    assert np.array_equal(_col(small_world, Owner.USER, "u_hist_cat")[real], small_world.item_category[rows])
    creators = small_world.creator_ids[small_world.item_creator[rows]]
    assert np.array_equal(_col(small_world, Owner.USER, "u_hist_creator")[real], creators)
    assert (_col(small_world, Owner.USER, "u_hist_cat")[~real] == PAD_ID).all()


# ----------------------------------------------------------------------------------- popularity
def test_popularity_has_a_power_law_tail(small_world: World) -> None:
    pop = np.sort(small_world.popularity)[::-1]
    assert pop.sum() == pytest.approx(1.0)
    top = int(len(pop) * 0.01)
    assert pop[:top].sum() > 0.3  # the top 1% hold a large share (uniform would be 1%)
    assert pop[: len(pop) // 2].sum() > 0.85
    ranks = np.arange(1, len(pop) + 1)
    slope = np.polyfit(np.log(ranks), np.log(pop), 1)[0]
    assert slope == pytest.approx(-small_world.config.popularity_exponent, abs=0.05)


def test_view_counters_follow_popularity(small_world: World) -> None:
    views = _col(small_world, Owner.ITEM, "i_views_log").ravel()
    order = np.argsort(-small_world.popularity)
    top, bottom = views[order[:30]], views[order[-300:]]
    assert top.mean() > bottom.mean() + 3  # log views: the head is viewed 20 times as much and more


# ----------------------------------------------------------------------------------- scroll depth
def test_scroll_depth_median_about_six_with_a_long_tail(small_world: World) -> None:
    assert small_world.config.scroll_median == WorldConfig().scroll_median
    assert small_world.config.scroll_sigma == WorldConfig().scroll_sigma
    depth = small_world.sample_depth(20_000, np.random.default_rng(0), 100)
    assert depth.dtype == np.int32
    assert 5 <= np.median(depth) <= 7
    assert depth.min() >= 1
    assert depth.max() <= 100
    assert (depth >= 50).any()
    assert (depth <= 12).mean() > 0.7  # steep decay: most sessions stop early
    assert (depth >= 50).mean() < 0.05


def test_scroll_depth_is_clipped_to_the_list(small_world: World) -> None:
    depth = small_world.sample_depth(5_000, np.random.default_rng(1), 10)
    assert depth.max() == 10
    assert depth.min() >= 1


# ----------------------------------------------------------------------------------- engagement
def _traffic(world: World, b: int = 200, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Raw ids of ``b`` distinct users, each shown 100 random items (raw ids)."""
    rng = np.random.default_rng(seed)
    users = rng.choice(world.config.n_users, b, replace=False)
    items = np.stack([rng.choice(world.config.n_items, 100, replace=False) for _ in range(b)])
    return world.user_ids[users], world.item_ids[items]


def _feed(world: World, repeats: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Every user ``repeats`` times, each shown the 100 items the oracle ranks highest for them.

    Engagement is calibrated on what a feed shows; on random items clicks are a few percent of
    views and a like or a share may not be drawn at all.
    """
    users = np.tile(world.user_ids, repeats)
    p = world.click_probability(world.user_ids, world.item_ids[None, :])
    return users, np.tile(world.item_ids[np.argsort(-p, axis=1)[:, :100]], (repeats, 1))


def test_engagement_only_on_viewed_positions(small_world: World) -> None:
    users, items = _feed(small_world)
    eng = small_world.engage(users, items, np.random.default_rng(4))
    assert eng.viewed.shape == eng.click.shape == (len(users), 100)
    # viewed is exactly the prefix of length depth
    assert np.array_equal(eng.viewed, np.arange(100)[None, :] < eng.depth[:, None])
    assert not (eng.click & ~eng.viewed).any()
    assert not (eng.like & ~eng.click).any()
    assert not (eng.share & ~eng.click).any()  # a share is of a play, liked or not (KuaiRand's is_forward)
    assert not (eng.hide & ~eng.viewed).any()
    assert not (eng.hide & eng.click).any()
    assert ((eng.watch_ms > 0) == eng.click).all()
    # Each signal is drawn, so none of the above holds vacuously. Over 10 world seeds, on 6,700 to
    # 8,200 views of 800 requests: 3,300 to 4,500 clicks, 220 to 440 likes, 14 to 27 shares (12 to 26
    # of them without a like), 11 to 20 hides.
    for drawn in (eng.click, eng.like, eng.share, eng.share & ~eng.like, eng.hide):
        assert drawn.sum() > 0
    assert ((eng.p_click > 0) & (eng.p_click < 1)).all()


def test_clicks_follow_the_oracle(small_world: World) -> None:
    users, items = _traffic(small_world, b=400, seed=5)
    eng = small_world.engage(users, items, np.random.default_rng(6))
    v = eng.viewed
    hi = eng.p_click[v] > np.median(eng.p_click[v])
    clicks = eng.click[v]
    assert clicks[hi].mean() > 2 * clicks[~hi].mean()


def test_apply_moves_counters_of_viewed_items_only(small_world: World) -> None:
    users, items = _traffic(small_world, b=50)
    eng = small_world.engage(users, items, np.random.default_rng(7))
    before = _col(small_world, Owner.ITEM, "i_views_log").ravel()
    small_world.apply(users, items, eng)
    after = _col(small_world, Owner.ITEM, "i_views_log").ravel()
    viewed = np.unique(small_world.items.rows(items[eng.viewed]))
    unviewed = np.setdiff1d(np.arange(small_world.config.n_items), viewed)
    assert len(viewed) > 0
    assert (after[viewed] > before[viewed]).all()
    assert np.array_equal(after[unviewed].view(np.uint32), before[unviewed].view(np.uint32))


def test_apply_prepends_clicks_to_the_history_of_users_who_clicked(small_world: World) -> None:
    users, items = _traffic(small_world, b=60, seed=8)
    eng = small_world.engage(users, items, np.random.default_rng(9))
    hist_before = _col(small_world, Owner.USER, "u_hist")
    cat_before = _col(small_world, Owner.USER, "u_hist_cat")
    small_world.apply(users, items, eng)
    hist_after = _col(small_world, Owner.USER, "u_hist")
    cat_after = _col(small_world, Owner.USER, "u_hist_cat")
    clicked_any = eng.click.any(axis=1)
    assert clicked_any.sum() > 0
    assert (~clicked_any).sum() > 0
    rows = small_world.users.rows(users)
    for r, u in enumerate(rows):
        if clicked_any[r]:
            new = items[r][eng.click[r]][::-1]  # most recent click first, as raw item ids
            want = np.concatenate([new, hist_before[u]])[:HISTORY_LEN]
            assert np.array_equal(hist_after[u], want)
            real = hist_after[u] != PAD_ID
            item_rows = small_world.items.rows(hist_after[u][real])
            assert np.array_equal(cat_after[u][real], small_world.item_category[item_rows])
        else:
            assert np.array_equal(hist_after[u], hist_before[u])
            assert np.array_equal(cat_after[u], cat_before[u])
    untouched = np.setdiff1d(np.arange(small_world.config.n_users), rows)
    assert np.array_equal(hist_after[untouched], hist_before[untouched])


def test_world_refuses_a_corpus_too_small_to_retrieve_from() -> None:
    with pytest.raises(ValueError, match="1,000 items"):
        World(WorldConfig(n_users=10, n_items=999, n_creators=40))


def test_id_effect_moves_only_each_items_click_logit(small_world: World, small_config: WorldConfig) -> None:
    """An id effect changes the click logit by a per-item constant and nothing the features show."""
    effect = World(dataclasses.replace(small_config, id_effect=1.0))
    for owner in (Owner.USER, Owner.ITEM):
        assert effect.store.blocks[owner].same_bytes(small_world.store.blocks[owner])
    assert np.array_equal(effect.popularity, small_world.popularity)
    items = np.tile(small_world.item_ids[:200], (4, 1))
    users = small_world.user_ids[:4]
    p0, p1 = small_world.click_probability(users, items), effect.click_probability(users, items)
    shift = np.log(p1 / (1 - p1)) - np.log(p0 / (1 - p0))  # (4, 200): the same per item for every user
    np.testing.assert_allclose(shift, np.broadcast_to(shift[0], shift.shape), atol=1e-6)
    assert 0.8 < shift[0].std() < 1.2  # about the declared spread, one draw per item
    assert not small_world.item_effect.any()  # the default world has none


def test_world_refuses_a_negative_id_effect(small_config: WorldConfig) -> None:
    with pytest.raises(ValueError, match="id_effect must be at least 0"):
        World(dataclasses.replace(small_config, id_effect=-0.5))


# ----------------------------------------------------------------------------------- scale fillers
def test_extra_noise_adds_that_many_noise_features_after_the_demo_ones(small_config: WorldConfig) -> None:
    base_fs, base_noise = default_featureset(small_config)
    assert small_config.extra_noise == 0
    assert len(base_fs) == 212 and len(base_noise) == 142  # the demo's own, as documented
    assert not any(f.name.startswith("x_") for f in base_fs.features)
    fs, noise = default_featureset(dataclasses.replace(small_config, extra_noise=301))
    assert len(fs) == len(base_fs) + 301
    assert fs.features[: len(base_fs)] == base_fs.features  # appended: the demo's layout prefix is kept
    extra = fs.features[len(base_fs) :]
    assert {f.name for f in extra} <= noise
    assert noise - {f.name for f in extra} == base_noise
    owners = {(f.owner, f.kind) for f in extra}
    assert owners == {(Owner.USER, Kind.DENSE), (Owner.ITEM, Kind.DENSE), (Owner.USER, Kind.SPARSE)}
    assert sum(f.name.startswith("x_user_") for f in extra) > 0.8 * 301
    with pytest.raises(ValueError, match="extra_noise"):
        default_featureset(dataclasses.replace(small_config, extra_noise=-1))


def test_extra_noise_is_filled_and_stays_on_apply(small_config: WorldConfig) -> None:
    plain = World(small_config)
    world = World(dataclasses.replace(small_config, extra_noise=60))
    for owner in (Owner.USER, Owner.ITEM):  # the demo's features and truth are drawn as without fillers
        got = world.store.blocks[owner]
        want = plain.store.blocks[owner]
        fw, iw = want.floats.shape[1], want.ints.shape[1]
        assert FeatureBlock(got.floats[:, :fw].copy(), got.ints[:, :iw].copy()).same_bytes(want)
    users, items = _traffic(world, b=50)
    eng = world.engage(users, items, np.random.default_rng(7))
    names = ("x_user_00000", "x_uid_00000", "x_item_00000")
    before = {n: _col(world, Owner.ITEM if n.startswith("x_item") else Owner.USER, n) for n in names}
    for n, col in before.items():
        assert np.unique(col).size > 100, n  # noise, not a constant
        assert world.featureset[n].rarely, n
    uid = world.featureset["x_uid_00000"]
    assert before["x_uid_00000"].min() >= 0 and before["x_uid_00000"].max() < uid.rows
    world.apply(users, items, eng)
    for n, col in before.items():
        assert np.array_equal(_col(world, Owner.ITEM if n.startswith("x_item") else Owner.USER, n), col), n


def test_engagement_moves_no_feature_declared_rarely(small_world: World) -> None:
    """What the FeatureSet declares slow is what the world never updates: the deduplicated layouts
    store such a row once, and a declaration that claimed a moving feature would lose its moves."""
    world = copy.deepcopy(small_world)
    users, items = _feed(world)
    before = {o: copy.deepcopy(world.store.blocks[o]) for o in (Owner.USER, Owner.ITEM)}
    world.apply(users, items, world.engage(users, items, np.random.default_rng(5)))
    moved, slow = set(), set()
    for owner, block in before.items():
        for name, slot in world.featureset.owner_slots(owner).items():
            src = block.floats if slot.feature.is_float else block.ints
            if not np.array_equal(_col(world, owner, name), src[:, slot.offset : slot.stop]):
                moved.add(name)
            if slot.feature.rarely:
                slow.add(name)
    assert {"u_act_00", "u_hist", "u_hist_age", "i_views_log", "i_click_rate"} <= moved
    assert {"u_noise_00", "u_emb_2", "u_country", "i_noise_emb", "i_id"} <= slow
    assert not moved & slow, sorted(moved & slow)
