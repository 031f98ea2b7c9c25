"""``leanrec join``: a worker on a real Redis that bad records cannot stop, and says what it waits for."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import redis

from leanrec.cli import main
from leanrec.clock import ManualClock, SystemClock
from leanrec.energy.ledger import CostLedger
from leanrec.events.bus import MemoryEventBus, RequestOpened
from leanrec.events.model import EventBatch, EventKind, EventLimits, RequestRef
from leanrec.events.redis_bus import RedisEventBus
from leanrec.featurelog.loggers import ContextCache, LazyLogger, Paging, key
from leanrec.featurelog.ranked import RankedBatch
from leanrec.funnel.ranker import Funnel
from leanrec.join.deadletter import DeadKind, DeadLetterFolder
from leanrec.join.joiner import LabelJoiner
from leanrec.join.worker import WorkerReport, build_joiner, run_worker, status_line
from leanrec.schema import FeatureSet, Side
from leanrec.serve.config import ConfigError, ServeConfig
from leanrec.serve.service import LoggingService
from leanrec.stores.redis_transient import RedisTransientStore
from leanrec.stores.transient import MemoryTransientStore
from leanrec.warehouse import ParquetWarehouse, TableLayout
from leanrec.world import World, WorldConfig

WINDOW = 4_000
SMALL = {"n_users": 400, "n_items": 3_000, "seed": 11}


def assert_scored(table: pa.Table, fs: FeatureSet, batch: RankedBatch, b: int, rid: str) -> None:
    """Every feature of request ``rid``'s examples holds the bytes row ``b`` of ``batch`` was scored with."""
    rows = np.flatnonzero(np.array(table.column("request_id").to_pylist()) == rid)
    assert len(rows)
    positions = table.column("position").to_numpy()[rows]
    for side, block, at in (
        (Side.REQUEST, batch.request, np.full(len(rows), b)),
        (Side.ITEM, batch.items, b * batch.n_items + positions),
    ):
        for slot in fs.layout(side).slots:
            got = np.array(table.column(slot.feature.name).take(pa.array(rows)).to_pylist())
            source = block.floats if slot.feature.is_float else block.ints
            want = source[at, slot.offset : slot.stop]
            got = got.astype(want.dtype).reshape(want.shape)
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), slot.feature.name


@dataclass
class Served:
    batch: RankedBatch
    refs: list[RequestRef]


