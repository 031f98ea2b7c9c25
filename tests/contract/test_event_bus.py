"""Contract suite of the EventBus protocol: every backend must pass it unchanged.

The bus carries ``RequestOpened`` records (the joiner's unit of work; event batches go through the
transient store), so every message here is one. Backends are built from a URL with ``open_event_bus``,
as the configuration builds them; to add one, add its URL to ``BUS_URLS``. Each test gets an empty bus:
a Redis bus works on database 15, flushed before the test, with a stream named after the test.

Redis Streams have semantics the in-process bus has no counterpart for (several consumers in a group,
idle-time claims, MAXLEN trimming, entries written by other clients); those tests run on Redis only and
say so in their names. The Redis tests skip when no server answers, and fail instead when the
environment variable CI is set.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from leanrec.events import EventBatch, EventBus, MemoryEventBus, RequestOpened, Undecodable, open_event_bus
from leanrec.events.redis_bus import MalformedEntryError, RedisEventBus, decode_opened, encode_opened

from .conftest import CLUSTER, REDIS_TEST_URL, backend_url

BUS_URLS = [
    pytest.param("memory://", id="memory"),
    pytest.param(REDIS_TEST_URL, id="redis"),
    pytest.param(CLUSTER, id="redis-cluster"),  # sharded: 16 streams over the cluster's masters
]

BusFactory = Callable[..., EventBus]
Delivered = list[tuple[str, Any]]


def _stream_name(request: pytest.FixtureRequest) -> str:
    return f"lr:test:{request.node.name}"


@pytest.fixture(params=BUS_URLS)
def bus_factory(request: pytest.FixtureRequest) -> Iterator[BusFactory]:
    """Builds buses of one backend sharing one stream; Redis options are passed through."""
    url = backend_url(request, request.param)
    is_redis = url.startswith("redis")
    made: list[EventBus] = []

    def make(**options: Any) -> EventBus:
        if is_redis:
            options.setdefault("stream", _stream_name(request))
        bus = open_event_bus(url, **options)
        made.append(bus)
        return bus

    yield make
    for bus in made:
        close = getattr(bus, "close", None)
        if callable(close):
            close()


@pytest.fixture
def redis_bus(redis_url: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., RedisEventBus]]:
    """Builds RedisEventBus clients of one stream on an empty database (Redis-only tests)."""
    made: list[RedisEventBus] = []

    def make(**options: Any) -> RedisEventBus:
        options.setdefault("stream", _stream_name(request))
        bus = RedisEventBus(redis_url, **options)
        made.append(bus)
        return bus

    yield make
    for bus in made:
        bus.close()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client of the test database, to look at and tamper with the stream directly."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _opened(i: int) -> RequestOpened:
    return RequestOpened(f"r{i}", user_id=i * 7, ts_ms=1_000 + i, n_items=1 + i % 100, fs_version=1 + i % 3)


def _messages(n: int, start: int = 0) -> list[RequestOpened]:
    """RequestOpened records, each distinguishable from the others."""
    return [_opened(i) for i in range(start, start + n)]


def _stream_of(mid: str) -> str:
    """The stream a message id is on: a sharded bus's ids are ``k/entry``; others have one stream."""
    return mid.partition("/")[0] if "/" in mid else ""


def _assert_delivered(got: Delivered, ids: list[str], msgs: list[RequestOpened]) -> None:
    """Exactly these messages, in append order on each stream (a sharded bus orders each stream only)."""
    assert sorted(mid for mid, _ in got) == sorted(ids)
    assert dict(got) == dict(zip(ids, msgs, strict=True))
    for stream in {_stream_of(mid) for mid in ids}:
        assert [mid for mid, _ in got if _stream_of(mid) == stream] == [
            mid for mid in ids if _stream_of(mid) == stream
        ]


# =================================================================================== every backend
def test_append_returns_distinct_ids_and_consume_preserves_order(bus_factory: BusFactory) -> None:
    bus = bus_factory()
    msgs = _messages(9)
    ids = bus.append_many(msgs[:4]) + bus.append_many(msgs[4:])
    assert len(ids) == 9
    assert len(set(ids)) == 9
    _assert_delivered(bus.consume(100), ids, msgs)


def test_append_nothing_returns_no_ids(bus_factory: BusFactory) -> None:
    bus = bus_factory()
    assert bus.append_many([]) == []
    assert bus.consume(10) == []


