"""Event validation, record parsing, and the serving entry points that use them."""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pytest

from leanrec.clock import ManualClock
from leanrec.energy import CostLedger
from leanrec.events import (
    EventBatch,
    EventKind,
    EventLimits,
    MemoryEventBus,
    Message,
    RequestOpened,
    RequestRef,
    validate,
)
from leanrec.featurelog import ContextCache, LazyLogger, Paging, key
from leanrec.funnel import Funnel, RankedBatch
from leanrec.ids import string_ids
from leanrec.serve import LoggingService, LoggingUnavailable
from leanrec.stores import MemoryTransientStore, StoreFullError, TransientStore
from leanrec.world import World

T0 = 1_700_000_000_000
REF = RequestRef("r1", user_id=5, ts_ms=T0, n_items=100)
LIMITS = EventLimits(max_events=50, window_ms=600_000, max_watch_ms=3_600_000.0)
EVENT_HEADER = "<2sBIH"
"""An event blob's header: magic, version, events, request id bytes."""


def _batch(rows: list[tuple[int, int, int, int, float]], request_id: str = "r1") -> EventBatch:
    """Rows of (position, item_id, kind, ts_ms, value)."""
    cols = list(zip(*rows, strict=True)) if rows else [[]] * 5
    return EventBatch(
        request_id,
        np.asarray(cols[0], np.int32),
        np.asarray(cols[1], np.int64),
        np.asarray(cols[2], np.int8),
        np.asarray(cols[3], np.int64),
        np.asarray(cols[4], np.float32),
    )


GOOD = [
    (0, 100, EventKind.VIEW, T0 + 1_000, 0.0),
    (3, 103, EventKind.CLICK, T0 + 2_000, 0.0),
    (3, 103, EventKind.WATCH, T0 + 9_000, 12_000.0),
    (99, 199, EventKind.LIKE, T0 + LIMITS.window_ms, 0.0),  # last position, last moment: still fine
    (7, 107, EventKind.SHARE, T0, 0.0),  # at rank time: fine
    (8, 108, EventKind.WATCH, T0 + 5, LIMITS.max_watch_ms),  # the longest plausible watch
    (9, 2**63 - 1, EventKind.CLICK, T0 + 6, 0.0),  # item ids are raw int64 values: any of them
    (10, -(2**63), EventKind.VIEW, T0 + 7, 0.0),
]

BAD = {
    "unknown_kind": [(4, 104, 9, T0 + 1_000, 0.0), (4, 104, -1, T0 + 1_000, 0.0)],
    "bad_position": [(100, 1, EventKind.VIEW, T0 + 1, 0.0), (-1, 1, EventKind.VIEW, T0 + 1, 0.0)],
    "before_rank": [(1, 101, EventKind.CLICK, T0 - 1, 0.0)],
    "late": [(1, 101, EventKind.CLICK, T0 + LIMITS.window_ms + 1, 0.0)],
    "bad_value": [
        (2, 102, EventKind.WATCH, T0 + 10, float("nan")),
        (2, 102, EventKind.WATCH, T0 + 10, -1.0),
        (2, 102, EventKind.WATCH, T0 + 10, LIMITS.max_watch_ms + 1_000),
        (2, 102, EventKind.WATCH, T0 + 10, float("inf")),
    ],
}

MESSAGE_SAYS = {
    "unknown_kind": "kind",
    "bad_position": "position outside the ranked list of 100",
    "before_rank": "before the ranking",
    "late": "after the attribution window of 600000 ms",
    "bad_value": "value must be finite",
}


def _rows_of(batch: EventBatch) -> list[tuple[int, int, int, int, float]]:
    return list(
        zip(
            batch.position.tolist(),
            batch.item_id.tolist(),
            batch.kind.tolist(),
            batch.ts_ms.tolist(),
            batch.value.tolist(),
            strict=True,
        )
    )


# ----------------------------------------------------------------------------------- validate
def test_a_good_batch_is_kept_whole() -> None:
    kept, report = validate(_batch(GOOD), REF, LIMITS)
    assert _rows_of(kept) == [(p, i, int(k), t, v) for p, i, k, t, v in GOOD]
    assert report.total == 0
    assert not report.refused
    assert report.messages == {}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_each_bad_event_is_refused_counted_and_explained_and_the_good_kept(reason: str) -> None:
    bad = BAD[reason]
    rows = [GOOD[0], bad[0], GOOD[1], *bad[1:], GOOD[2]]
    kept, report = validate(_batch(rows), REF, LIMITS)
    assert report.refused == {reason: len(bad)}
    assert report.total == len(bad)
    assert MESSAGE_SAYS[reason] in report.messages[reason]
    assert _rows_of(kept) == [(p, i, int(k), t, v) for p, i, k, t, v in (GOOD[0], GOOD[1], GOOD[2])]
    assert kept.request_id == "r1"


