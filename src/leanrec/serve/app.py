"""``leanrec serve``: the ranking API over HTTP (FastAPI on uvicorn).

- ``POST /v1/rank``: ranks the corpus for a user, freezes and logs the scored features, and returns
  the request id, the ordered item ids and a signed token.
- ``POST /v1/log``: the sidecar for a ranker of one's own, in any language: the user, the ranked
  items, their scores and the features they were scored with (JSON, or an Arrow IPC stream for long
  lists), checked against the FeatureSet, frozen and logged as ``/v1/rank`` logs; returns the
  request id and the token. ``leanrec serve --featureset FILE`` serves only this way in, under the
  user's FeatureSet, and builds no synthetic world.
- ``POST /v1/paginate`` and ``POST /v1/events``: the client's scroll signal and event batches, each
  checked against the token.
- ``GET /healthz``: which backends answer and whether logging is degraded; ``GET /metrics``: the
  Prometheus text format; ``/openapi.json`` and ``/docs``: the generated API description.

The ``X-Leanrec-Request-Id`` header (:mod:`.routing`) names the request for a load balancer: on
``/v1/rank`` and ``/v1/log`` it is the id to rank under (nginx sets it), and on ``/v1/paginate`` and
``/v1/events`` it must name the request of the body, so that several processes behind a consistent
hash each get the calls of the requests they ranked. A process that holds no context for a request
(another ranked it, or it released it: completed, idle or evicted) answers as it always did: a
pagination signal logs nothing, events are stored and the pages logged by then join; it cannot tell
the two apart, and refusing would lose the labels that can still join. Such calls are counted in
``/metrics`` (``leanrec_signals_without_context``, ``leanrec_events_without_context``).

Ranking never waits on logging: a ranking is answered first and frozen and logged right after, in
one lane (:class:`LogLane`) that also serves the pagination and event calls in order: on the event
loop while the backends answer, on a thread of its own once one has failed. The three calls of a
ranked request take a lean way in (:class:`_HotRoutes`), with FastAPI's routes checking and refusing
any body that is not plain. If the transient store or the bus fails, the ranking is answered, the
lost logging is counted, shown in ``/healthz`` and ``/metrics``, and logging resumes by itself
when the backend answers again. An event batch the store did not take is answered with 503 and is
not accepted, so the client sends it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi_offline import FastAPIOffline
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException

from leanrec.clock import SystemClock
from leanrec.energy.ledger import CostLedger
from leanrec.events import EventBatch, EventLimits, RequestRef
from leanrec.featurefile import load_featureset
from leanrec.featurelog.inputs import FeatureInputError, pack_ranked
from leanrec.featurelog.loggers import FeatureLogger, LazyLogger
from leanrec.featurelog.ranked import RankedBatch
from leanrec.funnel.catalog import CatalogFunnel
from leanrec.funnel.ranker import Funnel
from leanrec.schema import FeatureSet, Owner, Role
from leanrec.serve.catalog import catalog_funnel
from leanrec.serve.config import ServeConfig
from leanrec.serve.rankinglog import build_logging
from leanrec.serve.routing import REQUEST_ID_HEADER, RequestIdError, check_request_id
from leanrec.serve.service import EventsResult, LoggingService, LoggingUnavailable
from leanrec.serve.tokens import TokenError, TokenExpired, TokenSigner
from leanrec.serve.wire import arrow_body, dumps, event_columns, is_plain_ref, loads
from leanrec.world import World, WorldConfig


class RankIn(BaseModel):
    """A ranking request."""

    user_id: int | str = Field(description="the user to rank for: a 64-bit id (a string for string ids)")
    surface: int = Field(
        0, ge=0, le=2, description="synthetic world: feed surface (0 home, 1 explore, 2 following)"
    )
    candidates: list[int | str] | None = Field(
        None,
        description="a catalog service: the items to rank (default: its retrieval model's): 64-bit ids, "
        "or strings where the item id declares string ids",
    )
    context: dict[str, Any] | None = Field(
        None, description="a catalog service: the FeatureSet's context features by name (number or list)"
    )


class LogIn(BaseModel):
    """A ranking made by the caller's ranker, with the features it scored (the JSON body of /v1/log)."""

    user_id: int | str = Field(description="who the list was ranked for: a 64-bit id (or a string)")
    items: list[int | str] = Field(
        description="ranked item ids, best first: 64-bit integers, or strings where the item id "
        "declares string ids"
    )
    scores: list[float] | None = Field(None, description="the ranker's score of each item")
    features: dict[str, Any] = Field(
        description="every feature of the FeatureSet by name: request-side ones as a number or a list "
        "of size values, item-side ones as a list of one value (or one list of size values) per item"
    )


class LogOut(BaseModel):
    """The logged request: present its id and token with paginate and events."""

    request_id: str
    token: str
    n_items: int


DOCS_ASSETS = "/docs/assets"
"""Where the API pages' scripts and styles are served from (fastapi-offline's copies)."""