def test_consume_delivers_each_message_once(bus_factory: BusFactory) -> None:
    bus = bus_factory()
    msgs = _messages(7)
    ids = bus.append_many(msgs)
    first = bus.consume(3)
    second = bus.consume(3)
    third = bus.consume(3)
    _assert_delivered(first, ids[:3], msgs[:3])
    _assert_delivered(second, ids[3:6], msgs[3:6])
    _assert_delivered(third, ids[6:], msgs[6:])
    assert bus.consume(10) == []
    # messages appended later are delivered next, and only them
    later = bus.append_many([_opened(50)])
    _assert_delivered(bus.consume(10), later, [_opened(50)])


def test_consume_respects_max_count(bus_factory: BusFactory) -> None:
    bus = bus_factory()
    bus.append_many(_messages(5))
    assert len(bus.consume(2)) == 2
    assert len(bus.consume(0)) == 0
    assert len(bus.consume(10)) == 3


def test_delivered_messages_stay_pending_until_acked(bus_factory: BusFactory) -> None:
    bus = bus_factory()
    ids = bus.append_many(_messages(5))
    assert bus.pending() == 0  # appended is not delivered
    got = bus.consume(4)
    assert bus.pending() == 4
    assert bus.ack([got[1][0], got[3][0]]) == 2
    assert bus.pending() == 2
    assert bus.ack([got[1][0]]) == 0  # acked already
    assert bus.pending() == 2
    assert bus.ack([got[0][0], got[2][0]]) == 2
    assert bus.pending() == 0
    # the fifth was never delivered: acking it does nothing, consuming it still works
    assert bus.ack([ids[4]]) == 0
    assert [mid for mid, _ in bus.consume(10)] == [ids[4]]
    assert bus.pending() == 1


def test_ack_of_unknown_ids_counts_zero(bus_factory: BusFactory) -> None:
    bus = bus_factory()
    assert bus.ack(["999-0", "not-an-id", ""]) == 0
    assert bus.ack([]) == 0
    ids = bus.append_many(_messages(2))
    bus.consume(2)
    assert bus.ack(["999-0", ids[0], "nope", "18446744073709551616-0"]) == 1
    assert bus.pending() == 1


def test_claim_pending_redelivers_unacked_after_a_consumer_crash(bus_factory: BusFactory) -> None:
    bus = bus_factory()
    msgs = _messages(6)
    ids = bus.append_many(msgs)

    # a consumer takes four messages, makes one durable and acks it, then dies
    crashed = bus.consume(4)
    bus.ack([crashed[1][0]])
    del crashed

    # a new consumer recovers what was delivered and not acknowledged, oldest first
    claimed = bus.claim_pending()
    _assert_delivered(claimed, [ids[0], ids[2], ids[3]], [msgs[0], msgs[2], msgs[3]])
    assert bus.pending() == 3  # still pending until the new consumer acks
    _assert_delivered(bus.claim_pending(), [ids[0], ids[2], ids[3]], [msgs[0], msgs[2], msgs[3]])

    # claiming does not deliver new messages, and new consumes do not repeat the claimed ones
    _assert_delivered(bus.consume(10), ids[4:], msgs[4:])
    assert bus.ack([mid for mid, _ in claimed]) == 3
    assert [mid for mid, _ in bus.claim_pending()] == ids[4:]
    assert bus.ack(ids[4:]) == 2
    assert bus.claim_pending() == []
    assert bus.pending() == 0


def test_claim_pending_with_nothing_delivered_is_empty(bus_factory: BusFactory) -> None:
    bus = bus_factory()
    bus.append_many(_messages(3))
    assert bus.claim_pending() == []


def test_records_survive_the_bus_exactly(bus_factory: BusFactory) -> None:
    bus = bus_factory()
    odd = [
        RequestOpened("r-ünï-✓ with spaces", user_id=0, ts_ms=2**62, n_items=0, fs_version=0),
        RequestOpened("x" * 300, user_id=-5, ts_ms=-(2**40), n_items=10**9, fs_version=2**16 - 1),
        RequestOpened("0123", user_id=2**63 - 1, ts_ms=0, n_items=1, fs_version=7),
    ]
    ids = bus.append_many(odd)
    got = bus.consume(10)
    _assert_delivered(got, ids, odd)
    for _, m in got:
        assert type(m) is RequestOpened
        assert all(type(getattr(m, f)) is int for f in ("user_id", "ts_ms", "n_items", "fs_version"))


def test_every_backend_is_an_event_bus(bus_factory: BusFactory) -> None:
    assert isinstance(bus_factory(), EventBus)


