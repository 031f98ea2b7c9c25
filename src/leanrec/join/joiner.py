"""LabelJoiner: joins frozen features with the engagement that followed, when the window closes.

It consumes the event bus, whose RequestOpened records are the units of work (several workers in
one consumer group split them): each schedules its request's join at the end of the attribution
window. Event batches wait in the transient store beside the frozen features (``lr:{id}:ev``), so
whichever worker joins a request finds everything it needs there. At the join every viewed item
(any event at its position) becomes one example, with no engagement meaning a negative;
never-viewed items are dropped. Labels are flags and a maximum, so duplicate and out-of-order
events give the same record. Each example keeps the score the ranker gave its item, as it was
logged with the features.
Messages are acknowledged, and transient entries deleted, only after the warehouse has committed
the records made from them.

A record the joiner cannot read (a request logged under another FeatureSet, a corrupt or truncated
blob, an event batch or a bus entry that does not decode) is set aside in the dead letters with the
reason and counted, and joining goes on (see :mod:`leanrec.join.deadletter`); it too is
acknowledged, and its entries deleted, only once the dead letters are committed.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from leanrec.clock import Clock
from leanrec.energy.ledger import CostLedger
from leanrec.events.bus import EventBus, RequestOpened, Undecodable
from leanrec.events.model import EventBatch, EventKind
from leanrec.featurelog.codec import ForeignBlobError
from leanrec.featurelog.loggers import FeatureLogger, Fetched, key
from leanrec.join.deadletter import DeadKind, DeadLetter, DeadLetters, MemoryDeadLetters
from leanrec.warehouse.records import RequestRecord

PROGRESS_EVERY = 64
"""Requests joined between two progress reports."""

_FLAGS = (
    ("click", EventKind.CLICK),
    ("like", EventKind.LIKE),
    ("share", EventKind.SHARE),
    ("hide", EventKind.HIDE),
)


class RecordSink(Protocol):
    """Where joined records go (a warehouse writer)."""

    def append(self, records: Sequence[RequestRecord]) -> None:
        """Buffer records."""
        ...

    def flush(self) -> list[str]:
        """Commit buffered records durably; returns what was committed."""
        ...

    def committed(self, request_ids: Sequence[str]) -> set[str]:
        """Which of these requests are already committed (recovery after a crash)."""
        ...


@dataclass
class JoinStats:
    """Counters of a joiner."""

    requests_joined: int = 0
    examples: int = 0
    positives: int = 0
    labels_lost: int = 0  # a viewed item whose frozen features were not found
    requests_without_features: int = 0  # the request side itself was gone (expired or never written)
    events_joined: int = 0
    duplicate_events: int = 0
    mismatched_events: int = 0  # item id differs from the one logged at that position
    malformed_messages: int = 0  # bus entries that are not RequestOpened records
    malformed_event_blobs: int = 0  # stored event batches that do not decode
    recovered_committed: int = 0  # taken over after a crash, found already in the warehouse
    outages: int = 0  # times Redis stopped answering mid-work (the worker waited and went on)
    dead_letters: int = 0  # records set aside because they cannot be read
    dead_letters_by_kind: dict[str, int] = field(default_factory=dict)  # DeadKind value -> count

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready counters."""
        return asdict(self)


@dataclass
class _Open:
    ref: RequestOpened
    message_ids: list[str]


