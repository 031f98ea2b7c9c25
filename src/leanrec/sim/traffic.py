"""Simulated clients: users who get a ranked feed, scroll it, engage, and report what they did.

One simulation drives any number of pipelines in lockstep: each ranking, pagination signal and event
batch is handed to every pipeline at the same simulated time, so they see the same traffic and their
figures compare one to one. The clients behave as real ones do: most sessions view about six items,
a few read deep, some scroll faster than their pagination signal (delayed or lost), event batches
arrive out of order, some twice, a few malformed, a few too late.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import numpy as np

from leanrec.clock import ManualClock
from leanrec.events.model import EventBatch, EventKind, RequestRef
from leanrec.funnel.ranker import Funnel, RankedBatch
from leanrec.serve.service import LoggingUnavailable
from leanrec.sim.pipeline import Pipeline, PipelineConfig
from leanrec.world import LONG_WATCH_MS, Engagement, World

RETRIES = 3
RETRY_MS = 5_000
START_MS = int(datetime(2026, 11, 2, 8, tzinfo=UTC).timestamp() * 1000)
PROGRESS_EVERY = 64
"""Requests logged (or joined) between two progress reports: often enough for a bar to move smoothly,
rarely enough that reporting costs nothing next to the work."""

RANK_STEP = "rank and log requests"
EVENT_STEP = "deliver the clients' events"
JOIN_STEP = "join as attribution windows close"


class Steps(Protocol):
    """Reports how far each step of a run has come (absolute counts, so a report can be dropped)."""

    def __call__(self, step: str, done: int, total: int | None, detail: str = "") -> None:
        """``step`` has ``done`` of ``total`` units (None: not known yet); ``detail`` says what runs now."""
        ...


@dataclass(frozen=True)
class TrafficConfig:
    """How clients behave.

    Attributes:
        requests: Ranked requests to simulate.
        seed: Seeds arrivals and behaviour (the world has its own).
        rate_per_s: Mean request arrivals per simulated second.
        dwell_ms: Mean time a user spends per item.
        flush_every: Positions whose events a client sends in one batch.
        fast_scroll_share: Sessions whose pagination signals are delayed (3–30 s) or lost.
        duplicate_share: Event batches the client sends twice.
        bad_event_share: Event batches carrying one malformed or mismatched event.
        late_share: Event batches delivered after the request was joined.
        tick_ms: Requests arriving within one tick are ranked as one batch.
        join_every_ms: How often the joiner runs.

    """

    requests: int = 5_000
    seed: int = 7
    rate_per_s: float = 1_000.0
    dwell_ms: float = 1_800.0
    flush_every: int = 5
    fast_scroll_share: float = 0.1
    duplicate_share: float = 0.03
    bad_event_share: float = 0.02
    late_share: float = 0.002
    tick_ms: int = 1_000
    join_every_ms: int = 10_000


@dataclass(order=True)
class _Op:
    t_ms: int
    seq: int
    kind: str = field(compare=False)
    ref: RequestRef = field(compare=False)
    arg: int | EventBatch = field(compare=False)
    only: int | None = field(default=None, compare=False)  # a retry for one pipeline
    attempt: int = field(default=0, compare=False)


@dataclass
class Scored:
    """Fingerprints of what the late ranker scored for one request (to prove there is no skew)."""

    request_fp: int
    item_fps: np.ndarray
    item_ids: np.ndarray


@dataclass
class TrafficStats:
    """What the clients did."""

    requests: int = 0
    viewed: int = 0
    clicks: int = 0
    likes: int = 0
    shares: int = 0
    long_watches: int = 0
    viewed_by_position: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    fast_scroll_sessions: int = 0
    signals_sent: int = 0
    signals_lost: int = 0
    event_batches: int = 0
    duplicate_batches: int = 0
    bad_events: int = 0
    late_batches: int = 0
    retried_batches: int = 0  # answered "unavailable" (a full or lost store) and sent again later
    dropped_batches: int = 0  # still unavailable after the client's last retry


class TrafficSim:
    """Drives pipelines with simulated client traffic.

    Args:
        world: Users, items and their truth.
        funnel: Ranks each request once; every pipeline logs the same ranking.
        pipelines: Pipelines to drive in lockstep.
        clock: The simulated clock all pipelines share.
        config: Client behaviour.
        plumbing: The pipelines' settings: the attribution window, and the paging and lookahead that
            decide where the client sends pagination signals.
        track_scored: Keep fingerprints of every scored feature row, to count skew afterwards.

    """

    def __init__(
        self,
        world: World,
        funnel: Funnel,
        pipelines: list[Pipeline],
        clock: ManualClock,
        config: TrafficConfig,
        plumbing: PipelineConfig,
        track_scored: bool = True,
    ) -> None:
        self.world, self.funnel, self.pipelines, self.clock, self.config = (
            world,
            funnel,
            pipelines,
            clock,
            config,
        )
        self.window_ms, self.lateness_ms = plumbing.window_ms, plumbing.lateness_ms
        self.paging, self.lookahead = plumbing.paging, plumbing.lookahead
        self.rng = np.random.default_rng(config.seed)
        self.track_scored = track_scored
        self.scored: dict[str, Scored] = {}
        self.stats = TrafficStats(viewed_by_position=np.zeros(funnel.n_rank, np.int64))
        self._ops: list[_Op] = []
        self._seq = 0

    def _push(self, t_ms: float, kind: str, ref: RequestRef, arg: int | EventBatch) -> None:
        self._seq += 1
        heapq.heappush(self._ops, _Op(int(t_ms), self._seq, kind, ref, arg))

    def run(self, progress: Callable[[int], None] | None = None, steps: Steps | None = None) -> TrafficStats:
        """Simulate every request to the end of its attribution window, then drain the pipelines.

        With ``progress`` or ``steps``, each tick's ranked batch is logged in slices of
        ``PROGRESS_EVERY`` requests, a report after each: the funnel still ranks the whole tick's
        arrivals in one call and every pipeline logs the same rows in the same order, so the traffic
        and every figure are the same as without them.

        Args:
            progress: Called with the number of requests ranked and logged since its last call, every
                ``PROGRESS_EVERY`` requests.
            steps: Called as each step moves: requests ranked and logged (``RANK_STEP``), client
                calls delivered of those scheduled so far (``EVENT_STEP``), and requests joined, a
                step per pipeline (``JOIN_STEP`` and its plumbing: ``"…, naive"``).

        """
        cfg, t = self.config, START_MS
        self.clock.set(t)
        next_join = t + cfg.join_every_ms
        issued = delivered = 0
        done = [0]  # requests logged by every pipeline
        joined = [0] * len(self.pipelines)
        join_steps = [f"{JOIN_STEP}, {p.plumbing.value}" for p in self.pipelines] if steps else []
        every = PROGRESS_EVERY if progress or steps else None

        def logged(n: int) -> None:
            done[0] += n
            if progress:
                progress(n)
            if steps:
                steps(RANK_STEP, done[0], cfg.requests)

        def ticks() -> list[Callable[[int], None] | None]:
            """Per pipeline, what counts its joins for ``steps``."""
            if steps is None:
                return [None] * len(self.pipelines)

            def count(i: int) -> Callable[[int], None]:
                def add(n: int) -> None:
                    joined[i] += n
                    steps(join_steps[i], joined[i], cfg.requests)

                return add

            return [count(i) for i in range(len(self.pipelines))]

        if steps:  # every step at once, so the whole run shows from the start
            steps(RANK_STEP, 0, cfg.requests)
            steps(EVENT_STEP, 0, None)
            for name in join_steps:
                steps(name, 0, cfg.requests)
        while issued < cfg.requests or self._ops:
            if issued < cfg.requests:
                k = min(int(self.rng.poisson(cfg.rate_per_s * cfg.tick_ms / 1000)), cfg.requests - issued)
                if k:
                    if steps:
                        steps(RANK_STEP, issued, cfg.requests, f"the funnel ranks {k:,} arrivals")
                    self._rank(t, issued, k, every, logged)
                    issued += k
            end = t + cfg.tick_ms
            before = delivered
            while self._ops and self._ops[0].t_ms < end:
                op = heapq.heappop(self._ops)
                self.clock.set(max(op.t_ms, self.clock.now_ms()))
                self._deliver(op)
                delivered += 1
            if steps and delivered > before:
                steps(EVENT_STEP, delivered, delivered + len(self._ops))
            t = end
            self.clock.set(t)
            if t >= next_join:
                for p, joins in zip(self.pipelines, ticks(), strict=True):
                    p.tick(joins)
                next_join += cfg.join_every_ms
        # Let the remaining attribution windows close on the joiners' own schedule.
        last_due = t + self.window_ms + self.lateness_ms + cfg.join_every_ms
        while t < last_due and any(p.joiner.open_requests for p in self.pipelines):
            t = min(next_join, last_due)
            self.clock.set(t)
            for p, joins in zip(self.pipelines, ticks(), strict=True):
                p.tick(joins)
            next_join += cfg.join_every_ms
        for p in self.pipelines:
            p.drain()
        if steps:
            for name in join_steps:
                steps(name, cfg.requests, cfg.requests)
        return self.stats

    def _deliver(self, op: _Op) -> None:
        for i, p in enumerate(self.pipelines):
            if op.only is not None and op.only != i:
                continue
            if op.kind == "page":
                p.service.paginate(op.ref, int(op.arg))  # type: ignore[arg-type]
                continue
            try:
                p.service.events(op.ref, op.arg)  # type: ignore[arg-type]
            except LoggingUnavailable:  # the client sends the batch again later, as a 503 asks
                if op.attempt < RETRIES:
                    self.stats.retried_batches += 1
                    self._seq += 1
                    heapq.heappush(
                        self._ops,
                        _Op(op.t_ms + RETRY_MS, self._seq, op.kind, op.ref, op.arg, i, op.attempt + 1),
                    )
                else:
                    self.stats.dropped_batches += 1

    def _rank(
        self,
        t_ms: int,
        first: int,
        k: int,
        every: int | None = None,
        logged: Callable[[int], None] | None = None,
    ) -> None:
        """Rank ``k`` arrivals in one funnel call; every pipeline logs them, ``every`` at a time."""
        users = self.world.sample_users(k, self.rng)
        surface = self.rng.integers(0, 3, k)
        batch = self.funnel.rank(users, np.full(k, t_ms), surface)
        refs = [
            RequestRef(f"{self.config.seed:04x}{first + i:08x}", int(u), t_ms, batch.n_items)
            for i, u in enumerate(users)
        ]
        # The pipelines share nothing but the clock, which stands still here: slicing the batch
        # changes when a request is logged in wall time, never what any pipeline holds or counts.
        step = every or k
        for lo in range(0, k, step):
            hi = min(lo + step, k)
            part = batch if step == k else _rows(batch, lo, hi)
            for p in self.pipelines:
                p.service.ranked(refs[lo:hi], part)
            if logged:
                logged(hi - lo)
        if self.track_scored:
            self._remember(refs, batch)
        eng = self.world.engage(users, batch.item_ids, self.rng)
        self.world.apply(users, batch.item_ids, eng)  # the store moves on before anyone engages
        self.stats.requests += k
        self.stats.viewed += int(eng.viewed.sum())
        self.stats.clicks += int(eng.click.sum())
        self.stats.likes += int(eng.like.sum())
        self.stats.shares += int(eng.share.sum())
        self.stats.long_watches += int((eng.watch_ms >= LONG_WATCH_MS).sum())
        self.stats.viewed_by_position += eng.viewed.sum(axis=0)
        for b, ref in enumerate(refs):
            self._session(ref, batch.item_ids[b], eng, b)

    def _remember(self, refs: list[RequestRef], batch: RankedBatch) -> None:
        req_fp = batch.request.row_fingerprints()
        item_fp = batch.items.row_fingerprints().reshape(len(refs), batch.n_items)
        for b, ref in enumerate(refs):
            self.scored[ref.request_id] = Scored(int(req_fp[b]), item_fp[b], batch.item_ids[b])

    def _session(self, ref: RequestRef, items: np.ndarray, eng: Engagement, b: int) -> None:
        cfg, rng = self.config, self.rng
        depth = int(eng.depth[b])
        fast = rng.random() < cfg.fast_scroll_share
        self.stats.fast_scroll_sessions += fast
        dwell = cfg.dwell_ms / (8 if fast else 1)
        t_view = ref.ts_ms + 300 + np.cumsum(rng.exponential(dwell, depth))
        pos = np.arange(depth)
        rows = [(pos, np.full(depth, EventKind.VIEW), t_view, np.zeros(depth))]
        for kind, mask, delay in (
            (EventKind.CLICK, eng.click[b, :depth], 200),
            (EventKind.LIKE, eng.like[b, :depth], 1_000),
            (EventKind.SHARE, eng.share[b, :depth], 1_500),
            (EventKind.HIDE, eng.hide[b, :depth], 100),
        ):
            rows.append((pos[mask], np.full(mask.sum(), kind), t_view[mask] + delay, np.zeros(mask.sum())))
        watched = eng.click[b, :depth]
        watch_ms = eng.watch_ms[b, :depth][watched]
        rows.append(
            (
                pos[watched],
                np.full(watched.sum(), EventKind.WATCH),
                t_view[watched] + np.minimum(watch_ms, self.window_ms // 2),
                watch_ms,
            )
        )
        position = np.concatenate([r[0] for r in rows]).astype(np.int32)
        kinds = np.concatenate([r[1] for r in rows]).astype(np.int8)
        ts = np.concatenate([r[2] for r in rows]).astype(np.int64)
        value = np.concatenate([r[3] for r in rows]).astype(np.float32)
        # Views (and hides) go out as the user scrolls, a batch per `flush_every` positions;
        # engagement that takes time (likes, shares, watch time) goes out when it is complete.
        prompt = (kinds == EventKind.VIEW) | (kinds == EventKind.HIDE)
        chunk = position // cfg.flush_every + np.where(prompt, 0, 1 << 20)
        for c in np.unique(chunk):
            sel = np.flatnonzero(chunk == c)
            sel = sel[rng.permutation(len(sel))]  # out of order inside a batch
            ev = EventBatch(
                ref.request_id,
                position[sel],
                items[position[sel]].astype(np.int64),
                kinds[sel],
                ts[sel],
                value[sel],
            )
            if rng.random() < cfg.bad_event_share:
                ev = self._spoil(ev, ref, items)
            send = ev.ts_ms.max() + rng.uniform(50, 1_500)
            if rng.random() < cfg.late_share:
                send = ref.ts_ms + self.window_ms + self.lateness_ms + 2 * cfg.join_every_ms
                self.stats.late_batches += 1
            self._push(send, "events", ref, ev)
            self.stats.event_batches += 1
            if rng.random() < cfg.duplicate_share:
                self._push(send + rng.uniform(1_000, 30_000), "events", ref, ev)
                self.stats.duplicate_batches += 1
        # Pagination signals: when the user is `lookahead` positions before the next page.
        for page in range(1, self.paging.count(ref.n_items)):
            start, _ = self.paging.bounds(page, ref.n_items)
            at = max(start - self.lookahead, 0)
            if at >= depth:
                break
            if fast and rng.random() < 0.5:
                self.stats.signals_lost += 1
                continue
            delay = rng.uniform(3_000, 30_000) if fast else rng.uniform(20, 200)
            self._push(t_view[at] + delay, "page", ref, at)
            self.stats.signals_sent += 1

    def _spoil(self, ev: EventBatch, ref: RequestRef, items: np.ndarray) -> EventBatch:
        """Append one bad event: an unknown kind, a position off the list, a NaN value or a wrong item."""
        self.stats.bad_events += 1
        what = int(self.rng.integers(0, 4))
        p = int(ev.position[0])
        pos, item, kind, value = p, int(items[p]), int(EventKind.CLICK), 0.0
        if what == 0:
            kind = 42
        elif what == 1:
            pos = ref.n_items + 7
        elif what == 2:
            kind, value = int(EventKind.WATCH), float("nan")
        else:
            item = int(items[p]) ^ 1  # an item that was not shown there
        extra = EventBatch(
            ref.request_id,
            np.array([pos], np.int32),
            np.array([item], np.int64),
            np.array([kind], np.int8),
            ev.ts_ms[:1].copy(),
            np.array([value], np.float32),
        )
        return EventBatch.concat(ref.request_id, [ev, extra])


def _rows(batch: RankedBatch, lo: int, hi: int) -> RankedBatch:
    """Requests ``lo .. hi-1`` of a ranked batch (views, no copy)."""
    n = batch.n_items
    return RankedBatch(
        batch.user_ids[lo:hi],
        batch.item_ids[lo:hi],
        batch.scores[lo:hi],
        batch.request.take(slice(lo, hi)),
        batch.items.take(slice(lo * n, hi * n)),
    )
