"""Contract suite of the TransientStore protocol: every backend must pass it unchanged.

Backends are built from a URL, as the configuration builds them. To run the suite against another
backend, add its URL to ``STORE_URLS``. Every test expects a fresh, empty store (its counters and
``keys_held`` start at zero), so ``store_factory`` flushes a server backend's test database before it opens
a store. A backend whose URL scheme is not ``memory`` runs on real time: ``advance`` sleeps, so every TTL
below is short.

A server backend's ``bytes_held`` is the server's memory growth, an approximation, and it expires keys
itself (``purge_expired`` may return 0, and an expired key may be counted in ``keys_held`` until it is
read or the server reclaims it). So exact byte counts and purge counts are checked on the in-process
store only; every backend must read expired keys as missing and then hold none of them.

The Redis tests skip when no server answers, and fail instead when the environment variable CI is set.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from leanrec.clock import ManualClock
from leanrec.stores import (
    MemoryTransientStore,
    OnceAppend,
    StoreFullError,
    TransientStore,
    open_transient_store,
)

from .conftest import CLUSTER, backend_url, flush_redis

STORE_URLS = [
    pytest.param("memory://", id="memory"),
    # Every value spills to disk: the embedded store as a simulation at a server's scale runs it.
    pytest.param("memory://?memory_bytes=0&spill_dir={tmp}", id="memory-spill"),
    pytest.param("redis://127.0.0.1:6379/15", id="redis"),
    pytest.param(CLUSTER, id="redis-cluster"),
]

TTL_MS = 300
"""Short enough that a real-time backend sleeps through the suite in a few seconds."""

UNIT = 10_000
"""Value size in the byte-bound tests. Margins are of several units: a Redis server's own memory
figure (``used_memory_dataset``, which its bound reads) drifts by tens of KB between calls. Values
stay below Redis's 32 KB big-argument size, above which an allocation can be half again the value."""

Advance = Callable[[int], None]
StoreFactory = Callable[..., tuple[TransientStore, Advance]]


def _with_max_bytes(url: str, max_bytes: int | None) -> str:
    if max_bytes is None:
        return url
    return f"{url}{'&' if '?' in url else '?'}max_bytes={max_bytes}"


def _exact(store: TransientStore) -> bool:
    """Whether the backend keeps exact in-process bookkeeping (bytes_held, purge counts)."""
    return isinstance(store, MemoryTransientStore)


@pytest.fixture(params=STORE_URLS)
def store_url(request: pytest.FixtureRequest) -> str:
    return backend_url(request, request.param)


@pytest.fixture
def store_factory(store_url: str, tmp_path) -> Iterator[StoreFactory]:
    """Builds empty stores of one backend: ``make(max_bytes=None) -> (store, advance_ms)``.

    The in-memory store gets a ManualClock, so ``advance_ms`` moves its time instantly; a real-time
    backend is driven by sleeping.
    """
    made: list[TransientStore] = []

    def make(max_bytes: int | None = None) -> tuple[TransientStore, Advance]:
        url = _with_max_bytes(store_url.format(tmp=tmp_path / "spill"), max_bytes)
        advance: Advance
        if store_url.startswith("memory://"):
            clock = ManualClock(1_700_000_000_000)
            store = open_transient_store(url, clock=clock)
            advance = clock.advance
        else:
            flush_redis(store_url)  # each test starts on an empty database
            store = open_transient_store(url)

            def advance(ms: int) -> None:
                time.sleep(ms / 1000)

        made.append(store)
        return store, advance

    yield make
    for store in made:
        close = getattr(store, "close", None)
        if callable(close):
            close()


def _key(i: int, suffix: str = "u") -> str:
    return f"lr:{{contract-r{i}}}:{suffix}"


# ----------------------------------------------------------------------------------- round trip
def test_round_trip_in_key_order_with_misses_as_none(store_factory: StoreFactory) -> None:
    store, _ = store_factory()
    items = {_key(i): bytes([i]) * (i + 1) for i in range(5)}
    store.put_many(items, TTL_MS * 100)
    asked = [_key(3), _key(99), _key(0), _key(4), _key(98), _key(3)]
    got = store.get_many(asked)
    assert got == [items[_key(3)], None, items[_key(0)], items[_key(4)], None, items[_key(3)]]


