"""Contract suite of the FeatureStore protocol: every backend must pass it unchanged.

Each test gets a store holding the features of a small World (50 users, 1,000 items), built with
``open_feature_store`` from a URL as the configuration builds it; a Redis store works on database 15,
flushed before the test, and is filled by copying the World's in-process store into it. Entities are
asked for by their raw 64-bit ids (the World's are spread over the whole int64 range), and reads are
compared byte for byte with the World's blocks (``FeatureBlock.same_bytes``). To add a backend, add its
URL to ``STORE_URLS``.

The Redis tests skip when no server answers, and fail instead when the environment variable CI is set.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import redis

from leanrec.ids import IdIndex
from leanrec.schema import FeatureBlock, FeatureSet, Owner
from leanrec.stores import FeatureStore, MemoryFeatureStore, open_feature_store
from leanrec.stores.redis_features import RedisFeatureStore
from leanrec.world import World, WorldConfig

from .conftest import CLUSTER, REDIS_TEST_URL, backend_url

STORE_URLS = [
    pytest.param("memory://", id="memory"),
    pytest.param(REDIS_TEST_URL, id="redis"),
    pytest.param(CLUSTER, id="redis-cluster"),
]

OWNERS = [pytest.param(Owner.USER, id="user"), pytest.param(Owner.ITEM, id="item")]
N = {Owner.USER: 50, Owner.ITEM: 1_000}


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig(n_users=50, n_items=1000, n_creators=20, seed=3))


@pytest.fixture
def reference(world: World) -> dict[Owner, FeatureBlock]:
    """The World's features, as the store under test must return them (a copy no test can change)."""
    return {owner: block.copy() for owner, block in world.store.blocks.items()}


@pytest.fixture(params=STORE_URLS)
def store_url(request: pytest.FixtureRequest) -> str:
    return backend_url(request, request.param)


@pytest.fixture
def store(store_url: str, world: World, reference: dict[Owner, FeatureBlock]) -> Iterator[FeatureStore]:
    if store_url.startswith("memory://"):
        blocks = {owner: block.copy() for owner, block in reference.items()}
        made: FeatureStore = open_feature_store(store_url, world.featureset, blocks, world.store.ids)
    else:
        made = open_feature_store(store_url, world.featureset)
        assert isinstance(made, RedisFeatureStore)
        assert made.load_from(world.store, batch_size=300) == 1_050  # several batches per owner
    yield made
    close = getattr(made, "close", None)
    if callable(close):
        close()