def test_every_reason_in_one_batch_each_counted_once() -> None:
    rows = [r for bad in BAD.values() for r in bad] + GOOD
    # an event wrong in two ways is counted under one reason only
    rows.append((200, 1, 9, T0 - 5, float("nan")))
    kept, report = validate(_batch(rows), REF, LIMITS)
    assert len(kept) == len(GOOD)
    assert report.total == len(rows) - len(GOOD)
    assert set(report.refused) == set(BAD)
    for reason, bad in BAD.items():
        assert report.refused[reason] >= len(bad)


def test_too_many_events_refuse_the_batch() -> None:
    rows = [(i % 100, i, EventKind.VIEW, T0 + i, 0.0) for i in range(LIMITS.max_events + 1)]
    kept, report = validate(_batch(rows), REF, LIMITS)
    assert len(kept) == 0
    assert report.refused == {"too_many": 51}
    assert "51 events" in report.messages["too_many"]
    assert "limit 50" in report.messages["too_many"]
    # at the limit it is fine
    kept, report = validate(_batch(rows[:50]), REF, LIMITS)
    assert len(kept) == 50
    assert report.total == 0


def test_events_of_another_request_are_refused() -> None:
    kept, report = validate(_batch(GOOD, request_id="r2"), REF, LIMITS)
    assert len(kept) == 0
    assert report.refused == {"wrong_request": len(GOOD)}
    assert "r2" in report.messages["wrong_request"]
    assert "r1" in report.messages["wrong_request"]


def test_an_empty_batch_is_valid_and_empty() -> None:
    kept, report = validate(_batch([]), REF, LIMITS)
    assert len(kept) == 0
    assert report.total == 0


# ----------------------------------------------------------------------------------- from_records
def _record(**over: object) -> dict[str, object]:
    rec: dict[str, object] = {"position": 3, "item_id": 103, "kind": "click", "ts_ms": T0 + 10}
    rec.update(over)
    return rec


def test_from_records_builds_columns() -> None:
    batch, errors = EventBatch.from_records(
        "r1",
        [_record(), _record(kind="WATCH", value=1500), _record(position=0, kind="View", value=0.5)],
    )
    assert errors == []
    assert batch.request_id == "r1"
    assert batch.position.tolist() == [3, 3, 0]
    assert batch.kind.tolist() == [EventKind.CLICK, EventKind.WATCH, EventKind.VIEW]
    assert batch.value.tolist() == [0.0, 1500.0, 0.5]
    assert batch.ts_ms.tolist() == [T0 + 10] * 3
    assert (batch.position.dtype, batch.item_id.dtype, batch.kind.dtype) == (np.int32, np.int64, np.int8)
    assert (batch.ts_ms.dtype, batch.value.dtype) == (np.int64, np.float32)


@pytest.mark.parametrize("item_id", [2**63 - 1, -(2**63), 2**40, -7, 0])
def test_from_records_keeps_any_64_bit_item_id(item_id: int) -> None:
    batch, errors = EventBatch.from_records("r1", [_record(item_id=item_id), _record(item_id=5)])
    assert errors == []
    assert batch.item_id.dtype == np.int64 and batch.item_id.tolist() == [item_id, 5]
    assert EventBatch.from_bytes(batch.to_bytes()).item_id.tolist() == [item_id, 5]


def test_from_records_hashes_string_item_ids_where_the_items_are_strings() -> None:
    records = [_record(item_id="sku-1"), _record(item_id=42), _record(item_id="a")]
    batch, errors = EventBatch.from_records("r1", records, string_items=True)
    assert errors == []
    assert batch.item_id.tolist() == [string_ids(["sku-1"])[0], 42, 0xAF63DC4C8601EC8C - 2**64]
    # without string items a string is no item id; with them, neither is anything but a string or int
    batch, errors = EventBatch.from_records("r1", [_record(item_id="sku-1"), _record()])
    assert len(batch) == 1 and errors == ["event 0: position, item_id and ts_ms must be integers"]
    batch, errors = EventBatch.from_records("r1", [_record(item_id=1.5), _record()], string_items=True)
    assert len(batch) == 1 and errors == [
        "event 0: position, item_id and ts_ms must be integers (item_id may be a string)"
    ]


