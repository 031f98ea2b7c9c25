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

Ranking never waits on logging: a ranking is answered first and frozen and logged right after, on one
logging thread that also serves the pagination and event calls in order. If the transient store
or the bus fails, the ranking is answered,
the lost logging is counted, shown in ``/healthz`` and ``/metrics``, and logging resumes by itself
when the backend answers again. An event batch the store did not take is answered with 503 and is
not accepted, so the client sends it again.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, Field, ValidationError

from leanrec.clock import SystemClock
from leanrec.energy.ledger import CostLedger
from leanrec.events import EventBatch, EventLimits, RequestRef
from leanrec.featurefile import load_featureset
from leanrec.featurelog.inputs import FeatureInputError, pack_ranked
from leanrec.featurelog.loggers import FeatureLogger, LazyLogger
from leanrec.featurelog.ranked import RankedBatch
from leanrec.funnel.catalog import CatalogFunnel
from leanrec.funnel.ranker import Funnel
from leanrec.schema import FeatureSet, Owner
from leanrec.serve.catalog import catalog_funnel
from leanrec.serve.config import ServeConfig
from leanrec.serve.rankinglog import build_logging
from leanrec.serve.service import EventsResult, LoggingService, LoggingUnavailable
from leanrec.serve.tokens import TokenError, TokenSigner
from leanrec.world import World, WorldConfig


class RankIn(BaseModel):
    """A ranking request."""

    user_id: int = Field(ge=0, description="the user to rank for")
    surface: int = Field(
        0, ge=0, le=2, description="synthetic world: feed surface (0 home, 1 explore, 2 following)"
    )
    candidates: list[int] | None = Field(
        None, description="a catalog service: the items to rank (default: its retrieval model's)"
    )
    context: dict[str, Any] | None = Field(
        None, description="a catalog service: the FeatureSet's context features by name (number or list)"
    )


class LogIn(BaseModel):
    """A ranking made by the caller's ranker, with the features it scored (the JSON body of /v1/log)."""

    user_id: int = Field(ge=0, description="who the list was ranked for")
    items: list[int] = Field(description="ranked item ids, best first")
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


ARROW_STREAM = "application/vnd.apache.arrow.stream"
"""Content type of the binary body of /v1/log: one Arrow IPC stream (see :func:`_arrow_body`)."""


def _arrow_body(raw: bytes) -> tuple[int, list[int], list[float] | None, dict[str, Any]]:
    """The user, items, scores and features of an Arrow IPC body of /v1/log.

    The stream's rows are the ranked items: an ``item_id`` column, an optional ``score`` column, and
    one column per item-side feature (a fixed-size list for a size above 1). The request side rides
    in the schema's metadata under ``leanrec``: JSON ``{"user_id": ..., "features": {...}}``, the
    features as in the JSON body.

    Raises:
        FeatureInputError: Not an Arrow stream, or its metadata is missing or not such JSON.

    """
    import json

    import pyarrow as pa

    try:
        table = pa.ipc.open_stream(raw).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise FeatureInputError(f"body is not an Arrow IPC stream: {exc}") from None
    try:
        head = json.loads((table.schema.metadata or {})[b"leanrec"])
        user_id, request_features = int(head["user_id"]), dict(head.get("features", {}))
    except (KeyError, TypeError, ValueError):
        raise FeatureInputError(
            'the stream\'s schema metadata needs "leanrec": {"user_id": ..., "features": {...}} as JSON',
            "leanrec",
        ) from None
    if "item_id" not in table.column_names:
        raise FeatureInputError("the stream needs an item_id column", "item_id")
    features = dict(request_features)
    for name in table.column_names:
        if name in ("item_id", "score"):
            continue
        col = table[name].combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            features[name] = (
                col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
            )
        else:
            features[name] = col.to_numpy(zero_copy_only=False)
    items = table["item_id"].to_numpy()
    scores = table["score"].to_numpy() if "score" in table.column_names else None
    return user_id, items, scores, features


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
    item_id: int
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


