"""Eager and lazy feature loggers, paging, log-on-touch, fetch, and the context cache."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from leanrec.clock import ManualClock
from leanrec.energy import CostLedger
from leanrec.events import EventBatch, EventKind, MemoryEventBus, RequestOpened, RequestRef
from leanrec.featurelog import ContextCache, EagerLogger, LazyLogger, Paging, RequestContext, codec, key
from leanrec.funnel import Funnel, RankedBatch
from leanrec.schema import FeatureBlock, Owner, Side
from leanrec.stores import MemoryTransientStore
from leanrec.world import World

START_MS = 1_700_000_000_000
TTL_MS = 900_000
N_ITEMS = 100

# Page of each of 100 positions, written out: a head of 6, then pages of 9.
PAGE_BY_HAND = [0] * 6 + [p for p in range(1, 12) for _ in range(9)][:94]


@dataclass
class Ranked:
    world: World
    refs: list[RequestRef]
    batch: RankedBatch
    saved: RankedBatch  # an independent copy of what was scored


def _copy(batch: RankedBatch) -> RankedBatch:
    return RankedBatch(
        batch.user_ids.copy(),
        batch.item_ids.copy(),
        batch.scores.copy(),
        batch.request.copy(),
        batch.items.copy(),
    )


def _rank(world: World, n_requests: int, now_ms: int = START_MS, seed: int = 0) -> Ranked:
    rng = np.random.default_rng(seed)
    users = world.user_ids[rng.choice(world.config.n_users, n_requests, replace=False)]  # raw ids
    batch = Funnel(world).rank(users, np.full(n_requests, now_ms), rng.integers(0, 3, n_requests))
    refs = [RequestRef(f"req-{seed}-{b}", int(users[b]), now_ms, batch.n_items) for b in range(n_requests)]
    return Ranked(world, refs, batch, _copy(batch))


@pytest.fixture
def ranked(small_world: World) -> Ranked:
    return _rank(small_world, 3)


@dataclass
class Rig:
    clock: ManualClock
    store: MemoryTransientStore
    bus: MemoryEventBus
    ledger: CostLedger
    contexts: ContextCache | None
    logger: EagerLogger | LazyLogger


def _lazy(
    world: World,
    max_context_bytes: int = 1 << 30,
    idle_ms: int = 120_000,
    store_bytes: int = 1 << 30,
    lookahead: int = 2,
) -> Rig:
    clock, ledger = ManualClock(START_MS), CostLedger()
    store = MemoryTransientStore(max_bytes=store_bytes, clock=clock)
    bus = MemoryEventBus()
    contexts = ContextCache(max_context_bytes, idle_ms, 600_000, clock, ledger)
    logger = LazyLogger(world.featureset, store, bus, ledger, TTL_MS, contexts, Paging(6, 9), lookahead)
    return Rig(clock, store, bus, ledger, contexts, logger)


def _eager(world: World) -> Rig:
    clock, ledger = ManualClock(START_MS), CostLedger()
    store = MemoryTransientStore(clock=clock)
    bus = MemoryEventBus()
    return Rig(clock, store, bus, ledger, None, EagerLogger(world.featureset, store, bus, ledger, TTL_MS))


def _opened(rig: Rig) -> dict[str, RequestOpened]:
    return {m.request_id: m for _, m in rig.bus.consume(10_000) if isinstance(m, RequestOpened)}


def _items_of(batch: RankedBatch, b: int, positions: np.ndarray | slice) -> FeatureBlock:
    n = batch.n_items
    return batch.items.take(slice(b * n, (b + 1) * n)).take(positions)


def _lazy_held(rig: Rig, rid: str) -> set[str]:
    """Suffixes of the request's lazy entries the store holds."""
    names = ["u"] + [f"p{p}" for p in range(12)] + [f"i{p}" for p in range(N_ITEMS)]
    values = rig.store.get_many([key(rid, s) for s in names])
    return {s for s, v in zip(names, values, strict=True) if v is not None}


