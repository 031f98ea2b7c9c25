"""``leanrec join``: the joiner as its own process.

Several workers share one consumer group on the bus, so they split the RequestOpened records, and
whichever worker joins a request finds its features and events in the transient store. A worker
first takes over what it (or a dead worker) left pending, skipping requests the warehouse already
holds. SIGTERM drains it: it stops taking new records, commits what it has joined, and leaves the
rest pending for another worker. A SIGKILL loses nothing: what was not acknowledged is pending, and
the next worker to start takes it over.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from types import FrameType

from leanrec.clock import SystemClock
from leanrec.energy.ledger import CostLedger
from leanrec.events import open_event_bus
from leanrec.featurelog.loggers import ContextCache, EagerLogger, FeatureLogger, LazyLogger, Paging
from leanrec.join.joiner import LabelJoiner
from leanrec.serve.config import ConfigError, ServeConfig
from leanrec.stores import open_transient_store
from leanrec.warehouse.store import ParquetWarehouse
from leanrec.warehouse.tables import TableLayout
from leanrec.world import WorldConfig, default_featureset

CLAIM_EVERY_MS = 60_000  # how often a worker looks for records a dead worker left pending


@dataclass
class WorkerReport:
    """What a worker did before it stopped."""

    recovered: int
    requests_joined: int
    examples: int
    labels_lost: int
    files: int


def build_joiner(config: ServeConfig) -> tuple[LabelJoiner, ParquetWarehouse]:
    """A joiner, and its warehouse, for the deployment ``config`` describes.

    Raises:
        ConfigError: Logging is off, or the bus is not shared (a joiner process needs ``redis://``).

    """
    if config.logging == "off":
        raise ConfigError("logging is off: there is nothing to join")
    if not config.bus_url.startswith("redis://"):
        raise ConfigError(f"a joiner process needs a shared bus (redis://host:port/db), got {config.bus_url}")
    clock = SystemClock()
    fs, _ = default_featureset(WorldConfig(n_users=config.n_users, n_items=config.n_items, seed=config.seed))
    ledger = CostLedger()
    store = open_transient_store(config.store_url, clock=clock)
    # Another worker may take over a record only when no live worker could still be waiting on it.
    claim_idle_ms = config.window_ms + config.lateness_ms + 60_000
    bus = open_event_bus(config.bus_url, consumer=config.consumer, claim_idle_ms=claim_idle_ms)
    ttl = config.window_ms + config.lateness_ms + config.ttl_grace_ms
    logger: FeatureLogger
    if config.logging == "lazy":
        # The joiner only reads what the lazy logger wrote; its context cache stays empty.
        contexts = ContextCache(1 << 20, config.context_idle_ms, config.window_ms, clock, ledger)
        logger = LazyLogger(fs, store, bus, ledger, ttl, contexts, Paging(), config.lookahead)
        layout = TableLayout.REQUEST
    else:
        logger = EagerLogger(fs, store, bus, ledger, ttl)
        layout = TableLayout.IMPRESSION
    warehouse = ParquetWarehouse(config.warehouse, fs, layout, ledger, flush_rows=500)
    joiner = LabelJoiner(logger, bus, warehouse, ledger, clock, config.window_ms, config.lateness_ms)
    return joiner, warehouse


def run_worker(
    config: ServeConfig, stop: threading.Event | None = None, max_seconds: float | None = None
) -> WorkerReport:
    """Join until stopped (SIGTERM, SIGINT, ``stop`` set, or ``max_seconds`` passed), then drain.

    Draining commits every record already joined and acknowledges it; records whose windows have
    not closed stay pending in the bus for another worker.
    """
    joiner, warehouse = build_joiner(config)
    stop = stop or threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    recovered = joiner.recover()
    deadline = None if max_seconds is None else SystemClock().now_ms() + int(max_seconds * 1000)
    next_claim = SystemClock().now_ms() + CLAIM_EVERY_MS
    while not stop.is_set():
        if SystemClock().now_ms() >= next_claim:  # take over what a dead worker left pending
            recovered += joiner.recover()
            next_claim = SystemClock().now_ms() + CLAIM_EVERY_MS
        joiner.poll()
        if joiner.join_due():
            joiner.flush()
        if deadline is not None and SystemClock().now_ms() >= deadline:
            break
        stop.wait(config.poll_ms / 1000)
    joiner.flush()
    js = joiner.stats
    return WorkerReport(recovered, js.requests_joined, js.examples, js.labels_lost, len(warehouse.files))
