"""The six invariants of DESIGN.md §2, each proved on real components driven by hand.

Every scenario here is exact: a ManualClock, a MemoryTransientStore, a MemoryEventBus, the eager or
the lazy logger, the LabelJoiner and a ParquetWarehouse in ``tmp_path``, wired without the traffic
simulator so each test decides what is ranked, what the world does next and which events arrive when.
"""

from __future__ import annotations

import gc
import re
import tracemalloc
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leanrec.clock import ManualClock
from leanrec.energy.ledger import CostLedger
from leanrec.events.bus import MemoryEventBus, Message, RequestOpened
from leanrec.events.model import EventBatch, EventKind, EventLimits, RequestRef
from leanrec.featurelog.loggers import ContextCache, EagerLogger, FeatureLogger, LazyLogger, Paging
from leanrec.funnel.ranker import Funnel, RankedBatch
from leanrec.join.joiner import LabelJoiner
from leanrec.schema import Feature, FeatureBlock, FeatureSet, Kind, Owner, Side
from leanrec.serve.service import LoggingService
from leanrec.sim.demo import run_demo
from leanrec.sim.pipeline import Plumbing
from leanrec.stores.transient import MemoryTransientStore
from leanrec.warehouse import (
    ParquetWarehouse,
    RequestRecord,
    TableLayout,
    arrays_block,
    impression_to_request,
    records_table,
    request_to_impression,
)
from leanrec.world import World, WorldConfig

T0 = int(datetime(2026, 11, 2, 8, 30, tzinfo=UTC).timestamp() * 1000)
WINDOW = 600_000
LATENESS = 60_000
TTL = WINDOW + 300_000
JOIN_AT = T0 + WINDOW + LATENESS + 2_000  # the joiner settles 2 s after the lateness
SORT = [("request_id", "ascending"), ("position", "ascending")]


class RecordingBus(MemoryEventBus):
    """The in-process bus, remembering every message appended (to redeliver them)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[Message] = []

    def append_many(self, messages: Sequence[Message]) -> list[str]:
        self.log.extend(messages)
        return super().append_many(messages)


@dataclass
class Rig:
    """One hand-wired logging path."""

    lazy: bool
    clock: ManualClock
    store: MemoryTransientStore
    bus: RecordingBus
    ledger: CostLedger
    logger: FeatureLogger
    service: LoggingService
    joiner: LabelJoiner
    warehouse: ParquetWarehouse

    def settle(self) -> None:
        """What a pipeline tick does: expire contexts, take messages, join what is due, commit."""
        self.logger.tick()
        self.joiner.poll()
        self.joiner.join_due()
        self.joiner.flush()

    def examples(self) -> pa.Table:
        return self.warehouse.read_examples()

    def parquet_files(self) -> list[Path]:
        return sorted(Path(self.warehouse.uri).rglob("*.parquet"))


def make_rig(
    world: World,
    lazy: bool,
    root: Path,
    clock: ManualClock,
    *,
    ttl_ms: int = TTL,
    idle_ms: int = 120_000,
    limits: EventLimits | None = None,
    shared_rows: bool = False,
) -> Rig:
    fs = world.featureset
    store = MemoryTransientStore(clock=clock)
    bus = RecordingBus()
    ledger = CostLedger()
    logger: FeatureLogger
    if lazy:
        contexts = ContextCache(1 << 30, idle_ms, WINDOW, clock, ledger)
        logger = LazyLogger(
            fs, store, bus, ledger, ttl_ms, contexts, Paging(6, 9), lookahead=2, shared_rows=shared_rows
        )
        layout = TableLayout.REQUEST
    else:
        logger = EagerLogger(fs, store, bus, ledger, ttl_ms)
        layout = TableLayout.IMPRESSION
    warehouse = ParquetWarehouse(str(root), fs, layout, ledger)
    joiner = LabelJoiner(logger, bus, warehouse, ledger, clock, WINDOW, LATENESS)
    service = LoggingService(
        logger, bus, limits or EventLimits(window_ms=WINDOW, lateness_ms=LATENESS), clock
    )
    return Rig(lazy, clock, store, bus, ledger, logger, service, joiner, warehouse)


def rank(funnel: Funnel, users: Sequence[int], t_ms: int = T0) -> tuple[list[RequestRef], RankedBatch]:
    """Rank a request for each of the world's users of rows ``users`` (the refs carry raw user ids)."""
    users_arr = funnel.world.user_ids[np.asarray(users, np.int64)]
    batch = funnel.rank(users_arr, np.full(len(users_arr), t_ms), np.arange(len(users_arr)) % 3)
    refs = [RequestRef(f"req{b:03d}", int(u), t_ms, batch.n_items) for b, u in enumerate(users_arr)]
    return refs, batch


def events(
    ref: RequestRef,
    items: np.ndarray,
    rows: Sequence[tuple[int, EventKind | int, int, float]],
) -> EventBatch:
    """A batch from ``(position, kind, ms after the ranking, value)`` rows naming the shown items."""
    pos = np.array([r[0] for r in rows], np.int32)
    return EventBatch(
        ref.request_id,
        pos,
        items[np.clip(pos, 0, len(items) - 1)].astype(np.int64),
        np.array([int(r[1]) for r in rows], np.int8),
        np.array([ref.ts_ms + r[2] for r in rows], np.int64),
        np.array([r[3] for r in rows], np.float32),
    )


def views(positions: Sequence[int] | range, start_ms: int = 1_000, step_ms: int = 500) -> list[tuple]:
    return [(int(p), EventKind.VIEW, start_ms + i * step_ms, 0.0) for i, p in enumerate(positions)]


def _cols(table: pa.Table) -> dict[str, pa.ChunkedArray]:
    return {name: table.column(name) for name in table.column_names}