def _without(field: str) -> dict[str, object]:
    rec = _record()
    del rec[field]
    return rec


MALFORMED = [
    (_without("position"), "missing field 'position'"),
    (_without("kind"), "missing field 'kind'"),
    (_without("ts_ms"), "missing field 'ts_ms'"),
    (_without("item_id"), "missing field 'item_id'"),
    (_record(position=2.5), "must be integers"),
    (_record(position="3"), "must be integers"),
    (_record(position=None), "must be integers"),
    (_record(ts_ms=1.0e12), "must be integers"),
    (_record(kind="poke"), "unknown kind 'poke'"),
    (_record(kind=1), "unknown kind 1"),
    (_record(position=True), "must be integers"),
    (_record(item_id=False), "must be integers"),
    (_record(kind="watch", value=True), "value must be a number"),
    (_record(kind="watch", value="12"), "value must be a number"),
    (["not", "an", "object"], "expected an object"),
    (_record(position=2**31), "position must fit in 32 bits"),
    (_record(position=2**32 + 3), "position must fit in 32 bits"),
    (_record(item_id=2**63), "item_id and ts_ms must fit in 64 bits"),  # never wrapped onto -(2**63)
    (_record(item_id=-(2**63) - 1), "item_id and ts_ms must fit in 64 bits"),
    (_record(item_id="103"), "must be integers"),
    (_record(ts_ms=2**63), "must fit in 64 bits"),
    (_record(ts_ms=2**70), "must fit in 64 bits"),
]


@pytest.mark.parametrize(("bad", "says"), MALFORMED, ids=[m[1] + f"-{i}" for i, m in enumerate(MALFORMED)])
def test_malformed_records_are_refused_naming_the_event_and_the_good_kept(bad: object, says: str) -> None:
    records = [_record(position=0), _record(position=1), bad, _record(position=3, kind="like")]
    batch, errors = EventBatch.from_records("r1", records)  # type: ignore[arg-type]
    assert len(errors) == 1
    assert errors[0].startswith("event 2: ")
    assert says in errors[0]
    assert batch.position.tolist() == [0, 1, 3]
    assert batch.kind.tolist() == [EventKind.CLICK, EventKind.CLICK, EventKind.LIKE]


def test_from_records_reports_every_bad_record() -> None:
    records = [
        _record(kind="poke"),
        _record(),
        _without("ts_ms"),
        _record(position=True),
        _record(position=9),
    ]
    batch, errors = EventBatch.from_records("r1", records)
    assert [e.split(":")[0] for e in errors] == ["event 0", "event 2", "event 3"]
    assert batch.position.tolist() == [3, 9]


def test_from_records_with_nothing_good_is_an_empty_batch() -> None:
    batch, errors = EventBatch.from_records("r1", [_record(kind="poke")])
    assert len(batch) == 0
    assert len(errors) == 1
    assert batch.ts_ms.dtype == np.int64


# ----------------------------------------------------------------------------------- bytes
def test_a_batch_is_written_as_version_2_with_int64_item_ids_and_reads_back_exactly() -> None:
    batch = _batch(GOOD, request_id="r-ünï")
    blob = batch.to_bytes()
    magic, version, n, rid_len = struct.unpack_from(EVENT_HEADER, blob)
    assert magic == b"LE"
    assert (version, n, rid_len) == (2, len(GOOD), len("r-ünï".encode()))
    assert len(blob) == struct.calcsize(EVENT_HEADER) + rid_len + n * (4 + 8 + 1 + 8 + 4)
    back = EventBatch.from_bytes(blob)
    assert back.request_id == "r-ünï" and back.item_id.dtype == np.int64
    assert _rows_of(back) == _rows_of(batch)