@pytest.fixture
def raw_client(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client of the test database, to look at and tamper with the hashes directly."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _rows(owner: Owner, seed: int = 0, n: int = 40) -> np.ndarray:
    """Unordered rows with repeats, as candidate lists ask for them, the first and last among them."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, N[owner], n)
    return np.concatenate([rows, rows[:5], [0, N[owner] - 1]])


def _raw(world: World, owner: Owner, rows: np.ndarray | list[int]) -> np.ndarray:
    """The raw ids of rows of the World's blocks."""
    return world.store.ids[owner][np.asarray(rows)]


def test_the_world_ids_are_raw_64_bit_values_not_row_numbers(world: World) -> None:
    for owner in (Owner.USER, Owner.ITEM):
        ids = world.store.ids[owner]
        assert ids.dtype == np.int64 and len(np.unique(ids)) == N[owner]
        assert (ids < 0).any() and int(np.abs(ids).max()) > 2**62  # spread over the int64 range


# ----------------------------------------------------------------------------------- get_many
@pytest.mark.parametrize("owner", OWNERS)
def test_get_many_returns_the_rows_byte_for_byte(
    store: FeatureStore, world: World, reference: dict[Owner, FeatureBlock], owner: Owner
) -> None:
    rows = _rows(owner)
    ids = _raw(world, owner, rows)
    got = store.get_many(owner, ids)
    want = reference[owner].take(rows)
    assert len(got) == len(ids)
    assert got.same_bytes(want)
    assert got.floats.dtype == np.float32 and got.ints.dtype == np.int64
    everything = store.get_many(owner, world.store.ids[owner])
    assert everything.same_bytes(reference[owner])


@pytest.mark.parametrize("owner", OWNERS)
def test_get_many_returns_a_copy_the_caller_owns(
    store: FeatureStore, world: World, reference: dict[Owner, FeatureBlock], owner: Owner
) -> None:
    rows = np.array([3, 1, 3])
    ids = _raw(world, owner, rows)
    got = store.get_many(owner, ids)
    got.floats[:] = 123.0  # writable, and writing to it changes nothing in the store
    got.ints[:] = 7
    assert store.get_many(owner, ids).same_bytes(reference[owner].take(rows))


def test_get_many_of_no_ids_is_an_empty_block_of_the_owner_widths(store: FeatureStore, world: World) -> None:
    for owner in (Owner.USER, Owner.ITEM):
        got = store.get_many(owner, np.array([], np.int64))
        assert len(got) == 0
        assert (got.floats.shape[1], got.ints.shape[1]) == world.featureset.widths(owner)


# ----------------------------------------------------------------------------------- put_many
@pytest.mark.parametrize("owner", OWNERS)
def test_put_many_then_get_many_round_trips(
    store: FeatureStore, world: World, reference: dict[Owner, FeatureBlock], owner: Owner
) -> None:
    rows = np.array([7, 2, 30])
    ids = _raw(world, owner, rows)
    block = reference[owner].take(rows)
    rng = np.random.default_rng(5)
    block.floats[:] = rng.normal(size=block.floats.shape).astype(np.float32)
    block.ints[:] = rng.integers(-(2**63), 2**63 - 1, block.ints.shape, dtype=np.int64)
    store.put_many(owner, ids, block)
    assert store.get_many(owner, ids).same_bytes(block)
    # the other rows are untouched
    others = np.setdiff1d(np.arange(N[owner]), rows)
    assert store.get_many(owner, _raw(world, owner, others)).same_bytes(reference[owner].take(others))


def test_put_many_keeps_special_float_bytes_and_extreme_ids(
    store: FeatureStore, world: World, reference: dict[Owner, FeatureBlock]
) -> None:
    owner = Owner.ITEM
    ids = _raw(world, owner, [11])
    block = reference[owner].take(np.array([11]))
    special = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45], np.float32)
    special_bits = special.view(np.uint32).copy()
    special_bits[0] = 0x7FC0_1234  # a NaN with a payload
    block.floats[0, : len(special)] = special_bits.view(np.float32)
    block.ints[0, :4] = [-(2**63), 2**63 - 1, -2, 2**32]
    store.put_many(owner, ids, block)
    got = store.get_many(owner, ids)
    assert got.same_bytes(block)
    assert got.floats[0, : len(special)].view(np.uint32).tolist() == special_bits.tolist()
    assert got.ints[0, :4].tolist() == [-(2**63), 2**63 - 1, -2, 2**32]


# ----------------------------------------------------------------------------------- get_feature
@pytest.mark.parametrize("owner", OWNERS)
def test_get_feature_returns_the_features_columns(
    store: FeatureStore, world: World, reference: dict[Owner, FeatureBlock], owner: Owner
) -> None:
    fs: FeatureSet = world.featureset
    at = _rows(owner, seed=9)
    ids = _raw(world, owner, at)
    rows = reference[owner].take(at)
    for name, slot in fs.owner_slots(owner).items():
        got = store.get_feature(owner, name, ids)
        src = rows.floats if slot.feature.is_float else rows.ints
        want = src[:, slot.offset : slot.stop]
        assert got.shape == (len(ids), slot.feature.size), name
        assert got.dtype == want.dtype, name
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), name
    ids_of_items = store.get_feature(Owner.ITEM, "i_id", _raw(world, Owner.ITEM, [5, 0]))
    assert ids_of_items.ravel().tolist() == _raw(world, Owner.ITEM, [5, 0]).tolist()  # raw, not rows


