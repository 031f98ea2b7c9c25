"""RedisEventBus: the EventBus protocol on a Redis Stream read by a consumer group.

The bus carries :class:`~leanrec.events.bus.RequestOpened` records only, the joiner's unit of work;
event batches travel through the transient store. Each record is one stream entry with one field per
attribute, so it can be read with ``redis-cli XRANGE`` and written by any client.

How the EventBus operations map onto Redis:

* ``append_many``: ``XADD stream MAXLEN ~ maxlen * field value ...`` per record, sent at once. The stream is
  bounded: Redis drops the oldest entries once it holds about ``maxlen`` (``~`` lets it trim whole
  internal nodes only, which is cheap, so the length stays between ``maxlen`` and ``maxlen`` plus the
  server's ``stream-node-max-entries``, 100 by default). An entry trimmed before the group read it is
  lost; one trimmed while pending comes back from :meth:`RedisEventBus.claim_pending` without its
  fields and is counted in ``trimmed``. Size ``maxlen`` to hold far more than the joiners' backlog.
* ``consume``: ``XREADGROUP GROUP group consumer COUNT n STREAMS stream >`` (new entries only, without
  blocking). The group is created at the start of the stream (``XGROUP CREATE ... 0 MKSTREAM``), so
  entries appended before the first joiner started are delivered too.
* ``ack``: ``XACK``. Until then an entry stays in the group's pending entries list.
* ``claim_pending``: first this consumer's own pending entries (``XREADGROUP ... 0``: what a worker
  restarted under the same name had taken before it died), then every entry other consumers have held
  for at least ``claim_idle_ms`` without acknowledging it, taken over with ``XAUTOCLAIM``.
* ``pending``: the group's pending count (``XPENDING``), every consumer included.

An entry that cannot be parsed back into a RequestOpened (written by another client, or by hand) does
not stop consumption: it is counted in ``malformed`` and logged with its id. By default it is skipped
and acknowledged so that it is never delivered again; with ``deliver_malformed`` it is delivered as an
:class:`~leanrec.events.bus.Undecodable` holding its raw fields and left pending like any record, so
a consumer (the joiner) acknowledges it only once it has set it aside.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from itertools import chain
from typing import Any, TypeVar

import redis
import redis.exceptions

from leanrec.events.bus import RequestOpened, Undecodable
from leanrec.stores.redis_common import RoundTrips, answering, connect

log = logging.getLogger(__name__)

FIELDS: tuple[str, ...] = ("request_id", "user_id", "ts_ms", "n_items", "fs_version")
"""Stream fields of one RequestOpened entry, one per attribute, in attribute order."""

_INT_FIELDS = FIELDS[1:]
_FIELD_KEYS = frozenset(f.encode() for f in FIELDS)
_INT_RE = re.compile(rb"-?[0-9]+")  # what str(int) writes; int() alone would accept " 1", "+1", "1_0"
_ID_RE = re.compile(r"([0-9]+)(?:-([0-9]+))?")
_U64 = 2**64
_PAGE = 1_000
"""Entries per XREADGROUP / XAUTOCLAIM page when claiming."""

T = TypeVar("T")


class MalformedEntryError(ValueError):
    """A stream entry is not a well-formed RequestOpened record.

    Attributes:
        entry_id: Stream id of the entry.
        reason: What is wrong with it.

    """

    def __init__(self, stream: str, entry_id: str, reason: str) -> None:
        super().__init__(f"malformed RequestOpened entry {entry_id} in stream {stream!r}: {reason}")
        self.entry_id = entry_id
        self.reason = reason


def _check(msg: RequestOpened) -> None:
    """Refuse a record that could not be read back: the checks :func:`decode_opened` makes."""
    if not isinstance(msg.request_id, str) or not msg.request_id:
        raise ValueError(f"request_id must be a non-empty str, got {msg.request_id!r}")
    for name in _INT_FIELDS:
        value = getattr(msg, name)
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if msg.n_items < 0:
        raise ValueError(f"n_items must be >= 0, got {msg.n_items}")
    if not 0 <= msg.fs_version < 2**16:
        raise ValueError(f"fs_version must fit in 16 bits, got {msg.fs_version}")


def encode_opened(msg: RequestOpened) -> dict[str, bytes]:
    """Stream fields of a RequestOpened: UTF-8 ``request_id``, decimal integers for the rest.

    Raises:
        TypeError: If ``msg`` is not a RequestOpened.
        ValueError: If a field would not read back (empty id, non-integer, out of range).

    """
    if not isinstance(msg, RequestOpened):
        raise TypeError(f"RedisEventBus carries RequestOpened records only, got {type(msg).__name__}")
    _check(msg)
    out = {"request_id": msg.request_id.encode()}
    for name in _INT_FIELDS:
        out[name] = str(int(getattr(msg, name))).encode()
    return out


def decode_opened(fields: Mapping[bytes, bytes], entry_id: str, stream: str = "?") -> RequestOpened:
    """Parse the fields of one stream entry back into a RequestOpened.

    The entry must have exactly the fields of :data:`FIELDS`: a UTF-8 ``request_id`` and decimal
    integers, within the ranges :func:`encode_opened` accepts.

    Raises:
        MalformedEntryError: Naming the entry id and what is wrong, if it is not such an entry.

    """
    keys = set(fields)
    missing = [f for f in FIELDS if f.encode() not in keys]
    extra = sorted(k.decode("utf-8", "replace") for k in keys - _FIELD_KEYS)
    if missing or extra:
        reason = "; ".join(
            [f"missing fields {missing}"] * bool(missing) + [f"unexpected fields {extra}"] * bool(extra)
        )
        raise MalformedEntryError(stream, entry_id, reason)
    try:
        request_id = fields[b"request_id"].decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedEntryError(stream, entry_id, "request_id is not UTF-8") from None
    ints = {}
    for name in _INT_FIELDS:
        raw = fields[name.encode()]
        if not _INT_RE.fullmatch(raw):
            raise MalformedEntryError(stream, entry_id, f"{name} is not a decimal integer: {raw[:40]!r}")
        ints[name] = int(raw)
    msg = RequestOpened(request_id, **ints)
    try:
        _check(msg)
    except ValueError as err:
        raise MalformedEntryError(stream, entry_id, str(err)) from None
    return msg


def _id_key(entry_id: str) -> tuple[int, int]:
    """Sort key of a stream id ``ms-seq``: ids order by time, then sequence."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _valid_id(entry_id: object) -> bool:
    """Whether Redis would accept ``entry_id`` as a stream id (XACK errors out on any other)."""
    if not isinstance(entry_id, str):
        return False
    m = _ID_RE.fullmatch(entry_id)
    return m is not None and int(m[1]) < _U64 and int(m[2] or 0) < _U64


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisEventBus:
    """EventBus on a Redis Stream, read through one consumer group; RequestOpened records only.

    Several workers share the work by opening the bus with the same ``group`` and distinct
    ``consumer`` names: each entry is delivered to one of them. A worker restarted under its old name
    gets back what it held with :meth:`claim_pending`; what a worker that never comes back held is taken
    over by any other worker's :meth:`claim_pending` once it has been idle ``claim_idle_ms``. Work is
    done at least once: a worker that dies after making a record durable but before acking it leaves
    that record to be processed again, so processing must be idempotent.

    Client-side counters: ``appended`` (entries this client appended), ``malformed`` (entries that were
    not RequestOpened records: skipped and acknowledged, or delivered with ``deliver_malformed``),
    ``trimmed`` (pending entries whose data MAXLEN trimming had removed, acknowledged as lost);
    ``last_malformed`` is the last such error.

    Args:
        url: ``redis://[user:password@]host:port/db``, as ``redis.Redis.from_url`` takes it.
        stream: Key of the stream.
        group: Consumer group; the joiners sharing the work use the same one.
        consumer: Name of this worker inside the group; a restarted worker should reuse its name.
        maxlen: Approximate bound on the stream's length (``XADD MAXLEN ~``).
        claim_idle_ms: How long another consumer's entry must have been pending and untouched before
            :meth:`claim_pending` takes it over. Longer than the slowest batch a worker processes, or
            live workers' entries are taken from them and processed twice.
        deliver_malformed: Deliver entries that are not RequestOpened records as
            :class:`~leanrec.events.bus.Undecodable` messages, pending until acknowledged, instead of
            acknowledging them here; for a consumer that keeps what it cannot read.

    Raises:
        ValueError: If ``maxlen`` is not positive or ``claim_idle_ms`` is negative.
        ConnectionError: If the server at ``url`` does not answer (the URL's password is redacted).

    """

    def __init__(
        self,
        url: str,
        stream: str = "lr:opened",
        group: str = "joiners",
        consumer: str = "c0",
        maxlen: int = 1_000_000,
        claim_idle_ms: int = 30_000,
        deliver_malformed: bool = False,
    ) -> None:
        if maxlen <= 0:
            raise ValueError(f"maxlen must be positive, got {maxlen}")
        if claim_idle_ms < 0:
            raise ValueError(f"claim_idle_ms must be >= 0, got {claim_idle_ms}")
        self.url = url
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.maxlen = maxlen
        self.claim_idle_ms = claim_idle_ms
        self.deliver_malformed = deliver_malformed
        self.appended = 0
        self.malformed = 0
        self.trimmed = 0
        self.last_malformed: str | None = None
        self._client: redis.Redis = connect(url)
        self._roundtrip = RoundTrips(self._client)
        with self._errors():
            self._ensure_group()

    # ------------------------------------------------------------------------------- plumbing
    def _errors(self) -> AbstractContextManager[None]:
        return answering("Redis event bus", self.url)

    def _ensure_group(self) -> None:
        """Create the stream and the group (at the stream's start) unless they exist."""
        try:
            self._client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as err:
            if not str(err).startswith("BUSYGROUP"):
                raise

    def _grouped(self, call: Any) -> Any:
        """Run ``call()``; if the stream or group is gone (deleted, flushed), recreate it and retry once."""
        with self._errors():
            try:
                return call()
            except redis.exceptions.ResponseError as err:
                if not str(err).startswith("NOGROUP"):
                    raise
                self._ensure_group()
                return call()

    def _read(self, start: str, count: int) -> list[tuple[str, dict[bytes, bytes]]]:
        """One XREADGROUP page from ``start`` (``>``: new entries; an id: own pending after it)."""
        resp = self._grouped(
            lambda: self._client.xreadgroup(self.group, self.consumer, {self.stream: start}, count=count)
        )
        if isinstance(resp, dict):  # RESP3 replies map stream -> entries
            resp = list(resp.items())
        return [(_str(eid), fields or {}) for _, entries in resp or () for eid, fields in entries]

    def _decode_all(
        self, entries: Sequence[tuple[str, Mapping[bytes, bytes]]]
    ) -> list[tuple[str, RequestOpened | Undecodable]]:
        """Parse entries; count the malformed ones and acknowledge them (or deliver them, as asked).

        Trimmed ones are acknowledged as lost: nothing of them is left to deliver.
        """
        out: list[tuple[str, RequestOpened | Undecodable]] = []
        dropped: list[str] = []
        for entry_id, fields in entries:
            if not fields:  # XADD needs a field: an empty entry is one trimmed away while pending
                self.trimmed += 1
                dropped.append(entry_id)
                log.warning(
                    "stream %r: pending entry %s was trimmed before it was acked", self.stream, entry_id
                )
                continue
            try:
                out.append((entry_id, decode_opened(fields, entry_id, self.stream)))
            except MalformedEntryError as err:
                self.malformed += 1
                self.last_malformed = str(err)
                if self.deliver_malformed:
                    out.append((entry_id, Undecodable(tuple(fields.items()), err.reason)))
                    log.warning("%s; delivered to be set aside", err)
                    continue
                dropped.append(entry_id)
                log.warning("%s; skipped and acknowledged", err)
        if dropped:
            with self._errors():
                self._client.xack(self.stream, self.group, *dropped)
        return out

    # ------------------------------------------------------------------------------- protocol
    def append_many(self, messages: Sequence[RequestOpened]) -> list[str]:
        """Append records in order with one pipeline of ``XADD MAXLEN ~``; returns their stream ids.

        Every record is checked before anything is sent, so a bad one refuses the whole batch.

        Raises:
            TypeError: If a message is not a RequestOpened (event batches go to the transient store).
            ValueError: If a record could not be read back (see :func:`encode_opened`).

        """
        commands = self.append_commands(messages)
        if not commands:
            return []
        with self._errors():
            replies = self._roundtrip(commands)
        return self.appended_by(replies)

    def append_commands(self, messages: Sequence[RequestOpened]) -> list[tuple[Any, ...]]:
        """The ``XADD`` commands that append ``messages``, for a round trip sent with others.

        Raises:
            TypeError: If a message is not a RequestOpened.
            ValueError: If a record could not be read back (see :func:`encode_opened`).

        """
        encoded = []
        for i, msg in enumerate(messages):
            try:
                encoded.append(encode_opened(msg))
            except (TypeError, ValueError) as err:
                raise type(err)(f"message {i}: {err}") from None
        trim = ("MAXLEN", "~", str(self.maxlen))
        return [("XADD", self.stream, *trim, "*", *chain.from_iterable(f.items())) for f in encoded]

    def appended_by(self, replies: Sequence[Any]) -> list[str]:
        """The stream ids the replies to :meth:`append_commands` give; raises the first error."""
        errors = [r for r in replies if isinstance(r, Exception)]
        if errors:
            raise errors[0]
        ids = [_str(eid) for eid in replies]
        self.appended += len(ids)
        return ids

    @property
    def client(self) -> redis.Redis:
        """The client of the server the stream is on."""
        return self._client

    def consume(self, max_count: int) -> list[tuple[str, RequestOpened | Undecodable]]:
        """Deliver up to ``max_count`` new records to this consumer, without blocking.

        They stay pending (to this consumer) until acknowledged. Malformed entries are skipped (unless
        delivered, ``deliver_malformed``), so reading goes on until ``max_count`` records are found or
        the stream has no new entries.
        """
        out: list[tuple[str, RequestOpened | Undecodable]] = []
        while len(out) < max_count:
            want = max_count - len(out)
            entries = self._read(">", want)
            out += self._decode_all(entries)
            if len(entries) < want:
                break
        return out

    def ack(self, ids: Sequence[str]) -> int:
        """Acknowledge records (whichever consumer holds them); returns how many were pending.

        Ids that are not stream ids count as not pending, as in the in-memory bus.
        """
        valid = [i for i in ids if _valid_id(i)]
        if not valid:
            return 0
        with self._errors():
            return int(self._client.xack(self.stream, self.group, *valid))

    def claim_pending(self) -> list[tuple[str, RequestOpened | Undecodable]]:
        """Records delivered and not acknowledged that this consumer should now process, oldest first.

        These are this consumer's own pending records (whatever their idle time: a restarted worker
        gets back what it held) and those of other consumers idle at least ``claim_idle_ms``, which
        become this consumer's. Each stays pending until acknowledged; a later call returns it again.
        """
        found: dict[str, Mapping[bytes, bytes]] = {}
        start = "0"
        while True:
            page = self._read(start, _PAGE)
            found.update(page)
            if len(page) < _PAGE:
                break
            start = page[-1][0]
        cursor: bytes | str = "0-0"
        while True:
            resp = self._grouped(
                lambda c=cursor: self._client.xautoclaim(
                    self.stream, self.group, self.consumer, self.claim_idle_ms, start_id=c, count=_PAGE
                )
            )
            cursor, entries = resp[0], resp[1]
            for entry_id, fields in entries:
                found.setdefault(_str(entry_id), fields or {})
            for entry_id in resp[2] if len(resp) > 2 else ():  # Redis 7: pending ids whose data is gone
                found.setdefault(_str(entry_id), {})
            if _str(cursor) == "0-0":
                break
        return self._decode_all(sorted(found.items(), key=lambda kv: _id_key(kv[0])))

    def pending(self) -> int:
        """Records delivered and not yet acknowledged, in the whole group (every consumer).

        Per group rather than per consumer because that is the work not yet done: it must reach 0
        when the joiners have drained the bus, whichever of them took what. One consumer's share is
        :meth:`pending_mine`.
        """
        return int(self._grouped(lambda: self._client.xpending(self.stream, self.group))["pending"])

    def pending_mine(self) -> int:
        """Records delivered to this consumer and not yet acknowledged."""
        summary = self._grouped(lambda: self._client.xpending(self.stream, self.group))
        return sum(c["pending"] for c in summary["consumers"] if _str(c["name"]) == self.consumer)

    # ------------------------------------------------------------------------------- extras
    def length(self) -> int:
        """Entries the stream holds (``XLEN``), acknowledged or not, until MAXLEN trims them."""
        with self._errors():
            return int(self._client.xlen(self.stream))

    def close(self) -> None:
        """Close the connections to the server; pending records stay pending for a claim."""
        self._roundtrip.close()
        self._client.close()