def test_round_trip_is_byte_exact_for_binary_values(store_factory: StoreFactory) -> None:
    store, _ = store_factory()
    rng = np.random.default_rng(3)
    items = {_key(i, f"p{i}"): rng.integers(0, 256, 1_000 + i, dtype=np.uint8).tobytes() for i in range(8)}
    items[_key(100)] = b""  # an empty value is a value, not a miss
    items[_key(101)] = b"\x00" * 64
    store.put_many(items, TTL_MS * 100)
    keys = list(items)
    assert store.get_many(keys) == [items[k] for k in keys]


def test_get_many_of_no_keys_is_empty(store_factory: StoreFactory) -> None:
    store, _ = store_factory()
    assert store.get_many([]) == []


def test_bytes_like_values_are_stored_and_accounted_as_their_bytes(store_factory: StoreFactory) -> None:
    store, advance = store_factory()
    floats = np.arange(10, dtype="<f4")  # a memoryview of it has 10 elements but 40 bytes
    buf = bytearray(b"abc")
    items = {_key(0): buf, _key(1): memoryview(floats)}
    store.put_many(items, TTL_MS)
    buf[:] = b"XYZ"  # the store holds its own bytes
    floats[:] = -1
    assert store.get_many([_key(0), _key(1)]) == [b"abc", np.arange(10, dtype="<f4").tobytes()]
    stats = store.stats()
    assert stats.bytes_written == 3 + 40
    if _exact(store):
        assert stats.bytes_held >= 3 + 40
    advance(TTL_MS * 2)
    store.purge_expired()
    if _exact(store):
        assert store.stats().bytes_held == 0
        assert store.stats().keys_held == 0
    assert store.get_many([_key(0), _key(1)]) == [None, None]
    assert store.stats().keys_held == 0