def test_a_version_1_batch_with_int32_item_ids_still_reads() -> None:
    rows = [(0, 100, EventKind.VIEW, T0, 0.0), (3, -(2**31), EventKind.WATCH, T0 + 9, 1_500.0)]
    batch = _batch(rows)
    blob = batch.to_bytes()
    head = struct.calcsize(EVENT_HEADER)
    magic, _, n, rid_len = struct.unpack_from(EVENT_HEADER, blob)
    off = head + rid_len
    cols = (
        batch.position.astype("<i4"),
        batch.item_id.astype("<i4"),  # as version 1 wrote them
        batch.kind.astype("i1"),
        batch.ts_ms.astype("<i8"),
        batch.value.astype("<f4"),
    )
    v1 = (
        struct.pack(EVENT_HEADER, magic, 1, n, rid_len) + blob[head:off] + b"".join(c.tobytes() for c in cols)
    )
    back = EventBatch.from_bytes(v1)
    assert back.item_id.dtype == np.int64 and _rows_of(back) == _rows_of(batch)
    with pytest.raises(ValueError, match=r"expected \d+ B"):  # a version 1 header on a version 2 body
        EventBatch.from_bytes(v1[:head] + blob[head:])
    with pytest.raises(ValueError, match="version 3"):
        EventBatch.from_bytes(struct.pack(EVENT_HEADER, magic, 3, n, rid_len) + blob[head:])


# ----------------------------------------------------------------------------------- LoggingService
class FaultyStore:
    """The real in-process store, with named methods made to raise (a fault injector, not a mock)."""

    def __init__(self, inner: MemoryTransientStore) -> None:
        self.inner = inner
        self.failing: dict[str, Exception] = {}
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> object:
        method = getattr(self.inner, name)

        def call(*args: object, **kwargs: object) -> object:
            self.calls[name] += 1
            if name in self.failing:
                raise self.failing[name]
            return method(*args, **kwargs)

        return call


class FaultyBus(MemoryEventBus):
    """The real in-process bus, whose appends raise while ``failing`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: Exception | None = None

    def append_many(self, messages: Sequence[Message]) -> list[str]:
        if self.failing is not None:
            raise self.failing
        return super().append_many(messages)


def _service_on(
    world: World, store: TransientStore, bus: MemoryEventBus, clock: ManualClock
) -> tuple[LoggingService, LazyLogger]:
    ledger = CostLedger()
    contexts = ContextCache(1 << 30, 120_000, LIMITS.window_ms, clock, ledger)
    logger = LazyLogger(world.featureset, store, bus, ledger, 900_000, contexts, Paging())
    return LoggingService(logger, bus, LIMITS, clock), logger


def _ref(world: World, request_id: str = "r1", row: int = 5) -> RequestRef:
    """A request ranked at ``T0`` for the world's user of row ``row``, by its raw id."""
    return RequestRef(request_id, int(world.user_ids[row]), T0, 100)


ITEM_AT = np.arange(100, 200, dtype=np.int64)
"""The item ranked at each position in these tests: ``100 + position``, as GOOD and BAD name them..."""
ITEM_AT[9], ITEM_AT[10] = 2**63 - 1, -(2**63)  # ... but for two raw ids at both ends of int64


def _rank(world: World, refs: Sequence[RequestRef]) -> RankedBatch:
    """The world's ranking for the users of ``refs``, at their times, with the items of ``ITEM_AT``."""
    users = np.array([r.user_id for r in refs], np.int64)
    batch = Funnel(world).rank(users, np.array([r.ts_ms for r in refs]), np.zeros(len(refs), np.int64))
    batch.item_ids[:] = ITEM_AT
    return batch


@pytest.fixture
def service(small_world: World) -> tuple[LoggingService, MemoryEventBus, MemoryTransientStore, RequestRef]:
    clock = ManualClock(T0)
    store = MemoryTransientStore(clock=clock)
    bus = MemoryEventBus()
    svc, _ = _service_on(small_world, store, bus, clock)
    ref = _ref(small_world)
    svc.ranked([ref], _rank(small_world, [ref]))
    [(_, opened)] = bus.consume(10)  # the RequestOpened record, the only thing the bus carries
    assert isinstance(opened, RequestOpened)
    assert opened.user_id == ref.user_id == small_world.user_ids[5]  # the raw id, not the row
    bus.ack([mid for mid, _ in bus.claim_pending()])
    return svc, bus, store, ref


def _as_rows(rows: list[tuple]) -> list[tuple[int, int, int, int, float]]:
    return [(p, i, int(k), t, v) for p, i, k, t, v in rows]