# =================================================================================== Redis only
def test_redis_only_two_consumers_of_a_group_split_the_messages(
    redis_bus: Callable[..., RedisEventBus],
) -> None:
    first = redis_bus(consumer="a")
    second = redis_bus(consumer="b")
    msgs = _messages(40)
    ids = first.append_many(msgs[:25]) + second.append_many(msgs[25:])

    got_a, got_b = [], []
    while True:  # both take turns until the stream is drained
        a, b = first.consume(7), second.consume(5)
        got_a += a
        got_b += b
        if not a and not b:
            break
    ids_a, ids_b = {mid for mid, _ in got_a}, {mid for mid, _ in got_b}
    assert got_a and got_b
    assert not ids_a & ids_b  # no message delivered to both
    assert ids_a | ids_b == set(ids)  # and none lost
    assert sorted(got_a + got_b, key=lambda g: ids.index(g[0])) == list(zip(ids, msgs, strict=True))

    assert first.pending() == second.pending() == 40  # per group
    assert (first.pending_mine(), second.pending_mine()) == (len(got_a), len(got_b))
    assert first.ack([mid for mid, _ in got_a]) == len(got_a)
    assert (first.pending(), first.pending_mine(), second.pending_mine()) == (len(got_b), 0, len(got_b))
    # a consumer's claim_pending returns its own entries only while the other's are fresh
    assert first.claim_pending() == []
    assert [mid for mid, _ in second.claim_pending()] == [mid for mid, _ in got_b]


def test_redis_only_a_dead_consumers_entries_are_claimed_after_claim_idle_ms(
    redis_bus: Callable[..., RedisEventBus],
) -> None:
    idle_ms = 300
    dying = redis_bus(consumer="dying", claim_idle_ms=idle_ms)
    msgs = _messages(6)
    ids = dying.append_many(msgs)
    taken = dying.consume(4)
    dying.ack([taken[1][0]])
    dying.close()  # dropped without acking the other three

    live = redis_bus(consumer="live", claim_idle_ms=idle_ms)
    assert live.claim_pending() == []  # not idle long enough yet: the owner may still be working
    assert live.pending() == 3
    time.sleep(idle_ms * 1.5 / 1000)
    claimed = live.claim_pending()
    want = [ids[0], ids[2], ids[3]]
    _assert_delivered(claimed, want, [msgs[0], msgs[2], msgs[3]])
    assert live.pending() == 3  # still pending, now to the live consumer
    assert live.pending_mine() == 3
    _assert_delivered(live.claim_pending(), want, [msgs[0], msgs[2], msgs[3]])  # own: at once
    # the claim took only pending entries: new ones are still delivered by consume
    _assert_delivered(live.consume(10), ids[4:], msgs[4:])
    assert live.ack(want + ids[4:]) == 5
    assert live.pending() == 0
    assert live.claim_pending() == []


def test_redis_only_a_restarted_consumer_gets_back_its_own_entries_at_once(
    redis_bus: Callable[..., RedisEventBus],
) -> None:
    before = redis_bus(consumer="worker-1", claim_idle_ms=60_000)
    msgs = _messages(5)
    ids = before.append_many(msgs)
    before.consume(3)
    before.close()

    other = redis_bus(consumer="worker-2", claim_idle_ms=60_000)
    assert other.claim_pending() == []  # not idle for a minute: not another worker's to take

    after = redis_bus(consumer="worker-1", claim_idle_ms=60_000)  # same name, no waiting
    _assert_delivered(after.claim_pending(), ids[:3], msgs[:3])
    _assert_delivered(after.consume(10), ids[3:], msgs[3:])
    assert after.ack(ids) == 5
    assert after.pending() == 0


def test_redis_only_claim_pending_pages_through_many_entries(
    redis_bus: Callable[..., RedisEventBus],
) -> None:
    dying = redis_bus(consumer="dying", claim_idle_ms=0)
    msgs = _messages(2_345)
    ids = dying.append_many(msgs)
    assert len(dying.consume(3_000)) == 2_345
    dying.close()
    mine = redis_bus(consumer="dying", claim_idle_ms=0)
    _assert_delivered(mine.claim_pending(), ids, msgs)
    other = redis_bus(consumer="other", claim_idle_ms=0)
    _assert_delivered(other.claim_pending(), ids, msgs)
    assert other.pending_mine() == 2_345
    assert mine.pending_mine() == 0


