"""Content-addressed rows: their blobs, their hash, the row cache, and the lazy logger's shared rows."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from leanrec.clock import ManualClock
from leanrec.energy import CostLedger
from leanrec.events import MemoryEventBus, RequestOpened, RequestRef
from leanrec.featurelog import ContextCache, LazyLogger, Paging, codec, key
from leanrec.featurelog.codec import BlobKind, RowTable, slow_columns
from leanrec.featurelog.rows import RowCache, row_hashes, row_keys
from leanrec.funnel import Funnel
from leanrec.schema import FeatureBlock, FeatureSet, Side
from leanrec.stores import MemoryTransientStore
from leanrec.world import World

START_MS = 1_700_000_000_000
TTL_MS = 900_000


def _block(fs: FeatureSet, side: Side, n: int, seed: int) -> FeatureBlock:
    rng = np.random.default_rng(seed)
    lay = fs.layout(side)
    return FeatureBlock(
        rng.standard_normal((n, lay.float_width)).astype("<f4"),
        rng.integers(-(2**63), 2**63 - 1, (n, lay.int_width), dtype=np.int64),
    )


# ----------------------------------------------------------------------------------- blobs
def test_rows_round_trip_byte_for_byte(small_world: World) -> None:
    fs = small_world.featureset
    items = _block(fs, Side.ITEM, 7, seed=1)
    items.floats[0, 0] = -0.0
    items.floats[1, 1] = np.frombuffer(np.uint32(0x7FC0_1234).tobytes(), "<f4")[0]  # a NaN payload
    back = codec.decode_rows(fs, RowTable.ITEM, codec.encode_rows(fs, RowTable.ITEM, items))
    assert back.same_bytes(items)


def test_request_refs_and_slow_row_give_back_the_whole_request_side(small_world: World) -> None:
    fs = small_world.featureset
    cols = slow_columns(fs)
    assert cols and len(cols.floats) + len(cols.fast_floats) == fs.layout(Side.REQUEST).float_width
    request = _block(fs, Side.REQUEST, 1, seed=2)
    slow = request.take_columns(cols.floats, cols.ints)
    (row,) = codec.encode_rows(fs, RowTable.SLOW, slow)
    fast = request.take_columns(cols.fast_floats, cols.fast_ints)
    h, fast = codec.decode_request_refs(fs, codec.encode_request_refs(fs, fast, 2**64 - 3))
    assert h == 2**64 - 3
    whole = codec.join_request(fs, fast, codec.decode_rows(fs, RowTable.SLOW, [row]))
    assert whole.same_bytes(request)


def test_page_refs_round_trip(small_world: World) -> None:
    fs = small_world.featureset
    ids = np.array([-(2**63), 0, 2**63 - 1], np.int64)
    hashes = np.array([0, 1, 2**64 - 1], np.uint64)
    page = codec.decode_page_refs(fs, codec.encode_page_refs(fs, 15, ids, hashes, np.array([1, 2, 3])))
    assert page.first_position == 15
    assert page.item_ids.tolist() == ids.tolist() and page.row_hashes.tolist() == hashes.tolist()
    assert page.scores.tolist() == [1, 2, 3]


def test_a_row_of_one_table_is_refused_as_the_other(small_world: World) -> None:
    fs = small_world.featureset
    (row,) = codec.encode_rows(fs, RowTable.ITEM, _block(fs, Side.ITEM, 1, seed=3))
    with pytest.raises(codec.CodecError, match="SLOW"):
        codec.decode_rows(fs, RowTable.SLOW, [row])


# ----------------------------------------------------------------------------------- hash
def test_hash_follows_the_exact_bytes(small_world: World) -> None:
    fs = small_world.featureset
    items = _block(fs, Side.ITEM, 80, seed=4)
    h = row_hashes(fs, RowTable.ITEM, items)
    assert len(np.unique(h)) == 80
    again = FeatureBlock(items.floats.copy(), items.ints.copy())
    assert np.array_equal(row_hashes(fs, RowTable.ITEM, again), h)
    # One value changed, in each column in turn: every row's hash changes.
    w = items.floats.shape[1]
    changed = FeatureBlock(items.floats[:w].copy(), items.ints[:w].copy())
    changed.floats[np.arange(w), np.arange(w)] = np.nextafter(
        changed.floats[np.arange(w), np.arange(w)], np.float32(np.inf)
    )
    assert (row_hashes(fs, RowTable.ITEM, changed) != h[:w]).all()
    zero = fs.layout(Side.ITEM).zeros(2)
    zero.floats[1, 0] = -0.0
    assert len(set(row_hashes(fs, RowTable.ITEM, zero).tolist())) == 2  # -0.0 is other bytes than 0.0
    # Swapping two values of a row is another row.
    swapped = FeatureBlock(items.floats[:1].copy(), items.ints[:1].copy())
    swapped.floats[0, [0, 1]] = swapped.floats[0, [1, 0]]
    assert row_hashes(fs, RowTable.ITEM, swapped)[0] != h[0]


def test_hash_differs_by_featureset_version(small_world: World) -> None:
    fs = small_world.featureset
    other = dataclasses.replace(fs, version=fs.version + 1)
    items = _block(fs, Side.ITEM, 3, seed=5)
    assert not set(row_hashes(fs, RowTable.ITEM, items).tolist()) & set(
        row_hashes(other, RowTable.ITEM, items).tolist()
    )


def test_row_keys_are_their_own_hash_tag() -> None:
    assert row_keys(np.array([0, 0xDEADBEEF, 2**64 - 1], np.uint64)) == [
        "lr:{r0000000000000000}",
        "lr:{r00000000deadbeef}",
        "lr:{rffffffffffffffff}",
    ]


# ----------------------------------------------------------------------------------- cache
def test_row_cache_remembers_the_latest_expiry_and_is_bounded() -> None:
    cache = RowCache(4)
    h = np.array([1, 2, 3], np.uint64)
    assert cache.expiry(h).tolist() == [0, 0, 0]
    cache.remember(h, 100)
    cache.remember(h[:1], 50)  # never shortened
    assert cache.expiry(h).tolist() == [100, 100, 100]
    cache.remember(np.array([5], np.uint64), 200)  # the slot of 1 (4 slots): 1 is forgotten
    assert cache.expiry(np.array([1, 5], np.uint64)).tolist() == [0, 200]
    cache.forget(np.array([2], np.uint64))
    assert cache.expiry(h).tolist() == [0, 0, 100]
    with pytest.raises(ValueError, match="positive"):
        RowCache(0)


# ----------------------------------------------------------------------------------- logger
def _logger(world: World, store: MemoryTransientStore, clock: ManualClock, shared: bool, **kw) -> LazyLogger:
    ledger = CostLedger()
    contexts = ContextCache(1 << 30, 120_000, 600_000, clock, ledger)
    return LazyLogger(
        world.featureset, store, MemoryEventBus(), ledger, TTL_MS, contexts, Paging(6, 9), 2, shared, **kw
    )


def _ranked(world: World, users: np.ndarray, now_ms: int, tag: str):
    batch = Funnel(world).rank(users, np.full(len(users), now_ms), np.zeros(len(users), np.int64))
    refs = [RequestRef(f"{tag}-{b}", int(users[b]), now_ms, batch.n_items) for b in range(len(users))]
    return refs, batch


def _opened(ref: RequestRef) -> RequestOpened:
    return RequestOpened(ref.request_id, ref.user_id, ref.ts_ms, ref.n_items, 1)


def test_shared_rows_read_back_as_todays_pages_byte_for_byte(small_world: World) -> None:
    clock = ManualClock(START_MS)
    plain_store, shared_store = MemoryTransientStore(clock=clock), MemoryTransientStore(clock=clock)
    plain = _logger(small_world, plain_store, clock, False)
    shared = _logger(small_world, shared_store, clock, True)
    user = small_world.user_ids[:1]
    refs, batch = _ranked(small_world, np.repeat(user, 4), START_MS, "same-user")
    for logger in (plain, shared):
        logger.log_ranked(refs, batch)
        for ref in refs:
            logger.paginate(ref, 30)
    positions = np.array([0, 3, 7, 20, 31, 40, 99])  # 40 and 99: never logged
    for ref in refs:
        a = plain.fetch(_opened(ref), positions)
        b = shared.fetch(_opened(ref), positions)
        assert a.found.tolist() == b.found.tolist() == [True] * 5 + [False] * 2
        assert a.request is not None and b.request is not None and a.request.same_bytes(b.request)
        assert a.items.same_bytes(b.items)
        assert np.array_equal(a.item_ids, b.item_ids)
        assert np.array_equal(a.scores.view(np.uint32), b.scores.view(np.uint32))
    # One user's four requests of the same ranking: one slow row, one row per distinct item.
    u_blob = shared_store.get_many([key(refs[0].request_id, "u")])[0]
    assert codec.blob_kind(u_blob) == BlobKind.REQUEST_REFS
    assert shared.stats.rows_written == 1 + len(
        np.unique(row_hashes(small_world.featureset, RowTable.ITEM, batch.items.take(np.arange(33))))
    )
    assert shared_store.stats().bytes_held < 0.5 * plain_store.stats().bytes_held
    # The joiner deletes the requests' own keys only: the rows stay for the requests that share them.
    assert all(not k.startswith("lr:{r") for ref in refs for k in shared.keys(_opened(ref)))


def test_a_row_used_again_is_extended_not_sent_and_every_use_keeps_it_alive(small_world: World) -> None:
    clock = ManualClock(START_MS)
    store = MemoryTransientStore(clock=clock)
    logger = _logger(small_world, store, clock, True, row_slack_ms=0)
    users = small_world.user_ids[:1]
    first, batch = _ranked(small_world, users, START_MS, "a")
    logger.log_ranked(first, batch)
    sent = store.stats().bytes_written
    clock.advance(TTL_MS // 2)
    again, batch2 = _ranked(small_world, users, clock.now_ms(), "b")
    assert np.array_equal(batch2.items.ints[:6], batch.items.ints[:6])
    logger.log_ranked(again, batch2)
    extended = logger.stats.rows_extended
    assert extended >= 1 and store.stats().touches == extended
    own = store.get_many([key(again[0].request_id, "u"), key(again[0].request_id, "p0")])
    assert store.stats().bytes_written - sent == sum(map(len, own))  # no row's bytes were sent again
    # Past the first request's TTL, inside the second's: every row the second references is there.
    clock.advance(TTL_MS // 2 + 1_000)
    got = logger.fetch(_opened(again[0]), np.arange(6))
    assert got.found.all() and got.request is not None
    assert logger.fetch(_opened(first[0]), np.arange(6)).request is None  # the first's own keys expired
    # Past the second's TTL nothing is left: shared rows expire by their TTL like the rest.
    clock.advance(TTL_MS // 2)
    store.purge_expired()
    assert store.stats().keys_held == 0 and store.stats().bytes_held == 0


def test_a_row_evicted_between_requests_is_written_again(small_world: World) -> None:
    clock = ManualClock(START_MS)
    store = MemoryTransientStore(clock=clock)
    logger = _logger(small_world, store, clock, True, row_slack_ms=0)
    users = small_world.user_ids[:1]
    first, batch = _ranked(small_world, users, START_MS, "a")
    logger.log_ranked(first, batch)
    rows = [k for k in store._data if k.startswith("lr:{r")]
    assert store.delete_many(rows) == len(rows)  # evicted (or the server restarted)
    clock.advance(1_000)
    again, _ = _ranked(small_world, users, clock.now_ms(), "b")
    logger.log_ranked(again, batch)  # the same rows again
    assert logger.stats.rows_rewritten == len(rows)
    got = logger.fetch(_opened(again[0]), np.arange(6))
    assert got.found.all() and got.request is not None


def test_a_missing_row_is_a_position_not_found_never_a_crash(small_world: World) -> None:
    clock = ManualClock(START_MS)
    store = MemoryTransientStore(clock=clock)
    logger = _logger(small_world, store, clock, True)
    refs, batch = _ranked(small_world, small_world.user_ids[:1], START_MS, "a")
    logger.log_ranked(refs, batch)
    page = codec.decode_page_refs(small_world.featureset, store.get_many([key(refs[0].request_id, "p0")])[0])
    store.delete_many(row_keys(page.row_hashes[2:3]))
    got = logger.fetch(_opened(refs[0]), np.arange(6))
    lost = page.row_hashes == page.row_hashes[2]
    assert got.found.tolist() == (~lost).tolist()
    assert got.request is not None
    slow = [k for k in store._data if k.startswith("lr:{r")]
    store.delete_many(slow)
    assert not logger.fetch(_opened(refs[0]), np.arange(6)).found.any()  # the request side is not whole


# ------------------------------------------------------------------------- on every store
@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def any_store(request: pytest.FixtureRequest):
    """A TransientStore of each backend, with a clock that moves with real time for the servers."""
    from leanrec.stores import open_transient_store

    from ..contract.conftest import REDIS_TEST_URL, flush_redis, require_redis

    if request.param == "memory":
        clock = ManualClock(START_MS)
        return MemoryTransientStore(clock=clock), clock, clock.advance
    if request.param == "redis":
        require_redis(REDIS_TEST_URL)
        flush_redis(REDIS_TEST_URL)
        url = REDIS_TEST_URL
    else:
        url = request.getfixturevalue("cluster_url")
    store = open_transient_store(url)
    request.addfinalizer(store.close)
    clock = ManualClock(START_MS)

    def advance(ms: int) -> None:  # the server's time and the logger's move together
        time.sleep(ms / 1000)
        clock.advance(ms)

    return store, clock, advance


def _row_keys_of(store, logger: LazyLogger, ref: RequestRef) -> list[str]:
    """Keys of the shared rows a request's request side and head page reference."""
    u, p0 = store.get_many([key(ref.request_id, "u"), key(ref.request_id, "p0")])
    keys = row_keys(codec.decode_page_refs(logger.fs, p0).row_hashes)
    return keys + row_keys(np.array([codec.decode_request_refs(logger.fs, u)[0]], np.uint64))