def _click(rid: str, positions: list[int], item_ids: np.ndarray, ts_ms: int = START_MS + 1_000) -> EventBatch:
    n = len(positions)
    return EventBatch(
        rid,
        np.array(positions, np.int32),
        item_ids[positions].astype(np.int64),
        np.full(n, EventKind.CLICK, np.int8),
        np.full(n, ts_ms, np.int64),
        np.zeros(n, np.float32),
    )


# ----------------------------------------------------------------------------------- paging
def test_paging_head_then_pages_of_nine() -> None:
    paging = Paging()
    assert (paging.head, paging.size) == (6, 9)
    assert paging.page_of(np.arange(100)).tolist() == PAGE_BY_HAND
    assert paging.page_of(np.array([0, 5, 6, 14, 15, 96, 99])).tolist() == [0, 0, 1, 1, 2, 11, 11]
    assert paging.bounds(0, 100) == (0, 6)
    assert paging.bounds(1, 100) == (6, 15)
    assert paging.bounds(2, 100) == (15, 24)
    assert paging.bounds(11, 100) == (96, 100)  # the last page is short
    assert paging.count(100) == 12
    assert (paging.count(1), paging.count(6), paging.count(7), paging.count(15), paging.count(16)) == (
        1,
        1,
        2,
        2,
        3,
    )


def test_pages_tile_the_list() -> None:
    paging = Paging()
    covered = []
    for page in range(paging.count(100)):
        start, stop = paging.bounds(page, 100)
        covered.extend(range(start, stop))
        assert set(paging.page_of(np.arange(start, stop)).tolist()) == {page}
    assert covered == list(range(100))


def test_key_format_is_hash_tagged_by_request() -> None:
    assert key("abc-1", "u") == "lr:{abc-1}:u"
    assert key("abc-1", "p7") == "lr:{abc-1}:p7"


# ----------------------------------------------------------------------------------- eager
def test_eager_logs_every_ranked_item_with_user_and_item_features(ranked: Ranked) -> None:
    rig = _eager(ranked.world)
    rig.logger.log_ranked(ranked.refs, ranked.batch)
    stats = rig.store.stats()
    assert stats.writes == 3 * N_ITEMS
    assert stats.keys_held == 3 * N_ITEMS
    assert rig.logger.stats.entries_written == 3 * N_ITEMS
    fs = ranked.world.featureset
    for b, ref in enumerate(ranked.refs):
        blobs = rig.store.get_many([key(ref.request_id, f"i{p}") for p in range(N_ITEMS)])
        assert all(v is not None for v in blobs)
        positions, ids, request, items, scores = codec.decode_impressions(fs, blobs)
        assert np.array_equal(positions, np.arange(N_ITEMS))
        assert np.array_equal(ids, ranked.saved.item_ids[b])
        assert ids.dtype == np.int64 and np.isin(ids, ranked.world.item_ids).all()  # raw ids, as ranked
        assert (np.abs(ids) >= 2**31).any()  # ids no int32 holds survive the log
        assert np.array_equal(scores, ranked.saved.scores[b])
        repeated = FeatureBlock.concat([ranked.saved.request.take(slice(b, b + 1))] * N_ITEMS)
        assert request.same_bytes(repeated)
        assert items.same_bytes(_items_of(ranked.saved, b, slice(None)))
    opened = _opened(rig)
    assert set(opened) == {r.request_id for r in ranked.refs}
    assert {m.fs_version for m in opened.values()} == {fs.version}
    assert {m.n_items for m in opened.values()} == {N_ITEMS}


