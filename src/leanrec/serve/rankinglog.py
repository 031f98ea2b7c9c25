"""The library's way in: lean logging for a ranking service written in Python.

A ranking service that ranks with its own model opens one :class:`RankingLog` from its FeatureSet
(a file or an object) and its backends' URLs, and then makes the calls the HTTP API makes::

    import leanrec

    log = leanrec.open_logging("featureset.toml", store_url="redis://127.0.0.1:6379/0",
                               bus_url="redis://127.0.0.1:6379/0", logging="lazy")
    logged = log.ranked(user_id, item_ids, features, scores)   # after the ranker scored them
    ...  # answer the client with logged.request_id and logged.token
    log.paginate(logged.request_id, logged.token, seen_up_to=8)
    log.events(logged.request_id, logged.token, [{"position": 0, "item_id": 17, "kind": "click",
                                                  "ts_ms": t}], batch_id="b1")

``features`` holds every feature of the FeatureSet by name, as numpy arrays (request side once, item
side one row per ranked item); they are checked, frozen and logged exactly as ``/v1/rank`` logs
leanrec's own funnel: the head at once, later pages on the client's signal or its first event on
them. A joiner (``leanrec join`` on a shared bus, or :meth:`RankingLog.joiner` in the same process
on ``memory://`` backends) turns them into training data. The HTTP sidecar (``POST /v1/log``) makes
the same calls for rankers in any language.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from leanrec.clock import Clock, SystemClock
from leanrec.energy.ledger import CostLedger
from leanrec.events import EventBatch, EventLimits, RequestRef, open_event_bus
from leanrec.featurelog.inputs import FeatureInputError, pack_ranked
from leanrec.featurelog.loggers import ContextCache, EagerLogger, FeatureLogger, LazyLogger, Paging
from leanrec.featurelog.ranked import RankedBatch
from leanrec.schema import FeatureSet, Role
from leanrec.serve.config import ConfigError, ServeConfig
from leanrec.serve.routing import RequestIdError, check_request_id
from leanrec.serve.service import EventsResult, LoggingService
from leanrec.serve.tokens import TokenSigner
from leanrec.stores import open_transient_store

__all__ = [
    "FeatureInputError",
    "Logged",
    "LoggingParts",
    "RankingLog",
    "RequestIdError",
    "build_logging",
    "open_logging",
]


@dataclass
class LoggingParts:
    """The logging plumbing of one ranking service, as a config describes it.

    ``logger`` and ``service`` are None when logging is off.
    """

    featureset: FeatureSet
    store: Any
    bus: Any
    logger: FeatureLogger | None
    service: LoggingService | None
    signer: TokenSigner
    limits: EventLimits
    ledger: CostLedger = field(default_factory=CostLedger)


def build_logging(
    fs: FeatureSet, config: ServeConfig, clock: Clock, ledger: CostLedger, key: bytes | None = None
) -> LoggingParts:
    """The transient store, the bus, the logger and the token signer ``config`` describes for ``fs``.

    ``key`` signs the tokens instead of the configured secret (a process's own key, see
    :func:`open_logging`); the configured previous key is accepted either way.
    """
    store = open_transient_store(config.store_url, clock=clock)
    bus = open_event_bus(config.bus_url)
    limits = EventLimits(
        window_ms=config.window_ms, lateness_ms=config.lateness_ms, max_events=config.max_events
    )
    ttl = config.window_ms + config.lateness_ms + config.ttl_grace_ms
    logger: FeatureLogger | None
    if config.logging == "lazy":
        max_age = config.window_ms + config.lateness_ms  # until the last event batch may arrive
        contexts = ContextCache(config.context_max_bytes, config.context_idle_ms, max_age, clock, ledger)
        logger = LazyLogger(
            fs, store, bus, ledger, ttl, contexts, Paging(), config.lookahead, config.shared_rows
        )
    elif config.logging == "eager":
        logger = EagerLogger(fs, store, bus, ledger, ttl)
    else:
        logger = None
    service = LoggingService(logger, bus, limits, clock) if logger is not None else None
    valid_ms = config.window_ms + config.lateness_ms
    signer = TokenSigner(key or config.secret_bytes(), valid_ms, config.previous_secret_bytes())
    return LoggingParts(fs, store, bus, logger, service, signer, limits, ledger)


@dataclass(frozen=True)
class Logged:
    """What the client needs to hold about a logged ranking: present both with later calls."""

    request_id: str
    token: str
    n_items: int


class RankingLog:
    """Lean (or eager) feature logging for one ranking service; see the module's docstring.

    Args:
        parts: The plumbing (see :func:`build_logging`; :func:`open_logging` builds it).
        config: The settings it was built from (window, limits, secret).
        clock: Time of the calls (a ``ManualClock`` in tests and replays).

    """

    def __init__(self, parts: LoggingParts, config: ServeConfig, clock: Clock) -> None:
        if parts.service is None:
            raise ValueError("logging is off: a RankingLog needs lazy or eager logging")
        self.parts, self.config, self.clock = parts, config, clock
        self.featureset = parts.featureset
        self._service = parts.service
        self._last_tick = clock.now_ms()

    def ranked(
        self,
        user_id: int | str,
        item_ids: object,
        features: Mapping[str, object],
        scores: object | None = None,
        request_id: str | None = None,
    ) -> Logged:
        """Freeze and log one ranked request: the features the ranker scored, as it scored them.

        Args:
            user_id: Who the request was ranked for: a 64-bit id, or a string where the
                FeatureSet's user id declares string ids.
            item_ids: ``(n,)`` ranked item ids, best first: int64, or strings where the item id
                declares string ids (hashed by :func:`leanrec.ids.string_ids`).
            features: Every feature of the FeatureSet by name (see
                :func:`~leanrec.featurelog.inputs.pack_ranked` for the shapes).
            scores: ``(n,)`` the ranker's scores, logged with the items and written to the
                warehouse's ``score`` column; or None, stored as NaN (null in the warehouse).
            request_id: The id to log the request under, e.g. the service's own id of the call
                (1 to 64 letters, digits, ``-`` or ``_``; unique: the caller sees to it); None
                draws a new one.

        Returns:
            The request id and the signed token the client presents with paginate and events.

        Raises:
            FeatureInputError: The arrays do not match the FeatureSet; nothing was logged.
            RequestIdError: ``request_id`` cannot name a request, or names one this log still holds.

        """
        batch = pack_ranked(self.featureset, user_id, item_ids, features, scores, self.config.max_items)
        return self.log_batch(batch, request_id)

    def _check_new(self, request_id: str) -> None:
        check_request_id(request_id)
        if request_id in getattr(self._service.logger, "contexts", ()):
            raise RequestIdError(f"request id {request_id!r} names a ranking this log still holds")

    def log_batch(self, batch: RankedBatch, request_id: str | None = None) -> Logged:
        """Log one ranked request already packed as a RankedBatch (one row), under ``request_id``.

        Raises:
            RequestIdError: ``request_id`` cannot name a request, or names one this log still holds.

        """
        if request_id is not None:
            self._check_new(request_id)
        now = self.clock.now_ms()
        ref = RequestRef(request_id or uuid.uuid4().hex[:16], int(batch.user_ids[0]), now, batch.n_items)
        self._service.ranked([ref], batch)
        if now - self._last_tick >= 1_000:  # release idle contexts now and then
            self._last_tick = now
            self._service.logger.tick()
        return Logged(ref.request_id, self.parts.signer.sign(ref), ref.n_items)

    def _ref(self, request_id: str, token: str) -> RequestRef:
        return self.parts.signer.check(token, request_id, self.clock.now_ms())

    def paginate(self, request_id: str, token: str, seen_up_to: int) -> int:
        """The user has seen the list up to position ``seen_up_to``; returns the pages logged.

        Raises:
            TokenError: The token is malformed, forged, for another request or expired.
            ValueError: ``seen_up_to`` is outside the ranked list.

        """
        return self._service.paginate(self._ref(request_id, token), seen_up_to)

    def events(
        self, request_id: str, token: str, events: Sequence[Mapping[str, object]], batch_id: str | None = None
    ) -> EventsResult:
        """Report a batch of the client's events about one request (see ``POST /v1/events``).

        Args:
            request_id: The request.
            token: Its token.
            events: Records with ``position``, ``item_id``, ``kind`` (click, like, share, hide,
                watch, view), ``ts_ms`` and, for watch, ``value`` (milliseconds).
            batch_id: The client's id of the batch; a batch id seen before is refused as a replay.

        Raises:
            TokenError: The token does not stand for this request.
            LoggingUnavailable: The transient store did not take the batch (send it again).

        """
        ref = self._ref(request_id, token)
        item = self.featureset.role(Role.ITEM_ID)
        batch, errors = EventBatch.from_records(
            request_id, list(events), item is not None and item.string_ids
        )
        return EventsResult.of(len(batch), errors, self._service.events(ref, batch, batch_id))

    def joiner(self, warehouse: str | Path, impression_level: bool | None = None) -> Any:
        """A joiner in this process over this log's own store and bus, writing to ``warehouse``.

        For ``memory://`` backends, which no other process can reach; on a shared bus, run
        ``leanrec join`` instead. Call its ``poll()`` and ``join_due()`` as time passes, and
        ``drain()`` at the end. The layout is request-level for lazy logging and impression-level
        for eager, unless ``impression_level`` says otherwise.
        """
        from leanrec.join.joiner import LabelJoiner
        from leanrec.warehouse.store import ParquetWarehouse
        from leanrec.warehouse.tables import TableLayout

        naive = (self.config.logging == "eager") if impression_level is None else impression_level
        layout = TableLayout.IMPRESSION if naive else TableLayout.REQUEST
        sink = ParquetWarehouse(str(warehouse), self.featureset, layout, self.parts.ledger, flush_rows=500)
        return LabelJoiner(
            self._service.logger,
            self.parts.bus,
            sink,
            self.parts.ledger,
            self.clock,
            self.config.window_ms,
            self.config.lateness_ms,
        )


def open_logging(
    featureset: FeatureSet | str | Path,
    store_url: str = "memory://",
    bus_url: str = "memory://",
    logging: str = "lazy",
    clock: Clock | None = None,
    **settings: Any,
) -> RankingLog:
    """Open lean feature logging for a ranking service of one's own.

    Args:
        featureset: The FeatureSet the ranker scores under, or the path of its TOML file.
        store_url: Transient store: ``memory://`` (this process) or ``redis://host:port/db``.
        bus_url: Event bus: ``memory://`` or ``redis://host:port/db`` (joiners must share it).
        logging: ``lazy`` (the lean way) or ``eager`` (the naive baseline).
        clock: Time of the calls (default: the system clock).
        **settings: Any other :class:`~leanrec.serve.config.ServeConfig` setting (``window_ms``,
            ``secret``, ``secret_previous``, ``development``, ``max_items``, ``lookahead``...).

    The token key: on shared backends (a ``redis://`` store or bus), where other processes check the
    tokens, a key of the deployment's own (``LEANREC_SECRET`` or ``secret=``), never the built-in
    development secret unless ``development=True``. On ``memory://`` backends no other process can
    reach the requests, so none checks their tokens: without a key of one's own the log draws a
    random key for itself rather than sign with one anyone can read.

    Raises:
        FeatureSetFileError: The FeatureSet file cannot be used.
        ConfigError: A setting or URL that cannot be used, or the built-in development secret on
            shared backends.

    """
    if not isinstance(featureset, FeatureSet):
        from leanrec.featurefile import load_featureset

        featureset = load_featureset(featureset)
    if logging not in ("lazy", "eager"):
        raise ConfigError(f"logging must be lazy or eager for a RankingLog, got {logging!r}")
    config = ServeConfig.load(
        None, **{**settings, "store_url": store_url, "bus_url": bus_url, "logging": logging}
    )
    who = "open_logging"
    remedy = "set LEANREC_SECRET or pass secret= a key of your own, or development=True for a development run"
    key = None
    in_process = all(urlsplit(url).scheme == "memory" for url in (store_url, bus_url))
    if in_process and not config.development and not config.has_own_secret():
        key = secrets.token_bytes(32)  # a key of its own: nothing outside this process checks its tokens
        config.check_previous_secret(who, remedy)
    else:
        config.check_secret(f"{who} on shared backends", remedy)
    clock = clock or SystemClock()
    return RankingLog(build_logging(featureset, config, clock, CostLedger(), key), config, clock)