def _stored(store: TransientStore, ref: RequestRef) -> list[EventBatch]:
    """The event batches waiting for the joiner in the request's event list, oldest first."""
    [blobs] = store.get_lists_many([key(ref.request_id, "ev")])
    return [EventBatch.from_bytes(b) for b in blobs]


def test_service_appends_only_good_events_and_counts_the_refused(service) -> None:
    svc, bus, store, ref = service
    late_deep = (50, 150, EventKind.CLICK, T0 + LIMITS.window_ms + 5, 0.0)  # page 5, but late
    rows = [GOOD[0], BAD["bad_value"][0], GOOD[1], BAD["unknown_kind"][0], late_deep, BAD["bad_position"][0]]
    report = svc.events(ref, _batch(rows))
    assert report.refused == {"bad_value": 1, "unknown_kind": 1, "late": 1, "bad_position": 1}
    assert svc.stats.events_refused == {"bad_value": 1, "unknown_kind": 1, "late": 1, "bad_position": 1}
    assert svc.stats.events_accepted == 2
    assert svc.stats.event_batches == 1
    [appended] = _stored(store, ref)
    assert appended.request_id == ref.request_id
    assert _rows_of(appended) == _as_rows([GOOD[0], GOOD[1]])
    assert bus.consume(10) == []  # event batches no longer travel on the bus
    # a refused event does not log its page
    assert store.get_many([key(ref.request_id, "p5")]) == [None]


def test_service_refuses_an_event_naming_another_item_while_it_holds_the_ranked_list(service) -> None:
    svc, _, store, ref = service
    wrong = [(3, 104, EventKind.CLICK, T0 + 10, 0.0), (50, 2**63 - 1, EventKind.VIEW, T0 + 10, 0.0)]
    report = svc.events(ref, _batch([GOOD[0], *wrong, GOOD[1]]))
    assert report.refused == {"wrong_item": 2}
    assert report.messages["wrong_item"] == "item_id is not the item ranked at its position"
    assert svc.stats.events_refused == {"wrong_item": 2}
    assert [_rows_of(b) for b in _stored(store, ref)] == [_as_rows([GOOD[0], GOOD[1]])]
    assert store.get_many([key(ref.request_id, "p5")]) == [None]  # a refused event logs no page
    # Once the process holds the list no more, the events are taken: the join checks them.
    svc.logger.contexts.release(ref.request_id, "expired")  # type: ignore[attr-defined]
    assert svc.events(ref, _batch(wrong)).total == 0
    assert svc.stats.events_refused == {"wrong_item": 2}


def test_service_touch_logs_the_page_of_a_good_deep_event(service) -> None:
    svc, bus, store, ref = service
    svc.events(ref, _batch([(50, 150, EventKind.CLICK, T0 + 1_000, 0.0)]))
    assert store.get_many([key(ref.request_id, "p5"), key(ref.request_id, "p4")])[0] is not None
    assert store.get_many([key(ref.request_id, "p4")]) == [None]
    assert [_rows_of(b) for b in _stored(store, ref)] == [[(50, 150, int(EventKind.CLICK), T0 + 1_000, 0.0)]]
    assert bus.consume(10) == []


def test_service_appends_each_batch_to_the_request_event_list_in_order(service) -> None:
    svc, _, store, ref = service
    svc.events(ref, _batch([GOOD[1]]))
    svc.events(ref, _batch([GOOD[0], GOOD[2]]))
    assert [_rows_of(b) for b in _stored(store, ref)] == [_as_rows([GOOD[1]]), _as_rows([GOOD[0], GOOD[2]])]
    [blobs] = store.get_lists_many([key(ref.request_id, "ev")])
    assert blobs[0] == _batch([GOOD[1]]).to_bytes()


def test_service_appends_nothing_for_an_all_bad_batch(service) -> None:
    svc, bus, store, ref = service
    writes = store.stats().writes
    report = svc.events(ref, _batch(BAD["late"] + BAD["before_rank"]))
    assert report.total == 2
    assert _stored(store, ref) == []
    assert store.stats().writes == writes
    assert bus.consume(10) == []
    assert svc.stats.events_accepted == 0
    assert svc.stats.events_refused == {"late": 1, "before_rank": 1}
    # counts add up over batches
    svc.events(ref, _batch(BAD["late"]))
    assert svc.stats.events_refused == {"late": 2, "before_rank": 1}


