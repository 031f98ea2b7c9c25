"""A logging pipeline: logger, transient store, event bus, joiner and warehouse on one ledger.

Two pipelines are built the same way and differ only in plumbing:

- ``naive``: eager logging of all ranked items, one entry each with the whole scored vector, into an
  impression-level warehouse;
- ``lean``: lazy logging (request side once, head, then pages on signal or touch) into a
  request-level warehouse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from urllib.parse import quote

from leanrec.clock import Clock
from leanrec.energy.ledger import CostLedger
from leanrec.events.bus import EventBus, MemoryEventBus
from leanrec.events.model import EventLimits
from leanrec.featurelog.loggers import ContextCache, EagerLogger, FeatureLogger, LazyLogger, Paging
from leanrec.join.joiner import LabelJoiner
from leanrec.schema import FeatureSet
from leanrec.serve.service import LoggingService
from leanrec.stores import TransientStore, open_transient_store
from leanrec.warehouse.store import ParquetWarehouse
from leanrec.warehouse.tables import TableLayout


class Plumbing(StrEnum):
    """Which plumbing a pipeline uses."""

    NAIVE = "naive"
    LEAN = "lean"


@dataclass(frozen=True)
class PipelineConfig:
    """Settings shared by both pipelines.

    Attributes:
        window_ms: Attribution window: events later than this after the ranking are late.
        lateness_ms: How long after the window the joiner waits for events still in flight.
        ttl_grace_ms: Transient entries live for the window plus this grace.
        store_url: TransientStore backend.
        store_max_bytes: Byte bound of an embedded store (in memory and spilled).
        store_memory_bytes: With ``spill_dir``, what an embedded store holds in memory before it
            spills values to disk.
        spill_dir: Folder an embedded store spills to; None keeps everything in memory.
        context_max_bytes: Byte bound of the lazy logger's held contexts.
        context_idle_ms: A context untouched this long is released.
        paging: Head and page sizes.
        lookahead: Positions a pagination signal looks ahead.
        flush_rows: Requests buffered before a warehouse commit.
        shared_rows: The lean path stores item rows and the request's slowly changing features once
            per distinct content, referenced by hash (see :mod:`leanrec.featurelog.rows`).

    """

    window_ms: int = 600_000
    lateness_ms: int = 60_000
    ttl_grace_ms: int = 300_000
    store_url: str = "memory://"
    store_max_bytes: int = 4 << 30
    store_memory_bytes: int = 2 << 30
    spill_dir: str | None = None
    context_max_bytes: int = 512 << 20
    context_idle_ms: int = 120_000
    paging: Paging = Paging()  # noqa: RUF009 (frozen, shared safely)
    lookahead: int = 2
    flush_rows: int = 2_000
    shared_rows: bool = False


@dataclass
class Pipeline:
    """One path's components, wired together."""

    plumbing: Plumbing
    ledger: CostLedger
    store: TransientStore
    bus: EventBus
    logger: FeatureLogger
    service: LoggingService
    joiner: LabelJoiner
    warehouse: ParquetWarehouse

    def tick(self, progress: Callable[[int], None] | None = None) -> None:
        """Periodic work: expire held contexts, take new messages, join what is due, commit.

        Args:
            progress: Called with the number of requests joined, as the joiner goes.

        """
        self.logger.tick()
        self.joiner.poll()
        if self.joiner.join_due(progress=progress):
            self.joiner.flush()

    def drain(self) -> None:
        """Join and commit everything (end of the run)."""
        self.logger.tick()
        self.joiner.drain()
        self.store.purge_expired()


def build_pipeline(
    plumbing: Plumbing, fs: FeatureSet, clock: Clock, warehouse_dir: Path | str, config: PipelineConfig
) -> Pipeline:
    """Wire one pipeline on embedded backends (or the store URL of ``config``)."""
    ledger = CostLedger()
    url = config.store_url
    if url == "memory://":
        url = f"memory://?max_bytes={config.store_max_bytes}"
        if config.spill_dir is not None:
            spill = Path(config.spill_dir) / plumbing.value
            url += f"&memory_bytes={config.store_memory_bytes}&spill_dir={quote(str(spill))}"
    store = open_transient_store(url, clock=clock)
    bus = MemoryEventBus()
    ttl = config.window_ms + config.ttl_grace_ms
    logger: FeatureLogger
    if plumbing is Plumbing.NAIVE:
        logger = EagerLogger(fs, store, bus, ledger, ttl)
        layout = TableLayout.IMPRESSION
    else:
        max_age = config.window_ms + config.lateness_ms  # until the last event batch may arrive
        contexts = ContextCache(config.context_max_bytes, config.context_idle_ms, max_age, clock, ledger)
        logger = LazyLogger(
            fs, store, bus, ledger, ttl, contexts, config.paging, config.lookahead, config.shared_rows
        )
        layout = TableLayout.REQUEST
    warehouse = ParquetWarehouse(str(warehouse_dir), fs, layout, ledger, config.flush_rows)
    joiner = LabelJoiner(logger, bus, warehouse, ledger, clock, config.window_ms, config.lateness_ms)
    limits = EventLimits(window_ms=config.window_ms, lateness_ms=config.lateness_ms)
    service = LoggingService(logger, bus, limits, clock)
    return Pipeline(plumbing, ledger, store, bus, logger, service, joiner, warehouse)