def serve_on_redis(url: str, world: World) -> Served:
    """Four requests ranked now on Redis: j0 and j2 good, j1 with a truncated page, x0 of the next
    FeatureSet version; j2 also holds an event batch that does not decode, and the stream an entry
    that is not a RequestOpened record."""
    clock = SystemClock()
    now = clock.now_ms()
    fs = world.featureset
    other = fs.retire({"u_noise_00": "worth less than its cost"})
    store, bus = RedisTransientStore(url), RedisEventBus(url)
    limits = EventLimits(window_ms=WINDOW, lateness_ms=0)
    ttl = 600_000
    users = world.user_ids[1:5]  # raw 64-bit ids
    batch = Funnel(world).rank(users, np.full(4, now), np.zeros(4, np.int64))
    n = batch.n_items
    refs = [RequestRef(rid, int(u), now, n) for rid, u in zip(["j0", "j1", "j2", "x0"], users, strict=True)]
    for i, (f, rows) in enumerate(((fs, slice(0, 3)), (other, slice(3, 4)))):
        ledger = CostLedger()
        contexts = ContextCache(1 << 28, 60_000, WINDOW, clock, ledger)
        logger = LazyLogger(f, store, bus, ledger, ttl, contexts, Paging(6, 9), lookahead=2)
        service = LoggingService(logger, bus, limits, clock)
        r = range(rows.start, rows.stop)
        part = RankedBatch(
            batch.user_ids[rows],
            batch.item_ids[rows],
            batch.scores[rows],
            f.project(batch.request.take(rows), fs, Side.REQUEST),
            f.project(batch.items.take(slice(rows.start * n, rows.stop * n)), fs, Side.ITEM),
        )
        service.ranked([refs[b] for b in r], part)
        for b in r:
            pos = np.arange(9 + b, dtype=np.int32)
            ev = EventBatch(
                refs[b].request_id,
                pos,
                batch.item_ids[b][pos],
                np.where(pos == 2, int(EventKind.CLICK), int(EventKind.VIEW)).astype(np.int8),
                now + 100 + pos.astype(np.int64),
                np.zeros(len(pos), np.float32),
            )
            report = service.events(refs[b], ev)
            assert report.total == 0, (i, report.messages)
    [page] = store.get_many([key("j1", "p1")])
    assert page is not None
    store.put_many({key("j1", "p1"): page[:-7]}, ttl)
    store.append_many({key("j2", "ev"): b"not an event batch"}, ttl)
    client = redis.Redis.from_url(url)
    client.xadd(bus.stream, {"payload": b"\x00\xff"})
    client.close()
    store.close()
    bus.close()
    return Served(batch, refs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


@dataclass
class Running:
    thread: threading.Thread
    stop: threading.Event
    result: list[WorkerReport | BaseException]
    lines: list[str]


@pytest.fixture
def start_worker() -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(config: ServeConfig, **options: object) -> Running:
        stop = threading.Event()
        result: list[WorkerReport | BaseException] = []
        lines: list[str] = []

        def work() -> None:
            try:
                result.append(run_worker(config, stop, max_seconds=60, status=lines.append, **options))  # type: ignore[arg-type]
            except BaseException as exc:  # the test says which, instead of a silent thread
                result.append(exc)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        running = Running(thread, stop, result, lines)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop.set()
        running.thread.join(10)


def test_a_worker_on_redis_sets_bad_records_aside_joins_the_rest_and_keeps_running(
    redis_url: str, tmp_path: Path, start_worker: Callable[..., Running]
) -> None:
    world = World(WorldConfig(**SMALL))
    wh = tmp_path / "wh"
    config = ServeConfig(
        store_url=redis_url,
        bus_url=redis_url,
        window_ms=WINDOW,
        lateness_ms=0,
        poll_ms=50,
        warehouse=str(wh),
        **SMALL,
    )
    assert build_joiner(config)[0].logger.fs == world.featureset
    served = serve_on_redis(redis_url, world)
    port = free_port()
    worker = start_worker(config, status_every_s=0.3, metrics_port=port)
    dead = DeadLetterFolder.of_warehouse(str(wh))
    bus = RedisEventBus(redis_url)
    try:
        assert wait_for(lambda: len(dead.read()) == 4 and bus.pending() == 0, 30), (
            worker.result,
            worker.lines,
        )
    finally:
        bus.close()
    assert worker.thread.is_alive()  # past every bad record, still working
    assert wait_for(lambda: worker.lines[-1].startswith("waiting: no request open"), 5), worker.lines
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for kind, count in (("featureset", 1), ("corrupt_blob", 1), ("event_blob", 1), ("bus_message", 1)):
        assert f'leanrec_join_dead_letters_total{{kind="{kind}"}} {count:.1f}' in metrics
    assert "leanrec_join_requests_joined_total 2.0" in metrics

    worker.stop.set()
    worker.thread.join(15)
    assert not worker.thread.is_alive()
    [report] = worker.result
    assert isinstance(report, WorkerReport), report  # returned, not raised
    assert report.requests_joined == 2
    assert report.dead_letters == 4
    assert report.dead_letters_by_kind == {
        "featureset": 1,
        "corrupt_blob": 1,
        "event_blob": 1,
        "bus_message": 1,
    }
    assert report.dead_letter_uri == str(wh / "_dead_letter")
    assert {(d.kind, d.request_id) for d in dead.read()} == {
        (DeadKind.FEATURESET, "x0"),
        (DeadKind.CORRUPT_BLOB, "j1"),
        (DeadKind.EVENT_BLOB, "j2"),
        (DeadKind.BUS_MESSAGE, None),
    }
    table = ParquetWarehouse(str(wh), world.featureset, TableLayout.REQUEST).read_examples()
    assert sorted(set(table.column("request_id").to_pylist())) == ["j0", "j2"]
    for b, rid in ((0, "j0"), (2, "j2")):
        assert_scored(table, world.featureset, served.batch, b, rid)
    # It said what it was waiting for while the windows were open, then that nothing was open.
    assert any(line.startswith("waiting: 4 requests open, next window closes in ") for line in worker.lines)
    assert worker.lines[-1] == "waiting: no request open; so far 2 joined, 4 set aside " + (
        "(bus_message 1, corrupt_blob 1, event_blob 1, featureset 1)"
    )
    # At most one line per status_every_s, and one to start with.
    assert len(worker.lines) <= 2 + 60 / 0.3


def test_the_status_line_says_how_many_are_open_and_when_the_next_window_closes(
    small_world: World, tmp_path: Path
) -> None:
    t0 = 1_793_610_000_000  # 2026-11-02 09:00:00 UTC
    clock = ManualClock(t0)
    store, bus, ledger = MemoryTransientStore(clock=clock), MemoryEventBus(), CostLedger()
    contexts = ContextCache(1 << 20, 60_000, 600_000, clock, ledger)
    logger = LazyLogger(small_world.featureset, store, bus, ledger, 900_000, contexts)
    warehouse = ParquetWarehouse(str(tmp_path / "wh"), small_world.featureset, TableLayout.REQUEST)
    joiner = LabelJoiner(logger, bus, warehouse, ledger, clock, 600_000, 60_000)
    assert status_line(joiner, t0) == "waiting: no request open; so far 0 joined, none set aside"
    bus.append_many([RequestOpened(f"r{i}", 1, t0 - 1_000 * i, 100, 1) for i in range(3)])
    bus.append_many(["odd"])  # type: ignore[list-item]
    joiner.poll()
    # The oldest, ranked 2 s before t0, is due 600 s + 60 s + 2 s (settling) after it was ranked.
    assert status_line(joiner, t0) == (
        "waiting: 3 requests open, next window closes in 11m 00s (09:11:00 UTC); "
        "so far 0 joined, 1 set aside (bus_message 1)"
    )
    assert status_line(joiner, t0 + 655_000).startswith("waiting: 3 requests open, next window closes in 5s ")
    assert "closes in 0s" in status_line(joiner, t0 + 700_000)  # overdue until the next round joins it
    assert "closes in 2h 14m " in status_line(joiner, t0 - 7_380_000)


def test_leanrec_join_prints_what_it_waits_for_and_what_it_set_aside(
    redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    wh = tmp_path / "wh"
    argv = ["join", "--store-url", redis_url, "--bus-url", redis_url, "--warehouse", str(wh)]
    argv += [
        "--n-users",
        "400",
        "--n-items",
        "3000",
        "--seed",
        "11",
        "--poll-ms",
        "100",
        "--max-seconds",
        "1",
    ]
    bus = RedisEventBus(redis_url)
    bus.append_many([RequestOpened("r0", 1, SystemClock().now_ms(), 100, 1)])
    bus.close()
    client = redis.Redis.from_url(redis_url)
    client.xadd("lr:opened", {"payload": b"\x00"})
    client.close()
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("leanrec join: consumer joiner-1, ") and out[0].endswith(
        f"dead letters {wh}/_dead_letter"
    )
    assert out[1].startswith("waiting: 1 request open, next window closes in 11m ")
    assert out[-1].startswith("stopped: took over 0 pending, joined 0 requests, ")
    assert out[-1].endswith(f"0 files, 1 set aside (bus_message 1) in {wh}/_dead_letter")


def test_a_joiner_writes_the_warehouse_layout_it_is_given(redis_url: str, tmp_path: Path) -> None:
    def layout(**settings: str) -> TableLayout:
        config = ServeConfig(
            store_url=redis_url, bus_url=redis_url, warehouse=str(tmp_path), **SMALL, **settings
        )
        joiner, warehouse = build_joiner(config)
        joiner.bus.close()
        return warehouse.layout

    assert layout() is TableLayout.REQUEST
    assert layout(logging="eager") is TableLayout.IMPRESSION  # the naive baseline
    assert layout(warehouse_layout="dedup") is TableLayout.DEDUP
    with pytest.raises(
        ConfigError, match="warehouse_layout must be request, dedup or impression, got 'rows'"
    ):
        ServeConfig(warehouse_layout="rows")