ARROW_STREAM = "application/vnd.apache.arrow.stream"
"""Content type of the binary body of /v1/log: one Arrow IPC stream (see :func:`.wire.arrow_body`)."""


class RankOut(BaseModel):
    """A ranked list and the token later calls about it must present."""

    request_id: str
    items: list[int]
    token: str


class PaginateIn(BaseModel):
    """The user has seen the list up to a position."""

    request_id: str = Field(max_length=64)
    token: str = Field(max_length=512)
    seen_up_to: int = Field(ge=0)


class EventIn(BaseModel):
    """One event."""

    position: int
    item_id: int | str = Field(description="a 64-bit id, or a string where the item id declares string ids")
    kind: str = Field(max_length=16)
    ts_ms: int
    value: float = 0.0


class EventsIn(BaseModel):
    """A batch of events about one request."""

    request_id: str = Field(max_length=64)
    token: str = Field(max_length=512)
    batch_id: str = Field(
        min_length=1, max_length=64, description="client id of the batch; a replay is refused"
    )
    events: list[EventIn]


class PaginateOut(BaseModel):
    """Pages logged because of this signal."""

    pages_logged: int


class EventsOut(BaseModel):
    """What happened to a batch: events accepted, refused by reason, and why."""

    accepted: int
    refused: dict[str, int]
    messages: list[str] = []


class ErrorOut(BaseModel):
    """A refusal and what was wrong."""

    error: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 409, 410, 413, 422, 503)
}


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


@dataclass
class _Health:
    """Recent logging failures, for /healthz."""

    window_s: float = 30.0
    last_failure: float = field(default=-1e18)

    def failed(self) -> None:
        self.last_failure = time.monotonic()

    @property
    def degraded(self) -> bool:
        return time.monotonic() - self.last_failure < self.window_s


_Call = tuple[Callable[..., Any], tuple]
_Done = Callable[[bool, Any], None]


class _Queue:
    """What the lane's thread shares with the lane: the calls in order, and whether it sleeps."""

    def __init__(self) -> None:
        self.calls: deque[_Call | None] = deque()
        self.wake = threading.Condition(threading.Lock())
        self.idle = False

    def put(self, call: _Call | None) -> None:
        self.calls.append(call)  # a deque's append is atomic: no lock unless the thread sleeps
        if self.idle:
            with self.wake:
                self.wake.notify()


def _lane_thread(queue: _Queue) -> None:
    """Run the queued calls in order; sleep only when none is queued; end at None."""
    calls = queue.calls
    while True:
        if not calls:
            with queue.wake:
                queue.idle = True
                while not calls:
                    queue.wake.wait()
                queue.idle = False
        call = calls.popleft()
        if call is None:
            return
        fn, args = call
        fn(*args)
        del fn, args, call  # hold nothing (the lane) while asleep


def _stop_lane(queue: _Queue, thread: threading.Thread) -> None:
    """Let the lane's thread finish what is queued and end (the lane is gone, or the process ends)."""
    queue.put(None)
    if threading.current_thread() is not thread:
        thread.join(timeout=10.0)


