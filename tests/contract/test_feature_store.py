"""Contract suite of the FeatureStore protocol: every backend must pass it unchanged.

Each test gets a store holding the features of a small World (50 users, 1,000 items), built with
``open_feature_store`` from a URL as the configuration builds it; a Redis store works on database 15,
flushed before the test, and is filled by copying the World's in-process store into it. Reads are
compared byte for byte with the World's blocks (``FeatureBlock.same_bytes``). To add a backend, add its
URL to ``STORE_URLS``.

The Redis tests skip when no server answers, and fail instead when the environment variable CI is set.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import redis

from leanrec.schema import FeatureBlock, FeatureSet, Owner
from leanrec.stores import FeatureStore, MemoryFeatureStore, open_feature_store
from leanrec.stores.redis_features import RedisFeatureStore
from leanrec.world import World, WorldConfig

from .conftest import REDIS_TEST_URL, flush_redis, require_redis

STORE_URLS = [
    pytest.param("memory://", id="memory"),
    pytest.param(REDIS_TEST_URL, id="redis"),
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
    if request.param.startswith("redis://"):
        require_redis(request.param)
        flush_redis(request.param)
    return request.param


@pytest.fixture
def store(store_url: str, world: World, reference: dict[Owner, FeatureBlock]) -> Iterator[FeatureStore]:
    if store_url.startswith("memory://"):
        blocks = {owner: block.copy() for owner, block in reference.items()}
        made: FeatureStore = open_feature_store(store_url, world.featureset, blocks)
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


def _ids(owner: Owner, seed: int = 0, n: int = 40) -> np.ndarray:
    """Unordered ids with repeats, as candidate lists ask for them."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, N[owner], n)
    return np.concatenate([ids, ids[:5], [0, N[owner] - 1]])


# ----------------------------------------------------------------------------------- get_many
@pytest.mark.parametrize("owner", OWNERS)
def test_get_many_returns_the_rows_byte_for_byte(
    store: FeatureStore, reference: dict[Owner, FeatureBlock], owner: Owner
) -> None:
    ids = _ids(owner)
    got = store.get_many(owner, ids)
    want = reference[owner].take(ids)
    assert len(got) == len(ids)
    assert got.same_bytes(want)
    assert got.floats.dtype == np.float32 and got.ints.dtype == np.int32
    everything = store.get_many(owner, np.arange(N[owner]))
    assert everything.same_bytes(reference[owner])


@pytest.mark.parametrize("owner", OWNERS)
def test_get_many_returns_a_copy_the_caller_owns(
    store: FeatureStore, reference: dict[Owner, FeatureBlock], owner: Owner
) -> None:
    ids = np.array([3, 1, 3])
    got = store.get_many(owner, ids)
    got.floats[:] = 123.0  # writable, and writing to it changes nothing in the store
    got.ints[:] = 7
    assert store.get_many(owner, ids).same_bytes(reference[owner].take(ids))


def test_get_many_of_no_ids_is_an_empty_block_of_the_owner_widths(store: FeatureStore, world: World) -> None:
    for owner in (Owner.USER, Owner.ITEM):
        got = store.get_many(owner, np.array([], np.int64))
        assert len(got) == 0
        assert (got.floats.shape[1], got.ints.shape[1]) == world.featureset.widths(owner)


# ----------------------------------------------------------------------------------- put_many
@pytest.mark.parametrize("owner", OWNERS)
def test_put_many_then_get_many_round_trips(
    store: FeatureStore, reference: dict[Owner, FeatureBlock], owner: Owner
) -> None:
    ids = np.array([7, 2, 30])
    block = reference[owner].take(ids)
    rng = np.random.default_rng(5)
    block.floats[:] = rng.normal(size=block.floats.shape).astype(np.float32)
    block.ints[:] = rng.integers(-(2**31), 2**31 - 1, block.ints.shape, dtype=np.int32)
    store.put_many(owner, ids, block)
    assert store.get_many(owner, ids).same_bytes(block)
    # the other rows are untouched
    others = np.setdiff1d(np.arange(N[owner]), ids)
    assert store.get_many(owner, others).same_bytes(reference[owner].take(others))


def test_put_many_keeps_special_float_bytes(
    store: FeatureStore, reference: dict[Owner, FeatureBlock]
) -> None:
    owner = Owner.ITEM
    ids = np.array([11])
    block = reference[owner].take(ids)
    special = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45], np.float32)
    special_bits = special.view(np.uint32).copy()
    special_bits[0] = 0x7FC0_1234  # a NaN with a payload
    block.floats[0, : len(special)] = special_bits.view(np.float32)
    block.ints[0, :2] = [-(2**31), 2**31 - 1]
    store.put_many(owner, ids, block)
    got = store.get_many(owner, ids)
    assert got.same_bytes(block)
    assert got.floats[0, : len(special)].view(np.uint32).tolist() == special_bits.tolist()