# ----------------------------------------------------------------------------------- TTL
def test_key_is_present_before_its_ttl_and_gone_after(store_factory: StoreFactory) -> None:
    store, advance = store_factory()
    store.put_many({_key(0): b"frozen"}, TTL_MS)
    advance(TTL_MS // 3)
    assert store.get_many([_key(0)]) == [b"frozen"]
    advance(TTL_MS)  # now 4/3 of the TTL after the write
    assert store.get_many([_key(0)]) == [None]


def test_entries_of_one_batch_share_the_ttl_but_batches_keep_their_own(store_factory: StoreFactory) -> None:
    store, advance = store_factory()
    store.put_many({_key(0): b"a", _key(1): b"b"}, TTL_MS)
    advance(TTL_MS // 2)
    store.put_many({_key(2): b"c"}, TTL_MS)
    advance(TTL_MS * 3 // 4)  # first batch is past its TTL, second is not
    assert store.get_many([_key(0), _key(1), _key(2)]) == [None, None, b"c"]


def test_rewriting_a_key_with_a_later_ttl_keeps_it_alive(store_factory: StoreFactory) -> None:
    store, advance = store_factory()
    store.put_many({_key(0): b"v1", _key(1): b"other"}, TTL_MS)
    advance(TTL_MS // 2)
    store.put_many({_key(0): b"v2"}, TTL_MS)
    advance(TTL_MS * 3 // 4)  # past the first TTL, inside the second
    purged = store.purge_expired()
    if _exact(store):
        assert purged == 1  # only the key that was not rewritten
    assert store.get_many([_key(0), _key(1)]) == [b"v2", None]
    stats = store.stats()
    assert stats.keys_held == 1
    if _exact(store):
        assert stats.bytes_held >= len(b"v2")
    advance(TTL_MS)
    assert store.get_many([_key(0)]) == [None]


def test_touch_many_extends_live_keys_and_says_which_are_gone(store_factory: StoreFactory) -> None:
    store, advance = store_factory()
    store.put_many({_key(0): b"row", _key(1): b"other"}, TTL_MS)
    advance(TTL_MS // 2)
    assert store.touch_many([_key(0), _key(9), _key(0)], TTL_MS) == [True, False, True]
    assert store.get_many([_key(9)]) == [None]  # a touch never creates a key
    advance(TTL_MS * 3 // 4)  # past the write's TTL, inside the touch's
    assert store.get_many([_key(0), _key(1)]) == [b"row", None]
    assert store.touch_many([_key(1)], TTL_MS) == [False]  # expired: gone, not brought back
    advance(TTL_MS)  # nothing outlives the TTL it was last given
    assert store.get_many([_key(0)]) == [None]
    store.purge_expired()
    assert store.stats().keys_held == 0


def test_touch_many_never_shortens_a_ttl(store_factory: StoreFactory) -> None:
    store, advance = store_factory()
    store.put_many({_key(0): b"long"}, TTL_MS * 3)
    assert store.touch_many([_key(0)], TTL_MS) == [True]
    advance(TTL_MS + TTL_MS // 2)  # past the touch's TTL, inside the write's
    assert store.get_many([_key(0)]) == [b"long"]


def test_touch_many_of_no_keys_is_empty_and_refuses_a_non_positive_ttl(store_factory: StoreFactory) -> None:
    store, _ = store_factory()
    assert store.touch_many([], TTL_MS) == []
    with pytest.raises(ValueError, match="ttl_ms"):
        store.touch_many([_key(0)], 0)


def test_touch_many_reaches_keys_of_many_hash_tags(store_factory: StoreFactory) -> None:
    """Shared rows are each their own hash tag: on a cluster one touch reaches every shard."""
    store, _ = store_factory()
    rows = {f"lr:{{r{i:016x}}}": bytes([i]) * 8 for i in range(40)}
    store.put_many(rows, TTL_MS * 10)
    keys = [*rows, "lr:{r-missing}"]
    assert store.touch_many(keys, TTL_MS * 20) == [True] * 40 + [False]
    assert store.get_many(list(rows)) == list(rows.values())


def test_purge_expired_releases_all_memory(store_factory: StoreFactory) -> None:
    store, advance = store_factory()
    for batch in range(4):
        store.put_many(_units(batch * 10, batch * 10 + 10, b"x"), TTL_MS)
    held = store.stats()
    assert held.keys_held == 40
    # A margin of units: Redis's own figure drifts by tens of KB, a cluster's sums three of them.
    assert held.bytes_held >= 25 * UNIT
    advance(TTL_MS + TTL_MS // 3)
    purged = store.purge_expired()
    if _exact(store):
        assert purged == 40
        stats = store.stats()
        assert stats.keys_held == 0
        assert stats.bytes_held == 0
        assert stats.expiries == 40
    assert store.purge_expired() == 0  # nothing left to purge
    assert store.get_many([_key(i) for i in range(40)]) == [None] * 40
    stats = store.stats()
    assert stats.keys_held == 0
    assert stats.expiries == 40  # each counted once, whoever dropped it
    if isinstance(store, MemoryTransientStore):
        assert len(store) == 0


def test_purge_keeps_live_entries(store_factory: StoreFactory) -> None:
    store, advance = store_factory()
    store.put_many({_key(0): b"short"}, TTL_MS)
    store.put_many({_key(1): b"long"}, TTL_MS * 100)
    advance(TTL_MS + TTL_MS // 3)
    purged = store.purge_expired()
    if _exact(store):
        assert purged == 1
    assert store.get_many([_key(0), _key(1)]) == [None, b"long"]
    assert store.stats().keys_held == 1


# ----------------------------------------------------------------------------------- delete
def test_delete_many_returns_how_many_existed(store_factory: StoreFactory) -> None:
    store, _ = store_factory()
    store.put_many({_key(i): b"v" * 10 for i in range(4)}, TTL_MS * 100)
    assert store.delete_many([_key(0), _key(2), _key(77)]) == 2
    assert store.get_many([_key(i) for i in range(4)]) == [None, b"v" * 10, None, b"v" * 10]
    assert store.delete_many([_key(0), _key(2)]) == 0  # gone already
    assert store.delete_many([]) == 0
    stats = store.stats()
    assert stats.keys_held == 2
    assert store.delete_many([_key(1), _key(3)]) == 2
    assert store.stats().keys_held == 0
    if _exact(store):
        assert store.stats().bytes_held == 0


def test_delete_many_does_not_count_expired_keys(store_factory: StoreFactory) -> None:
    store, advance = store_factory()
    store.put_many({_key(0): b"old"}, TTL_MS)
    store.put_many({_key(1): b"live"}, TTL_MS * 100)
    advance(TTL_MS + TTL_MS // 3)
    assert store.delete_many([_key(0), _key(1)]) == 1  # an expired key no longer exists
    assert store.stats().keys_held == 0
    if _exact(store):
        assert store.stats().bytes_held == 0


# ----------------------------------------------------------------------------------- counters
def test_counters_count_writes_bytes_hits_misses_and_expiries(store_factory: StoreFactory) -> None:
    store, advance = store_factory()
    assert store.stats().writes == 0
    store.put_many({_key(0): b"a" * 10, _key(1): b"b" * 20}, TTL_MS)
    store.put_many({_key(2): b"c" * 30}, TTL_MS)
    stats = store.stats()
    assert (stats.writes, stats.bytes_written) == (3, 60)
    assert (stats.keys_held, stats.hits, stats.misses) == (3, 0, 0)

    store.get_many([_key(0), _key(9), _key(2), _key(8), _key(7)])
    stats = store.stats()
    assert (stats.hits, stats.misses) == (2, 3)
    assert stats.bytes_read == 40
    assert stats.reads == 5

    advance(TTL_MS + TTL_MS // 3)
    store.get_many([_key(1)])  # expired: a miss
    store.purge_expired()
    store.get_many([_key(0), _key(2)])
    stats = store.stats()
    assert stats.expiries == 3  # each expired entry counted once, at read or at purge
    assert (stats.hits, stats.misses) == (2, 6)
    assert stats.keys_held == 0
    if _exact(store):
        assert stats.bytes_held == 0
    assert (stats.writes, stats.bytes_written) == (3, 60)  # reads and expiries write nothing


def test_stats_is_a_snapshot(store_factory: StoreFactory) -> None:
    store, _ = store_factory()
    before = store.stats()
    store.put_many({_key(0): b"x"}, TTL_MS)
    assert before.writes == 0
    assert store.stats().writes == 1


# ----------------------------------------------------------------------------------- byte bound
def _units(first: int, stop: int, fill: bytes = b"v") -> dict[str, bytes]:
    """Keys ``first..stop-1``, one ``UNIT`` of bytes each."""
    return {_key(i): fill * UNIT for i in range(first, stop)}


def test_batch_that_does_not_fit_is_refused_whole_and_nothing_held_is_lost(
    store_factory: StoreFactory,
) -> None:
    store, _ = store_factory(max_bytes=40 * UNIT)
    held = _units(0, 10, b"a")
    store.put_many(held, TTL_MS * 100)
    too_big = _units(0, 50, b"b")  # 10 units replace, 40 more would take it to 50 units
    with pytest.raises(StoreFullError):
        store.put_many(too_big, TTL_MS * 100)
    assert store.get_many(list(too_big)) == [*held.values(), *[None] * 40]  # the held keep their values
    stats = store.stats()
    assert stats.keys_held == 10
    assert stats.writes == 10
    assert stats.bytes_written == 10 * UNIT
    assert stats.rejected_writes == 50
    # a batch that fits still goes in
    store.put_many(_units(50, 51), TTL_MS * 100)
    assert store.get_many([_key(50)]) == [b"v" * UNIT]


def test_a_single_batch_larger_than_the_bound_is_refused(store_factory: StoreFactory) -> None:
    store, _ = store_factory(max_bytes=10 * UNIT)
    with pytest.raises(StoreFullError, match=str(10 * UNIT)):
        store.put_many(_units(0, 20), TTL_MS)
    assert store.get_many([_key(0)]) == [None]
    assert store.stats().keys_held == 0
    if _exact(store):
        assert store.stats().bytes_held == 0


def test_rewriting_a_key_counts_only_the_new_value_against_the_bound(store_factory: StoreFactory) -> None:
    store, _ = store_factory(max_bytes=20 * UNIT)
    store.put_many(_units(0, 12, b"a"), TTL_MS * 100)
    store.put_many(_units(0, 14, b"b"), TTL_MS * 100)  # replaces 12: 14 units held, not 26
    assert store.get_many([_key(0), _key(13)]) == [b"b" * UNIT] * 2
    assert store.stats().keys_held == 14


def test_expired_entries_do_not_count_against_the_bound(store_factory: StoreFactory) -> None:
    store, advance = store_factory(max_bytes=20 * UNIT)
    store.put_many(_units(0, 15, b"a"), TTL_MS)
    with pytest.raises(StoreFullError):
        store.put_many(_units(15, 30, b"b"), TTL_MS)
    advance(TTL_MS + TTL_MS // 3)
    # A long TTL: the entries just written must still be there when read back on a loaded machine.
    store.put_many(_units(15, 30, b"b"), TTL_MS * 100)
    assert store.get_many([_key(0), _key(15)]) == [None, b"b" * UNIT]


# ----------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("bad", ["text", 42, None, [1, 2], np.zeros(3, np.uint8)])
def test_non_bytes_values_are_refused_and_nothing_is_written(
    store_factory: StoreFactory, bad: object
) -> None:
    store, _ = store_factory()
    with pytest.raises(TypeError, match=r"contract-r1"):
        store.put_many({_key(0): b"good", _key(1): bad}, TTL_MS)  # type: ignore[dict-item]
    assert store.get_many([_key(0), _key(1)]) == [None, None]
    assert store.stats().writes == 0
    assert store.stats().keys_held == 0


@pytest.mark.parametrize("ttl", [0, -1, -TTL_MS])
def test_non_positive_ttl_is_refused(store_factory: StoreFactory, ttl: int) -> None:
    store, _ = store_factory()
    with pytest.raises(ValueError, match="ttl_ms"):
        store.put_many({_key(0): b"x"}, ttl)
    assert store.get_many([_key(0)]) == [None]
    assert store.stats().writes == 0


# ----------------------------------------------------------------------------------- URLs
@pytest.mark.parametrize("url", ["ftp://host/x", "memcached://127.0.0.1:11211", "nothing-at-all"])
def test_open_refuses_unknown_schemes(url: str) -> None:
    with pytest.raises(ValueError, match="backend") as err:
        open_transient_store(url)
    assert url in str(err.value)
    assert "memory://" in str(err.value)  # says what is known


@pytest.mark.parametrize("value", ["lots", "1.5", "", "12abc"])
def test_open_refuses_a_malformed_max_bytes(store_url: str, value: str) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        open_transient_store(f"{store_url}{'&' if '?' in store_url else '?'}max_bytes={value}")


@pytest.mark.parametrize("value", ["0", "-5"])
def test_open_refuses_a_non_positive_max_bytes(store_url: str, value: str) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        open_transient_store(f"{store_url}{'&' if '?' in store_url else '?'}max_bytes={value}")


def test_open_applies_max_bytes(store_factory: StoreFactory) -> None:
    store, _ = store_factory(max_bytes=20 * UNIT)
    store.put_many(_units(0, 15), TTL_MS)
    with pytest.raises(StoreFullError):
        store.put_many(_units(15, 30), TTL_MS)


def test_memory_url_builds_the_embedded_store() -> None:
    store = open_transient_store("memory://?max_bytes=4096", clock=ManualClock())
    assert isinstance(store, MemoryTransientStore)
    assert isinstance(store, TransientStore)
    assert store.max_bytes == 4096


# --------------------------------------------------------------- lists and replay guards


def test_append_many_keeps_chunks_in_order_until_the_ttl(store_factory) -> None:
    store, advance = store_factory()
    store.append_many({"lr:{a}:ev": b"one", "lr:{b}:ev": b"x"}, TTL_MS)
    store.append_many({"lr:{a}:ev": b"two"}, TTL_MS)
    assert store.get_lists_many(["lr:{a}:ev", "lr:{b}:ev", "lr:{c}:ev"]) == [[b"one", b"two"], [b"x"], []]
    advance(TTL_MS + 50)
    assert store.get_lists_many(["lr:{a}:ev", "lr:{b}:ev"]) == [[], []]


def test_lists_and_values_do_not_mix(store_factory) -> None:
    store, _ = store_factory()
    store.put_many({"k": b"v"}, TTL_MS)
    with pytest.raises(TypeError):
        store.append_many({"k": b"chunk"}, TTL_MS)
    assert store.get_many(["k"]) == [b"v"]


def test_append_once_refuses_a_token_seen_before(store_factory) -> None:
    store, advance = store_factory()
    first = OnceAppend("lr:{r}:ev", b"batch-1", "lr:{r}:seen", "b1")
    again = OnceAppend("lr:{r}:ev", b"batch-1 replayed", "lr:{r}:seen", "b1")
    other = OnceAppend("lr:{r}:ev", b"batch-2", "lr:{r}:seen", "b2")
    assert store.append_once([first], TTL_MS) == [True]
    assert store.append_once([again, other], TTL_MS) == [False, True]
    assert store.get_lists_many(["lr:{r}:ev"]) == [[b"batch-1", b"batch-2"]]
    advance(TTL_MS + 50)
    assert store.get_lists_many(["lr:{r}:ev", "lr:{r}:seen"]) == [[], []]
    assert store.append_once([again], TTL_MS) == [True]  # the guard expired with the request


def test_delete_many_removes_lists(store_factory) -> None:
    store, _ = store_factory()
    store.append_many({"lr:{a}:ev": b"one"}, TTL_MS)
    assert store.delete_many(["lr:{a}:ev"]) == 1
    assert store.get_lists_many(["lr:{a}:ev"]) == [[]]


# ----------------------------------------------------------------------------------- spilling
def _spill_files(folder) -> list:
    return [p for p in folder.rglob("*.seg")]


def test_values_past_the_memory_bound_spill_and_read_back_exact(tmp_path) -> None:
    clock = ManualClock(1_700_000_000_000)
    store = MemoryTransientStore(
        max_bytes=10 * UNIT * 10, clock=clock, memory_bytes=3 * UNIT, spill_dir=tmp_path, segment_bytes=UNIT
    )
    rng = np.random.default_rng(0)
    items = {_key(i): rng.bytes(UNIT - 20) for i in range(8)}
    store.put_many(items, 1_000)
    st = store.stats()
    held_in_memory = st.bytes_held - st.bytes_spilled  # values kept in memory, and every key
    assert 0 < held_in_memory <= 3 * UNIT + sum(map(len, items)) and st.bytes_spilled >= 5 * (UNIT - 20)
    assert st.bytes_held == sum(len(k) + len(v) for k, v in items.items())  # spilled bytes count as held
    assert store.get_many(list(items)) == list(items.values())
    assert _spill_files(tmp_path)


def test_spilled_entries_release_their_disk_when_deleted_or_expired(tmp_path) -> None:
    clock = ManualClock(1_700_000_000_000)
    store = MemoryTransientStore(
        max_bytes=1 << 30, clock=clock, memory_bytes=0, spill_dir=tmp_path, segment_bytes=2 * UNIT
    )
    first = {_key(i): bytes(UNIT) for i in range(6)}
    store.put_many(first, 1_000)
    clock.advance(500)
    second = {_key(i, "p1"): bytes(UNIT) for i in range(6)}
    store.put_many(second, 1_000)
    assert store.stats().peak_bytes_spilled == 12 * UNIT
    on_disk = sum(p.stat().st_size for p in _spill_files(tmp_path))
    assert on_disk == 12 * UNIT
    store.delete_many(list(first))
    clock.advance(1_000)  # the second batch expires
    store.purge_expired()
    st = store.stats()
    assert st.bytes_spilled == 0 and st.bytes_held == 0
    assert sum(p.stat().st_size for p in _spill_files(tmp_path)) == 0
    store.close()
    assert not _spill_files(tmp_path)


def test_open_builds_a_spilling_store_and_refuses_unknown_options(tmp_path) -> None:
    url = f"memory://?max_bytes=4096&memory_bytes=0&spill_dir={tmp_path}"
    store = open_transient_store(url, clock=ManualClock())
    store.put_many({"k": b"v" * 100}, 1_000)
    assert store.stats().bytes_spilled == 100 and store.get_many(["k"]) == [b"v" * 100]
    with pytest.raises(ValueError, match="spill_di"):
        open_transient_store("memory://?spill_di=/tmp")
    with pytest.raises(ValueError, match="memory_bytes must be an integer"):
        open_transient_store(f"memory://?memory_bytes=lots&spill_dir={tmp_path}")