def _settle(future: asyncio.Future, ok: bool, value: Any) -> None:
    if not future.cancelled():  # a caller that timed out (healthz) no longer waits
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class LogLane:
    """Runs every logging call in arrival order, so ranking never waits on logging.

    ``/v1/rank`` and ``/v1/log`` hand the freeze-and-log step to the lane and answer first;
    paginate and event calls go through the same lane and wait for their result, so they always
    follow the ranking they refer to. The lane holds at most ``max_pending`` calls: past that a
    ranking's logging is dropped and counted (and the service reports itself degraded) rather than
    letting memory grow.

    While the backends answer, the calls run on the event loop itself: a ranking's logging right
    after its answer is sent (scheduled behind it), a paginate or events call at once, after what
    was queued before it. Redis answers a logging call in a fraction of a millisecond, and handing
    each call to a thread and its answer back cost the sidecar more CPU than the call itself (two
    threads taking turns on the interpreter, a wake-up each way). Once a backend has failed
    (logging degraded, see ``_Health``), calls go to the lane's own thread instead, so a hung
    server stalls only logging and never the answers; the onset costs the loop at most one call's
    socket timeouts. Calls go back to the loop when the thread has run all it was given and the
    backends have answered for the health window. What is queued when the process ends still runs.
    """

    def __init__(self, health: _Health, logger: FeatureLogger | None, max_pending: int = 10_000) -> None:
        self.health, self.logger, self.max_pending = health, logger, max_pending
        self._lock = threading.Lock()
        self.pending = 0
        self.dropped = 0
        self._queue = _Queue()
        self._on_thread = 0  # calls handed to the thread and not run yet: the loop waits for them
        self._inline: deque[tuple[Callable[..., Any], tuple, _Done | None]] = deque()
        self._scheduled = False  # a run of self._inline is scheduled on the loop
        self._inline_queued = self._inline_ran = 0
        thread = threading.Thread(target=_lane_thread, args=(self._queue,), name="leanrec-log", daemon=True)
        thread.start()
        weakref.finalize(self, _stop_lane, self._queue, thread)

    def _run(self, fn: Callable[..., Any], args: tuple, done: _Done | None, threaded: bool = False) -> None:
        stats = self.logger.stats if self.logger is not None else None
        before = stats.write_failures + stats.bus_failures if stats else 0
        ok, value = True, None
        try:
            value = fn(*args)
        except Exception as exc:  # handed to the caller that waits; a call nobody waits for is lost
            ok, value = False, exc
        finally:
            with self._lock:  # counted off before the caller hears back, so it sees the lane as it is
                self.pending -= 1
                self._on_thread -= threaded
            if stats and stats.write_failures + stats.bus_failures > before:
                self.health.failed()
        if done is not None:
            done(ok, value)

    def _run_threaded(self, fn: Callable[..., Any], args: tuple, done: _Done | None) -> None:
        self._run(fn, args, done, threaded=True)

    def _run_inline(self) -> None:
        """Run what was queued to run on the loop, in order."""
        self._scheduled = False
        while self._inline:
            self._run(*self._inline.popleft())
            self._inline_ran += 1

    def _on_loop(self) -> asyncio.AbstractEventLoop | None:
        """The running loop if calls may run on it now, else None (they go to the thread)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on the loop (a test, a thread of the user's own)
            return None
        if self._on_thread or self.health.degraded:
            return None
        return loop

    def _take(self) -> bool:
        with self._lock:
            if self.pending >= self.max_pending:
                self.dropped += 1
                self.health.failed()
                return False
            self.pending += 1
        return True

    def _to_thread(self, fn: Callable[..., Any], args: tuple, done: _Done | None) -> None:
        with self._lock:
            # what was queued for the loop and has not run yet goes first, to keep the order
            moved = len(self._inline)
            self._on_thread += moved + 1
        for _ in range(moved):
            self._queue.put((self._run_threaded, self._inline.popleft()))
            self._inline_ran += 1
        self._queue.put((self._run_threaded, (fn, args, done)))

    def submit(self, fn: Callable[..., Any], *args: Any, done: _Done | None = None) -> bool:
        """Queue a call (``done(ok, result or exception)`` runs after it); False if the lane is full.

        On the loop the call runs once the current task has yielded (after the answer is sent). A
        call the full lane does not take is dropped and counted.
        """
        if not self._take():
            return False
        loop = self._on_loop()
        if loop is None:
            self._to_thread(fn, args, done)
            return True
        self._inline.append((fn, args, done))
        self._inline_queued += 1
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._run_inline)
        return True

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Queue a call and wait for its result.

        Raises:
            LoggingUnavailable: The lane is full.

        """
        result: list[tuple[bool, Any]] = []
        if self._on_loop() is not None:
            if not self._take():
                raise LoggingUnavailable(f"logging queue full ({self.max_pending} calls waiting)")
            self._run_inline()  # what came before, then this call
            self._run(fn, args, lambda ok, value: result.append((ok, value)))
            ok, value = result[0]
            if ok:
                return value
            raise value
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def done(ok: bool, value: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
                loop.call_soon_threadsafe(_settle, future, ok, value)

        if not self._take():
            raise LoggingUnavailable(f"logging queue full ({self.max_pending} calls waiting)")
        self._to_thread(fn, args, done)
        return await future

    def drain(self) -> None:
        """Block until every call queued so far has run (tests, shutdown), on the loop or the thread."""
        target = self._inline_queued
        try:
            asyncio.get_running_loop()
            self._run_inline()  # on the loop: run them here
        except RuntimeError:
            pass
        ran = threading.Event()
        self._queue.put((ran.set, ()))
        ran.wait()
        while self._inline_ran < target:  # the loop runs them (it is another thread's)
            time.sleep(0.001)


class _BodyLimit:
    """ASGI middleware: refuse a body larger than ``max_bytes`` with 413, before it is parsed."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        # A body without a length (chunked) is read here, at most max_bytes of it, and handed on whole:
        # an exception raised from inside the app's receive() would reach FastAPI's body parsing,
        # which turns it into a 400 "error parsing the body".
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                await self.app(scope, _replay([message], receive), send)
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        whole = {"type": "http.request", "body": bytes(body), "more_body": False}
        await self.app(scope, _replay([whole], receive), send)

    async def _refuse(self, scope: dict, receive: Callable, send: Callable) -> None:
        response = _error(413, f"request body larger than {self.max_bytes} bytes")
        await response(scope, receive, send)


_Answer = tuple[int, dict[str, Any]]
"""A call's answer: its status and its JSON body."""

_HotRoute = Callable[[bytes, str, str | None], Awaitable[_Answer | None]]


_ROUTING_HEADER = REQUEST_ID_HEADER.lower().encode()


def _response(answer: _Answer) -> JSONResponse:
    status, body = answer
    return JSONResponse(body, status_code=status)


def _json_object(raw: bytes, content_type: str) -> dict[str, Any] | None:
    """A JSON object body (as FastAPI reads one: a JSON content type), or None."""
    media = content_type.split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        return None
    try:
        body = loads(raw)
    except ValueError:  # malformed: FastAPI's answer says where
        return None
    return body if type(body) is dict else None


class _HotRoutes:
    """ASGI middleware: the per-request calls of the sidecar (log, paginate, events), answered lean.

    A ranked request costs three HTTP calls, and FastAPI's work per call (routing, dependency
    solving, validating the body into models and the answer back through its response model) cost
    more than the logging itself. Here a POST to one of ``routes`` is read whole and handed to its
    handler with its content type; the handler answers a plain body with the same function the
    FastAPI route calls, and returns None for anything else, which then goes on to the FastAPI route
    (the body replayed) to be checked and refused there exactly as before. The routes stay declared
    in FastAPI, so the OpenAPI document describes them. Each handler also gets the request id header
    (:data:`~.routing.REQUEST_ID_HEADER`), or None.
    """

    def __init__(self, app: Any, routes: dict[str, _HotRoute]) -> None:
        self.app, self.routes = app, routes

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        content_type, routed = "", None
        for name, value in scope["headers"]:  # ASGI servers give header names in lower case
            if name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == _ROUTING_HEADER:
                routed = value.decode("latin-1")
        answer = await route(raw, content_type, routed)
        if answer is None:
            whole = {"type": "http.request", "body": raw, "more_body": False}
            await self.app(scope, _replay([whole], receive), send)
            return
        status, body = answer
        data = dumps(body)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})