def test_eager_fetch_is_byte_exact(ranked: Ranked) -> None:
    rig = _eager(ranked.world)
    rig.logger.log_ranked(ranked.refs, ranked.batch)
    opened = _opened(rig)
    positions = np.array([99, 0, 7, 50])
    got = rig.logger.fetch(opened[ranked.refs[1].request_id], positions)
    assert got.found.all()
    assert np.array_equal(got.item_ids, ranked.saved.item_ids[1, positions])
    assert got.items.same_bytes(_items_of(ranked.saved, 1, positions))
    assert got.request is not None
    assert got.request.same_bytes(ranked.saved.request.take(slice(1, 2)))
    assert rig.logger.keys(opened[ranked.refs[1].request_id]) == [
        key(ranked.refs[1].request_id, f"i{p}") for p in range(N_ITEMS)
    ]


# ----------------------------------------------------------------------------------- lazy at rank time
def test_lazy_logs_request_side_once_and_the_head_only(ranked: Ranked) -> None:
    rig = _lazy(ranked.world)
    rig.logger.log_ranked(ranked.refs, ranked.batch)
    fs = ranked.world.featureset
    stats = rig.store.stats()
    assert stats.writes == 2 * len(ranked.refs)
    assert stats.keys_held == 2 * len(ranked.refs)
    for b, ref in enumerate(ranked.refs):
        assert _lazy_held(rig, ref.request_id) == {"u", "p0"}
        user_blob, head_blob = rig.store.get_many(
            [f"lr:{{{ref.request_id}}}:u", f"lr:{{{ref.request_id}}}:p0"]
        )
        assert user_blob is not None and head_blob is not None
        assert len(user_blob) == codec.HEADER_BYTES + fs.layout(Side.REQUEST).row_bytes
        assert codec.decode_request(fs, user_blob).same_bytes(ranked.saved.request.take(slice(b, b + 1)))
        head = codec.decode_page(fs, head_blob)
        assert head.first_position == 0
        assert np.array_equal(head.item_ids, ranked.saved.item_ids[b, :6])
        assert np.array_equal(head.scores, ranked.saved.scores[b, :6])
        assert head.block.same_bytes(_items_of(ranked.saved, b, slice(0, 6)))
    assert len(rig.contexts) == len(ranked.refs)
    opened = _opened(rig)
    assert rig.logger.keys(opened[ranked.refs[0].request_id]) == [key(ranked.refs[0].request_id, "u")] + [
        key(ranked.refs[0].request_id, f"p{p}") for p in range(12)
    ]


def test_lazy_writes_far_fewer_bytes_than_eager(ranked: Ranked) -> None:
    eager, lazy = _eager(ranked.world), _lazy(ranked.world)
    eager.logger.log_ranked(ranked.refs, ranked.batch)
    lazy.logger.log_ranked(ranked.refs, ranked.batch)
    # eager repeats the request side 100 times; lazy writes it once plus six item rows
    assert lazy.store.stats().bytes_written * 20 < eager.store.stats().bytes_written


# ----------------------------------------------------------------------------------- pagination
@pytest.mark.parametrize("seen_up_to", [0, 3, 4, 12, 13, 20, 50, 96, 97, 99])
def test_paginate_logs_exactly_the_pages_covering_seen_plus_lookahead(
    ranked: Ranked, seen_up_to: int
) -> None:
    rig = _lazy(ranked.world, lookahead=2)
    rig.logger.log_ranked(ranked.refs, ranked.batch)
    ref = ranked.refs[0]
    last = min(seen_up_to + 2, N_ITEMS - 1)
    want = set(PAGE_BY_HAND[: last + 1])
    writes = rig.store.stats().writes
    logged = rig.logger.paginate(ref, seen_up_to)
    assert logged == len(want - {0})
    assert rig.store.stats().writes == writes + logged
    assert _lazy_held(rig, ref.request_id) == {"u"} | {f"p{p}" for p in want}
    assert rig.logger.stats.pages_on_signal == logged
    for other in ranked.refs[1:]:
        assert _lazy_held(rig, other.request_id) == {"u", "p0"}
    # the same signal again logs nothing new
    assert rig.logger.paginate(ref, seen_up_to) == 0
    assert rig.store.stats().writes == writes + logged


