"""Contract suite of the EventBus protocol: every backend must pass it unchanged.

To run it against another backend, add an entry to ``BUS_BACKENDS`` (e.g. a Redis Streams bus on
``redis://127.0.0.1:6379/15``) and teach ``_open_bus`` to build it. Each test gets an empty bus.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest

from leanrec.events import EventBatch, EventBus, EventKind, MemoryEventBus, Message, RequestOpened

BUS_BACKENDS = [
    pytest.param("memory://", id="memory"),
    # pytest.param("redis://127.0.0.1:6379/15", id="redis"),  # with the Redis Streams bus
]

BusFactory = Callable[[], EventBus]


def _open_bus(url: str) -> EventBus:
    if url.startswith("memory://"):
        return MemoryEventBus()
    raise NotImplementedError(f"no EventBus backend wired into the contract suite for {url}")


@pytest.fixture(params=BUS_BACKENDS)
def bus_factory(request: pytest.FixtureRequest) -> Iterator[BusFactory]:
    made: list[EventBus] = []

    def make() -> EventBus:
        bus = _open_bus(request.param)
        made.append(bus)
        return bus

    yield make
    for bus in made:
        close = getattr(bus, "close", None)
        if callable(close):
            close()


def _opened(i: int) -> RequestOpened:
    return RequestOpened(f"r{i}", user_id=i * 7, ts_ms=1_000 + i, n_items=100, fs_version=1)


def _events(i: int, n: int = 3) -> EventBatch:
    return EventBatch(
        f"r{i}",
        np.arange(n, dtype=np.int32) + i,
        np.arange(n, dtype=np.int32) * 11 + i,
        np.full(n, EventKind.CLICK, np.int8),
        np.arange(n, dtype=np.int64) + 2_000 + i,
        np.linspace(0, 1_000, n).astype(np.float32),
    )


def _messages(n: int) -> list[Message]:
    """Alternating RequestOpened and EventBatch messages, each distinguishable from the others."""
    return [_opened(i) if i % 2 == 0 else _events(i, n=1 + i % 4) for i in range(n)]


def _same(a: Message, b: Message) -> bool:
    if isinstance(a, RequestOpened) or isinstance(b, RequestOpened):
        return a == b
    cols = ("position", "item_id", "kind", "ts_ms", "value")
    return (
        isinstance(a, EventBatch)
        and isinstance(b, EventBatch)
        and a.request_id == b.request_id
        and all(np.array_equal(getattr(a, c), getattr(b, c)) for c in cols)
    )


def _assert_delivered(got: list[tuple[str, Message]], ids: list[str], msgs: list[Message]) -> None:
    assert [mid for mid, _ in got] == ids
    assert len(got) == len(msgs)
    for (_, g), m in zip(got, msgs, strict=True):
        assert _same(g, m), (g, m)


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
    ids = bus.append_many(_messages(2))
    bus.consume(2)
    assert bus.ack(["999-0", ids[0], "nope"]) == 1
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


def test_event_batches_survive_the_bus_byte_exact(bus_factory: BusFactory) -> None:
    bus = bus_factory()
    batch = EventBatch(
        "r-exact",
        np.array([0, 5, 99], np.int32),
        np.array([2_999, 0, 1_234], np.int32),
        np.array([EventKind.VIEW, EventKind.WATCH, EventKind.SHARE], np.int8),
        np.array([2**40, 2**40 + 1, 2**40 + 7], np.int64),
        np.array([0.0, 12_345.5, 0.0], np.float32),
    )
    bus.append_many([batch])
    [(_, got)] = bus.consume(1)
    assert isinstance(got, EventBatch)
    assert _same(got, batch)
    assert got.ts_ms.dtype == np.int64
    assert got.value.dtype == np.float32


def test_memory_bus_is_an_event_bus() -> None:
    assert isinstance(MemoryEventBus(), EventBus)