def _replay(messages: list[dict], receive: Callable[[], Awaitable[dict]]) -> Callable[[], Awaitable[dict]]:
    """A receive() that returns ``messages`` first, then goes on with ``receive``."""
    queued = list(messages)

    async def replayed() -> dict:
        return queued.pop(0) if queued else await receive()

    return replayed


class _Collector:
    """Exposes the service's own counters to Prometheus at scrape time (no double bookkeeping)."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        st = self.state
        svc = st.service.stats if st.service else None
        c = CounterMetricFamily("leanrec_ranked_requests", "Requests ranked")
        c.add_metric([], st.ranked)
        yield c
        if st.logger is not None:
            ls = st.logger.stats
            for name, value, doc in (
                (
                    "leanrec_log_entries_written",
                    ls.entries_written,
                    "Transient-store entries the logger wrote",
                ),
                ("leanrec_log_write_failures", ls.write_failures, "Entries the transient store did not take"),
                ("leanrec_log_bus_failures", ls.bus_failures, "RequestOpened records the bus did not take"),
                ("leanrec_log_bus_resent", ls.bus_resent, "Of those, records taken when sent again later"),
                ("leanrec_pages_on_signal", ls.pages_on_signal, "Pages logged on a pagination signal"),
                ("leanrec_pages_on_touch", ls.pages_on_touch, "Pages logged because an event touched them"),
                (
                    "leanrec_log_shared_rows_written",
                    ls.rows_written,
                    "Shared feature rows whose bytes were sent",
                ),
                (
                    "leanrec_log_shared_rows_extended",
                    ls.rows_extended,
                    "Shared feature rows a use kept alive longer, no bytes sent",
                ),
                (
                    "leanrec_log_shared_rows_rewritten",
                    ls.rows_rewritten,
                    "Of those, rows found gone (evicted, a restart) and written again",
                ),
                (
                    "leanrec_log_shared_rows_reused",
                    ls.rows_reused,
                    "Shared feature rows a use found alive long enough, nothing sent",
                ),
            ):
                m = CounterMetricFamily(name, doc)
                m.add_metric([], value)
                yield m
            try:
                ts = st.store.stats()  # a round trip on Redis: while it is down, these two are left out
            except (ConnectionError, OSError):
                ts = None
            if ts is not None:
                m = CounterMetricFamily(
                    "leanrec_kv_bytes_written", "Bytes this service wrote to the transient store"
                )
                m.add_metric([], ts.bytes_written)
                yield m
                m = CounterMetricFamily("leanrec_kv_writes", "Transient-store writes of this service")
                m.add_metric([], ts.writes)
                yield m
        if isinstance(st.logger, LazyLogger):
            cs = st.logger.contexts.stats
            for name, value, doc in (
                ("leanrec_context_bytes_held", cs.bytes_held, "Frozen features held for pages not logged"),
                ("leanrec_context_bytes_peak", cs.peak_bytes, "Most bytes of frozen features held at once"),
                ("leanrec_context_bytes_max", st.logger.contexts.max_bytes, "Byte bound of held features"),
            ):
                g = GaugeMetricFamily(name, doc)
                g.add_metric([], value)
                yield g
            m = CounterMetricFamily(
                "leanrec_contexts_released", "Held contexts released, by why", labels=["why"]
            )
            for why in ("completed", "expired", "evicted", "replaced"):
                m.add_metric([why], getattr(cs, why))
            yield m
            m = CounterMetricFamily(
                "leanrec_log_records_never_taken",
                "Requests released while the bus had not taken their record: they are not joined",
            )
            m.add_metric([], cs.unopened)
            yield m
            # A call about a request whose context this process does not hold: released (completed,
            # idle, evicted) or never held here (ranked by another process: a routing fault).
            ls = st.logger.stats
            for name, value, doc in (
                (
                    "leanrec_signals_without_context",
                    ls.signals_after_release,
                    "Pagination signals for a request whose context this process does not hold",
                ),
                (
                    "leanrec_events_without_context",
                    ls.touch_after_release,
                    "Events on a request whose context this process does not hold",
                ),
            ):
                m = CounterMetricFamily(name, doc)
                m.add_metric([], value)
                yield m
        if svc is not None:
            m = CounterMetricFamily("leanrec_events_accepted", "Events accepted")
            m.add_metric([], svc.events_accepted)
            yield m
            r = CounterMetricFamily("leanrec_events_refused", "Events refused, by reason", labels=["reason"])
            for reason, n in sorted(_refused(svc.events_refused).items()):
                r.add_metric([reason], n)
            yield r
        g = GaugeMetricFamily("leanrec_logging_queue", "Logging calls waiting on the logging thread")
        g.add_metric([], st.lane.pending)
        yield g
        m = CounterMetricFamily("leanrec_rankings_not_logged", "Rankings not logged: queue full")
        m.add_metric([], st.lane.dropped)
        yield m
        g = GaugeMetricFamily("leanrec_logging_degraded", "1 while logging has failed in the last 30 s")
        g.add_metric([], float(st.health.degraded))
        yield g
        yield from _id_map_metrics(st)


_ALWAYS_COUNTED = ("wrong_item",)
"""Refusal reasons shown at 0 before any happens, so an alert on them has a series to watch."""


def _refused(counts: dict[str, int]) -> dict[str, int]:
    """Events refused by reason, with the always-counted reasons at 0 when none happened."""
    return {**dict.fromkeys(_ALWAYS_COUNTED, 0), **counts}


_ID_MAP_METRICS = (
    ("rows", "Rows of each embedding table of the served model (slots, for a managed map)"),
    ("rows_in_use", "Rows of each table that ids read (a managed map: held slots and residual rows)"),
    ("memory_bytes", "Bytes of each table and its map's state"),
    ("admissions", "Ids a managed table admitted to a slot while training"),
    ("evictions", "Ids a managed table evicted from a slot while training"),
    ("ids_seen", "Distinct ids each table read while training"),
    ("collided", "Ids seen in training that share their embedding with another of them"),
    ("collision_rate_head", "Share of the 1% most frequent training ids that share their embedding"),
    ("collision_rate_rest", "Share of the other training ids that share their embedding"),
)


def _id_map_metrics(st: ServiceState) -> Iterator[GaugeMetricFamily]:
    """Each embedding table's map, when the service ranks with a trained model (read-only at serving)."""
    model = getattr(getattr(st.funnel, "scorer", None), "model", None)
    report = getattr(model, "id_map_report", None)
    if report is None:
        return
    tables = report()  # the maps as served; what training saw comes with the checkpoint
    for name, trained in (getattr(model, "trained_id_maps", None) or {}).items():
        if name in tables:
            tables[name] = {**trained, **tables[name]}
    for key, doc in _ID_MAP_METRICS:
        g = GaugeMetricFamily(f"leanrec_id_map_{key}", doc, labels=["table", "map"])
        for name, row in tables.items():
            if key in row:
                g.add_metric([name, row["map"]], float(row[key]))
        yield g


