"""A joiner that one bad record cannot stop: what it cannot read is set aside, the rest joins.

Between good requests the traffic holds a request logged under another FeatureSet, a request one of
whose blobs is another FeatureSet's, one with a truncated blob, an event batch that does not decode
and a bus entry that is not a RequestOpened record: on the embedded backends and on a real Redis.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import redis

from leanrec.clock import ManualClock
from leanrec.energy.ledger import CostLedger
from leanrec.events.bus import EventBus, MemoryEventBus, RequestOpened
from leanrec.events.model import EventBatch, EventKind, EventLimits, RequestRef
from leanrec.featurelog.loggers import ContextCache, EagerLogger, FeatureLogger, LazyLogger, Paging, key
from leanrec.featurelog.ranked import RankedBatch
from leanrec.funnel.ranker import Funnel
from leanrec.join.deadletter import DeadKind, DeadLetter, DeadLetterFolder, DeadLetters, MemoryDeadLetters
from leanrec.join.joiner import LabelJoiner
from leanrec.schema import FeatureSet, Side
from leanrec.serve.service import LoggingService
from leanrec.stores.transient import MemoryTransientStore, TransientStore
from leanrec.warehouse import ParquetWarehouse, TableLayout
from leanrec.world import World

T0 = int(datetime(2026, 11, 2, 9, 15, tzinfo=UTC).timestamp() * 1000)
WINDOW = 300_000
LATENESS = 30_000
JOIN_AT = T0 + WINDOW + LATENESS + 2_000
TTL = WINDOW + 120_000
GOOD = ["j0", "j2", "j4"]


@dataclass
class Side_:
    """One serving side: a logger and its service, on the shared store and bus."""

    logger: FeatureLogger
    service: LoggingService


@dataclass
class Rig:
    clock: ManualClock
    store: TransientStore
    bus: EventBus
    ours: Side_
    theirs: Side_  # a serving process already on the next FeatureSet version
    joiner: LabelJoiner
    warehouse: ParquetWarehouse
    dead: DeadLetters


def next_version(fs: FeatureSet) -> FeatureSet:
    return fs.retire({"u_noise_00": "worth less than its cost"})


def serving_side(
    fs: FeatureSet, store: TransientStore, bus: EventBus, clock: ManualClock, lazy: bool
) -> Side_:
    ledger = CostLedger()
    logger: FeatureLogger
    if lazy:
        contexts = ContextCache(1 << 30, 60_000, WINDOW, clock, ledger)
        logger = LazyLogger(fs, store, bus, ledger, TTL, contexts, Paging(6, 9), lookahead=2)
    else:
        logger = EagerLogger(fs, store, bus, ledger, TTL)
    limits = EventLimits(window_ms=WINDOW, lateness_ms=LATENESS)
    return Side_(logger, LoggingService(logger, bus, limits, clock))


def make_rig(
    fs: FeatureSet,
    store: TransientStore,
    bus: EventBus,
    lazy: bool,
    root: Path,
    dead: DeadLetters | None = None,
) -> Rig:
    clock = ManualClock(T0)
    ours = serving_side(fs, store, bus, clock, lazy)
    theirs = serving_side(next_version(fs), store, bus, clock, lazy)
    layout = TableLayout.REQUEST if lazy else TableLayout.IMPRESSION
    warehouse = ParquetWarehouse(str(root), fs, layout)
    dead = dead if dead is not None else DeadLetterFolder.of_warehouse(str(root))
    joiner = LabelJoiner(
        ours.logger, bus, warehouse, CostLedger(), clock, WINDOW, LATENESS, dead_letters=dead
    )
    return Rig(clock, store, bus, ours, theirs, joiner, warehouse, dead)


def events(ref: RequestRef, items: np.ndarray, rows: Sequence[tuple[int, EventKind, int]]) -> EventBatch:
    pos = np.array([r[0] for r in rows], np.int32)
    return EventBatch(
        ref.request_id,
        pos,
        items[pos].astype(np.int64),
        np.array([int(r[1]) for r in rows], np.int8),
        np.array([ref.ts_ms + r[2] for r in rows], np.int64),
        np.zeros(len(rows), np.float32),
    )


def engagement(ref: RequestRef, items: np.ndarray, n_viewed: int) -> EventBatch:
    rows = [(p, EventKind.VIEW, 1_000 + 400 * p) for p in range(n_viewed)]
    return events(ref, items, [*rows, (2, EventKind.CLICK, 9_000)])


@dataclass
class Traffic:
    refs: list[RequestRef]
    batch: RankedBatch
    foreign: RequestRef


def rank(world: World) -> tuple[list[RequestRef], RankedBatch]:
    users = world.user_ids[1:7]  # raw 64-bit ids
    batch = Funnel(world).rank(users, np.full(len(users), T0), np.zeros(len(users), np.int64))
    refs = [RequestRef(f"j{b}", int(u), T0, batch.n_items) for b, u in enumerate(users[:5])]
    return [*refs, RequestRef("x0", int(users[5]), T0, batch.n_items)], batch


def serve(rig: Rig, world: World) -> Traffic:
    """Five requests under our FeatureSet, one under the next version (request x0)."""
    refs, batch = rank(world)
    n = batch.n_items
    ours = RankedBatch(
        batch.user_ids[:5], batch.item_ids[:5], batch.scores[:5], batch.request.take(slice(0, 5)),
        batch.items.take(slice(0, 5 * n)),
    )  # fmt: skip
    rig.ours.service.ranked(refs[:5], ours)
    for b, ref in enumerate(refs[:5]):
        rig.ours.service.events(ref, engagement(ref, batch.item_ids[b], 8 + b))
    fs, other = rig.ours.logger.fs, rig.theirs.logger.fs
    theirs = RankedBatch(
        batch.user_ids[5:], batch.item_ids[5:], batch.scores[5:],
        other.project(batch.request.take(slice(5, 6)), fs, Side.REQUEST),
        other.project(batch.items.take(slice(5 * n, 6 * n)), fs, Side.ITEM),
    )  # fmt: skip
    rig.theirs.service.ranked(refs[5:], theirs)
    rig.theirs.service.events(refs[5], engagement(refs[5], batch.item_ids[5], 7))
    return Traffic(refs[:5], batch, refs[5])


def spoil(rig: Rig, t: Traffic, lazy: bool, bad_message: object) -> None:
    """j1: a truncated blob; j3: a blob of the other FeatureSet; j4: an event batch that does not decode."""
    store = rig.store
    cut = key("j1", "p1" if lazy else "i7")
    [blob] = store.get_many([cut])
    assert blob is not None
    store.put_many({cut: blob[:-7]}, TTL)
    swap = "p0" if lazy else "i0"
    [foreign] = store.get_many([key("x0", swap)])
    assert foreign is not None
    store.put_many({key("j3", swap): foreign}, TTL)
    store.append_many({key("j4", "ev"): b"not an event batch"}, TTL)
    if isinstance(bad_message, dict):  # a foreign entry written to the Redis stream by another client
        client = redis.Redis.from_url(rig.bus.url)  # type: ignore[attr-defined]
        client.xadd(rig.bus.stream, bad_message)  # type: ignore[attr-defined]
        client.close()
    else:
        rig.bus.append_many([bad_message])  # type: ignore[list-item]


def stored(rig: Rig, ref: RequestRef) -> list[tuple[str, bytes]]:
    """A request's transient entries as they are now, then its event batches: what a dead letter keeps."""
    keys = rig.ours.logger.keys(RequestOpened(ref.request_id, ref.user_id, ref.ts_ms, ref.n_items, 1))
    pairs = [(k, v) for k, v in zip(keys, rig.store.get_many(keys), strict=True) if v is not None]
    ev = key(ref.request_id, "ev")
    return pairs + [(ev, chunk) for chunk in rig.store.get_lists_many([ev])[0]]


