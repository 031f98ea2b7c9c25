"""LabelJoiner: what becomes an example, what is dropped, what is lost, and when it lets go."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from leanrec.clock import ManualClock
from leanrec.energy.ledger import CostLedger
from leanrec.events.bus import EventBus, MemoryEventBus
from leanrec.events.model import EventBatch, EventKind, EventLimits, RequestRef
from leanrec.featurelog.loggers import ContextCache, EagerLogger, FeatureLogger, LazyLogger, Paging, key
from leanrec.funnel.ranker import Funnel, RankedBatch
from leanrec.join.joiner import LabelJoiner
from leanrec.schema import Owner, Side
from leanrec.serve.service import LoggingService
from leanrec.stores.transient import MemoryTransientStore, TransientStore
from leanrec.warehouse import ParquetWarehouse, RequestRecord, TableLayout
from leanrec.world import World

T0 = int(datetime(2026, 11, 2, 9, 15, tzinfo=UTC).timestamp() * 1000)
WINDOW = 300_000
LATENESS = 30_000
JOIN_AT = T0 + WINDOW + LATENESS + 2_000  # the joiner settles 2 s after the lateness
SORT = [("request_id", "ascending"), ("position", "ascending")]
FLAGS = ("click", "like", "share", "hide")


@dataclass
class Rig:
    clock: ManualClock
    store: TransientStore
    bus: EventBus
    logger: FeatureLogger
    service: LoggingService
    joiner: LabelJoiner
    warehouse: ParquetWarehouse

    def examples(self) -> pa.Table:
        return self.warehouse.read_examples()

    def files(self) -> list[Path]:
        return sorted(Path(self.warehouse.uri).rglob("*.parquet"))


def make_rig(
    world: World,
    lazy: bool,
    root: Path,
    clock: ManualClock,
    layout: TableLayout | None = None,
    store: TransientStore | None = None,
    bus: EventBus | None = None,
) -> Rig:
    """A logger, a joiner and a warehouse: lazy into request-level rows, eager into impression rows,
    unless ``layout`` says otherwise; on the embedded store and bus unless others are given."""
    fs = world.featureset
    store = store if store is not None else MemoryTransientStore(clock=clock)
    bus = bus if bus is not None else MemoryEventBus()
    ledger = CostLedger()
    ttl = WINDOW + 120_000
    logger: FeatureLogger
    if lazy:
        contexts = ContextCache(1 << 30, 60_000, WINDOW, clock, ledger)
        logger = LazyLogger(fs, store, bus, ledger, ttl, contexts, Paging(6, 9), lookahead=2)
    else:
        logger = EagerLogger(fs, store, bus, ledger, ttl)
    if layout is None:
        layout = TableLayout.REQUEST if lazy else TableLayout.IMPRESSION
    warehouse = ParquetWarehouse(str(root), fs, layout, ledger)
    joiner = LabelJoiner(logger, bus, warehouse, ledger, clock, WINDOW, LATENESS)
    service = LoggingService(logger, bus, EventLimits(window_ms=WINDOW, lateness_ms=LATENESS), clock)
    return Rig(clock, store, bus, logger, service, joiner, warehouse)


def rank(world: World, users: Sequence[int]) -> tuple[list[RequestRef], RankedBatch]:
    """Rank for the world's users of rows ``users``: requests of their raw (64-bit) ids."""
    funnel = Funnel(world)
    u = world.user_ids[np.asarray(users, np.int64)]
    batch = funnel.rank(u, np.full(len(u), T0), np.zeros(len(u), np.int64))
    return [RequestRef(f"j{b}", int(x), T0, batch.n_items) for b, x in enumerate(u)], batch


def events(
    ref: RequestRef, items: np.ndarray, rows: Sequence[tuple[int, EventKind, int, float]]
) -> EventBatch:
    pos = np.array([r[0] for r in rows], np.int32)
    return EventBatch(
        ref.request_id,
        pos,
        items[pos].astype(np.int64),
        np.array([int(r[1]) for r in rows], np.int8),
        np.array([ref.ts_ms + r[2] for r in rows], np.int64),
        np.array([r[3] for r in rows], np.float32),
    )