def test_paginate_without_lookahead(ranked: Ranked) -> None:
    rig = _lazy(ranked.world, lookahead=0)
    rig.logger.log_ranked(ranked.refs, ranked.batch)
    ref = ranked.refs[0]
    assert rig.logger.paginate(ref, 5) == 0  # still inside the head
    assert rig.logger.paginate(ref, 6) == 1
    assert rig.logger.paginate(ref, 24) == 2  # pages 2 (15-23) and 3 (24-32)
    assert _lazy_held(rig, ref.request_id) == {"u", "p0", "p1", "p2", "p3"}


def test_lazy_pages_hold_the_features_as_scored(ranked: Ranked) -> None:
    """Pages logged later hold the rank-time bytes, whatever happened to the store and the batch since."""
    world = ranked.world
    rig = _lazy(world)
    rig.logger.log_ranked(ranked.refs, ranked.batch)
    # the feature store moves on, and the caller reuses the batch buffers
    touched = np.unique(ranked.saved.item_ids)
    garbage = world.store.get_many(Owner.ITEM, touched)
    garbage.floats[:] = 123.0
    garbage.ints[:] = 7
    world.store.put_many(Owner.ITEM, touched, garbage)
    ranked.batch.items.floats[:] = -1.0
    ranked.batch.request.ints[:] = -5
    rig.clock.advance(30_000)

    ref = ranked.refs[2]
    rig.logger.paginate(ref, 40)
    opened = _opened(rig)[ref.request_id]
    positions = np.arange(0, 43)
    got = rig.logger.fetch(opened, positions)
    assert got.found.all()
    assert np.array_equal(got.item_ids, ranked.saved.item_ids[2, positions])
    assert got.item_ids.dtype == np.int64 and (np.abs(got.item_ids) >= 2**31).any()
    assert got.items.same_bytes(_items_of(ranked.saved, 2, positions))
    assert got.request is not None
    assert got.request.same_bytes(ranked.saved.request.take(slice(2, 3)))


# ----------------------------------------------------------------------------------- log-on-touch
def test_touch_logs_the_page_of_an_event_when_no_signal_came(ranked: Ranked) -> None:
    rig = _lazy(ranked.world)
    rig.logger.log_ranked(ranked.refs, ranked.batch)
    ref = ranked.refs[1]
    writes = rig.store.stats().writes
    rig.logger.touch(ref, _click(ref.request_id, [50], ranked.saved.item_ids[1]))
    assert PAGE_BY_HAND[50] == 5
    assert _lazy_held(rig, ref.request_id) == {"u", "p0", "p5"}
    assert rig.store.stats().writes == writes + 1
    assert rig.logger.stats.pages_on_touch == 1
    assert rig.logger.stats.pages_on_signal == 0
    # touching logged pages again writes nothing
    assert Paging().bounds(5, N_ITEMS) == (42, 51)
    rig.logger.touch(ref, _click(ref.request_id, [42, 47, 50, 2], ranked.saved.item_ids[1]))
    assert rig.store.stats().writes == writes + 1
    # and the touched position can be joined byte for byte
    got = rig.logger.fetch(_opened(rig)[ref.request_id], np.array([50, 49]))
    assert got.found.tolist() == [True, True]
    assert got.items.same_bytes(_items_of(ranked.saved, 1, np.array([50, 49])))


def test_touch_with_no_events_logs_nothing(ranked: Ranked) -> None:
    rig = _lazy(ranked.world)
    rig.logger.log_ranked(ranked.refs, ranked.batch)
    writes = rig.store.stats().writes
    rig.logger.touch(ranked.refs[0], _click(ranked.refs[0].request_id, [], ranked.saved.item_ids[0]))
    assert rig.store.stats().writes == writes