@dataclass
class ServiceState:
    """Everything one serving process holds (no world and no funnel when it logs a FeatureSet file's)."""

    config: ServeConfig
    world: World | None
    funnel: Funnel | CatalogFunnel | None
    signer: TokenSigner
    store: Any
    bus: Any
    logger: FeatureLogger | None
    service: LoggingService | None
    limits: EventLimits
    featureset: FeatureSet | None = None  # what /v1/log checks against (default: the world's)
    health: _Health = field(default_factory=_Health)
    ranked: int = 0
    last_tick_ms: int = 0
    lane: LogLane = field(init=False)

    def __post_init__(self) -> None:
        self.lane = LogLane(self.health, self.logger)


def build_state(config: ServeConfig) -> ServiceState:
    """Build the logging plumbing of one serving process, and the world and funnel it ranks with.

    With ``config.featureset`` set, the process logs under that file's FeatureSet for a ranker of
    the user's own (``/v1/log``) and builds no world; with ``config.features_url`` too, it also ranks
    that catalog (``/v1/rank``, see :func:`~leanrec.serve.catalog.catalog_funnel`).

    Raises:
        ConfigError: The token key is the built-in development secret and this is no development run.

    """
    config.check_secret()  # before anything is built: a service that hands out tokens anyone can forge
    funnel: Funnel | CatalogFunnel | None
    if config.featureset:
        fs = load_featureset(config.featureset)
        world, funnel = None, catalog_funnel(config, fs)
    else:
        world = World(WorldConfig(n_users=config.n_users, n_items=config.n_items, seed=config.seed))
        funnel, fs = Funnel(world), world.featureset
    p = build_logging(fs, config, SystemClock(), CostLedger())
    return ServiceState(
        config, world, funnel, p.signer, p.store, p.bus, p.logger, p.service, p.limits, featureset=fs
    )