class LogLane:
    """One thread that runs every logging call in arrival order, so ranking never waits on logging.

    ``/v1/rank`` hands the freeze-and-log step to the lane and answers at once; paginate and event
    calls go through the same lane and wait for their result, so they always follow the ranking
    they refer to. The lane holds at most ``max_pending`` calls: past that a ranking's logging is
    dropped and counted (and the service reports itself degraded) rather than letting memory grow.
    """

    def __init__(self, health: _Health, logger: FeatureLogger | None, max_pending: int = 10_000) -> None:
        self.health, self.logger, self.max_pending = health, logger, max_pending
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leanrec-log")
        self._lock = threading.Lock()
        self.pending = 0
        self.dropped = 0

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        stats = self.logger.stats if self.logger is not None else None
        before = stats.write_failures + stats.bus_failures if stats else 0
        try:
            return fn(*args)
        finally:
            with self._lock:
                self.pending -= 1
            if stats and stats.write_failures + stats.bus_failures > before:
                self.health.failed()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future | None:
        """Queue a call; ``None`` if the lane is full (the call is dropped and counted)."""
        with self._lock:
            if self.pending >= self.max_pending:
                self.dropped += 1
                self.health.failed()
                return None
            self.pending += 1
        return self._executor.submit(self._run, fn, *args)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Queue a call and wait for its result.

        Raises:
            LoggingUnavailable: The lane is full.

        """
        future = self.submit(fn, *args)
        if future is None:
            raise LoggingUnavailable(f"logging queue full ({self.max_pending} calls waiting)")
        return await asyncio.wrap_future(future)

    def drain(self) -> None:
        """Block until every call queued so far has run (tests, shutdown)."""
        self._executor.submit(lambda: None).result()


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
                ("leanrec_pages_on_signal", ls.pages_on_signal, "Pages logged on a pagination signal"),
                ("leanrec_pages_on_touch", ls.pages_on_touch, "Pages logged because an event touched them"),
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
            g = GaugeMetricFamily(
                "leanrec_context_bytes_held", "Frozen features held for pages not logged yet"
            )
            g.add_metric([], st.logger.contexts.stats.bytes_held)
            yield g
        if svc is not None:
            m = CounterMetricFamily("leanrec_events_accepted", "Events accepted")
            m.add_metric([], svc.events_accepted)
            yield m
            r = CounterMetricFamily("leanrec_events_refused", "Events refused, by reason", labels=["reason"])
            for reason, n in sorted(svc.events_refused.items()):
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
    """
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
    app = FastAPI(
        title="leanrec",
        version="0.1.0",
        description="Ranking with lean feature logging: rank, paginate, report events.",
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
    clock = SystemClock()

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

    def _ref(request_id: str, token: str) -> RequestRef | JSONResponse:
        try:
            return st.signer.check(token, request_id, clock.now_ms())
        except TokenError as exc:
            return _error(401, str(exc))

    featureset: FeatureSet = st.featureset or st.world.featureset  # type: ignore[union-attr]

    def _logged(batch: RankedBatch, user_id: int, now: int) -> RequestRef:
        """Hand a ranked request to the logging lane (after the answer, in order); returns its ref."""
        ref = RequestRef(uuid.uuid4().hex[:16], user_id, now, batch.n_items)
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
        t0 = time.perf_counter()
        raw = await request.body()
        try:
            if request.headers.get("content-type", "").split(";")[0].strip() == ARROW_STREAM:
                user_id, items, scores, feats = _arrow_body(raw)
            else:
                body = LogIn.model_validate_json(raw)
                user_id, items, scores, feats = body.user_id, body.items, body.scores, body.features
            batch = pack_ranked(featureset, user_id, items, feats, scores, config.max_items)
        except ValidationError as exc:
            return _error(
                422,
                "invalid request: "
                + "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5]
                ),
            )
        except FeatureInputError as exc:
            return _error(exc.status, str(exc), feature=exc.feature)
        ref = _logged(batch, user_id, clock.now_ms())
        latency.labels("log").observe(time.perf_counter() - t0)
        return {"request_id": ref.request_id, "token": st.signer.sign(ref), "n_items": ref.n_items}

    @app.post("/v1/rank", response_model=RankOut, responses=_ERRORS)
    async def rank(body: RankIn) -> Any:
        t0 = time.perf_counter()
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
            if body.user_id >= config.n_users:
                return _error(422, f"unknown user {body.user_id}: users are 0..{config.n_users - 1}")
            batch = st.funnel.rank(np.array([body.user_id]), np.array([now]), np.array([body.surface]))
        ref = _logged(batch, body.user_id, now)
        out = RankOut(request_id=ref.request_id, items=batch.item_ids[0].tolist(), token=st.signer.sign(ref))
        latency.labels("rank").observe(time.perf_counter() - t0)
        return out

    @app.post("/v1/paginate", response_model=PaginateOut, responses=_ERRORS)
    async def paginate(body: PaginateIn) -> Any:
        t0 = time.perf_counter()
        ref = _ref(body.request_id, body.token)
        if isinstance(ref, JSONResponse):
            return ref
        if body.seen_up_to >= ref.n_items:
            return _error(422, f"seen_up_to={body.seen_up_to} is beyond the ranked list of {ref.n_items}")
        logged = 0
        if st.service is not None:
            try:
                logged = await st.lane.call(st.service.paginate, ref, body.seen_up_to)
            except LoggingUnavailable as exc:
                return _error(503, str(exc))
        latency.labels("paginate").observe(time.perf_counter() - t0)
        return {"pages_logged": logged}

    @app.post("/v1/events", response_model=EventsOut, responses=_ERRORS)
    async def events(body: EventsIn) -> Any:
        t0 = time.perf_counter()
        ref = _ref(body.request_id, body.token)
        if isinstance(ref, JSONResponse):
            return ref
        if len(body.events) > st.limits.max_events:
            return _error(413, f"{len(body.events)} events in one batch, limit {st.limits.max_events}")
        batch, errors = EventBatch.from_records(body.request_id, [e.model_dump() for e in body.events])
        if st.service is None:
            return {
                "accepted": len(batch),
                "refused": {"malformed": len(errors)} if errors else {},
                "messages": errors,
            }
        try:
            report = await st.lane.call(st.service.events, ref, batch, body.batch_id)
        except LoggingUnavailable as exc:
            st.health.failed()
            return _error(503, f"{exc}; send the batch again later")
        result = EventsResult.of(len(batch), errors, report)
        accepted, refused, messages = result.accepted, result.refused, result.messages
        latency.labels("events").observe(time.perf_counter() - t0)
        if accepted == 0 and body.events:
            status = 409 if "replayed" in refused else 410 if "window_closed" in refused else 422
            return _error(status, "no event accepted: " + "; ".join(messages), refused=refused)
        return {"accepted": accepted, "refused": refused, "messages": messages}

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
                "rankings_dropped": st.lane.dropped,
            },
            "logging_queue": st.lane.pending,
            "ranked": st.ranked,
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

    app.add_middleware(_BodyLimit, max_bytes=config.max_body_bytes)
    return app