def item_block(fs: FeatureSet, table: pa.Table) -> FeatureBlock:
    return arrays_block(fs.layout(Side.ITEM), _cols(table), table.num_rows)


def request_block(fs: FeatureSet, table: pa.Table) -> FeatureBlock:
    return arrays_block(fs.layout(Side.REQUEST), _cols(table), table.num_rows)


def u32(block: FeatureBlock) -> np.ndarray:
    """The exact bits of a block, row by row (an int64 column as two 32-bit words)."""
    return np.hstack([block.floats.view(np.uint32), block.ints.view(np.uint32)])


@pytest.fixture
def funnel(small_world: World) -> Funnel:
    return Funnel(small_world)


# --------------------------------------------------------------------------- 1. no skew
@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_joined_features_are_the_scored_bytes_however_the_store_changed(
    small_world: World, funnel: Funnel, tmp_path: Path, lazy: bool
) -> None:
    world, fs = small_world, small_world.featureset
    clock = ManualClock(T0)
    rig = make_rig(world, lazy, tmp_path / "wh", clock)
    refs, batch = rank(funnel, [3, 17])
    n = batch.n_items
    scored_req, scored_items = batch.request.copy(), batch.items.copy()
    item_ids = batch.item_ids.copy()
    rig.service.ranked(refs, batch)

    # The world moves on before anyone engages: engagement drifts counters, then every user and
    # item feature the ranking read is overwritten with other values.
    eng = world.engage(batch.user_ids, item_ids, np.random.default_rng(5))
    world.apply(batch.user_ids, item_ids, eng)
    touched = np.unique(item_ids)
    block = world.store.get_many(Owner.ITEM, touched)
    world.store.put_many(Owner.ITEM, touched, FeatureBlock(block.floats * 1.5 + 1.0, block.ints + 1))
    ublock = world.store.get_many(Owner.USER, batch.user_ids)
    world.store.put_many(Owner.USER, batch.user_ids, FeatureBlock(ublock.floats - 2.0, ublock.ints + 3))
    # The logger must own what it froze: scribbling over the ranking's buffers changes nothing.
    batch.items.floats[:] = np.nan
    batch.items.ints[:] = -7
    batch.request.floats[:] = np.nan
    batch.request.ints[:] = -7
    batch.item_ids[:] = 0

    viewed = {0: [0, 1, 5, 7, 20, 41], 1: [2, 3, 60]}
    clock.set(T0 + 2_000)
    rig.service.paginate(refs[0], 4)  # pages 0 and 1 by signal; 20, 41 and 60 by touch
    for b, positions in viewed.items():
        rows = [*views(positions), (positions[0], EventKind.CLICK, 9_000, 0.0)]
        report = rig.service.events(refs[b], events(refs[b], item_ids[b], rows))
        assert report.total == 0
    clock.set(JOIN_AT)
    rig.settle()

    table = rig.examples()
    rids = table.column("request_id").to_pylist()
    positions = table.column("position").to_numpy().astype(np.int64)
    b_of = np.array([int(r[3:]) for r in rids])
    assert sorted(zip(rids, positions.tolist(), strict=True)) == [
        (refs[b].request_id, p) for b in viewed for p in viewed[b]
    ]
    assert np.array_equal(table.column("item_id").to_numpy(), item_ids[b_of, positions])

    # Byte for byte what the late ranker scored ...
    got_items, got_req = item_block(fs, table), request_block(fs, table)
    want_items = scored_items.take(b_of * n + positions)
    want_req = scored_req.take(b_of)
    assert np.array_equal(u32(got_items), u32(want_items))
    assert np.array_equal(u32(got_req), u32(want_req))
    assert np.array_equal(got_items.row_fingerprints(), want_items.row_fingerprints())
    assert np.array_equal(got_req.row_fingerprints(), want_req.row_fingerprints())
    # ... and not what a fresh lookup would have read.
    now_items = world.store.get_many(Owner.ITEM, table.column("item_id").to_numpy())
    assert (now_items.row_fingerprints() != got_items.row_fingerprints()).all()
    ufw, uiw = fs.widths(Owner.USER)
    now_users = world.store.get_many(Owner.USER, batch.user_ids[b_of])
    assert not np.array_equal(now_users.floats, got_req.floats[:, :ufw])
    assert not np.array_equal(now_users.ints, got_req.ints[:, :uiw])
    assert rig.joiner.stats.labels_lost == 0