def test_get_feature_sees_what_put_many_wrote(store: FeatureStore, world: World) -> None:
    owner, ids = Owner.ITEM, _raw(world, Owner.ITEM, [4, 5])
    block = store.get_many(owner, ids)
    slot = world.featureset.owner_slots(owner)["i_views_log"]
    block.floats[:, slot.offset] = [1.5, -2.5]
    store.put_many(owner, ids, block)
    got = store.get_feature(owner, "i_views_log", ids[[1, 0, 1]])
    assert got.ravel().tolist() == [-2.5, 1.5, -2.5]


def test_get_feature_of_an_unknown_feature_raises_key_error(store: FeatureStore) -> None:
    with pytest.raises(KeyError):
        store.get_feature(Owner.ITEM, "no_such_feature", np.array([1]))


# ----------------------------------------------------------------------------------- unknown ids
@pytest.mark.parametrize("owner", OWNERS)
@pytest.mark.parametrize(
    "unknown",
    [[5_000], [-1], [10_000, 99_999], [0], [-(2**63)], [2**63 - 1]],
    ids=["small", "padding", "two", "a-row-number", "int64-min", "int64-max"],
)
def test_unknown_ids_raise_key_error_naming_the_owner_and_ids(
    store: FeatureStore,
    world: World,
    owner: Owner,
    unknown: list[int],
) -> None:
    assert not np.isin(unknown, world.store.ids[owner]).any()
    known = _raw(world, owner, [0, 1])
    ids = np.array([known[0], *unknown, known[1]], np.int64)
    with pytest.raises(KeyError, match=owner.value) as err:
        store.get_many(owner, ids)
    assert all(str(u) in str(err.value) for u in unknown)
    assert all(str(k) not in str(err.value) for k in known)
    with pytest.raises(KeyError, match=owner.value):
        store.get_feature(owner, next(iter(world.featureset.owner_slots(owner))), ids)


def test_an_owner_the_store_does_not_hold_raises_key_error(store: FeatureStore) -> None:
    with pytest.raises(KeyError, match="context"):
        store.get_many(Owner.CONTEXT, np.array([0]))


# ----------------------------------------------------------------------------------- raw ids, in process
def _tiny_store(
    fs: FeatureSet, ids: dict[Owner, np.ndarray] | None
) -> tuple[MemoryFeatureStore, FeatureBlock]:
    """An in-process store of ``fs`` holding 4 users, each row's values its own (0, 1, 2, ...)."""
    fw, iw = fs.widths(Owner.USER)
    block = FeatureBlock(
        np.arange(4 * fw, dtype=np.float32).reshape(4, fw), np.arange(4 * iw, dtype=np.int64).reshape(4, iw)
    )
    return MemoryFeatureStore(fs, {Owner.USER: block.copy()}, ids), block


RAW = np.array([2**63 - 1, -(2**63), 10**18, -7], np.int64)
"""Raw ids of the 4 users: the int64 extremes, a large one and a negative one."""


def test_memory_store_finds_rows_by_raw_id(world: World) -> None:
    store, block = _tiny_store(world.featureset, {Owner.USER: RAW})
    assert store.ids[Owner.USER].tolist() == RAW.tolist()
    assert store.rows(Owner.USER, RAW[[2, 0, 2, 3]]).tolist() == [2, 0, 2, 3]
    assert store.get_many(Owner.USER, RAW[[3, 1]]).same_bytes(block.take(np.array([3, 1])))
    fresh = block.take(np.array([0]))
    fresh.ints[:] = -(2**63)
    store.put_many(Owner.USER, RAW[[1]], fresh)
    assert store.get_many(Owner.USER, RAW[[1]]).same_bytes(fresh)
    assert store.get_many(Owner.USER, RAW[[0, 2, 3]]).same_bytes(block.take(np.array([0, 2, 3])))


