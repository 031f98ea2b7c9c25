"""``leanrec join``: the joiner as its own process.

Several workers share one consumer group on the bus, so they split the RequestOpened records, and
whichever worker joins a request finds its features and events in the transient store. A worker
first takes over what it (or a dead worker) left pending, skipping requests the warehouse already
holds. SIGTERM drains it: it stops taking new records, commits what it has joined, and leaves the
rest pending for another worker. A SIGKILL loses nothing: what was not acknowledged is pending, and
the next worker to start takes it over.

A record the worker cannot read (another FeatureSet, a corrupt blob, a bus entry that is not a
RequestOpened) goes to the dead-letter folder inside the warehouse (``<warehouse>/_dead_letter/``),
counted, and the worker goes on. While it waits for windows to close it says so, at most every
``STATUS_EVERY_S``: how many requests are open and when the next window closes.

A Redis that stops answering (restarted, failing over, unreachable) does not stop the worker: it says
so, counts the outage, waits (0.1 s, doubling up to ``MAX_BACKOFF_S``) and goes on where it was. What
it had taken stays open or pending, so nothing is lost; requests whose windows closed meanwhile are
joined once Redis answers again, as long as their entries have not expired.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType

from leanrec.clock import SystemClock
from leanrec.energy.ledger import CostLedger
from leanrec.events import open_event_bus
from leanrec.featurelog.loggers import ContextCache, EagerLogger, FeatureLogger, LazyLogger, Paging
from leanrec.join.deadletter import DeadLetterFolder
from leanrec.join.joiner import LabelJoiner
from leanrec.serve.config import ConfigError, ServeConfig
from leanrec.stores import open_transient_store
from leanrec.warehouse.store import ParquetWarehouse
from leanrec.warehouse.tables import TableLayout

log = logging.getLogger(__name__)

CLAIM_EVERY_MS = 60_000  # how often a worker looks for records a dead worker left pending
STATUS_EVERY_S = 30.0  # at most how often a worker says what it is waiting for
MAX_BACKOFF_S = 5.0  # longest wait between two tries while Redis does not answer


@dataclass
class WorkerReport:
    """What a worker did before it stopped."""

    recovered: int
    requests_joined: int
    examples: int
    labels_lost: int
    files: int
    dead_letters: int = 0
    dead_letters_by_kind: dict[str, int] = field(default_factory=dict)
    dead_letter_uri: str = ""
    outages: int = 0


def _duration(ms: int) -> str:
    """``"42s"``, ``"4m 05s"`` or ``"2h 03m"`` (an overdue time is ``"0s"``)."""
    s = max(ms, 0) // 1000
    if s >= 3600:
        return f"{s // 3600}h {s // 60 % 60:02d}m"
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def set_aside_text(count: int, by_kind: dict[str, int]) -> str:
    """``"2 set aside (corrupt_blob 1, featureset 1)"``, or ``"none set aside"``."""
    if not count:
        return "none set aside"
    return f"{count} set aside (" + ", ".join(f"{k} {n}" for k, n in sorted(by_kind.items())) + ")"


def status_line(joiner: LabelJoiner, now_ms: int) -> str:
    """What a worker waits for: open requests, when the next window closes, what it did so far."""
    js = joiner.stats
    due = joiner.next_due_ms
    if due is None:
        waiting = "waiting: no request open"
    else:
        when = datetime.fromtimestamp(due / 1000, UTC)
        n = joiner.open_requests
        waiting = (
            f"waiting: {n} request{'s' * (n != 1)} open, next window closes in {_duration(due - now_ms)} "
            f"({when:%H:%M:%S} UTC)"
        )
    done = set_aside_text(js.dead_letters, js.dead_letters_by_kind)
    return f"{waiting}; so far {js.requests_joined} joined, {done}"


def build_joiner(config: ServeConfig) -> tuple[LabelJoiner, ParquetWarehouse]:
    """A joiner, and its warehouse, for the deployment ``config`` describes.

    Raises:
        ConfigError: Logging is off, or the bus is not shared (a joiner process needs ``redis://``).

    """
    if config.logging == "off":
        raise ConfigError("logging is off: there is nothing to join")
    if not config.bus_url.startswith(("redis://", "redis+cluster://")):
        raise ConfigError(
            f"a joiner process needs a shared bus (redis://host:port/db or redis+cluster://host:port), "
            f"got {config.bus_url}"
        )
    clock = SystemClock()
    fs = config.catalog_featureset()
    ledger = CostLedger()
    store = open_transient_store(config.store_url, clock=clock)
    # Another worker may take over a record only when no live worker could still be waiting on it.
    claim_idle_ms = config.window_ms + config.lateness_ms + 60_000
    # Entries that are not RequestOpened records come to the joiner, which sets them aside before acking.
    bus = open_event_bus(
        config.bus_url, consumer=config.consumer, claim_idle_ms=claim_idle_ms, deliver_malformed=True
    )
    ttl = config.window_ms + config.lateness_ms + config.ttl_grace_ms
    logger: FeatureLogger
    if config.logging == "lazy":
        # The joiner only reads what the lazy logger wrote; its context cache stays empty.
        contexts = ContextCache(1 << 20, config.context_idle_ms, config.window_ms, clock, ledger)
        logger = LazyLogger(
            fs, store, bus, ledger, ttl, contexts, Paging(), config.lookahead, config.shared_rows
        )
        layout = TableLayout.REQUEST
    else:
        logger = EagerLogger(fs, store, bus, ledger, ttl)
        layout = TableLayout.IMPRESSION
    layout = TableLayout(config.warehouse_layout) if config.warehouse_layout else layout
    warehouse = ParquetWarehouse(config.warehouse, fs, layout, ledger, flush_rows=500)
    dead = DeadLetterFolder.of_warehouse(config.warehouse)
    joiner = LabelJoiner(
        logger, bus, warehouse, ledger, clock, config.window_ms, config.lateness_ms, dead_letters=dead
    )
    return joiner, warehouse


def run_worker(
    config: ServeConfig,
    stop: threading.Event | None = None,
    max_seconds: float | None = None,
    status: Callable[[str], None] | None = None,
    status_every_s: float = STATUS_EVERY_S,
    metrics_port: int | None = None,
) -> WorkerReport:
    """Join until stopped (SIGTERM, SIGINT, ``stop`` set, or ``max_seconds`` passed), then drain.

    Draining commits every record already joined and acknowledges it; records whose windows have
    not closed stay pending in the bus for another worker.

    Args:
        config: The deployment.
        stop: Set to stop the worker (from another thread).
        max_seconds: Stop after this long.
        status: Called with a :func:`status_line` at the start and then at most every
            ``status_every_s`` while the worker waits.
        status_every_s: Least time between two status lines.
        metrics_port: Serve the joiner's counters in the Prometheus text format on
            ``http://<config.host>:<port>/metrics`` while it runs (0 picks a free port).

    """
    joiner, warehouse = build_joiner(config)
    stop = stop or threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
    server = None
    if metrics_port is not None:
        from leanrec.join.metrics import serve_metrics

        if not 0 <= metrics_port <= 65_535:
            raise ConfigError(f"the metrics port must be between 0 and 65535, got {metrics_port}")
        try:
            server = serve_metrics(joiner, config.host, metrics_port)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {config.host}:{metrics_port}: {exc.strerror or exc}; "
                "give another --metrics-port"
            ) from None
    say = status or (lambda line: log.warning("%s", line))
    recovered = 0
    try:
        clock = SystemClock()
        deadline = None if max_seconds is None else clock.now_ms() + int(max_seconds * 1000)
        next_claim = clock.now_ms()  # first, take over what this worker (or a dead one) left pending
        last_status: int | None = None
        backoff = 0.0
        while not stop.is_set():
            try:
                if clock.now_ms() >= next_claim:  # take over what a dead worker left pending
                    recovered += joiner.recover()
                    next_claim = clock.now_ms() + CLAIM_EVERY_MS
                joiner.poll()
                if joiner.join_due() or joiner.unflushed:  # records joined, or set aside
                    joiner.flush()
            except ConnectionError as exc:
                backoff = min(max(2 * backoff, 0.1), MAX_BACKOFF_S)
                joiner.stats.outages += 1
                say(f"{exc}; trying again in {backoff:.1f}s")
                stop.wait(backoff)
                continue
            if backoff:
                say("Redis answers again; going on")
                backoff = 0.0
            now = clock.now_ms()
            if status is not None and (last_status is None or now - last_status >= status_every_s * 1000):
                status(status_line(joiner, now))
                last_status = now
            if deadline is not None and now >= deadline:
                break
            stop.wait(config.poll_ms / 1000)
        try:
            joiner.flush()
        except ConnectionError as exc:  # committed, not acknowledged: the next worker finds them committed
            say(f"{exc}; what was joined is committed and stays pending until a worker takes it over")
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    js = joiner.stats
    return WorkerReport(
        recovered,
        js.requests_joined,
        js.examples,
        js.labels_lost,
        len(warehouse.files),
        js.dead_letters,
        dict(js.dead_letters_by_kind),
        DeadLetterFolder.of_warehouse(config.warehouse).uri,
        js.outages,
    )