# --------------------------------------------------------------------------- 2. no lost labels
def test_fast_scroll_past_the_signal_still_joins_every_viewed_position(
    small_world: World, funnel: Funnel, tmp_path: Path
) -> None:
    fs = small_world.featureset
    clock = ManualClock(T0)
    rig = make_rig(small_world, True, tmp_path / "wh", clock)
    refs, batch = rank(funnel, [42])
    scored = batch.items.copy()
    rig.service.ranked(refs, batch)
    clock.set(T0 + 1_000)
    fast = range(30, 41)  # no pagination signal ever arrives
    rows = [*views(fast, step_ms=100), (35, EventKind.CLICK, 2_000, 0.0), (38, EventKind.LIKE, 2_500, 0.0)]
    rig.service.events(refs[0], events(refs[0], batch.item_ids[0], rows))
    assert rig.logger.stats.pages_on_signal == 0
    assert rig.logger.stats.pages_on_touch == 2  # pages 3 (24..32) and 4 (33..41)
    clock.set(JOIN_AT)
    rig.settle()

    table = rig.examples()
    positions = table.column("position").to_numpy()
    assert positions.tolist() == list(fast)
    assert rig.joiner.stats.labels_lost == 0
    assert rig.joiner.stats.examples == len(fast)
    assert np.array_equal(table.column("item_id").to_numpy(), batch.item_ids[0, fast])
    assert table.column("click").to_pylist() == [p == 35 for p in fast]
    assert table.column("like").to_pylist() == [p == 38 for p in fast]
    assert np.array_equal(u32(item_block(fs, table)), u32(scored.take(np.asarray(fast))))


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_out_of_order_and_duplicate_events_give_the_same_record(
    small_world: World, funnel: Funnel, tmp_path: Path, lazy: bool
) -> None:
    clock = ManualClock(T0)
    once = make_rig(small_world, lazy, tmp_path / "once", clock)
    messy = make_rig(small_world, lazy, tmp_path / "messy", clock)
    refs, batch = rank(funnel, [7])
    ref, items = refs[0], batch.item_ids[0]
    for rig in (once, messy):
        rig.service.ranked(refs, batch)
    rows = [
        *views(range(13)),
        (2, EventKind.CLICK, 1_300, 0.0),
        (2, EventKind.LIKE, 2_000, 0.0),
        (2, EventKind.WATCH, 9_000, 4_000.0),
        (2, EventKind.WATCH, 15_000, 11_000.0),
        (2, EventKind.WATCH, 20_000, 7_000.0),
        (4, EventKind.HIDE, 3_100, 0.0),
        (9, EventKind.CLICK, 5_600, 0.0),
        (9, EventKind.SHARE, 7_000, 0.0),
        (12, EventKind.WATCH, 30_000, 2_500.0),
    ]
    rows.sort(key=lambda r: r[2])
    clock.set(T0 + 40_000)
    assert once.service.events(ref, events(ref, items, rows)).total == 0
    # The messy client: three batches, the deepest first, each shuffled, each sent twice.
    rng = np.random.default_rng(3)
    chunks = [rows[i::3] for i in range(3)][::-1]
    for chunk in chunks:
        shuffled = [chunk[i] for i in rng.permutation(len(chunk))]
        for _ in range(2):
            assert messy.service.events(ref, events(ref, items, shuffled)).total == 0
    clock.set(JOIN_AT)
    for rig in (once, messy):
        rig.settle()

    a, b = once.warehouse.read(), messy.warehouse.read()
    assert a.num_rows == (1 if lazy else 13)
    if not lazy:
        a, b = a.sort_by(SORT), b.sort_by(SORT)
    assert a.equals(b)
    ex = once.examples()
    assert ex.column("position").to_pylist() == list(range(13))
    assert ex.column("watch_ms").to_pylist()[2] == 11_000
    assert ex.column("watch_ms").to_pylist()[12] == 2_500
    assert ex.column("view_ms").to_pylist()[2] == T0 + 1_300  # the click came first
    assert ex.column("click").to_pylist() == [p in (2, 9) for p in range(13)]
    assert ex.column("hide").to_pylist() == [p == 4 for p in range(13)]
    assert once.joiner.stats.duplicate_events == 0
    assert messy.joiner.stats.duplicate_events == len(rows)
    assert messy.joiner.stats.labels_lost == once.joiner.stats.labels_lost == 0


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_redelivered_messages_and_resent_batches_are_not_written_twice(
    small_world: World, funnel: Funnel, tmp_path: Path, lazy: bool
) -> None:
    clock = ManualClock(T0)
    rig = make_rig(small_world, lazy, tmp_path / "wh", clock)
    refs, batch = rank(funnel, [1, 2])
    rig.service.ranked(refs, batch)
    clock.set(T0 + 5_000)
    sent = []
    for b, ref in enumerate(refs):
        rows = [*views(range(4 + 3 * b)), (1, EventKind.CLICK, 3_000, 0.0)]
        sent.append((ref, events(ref, batch.item_ids[b], rows)))
        assert rig.service.events(*sent[-1]).total == 0
    n_events = sum(len(ev) for _, ev in sent)
    first_delivery = list(rig.bus.log)
    assert [type(m) for m in first_delivery] == [RequestOpened, RequestOpened]
    # Before the join, the bus delivers every record a second time (an at-least-once producer retry)
    # and the client sends every batch a second time, without a batch id (a retry after a timeout).
    rig.bus.append_many(first_delivery)
    clock.set(T0 + 8_000)
    for ref, ev in sent:
        assert rig.service.events(ref, ev).total == 0
    clock.set(JOIN_AT)
    rig.settle()
    table, files = rig.examples(), rig.parquet_files()
    assert table.num_rows == 4 + 7
    assert table.column("click").to_pylist() == [p == 1 for p in range(4)] + [p == 1 for p in range(7)]
    assert rig.joiner.stats.requests_joined == 2
    assert rig.joiner.stats.duplicate_events == n_events
    assert rig.bus.pending() == 0

    # ... and a third time after the join was committed: the records are acknowledged without a
    # second join, and the batches are refused at ingest because the window closed.
    clock.set(JOIN_AT + 10_000)
    rig.bus.append_many(first_delivery)
    for ref, ev in sent:
        report = rig.service.events(ref, ev)
        assert report.refused == {"window_closed": len(ev)}
        assert "window closed" in report.messages["window_closed"]
    rig.settle()
    rig.joiner.drain()
    assert rig.parquet_files() == files
    assert rig.examples().equals(table)
    assert rig.joiner.stats.requests_joined == 2
    assert rig.joiner.stats.examples == 11
    assert rig.service.stats.events_refused == {"window_closed": n_events}
    assert rig.bus.pending() == 0 and rig.bus.backlog() == 0
    assert rig.store.stats().keys_held == 0  # nothing was logged or stored again


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_a_batch_sent_again_under_its_batch_id_is_refused_and_the_record_is_unchanged(
    small_world: World, funnel: Funnel, tmp_path: Path, lazy: bool
) -> None:
    clock = ManualClock(T0)
    once = make_rig(small_world, lazy, tmp_path / "once", clock)
    twice = make_rig(small_world, lazy, tmp_path / "twice", clock)
    refs, batch = rank(funnel, [7, 8])
    for rig in (once, twice):
        rig.service.ranked(refs, batch)
    clock.set(T0 + 5_000)
    sent = []
    for b, ref in enumerate(refs):
        sent.append((ref, events(ref, batch.item_ids[b], views(range(3)))))
        sent.append((ref, events(ref, batch.item_ids[b], [(b, EventKind.LIKE, 4_000, 0.0)])))
    for i, (ref, ev) in enumerate(sent):
        assert once.service.events(ref, ev, batch_id=f"b{i % 2}").total == 0
        assert twice.service.events(ref, ev, batch_id=f"b{i % 2}").total == 0
    clock.set(T0 + 9_000)
    for i, (ref, ev) in enumerate(sent):
        report = twice.service.events(ref, ev, batch_id=f"b{i % 2}")
        assert report.refused == {"replayed": len(ev)}
    clock.set(JOIN_AT)
    for rig in (once, twice):
        rig.settle()
    a, b = once.warehouse.read(), twice.warehouse.read()
    if not lazy:
        a, b = a.sort_by(SORT), b.sort_by(SORT)
    assert a.num_rows == (2 if lazy else 6)
    assert a.equals(b)
    assert once.examples().column("like").to_pylist() == [True, False, False, False, True, False]
    assert twice.service.stats.events_refused == {"replayed": sum(len(ev) for _, ev in sent)}
    assert twice.joiner.stats.duplicate_events == 0  # the replays never reached the join
    assert twice.joiner.stats.events_joined == once.joiner.stats.events_joined == 8


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_a_batch_accepted_at_the_deadline_is_joined_and_one_after_it_is_refused(
    small_world: World, funnel: Funnel, tmp_path: Path, lazy: bool
) -> None:
    clock = ManualClock(T0)
    rig = make_rig(small_world, lazy, tmp_path / "wh", clock)
    refs, batch = rank(funnel, [9])
    ref, items = refs[0], batch.item_ids[0]
    rig.service.ranked(refs, batch)
    clock.set(T0 + 5_000)
    rig.service.events(ref, events(ref, items, views(range(4))))
    rig.settle()
    deadline = T0 + WINDOW + LATENESS
    clock.set(deadline)
    rig.settle()  # the joiner waits past the deadline, so a batch accepted at it still lands
    assert rig.joiner.stats.requests_joined == 0
    assert rig.service.events(ref, events(ref, items, [(1, EventKind.CLICK, WINDOW, 0.0)])).total == 0
    clock.set(deadline + 1)
    refused = rig.service.events(ref, events(ref, items, [(2, EventKind.CLICK, WINDOW, 0.0)]))
    assert refused.refused == {"window_closed": 1}
    clock.set(JOIN_AT)
    rig.settle()
    table = rig.examples()
    assert table.column("position").to_pylist() == [0, 1, 2, 3]
    assert table.column("click").to_pylist() == [False, True, False, False]
    assert rig.joiner.stats.events_joined == 5
    assert rig.service.stats.events_accepted == 5
    assert rig.service.stats.events_refused == {"window_closed": 1}


