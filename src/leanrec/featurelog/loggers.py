"""Feature loggers: freeze what the late ranker scored and put it in the TransientStore.

- :class:`EagerLogger` (the naive baseline): at rank time, one entry per ranked item holding the
  whole vector the model scored, user and item features together, and the score it gave.
- :class:`LazyLogger` (the lean way): at rank time, the request side once and the head page; later
  pages only when the client signals that the user scrolled there, or when an event touches a
  position whose page is not logged yet (log-on-touch), so a fast scroll never loses a label. Each
  page holds its items' scores beside their features.

Every logged item carries the score the ranker gave it at its position, frozen with its features
(NaN where the ranker gave none), so the warehouse can keep the logged ranking beside the labels.

Each logger also knows how its entries are read back (``fetch``) and removed (``keys``), so the
joiner works with either.

With ``shared_rows``, the lazy logger stores each distinct item feature row, and each distinct row of
a request's slowly changing features, once under the hash of its bytes, and its pages and request
side reference them (see :mod:`leanrec.featurelog.rows`). Its ``fetch`` reads either layout, by
the kind of each blob, so a joiner reads what any lazy logger wrote, with the option or without.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Protocol

import numpy as np

from leanrec.clock import Clock
from leanrec.energy.ledger import CostLedger
from leanrec.events.bus import EventBus, RequestOpened
from leanrec.events.model import EventBatch, RequestRef
from leanrec.featurelog import codec
from leanrec.featurelog.codec import BlobKind, RowTable
from leanrec.featurelog.ranked import RankedBatch
from leanrec.featurelog.rows import RowCache, row_hashes, row_keys
from leanrec.schema import FeatureBlock, FeatureSet, Side
from leanrec.stores.transient import OnceAppend, StoreFullError, TransientStore


def key(request_id: str, suffix: str) -> str:
    """Transient key of one request's entry; the braces are the Redis Cluster hash tag."""
    return f"lr:{{{request_id}}}:{suffix}"