class LabelJoiner:
    """Joins requests whose attribution window has closed.

    Args:
        logger: Knows how the request's features were logged and reads them back.
        bus: Source of RequestOpened records and event batches.
        sink: Warehouse writer for the records.
        ledger: Cost counters.
        clock: Time source.
        window_ms: Attribution window after the ranking.
        lateness_ms: Extra wait after the window for event batches still in flight.
        settle_ms: Wait after the lateness, so that a batch accepted at the deadline has landed.
        remember_ms: How long a joined request id is remembered, so a redelivered record is not joined again.
        dead_letters: Where records that cannot be read are set aside (in the process if not given).

    """

    def __init__(
        self,
        logger: FeatureLogger,
        bus: EventBus,
        sink: RecordSink,
        ledger: CostLedger,
        clock: Clock,
        window_ms: int,
        lateness_ms: int = 0,
        remember_ms: int | None = None,
        settle_ms: int = 2_000,
        dead_letters: DeadLetters | None = None,
    ) -> None:
        self.logger, self.bus, self.sink, self.ledger, self.clock = logger, bus, sink, ledger, clock
        self.window_ms, self.lateness_ms, self.settle_ms = window_ms, lateness_ms, settle_ms
        self.remember_ms = remember_ms if remember_ms is not None else 2 * window_ms
        self.dead_letters = dead_letters if dead_letters is not None else MemoryDeadLetters()
        self.stats = JoinStats()
        self._open: dict[str, _Open] = {}
        self._due: list[tuple[int, str]] = []
        self._joined: dict[str, int] = {}
        self._ack: list[str] = []
        self._delete: list[str] = []

    def _set_aside(self, letter: DeadLetter) -> None:
        """Buffer a dead letter, committed by the next flush, before any acknowledgement."""
        self.dead_letters.append([letter])
        self.stats.dead_letters += 1
        by_kind, kind = self.stats.dead_letters_by_kind, str(letter.kind)
        by_kind[kind] = by_kind.get(kind, 0) + 1

    def _schedule(self, mid: str, msg: object) -> None:
        if not isinstance(msg, RequestOpened):
            self.stats.malformed_messages += 1
            if isinstance(msg, Undecodable):
                raw, reason = msg.fields, msg.reason
            else:  # an object an in-process producer put on the bus
                blob = msg.to_bytes() if isinstance(msg, EventBatch) else repr(msg).encode()
                raw, reason = ((type(msg).__name__.encode(), blob),), f"a {type(msg).__name__}"
            fields = tuple((k.decode("utf-8", "surrogateescape"), v) for k, v in raw)
            named = dict(fields).get("request_id", b"").decode("utf-8", "replace") or None
            self._set_aside(
                DeadLetter(
                    DeadKind.BUS_MESSAGE,
                    f"bus entry {mid} is not a RequestOpened record: {reason}",
                    self.clock.now_ms(),
                    request_id=named,
                    message_id=mid,
                    raw=fields,
                )
            )
            self._ack.append(mid)  # by the next flush, after the dead letter is committed
            return
        state = self._open.get(msg.request_id)
        if state is not None:  # delivered again while waiting: acknowledged with the first, after the commit
            if mid not in state.message_ids:
                state.message_ids.append(mid)
            return
        if msg.request_id in self._joined:
            self._ack.append(mid)  # already joined: acknowledged by the next flush, after the commit
            return
        self._open[msg.request_id] = _Open(msg, [mid])
        due = msg.ts_ms + self.window_ms + self.lateness_ms + self.settle_ms
        heapq.heappush(self._due, (due, msg.request_id))

    def _keys(self, ref: RequestOpened) -> list[str]:
        """Every transient key of a request: frozen features, event batches and their replay guard."""
        return [*self.logger.keys(ref), key(ref.request_id, "ev"), key(ref.request_id, "seen")]

    def poll(self, max_count: int = 100_000) -> int:
        """Take new RequestOpened records from the bus and schedule their joins; returns how many."""
        messages = self.bus.consume(max_count)
        with self.ledger.cpu("join") as cost:
            cost.ops += len(messages)
            for mid, msg in messages:
                self._schedule(mid, msg)
        return len(messages)

    def recover(self) -> int:
        """Take over pending records (this worker's before a crash, or a dead worker's) and reschedule.

        A request the warehouse already holds was committed before the crash and only its
        acknowledgement was lost: it is acknowledged, not joined again, so no record is written twice.
        Returns how many records were taken over: records this worker already holds (open requests
        waiting for their window, acknowledgements waiting for a commit) come back from the bus too,
        since they are pending until acknowledged, and are not counted again.
        """
        held = {mid for state in self._open.values() for mid in state.message_ids} | set(self._ack)
        pending = self.bus.claim_pending()
        opened = [(mid, m) for mid, m in pending if isinstance(m, RequestOpened)]
        done = self.sink.committed([m.request_id for _, m in opened]) if opened else set()
        committed_ids, committed_keys = [], []
        for mid, msg in pending:
            if isinstance(msg, RequestOpened) and msg.request_id in done and msg.request_id not in self._open:
                committed_ids.append(mid)
                committed_keys.extend(self._keys(msg))
                self.stats.recovered_committed += 1
            else:
                self._schedule(mid, msg)
        if committed_ids:  # safe now: their records are in the warehouse
            self.bus.ack(committed_ids)
            self.logger.store.delete_many(committed_keys)
        return sum(mid not in held for mid, _ in pending)

    def join_due(self, force: bool = False, progress: Callable[[int], None] | None = None) -> int:
        """Join every request whose window has closed (all open requests if ``force``).

        Args:
            force: Join every open request, whatever its window.
            progress: Called with the number of requests joined since its last call, every
                ``PROGRESS_EVERY`` requests and once at the end (a round may join thousands).

        """
        now = self.clock.now_ms()
        records: list[RequestRecord] = []
        joined = reported = 0
        while self._due and (force or self._due[0][0] <= now):
            due, rid = heapq.heappop(self._due)
            state = self._open.pop(rid)
            try:
                record = self._join(state)
            except ConnectionError:  # the store went away: keep the request open, and what was joined
                self._open[rid] = state
                heapq.heappush(self._due, (due, rid))
                if records:
                    self.sink.append(records)
                raise
            joined += 1
            if record is not None:
                records.append(record)
            if progress and joined - reported >= PROGRESS_EVERY:
                progress(joined - reported)
                reported = joined
        if progress and joined > reported:
            progress(joined - reported)
        if records:
            self.sink.append(records)
        while self._joined:  # insertion order is join order, so the oldest come first
            rid, t = next(iter(self._joined.items()))
            if now - t <= self.remember_ms:
                break
            del self._joined[rid]
        return joined

    def _fetch(self, state: _Open, positions: np.ndarray, ev_chunks: list[bytes]) -> Fetched | None:
        """The frozen features of ``positions``, or ``None`` once a request that cannot be read is set aside.

        A request logged under another FeatureSet, or with a blob that does not decode, goes to the
        dead letters whole: every transient entry it has and its event batches, raw, with the reason.
        """
        ref, fs = state.ref, self.logger.fs
        if ref.fs_version != fs.version:
            kind = DeadKind.FEATURESET
            reason = f"logged under FeatureSet v{ref.fs_version}, this joiner reads {fs.name} v{fs.version}"
        else:
            try:
                return self.logger.fetch(ref, np.unique(positions))
            except ForeignBlobError as exc:
                kind, reason = DeadKind.FEATURESET, str(exc)
            except (ValueError, IndexError) as exc:  # CodecError, or a header whose numbers do not fit
                kind, reason = DeadKind.CORRUPT_BLOB, str(exc) or type(exc).__name__
        keys = self.logger.keys(ref)
        values = self.logger.store.get_many(keys)
        raw = [(k, v) for k, v in zip(keys, values, strict=True) if v is not None]
        raw += [(key(ref.request_id, "ev"), chunk) for chunk in ev_chunks]
        now = self.clock.now_ms()
        self._set_aside(
            DeadLetter(
                kind,
                reason,
                now,
                ref.request_id,
                state.message_ids[0],
                ref,
                tuple(raw),
            )
        )
        self._ack.extend(state.message_ids)
        self._delete.extend(self._keys(ref))
        self._joined[ref.request_id] = now
        return None

    def _join(self, state: _Open) -> RequestRecord | None:
        ref = state.ref
        ev_key = key(ref.request_id, "ev")
        chunks = self.logger.store.get_lists_many([ev_key])[0]
        batches, bad = [], []
        for blob in chunks:
            try:
                batches.append(EventBatch.from_bytes(blob))
            except ValueError as exc:
                bad.append((blob, str(exc)))
        ev = EventBatch.concat(ref.request_id, batches)
        # A client presents its own RequestRef: positions past the list that was ranked name no item.
        off_list = (ev.position < 0) | (ev.position >= ref.n_items)
        fetched = self._fetch(state, ev.position[~off_list], chunks)
        if fetched is None:
            return None
        for blob, why in bad:  # the rest of the request joins
            self.stats.malformed_event_blobs += 1
            self._set_aside(
                DeadLetter(
                    DeadKind.EVENT_BLOB,
                    f"event batch does not decode: {why}",
                    self.clock.now_ms(),
                    ref.request_id,
                    state.message_ids[0],
                    ref,
                    ((ev_key, blob),),
                )
            )
        self.stats.events_joined += len(ev)
        keys = np.stack([ev.position.astype(np.int64), ev.kind.astype(np.int64), ev.ts_ms])
        self.stats.duplicate_events += len(ev) - (np.unique(keys, axis=1).shape[1] if len(ev) else 0)
        self.stats.mismatched_events += int(off_list.sum())
        ev = ev.take(~off_list)
        with self.ledger.cpu("join") as cost:
            viewed = np.unique(ev.position)
            # Events naming another item than the one logged at their position are refused. Ids are
            # raw int64 of any sign, so where an item was logged is a mask of its own.
            logged_id = np.zeros(ref.n_items, np.int64)
            logged = np.zeros(ref.n_items, bool)
            logged_id[viewed[fetched.found]] = fetched.item_ids[fetched.found]
            logged[viewed[fetched.found]] = True
            mismatch = logged[ev.position] & (logged_id[ev.position] != ev.item_id)
            self.stats.mismatched_events += int(mismatch.sum())
            ev = ev.take(~mismatch)
            keep = np.isin(viewed, ev.position)
            self.stats.labels_lost += int((keep & ~fetched.found).sum())
            keep &= fetched.found
            positions = viewed[keep]
            idx = np.searchsorted(positions, ev.position)
            on = np.isin(ev.position, positions)
            idx, kind, ts, value = idx[on], ev.kind[on], ev.ts_ms[on], ev.value[on]
            labels: dict[str, np.ndarray] = {}
            for name, k in _FLAGS:
                flag = np.zeros(len(positions), bool)
                flag[idx[kind == k]] = True
                labels[name] = flag
            watch = np.zeros(len(positions), np.int64)
            np.maximum.at(
                watch, idx[kind == EventKind.WATCH], value[kind == EventKind.WATCH].astype(np.int64)
            )
            labels["watch_ms"] = watch.astype(np.int32)
            view_ms = np.full(len(positions), np.iinfo(np.int64).max, np.int64)
            np.minimum.at(view_ms, idx, ts)
            cost.ops += 1
        self.stats.requests_joined += 1
        self.stats.examples += len(positions)
        self.stats.positives += int(labels["click"].sum())
        self._ack.extend(state.message_ids)
        self._delete.extend(self._keys(ref))
        self._joined[ref.request_id] = self.clock.now_ms()
        if fetched.request is None and len(viewed):
            self.stats.requests_without_features += 1
        if fetched.request is None or len(positions) == 0:
            return None  # no example: nothing for the warehouse (both layouts agree on that)
        return RequestRecord(
            ref.request_id,
            ref.user_id,
            ref.ts_ms,
            ref.fs_version,
            fetched.request,
            positions.astype(np.int32),
            fetched.item_ids[keep],
            view_ms,
            fetched.items.take(keep),
            labels,
            fetched.scores[keep],
        )

    def flush(self) -> list[str]:
        """Commit the sink and the dead letters, then acknowledge messages and delete requests' entries."""
        committed = self.sink.flush()
        self.dead_letters.flush()
        if self._ack:
            self.bus.ack(self._ack)
            self._ack = []
        if self._delete:
            with self.ledger.cpu("kv_delete") as cost:
                cost.ops += len(self._delete)
                self.logger.store.delete_many(self._delete)
            self._delete = []
        return committed

    def drain(self) -> None:
        """Join everything still open, whatever its window, and commit (shutdown)."""
        self.poll()
        self.join_due(force=True)
        self.flush()

    @property
    def open_requests(self) -> int:
        """Requests waiting for their window to close."""
        return len(self._open)

    @property
    def next_due_ms(self) -> int | None:
        """When the earliest open request is due (window, lateness and settling); ``None`` if none is open."""
        return self._due[0][0] if self._due else None

    @property
    def unflushed(self) -> bool:
        """Whether a flush has acknowledgements or deletions to make (joined or set-aside records)."""
        return bool(self._ack or self._delete)