# --------------------------------------------------------------------------- 3. lazy = eager
@pytest.mark.parametrize("shared_rows", [False, True], ids=["lazy", "lazy-shared-rows"])
def test_lazy_and_eager_paths_give_identical_examples(
    small_world: World, funnel: Funnel, tmp_path: Path, shared_rows: bool
) -> None:
    clock = ManualClock(T0)
    eager = make_rig(small_world, False, tmp_path / "naive", clock)
    lazy = make_rig(small_world, True, tmp_path / "lean", clock, shared_rows=shared_rows)
    refs, batch = rank(funnel, [5, 9, 11, 13])
    for rig in (eager, lazy):
        rig.service.ranked(refs, batch)
    ids = batch.item_ids
    # req0 stays in the head; req1 reads deep with signals; req2 scrolls fast with no signal;
    # req3 views nothing at all.
    script: list[tuple[int, str, object]] = [
        (0, "events", [*views(range(4)), (1, EventKind.CLICK, 2_000, 0.0)]),
        (1, "page", 4),
        (1, "events", views(range(13))),
        (1, "page", 13),
        (1, "events", [*views(range(13, 21), 8_000), (17, EventKind.WATCH, 14_000, 6_000.0)]),
        (1, "events", [(17, EventKind.CLICK, 12_000, 0.0), (17, EventKind.LIKE, 13_000, 0.0)]),
        (2, "events", [*views(range(50, 61), 700, 50), (55, EventKind.HIDE, 1_300, 0.0)]),
    ]
    for step, (b, what, arg) in enumerate(script):
        clock.set(T0 + 1_000 * (step + 1))
        for rig in (eager, lazy):
            if what == "page":
                rig.service.paginate(refs[b], int(arg))  # type: ignore[arg-type]
            else:
                rig.service.events(refs[b], events(refs[b], ids[b], arg))  # type: ignore[arg-type]

    # Before the join: the eager path logged every ranked item, the lazy one only what was seen.
    opened = [m for m in eager.bus.log if isinstance(m, RequestOpened)]
    assert len(opened) == 4
    eager_keys = [k for r in opened for k in eager.logger.keys(r)]
    assert all(v is not None for v in eager.store.get_many(eager_keys))
    assert eager.logger.stats.entries_written == 4 * batch.n_items
    rows = lazy.logger.stats.rows_written  # shared rows: stored once, referenced by the pages
    assert lazy.logger.stats.entries_written - rows < eager.logger.stats.entries_written / 5
    # Both paths store the same event batches beside the features: five batches, one append each.
    ev_keys = [f"lr:{{{r.request_id}}}:ev" for r in opened]
    assert eager.store.get_lists_many(ev_keys) == lazy.store.get_lists_many(ev_keys)
    assert [len(c) for c in eager.store.get_lists_many(ev_keys)] == [1, 3, 1, 0]
    assert eager.store.stats().writes == 4 * batch.n_items + 5
    assert lazy.store.stats().writes - rows < eager.store.stats().writes / 5
    assert lazy.store.stats().bytes_written < eager.store.stats().bytes_written / 5

    clock.set(JOIN_AT)
    for rig in (eager, lazy):
        rig.settle()
    naive_t, lean_t = eager.examples(), lazy.examples()
    assert naive_t.num_rows == 4 + 21 + 11
    assert naive_t.equals(lean_t)
    assert set(naive_t.column("request_id").to_pylist()) == {"req000", "req001", "req002"}
    for rig in (eager, lazy):
        assert rig.joiner.stats.labels_lost == 0
        assert rig.joiner.stats.requests_joined == 4