def create_app(config: ServeConfig, state: ServiceState | None = None) -> FastAPI:
    """The ASGI app of one serving process."""
    st = state or build_state(config)
    # /docs and /redoc load their scripts, styles and icon from the service itself, not from a CDN:
    # a service on a machine without internet (or behind a strict proxy) still shows them.
    app = FastAPIOffline(
        title="leanrec",
        version="0.1.0",
        description="Ranking with lean feature logging: rank, paginate, report events.",
        static_url=DOCS_ASSETS,
    )
    app.state.leanrec = st
    registry = CollectorRegistry()
    registry.register(_Collector(st))
    latency = Histogram(
        "leanrec_http_seconds",
        "Handling time by endpoint",
        ["endpoint"],
        registry=registry,
        buckets=(0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0),
    )
    took = {endpoint: latency.labels(endpoint) for endpoint in ("log", "paginate", "events")}
    clock = SystemClock()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        # Routing's refusals (404, 405) in the body every other refusal has, not FastAPI's "detail".
        if exc.status_code == 404:
            message = f"no such path: {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            if err.get("type") == "json_invalid":
                at = err.get("loc", ("body", "?"))[-1]
                problems.append(f"at character {at}: {err.get('ctx', {}).get('error', err.get('msg'))}")
                continue
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where or 'body'}: {err.get('msg')}")
        kind = (
            "malformed JSON"
            if any(e.get("type") == "json_invalid" for e in exc.errors())
            else "invalid request"
        )
        return _error(400 if kind == "malformed JSON" else 422, f"{kind}: " + "; ".join(problems))

    def _ref(request_id: str, token: str) -> RequestRef | _Answer:
        try:
            return st.signer.check(token, request_id, clock.now_ms())
        except TokenError as exc:  # a genuine token past its window is a late call: 410, as documented
            return 410 if isinstance(exc, TokenExpired) else 401, {"error": str(exc)}

    featureset: FeatureSet = st.featureset or st.world.featureset  # type: ignore[union-attr]
    item_role = featureset.role(Role.ITEM_ID)
    string_items = item_role is not None and item_role.string_ids  # events may name items by string

    def _routed(header: str | None, request_id: str) -> _Answer | None:
        """A refusal if the routing header names another request than the body (None: it may go on).

        Behind a load balancer that hashes on the header, such a call reached the process of the
        header's request, not the body's: a client that sends one id in both is always routed right.
        """
        if header is None or header == request_id:
            return None
        return 400, {
            "error": f"the {REQUEST_ID_HEADER} header names request {header!r} but the body names "
            f"{request_id!r}: send the request's id in both, so the call reaches the process that ranked it"
        }

    def _chosen_id(header: str | None) -> str | _Answer | None:
        """The request id the caller (or the load balancer) chose in the header, None, or a refusal."""
        if header is None:
            return None
        try:
            request_id = check_request_id(header)
        except RequestIdError as exc:
            return 422, {"error": str(exc)}
        contexts = getattr(st.logger, "contexts", None)
        if contexts is not None and request_id in contexts:  # one id names one ranking
            return 409, {
                "error": f"request id {request_id!r} names a ranking this process still holds: "
                "choose a new id for each ranking"
            }
        return request_id

    def _logged(batch: RankedBatch, user_id: int, now: int, request_id: str | None = None) -> RequestRef:
        """Hand a ranked request to the logging lane (after the answer, in order); returns its ref."""
        ref = RequestRef(request_id or uuid.uuid4().hex[:16], user_id, now, batch.n_items)
        if st.service is not None:
            st.lane.submit(st.service.ranked, [ref], batch)
            if now - st.last_tick_ms >= 1_000:
                st.last_tick_ms = now
                st.lane.submit(st.logger.tick)  # type: ignore[union-attr]
        st.ranked += 1
        return ref

    @app.post(
        "/v1/log",
        response_model=LogOut,
        responses=_ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": LogIn.model_json_schema()},
                    ARROW_STREAM: {"schema": {"type": "string", "format": "binary"}},
                },
            }
        },
    )
    async def log(request: Request) -> Any:
        header = request.headers.get(REQUEST_ID_HEADER)
        return _response(_log(await request.body(), request.headers.get("content-type", ""), header))

    def _log(raw: bytes, content_type: str, header: str | None) -> _Answer:
        t0 = time.perf_counter()
        chosen = _chosen_id(header)
        if isinstance(chosen, tuple):
            return chosen
        try:
            if content_type.split(";")[0].strip() == ARROW_STREAM:
                user_id, items, scores, feats, item_block = arrow_body(raw, featureset)
            else:
                body = LogIn.model_validate_json(raw)
                user_id, items, scores, feats = body.user_id, body.items, body.scores, body.features
                item_block = None
            batch = pack_ranked(featureset, user_id, items, feats, scores, config.max_items, item_block)
        except ValidationError as exc:
            return 422, {
                "error": "invalid request: "
                + "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5]
                )
            }
        except FeatureInputError as exc:
            return exc.status, {"error": str(exc), "feature": exc.feature}
        ref = _logged(batch, int(batch.user_ids[0]), clock.now_ms(), chosen)
        took["log"].observe(time.perf_counter() - t0)
        return 200, {"request_id": ref.request_id, "token": st.signer.sign(ref), "n_items": ref.n_items}

    routing_header = Header(
        None,
        alias=REQUEST_ID_HEADER,
        description="rank and log: the id to rank under (a load balancer's; default: a new one); "
        "paginate and events: the body's request_id, for the load balancer to route by",
    )

    @app.post(
        "/v1/rank",
        response_model=RankOut,
        responses={**_ERRORS, 404: {"model": ErrorOut, "description": "this service ranks no catalog"}},
    )
    async def rank(body: RankIn, request_id: str | None = routing_header) -> Any:
        t0 = time.perf_counter()
        chosen = _chosen_id(request_id)
        if isinstance(chosen, tuple):
            return _response(chosen)
        if st.funnel is None:
            return _error(
                404,
                f"this service ranks no catalog of its own: it logs FeatureSet {featureset.name} "
                f"v{featureset.version} for your ranker; rank there and POST the ranking to /v1/log",
            )
        now = clock.now_ms()
        if isinstance(st.funnel, CatalogFunnel):
            try:
                batch = await asyncio.to_thread(st.funnel.rank, body.user_id, body.context, body.candidates)
            except FeatureInputError as exc:
                return _error(exc.status, str(exc), feature=exc.feature)
            except KeyError as exc:
                return _error(422, f"not in the catalog's feature store: {exc.args[0]}")
            except ConnectionError as exc:
                return _error(503, f"the feature store is not answering: {exc}; try again later")
        else:
            if body.candidates is not None or body.context is not None:
                return _error(
                    422,
                    "candidates and context are for a catalog service (leanrec serve --featureset F "
                    "--features-url URL); this one ranks the synthetic world with its own retrieval",
                )
            known = isinstance(body.user_id, int) and -(2**63) <= body.user_id < 2**63
            if not known or not st.world.users.find(np.array([body.user_id]))[1][0]:  # type: ignore[union-attr]
                return _error(
                    422,
                    f"unknown user {body.user_id!r}: not one of the synthetic world's {config.n_users:,} "
                    "users (their raw ids are World(WorldConfig(...)).user_ids; leanrec simulate draws them)",
                )
            batch = st.funnel.rank(np.array([body.user_id]), np.array([now]), np.array([body.surface]))
        ref = _logged(batch, int(batch.user_ids[0]), now, chosen)  # int64 user id (a string one hashed)
        out = RankOut(request_id=ref.request_id, items=batch.item_ids[0].tolist(), token=st.signer.sign(ref))
        latency.labels("rank").observe(time.perf_counter() - t0)
        return out

    @app.post("/v1/paginate", response_model=PaginateOut, responses=_ERRORS)
    async def paginate(body: PaginateIn, request_id: str | None = routing_header) -> Any:
        return _response(await _paginate(body.request_id, body.token, body.seen_up_to, request_id))

    async def _paginate(request_id: str, token: str, seen_up_to: int, header: str | None) -> _Answer:
        t0 = time.perf_counter()
        misrouted = _routed(header, request_id)
        if misrouted is not None:
            return misrouted
        ref = _ref(request_id, token)
        if not isinstance(ref, RequestRef):
            return ref
        if seen_up_to >= ref.n_items:
            return 422, {"error": f"seen_up_to={seen_up_to} is beyond the ranked list of {ref.n_items}"}
        logged = 0
        if st.service is not None:
            try:
                logged = await st.lane.call(st.service.paginate, ref, seen_up_to)
            except LoggingUnavailable as exc:
                return 503, {"error": str(exc)}
        took["paginate"].observe(time.perf_counter() - t0)
        return 200, {"pages_logged": logged}

    @app.post("/v1/events", response_model=EventsOut, responses=_ERRORS)
    async def events(body: EventsIn, request_id: str | None = routing_header) -> Any:
        def records() -> tuple[EventBatch, list[str]]:
            return EventBatch.from_records(
                body.request_id, [e.model_dump() for e in body.events], string_items
            )

        answer = await _events(
            body.request_id, body.token, body.batch_id, len(body.events), records, request_id
        )
        return _response(answer)

    async def _events(
        request_id: str,
        token: str,
        batch_id: str,
        n_events: int,
        records: Callable[[], tuple[EventBatch, list[str]]],
        header: str | None,
    ) -> _Answer:
        """An event batch of ``n_events`` events; ``records()`` builds it (and says which were malformed)."""
        t0 = time.perf_counter()
        misrouted = _routed(header, request_id)
        if misrouted is not None:
            return misrouted
        ref = _ref(request_id, token)
        if not isinstance(ref, RequestRef):
            return ref
        if n_events > st.limits.max_events:
            return 413, {"error": f"{n_events} events in one batch, limit {st.limits.max_events}"}
        batch, errors = records()
        if st.service is None:
            return 200, {
                "accepted": len(batch),
                "refused": {"malformed": len(errors)} if errors else {},
                "messages": errors,
            }
        try:
            report = await st.lane.call(st.service.events, ref, batch, batch_id)
        except LoggingUnavailable as exc:
            st.health.failed()
            return 503, {"error": f"{exc}; send the batch again later"}
        result = EventsResult.of(len(batch), errors, report)
        accepted, refused, messages = result.accepted, result.refused, result.messages
        took["events"].observe(time.perf_counter() - t0)
        if accepted == 0 and n_events:
            status = 409 if "replayed" in refused else 410 if "window_closed" in refused else 422
            return status, {"error": "no event accepted: " + "; ".join(messages), "refused": refused}
        return 200, {"accepted": accepted, "refused": refused, "messages": messages}

    # The hot calls' plain bodies, checked as PaginateIn and EventsIn would check them (None: not
    # plain, FastAPI's route checks it and says what is wrong). Events become columns in one step.
    async def _hot_log(raw: bytes, content_type: str, header: str | None) -> _Answer:
        return _log(raw, content_type, header)

    async def _hot_paginate(raw: bytes, content_type: str, header: str | None) -> _Answer | None:
        body = _json_object(raw, content_type)
        if body is None or not is_plain_ref(body, ("request_id", 64), ("token", 512)):
            return None
        seen = body.get("seen_up_to")
        if type(seen) is not int or seen < 0:
            return None
        return await _paginate(body["request_id"], body["token"], seen, header)

    async def _hot_events(raw: bytes, content_type: str, header: str | None) -> _Answer | None:
        body = _json_object(raw, content_type)
        if body is None or not is_plain_ref(body, ("request_id", 64), ("token", 512), ("batch_id", 64)):
            return None
        batch = event_columns(body["request_id"], body.get("events"), st.limits.max_events)
        if batch is None or not body["batch_id"]:
            return None
        return await _events(
            body["request_id"], body["token"], body["batch_id"], len(batch), lambda: (batch, []), header
        )

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        backends = {}
        for name, probe in (
            ("transient_store", lambda: st.store.get_many(["lr:{healthz}:probe"])),
            ("event_bus", lambda: st.bus.pending()),
        ):
            try:  # through the lane, which owns the backends' clients; a long queue is an answer too
                await asyncio.wait_for(st.lane.call(probe), timeout=1.0)
                backends[name] = "up"
            except (ConnectionError, OSError, LoggingUnavailable) as exc:
                backends[name] = f"down: {exc}"
            except TimeoutError:
                backends[name] = "down: no answer within 1 s"
        ls = st.logger.stats if st.logger is not None else None
        down = any(v != "up" for v in backends.values())
        body = {
            "status": "degraded" if down or st.health.degraded else "ok",
            "logging": config.logging,
            "logging_degraded": down or st.health.degraded,
            "backends": backends,
            "lost_logging": {
                "entries": ls.write_failures if ls else 0,
                "opened_records": ls.bus_failures if ls else 0,
                "opened_records_resent": ls.bus_resent if ls else 0,
                "opened_records_never_taken": (
                    st.logger.contexts.stats.unopened if isinstance(st.logger, LazyLogger) else 0
                ),
                "rankings_dropped": st.lane.dropped,
            },
            "logging_queue": st.lane.pending,
            "ranked": st.ranked,
            "events": {
                "accepted": st.service.stats.events_accepted if st.service else 0,
                "refused": _refused(st.service.stats.events_refused if st.service else {}),
            },
            "catalog": {
                "featureset": featureset.name,
                "version": featureset.version,
                "fingerprint": featureset.fingerprint,
                "ranks": st.funnel is not None,
                "context": [f.name for f in featureset.of(Owner.CONTEXT)],
                "world": None
                if st.world is None
                else {"n_users": config.n_users, "n_items": config.n_items, "seed": config.seed},
            },
        }
        return JSONResponse(body, status_code=200)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    hot = {"/v1/log": _hot_log, "/v1/paginate": _hot_paginate, "/v1/events": _hot_events}
    app.add_middleware(_HotRoutes, routes=hot)
    app.add_middleware(_BodyLimit, max_bytes=config.max_body_bytes)  # outside: bounds every body
    return app