def test_redis_only_maxlen_bounds_the_stream_approximately(
    redis_bus: Callable[..., RedisEventBus], raw: redis.Redis
) -> None:
    maxlen = 50
    bus = redis_bus(maxlen=maxlen)
    node = int(raw.config_get("stream-node-max-entries")["stream-node-max-entries"])
    for start in range(0, 3_000, 100):
        bus.append_many(_messages(100, start))
        length = raw.xlen(bus.stream)
        assert length <= maxlen + node  # "~": trims whole nodes, never far past the bound
    assert maxlen <= bus.length() <= maxlen + node
    assert bus.appended == 3_000
    # what is left is the newest entries, and it is delivered in order
    got = bus.consume(10_000)
    assert [m for _, m in got] == _messages(len(got), 3_000 - len(got))


def test_redis_only_pending_entries_trimmed_away_are_counted_and_acked(
    redis_bus: Callable[..., RedisEventBus], raw: redis.Redis
) -> None:
    bus = redis_bus(maxlen=10, claim_idle_ms=0)
    bus.append_many(_messages(5))
    taken = bus.consume(5)
    assert len(taken) == 5
    raw.xtrim(bus.stream, maxlen=0)  # what a burst of appends with a small MAXLEN does
    assert bus.claim_pending() == []
    assert bus.trimmed == 5
    assert bus.pending() == 0


def test_redis_only_malformed_entries_are_counted_skipped_and_acked(
    redis_bus: Callable[..., RedisEventBus], raw: redis.Redis
) -> None:
    bus = redis_bus()
    good = _messages(4)
    fields = {k: v for k, v in encode_opened(good[0]).items()}
    bad_entries = [
        {"request_id": b"r-x", "user_id": b"12"},  # fields missing
        {**fields, "user_id": b"twelve"},  # not an integer
        {**fields, "request_id": b"\xff\xfe"},  # not UTF-8
        {**fields, "n_items": b"-3"},  # out of range
        {**fields, "extra": b"1"},  # unexpected field
        {"payload": b"\x00" * 10},  # something else entirely
    ]
    ids = bus.append_many(good[:2])
    bad_ids = [raw.xadd(bus.stream, e).decode() for e in bad_entries]  # type: ignore[arg-type]
    ids += bus.append_many(good[2:])

    got = bus.consume(3)  # reads past the malformed entries to find three good ones
    _assert_delivered(got, ids[:3], good[:3])
    assert bus.malformed == len(bad_entries)
    assert bus.last_malformed is not None and bad_ids[-1] in bus.last_malformed
    assert bus.pending() == 3  # the malformed ones were acknowledged, not left pending
    _assert_delivered(bus.consume(10), ids[3:], good[3:])
    assert bus.claim_pending() == list(zip(ids, good, strict=True))
    assert bus.malformed == len(bad_entries)  # each counted once


def test_redis_only_malformed_entries_are_delivered_raw_and_stay_pending_when_asked(
    redis_bus: Callable[..., RedisEventBus], raw: redis.Redis
) -> None:
    bus = redis_bus(deliver_malformed=True, claim_idle_ms=0)
    good = _messages(2)
    ids = bus.append_many(good[:1])
    bad = {"request_id": b"r-x", "user_id": b"twelve", "payload": b"\x00\xff"}
    bad_id = raw.xadd(bus.stream, bad).decode()  # type: ignore[arg-type]
    ids += bus.append_many(good[1:])

    got = bus.consume(10)
    assert [mid for mid, _ in got] == [ids[0], bad_id, ids[1]]
    assert [m for _, m in got][::2] == good
    odd = got[1][1]
    assert isinstance(odd, Undecodable)
    assert dict(odd.fields) == {k.encode(): v for k, v in bad.items()}  # the bytes as stored
    assert "unexpected fields" in odd.reason and "missing fields" in odd.reason
    assert bus.malformed == 1
    assert bus.pending() == 3  # left to the consumer to acknowledge once it has kept it
    assert [mid for mid, _ in bus.claim_pending()] == [ids[0], bad_id, ids[1]]
    assert bus.ack([bad_id]) == 1
    assert [mid for mid, _ in bus.claim_pending()] == ids


def test_redis_only_a_malformed_entry_is_refused_naming_its_id() -> None:
    fields = {k.encode(): v for k, v in encode_opened(_opened(3)).items()}
    with pytest.raises(MalformedEntryError, match=r"1234-5 in stream 's'.*user_id") as err:
        decode_opened({**fields, b"user_id": b"1.5"}, "1234-5", "s")
    assert err.value.entry_id == "1234-5"
    with pytest.raises(MalformedEntryError, match=r"missing fields \['ts_ms', 'n_items', 'fs_version'\]$"):
        decode_opened({b"request_id": b"r", b"user_id": b"1"}, "1-0")
    assert decode_opened(fields, "1-0") == _opened(3)
    for bad in (b" 7", b"+7", b"1_000", b"", b"7\n"):
        with pytest.raises(MalformedEntryError, match="ts_ms"):
            decode_opened({**fields, b"ts_ms": bad}, "1-0")