# --------------------------------------------------------------------------- 4. layouts ≡
@pytest.fixture(scope="module")
def demo_tables(tmp_path_factory: pytest.TempPathFactory) -> tuple[pa.Table, pa.Table, FeatureSet]:
    out = tmp_path_factory.mktemp("demo4")
    config = WorldConfig(n_users=400, n_items=3_000, n_creators=200, seed=11)
    result = run_demo(requests=150, seed=3, out=out, world_config=config)
    naive = result.pipelines[Plumbing.NAIVE].warehouse
    lean = result.pipelines[Plumbing.LEAN].warehouse
    return naive.read(), lean.read(), naive.featureset


def test_request_and_impression_layouts_convert_into_each_other_without_loss(
    demo_tables: tuple[pa.Table, pa.Table, FeatureSet],
) -> None:
    naive, lean, fs = demo_tables
    assert lean.num_rows > 100
    assert naive.num_rows > 3 * lean.num_rows  # several viewed items per request
    lean = lean.sort_by("request_id")
    naive = naive.sort_by(SORT)
    assert naive.column("score").null_count == 0  # the funnel scored every item it ranked
    assert request_to_impression(lean, fs).sort_by(SORT).equals(naive)
    assert impression_to_request(naive, fs).equals(lean)
    # Round trips in both directions.
    assert impression_to_request(request_to_impression(lean, fs), fs).equals(lean)
    assert request_to_impression(impression_to_request(naive, fs), fs).sort_by(SORT).equals(naive)


def test_a_conversion_drops_nothing_it_is_given(
    demo_tables: tuple[pa.Table, pa.Table, FeatureSet],
) -> None:
    """The equality above is not vacuous: a table missing one example no longer matches."""
    naive, lean, fs = demo_tables
    naive = naive.sort_by(SORT)
    short = naive.slice(1)
    assert not impression_to_request(short, fs).equals(lean.sort_by("request_id"))
    flipped = naive.set_column(
        naive.schema.get_field_index("click"),
        naive.schema.field("click"),
        pa.array(~naive.column("click").to_numpy(zero_copy_only=False)),
    )
    assert not impression_to_request(flipped, fs).equals(lean.sort_by("request_id"))
    scores = naive.column("score").to_numpy().copy()
    scores[len(scores) // 2] += 1.0
    moved = naive.set_column(
        naive.schema.get_field_index("score"), naive.schema.field("score"), pa.array(scores)
    )
    assert not impression_to_request(moved, fs).equals(lean.sort_by("request_id"))


TINY_FS = FeatureSet(
    "tiny",
    3,
    (
        Feature("u_a", Owner.USER, Kind.DENSE),
        Feature("u_vec", Owner.USER, Kind.DENSE, 3),
        Feature("u_id", Owner.USER, Kind.SPARSE, 1, 50),
        Feature("u_set", Owner.USER, Kind.MULTI_HOT, 2, 9),
        Feature("c_hour", Owner.CONTEXT, Kind.SPARSE, 1, 24),
        Feature("i_a", Owner.ITEM, Kind.DENSE),
        Feature("i_vec", Owner.ITEM, Kind.DENSE, 2),
        Feature("i_id", Owner.ITEM, Kind.SPARSE, 1, 1000),
        Feature("i_seq", Owner.ITEM, Kind.SEQUENCE, 3, 1000),
    ),
)


def _raw_ids(rng: np.random.Generator, shape: int | tuple[int, ...]) -> np.ndarray:
    """Raw 64-bit ids over the whole int64 range (the padding id aside)."""
    ids = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, shape, dtype=np.int64, endpoint=True)
    return np.where(ids == -1, -2, ids)