@dataclass(frozen=True)
class Paging:
    """How a ranked list is cut into pages: a head, then pages of equal size.

    Attributes:
        head: Items in page 0, logged at rank time.
        size: Items in every later page.

    """

    head: int = 6
    size: int = 9

    def page_of(self, positions: np.ndarray) -> np.ndarray:
        """Page index of each position."""
        positions = np.asarray(positions)
        return np.where(positions < self.head, 0, 1 + (positions - self.head) // self.size)

    def bounds(self, page: int, n_items: int) -> tuple[int, int]:
        """First and one-past-last position of a page."""
        start = 0 if page == 0 else self.head + (page - 1) * self.size
        stop = self.head if page == 0 else start + self.size
        return start, min(stop, n_items)

    def count(self, n_items: int) -> int:
        """Pages in a list of ``n_items``."""
        last = n_items - 1  # plain integers: once per ranked request, numpy costs more here
        return 1 if last < self.head else 2 + (last - self.head) // self.size


@dataclass
class Fetched:
    """Frozen features read back for some positions of one request.

    Attributes:
        found: ``(k,)`` bool, whether each asked position's features were found.
        item_ids: ``(k,)`` int64 logged item id (-1 where not found).
        request: Request side, one row (``None`` if not found).
        items: Item side, one row per asked position (zeros where not found).
        scores: ``(k,)`` float32 the ranker's score at each asked position (NaN where not found or
            where the ranker gave none).

    """

    found: np.ndarray
    item_ids: np.ndarray
    request: FeatureBlock | None
    items: FeatureBlock
    scores: np.ndarray


@dataclass
class LoggerStats:
    """Counters of a logger."""

    requests: int = 0
    entries_written: int = 0
    pages_on_signal: int = 0
    pages_on_touch: int = 0
    write_failures: int = 0  # entries the transient store did not take
    bus_failures: int = 0  # RequestOpened records the bus did not take (at their first try)
    bus_resent: int = 0  # of those, taken on a later try (lazy logging: the request's next call)
    touch_after_release: int = 0  # events on a released context: only pages logged by then can join
    signals_after_release: int = 0  # context completed, expired or never known: nothing left to log
    rows_written: int = 0  # shared rows whose bytes were sent (first use, or not known to this logger)
    rows_extended: int = 0  # shared rows a use extended (no bytes sent)
    rows_rewritten: int = 0  # of those to extend, found gone (evicted, a restart) and written again
    rows_reused: int = 0  # shared rows a use found alive long enough already (nothing sent)
    logged_by_position: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def count_logged(self, start: int, stop: int) -> None:
        """Count positions ``start .. stop-1`` of one request as logged."""
        if stop > len(self.logged_by_position):
            grown = np.zeros(stop, np.int64)
            grown[: len(self.logged_by_position)] = self.logged_by_position
            self.logged_by_position = grown
        self.logged_by_position[start:stop] += 1


class FeatureLogger(Protocol):
    """What the serving side calls, and what the joiner reads back."""

    fs: FeatureSet
    store: TransientStore
    ttl_ms: int
    stats: LoggerStats

    def log_ranked(self, refs: list[RequestRef], batch: RankedBatch) -> None:
        """Freeze and log B ranked requests."""
        ...

    def paginate(self, ref: RequestRef, seen_up_to: int) -> int:
        """The client reports the user has seen up to ``seen_up_to``; returns pages logged."""
        ...

    def touch(self, ref: RequestRef, events: EventBatch) -> None:
        """Called with validated events before they go to the bus."""
        ...

    def ranked_items(self, ref: RequestRef) -> np.ndarray | None:
        """The ``(n,)`` item ids ranked for ``ref`` if this process still holds them, else None."""
        ...

    def fetch(self, ref: RequestOpened, positions: np.ndarray) -> Fetched:
        """Read frozen features of ``positions`` back from the store."""
        ...

    def keys(self, ref: RequestOpened) -> list[str]:
        """Every key this logger may have written for the request."""
        ...

    def tick(self) -> None:
        """Housekeeping on the clock (expire held contexts)."""
        ...


class _Base:
    def __init__(
        self,
        fs: FeatureSet,
        store: TransientStore,
        bus: EventBus,
        ledger: CostLedger,
        ttl_ms: int,
    ) -> None:
        self.fs, self.store, self.bus, self.ledger, self.ttl_ms = fs, store, bus, ledger, ttl_ms
        self.stats = LoggerStats()

    def _put(self, entries: dict[str, bytes]) -> bool:
        with self.ledger.cpu("kv_write") as cost:
            try:
                self.store.put_many(entries, self.ttl_ms)
            except (StoreFullError, ConnectionError, OSError):
                # Ranking goes on without its log: the loss is counted, never raised to the client.
                self.stats.write_failures += len(entries)
                return False
            cost.ops += len(entries)
            cost.bytes_written += sum(len(v) for v in entries.values())
        self.stats.entries_written += len(entries)
        return True

    def _get(self, keys: list[str]) -> list[bytes | None]:
        with self.ledger.cpu("kv_read") as cost:
            values = self.store.get_many(keys)
            cost.ops += len(keys)
            cost.bytes_read += sum(len(v) for v in values if v is not None)
        return values

    def _put_opened(self, entries: dict[str, bytes], ref: RequestRef) -> tuple[bool, bool]:
        """``_put(entries)`` then ``_opened([ref])``, in one round trip where the store can send both.

        Returns:
            Whether the entries were written, and whether the record was appended.

        """
        joint = getattr(self.store, "put_many_and_append", None)
        record = RequestOpened(ref.request_id, ref.user_id, ref.ts_ms, ref.n_items, self.fs.version)
        errors = None
        if joint is not None:
            with self.ledger.cpu("kv_write") as cost:
                errors = joint(entries, self.ttl_ms, self.bus, [record])
                if errors is not None and errors[0] is None:
                    cost.ops += len(entries)
                    cost.bytes_written += sum(len(v) for v in entries.values())
        if errors is None:  # apart
            written = self._put(entries)
            return written, self._opened([ref])
        put_error, bus_error = errors
        self.stats.requests += 1
        if bus_error is not None:
            self.stats.bus_failures += 1  # counted; unless sent again, this request will not be joined
        if put_error is not None:
            self.stats.write_failures += len(entries)
            return False, bus_error is None
        self.stats.entries_written += len(entries)
        return True, bus_error is None

    def _opened(self, refs: list[RequestRef]) -> bool:
        """Append the requests' records; False (counted) if the bus did not take them."""
        self.stats.requests += len(refs)
        try:
            self.bus.append_many(
                [RequestOpened(r.request_id, r.user_id, r.ts_ms, r.n_items, self.fs.version) for r in refs]
            )
        except (ConnectionError, OSError):
            self.stats.bus_failures += len(refs)  # counted; unless sent again, they will not be joined
            return False
        return True

    def tick(self) -> None:
        """Nothing held by default."""

    def ranked_items(self, ref: RequestRef) -> np.ndarray | None:
        """Nothing held by default: the join checks the items against the logged ranking."""
        return None


class EagerLogger(_Base):
    """Logs all ranked items at rank time, one entry per item with the request side repeated."""

    def log_ranked(self, refs: list[RequestRef], batch: RankedBatch) -> None:
        """One IMPRESSION entry per ranked item."""
        n = batch.n_items
        for b, ref in enumerate(refs):
            with self.ledger.cpu("serialize") as cost:
                blobs = codec.encode_impressions(
                    self.fs,
                    batch.item_ids[b],
                    batch.request.take(slice(b, b + 1)),
                    batch.items.take(slice(b * n, (b + 1) * n)),
                    batch.scores[b],
                )
                cost.ops += len(blobs)
                cost.bytes_serialized += sum(map(len, blobs))
            entries = {key(ref.request_id, f"i{p}"): blob for p, blob in enumerate(blobs)}
            if len(refs) == 1:  # one request (a sidecar's): its entries and its record at once
                if self._put_opened(entries, ref)[0]:
                    self.stats.count_logged(0, n)
                return
            if self._put(entries):
                self.stats.count_logged(0, n)
        self._opened(refs)

    def paginate(self, ref: RequestRef, seen_up_to: int) -> int:
        """Everything is logged already."""
        return 0

    def touch(self, ref: RequestRef, events: EventBatch) -> None:
        """Everything is logged already."""

    def keys(self, ref: RequestOpened) -> list[str]:
        """One key per ranked item."""
        return [key(ref.request_id, f"i{p}") for p in range(ref.n_items)]

    def fetch(self, ref: RequestOpened, positions: np.ndarray) -> Fetched:
        """Read the asked items' entries; each holds the request side too."""
        values = self._get([key(ref.request_id, f"i{p}") for p in positions])
        found = np.array([v is not None for v in values], bool)
        with self.ledger.cpu("deserialize"):
            decoded = codec.decode_impressions(self.fs, [v for v in values if v is not None])
        pos, ids, request, items, scores = decoded
        if not np.array_equal(pos, np.asarray(positions)[found]):
            raise codec.CodecError(f"request {ref.request_id}: entries hold other positions than their keys")
        return _scatter(found, ids, request.take(slice(0, 1)) if found.any() else None, items, scores)


def _scatter(
    found: np.ndarray,
    ids: np.ndarray,
    request: FeatureBlock | None,
    items: FeatureBlock,
    scores: np.ndarray,
) -> Fetched:
    """Place rows read for the found positions into arrays over all asked positions."""
    k = len(found)
    out_ids = np.full(k, -1, np.int64)
    out_ids[found] = ids
    out_scores = np.full(k, np.nan, np.float32)
    out_scores[found] = scores
    block = FeatureBlock(
        np.zeros((k, items.floats.shape[1]), np.float32), np.zeros((k, items.ints.shape[1]), np.int64)
    )
    block.floats[found] = items.floats
    block.ints[found] = items.ints
    return Fetched(found, out_ids, request, block, out_scores)


@dataclass
class RequestContext:
    """Frozen features of one ranked request, held until its pages are logged or it goes idle.

    Attributes:
        ref: The request.
        item_ids: ``(n,)`` ranked item ids.
        scores: ``(n,)`` float32 the ranker's scores (owned copy; NaN where it gave none).
        request: Request side, one row (owned copy).
        items: Item side, n rows (owned copy).
        logged: ``(pages,)`` bool, pages already in the store.
        touched_ms: Last time the client did anything with the request.
        request_logged: The request side is in the store.
        opened: Its RequestOpened record is on the bus (without it the request is not joined).

    """

    ref: RequestRef
    item_ids: np.ndarray
    scores: np.ndarray
    request: FeatureBlock
    items: FeatureBlock
    logged: np.ndarray
    touched_ms: int
    request_logged: bool = False
    opened: bool = True
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = (
            self.item_ids.nbytes
            + self.scores.nbytes
            + self.request.nbytes
            + self.items.nbytes
            + self.logged.nbytes
        )


@dataclass
class ContextStats:
    """What holding contexts costs and how they end."""

    held: int = 0
    bytes_held: int = 0
    peak_bytes: int = 0
    completed: int = 0  # every page logged
    expired: int = 0  # idle or past their age limit
    evicted: int = 0  # pushed out by the byte bound
    replaced: int = 0  # the same request id was logged again
    unopened: int = 0  # of those released, requests whose record never reached the bus: not joined


class ContextCache:
    """RequestContexts bounded in bytes and time; least recently touched go first.

    Every release charges bytes × seconds held to the ledger's ``context`` stage.

    Args:
        max_bytes: Bound on bytes held.
        idle_ms: A context untouched this long is released.
        max_age_ms: A context older than this is released (the attribution window).
        clock: Time source.
        ledger: Where the memory cost goes.

    """

    def __init__(
        self, max_bytes: int, idle_ms: int, max_age_ms: int, clock: Clock, ledger: CostLedger
    ) -> None:
        if max_bytes <= 0 or idle_ms <= 0 or max_age_ms <= 0:
            raise ValueError("context bounds must be positive")
        self.max_bytes, self.idle_ms, self.max_age_ms = max_bytes, idle_ms, max_age_ms
        self.clock, self.ledger = clock, ledger
        self._ctx: OrderedDict[str, RequestContext] = OrderedDict()
        self.stats = ContextStats()

    def __len__(self) -> int:
        return len(self._ctx)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ctx

    def add(self, ctx: RequestContext) -> None:
        """Hold a new context, evicting the least recently touched while over the byte bound."""
        self.release(ctx.ref.request_id, "replaced")  # a request logged twice replaces its context
        self._ctx[ctx.ref.request_id] = ctx
        self.stats.held += 1
        self.stats.bytes_held += ctx.nbytes
        while self.stats.bytes_held > self.max_bytes and self._ctx:
            rid = next(iter(self._ctx))
            self.release(rid, "evicted")
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.stats.bytes_held)

    def peek(self, request_id: str) -> RequestContext | None:
        """The context, or ``None`` if it is gone; not marked as touched."""
        return self._ctx.get(request_id)

    def get(self, request_id: str) -> RequestContext | None:
        """The context, marked as touched now, or ``None`` if it is gone."""
        ctx = self._ctx.get(request_id)
        if ctx is not None:
            ctx.touched_ms = self.clock.now_ms()
            self._ctx.move_to_end(request_id)
        return ctx

    def release(self, request_id: str, why: str) -> None:
        """Drop a context and charge its memory × time."""
        ctx = self._ctx.pop(request_id, None)
        if ctx is None:
            return
        held_s = (self.clock.now_ms() - ctx.ref.ts_ms) / 1000
        self.ledger.add("context", ops=1, byte_seconds_held=ctx.nbytes * held_s)
        self.stats.held -= 1
        self.stats.bytes_held -= ctx.nbytes
        self.stats.unopened += not ctx.opened
        setattr(self.stats, why, getattr(self.stats, why) + 1)

    def expire(self) -> int:
        """Release contexts idle for ``idle_ms`` or older than ``max_age_ms``."""
        now = self.clock.now_ms()
        stale = [
            rid
            for rid, c in self._ctx.items()
            if now - c.touched_ms >= self.idle_ms or now - c.ref.ts_ms >= self.max_age_ms
        ]
        for rid in stale:
            self.release(rid, "expired")
        return len(stale)