def test_rows_are_extended_by_every_use_and_expire_by_their_ttl(small_world: World, any_store) -> None:
    store, clock, advance = any_store
    ttl = 2_000  # margins of 400 ms and more around each TTL: a busy machine stalls for a while
    ledger = CostLedger()
    contexts = ContextCache(1 << 30, 120_000, 600_000, clock, ledger)
    logger = LazyLogger(
        small_world.featureset,
        store,
        MemoryEventBus(),
        ledger,
        ttl,
        contexts,
        shared_rows=True,
        row_slack_ms=0,
    )
    users = small_world.user_ids[:1]
    first, batch = _ranked(small_world, users, clock.now_ms(), "ttl-a")
    logger.log_ranked(first, batch)
    rows = _row_keys_of(store, logger, first[0])
    assert None not in store.get_many(rows)
    advance(ttl // 2)
    again, _ = _ranked(small_world, users, clock.now_ms(), "ttl-b")
    logger.log_ranked(again, batch)  # the same rows: extended to the second request's TTL, not sent
    assert _row_keys_of(store, logger, again[0]) == rows
    assert logger.stats.rows_extended == len(rows) and logger.stats.rows_written == len(rows)
    advance(ttl // 2 + 400)  # past the first request's TTL, inside the second's
    assert store.get_many([key(first[0].request_id, "u")]) == [None]
    assert logger.fetch(_opened(again[0]), np.arange(6)).found.all()
    advance(ttl // 2 + 600)  # past the second's: nothing outlives its TTL
    assert store.get_many(rows) == [None] * len(rows)


def test_a_row_evicted_between_requests_is_written_again_on_every_store(
    small_world: World, any_store
) -> None:
    store, clock, advance = any_store
    logger = _logger(small_world, store, clock, True, row_slack_ms=0)
    users = small_world.user_ids[:1]
    first, batch = _ranked(small_world, users, clock.now_ms(), "ev-a")
    logger.log_ranked(first, batch)
    keys = _row_keys_of(store, logger, first[0])
    assert store.delete_many(keys) == len(keys)  # evicted, or the server restarted
    advance(50)
    again, _ = _ranked(small_world, users, clock.now_ms(), "ev-b")
    logger.log_ranked(again, batch)
    assert logger.stats.rows_rewritten == len(keys)
    assert None not in store.get_many(keys)
    got = logger.fetch(_opened(again[0]), np.arange(6))
    assert got.found.all() and got.request is not None