def random_records(seed: int, n_records: int, max_items: int) -> list[RequestRecord]:
    rng = np.random.default_rng(seed)
    req, item = TINY_FS.layout(Side.REQUEST), TINY_FS.layout(Side.ITEM)
    ids = rng.permutation(10 * n_records)[:n_records]
    out = []
    for i in range(n_records):
        k = int(rng.integers(1, max_items + 1))
        positions = np.sort(rng.choice(100, size=k, replace=False)).astype(np.int32)
        ts = T0 + int(rng.integers(0, 7_200_000))
        out.append(
            RequestRecord(
                f"r{ids[i]:04d}",
                int(_raw_ids(rng, 1)[0]),
                ts,
                TINY_FS.version,
                FeatureBlock(
                    rng.normal(size=(1, req.float_width)).astype(np.float32),
                    np.where(rng.random((1, req.int_width)) < 0.2, -1, _raw_ids(rng, (1, req.int_width))),
                ),
                positions,
                _raw_ids(rng, k),
                ts + rng.integers(0, 600_000, k).astype(np.int64),
                FeatureBlock(
                    rng.normal(size=(k, item.float_width)).astype(np.float32),
                    np.where(rng.random((k, item.int_width)) < 0.2, -1, _raw_ids(rng, (k, item.int_width))),
                ),
                {
                    "click": rng.random(k) < 0.3,
                    "like": rng.random(k) < 0.2,
                    "share": rng.random(k) < 0.1,
                    "hide": rng.random(k) < 0.1,
                    "watch_ms": rng.integers(0, 60_000, k).astype(np.int32),
                },
                # The ranker's scores: some missing (NaN), and a request logged without any.
                None
                if rng.random() < 0.2
                else np.where(rng.random(k) < 0.2, np.nan, rng.normal(size=k)).astype(np.float32),
            )
        )
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n_records=st.integers(1, 6),
    max_items=st.integers(1, 8),
)
def test_layout_round_trip_property(seed: int, n_records: int, max_items: int) -> None:
    records = random_records(seed, n_records, max_items)
    req = records_table(TINY_FS, records, TableLayout.REQUEST)
    imp = records_table(TINY_FS, records, TableLayout.IMPRESSION)
    assert req.num_rows == n_records
    assert imp.num_rows == sum(len(r) for r in records)
    req_sorted, imp_sorted = req.sort_by("request_id"), imp.sort_by(SORT)
    assert request_to_impression(req, TINY_FS).sort_by(SORT).equals(imp_sorted)
    assert impression_to_request(imp, TINY_FS).equals(req_sorted)
    assert impression_to_request(request_to_impression(req, TINY_FS), TINY_FS).equals(req_sorted)
    back = request_to_impression(impression_to_request(imp, TINY_FS), TINY_FS)
    assert back.sort_by(SORT).equals(imp_sorted)
    # The features survive as exact bits, and the scores as given (null where there is none).
    first = records[0]
    rows = imp_sorted.filter(pc.equal(imp_sorted.column("request_id"), first.request_id))
    got = arrays_block(TINY_FS.layout(Side.ITEM), _cols(rows), len(first))
    assert np.array_equal(u32(got), u32(first.items))
    given = np.full(len(first), np.nan, np.float32) if first.scores is None else first.scores
    kept = rows.column("score").to_numpy(zero_copy_only=False).astype(np.float32)
    assert np.array_equal(kept, given, equal_nan=True)
    assert rows.column("score").null_count == int(np.isnan(given).sum())


# --------------------------------------------------------------------------- 5. TTL
@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_entries_never_joined_are_gone_after_the_ttl(
    small_world: World, funnel: Funnel, tmp_path: Path, lazy: bool
) -> None:
    clock = ManualClock(T0)
    ttl = 60_000
    rig = make_rig(small_world, lazy, tmp_path / "wh", clock, ttl_ms=ttl)
    refs, batch = rank(funnel, [4, 8, 15])
    rig.service.ranked(refs, batch)
    clock.set(T0 + 1_000)
    rig.service.paginate(refs[0], 10)  # pages 0 and 1 logged, most of page 1 never viewed
    rig.service.events(refs[0], events(refs[0], batch.item_ids[0], views(range(4))))
    # No joiner ever comes for these requests.
    opened = [m for m in rig.bus.log if isinstance(m, RequestOpened)]
    keys = [k for ref in opened for k in rig.logger.keys(ref)]
    ev_keys = [f"lr:{{{ref.request_id}}}:ev" for ref in opened]
    held = rig.store.stats()
    assert held.keys_held == (3 * 100 if not lazy else 3 * 2 + 1) + 1  # and req000's event list
    assert held.bytes_held > 0

    clock.set(T0 + ttl - 1)
    assert rig.store.purge_expired() == 0
    present = [v is not None for v in rig.store.get_many(keys)]
    present += [bool(chunks) for chunks in rig.store.get_lists_many(ev_keys)]
    assert sum(present) == held.keys_held  # everything stored is still there one ms before the TTL
    clock.set(T0 + 1_000 + ttl)
    assert rig.store.get_many(keys) == [None] * len(keys)
    assert rig.store.get_lists_many(ev_keys) == [[]] * len(ev_keys)
    rig.store.purge_expired()
    after = rig.store.stats()
    assert after.keys_held == 0
    assert after.bytes_held == 0
    assert len(rig.store) == 0
    assert after.expiries == held.keys_held


def test_shared_rows_outlive_the_join_and_are_gone_after_the_ttl(
    small_world: World, funnel: Funnel, tmp_path: Path
) -> None:
    """The joiner deletes a request's own keys only; the rows it shares expire by their TTL."""
    clock = ManualClock(T0)
    ttl = WINDOW + LATENESS + 60_000
    rig = make_rig(small_world, True, tmp_path / "wh", clock, ttl_ms=ttl, shared_rows=True)
    refs, batch = rank(funnel, [4, 4, 8])  # one user twice: one row of slowly changing features
    rig.service.ranked(refs, batch)
    clock.set(T0 + 1_000)
    rig.service.events(refs[0], events(refs[0], batch.item_ids[0], views(range(4))))
    rows = [k for k in rig.store._data if re.fullmatch(r"lr:\{r[0-9a-f]{16}\}", k)]
    assert rows and rig.logger.stats.rows_written == len(rows)
    clock.set(JOIN_AT)
    rig.settle()
    assert rig.joiner.stats.requests_joined == 3 and rig.joiner.stats.labels_lost == 0
    assert rig.examples().num_rows == 4
    opened = [m for m in rig.bus.log if isinstance(m, RequestOpened)]
    own = [k for ref in opened for k in rig.logger.keys(ref)]
    assert rig.store.get_many(own) == [None] * len(own)  # joined and deleted
    assert None not in rig.store.get_many(rows)  # shared rows stay: other requests may use them
    clock.set(T0 + ttl - 1)
    assert None not in rig.store.get_many(rows)
    clock.set(T0 + ttl)
    assert rig.store.get_many(rows) == [None] * len(rows)
    rig.store.purge_expired()
    assert rig.store.stats().keys_held == 0 and rig.store.stats().bytes_held == 0