def test_a_batch_arriving_after_the_window_and_lateness_is_refused_whole(service) -> None:
    svc, _, store, ref = service
    clock: ManualClock = svc.clock  # type: ignore[assignment]
    deadline = T0 + LIMITS.window_ms + LIMITS.lateness_ms
    clock.set(deadline)  # at the deadline itself: still accepted
    assert svc.events(ref, _batch([GOOD[0]])).total == 0
    clock.set(deadline + 1)
    deep = (50, 150, EventKind.CLICK, T0 + 1_000, 0.0)  # good times, a page not logged yet
    rows = [GOOD[1], deep, BAD["bad_value"][0]]
    report = svc.events(ref, _batch(rows))
    assert report.refused == {"window_closed": 3}  # the whole batch, whatever its events
    assert "window closed" in report.messages["window_closed"]
    assert str(deadline) in report.messages["window_closed"]
    assert svc.stats.events_refused == {"window_closed": 3}
    assert svc.stats.events_accepted == 1
    assert svc.stats.event_batches == 2
    # nothing of the refused batch reached the store: neither its events nor the page it touched
    assert [_rows_of(b) for b in _stored(store, ref)] == [_as_rows([GOOD[0]])]
    assert store.get_many([key(ref.request_id, "p5")]) == [None]


def test_a_replayed_batch_id_is_refused_and_appends_nothing(service) -> None:
    svc, _, store, ref = service
    assert svc.events(ref, _batch([GOOD[0], GOOD[1]]), batch_id="b1").total == 0
    again = svc.events(ref, _batch([GOOD[0], GOOD[1]]), batch_id="b1")
    assert again.refused == {"replayed": 2}
    assert "'b1'" in again.messages["replayed"]
    # a batch id is claimed only by a batch it accepted: the same events under another id are taken
    assert svc.events(ref, _batch([GOOD[2]]), batch_id="b2").total == 0
    # the guard is per request: another request may use the same batch id
    other = RequestRef("r2", user_id=ref.user_id, ts_ms=T0, n_items=100)
    assert svc.events(other, _batch([GOOD[0]], request_id="r2"), batch_id="b1").total == 0
    assert [len(b) for b in _stored(store, ref)] == [2, 1]
    assert [len(b) for b in _stored(store, other)] == [1]
    assert svc.stats.events_refused == {"replayed": 2}
    assert svc.stats.events_accepted == 4
    assert store.get_lists_many([key(ref.request_id, "seen")]) == [[b"b1", b"b2"]]


def test_a_batch_without_an_id_is_stored_every_time_it_is_sent(service) -> None:
    svc, _, store, ref = service
    for _ in range(2):
        assert svc.events(ref, _batch([GOOD[0]])).total == 0
    assert len(_stored(store, ref)) == 2  # duplicates are absorbed by the idempotent join instead
    assert svc.stats.events_refused == {}


@pytest.mark.parametrize("error", [ConnectionError("refused"), OSError("reset"), StoreFullError("full")])
def test_a_store_failure_at_rank_time_is_counted_not_raised(small_world: World, error: Exception) -> None:
    clock = ManualClock(T0)
    store = FaultyStore(MemoryTransientStore(clock=clock))
    bus = MemoryEventBus()
    svc, logger = _service_on(small_world, store, bus, clock)  # type: ignore[arg-type]
    store.failing["put_many"] = error
    refs = [_ref(small_world), _ref(small_world, "r2", 6)]
    svc.ranked(refs, _rank(small_world, refs))  # does not raise
    assert store.calls["put_many"] == 2
    assert logger.stats.write_failures == 2 * 2  # the request side and the head of each request
    assert logger.stats.entries_written == 0
    assert store.inner.stats().keys_held == 0
    assert svc.stats.requests == 2
    # the requests are still opened, so the joiner counts them as requests without features
    assert [m.request_id for _, m in bus.consume(10)] == ["r1", "r2"]
    assert logger.stats.bus_failures == 0
    # once the store answers again, logging goes on
    del store.failing["put_many"]
    assert svc.paginate(refs[0], 10) == 2
    # the request side that failed at rank time goes with the first pages logged afterwards
    assert logger.stats.entries_written == 3
    assert store.inner.get_many([key(refs[0].request_id, "u")])[0] is not None
    assert logger.stats.write_failures == 4