def views(positions: Sequence[int] | range, start_ms: int = 1_000) -> list[tuple]:
    return [(int(p), EventKind.VIEW, start_ms + 400 * i, 0.0) for i, p in enumerate(positions)]


def join(rig: Rig) -> None:
    rig.clock.set(max(JOIN_AT, rig.clock.now_ms()))
    rig.joiner.poll()
    rig.joiner.join_due()
    rig.joiner.flush()


@pytest.fixture(params=[True, False], ids=["lazy", "eager"])
def lazy(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def test_any_event_at_a_position_makes_the_item_viewed(
    small_world: World, tmp_path: Path, lazy: bool
) -> None:
    clock = ManualClock(T0)
    rig = make_rig(small_world, lazy, tmp_path / "wh", clock)
    refs, batch = rank(small_world, [7])
    ref, items = refs[0], batch.item_ids[0]
    rig.service.ranked(refs, batch)
    rows = [
        (0, EventKind.VIEW, 1_000, 0.0),
        (3, EventKind.LIKE, 2_000, 0.0),  # a like without a view event: the item was seen
        (5, EventKind.HIDE, 2_500, 0.0),
        (8, EventKind.WATCH, 3_000, 1_234.0),
        (11, EventKind.SHARE, 3_500, 0.0),
    ]
    rig.service.events(ref, events(ref, items, rows))
    join(rig)
    ex = rig.examples()
    assert ex.column("position").to_pylist() == [0, 3, 5, 8, 11]
    assert ex.column("item_id").to_pylist() == items[[0, 3, 5, 8, 11]].tolist()
    assert ex.column("like").to_pylist() == [False, True, False, False, False]
    assert ex.column("hide").to_pylist() == [False, False, True, False, False]
    assert ex.column("share").to_pylist() == [False, False, False, False, True]
    assert ex.column("click").to_pylist() == [False] * 5
    assert ex.column("watch_ms").to_pylist() == [0, 0, 0, 1_234, 0]
    assert ex.column("view_ms").to_pylist() == [T0 + r[2] for r in rows]
    assert rig.joiner.stats.examples == 5
    assert rig.joiner.stats.positives == 0


def test_no_engagement_is_a_negative_and_unviewed_items_are_dropped(
    small_world: World, tmp_path: Path, lazy: bool
) -> None:
    clock = ManualClock(T0)
    rig = make_rig(small_world, lazy, tmp_path / "wh", clock)
    refs, batch = rank(small_world, [1, 2, 3])
    rig.service.ranked(refs, batch)
    # j0: six plain views; j1: views, one clicked and watched twice; j2: nothing at all.
    rig.service.events(refs[0], events(refs[0], batch.item_ids[0], views(range(6))))
    rows = [
        *views([0, 1, 2, 9]),
        (9, EventKind.CLICK, 5_000, 0.0),
        (9, EventKind.WATCH, 9_000, 800.0),
        (9, EventKind.WATCH, 7_000, 2_100.0),
    ]
    rig.service.events(refs[1], events(refs[1], batch.item_ids[1], rows))
    join(rig)

    ex = rig.examples()
    assert list(zip(ex.column("request_id").to_pylist(), ex.column("position").to_pylist(), strict=True)) == [
        *(("j0", p) for p in range(6)),
        *(("j1", p) for p in (0, 1, 2, 9)),
    ]
    neg = ex.filter(pc.equal(ex.column("request_id"), "j0"))
    for flag in FLAGS:
        assert neg.column(flag).to_pylist() == [False] * 6
    assert neg.column("watch_ms").to_pylist() == [0] * 6
    j1 = ex.filter(pc.equal(ex.column("request_id"), "j1"))
    assert j1.column("click").to_pylist() == [False, False, False, True]
    assert j1.column("watch_ms").to_pylist() == [0, 0, 0, 2_100]  # the longest watch
    assert rig.joiner.stats.requests_joined == 3
    assert rig.joiner.stats.examples == 10
    assert rig.joiner.stats.positives == 1
    # One row per request with examples in the lean layout, one per example in the naive one.
    assert rig.warehouse.read().num_rows == (2 if lazy else 10)


def test_labels_lost_when_frozen_features_are_gone(small_world: World, tmp_path: Path, lazy: bool) -> None:
    clock = ManualClock(T0)
    rig = make_rig(small_world, lazy, tmp_path / "wh", clock)
    refs, batch = rank(small_world, [4, 5])
    rig.service.ranked(refs, batch)
    rig.service.paginate(refs[0], 4)  # logs page 1 (positions 6..14) in the lazy path
    for b, ref in enumerate(refs):
        rig.service.events(ref, events(ref, batch.item_ids[b], views(range(10))))
    rid0, rid1 = refs[0].request_id, refs[1].request_id
    if lazy:
        gone = [key(rid0, "p1"), key(rid1, "u")]  # a page of j0, the whole request side of j1
    else:
        gone = [key(rid0, f"i{p}") for p in range(6, 10)] + [key(rid1, f"i{p}") for p in range(10)]
    assert rig.store.delete_many(gone) == len(gone)
    join(rig)

    assert rig.joiner.stats.labels_lost == 4 + 10
    assert rig.joiner.stats.examples == 6
    ex = rig.examples()
    assert ex.column("request_id").to_pylist() == ["j0"] * 6
    assert ex.column("position").to_pylist() == list(range(6))
    assert rig.joiner.stats.requests_without_features == 1


def test_messages_are_acked_and_keys_deleted_only_after_the_warehouse_flush(
    small_world: World, tmp_path: Path, lazy: bool
) -> None:
    clock = ManualClock(T0)
    rig = make_rig(small_world, lazy, tmp_path / "wh", clock)
    refs, batch = rank(small_world, [8, 9])
    rig.service.ranked(refs, batch)
    for b, ref in enumerate(refs):
        rig.service.events(ref, events(ref, batch.item_ids[b], views(range(3 + b))))
    keys = [key(ref.request_id, "u" if lazy else "i0") for ref in refs]
    ev_keys = [key(ref.request_id, "ev") for ref in refs]
    clock.set(JOIN_AT)
    assert rig.joiner.poll() == 2  # the two RequestOpened records: event batches wait in the store
    assert rig.joiner.join_due() == 2
    # Joined, not yet durable: nothing acknowledged, nothing deleted, nothing visible.
    assert rig.bus.pending() == 2
    assert rig.files() == []
    assert all(v is not None for v in rig.store.get_many(keys))
    assert [len(chunks) for chunks in rig.store.get_lists_many(ev_keys)] == [1, 1]
    held = rig.store.stats().keys_held
    assert held == (4 if lazy else 200) + 2  # the features, and one event list per request

    committed = rig.joiner.flush()
    assert len(committed) == 1
    assert rig.files() == [Path(committed[0])]
    assert rig.bus.pending() == 0
    assert rig.store.get_many(keys) == [None, None]
    assert rig.store.get_lists_many(ev_keys) == [[], []]
    assert rig.store.stats().keys_held == 0
    assert rig.store.stats().deletes == held


class FailingSink:
    """A warehouse writer whose commit fails."""

    def __init__(self) -> None:
        self.records: list[RequestRecord] = []

    def append(self, records: Sequence[RequestRecord]) -> None:
        self.records.extend(records)

    def flush(self) -> list[str]:
        raise OSError("disk full")

    def committed(self, request_ids: Sequence[str]) -> set[str]:
        return set()


def test_a_failed_commit_acks_nothing_and_deletes_nothing(
    small_world: World, tmp_path: Path, lazy: bool
) -> None:
    clock = ManualClock(T0)
    rig = make_rig(small_world, lazy, tmp_path / "wh", clock)
    sink = FailingSink()
    rig.joiner.sink = sink
    refs, batch = rank(small_world, [8])
    rig.service.ranked(refs, batch)
    rig.service.events(refs[0], events(refs[0], batch.item_ids[0], views(range(4))))
    held = rig.store.stats().keys_held
    clock.set(JOIN_AT)
    rig.joiner.poll()
    rig.joiner.join_due()
    with pytest.raises(OSError, match="disk full"):
        rig.joiner.flush()
    assert len(sink.records) == 1 and len(sink.records[0]) == 4
    assert rig.bus.pending() == 1  # the RequestOpened record
    assert len(rig.bus.claim_pending()) == 1  # a recovering consumer can take it again
    assert rig.store.stats().keys_held == held
    assert [len(c) for c in rig.store.get_lists_many([key(refs[0].request_id, "ev")])] == [1]


def test_a_request_is_joined_when_its_window_and_lateness_have_passed(
    small_world: World, tmp_path: Path, lazy: bool
) -> None:
    clock = ManualClock(T0)
    rig = make_rig(small_world, lazy, tmp_path / "wh", clock)
    refs, batch = rank(small_world, [3])
    rig.service.ranked(refs, batch)
    rig.service.events(refs[0], events(refs[0], batch.item_ids[0], views(range(2))))
    clock.set(JOIN_AT - 1)
    rig.joiner.poll()
    assert rig.joiner.join_due() == 0
    assert rig.joiner.open_requests == 1
    clock.set(JOIN_AT)
    assert rig.joiner.join_due() == 1
    assert rig.joiner.open_requests == 0


def test_events_of_a_request_never_opened_are_never_joined_and_expire_with_their_ttl(
    small_world: World, tmp_path: Path, lazy: bool
) -> None:
    clock = ManualClock(T0)
    rig = make_rig(small_world, lazy, tmp_path / "wh", clock)
    refs, batch = rank(small_world, [3])
    rig.service.ranked(refs, batch)
    stranger = RequestRef("stranger", 3, T0, 100)
    rig.service.events(stranger, events(stranger, batch.item_ids[0], views(range(3))))
    rig.service.events(refs[0], events(refs[0], batch.item_ids[0], views(range(2))))
    if lazy:
        assert rig.logger.stats.touch_after_release == 3  # no context to log the stranger's pages from
    join(rig)
    assert rig.examples().column("request_id").to_pylist() == ["j0", "j0"]
    assert rig.joiner.stats.requests_joined == 1
    assert rig.joiner.stats.events_joined == 2
    assert rig.bus.pending() == 0
    # No RequestOpened names the stranger, so no joiner deletes its events: only the TTL does.
    stranger_ev = key("stranger", "ev")
    assert [len(c) for c in rig.store.get_lists_many([stranger_ev])] == [1]
    assert rig.store.stats().keys_held == 1
    clock.set(T0 + rig.logger.ttl_ms)
    assert rig.store.purge_expired() == 1
    assert rig.store.get_lists_many([stranger_ev]) == [[]]
    assert rig.store.stats().keys_held == 0
    assert rig.store.stats().bytes_held == 0


def test_joined_features_are_the_logged_ones(small_world: World, tmp_path: Path, lazy: bool) -> None:
    clock = ManualClock(T0)
    rig = make_rig(small_world, lazy, tmp_path / "wh", clock)
    refs, batch = rank(small_world, [12])
    rig.service.ranked(refs, batch)
    positions = [0, 4, 17, 63]
    rig.service.events(refs[0], events(refs[0], batch.item_ids[0], views(positions)))
    join(rig)
    table = rig.warehouse.read()
    if lazy:
        assert table.num_rows == 1
        items = table.column("items")[0].values
        got = items.field("i_emb").values.to_numpy().reshape(len(positions), -1)
    else:
        table = table.sort_by("position")
        got = table.column("i_emb").combine_chunks().values.to_numpy().reshape(len(positions), -1)
    layout = small_world.featureset.layout(Side.ITEM)
    emb = next(s for s in layout.slots if s.feature.name == "i_emb")
    want = batch.items.floats[positions, emb.offset : emb.stop]
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_raw_ids_at_both_ends_of_int64_are_joined_unchanged(
    small_world: World, tmp_path: Path, lazy: bool
) -> None:
    """Item ids, the user id and id features near 2**63 - 1 and -2**63 reach the warehouse as they were."""
    clock = ManualClock(T0)
    rig = make_rig(small_world, lazy, tmp_path / "wh", clock)
    _, ranked = rank(small_world, [13])
    ends = np.array([2**63 - 1, -(2**63), 2**63 - 2, -2, -(2**63) + 1, 0], np.int64)
    items = ranked.item_ids.copy()
    items[0, : len(ends)] = ends
    block = ranked.items.copy()
    fs = small_world.featureset
    i_id = fs.owner_slots(Owner.ITEM)["i_id"]
    block.ints[:, i_id.offset] = items[0]  # the item id feature holds the same raw ids
    request = ranked.request.copy()
    hist = next(s for s in fs.layout(Side.REQUEST).slots if s.feature.name == "u_hist")
    request.ints[0, hist.offset : hist.offset + len(ends)] = ends
    user = 2**63 - 1
    batch = RankedBatch(np.array([user], np.int64), items, ranked.scores, request, block)
    ref = RequestRef("ends", user, T0, batch.n_items)
    rig.service.ranked([ref], batch)
    positions = [*range(len(ends)), 40]
    rig.service.events(ref, events(ref, items[0], views(positions)))
    # Clicks naming another item than the one logged at their position are refused by the join,
    # whatever the sign of the logged id: the item at 1 is -2**63, at 3 it is -2, at 0 it is 2**63 - 1.
    # (A lazy service refuses them at ingest while it holds the ranked list: here it holds it no more.)
    if lazy:
        rig.logger.contexts.release(ref.request_id, "expired")
    wrong = items[0].copy()
    wrong[[0, 1, 3]] = [-(2**63), 2**63 - 1, 7]
    rig.service.events(ref, events(ref, wrong, [(p, EventKind.CLICK, 9_000, 0.0) for p in (0, 1, 3)]))
    rig.service.events(ref, events(ref, items[0], [(2, EventKind.CLICK, 9_500, 0.0)]))
    join(rig)
    ex = rig.examples()
    assert ex.column("item_id").to_pylist() == items[0, positions].tolist()
    assert ex.column("i_id").to_pylist() == items[0, positions].tolist()
    assert ex.column("user_id").to_pylist() == [user] * len(positions)
    assert ex.column("u_hist").to_pylist()[0] == request.ints[0, hist.offset : hist.stop].tolist()
    assert ex.column("click").to_pylist() == [p == 2 for p in positions]
    assert rig.joiner.stats.mismatched_events == 3 and rig.joiner.stats.labels_lost == 0


@pytest.mark.parametrize("layout", [TableLayout.REQUEST, TableLayout.IMPRESSION])
@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_the_ranker_scores_come_out_of_the_warehouse_at_their_positions(
    small_world: World,
    tmp_path: Path,
    lazy: bool,
    layout: TableLayout,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    """Head, pages logged later on a signal, and a fast scroll's pages logged on touch."""
    clock = ManualClock(T0)
    store: TransientStore | None = None
    bus: EventBus | None = None
    if backend == "redis":
        from leanrec.events.redis_bus import RedisEventBus
        from leanrec.stores.redis_transient import RedisTransientStore

        url = request.getfixturevalue("redis_url")
        redis_store, redis_bus = RedisTransientStore(url), RedisEventBus(url)
        request.addfinalizer(redis_store.close)
        request.addfinalizer(redis_bus.close)
        store, bus = redis_store, redis_bus
    rig = make_rig(small_world, lazy, tmp_path / "wh", clock, layout, store, bus)
    refs, batch = rank(small_world, [21, 22, 23])
    scores = batch.scores.copy()
    assert np.isfinite(scores).all() and len(np.unique(scores[0])) == batch.n_items
    rig.service.ranked(refs, batch)
    batch.scores[:] = 0.0  # the ranker reuses its buffers: what was logged is what it scored
    # j0 stays in the head; j1 signals its scroll, then views the pages it logged; j2 scrolls fast
    # past any signal, so its deep pages are logged by the events themselves.
    viewed = {0: [0, 1, 3], 1: [0, 5, 6, 14, 20, 23], 2: [1, 47, 48, 90, 99]}
    rig.service.events(refs[0], events(refs[0], batch.item_ids[0], views(viewed[0])))
    clock.advance(2_000)
    rig.service.paginate(refs[1], 21)
    rig.service.events(refs[1], events(refs[1], batch.item_ids[1], views(viewed[1], 3_000)))
    rig.service.events(refs[2], events(refs[2], batch.item_ids[2], views(viewed[2], 1_500)))
    if lazy:
        assert rig.logger.stats.pages_on_signal == 2  # j1's pages 1 and 2 (positions 6..23)
        assert rig.logger.stats.pages_on_touch == 3  # j2's pages 5, 10 and 11
    join(rig)
    assert rig.joiner.stats.labels_lost == 0
    ex = rig.examples()
    want = [(f"j{b}", p, float(scores[b, p])) for b in viewed for p in viewed[b]]
    got = zip(ex["request_id"].to_pylist(), ex["position"].to_pylist(), ex["score"].to_pylist(), strict=True)
    assert list(got) == want
    table = rig.warehouse.read()
    if layout is TableLayout.REQUEST:  # a list beside the other item fields, one score per item
        assert table.schema.field("items").type.value_type.field("score").type == pa.float32()
    else:  # one float per row
        assert table.schema.field("score").type == pa.float32()


def restart(rig: Rig) -> LabelJoiner:
    """A new joiner process on the same bus, store and warehouse folder (the old one crashed)."""
    old = rig.warehouse
    warehouse = ParquetWarehouse(old.uri, old.featureset, old.layout, CostLedger())
    return LabelJoiner(rig.logger, rig.bus, warehouse, CostLedger(), rig.clock, WINDOW, LATENESS)


def request_counts(warehouse: ParquetWarehouse) -> dict[str, int]:
    """Examples per request id in the warehouse."""
    ids = warehouse.read_examples().column("request_id").to_pylist()
    return {rid: ids.count(rid) for rid in sorted(set(ids))}


def test_recover_acks_what_was_committed_before_a_crash_and_joins_the_rest_once(
    small_world: World, tmp_path: Path, lazy: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock(T0)
    rig = make_rig(small_world, lazy, tmp_path / "wh", clock)
    refs, batch = rank(small_world, [8, 9])
    rig.service.ranked(refs, batch)
    for b, ref in enumerate(refs):
        rig.service.events(ref, events(ref, batch.item_ids[b], views(range(3 + b))))
    # A third request, ranked a minute later: still open when the worker dies.
    t1 = T0 + 60_000
    clock.set(t1)
    user = int(small_world.user_ids[10])
    later = Funnel(small_world).rank(np.array([user]), np.array([t1]), np.zeros(1, np.int64))
    k0 = RequestRef("k0", user, t1, later.n_items)
    rig.service.ranked([k0], later)
    rig.service.events(k0, events(k0, later.item_ids[0], views(range(5), 2_000)))

    clock.set(JOIN_AT)
    assert rig.joiner.poll() == 3
    assert rig.joiner.join_due() == 2
    # The warehouse commits j0 and j1, then the worker dies before it acknowledges them.
    ack = rig.bus.ack

    def die(ids: Sequence[str]) -> int:
        monkeypatch.setattr(rig.bus, "ack", ack)
        raise ConnectionError("worker killed")

    monkeypatch.setattr(rig.bus, "ack", die)
    with pytest.raises(ConnectionError, match="worker killed"):
        rig.joiner.flush()
    assert request_counts(rig.warehouse) == {"j0": 3, "j1": 4}
    assert rig.bus.pending() == 3

    joiner = restart(rig)
    assert joiner.recover() == 3
    assert joiner.stats.recovered_committed == 2
    assert rig.bus.pending() == 1  # j0 and j1 acknowledged at once; k0 waits for its window
    assert joiner.open_requests == 1
    assert joiner.join_due() == 0
    clock.set(JOIN_AT + 60_000)
    joiner.poll()
    assert joiner.join_due() == 1
    joiner.flush()
    assert request_counts(rig.warehouse) == {"j0": 3, "j1": 4, "k0": 5}
    assert joiner.stats.requests_joined == 1
    assert joiner.stats.examples == 5
    assert rig.bus.pending() == 0
    # A second recovery finds nothing left to take over.
    assert joiner.recover() == 0
    assert request_counts(rig.warehouse) == {"j0": 3, "j1": 4, "k0": 5}
    # What the dead worker never deleted is gone with the TTL.
    clock.set(t1 + rig.logger.ttl_ms)
    rig.store.purge_expired()
    assert rig.store.stats().keys_held == 0


def test_a_live_worker_counts_as_taken_over_only_records_it_did_not_hold(
    small_world: World, tmp_path: Path, lazy: bool
) -> None:
    clock = ManualClock(T0)
    rig = make_rig(small_world, lazy, tmp_path / "wh", clock)
    refs, batch = rank(small_world, [8, 9])
    rig.service.ranked(refs, batch)
    for b, ref in enumerate(refs):
        rig.service.events(ref, events(ref, batch.item_ids[b], views(range(3 + b))))
    assert rig.joiner.poll() == 2  # both open, waiting for their window, pending on the bus
    for _ in range(3):  # the worker's periodic claim finds its own pending records again
        assert rig.joiner.recover() == 0
    assert rig.bus.pending() == 2 and rig.joiner.open_requests == 2
    clock.set(JOIN_AT)
    assert rig.joiner.join_due() == 2
    rig.joiner.flush()
    assert request_counts(rig.warehouse) == {"j0": 3, "j1": 4}
    assert rig.bus.pending() == 0


def test_recover_rejoins_what_was_joined_but_not_committed_before_a_crash(
    small_world: World, tmp_path: Path, lazy: bool
) -> None:
    clock = ManualClock(T0)
    rig = make_rig(small_world, lazy, tmp_path / "wh", clock)
    refs, batch = rank(small_world, [8, 9])
    rig.service.ranked(refs, batch)
    for b, ref in enumerate(refs):
        rows = [*views(range(3 + b)), (1, EventKind.CLICK, 5_000, 0.0)]
        rig.service.events(ref, events(ref, batch.item_ids[b], rows))
    clock.set(JOIN_AT)
    rig.joiner.poll()
    assert rig.joiner.join_due() == 2  # joined into the writer's buffer ...
    assert rig.files() == []  # ... and lost with the worker before the commit

    joiner = restart(rig)
    assert joiner.recover() == 2
    assert joiner.stats.recovered_committed == 0
    assert rig.bus.pending() == 2
    assert joiner.join_due() == 2
    joiner.flush()
    assert request_counts(rig.warehouse) == {"j0": 3, "j1": 4}
    assert rig.examples().column("click").to_pylist() == [False, True, False, False, True, False, False]
    assert joiner.stats.labels_lost == 0
    assert len(rig.files()) == 1
    assert rig.bus.pending() == 0
    assert rig.store.stats().keys_held == 0


def test_messages_that_are_not_request_records_are_counted_and_acked(
    small_world: World, tmp_path: Path, lazy: bool
) -> None:
    clock = ManualClock(T0)
    rig = make_rig(small_world, lazy, tmp_path / "wh", clock)
    refs, batch = rank(small_world, [5])
    rig.service.ranked(refs, batch)
    # An event batch on the bus (a producer of the old flow) and some garbage.
    stray = events(refs[0], batch.item_ids[0], views(range(4)))
    rig.bus.append_many([stray, "garbage"])  # type: ignore[list-item]
    rig.service.events(refs[0], events(refs[0], batch.item_ids[0], views(range(2))))
    join(rig)
    assert rig.joiner.stats.malformed_messages == 2
    assert rig.joiner.stats.requests_joined == 1
    assert rig.examples().column("position").to_pylist() == [0, 1]  # the stray batch was not joined
    assert rig.bus.pending() == 0


def test_stored_event_blobs_that_do_not_decode_are_counted_and_the_rest_joins(
    small_world: World, tmp_path: Path, lazy: bool
) -> None:
    clock = ManualClock(T0)
    rig = make_rig(small_world, lazy, tmp_path / "wh", clock)
    refs, batch = rank(small_world, [5])
    ref, items = refs[0], batch.item_ids[0]
    rig.service.ranked(refs, batch)
    rig.service.events(ref, events(ref, items, views(range(2))))
    ev_key = key(ref.request_id, "ev")
    good = events(ref, items, [(2, EventKind.VIEW, 3_000, 0.0), (2, EventKind.CLICK, 3_500, 0.0)])
    rig.store.append_many({ev_key: b"not an event batch"}, 60_000)
    rig.store.append_many({ev_key: good.to_bytes()[:-3]}, 60_000)  # truncated
    rig.service.events(ref, good)
    join(rig)
    assert rig.joiner.stats.malformed_event_blobs == 2
    assert rig.examples().column("position").to_pylist() == [0, 1, 2]
    assert rig.examples().column("click").to_pylist() == [False, False, True]
    assert rig.joiner.stats.events_joined == 4
    assert rig.store.get_lists_many([ev_key]) == [[]]