@dataclass
class _RowPlan:
    """What the shared rows referenced by one write need: bytes sent, or a TTL extension."""

    write_hashes: list[np.ndarray] = field(default_factory=list)
    write: dict[str, bytes] = field(default_factory=dict)
    extend_hashes: list[np.ndarray] = field(default_factory=list)
    extend_keys: list[str] = field(default_factory=list)
    extend_blobs: list[bytes] = field(default_factory=list)
    reused: int = 0


@dataclass
class _HeadRows:
    """A ranked batch's head pages and request sides as shared rows: hashes, and what to send.

    Attributes:
        items: ``(B, head)`` uint64 hashes of each request's head items.
        slow: ``(B,)`` uint64 hashes of each request's slowly changing features (None: it has none).
        fast: The request sides' other columns, B rows (None: no slowly changing features).
        plan: What the rows need.
        rows: The rows whose bytes must be sent, by key.

    """

    items: np.ndarray
    slow: np.ndarray | None
    fast: FeatureBlock | None
    plan: _RowPlan
    rows: dict[str, bytes]


class LazyLogger(_Base):
    """Logs the request side once and the head at rank time; later pages on signal or on touch.

    Args:
        fs: The FeatureSet.
        store: Where entries go.
        bus: Where RequestOpened records go.
        ledger: Cost counters.
        ttl_ms: TTL of every entry (attribution window plus grace).
        contexts: Holds frozen features of pages not logged yet.
        paging: Head and page sizes.
        lookahead: A signal ``seen_up_to=k`` logs the pages covering positions up to ``k + lookahead``.
        shared_rows: Store item rows and the request's slowly changing features once per distinct
            content, referenced by hash (see :mod:`leanrec.featurelog.rows`); off, today's layout.
        row_cache: With ``shared_rows``: the rows this logger knows it wrote (default 262,144 rows).
        row_slack_ms: With ``shared_rows``: a row a use must extend is extended this much past the
            request's TTL, so further uses within it send nothing (default: a quarter of the TTL).

    """

    def __init__(
        self,
        fs: FeatureSet,
        store: TransientStore,
        bus: EventBus,
        ledger: CostLedger,
        ttl_ms: int,
        contexts: ContextCache,
        paging: Paging = Paging(),
        lookahead: int = 2,
        shared_rows: bool = False,
        row_cache: RowCache | None = None,
        row_slack_ms: int | None = None,
    ) -> None:
        super().__init__(fs, store, bus, ledger, ttl_ms)
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead}")
        if row_slack_ms is not None and row_slack_ms < 0:
            raise ValueError(f"row_slack_ms must be >= 0, got {row_slack_ms}")
        self.contexts, self.paging, self.lookahead = contexts, paging, lookahead
        self.shared_rows = shared_rows
        self.row_cache = (row_cache or RowCache()) if shared_rows else None
        self.row_slack_ms = ttl_ms // 4 if row_slack_ms is None else row_slack_ms
        self._slow = codec.slow_columns(fs)
        self._unopened: set[str] = set()  # requests whose record the bus has not taken yet

    # ------------------------------------------------------------------------------ shared rows
    def _plan_rows(
        self, plan: _RowPlan, table: RowTable, hashes: np.ndarray, block: FeatureBlock, distinct: bool = True
    ) -> None:
        """Sort the rows of ``block`` by what they need, by the row cache; encode the needed.

        ``distinct``: the rows are known distinct (one request's items: their ids differ), so no
        ``unique`` pass is needed; a row named twice would only be sent twice, never lost.
        """
        if distinct:
            unique, first = hashes, np.arange(len(hashes))
        else:
            unique, first = np.unique(hashes, return_index=True)
        deadline = self.contexts.clock.now_ms() + self.ttl_ms
        expiry = self.row_cache.expiry(unique)  # type: ignore[union-attr]
        need = expiry < deadline  # alive past the request's TTL already: nothing to send
        plan.reused += int(len(unique) - need.sum())
        if not need.any():
            return
        blobs = codec.encode_rows(self.fs, table, block.take(first[need]))
        keys = row_keys(unique[need])
        known = expiry[need] > 0
        plan.write_hashes.append(unique[need][~known])
        plan.extend_hashes.append(unique[need][known])
        for k, blob, ext in zip(keys, blobs, known.tolist(), strict=True):
            if ext:
                plan.extend_keys.append(k)
                plan.extend_blobs.append(blob)
            else:
                plan.write[k] = blob

    def _with_rows(self, entries: dict[str, bytes], plan: _RowPlan | None) -> dict[str, bytes]:
        """Extend the rows the plan extends (a round trip), then the entries with the rows to send.

        The rows go first, so a pipelined write sets a row before the page that references it. An
        extension that finds its row gone (or a store that does not answer it) sends its bytes.
        """
        if plan is None:
            return entries
        self.stats.rows_reused += plan.reused
        if plan.extend_keys:
            with self.ledger.cpu("kv_write") as cost:
                try:
                    alive = self.store.touch_many(plan.extend_keys, self.ttl_ms + self.row_slack_ms)
                except (ConnectionError, OSError):
                    alive = [False] * len(plan.extend_keys)
                cost.ops += len(plan.extend_keys)
            hashes = np.concatenate(plan.extend_hashes)
            ok = np.array(alive, bool)
            expire_at = self.contexts.clock.now_ms() + self.ttl_ms + self.row_slack_ms
            self.row_cache.remember(hashes[ok], expire_at)  # type: ignore[union-attr]
            self.stats.rows_extended += int(ok.sum())
            self.stats.rows_rewritten += int((~ok).sum())
            for k, blob, a in zip(plan.extend_keys, plan.extend_blobs, alive, strict=True):
                if not a:
                    plan.write[k] = blob
            plan.write_hashes.append(hashes[~ok])
            plan.extend_keys, plan.extend_blobs, plan.extend_hashes = [], [], []
        return {**plan.write, **entries}

    def _rows_written(self, plan: _RowPlan | None, written: bool) -> None:
        """Remember the rows a write sent, once it took (a refused write leaves the cache as it was)."""
        if plan is None or not written or not plan.write:
            return
        hashes = np.concatenate(plan.write_hashes)
        self.row_cache.remember(hashes, self.contexts.clock.now_ms() + self.ttl_ms)  # type: ignore[union-attr]
        self.stats.rows_written += len(plan.write)

    def _encode_pages(
        self, ctx: RequestContext, pages: list[int], plan: _RowPlan | None = None
    ) -> dict[str, bytes]:
        if plan is not None:
            return self._encode_page_refs(ctx, pages, plan)
        out = {}
        with self.ledger.cpu("serialize") as cost:
            for page in pages:
                start, stop = self.paging.bounds(page, ctx.ref.n_items)
                out[key(ctx.ref.request_id, f"p{page}")] = codec.encode_page(
                    self.fs,
                    start,
                    ctx.item_ids[start:stop],
                    ctx.items.take(slice(start, stop)),
                    ctx.scores[start:stop],
                )
            cost.ops += len(out)
            cost.bytes_serialized += sum(map(len, out.values()))
        return out

    def _encode_page_refs(self, ctx: RequestContext, pages: list[int], plan: _RowPlan) -> dict[str, bytes]:
        """Pages that reference their items' shared rows; the rows go into ``plan``."""
        out = {}
        with self.ledger.cpu("serialize") as cost:
            bounds = [self.paging.bounds(page, ctx.ref.n_items) for page in pages]
            if all(a == b for (_, a), (b, _) in pairwise(bounds)):
                block = ctx.items.take(slice(bounds[0][0], bounds[-1][1]))  # consecutive pages: a view
            else:
                block = ctx.items.take(np.concatenate([np.arange(a, b) for a, b in bounds]))
            hashes = row_hashes(self.fs, RowTable.ITEM, block)
            at = 0
            for page, (start, stop) in zip(pages, bounds, strict=True):
                out[key(ctx.ref.request_id, f"p{page}")] = codec.encode_page_refs(
                    self.fs,
                    start,
                    ctx.item_ids[start:stop],
                    hashes[at : at + stop - start],
                    ctx.scores[start:stop],
                )
                at += stop - start
            self._plan_rows(plan, RowTable.ITEM, hashes, block, distinct=True)
            cost.ops += len(out) + len(plan.write) + len(plan.extend_keys)
            cost.bytes_serialized += sum(map(len, out.values())) + sum(map(len, plan.write.values()))
        return out

    def _encode_request(self, ctx: RequestContext, plan: _RowPlan | None = None) -> dict[str, bytes]:
        with self.ledger.cpu("serialize") as cost:
            if plan is None or not self._slow:
                blob = codec.encode_request(self.fs, ctx.request)
            else:
                slow = ctx.request.take_columns(self._slow.floats, self._slow.ints)
                fast = ctx.request.take_columns(self._slow.fast_floats, self._slow.fast_ints)
                hashes = row_hashes(self.fs, RowTable.SLOW, slow)
                blob = codec.encode_request_refs(self.fs, fast, int(hashes[0]))
                self._plan_rows(plan, RowTable.SLOW, hashes, slow)
            cost.ops += 1
            cost.bytes_serialized += len(blob)
        return {key(ctx.ref.request_id, "u"): blob}

    def _plan(self) -> _RowPlan | None:
        return _RowPlan() if self.shared_rows else None

    def _head_rows(self, batch: RankedBatch, head: int) -> _HeadRows:
        """The shared rows of a ranked batch's head pages and request sides, hashed and planned at once.

        One pass over the whole batch: hashing, the row cache and encoding cost a few numpy calls per
        batch rather than per request, and rows shared by several requests of the batch are sent once.
        """
        n, b = batch.n_items, len(batch)
        with self.ledger.cpu("serialize") as cost:
            plan = _RowPlan()
            block = batch.items.take((np.arange(b)[:, None] * n + np.arange(head)).ravel())
            items = row_hashes(self.fs, RowTable.ITEM, block)
            self._plan_rows(plan, RowTable.ITEM, items, block, distinct=b == 1)
            slow_hashes = fast = None
            if self._slow:
                slow = batch.request.take_columns(self._slow.floats, self._slow.ints)
                fast = batch.request.take_columns(self._slow.fast_floats, self._slow.fast_ints)
                slow_hashes = row_hashes(self.fs, RowTable.SLOW, slow)
                self._plan_rows(plan, RowTable.SLOW, slow_hashes, slow, distinct=b == 1)
            cost.ops += len(plan.write) + len(plan.extend_keys)
            cost.bytes_serialized += sum(map(len, plan.write.values()))
        rows = self._with_rows({}, plan)
        return _HeadRows(items.reshape(b, head), slow_hashes, fast, plan, rows)

    def _encode_head_refs(self, ctx: RequestContext, b: int, pre: _HeadRows) -> dict[str, bytes]:
        """Request ``b``'s request side and head page, referencing the rows ``pre`` planned."""
        head = pre.items.shape[1]
        rid = ctx.ref.request_id
        with self.ledger.cpu("serialize") as cost:
            if pre.slow is not None and pre.fast is not None:
                fast = pre.fast.take(slice(b, b + 1))
                u = codec.encode_request_refs(self.fs, fast, int(pre.slow[b]))
            else:
                u = codec.encode_request(self.fs, ctx.request)
            p0 = codec.encode_page_refs(self.fs, 0, ctx.item_ids[:head], pre.items[b], ctx.scores[:head])
            cost.ops += 2
            cost.bytes_serialized += len(u) + len(p0)
        return {key(rid, "u"): u, key(rid, "p0"): p0}

    def log_ranked(self, refs: list[RequestRef], batch: RankedBatch) -> None:
        """Hold each request's frozen features; write the request side and the head page."""
        n = batch.n_items
        now = self.contexts.clock.now_ms()
        pre = self._head_rows(batch, self.paging.bounds(0, n)[1]) if self.shared_rows else None
        rows_ok = True
        if pre is not None and len(refs) != 1:  # the batch's rows first, so every page finds its rows
            rows_ok = not pre.rows or self._put(pre.rows)
            self._rows_written(pre.plan, rows_ok)
        for b, ref in enumerate(refs):
            ctx = RequestContext(
                ref,
                batch.item_ids[b].copy(),
                np.array(batch.scores[b], np.float32),  # an owned copy, like the features
                batch.request.take(slice(b, b + 1)).copy(),
                batch.items.take(slice(b * n, (b + 1) * n)).copy(),
                np.zeros(self.paging.count(n), bool),
                now,
            )
            if pre is None:
                entries = {**self._encode_request(ctx), **self._encode_pages(ctx, [0])}
            else:
                entries = self._encode_head_refs(ctx, b, pre)
            if len(refs) == 1:  # one request (a sidecar's): its first entries and its record at once
                if pre is not None:
                    entries = {**pre.rows, **entries}
                written, ctx.opened = self._put_opened(entries, ref)
                if pre is not None:
                    self._rows_written(pre.plan, written)
            elif rows_ok:
                written = self._put(entries)
            else:  # the rows were refused: the pages stay held, and go (with their rows) later
                written = False
                self.stats.write_failures += len(entries)
            if written:
                ctx.logged[0] = ctx.request_logged = True
                self.stats.count_logged(*self.paging.bounds(0, n))
            self.contexts.add(ctx)
            if not ctx.opened:
                self._unopened.add(ref.request_id)
        if len(refs) != 1 and not self._opened(refs):
            for ref in refs:  # each is sent again, at its request's next call or the next tick
                ctx = self.contexts.peek(ref.request_id)
                if ctx is not None:
                    ctx.opened = False
                    self._unopened.add(ref.request_id)

    def _reopen(self, contexts: list[RequestContext]) -> None:
        """Append the records of requests whose record the bus did not take at rank time.

        A bus that failed over or came back takes them at the request's next call or the logger's
        next tick; until it does, each context is kept (it is the only copy of the record), and one
        released without it is counted unopened.
        """
        refs = [c.ref for c in contexts]
        try:
            self.bus.append_many(
                [RequestOpened(r.request_id, r.user_id, r.ts_ms, r.n_items, self.fs.version) for r in refs]
            )
        except (ConnectionError, OSError):
            return
        for ctx in contexts:
            ctx.opened = True
            self._unopened.discard(ctx.ref.request_id)
        self.stats.bus_resent += len(contexts)

    def _pages_todo(
        self, ref: RequestRef, pages: np.ndarray
    ) -> tuple[RequestContext, list[int], dict[str, bytes], _RowPlan | None] | None:
        """The request's context, its pages among ``pages`` not logged yet, their entries and rows.

        With shared rows, rows the pages reference that need only an extension are extended here
        (a round trip); the entries hold the rows whose bytes must go with them.
        """
        ctx = self.contexts.get(ref.request_id)
        if ctx is None:
            return None
        if not ctx.opened:
            self._reopen([ctx])
        logged = ctx.logged
        pages = pages[pages < len(logged)]
        if logged[pages].all():  # the usual call: every page it names is logged already
            return ctx, [], {}, None
        named = np.zeros(len(logged), bool)
        named[pages] = True
        todo = np.flatnonzero(named & ~logged).tolist()  # in page order, each once
        # A request side whose write failed at rank time (store down) goes with the next pages.
        plan = self._plan()
        request = {} if ctx.request_logged else self._encode_request(ctx, plan)
        entries = self._with_rows({**request, **self._encode_pages(ctx, todo, plan)}, plan)
        return ctx, todo, entries, plan

    def _log_pages(self, ref: RequestRef, pages: np.ndarray, counter: str) -> int:
        found = self._pages_todo(ref, pages)
        if found is None:
            return -1
        ctx, todo, entries, plan = found
        written = bool(todo) and self._put(entries)
        self._rows_written(plan, written)
        return self._pages_written(ctx, todo, written, counter)

    def _pages_written(self, ctx: RequestContext, todo: list[int], written: bool, counter: str) -> int:
        """Mark ``todo`` logged if ``written``; release a context left with nothing to log."""
        ref = ctx.ref
        if written:
            ctx.logged[todo] = True
            ctx.request_logged = True
            for page in todo:
                self.stats.count_logged(*self.paging.bounds(page, ref.n_items))
            setattr(self.stats, counter, getattr(self.stats, counter) + len(todo))
        if ctx.logged.all() and ctx.request_logged and ctx.opened:
            self.contexts.release(ref.request_id, "completed")
        return len(todo) if written else 0

    def paginate(self, ref: RequestRef, seen_up_to: int) -> int:
        """Log every page covering positions up to ``seen_up_to + lookahead``."""
        last = min(seen_up_to + self.lookahead, ref.n_items - 1)
        if last < 0:
            return 0
        pages = np.arange(int(self.paging.page_of(np.array([last]))[0]) + 1)
        logged = self._log_pages(ref, pages, "pages_on_signal")
        if logged < 0:
            self.stats.signals_after_release += 1
            return 0
        return logged

    def touch(self, ref: RequestRef, events: EventBatch) -> None:
        """Log-on-touch: log the page of every touched position that is not logged yet."""
        if len(events) == 0:
            return
        pages = self.paging.page_of(events.position)
        if self._log_pages(ref, pages, "pages_on_touch") < 0:
            self.stats.touch_after_release += len(events)

    def touch_and_append_once(self, ref: RequestRef, events: EventBatch, entry: OnceAppend) -> bool:
        """:meth:`touch`, then ``store.append_once([entry])``: one round trip where the store can.

        The touched pages' entries go first in the same write as the guarded append, so a page an
        event lands on is in the store before the event (log-on-touch); a page write the store
        refuses is counted and the events are appended all the same, as with ``touch`` apart.

        Returns:
            Whether the entry was appended (False: its token was taken before, a replay).

        Raises:
            ConnectionError, StoreFullError, OSError: The append did not take.

        """
        joint = getattr(self.store, "put_many_and_append_once", None)
        if joint is None or len(events) == 0:
            self.touch(ref, events)
            return self.store.append_once([entry], self.ttl_ms)[0]
        found = self._pages_todo(ref, self.paging.page_of(events.position))
        if found is None:
            self.stats.touch_after_release += len(events)
            return self.store.append_once([entry], self.ttl_ms)[0]
        ctx, todo, entries, plan = found
        if not todo:  # every touched page is logged already
            self._pages_written(ctx, todo, False, "pages_on_touch")
            return self.store.append_once([entry], self.ttl_ms)[0]
        with self.ledger.cpu("kv_write") as cost:
            try:
                answer = joint(entries, self.ttl_ms, [entry])
            except (ConnectionError, OSError):
                self.stats.write_failures += len(entries)  # the pages stay held for a later write
                raise
            if answer is not None and answer[0] is None:
                cost.ops += len(entries)
                cost.bytes_written += sum(len(v) for v in entries.values())
        if answer is None:  # apart
            written = self._put(entries)
            self._rows_written(plan, written)
            self._pages_written(ctx, todo, written, "pages_on_touch")
            return self.store.append_once([entry], self.ttl_ms)[0]
        put_error, appended = answer
        if put_error is None:
            self.stats.entries_written += len(entries)
        else:
            self.stats.write_failures += len(entries)  # counted, never raised: like a touch apart
        self._rows_written(plan, put_error is None)
        self._pages_written(ctx, todo, put_error is None, "pages_on_touch")
        return appended[0]

    def tick(self) -> None:
        """Send again the records the bus did not take, then release contexts that went idle."""
        if self._unopened:
            held = [self.contexts.peek(rid) for rid in self._unopened]
            self._unopened = {c.ref.request_id for c in held if c is not None and not c.opened}
            self._reopen([c for c in held if c is not None and not c.opened])
            for ctx in held:
                if ctx is not None and ctx.opened and ctx.logged.all() and ctx.request_logged:
                    self.contexts.release(ctx.ref.request_id, "completed")
        self.contexts.expire()

    def ranked_items(self, ref: RequestRef) -> np.ndarray | None:
        """The ranked item ids while the request's context is held (until its pages are all logged)."""
        ctx = self.contexts.peek(ref.request_id)
        if ctx is None or len(ctx.item_ids) != ref.n_items:
            return None
        return ctx.item_ids

    def keys(self, ref: RequestOpened) -> list[str]:
        """The request side and every page."""
        return [key(ref.request_id, "u")] + [
            key(ref.request_id, f"p{p}") for p in range(self.paging.count(ref.n_items))
        ]

    def fetch(self, ref: RequestOpened, positions: np.ndarray) -> Fetched:
        """Read the request side and the pages covering ``positions``, then the shared rows they name.

        Either layout reads back, by each blob's kind: plain pages and request sides in one round
        trip; pages and a request side that reference shared rows take a second one, for the rows of
        the asked positions only (on a cluster, sent to the shards the rows live on at once). A row
        not found (expired or evicted) leaves its position not found, as a missing page does; a
        missing row of slowly changing features leaves the request side not found.
        """
        positions = np.asarray(positions)
        pages = np.unique(self.paging.page_of(positions)).tolist()
        values = self._get([key(ref.request_id, "u")] + [key(ref.request_id, f"p{p}") for p in pages])
        lay = self.fs.layout(Side.ITEM)
        empty = lay.zeros()
        none = np.empty(0, np.float32)
        missing = _scatter(np.zeros(len(positions), bool), np.empty(0, np.int64), None, empty, none)
        if values[0] is None:
            return missing
        slow_hash: int | None = None
        with self.ledger.cpu("deserialize"):
            if codec.blob_kind(values[0]) == BlobKind.REQUEST_REFS:
                slow_hash, fast = codec.decode_request_refs(self.fs, values[0])
                request = None
            else:
                request = codec.decode_request(self.fs, values[0])
            blobs = [v for v in values[1:] if v is not None]
            refs = [codec.blob_kind(v) == BlobKind.PAGE_REFS for v in blobs]
            decoded = [
                codec.decode_page_refs(self.fs, v) if r else codec.decode_page(self.fs, v)
                for v, r in zip(blobs, refs, strict=True)
            ]
        row_of = np.full(ref.n_items, -1, np.int64)
        base = 0
        for page in decoded:
            row_of[page.first_position : page.first_position + len(page.item_ids)] = np.arange(
                base, base + len(page.item_ids)
            )
            base += len(page.item_ids)
        rows = row_of[positions]
        found = rows >= 0
        take = rows[found]
        if not decoded and slow_hash is None:
            return _scatter(found, np.empty(0, np.int64), request, empty, none)
        sizes = [len(p.item_ids) for p in decoded]
        ids = np.concatenate([p.item_ids for p in decoded]) if decoded else np.empty(0, np.int64)
        scores = np.concatenate([p.scores for p in decoded]) if decoded else none
        is_ref = np.repeat(np.array(refs, bool), sizes)[take]
        items = lay.zeros(len(take))
        plain = [p for p, r in zip(decoded, refs, strict=True) if not r]
        if plain:  # rows of plain pages, numbered among the plain pages' rows
            plain_row = np.cumsum(~np.repeat(np.array(refs, bool), sizes)) - 1
            block = FeatureBlock.concat([p.block for p in plain])  # type: ignore[union-attr]
            items.floats[~is_ref] = block.floats[plain_row[take[~is_ref]]]
            items.ints[~is_ref] = block.ints[plain_row[take[~is_ref]]]
        keep = np.ones(len(take), bool)
        if is_ref.any() or slow_hash is not None:
            hashes = np.zeros(len(ids), np.uint64)
            at = 0
            for page, size, r in zip(decoded, sizes, refs, strict=True):
                if r:
                    hashes[at : at + size] = page.row_hashes  # type: ignore[union-attr]
                at += size
            wanted = hashes[take[is_ref]]
            unique = np.unique(wanted)
            slow_key = row_keys(np.array([slow_hash], np.uint64)) if slow_hash is not None else []
            got = self._get(row_keys(unique) + slow_key)
            with self.ledger.cpu("deserialize"):
                if slow_hash is not None:
                    if got[-1] is None:
                        return missing  # the request side is not whole: as if it were gone
                    slow = codec.decode_rows(self.fs, RowTable.SLOW, [got[-1]])
                    request = codec.join_request(self.fs, fast, slow)
                    got = got[:-1]
                present = np.array([v is not None for v in got], bool)
                shared = codec.decode_rows(self.fs, RowTable.ITEM, [v for v in got if v is not None])
            index = np.full(len(unique), -1, np.int64)
            index[present] = np.arange(int(present.sum()))
            row = index[np.searchsorted(unique, wanted)]
            at_ref = np.flatnonzero(is_ref)
            items.floats[at_ref[row >= 0]] = shared.floats[row[row >= 0]]
            items.ints[at_ref[row >= 0]] = shared.ints[row[row >= 0]]
            keep[at_ref[row < 0]] = False  # the row is gone: counted as a missing page would be
            found[np.flatnonzero(found)[~keep]] = False
        return _scatter(found, ids[take][keep], request, items.take(keep), scores[take][keep])