def test_memory_of_expired_entries_is_released(small_world: World, funnel: Funnel, tmp_path: Path) -> None:
    clock = ManualClock(T0)
    rig = make_rig(small_world, False, tmp_path / "wh", clock, ttl_ms=10_000)
    refs, batch = rank(funnel, [1, 2, 3, 4])
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        rig.service.ranked(refs, batch)
        held = rig.store.stats().bytes_held
        loaded = tracemalloc.get_traced_memory()[0] - base
        assert held > 1_000_000  # 400 entries of the whole scored vector
        assert loaded >= held
        clock.set(T0 + 10_000)
        assert rig.store.purge_expired() == 400
        gc.collect()
        left = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert rig.store.stats().bytes_held == 0
    assert left < 0.05 * held


def test_lazy_contexts_are_released_after_idle_and_age_bounds(
    small_world: World, funnel: Funnel, tmp_path: Path
) -> None:
    clock = ManualClock(T0)
    rig = make_rig(small_world, True, tmp_path / "wh", clock, idle_ms=30_000)
    contexts: ContextCache = rig.logger.contexts  # type: ignore[attr-defined]
    refs, batch = rank(funnel, [10, 20, 30])
    rig.service.ranked(refs, batch)
    assert len(contexts) == 3
    assert contexts.stats.bytes_held > 3 * 100 * small_world.featureset.layout(Side.ITEM).row_bytes
    ctxs = [contexts.get(r.request_id) for r in refs]
    alive = [weakref.ref(c.items.floats) for c in ctxs if c is not None]
    del ctxs
    assert len(alive) == 3

    # req2 completes: every page logged, so nothing is held for it any more.
    rig.service.paginate(refs[2], 99)
    assert contexts.stats.completed == 1
    clock.set(T0 + 29_999)
    rig.service.paginate(refs[1], 0)  # a touch keeps req1 alive
    rig.logger.tick()
    assert len(contexts) == 2
    clock.set(T0 + 30_000)
    rig.logger.tick()  # req0 went idle
    assert len(contexts) == 1
    assert contexts.stats.expired == 1
    # req1 is touched every 20 s, yet released when it reaches the age bound (the window).
    t = T0 + 30_000
    while len(contexts):
        t += 20_000
        clock.set(t)
        rig.service.paginate(refs[1], 0)
        rig.logger.tick()
        assert t <= T0 + WINDOW + 20_000
    assert t >= T0 + WINDOW
    assert contexts.stats.expired == 2
    assert contexts.stats.held == 0
    assert contexts.stats.bytes_held == 0
    assert rig.ledger["context"].byte_seconds_held > 0
    gc.collect()
    assert [a() for a in alive] == [None, None, None]