def test_touch_logs_each_touched_page_once(ranked: Ranked) -> None:
    rig = _lazy(ranked.world)
    rig.logger.log_ranked(ranked.refs, ranked.batch)
    ref = ranked.refs[0]
    rig.logger.touch(ref, _click(ref.request_id, [99, 20, 21, 98, 7], ranked.saved.item_ids[0]))
    assert _lazy_held(rig, ref.request_id) == {"u", "p0", "p1", "p2", "p11"}
    assert rig.logger.stats.pages_on_touch == 3


# ----------------------------------------------------------------------------------- fetch
def test_fetch_is_byte_exact_for_logged_positions_and_not_found_for_the_rest(ranked: Ranked) -> None:
    rig = _lazy(ranked.world)
    rig.logger.log_ranked(ranked.refs, ranked.batch)
    ref = ranked.refs[0]
    rig.logger.paginate(ref, 10)  # pages 0 and 1: positions 0-14
    rig.logger.touch(ref, _click(ref.request_id, [60], ranked.saved.item_ids[0]))  # page 7: 60-68
    positions = np.array([0, 5, 6, 14, 15, 50, 59, 60, 68, 69, 99, 3])
    want = np.array([p <= 14 or 60 <= p <= 68 for p in positions])
    got = rig.logger.fetch(_opened(rig)[ref.request_id], positions)
    assert got.found.tolist() == want.tolist()
    assert np.array_equal(got.item_ids[want], ranked.saved.item_ids[0, positions[want]])
    assert (got.item_ids[~want] == -1).all()
    assert got.items.take(want).same_bytes(_items_of(ranked.saved, 0, positions[want]))
    assert not got.items.floats[~want].any()
    assert not got.items.ints[~want].any()
    assert got.request is not None
    assert got.request.same_bytes(ranked.saved.request.take(slice(0, 1)))


def test_fetch_of_a_request_never_logged_finds_nothing(ranked: Ranked) -> None:
    rig = _lazy(ranked.world)
    ghost = RequestOpened("never-ranked", 1, START_MS, N_ITEMS, ranked.world.featureset.version)
    got = rig.logger.fetch(ghost, np.array([0, 1, 50]))
    assert got.found.tolist() == [False, False, False]
    assert got.request is None
    assert got.item_ids.tolist() == [-1, -1, -1]


# ----------------------------------------------------------------------------------- contexts
def _context(world: World, rid: str, ts_ms: int, n: int = N_ITEMS) -> RequestContext:
    fs = world.featureset
    return RequestContext(
        RequestRef(rid, 0, ts_ms, n),
        world.item_ids[:n],
        np.linspace(1, 0, n, dtype=np.float32),
        fs.layout(Side.REQUEST).zeros(1),
        fs.layout(Side.ITEM).zeros(n),
        np.zeros(Paging().count(n), bool),
        ts_ms,
    )


def test_context_nbytes_counts_what_it_holds(small_world: World) -> None:
    fs = small_world.featureset
    ctx = _context(small_world, "a", START_MS)
    item_bytes = 8 + 4 + fs.layout(Side.ITEM).row_bytes  # int64 id, float32 score, features
    want = N_ITEMS * item_bytes + fs.layout(Side.REQUEST).row_bytes + 12
    assert ctx.nbytes == want


def test_byte_bound_evicts_the_least_recently_touched(small_world: World) -> None:
    clock, ledger = ManualClock(START_MS), CostLedger()
    size = _context(small_world, "x", START_MS).nbytes
    cache = ContextCache(int(2.5 * size), 600_000, 600_000, clock, ledger)
    cache.add(_context(small_world, "a", START_MS))
    clock.advance(1_000)
    cache.add(_context(small_world, "b", clock.now_ms()))
    clock.advance(1_000)
    assert cache.get("a") is not None  # a is now more recent than b
    cache.add(_context(small_world, "c", clock.now_ms()))
    assert len(cache) == 2
    assert cache.stats.evicted == 1
    assert cache.get("b") is None
    assert cache.get("a") is not None
    assert cache.get("c") is not None
    assert cache.stats.bytes_held == 2 * size
    assert cache.stats.peak_bytes <= int(2.5 * size)
    assert ledger["context"].ops == 1
    assert ledger["context"].byte_seconds_held == pytest.approx(size * 1.0)  # b lived one second