@pytest.fixture(params=[True, False], ids=["lazy", "eager"])
def lazy(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@dataclass
class Backend:
    name: str
    store: TransientStore
    bus: EventBus
    bad_message: object
    expect_raw: tuple[tuple[str, bytes], ...]


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "memory":
        yield Backend("memory", MemoryTransientStore(), MemoryEventBus(), "garbage", (("str", b"'garbage'"),))
        return
    from leanrec.events.redis_bus import RedisEventBus
    from leanrec.stores.redis_transient import RedisTransientStore

    url = request.getfixturevalue("redis_url")
    store, bus = RedisTransientStore(url), RedisEventBus(url, deliver_malformed=True)
    bad = {"payload": b"\x00\xff", "request_id": b"r-odd"}
    yield Backend("redis", store, bus, bad, (("payload", b"\x00\xff"), ("request_id", b"r-odd")))
    store.close()
    bus.close()


def reference(world: World, lazy: bool, root: Path) -> pa.Table:
    """The good requests joined by a joiner that meets no bad record (embedded backends)."""
    fs = world.featureset
    rig = make_rig(fs, MemoryTransientStore(), MemoryEventBus(), lazy, root, MemoryDeadLetters())
    serve(rig, world)
    rig.clock.set(JOIN_AT)
    rig.joiner.poll()
    rig.joiner.join_due()
    rig.joiner.flush()
    assert rig.joiner.stats.dead_letters == 1  # x0 alone, another FeatureSet's
    table = rig.warehouse.read_examples()
    return table.filter(pc.is_in(table.column("request_id"), pa.array(GOOD)))


def test_bad_records_are_set_aside_and_every_good_one_joins_byte_for_byte(
    small_world: World, tmp_path: Path, lazy: bool, backend: Backend
) -> None:
    rig = make_rig(small_world.featureset, backend.store, backend.bus, lazy, tmp_path / "wh")
    t = serve(rig, small_world)
    spoil(rig, t, lazy, backend.bad_message)
    raw = {rid: stored(rig, ref) for rid, ref in (("j1", t.refs[1]), ("j3", t.refs[3]), ("x0", t.foreign))}

    rig.clock.set(JOIN_AT)
    assert rig.joiner.poll() == 7  # six RequestOpened records and the bad entry
    assert rig.joiner.join_due() == 6
    # Set aside but not committed yet: nothing acknowledged, nothing deleted.
    assert rig.dead.read() == []
    assert rig.bus.pending() == 7
    assert rig.store.get_many([key("j1", "u" if lazy else "i0")]) != [None]
    rig.joiner.flush()

    # Every good request joined, as a joiner that met no bad record joins it.
    got = rig.warehouse.read_examples()
    want = reference(small_world, lazy, tmp_path / "ref")
    assert sorted(set(got.column("request_id").to_pylist())) == GOOD
    assert got.equals(want)
    # ... holding the bytes the ranker scored.
    emb = next(s for s in small_world.featureset.layout(Side.ITEM).slots if s.feature.name == "i_emb")
    n = t.batch.n_items
    for b in (0, 2, 4):
        rows = np.flatnonzero(np.array(got.column("request_id").to_pylist()) == f"j{b}")
        positions = got.column("position").to_numpy()[rows]
        joined = np.stack(got.column("i_emb").to_numpy(zero_copy_only=False)[rows]).astype(np.float32)
        scored = t.batch.items.floats[b * n + positions, emb.offset : emb.stop]
        assert np.array_equal(joined.view(np.uint32), scored.view(np.uint32))

    # Each bad record is in the dead letters, with its reason and its bytes as they were stored.
    letters = {(d.kind, d.request_id): d for d in rig.dead.read()}
    odd_id = "r-odd" if backend.name == "redis" else None
    assert set(letters) == {
        (DeadKind.FEATURESET, "x0"),
        (DeadKind.FEATURESET, "j3"),
        (DeadKind.CORRUPT_BLOB, "j1"),
        (DeadKind.EVENT_BLOB, "j4"),
        (DeadKind.BUS_MESSAGE, odd_id),
    }
    other = rig.theirs.logger.fs
    assert f"v{other.version}" in letters[DeadKind.FEATURESET, "x0"].reason
    assert f"{other.fingerprint:08x} v{other.version}" in letters[DeadKind.FEATURESET, "j3"].reason
    assert " B" in letters[DeadKind.CORRUPT_BLOB, "j1"].reason  # the length the layout needs
    assert "not an event batch" in letters[DeadKind.EVENT_BLOB, "j4"].reason
    for rid in ("x0", "j3"):
        assert list(letters[DeadKind.FEATURESET, rid].raw) == raw[rid]
    assert list(letters[DeadKind.CORRUPT_BLOB, "j1"].raw) == raw["j1"]
    assert letters[DeadKind.CORRUPT_BLOB, "j1"].opened == RequestOpened(
        "j1", t.refs[1].user_id, T0, t.batch.n_items, 1
    )
    assert letters[DeadKind.EVENT_BLOB, "j4"].raw == ((key("j4", "ev"), b"not an event batch"),)
    assert letters[DeadKind.BUS_MESSAGE, odd_id].raw == backend.expect_raw
    assert DeadLetterFolder.of_warehouse(str(tmp_path / "wh")).read() == rig.dead.read()  # it is on disk

    # Counted by kind; everything acknowledged and its entries gone.
    js = rig.joiner.stats
    assert js.requests_joined == 3
    assert js.dead_letters == 5
    assert js.dead_letters_by_kind == {"featureset": 2, "corrupt_blob": 1, "event_blob": 1, "bus_message": 1}
    assert rig.bus.pending() == 0
    for ref in [*t.refs, t.foreign]:
        assert stored(rig, ref) == []
    # A redelivered record of a set-aside request is not set aside twice.
    rig.bus.append_many([RequestOpened("j1", t.refs[1].user_id, T0, t.batch.n_items, 1)])
    rig.joiner.poll()
    rig.joiner.join_due(force=True)
    rig.joiner.flush()
    assert rig.joiner.stats.dead_letters == 5
    assert rig.bus.pending() == 0


class FailingDeadLetters(MemoryDeadLetters):
    def flush(self) -> int:
        raise OSError("disk full")


def test_a_failed_dead_letter_commit_acks_nothing_and_deletes_nothing(
    small_world: World, tmp_path: Path, lazy: bool
) -> None:
    rig = make_rig(
        small_world.featureset,
        MemoryTransientStore(),
        MemoryEventBus(),
        lazy,
        tmp_path / "wh",
        FailingDeadLetters(),
    )
    t = serve(rig, small_world)
    held = stored(rig, t.foreign)
    rig.clock.set(JOIN_AT)
    rig.joiner.poll()
    rig.joiner.join_due()
    with pytest.raises(OSError, match="disk full"):
        rig.joiner.flush()
    assert rig.bus.pending() == 6
    assert stored(rig, t.foreign) == held  # a restarted joiner finds it whole and sets it aside again


def replay(letter: DeadLetter, store: TransientStore, bus: EventBus) -> None:
    """Put a set-aside request back as it was logged, for a joiner that can read it."""
    assert letter.opened is not None
    ev = key(letter.opened.request_id, "ev")
    for k, chunks in letter.entries().items():
        if k == ev:
            for chunk in chunks:
                store.append_many({k: chunk}, TTL)
        else:
            store.put_many({k: chunks[0]}, TTL)
    bus.append_many([letter.opened])


def test_a_request_of_another_featureset_is_replayed_by_a_joiner_of_that_featureset(
    small_world: World, tmp_path: Path, lazy: bool
) -> None:
    rig = make_rig(small_world.featureset, MemoryTransientStore(), MemoryEventBus(), lazy, tmp_path / "wh")
    t = serve(rig, small_world)
    rig.clock.set(JOIN_AT)
    rig.joiner.poll()
    rig.joiner.join_due()
    rig.joiner.flush()
    [letter] = rig.dead.read()
    assert letter.request_id == "x0"

    other = rig.theirs.logger.fs
    layout = TableLayout.REQUEST if lazy else TableLayout.IMPRESSION
    theirs = ParquetWarehouse(str(tmp_path / "theirs"), other, layout)
    joiner = LabelJoiner(rig.theirs.logger, rig.bus, theirs, CostLedger(), rig.clock, WINDOW, LATENESS)
    replay(letter, rig.store, rig.bus)
    joiner.poll()
    joiner.join_due()
    joiner.flush()
    assert joiner.stats.dead_letters == 0
    ex = theirs.read_examples()
    assert ex.column("position").to_pylist() == list(range(7))
    assert ex.column("click").to_pylist() == [p == 2 for p in range(7)]
    assert ex.column("item_id").to_pylist() == t.batch.item_ids[5][:7].tolist()