# --------------------------------------------------------------------------- 6. bad input
@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_bad_events_are_refused_counted_and_the_good_ones_still_join(
    small_world: World, funnel: Funnel, tmp_path: Path, lazy: bool
) -> None:
    clock = ManualClock(T0)
    limits = EventLimits(max_events=50, window_ms=WINDOW)
    rig = make_rig(small_world, lazy, tmp_path / "wh", clock, limits=limits)
    refs, batch = rank(funnel, [6, 12])
    ref, items = refs[0], batch.item_ids[0]
    rig.service.ranked(refs, batch)
    clock.set(T0 + 10_000)

    good = [*views(range(5)), (1, EventKind.CLICK, 2_000, 0.0), (3, EventKind.WATCH, 5_000, 8_000.0)]
    bad = [
        (2, 42, 2_100, 0.0),  # unknown kind
        (100, EventKind.VIEW, 2_200, 0.0),  # off the ranked list
        (-1, EventKind.VIEW, 2_200, 0.0),
        (2, EventKind.VIEW, -5, 0.0),  # before the ranking
        (2, EventKind.CLICK, WINDOW + 1, 0.0),  # after the attribution window
        (2, EventKind.WATCH, 2_300, float("nan")),
        (2, EventKind.WATCH, 2_300, -1.0),
        (2, EventKind.WATCH, 2_300, 5e9),
    ]
    mixed = [x for pair in zip(good, bad, strict=False) for x in pair] + good[len(bad) :] + bad[len(good) :]
    report = rig.service.events(ref, events(ref, items, mixed))
    assert report.refused == {
        "unknown_kind": 1,
        "bad_position": 2,
        "before_rank": 1,
        "late": 1,
        "bad_value": 3,
    }
    assert all(report.messages[r] for r in report.refused)
    assert "attribution window" in report.messages["late"]
    assert "ranked list of 100" in report.messages["bad_position"]
    assert rig.service.stats.events_accepted == len(good)

    # Oversized and forged (presented for another request) batches are refused whole.
    too_many = rig.service.events(ref, events(ref, items, views(range(51))))
    assert too_many.refused == {"too_many": 51}
    assert "limit 50" in too_many.messages["too_many"]
    forged = events(refs[1], batch.item_ids[1], views(range(3)))
    assert rig.service.events(ref, forged).refused == {"wrong_request": 3}
    # Malformed client records: each refused with its reason, the rest of the batch goes on.
    records: list[object] = [
        {"position": 5, "item_id": int(items[5]), "kind": "view", "ts_ms": T0 + 3_000},
        {"position": 6, "item_id": int(items[6]), "kind": "poke", "ts_ms": T0 + 3_000},
        {"position": 6, "kind": "view", "ts_ms": T0 + 3_000},
        {"position": 6.5, "item_id": int(items[6]), "kind": "view", "ts_ms": T0 + 3_000},
        {"position": True, "item_id": int(items[6]), "kind": "view", "ts_ms": T0 + 3_000},
        {"position": 6, "item_id": int(items[6]), "kind": "watch", "ts_ms": T0 + 3_000, "value": "x"},
        {"position": 2**32 + 7, "item_id": int(items[7]), "kind": "view", "ts_ms": T0 + 3_000},
        {"position": 7, "item_id": int(items[7]), "kind": "view", "ts_ms": 2**70},
        "not an event",
    ]
    parsed, errors = EventBatch.from_records(ref.request_id, records)  # type: ignore[arg-type]
    assert parsed.position.tolist() == [5]
    assert len(errors) == len(records) - 1
    assert "missing field 'item_id'" in errors[1]
    assert "unknown kind" in errors[0]
    assert rig.service.events(ref, parsed).total == 0

    # Unknown requests: a pagination for a request nobody ranked is counted, not fatal.
    ghost = RequestRef("ghost", 1, T0, 100)
    assert rig.service.paginate(ghost, 3) == 0
    with pytest.raises(ValueError, match="outside the ranked list"):
        rig.service.paginate(ref, 100)
    ghost_events = rig.service.events(ghost, events(ghost, items, views(range(2))))
    assert ghost_events.total == 0

    clock.set(JOIN_AT)
    rig.settle()
    table = rig.examples()
    assert table.column("position").to_pylist() == [0, 1, 2, 3, 4, 5]
    assert table.column("click").to_pylist() == [False, True, False, False, False, False]
    assert table.column("watch_ms").to_pylist() == [0, 0, 0, 8_000, 0, 0]
    assert set(table.column("request_id").to_pylist()) == {ref.request_id}
    assert rig.joiner.stats.events_joined == len(good) + 1  # nothing of the ghost's events
    assert rig.joiner.stats.labels_lost == 0
    assert sum(rig.service.stats.events_refused.values()) == 8 + 51 + 3
    # The ghost's batch was never joined: it waits in the store until its TTL, then it is gone.
    ghost_ev = f"lr:{{{ghost.request_id}}}:ev"
    assert [len(EventBatch.from_bytes(c)) for c in rig.store.get_lists_many([ghost_ev])[0]] == [2]
    clock.set(T0 + 10_000 + TTL)
    rig.store.purge_expired()
    assert rig.store.get_lists_many([ghost_ev]) == [[]]
    if lazy:
        assert rig.logger.stats.signals_after_release == 1
        assert rig.logger.stats.touch_after_release == 2  # no context to log the ghost's pages from


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_late_and_mismatched_events_are_counted_not_joined(
    small_world: World, funnel: Funnel, tmp_path: Path, lazy: bool
) -> None:
    clock = ManualClock(T0)
    rig = make_rig(small_world, lazy, tmp_path / "wh", clock)
    refs, batch = rank(funnel, [21])
    ref, items = refs[0], batch.item_ids[0]
    rig.service.ranked(refs, batch)
    clock.set(T0 + 5_000)
    ev = events(ref, items, [*views([0, 1, 2]), (2, EventKind.CLICK, 2_000, 0.0), *views([30], 2_500)])
    ev.item_id[3] = items[2] ^ 1  # a click naming an item that was not shown at position 2
    ev.item_id[4] = items[30] ^ 1  # the only event at position 30 names the wrong item
    # Lazy logging holds the ranked list: the two are refused at ingest. Eager holds nothing: the
    # join drops them. Either way they are counted, and the same examples are written.
    assert rig.service.events(ref, ev).refused == ({"wrong_item": 2} if lazy else {})
    clock.set(JOIN_AT)
    rig.settle()
    table = rig.examples()
    files = rig.parquet_files()
    assert table.column("position").to_pylist() == [0, 1, 2]
    assert table.column("click").to_pylist() == [False, False, False]
    assert rig.joiner.stats.mismatched_events == (0 if lazy else 2)
    assert rig.joiner.stats.examples == 3

    # A batch inside the window that arrives after the join (its event times are fine): refused
    # whole at ingest because the window closed, counted, and nothing already written changes.
    clock.set(JOIN_AT + 30_000)
    late = events(ref, items, [(3, EventKind.VIEW, WINDOW - 10, 0.0), (3, EventKind.CLICK, WINDOW - 5, 0.0)])
    report = rig.service.events(ref, late)
    assert report.refused == {"window_closed": 2}
    assert "window closed" in report.messages["window_closed"]
    assert rig.service.stats.events_refused == {"window_closed": 2, **({"wrong_item": 2} if lazy else {})}
    rig.settle()
    rig.joiner.drain()
    assert rig.joiner.stats.requests_joined == 1
    assert rig.parquet_files() == files
    assert rig.examples().equals(table)
    assert rig.bus.pending() == 0
    assert rig.store.stats().keys_held == 0  # the refused batch stored nothing, logged no page


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])
def test_a_forged_list_length_cannot_crash_the_joiner(
    small_world: World, funnel: Funnel, tmp_path: Path, lazy: bool
) -> None:
    """The client presents its RequestRef; one claiming a longer list than was ranked is not fatal."""
    clock = ManualClock(T0)
    rig = make_rig(small_world, lazy, tmp_path / "wh", clock)
    refs, batch = rank(funnel, [2, 3])
    rig.service.ranked(refs, batch)
    ref, items = refs[0], batch.item_ids[0]
    forged = RequestRef(ref.request_id, ref.user_id, ref.ts_ms, 500)
    clock.set(T0 + 5_000)
    rig.service.events(ref, events(ref, items, views(range(3))))
    bad = events(ref, items, views([1, 250, 499], 4_000))
    rig.service.events(forged, bad)
    rig.service.events(refs[1], events(refs[1], batch.item_ids[1], views(range(2))))
    clock.set(JOIN_AT)
    rig.settle()
    table = rig.examples()
    assert list(
        zip(table.column("request_id").to_pylist(), table.column("position").to_pylist(), strict=True)
    ) == [
        ("req000", 0),
        ("req000", 1),
        ("req000", 2),
        ("req001", 0),
        ("req001", 1),
    ]
    assert rig.joiner.stats.mismatched_events == 2
    assert rig.bus.pending() == 0