def test_idle_contexts_expire_and_release_their_memory(small_world: World) -> None:
    clock, ledger = ManualClock(START_MS), CostLedger()
    cache = ContextCache(1 << 30, idle_ms=10_000, max_age_ms=600_000, clock=clock, ledger=ledger)
    size = _context(small_world, "x", START_MS).nbytes
    cache.add(_context(small_world, "a", START_MS))
    cache.add(_context(small_world, "b", START_MS))
    clock.advance(6_000)
    assert cache.get("b") is not None  # b is touched, a is not
    clock.advance(3_999)
    assert cache.expire() == 0
    clock.advance(1)
    assert cache.expire() == 1  # a: idle 10 s
    assert cache.get("a") is None
    assert cache.stats.expired == 1
    assert cache.stats.bytes_held == size
    clock.advance(6_000)
    assert cache.expire() == 1  # b: idle 10 s since its touch
    assert len(cache) == 0
    assert cache.stats.expired == 2
    assert (cache.stats.held, cache.stats.bytes_held) == (0, 0)
    assert ledger["context"].byte_seconds_held == pytest.approx(size * 10.0 + size * 16.0)
    assert ledger["context"].byte_seconds_held > 0


def test_contexts_older_than_max_age_expire_even_if_touched(small_world: World) -> None:
    clock, ledger = ManualClock(START_MS), CostLedger()
    cache = ContextCache(1 << 30, idle_ms=10_000, max_age_ms=25_000, clock=clock, ledger=ledger)
    cache.add(_context(small_world, "a", START_MS))
    for _ in range(4):
        clock.advance(6_000)
        assert cache.get("a") is not None
        assert cache.expire() == 0
    clock.advance(1_000)
    assert cache.expire() == 1


@pytest.mark.parametrize("bad", [(0, 1, 1), (1, 0, 1), (1, 1, 0), (-5, 1, 1)])
def test_context_bounds_must_be_positive(bad: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match="positive"):
        ContextCache(*bad, clock=ManualClock(), ledger=CostLedger())


def test_lazy_logger_tick_expires_idle_contexts_and_charges_the_ledger(ranked: Ranked) -> None:
    rig = _lazy(ranked.world, idle_ms=20_000)
    rig.logger.log_ranked(ranked.refs, ranked.batch)
    assert rig.contexts.stats.bytes_held > 0
    held = rig.contexts.stats.bytes_held
    rig.clock.advance(19_999)
    rig.logger.tick()
    assert len(rig.contexts) == 3
    rig.clock.advance(1)
    rig.logger.tick()
    assert len(rig.contexts) == 0
    assert rig.contexts.stats.expired == 3
    assert rig.contexts.stats.bytes_held == 0
    assert rig.ledger["context"].byte_seconds_held == pytest.approx(held * 20.0)
    # a signal for an expired context cannot log its pages any more, and says so
    assert rig.logger.paginate(ranked.refs[0], 30) == 0
    assert rig.logger.stats.signals_after_release == 1
    assert _lazy_held(rig, ranked.refs[0].request_id) == {"u", "p0"}


def test_context_with_every_page_logged_is_released_as_completed(ranked: Ranked) -> None:
    rig = _lazy(ranked.world)
    rig.logger.log_ranked(ranked.refs, ranked.batch)
    size = rig.contexts.stats.bytes_held // 3
    rig.clock.advance(5_000)
    rig.logger.paginate(ranked.refs[0], 97)
    assert rig.contexts.stats.completed == 1
    assert len(rig.contexts) == 2
    assert rig.contexts.stats.bytes_held == 2 * size
    assert rig.ledger["context"].byte_seconds_held == pytest.approx(size * 5.0)
    assert _lazy_held(rig, ranked.refs[0].request_id) == {"u"} | {f"p{p}" for p in range(12)}