@pytest.mark.parametrize(
    "unknown",
    [[0], [3], [-1], [2**63 - 2]],
    ids=["row-0", "last-row-number", "padding", "next-to-a-held-id"],
)
def test_memory_store_refuses_unknown_raw_ids_naming_them(world: World, unknown: list[int]) -> None:
    store, block = _tiny_store(world.featureset, {Owner.USER: RAW})
    ids = np.array([RAW[0], *unknown], np.int64)
    for call in (
        lambda: store.get_many(Owner.USER, ids),
        lambda: store.get_feature(Owner.USER, "u_id", ids),
        lambda: store.put_many(Owner.USER, ids, block.take(np.array([0, 1]))),
    ):
        with pytest.raises(KeyError, match="user") as err:
            call()
        assert str(unknown[0]) in str(err.value) and str(RAW[0]) not in str(err.value)
    assert store.get_many(Owner.USER, RAW).same_bytes(block)  # the refused write changed nothing


def test_memory_store_without_ids_numbers_its_rows(world: World) -> None:
    store, block = _tiny_store(world.featureset, None)
    assert store.ids[Owner.USER].tolist() == [0, 1, 2, 3]
    assert store.get_many(Owner.USER, np.array([3, 0])).same_bytes(block.take(np.array([3, 0])))
    with pytest.raises(KeyError, match=r"\[4, -1\]"):
        store.get_many(Owner.USER, np.array([1, 4, -1]))


def test_memory_store_refuses_ids_that_are_not_one_distinct_id_per_row(world: World) -> None:
    with pytest.raises(ValueError, match="not distinct"):
        _tiny_store(world.featureset, {Owner.USER: np.array([5, 6, 5, 7])})
    with pytest.raises(ValueError, match="3 user ids for a block of 4 rows"):
        _tiny_store(world.featureset, {Owner.USER: np.array([5, 6, 7])})


def test_an_id_index_finds_rows_and_marks_the_unknown() -> None:
    index = IdIndex(RAW, "item")
    rows, known = index.find(np.array([[-7, 5], [2**63 - 1, -(2**63)]]))
    assert rows.tolist() == [[3, 0], [0, 1]] and known.tolist() == [[True, False], [True, True]]
    # an unsigned id past 2**63 is no int64 id: unknown, not wrapped onto -(2**63)
    _, known = index.find(np.array([2**63, 2**63 - 1], np.uint64))
    assert known.tolist() == [False, True]
    with pytest.raises(KeyError, match=r"no item with id\(s\) \[5, 6\]"):
        index.rows(np.array([-7, 5, 6]))
    empty = IdIndex(np.array([], np.int64))
    assert empty.find(np.array([1]))[1].tolist() == [False]


# ----------------------------------------------------------------------------------- protocol, refusals
def test_every_backend_is_a_feature_store(store: FeatureStore) -> None:
    assert isinstance(store, FeatureStore)


def test_redis_only_put_many_refuses_a_block_that_does_not_fit(redis_url: str, world: World) -> None:
    store = RedisFeatureStore(redis_url, world.featureset)
    try:
        block = world.store.get_many(Owner.ITEM, _raw(world, Owner.ITEM, [1, 2]))
        with pytest.raises(ValueError, match="3 ids"):
            store.put_many(Owner.ITEM, np.array([1, 2, 3]), block)
        with pytest.raises(ValueError, match="widths"):
            store.put_many(Owner.USER, np.array([1, 2]), block)
        with pytest.raises(TypeError, match="integer"):
            store.get_many(Owner.ITEM, np.array([1.0, 2.0]))
        with pytest.raises(ValueError, match="2\\*\\*63"):  # an unsigned id past int64 is not wrapped
            store.put_many(Owner.ITEM, np.array([1, 2**63], np.uint64), block)
        with pytest.raises(KeyError):  # and nothing was written under the id it would wrap to
            store.get_many(Owner.ITEM, np.array([-(2**63)]))
    finally:
        store.close()


