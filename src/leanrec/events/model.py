"""The event model: what a client reports about a ranked list, and how it is validated.

Events travel in batches, one batch per request, as columns (position, item id, kind, time, value),
so validation is a handful of vectorised checks rather than a loop per event. A bad event is
refused with a reason and counted; the rest of its batch goes on.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from leanrec.ids import string_ids


class EventKind(IntEnum):
    """What the user did with a ranked item."""

    VIEW = 0
    CLICK = 1
    LIKE = 2
    SHARE = 3
    HIDE = 4
    WATCH = 5  # value: watch time in milliseconds


_EVENTS_MAGIC = b"LE"
_EVENTS_HEADER = struct.Struct("<2sBIH")

LABELS: tuple[str, ...] = ("click", "like", "share", "hide", "watch_ms")
"""Per-item labels a join produces; boolean flags and the longest watch time."""


@dataclass(frozen=True)
class RequestRef:
    """What the client holds about a ranked request and presents with later calls.

    Attributes:
        request_id: Id of the request.
        user_id: Who it was ranked for.
        ts_ms: When it was ranked.
        n_items: Length of the ranked list.

    """

    request_id: str
    user_id: int
    ts_ms: int
    n_items: int


@dataclass
class EventBatch:
    """Events of one request as columns, all of length n.

    Attributes:
        request_id: The request the events are about.
        position: ``(n,)`` int32 rank position (0-based).
        item_id: ``(n,)`` int64 item shown at that position (the catalog's raw id).
        kind: ``(n,)`` int8 :class:`EventKind`.
        ts_ms: ``(n,)`` int64 client time of the event.
        value: ``(n,)`` float32 (watch milliseconds for WATCH, else 0).

    """

    request_id: str
    position: np.ndarray
    item_id: np.ndarray
    kind: np.ndarray
    ts_ms: np.ndarray
    value: np.ndarray

    def __len__(self) -> int:
        return len(self.position)

    def take(self, mask: np.ndarray) -> EventBatch:
        """The events where ``mask`` holds."""
        return EventBatch(
            self.request_id,
            self.position[mask],
            self.item_id[mask],
            self.kind[mask],
            self.ts_ms[mask],
            self.value[mask],
        )

    def to_bytes(self) -> bytes:
        """Compact encoding: a header, the request id, then each column as a raw little-endian buffer.

        Version 2 (written) holds item ids as int64; version 1 (still read) held them as int32.
        """
        rid = self.request_id.encode()
        head = _EVENTS_HEADER.pack(_EVENTS_MAGIC, 2, len(self), len(rid))
        cols = (
            self.position.astype("<i4"),
            self.item_id.astype("<i8"),
            self.kind.astype("i1"),
            self.ts_ms.astype("<i8"),
            self.value.astype("<f4"),
        )
        return b"".join((head, rid, *(c.tobytes() for c in cols)))

    @classmethod
    def from_bytes(cls, blob: bytes) -> EventBatch:
        """Inverse of :meth:`to_bytes`.

        Raises:
            ValueError: If the blob is not an event batch of this encoding.

        """
        if len(blob) < _EVENTS_HEADER.size:
            raise ValueError(f"event blob of {len(blob)} B is shorter than its header")
        magic, version, n, rid_len = _EVENTS_HEADER.unpack_from(blob)
        if magic != _EVENTS_MAGIC or version not in (1, 2):
            raise ValueError(f"not an event batch blob (magic {magic!r}, version {version})")
        item = np.dtype("<i8" if version >= 2 else "<i4")
        dtypes = (np.dtype("<i4"), item, np.dtype("i1"), np.dtype("<i8"), np.dtype("<f4"))
        expect = _EVENTS_HEADER.size + rid_len + n * sum(d.itemsize for d in dtypes)
        if len(blob) != expect:
            raise ValueError(f"event blob of {n} events is {len(blob)} B, expected {expect} B")
        off = _EVENTS_HEADER.size
        rid = blob[off : off + rid_len].decode()
        off += rid_len
        cols = []
        for dtype in dtypes:
            cols.append(np.frombuffer(blob, dtype, n, off))
            off += n * dtype.itemsize
        cols[1] = cols[1].astype("<i8", copy=False)
        return cls(rid, *cols)

    @staticmethod
    def concat(request_id: str, batches: Sequence[EventBatch]) -> EventBatch:
        """All events of several batches of one request."""
        cols = ("position", "item_id", "kind", "ts_ms", "value")
        dtypes = (np.int32, np.int64, np.int8, np.int64, np.float32)
        return EventBatch(
            request_id,
            *(
                np.concatenate([getattr(b, c) for b in batches]) if batches else np.empty(0, dt)
                for c, dt in zip(cols, dtypes, strict=True)
            ),
        )

    @classmethod
    def from_records(
        cls, request_id: str, records: Sequence[Mapping[str, object]], string_items: bool = False
    ) -> tuple[EventBatch, list[str]]:
        """Build a batch from JSON-like records, refusing the malformed ones with a reason each.

        A record needs ``position`` (int), ``item_id`` (a 64-bit int; or, with ``string_items``, a
        string, hashed by :func:`leanrec.ids.string_ids`), ``kind`` (a name of :class:`EventKind`,
        case-insensitive), ``ts_ms`` (int) and, for ``watch``, ``value`` (milliseconds).

        Returns:
            The batch of well-formed records, and one message per refused record.

        """
        keep: list[tuple[int, int, int, int, float]] = []
        errors: list[str] = []
        for i, rec in enumerate(records):
            try:
                if not isinstance(rec, Mapping):
                    raise ValueError(f"expected an object, got {type(rec).__name__}")
                kind_name = str(rec["kind"]).upper()
                if kind_name not in EventKind.__members__:
                    raise ValueError(
                        f"unknown kind {rec['kind']!r}; known: {[k.name.lower() for k in EventKind]}"
                    )
                item = rec["item_id"]
                if string_items and isinstance(item, str):
                    item = int(string_ids([item])[0])
                fields_ = (rec["position"], item, rec["ts_ms"])
                if not all(isinstance(v, int) and not isinstance(v, bool) for v in fields_):
                    raise ValueError(
                        "position, item_id and ts_ms must be integers"
                        + (" (item_id may be a string)" if string_items else "")
                    )
                if not -(2**31) <= fields_[0] < 2**31:
                    raise ValueError("position must fit in 32 bits")  # never wrap around
                if not (-(2**63) <= fields_[1] < 2**63 and -(2**63) <= fields_[2] < 2**63):
                    raise ValueError("item_id and ts_ms must fit in 64 bits")
                value = rec.get("value", 0.0)
                if not isinstance(value, int | float) or isinstance(value, bool):
                    raise ValueError("value must be a number")
                keep.append(
                    (
                        int(rec["position"]),
                        int(item),
                        EventKind[kind_name],
                        int(rec["ts_ms"]),
                        float(value),
                    )
                )
            except KeyError as exc:
                errors.append(f"event {i}: missing field {exc.args[0]!r}")
            except (ValueError, TypeError, OverflowError) as exc:
                errors.append(f"event {i}: {exc}")
        cols = list(zip(*keep, strict=True)) if keep else [[], [], [], [], []]
        try:
            batch = cls(
                request_id,
                np.asarray(cols[0], np.int64).astype(np.int32),
                np.asarray(cols[1], np.int64),
                np.asarray(cols[2], np.int8),
                np.asarray(cols[3], np.int64),
                np.asarray(cols[4], np.float32),
            )
        except OverflowError as exc:
            raise ValueError(f"event field out of range: {exc}") from None
        return batch, errors


@dataclass
class EventLimits:
    """What an event batch may hold.

    Attributes:
        max_events: Events in one batch.
        window_ms: Attribution window after the ranking; events that happened later are late.
        lateness_ms: How long after the window a batch may still arrive; after that the request is
            being joined and the batch is refused.
        max_watch_ms: Longest plausible watch time.

    """

    max_events: int = 1_000
    window_ms: int = 600_000
    lateness_ms: int = 60_000
    max_watch_ms: float = 3_600_000.0


@dataclass
class ValidationReport:
    """Counts of refused events by reason, and one message per reason."""

    refused: Counter[str] = field(default_factory=Counter)
    messages: dict[str, str] = field(default_factory=dict)

    def refuse(self, reason: str, count: int, message: str) -> None:
        """Record ``count`` events refused for ``reason``."""
        if count:
            self.refused[reason] += count
            self.messages.setdefault(reason, message)

    @property
    def total(self) -> int:
        """Events refused in all."""
        return sum(self.refused.values())


_KNOWN_KIND = np.zeros(256, bool)
_KNOWN_KIND[[int(k) for k in EventKind]] = True
"""Whether each int8 value (read as uint8) is an EventKind."""


def validate(batch: EventBatch, ref: RequestRef, limits: EventLimits) -> tuple[EventBatch, ValidationReport]:
    """Keep the events that can be joined; refuse and count the rest.

    Checks: the batch size, the kind, the position inside the ranked list, the time inside the
    attribution window, and the value (finite, non-negative, plausible). The item id is checked
    against the ranked list by the service where it still holds it
    (:class:`~leanrec.serve.service.LoggingService`), and at join time against the logged ranking.
    """
    report = ValidationReport()
    if batch.request_id != ref.request_id:
        report.refuse(
            "wrong_request", len(batch), f"events of {batch.request_id} presented for {ref.request_id}"
        )
        return batch.take(np.zeros(len(batch), bool)), report
    if len(batch) > limits.max_events:
        report.refuse("too_many", len(batch), f"{len(batch)} events in one batch, limit {limits.max_events}")
        return batch.take(np.zeros(len(batch), bool)), report
    ok = np.ones(len(batch), bool)
    checks = (
        (
            "unknown_kind",
            ~_KNOWN_KIND[batch.kind.astype(np.uint8)],  # a table lookup: np.isin costs more here
            "kind is not one of view, click, like, share, hide, watch",
        ),
        (
            "bad_position",
            (batch.position < 0) | (batch.position >= ref.n_items),
            f"position outside the ranked list of {ref.n_items}",
        ),
        ("before_rank", batch.ts_ms < ref.ts_ms, "event time before the ranking"),
        (
            "late",
            batch.ts_ms > ref.ts_ms + limits.window_ms,
            f"event time after the attribution window of {limits.window_ms} ms",
        ),
        (
            "bad_value",
            ~np.isfinite(batch.value) | (batch.value < 0) | (batch.value > limits.max_watch_ms),
            f"value must be finite, >= 0 and <= {limits.max_watch_ms:.0f}",
        ),
    )
    if not np.logical_or.reduce([bad for _, bad, _ in checks]).any():
        return batch, report  # the usual batch: nothing to refuse, nothing to copy
    for reason, bad, message in checks:
        bad = bad & ok
        report.refuse(reason, int(bad.sum()), message)
        ok &= ~bad
    return batch.take(ok), report