def test_context_completed_by_touch_and_signal_together(ranked: Ranked) -> None:
    rig = _lazy(ranked.world)
    rig.logger.log_ranked(ranked.refs, ranked.batch)
    ref = ranked.refs[1]
    rig.logger.touch(ref, _click(ref.request_id, [99], ranked.saved.item_ids[1]))
    assert rig.contexts.stats.completed == 0
    rig.logger.paginate(ref, 93)  # pages up to 10; page 11 came by touch
    assert rig.contexts.stats.completed == 1
    assert rig.logger.stats.pages_on_touch == 1
    assert rig.logger.stats.pages_on_signal == 10


def test_evicted_context_counts_touches_after_release(ranked: Ranked) -> None:
    size = _context(ranked.world, "x", START_MS).nbytes
    rig = _lazy(ranked.world, max_context_bytes=int(2.5 * size))
    rig.logger.log_ranked(ranked.refs, ranked.batch)
    assert rig.contexts.stats.evicted == 1
    first = ranked.refs[0]
    rig.logger.touch(first, _click(first.request_id, [50, 60], ranked.saved.item_ids[0]))
    assert rig.logger.stats.touch_after_release == 2
    assert _lazy_held(rig, first.request_id) == {"u", "p0"}  # the head is still there to join


def test_a_full_store_is_counted_not_fatal(ranked: Ranked) -> None:
    rig = _lazy(ranked.world, store_bytes=1_000)
    rig.logger.log_ranked(ranked.refs, ranked.batch)  # does not raise
    assert rig.logger.stats.write_failures == 2 * len(ranked.refs)
    assert rig.logger.stats.entries_written == 0
    assert rig.store.stats().keys_held == 0
    assert len(_opened(rig)) == len(ranked.refs)


# ----------------------------------------------------------------------------------- scores
def test_scores_are_frozen_with_the_features_in_every_page_however_they_were_logged(ranked: Ranked) -> None:
    """Head at rank time, pages on signal and on touch: each holds the scores of its positions."""
    rig = _lazy(ranked.world)
    rig.logger.log_ranked(ranked.refs, ranked.batch)
    ranked.batch.scores[:] = -7.0  # the caller reuses its buffer: the context holds its own copy
    ref = ranked.refs[1]
    rig.clock.advance(5_000)
    rig.logger.paginate(ref, 10)  # page 1: 6-14
    rig.logger.touch(ref, _click(ref.request_id, [80], ranked.saved.item_ids[1]))  # a fast scroll: 78-86
    assert _lazy_held(rig, ref.request_id) == {"u", "p0", "p1", "p9"}
    positions = np.array([0, 5, 6, 14, 15, 77, 78, 80, 86, 87, 99])
    got = rig.logger.fetch(_opened(rig)[ref.request_id], positions)
    want = ranked.saved.scores[1, positions]
    assert np.isfinite(want).all() and len(np.unique(want)) == len(want)
    assert np.array_equal(got.scores[got.found], want[got.found])
    assert got.found.tolist() == [True] * 4 + [False, False] + [True] * 3 + [False, False]
    assert np.isnan(got.scores[~got.found]).all()  # no score where nothing was logged