def test_redis_only_a_row_of_another_width_is_refused(
    redis_url: str, world: World, raw_client: redis.Redis
) -> None:
    store = RedisFeatureStore(redis_url, world.featureset, prefix="lr:w")
    try:
        store.load_from(world.store)
        two, three = _raw(world, Owner.ITEM, [2, 3])
        raw_client.hset(store.key(Owner.ITEM, three), "f", b"\x00" * 8)  # as an older FeatureSet wrote it
        with pytest.raises(ValueError, match=rf"lr:w:item:{three} .*8 B"):
            store.get_many(Owner.ITEM, np.array([two, three]))
        assert store.get_many(Owner.ITEM, np.array([two])).same_bytes(world.store.get_many(Owner.ITEM, [two]))
        # an int row of 4 B a value (int32, not the int64 of ids) is refused too
        iw = world.featureset.widths(Owner.ITEM)[1]
        raw_client.hset(store.key(Owner.ITEM, two), "i", b"\x00" * (4 * iw))
        with pytest.raises(ValueError, match=rf"lr:w:item:{two} .*{4 * iw} B"):
            store.get_many(Owner.ITEM, np.array([two]))
    finally:
        store.close()


def test_redis_only_keys_are_one_hash_per_entity(
    redis_url: str, world: World, raw_client: redis.Redis
) -> None:
    store = RedisFeatureStore(redis_url, world.featureset)
    try:
        assert store.load_from(world.store) == 1_050
        assert raw_client.dbsize() == 1_050
        fw, iw = world.featureset.widths(Owner.USER)
        row = raw_client.hgetall(f"lr:f:user:{world.user_ids[7]}")  # keyed by the raw id
        assert set(row) == {b"f", b"i"}
        assert row[b"f"] == world.store.blocks[Owner.USER].floats[7].astype("<f4").tobytes()
        assert row[b"i"] == world.store.blocks[Owner.USER].ints[7].astype("<i8").tobytes()
        assert len(row[b"f"]) == 4 * fw and len(row[b"i"]) == 8 * iw
        assert not raw_client.exists("lr:f:user:7")  # not by the row number
    finally:
        store.close()


def test_redis_only_load_refuses_another_featureset(redis_url: str, world: World) -> None:
    other = World(WorldConfig(n_users=50, n_items=1000, n_creators=20, seed=3))
    fs = other.featureset
    shrunk = FeatureSet(fs.name, fs.version, fs.features[:-1])
    store = RedisFeatureStore(redis_url, shrunk)
    try:
        with pytest.raises(ValueError, match="differ"):
            store.load_from(world.store)
    finally:
        store.close()


def test_redis_only_connection_errors_name_the_server_without_its_password(world: World) -> None:
    with pytest.raises(ConnectionError) as err:
        RedisFeatureStore("redis://:hunter2@127.0.0.1:1/0", world.featureset)
    assert "127.0.0.1:1" in str(err.value) and "hunter2" not in str(err.value)


# ----------------------------------------------------------------------------------- factory
def test_open_feature_store_memory_needs_blocks(world: World) -> None:
    with pytest.raises(ValueError, match="blocks"):
        open_feature_store("memory://", world.featureset)
    assert isinstance(
        open_feature_store("memory://", world.featureset, world.store.blocks), MemoryFeatureStore
    )


def test_open_feature_store_redis_writes_the_blocks_it_is_given(redis_url: str, world: World) -> None:
    store = open_feature_store(redis_url, world.featureset, world.store.blocks, world.store.ids)
    try:
        assert isinstance(store, RedisFeatureStore)
        assert store.get_many(Owner.USER, world.user_ids).same_bytes(world.store.blocks[Owner.USER])
        with pytest.raises(KeyError):
            store.get_many(Owner.USER, np.arange(50))
    finally:
        store.close()
    plain = open_feature_store(redis_url, world.featureset, world.store.blocks)  # without ids: rows 0..N-1
    try:
        assert plain.get_many(Owner.USER, np.arange(50)).same_bytes(world.store.blocks[Owner.USER])
    finally:
        plain.close()


@pytest.mark.parametrize("url", ["ftp://host/x", "nothing-at-all", "cassandra://127.0.0.1"])
def test_open_feature_store_refuses_unknown_schemes(url: str, world: World) -> None:
    with pytest.raises(ValueError, match="backend") as err:
        open_feature_store(url, world.featureset)
    assert url in str(err.value) and "memory://" in str(err.value) and "redis://" in str(err.value)