@pytest.mark.parametrize("error", [ConnectionError("refused"), OSError("broken pipe")])
def test_a_bus_failure_at_rank_time_is_counted_not_raised(small_world: World, error: Exception) -> None:
    clock = ManualClock(T0)
    store = MemoryTransientStore(clock=clock)
    bus = FaultyBus()
    svc, logger = _service_on(small_world, store, bus, clock)
    bus.failing = error
    refs = [_ref(small_world), _ref(small_world, "r2", 6)]
    svc.ranked(refs, _rank(small_world, refs))  # does not raise
    assert logger.stats.bus_failures == 2
    assert logger.stats.write_failures == 0
    assert logger.stats.entries_written == 4  # the features were logged; only the record is missing
    assert bus.appended == 0
    assert svc.stats.requests == 2
    bus.failing = None
    again = [_ref(small_world, "r3")]
    svc.ranked(again, _rank(small_world, again))
    assert [m.request_id for _, m in bus.consume(10)] == ["r3"]
    assert logger.stats.bus_failures == 2


@pytest.mark.parametrize("error", [ConnectionError("refused"), OSError("reset"), StoreFullError("full")])
def test_a_store_failure_on_events_raises_logging_unavailable_and_a_retry_is_accepted(
    small_world: World, error: Exception
) -> None:
    clock = ManualClock(T0)
    store = FaultyStore(MemoryTransientStore(clock=clock))
    svc, _ = _service_on(small_world, store, MemoryEventBus(), clock)  # type: ignore[arg-type]
    ref = _ref(small_world)
    svc.ranked([ref], _rank(small_world, [ref]))
    store.failing["append_once"] = error
    with pytest.raises(LoggingUnavailable, match="event batch not stored"):
        svc.events(ref, _batch([GOOD[0], GOOD[1]]), batch_id="b1")
    assert svc.stats.events_accepted == 0
    assert _stored(store.inner, ref) == []
    # the guard and the append are one step: nothing marks b1 as seen, so the retry is taken
    assert store.inner.get_lists_many([key(ref.request_id, "seen")]) == [[]]
    del store.failing["append_once"]
    assert svc.events(ref, _batch([GOOD[0], GOOD[1]]), batch_id="b1").total == 0
    assert svc.stats.events_accepted == 2
    assert [len(b) for b in _stored(store.inner, ref)] == [2]
    assert svc.events(ref, _batch([GOOD[0], GOOD[1]]), batch_id="b1").refused == {"replayed": 2}


def test_a_failed_unguarded_append_raises_logging_unavailable_and_keeps_the_refusal_counts(
    small_world: World,
) -> None:
    clock = ManualClock(T0)
    store = FaultyStore(MemoryTransientStore(clock=clock))
    svc, _ = _service_on(small_world, store, MemoryEventBus(), clock)  # type: ignore[arg-type]
    ref = _ref(small_world)
    svc.ranked([ref], _rank(small_world, [ref]))
    store.failing["append_many"] = ConnectionError("refused")
    bad = (200, int(ref.n_items), int(EventKind.VIEW), T0 + 10, 0.0)  # off the list
    with pytest.raises(LoggingUnavailable):
        svc.events(ref, _batch([GOOD[0], bad]))
    assert svc.stats.events_refused == {"bad_position": 1}
    del store.failing["append_many"]
    assert svc.events(ref, _batch([GOOD[0]])).total == 0
    assert [len(b) for b in _stored(store.inner, ref)] == [1]


@pytest.mark.parametrize("seen_up_to", [-1, 100, 10_000])
def test_paginate_outside_the_list_is_refused_clearly(service, seen_up_to: int) -> None:
    svc, _, store, ref = service
    with pytest.raises(ValueError, match=rf"seen_up_to={seen_up_to} is outside the ranked list of 100"):
        svc.paginate(ref, seen_up_to)
    assert svc.stats.paginations == 0
    assert store.stats().writes == 2


def test_paginate_inside_the_list_logs_pages(service) -> None:
    svc, _, store, ref = service
    assert svc.paginate(ref, 99) == 11
    assert svc.stats.paginations == 1
    assert store.stats().writes == 2 + 11


def test_ranked_refuses_refs_that_do_not_match_the_batch(small_world: World, service) -> None:
    svc, *_ = service
    batch = _rank(small_world, [_ref(small_world, "x", 1), _ref(small_world, "y", 2)])
    with pytest.raises(ValueError, match="1 request refs for a batch of 2"):
        svc.ranked([_ref(small_world, "x", 1)], batch)