# ----------------------------------------------------------------------------------- get_feature
@pytest.mark.parametrize("owner", OWNERS)
def test_get_feature_returns_the_features_columns(
    store: FeatureStore, world: World, reference: dict[Owner, FeatureBlock], owner: Owner
) -> None:
    fs: FeatureSet = world.featureset
    ids = _ids(owner, seed=9)
    rows = reference[owner].take(ids)
    for name, slot in fs.owner_slots(owner).items():
        got = store.get_feature(owner, name, ids)
        src = rows.floats if slot.feature.is_float else rows.ints
        want = src[:, slot.offset : slot.stop]
        assert got.shape == (len(ids), slot.feature.size), name
        assert got.dtype == want.dtype, name
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), name


def test_get_feature_sees_what_put_many_wrote(store: FeatureStore, world: World) -> None:
    owner, ids = Owner.ITEM, np.array([4, 5])
    block = store.get_many(owner, ids)
    slot = world.featureset.owner_slots(owner)["i_views_log"]
    block.floats[:, slot.offset] = [1.5, -2.5]
    store.put_many(owner, ids, block)
    assert store.get_feature(owner, "i_views_log", np.array([5, 4, 5])).ravel().tolist() == [-2.5, 1.5, -2.5]


def test_get_feature_of_an_unknown_feature_raises_key_error(store: FeatureStore) -> None:
    with pytest.raises(KeyError):
        store.get_feature(Owner.ITEM, "no_such_feature", np.array([1]))


# ----------------------------------------------------------------------------------- unknown ids
@pytest.mark.parametrize("owner", OWNERS)
@pytest.mark.parametrize("unknown", [[5_000], [-1], [10_000, 99_999]], ids=["past-end", "negative", "two"])
def test_unknown_ids_raise_key_error_naming_the_owner_and_ids(
    store: FeatureStore,
    world: World,
    owner: Owner,
    unknown: list[int],
) -> None:
    ids = np.array([0, *unknown, 1])
    with pytest.raises(KeyError, match=owner.value) as err:
        store.get_many(owner, ids)
    assert all(str(u) in str(err.value) for u in unknown)
    with pytest.raises(KeyError, match=owner.value):
        store.get_feature(owner, next(iter(world.featureset.owner_slots(owner))), ids)


def test_an_owner_the_store_does_not_hold_raises_key_error(store: FeatureStore) -> None:
    with pytest.raises(KeyError, match="context"):
        store.get_many(Owner.CONTEXT, np.array([0]))


# ----------------------------------------------------------------------------------- protocol, refusals
def test_every_backend_is_a_feature_store(store: FeatureStore) -> None:
    assert isinstance(store, FeatureStore)


def test_redis_only_put_many_refuses_a_block_that_does_not_fit(redis_url: str, world: World) -> None:
    store = RedisFeatureStore(redis_url, world.featureset)
    try:
        block = world.store.get_many(Owner.ITEM, np.array([1, 2]))
        with pytest.raises(ValueError, match="3 ids"):
            store.put_many(Owner.ITEM, np.array([1, 2, 3]), block)
        with pytest.raises(ValueError, match="widths"):
            store.put_many(Owner.USER, np.array([1, 2]), block)
        with pytest.raises(TypeError, match="integer"):
            store.get_many(Owner.ITEM, np.array([1.0, 2.0]))
    finally:
        store.close()


def test_redis_only_a_row_of_another_width_is_refused(
    redis_url: str, world: World, raw_client: redis.Redis
) -> None:
    store = RedisFeatureStore(redis_url, world.featureset, prefix="lr:w")
    try:
        store.load_from(world.store)
        raw_client.hset(store.key(Owner.ITEM, 3), "f", b"\x00" * 8)  # as an older FeatureSet wrote it
        with pytest.raises(ValueError, match=r"lr:w:item:3 .*8 B"):
            store.get_many(Owner.ITEM, np.array([2, 3]))
        assert store.get_many(Owner.ITEM, np.array([2])).same_bytes(world.store.get_many(Owner.ITEM, [2]))
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
        row = raw_client.hgetall("lr:f:user:7")
        assert set(row) == {b"f", b"i"}
        assert row[b"f"] == world.store.blocks[Owner.USER].floats[7].astype("<f4").tobytes()
        assert len(row[b"f"]) == 4 * fw and len(row[b"i"]) == 4 * iw
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
    store = open_feature_store(redis_url, world.featureset, world.store.blocks)
    try:
        assert isinstance(store, RedisFeatureStore)
        assert store.get_many(Owner.USER, np.arange(50)).same_bytes(world.store.blocks[Owner.USER])
    finally:
        store.close()


@pytest.mark.parametrize("url", ["ftp://host/x", "nothing-at-all", "cassandra://127.0.0.1"])
def test_open_feature_store_refuses_unknown_schemes(url: str, world: World) -> None:
    with pytest.raises(ValueError, match="backend") as err:
        open_feature_store(url, world.featureset)
    assert url in str(err.value) and "memory://" in str(err.value) and "redis://" in str(err.value)