def test_redis_only_refuses_what_it_cannot_carry_and_writes_nothing(
    redis_bus: Callable[..., RedisEventBus], raw: redis.Redis
) -> None:
    import numpy as np

    bus = redis_bus()
    batch = EventBatch("r1", *(np.zeros(1, dt) for dt in (np.int32, np.int64, np.int8, np.int64, np.float32)))
    with pytest.raises(TypeError, match=r"message 1.*RequestOpened"):
        bus.append_many([_opened(0), batch])  # type: ignore[list-item]
    for bad in (
        RequestOpened("", 1, 2, 3, 4),
        RequestOpened("r", 1.5, 2, 3, 4),  # type: ignore[arg-type]
        RequestOpened("r", 1, 2, -1, 4),
        RequestOpened("r", 1, 2, 3, 2**16),
        RequestOpened("r", True, 2, 3, 4),
    ):
        with pytest.raises(ValueError, match="message 1"):
            bus.append_many([_opened(0), bad])
    assert bus.length() == 0
    assert bus.appended == 0
    # numpy integers are integers
    [mid] = bus.append_many([RequestOpened("r", np.int64(5), np.int64(6), np.int32(7), np.int16(1))])
    assert bus.consume(1) == [(mid, RequestOpened("r", 5, 6, 7, 1))]


def test_redis_only_a_flushed_stream_and_group_are_recreated(
    redis_bus: Callable[..., RedisEventBus], raw: redis.Redis
) -> None:
    bus = redis_bus()
    bus.append_many(_messages(2))
    raw.flushdb()
    assert bus.consume(10) == []
    assert bus.pending() == 0
    assert bus.claim_pending() == []
    ids = bus.append_many(_messages(2))
    assert [mid for mid, _ in bus.consume(10)] == ids


def test_redis_only_entries_appended_before_the_group_exists_are_delivered(
    redis_url: str, raw: redis.Redis
) -> None:
    fields = encode_opened(_opened(1))
    early = raw.xadd("lr:early", fields).decode()  # type: ignore[arg-type]
    bus = RedisEventBus(redis_url, stream="lr:early", group="late-joiners")
    try:
        assert bus.consume(10) == [(early, _opened(1))]
    finally:
        bus.close()


def test_redis_only_connection_errors_name_the_server_without_its_password() -> None:
    url = "redis://joiner:s3cret@127.0.0.1:1/0"
    with pytest.raises(ConnectionError) as err:
        RedisEventBus(url)
    assert "127.0.0.1:1" in str(err.value)
    assert "s3cret" not in str(err.value)
    assert "***" in str(err.value)


@pytest.mark.parametrize("options", [{"maxlen": 0}, {"claim_idle_ms": -1}])
def test_redis_only_refuses_bad_options(redis_url: str, options: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=next(iter(options))):
        RedisEventBus(redis_url, **options)


# =================================================================================== factory
def test_open_event_bus_builds_each_backend(redis_url: str) -> None:
    assert isinstance(open_event_bus("memory://"), MemoryEventBus)
    bus = open_event_bus(redis_url, stream="lr:factory", consumer="x", claim_idle_ms=5)
    try:
        assert isinstance(bus, RedisEventBus)
        assert (bus.stream, bus.consumer, bus.claim_idle_ms, bus.group) == ("lr:factory", "x", 5, "joiners")
    finally:
        bus.close()


@pytest.mark.parametrize("url", ["kafka://broker:9092/t", "nothing-at-all", "memcached://127.0.0.1"])
def test_open_event_bus_refuses_unknown_schemes(url: str) -> None:
    with pytest.raises(ValueError, match="backend") as err:
        open_event_bus(url)
    assert url in str(err.value)
    assert "memory://" in str(err.value) and "redis://" in str(err.value)


def test_open_event_bus_refuses_options_the_memory_bus_has_not() -> None:
    with pytest.raises(TypeError, match="consumer"):
        open_event_bus("memory://", consumer="c1")


def test_memory_bus_is_an_event_bus() -> None:
    assert isinstance(MemoryEventBus(), EventBus)