def test_eager_fetch_returns_the_scores_of_the_asked_positions(ranked: Ranked) -> None:
    rig = _eager(ranked.world)
    rig.logger.log_ranked(ranked.refs, ranked.batch)
    ref = ranked.refs[2]
    rig.store.delete_many([key(ref.request_id, "i7")])
    positions = np.array([99, 7, 0, 42])
    got = rig.logger.fetch(_opened(rig)[ref.request_id], positions)
    assert got.found.tolist() == [True, False, True, True]
    assert np.array_equal(got.scores[got.found], ranked.saved.scores[2, positions[got.found]])
    assert np.isnan(got.scores[1])


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_a_ranking_logged_without_scores_reads_back_nan(ranked: Ranked, lazy: bool) -> None:
    rig = _lazy(ranked.world) if lazy else _eager(ranked.world)
    batch = _copy(ranked.batch)
    batch.scores[0] = np.nan  # what pack_ranked gives a ranker that sent no scores
    rig.logger.log_ranked(ranked.refs, batch)
    opened = _opened(rig)
    none = rig.logger.fetch(opened[ranked.refs[0].request_id], np.arange(6))
    some = rig.logger.fetch(opened[ranked.refs[1].request_id], np.arange(6))
    assert none.found.all() and np.isnan(none.scores).all()
    assert np.array_equal(some.scores, ranked.saved.scores[1, :6])


class DownBus(MemoryEventBus):
    """The in-process bus, made to refuse appends while ``down`` (a failing-over Redis)."""

    down = False

    def append_many(self, messages):  # type: ignore[no-untyped-def]
        if self.down:
            raise ConnectionError("Redis event bus at redis+cluster://127.0.0.1:7000 is not answering")
        return super().append_many(messages)


@pytest.mark.parametrize("one_by_one", [True, False])
def test_a_record_the_bus_refused_is_sent_again_with_the_requests_next_call(
    ranked: Ranked, one_by_one: bool
) -> None:
    rig = _lazy(ranked.world)
    bus = DownBus()
    rig.logger.bus = bus
    bus.down = True
    if one_by_one:  # a sidecar's rankings: the first write and the record go together
        batch, n = ranked.batch, ranked.batch.n_items
        for b, ref in enumerate(ranked.refs):
            one = RankedBatch(
                batch.user_ids[b : b + 1],
                batch.item_ids[b : b + 1],
                batch.scores[b : b + 1],
                batch.request.take(slice(b, b + 1)),
                batch.items.take(slice(b * n, (b + 1) * n)),
            )
            rig.logger.log_ranked([ref], one)
    else:
        rig.logger.log_ranked(ranked.refs, ranked.batch)
    stats = rig.logger.stats
    assert stats.bus_failures == 3 and stats.bus_resent == 0 and bus.appended == 0
    assert stats.write_failures == 0  # the store took the head: only the bus was down
    rig.logger.paginate(ranked.refs[0], 0)  # still down: the record stays held with the context
    assert (stats.bus_resent, bus.appended) == (0, 0)
    bus.down = False
    rig.logger.paginate(ranked.refs[0], 8)
    rig.logger.touch(ranked.refs[1], _click(ranked.refs[1].request_id, [2], ranked.saved.item_ids[1]))
    assert (stats.bus_resent, bus.appended) == (2, 2)
    assert [m.request_id for _, m in bus.consume(10)] == [
        ranked.refs[0].request_id,
        ranked.refs[1].request_id,
    ]
    rig.logger.paginate(ranked.refs[0], 20)  # sent once: not again
    assert bus.appended == 2
    rig.logger.tick()  # the third, never called again, goes with the next tick
    assert (stats.bus_resent, bus.appended) == (3, 3)
    rig.logger.tick()
    assert bus.appended == 3


def test_a_record_the_bus_never_took_is_counted_when_its_context_goes(ranked: Ranked) -> None:
    rig = _lazy(ranked.world)
    bus = DownBus()
    rig.logger.bus = bus
    bus.down = True
    rig.logger.log_ranked(ranked.refs, ranked.batch)
    rig.logger.tick()  # still down
    assert rig.logger.stats.bus_resent == 0
    rig.clock.advance(600_000)
    rig.logger.tick()  # expired without their records: these requests will not be joined
    assert rig.contexts is not None and rig.contexts.stats.unopened == 3
    assert bus.appended == 0
