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

With ``shards`` N > 1 the bus is N streams, ``{stream}:{k}`` for k < N (the braces are each stream's
Redis Cluster hash tag, so on a cluster the streams spread over its shards and no single shard carries
every record). A record goes on the stream :func:`shard_of` its request id names; its id is
``k/entry-id``. Every stream has the group; a worker reads all of them, starting each read at the
next stream in turn, so the workers of a group split every stream's records between them. Each
operation sends one command per stream in one pipeline (on a cluster, one per shard at once).

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
from redis.crc import key_slot

from leanrec.events.bus import RequestOpened, Undecodable
from leanrec.stores.redis_common import Client, answering, connect, round_trips

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


def shard_of(request_id: str, shards: int) -> int:
    """The stream of a request's records: its Redis Cluster key slot, modulo the number of streams."""
    return key_slot(request_id.encode()) % shards


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisEventBus:
    """EventBus on Redis Streams read through one consumer group; RequestOpened records only.

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
        url: ``redis://[user:password@]host:port/db``, as ``redis.Redis.from_url`` takes it, or
            ``redis+cluster://[user:password@]host:port[,host:port...]`` for a Redis Cluster.
        stream: Key of the stream (with ``shards`` > 1, the stem of the streams' keys).
        group: Consumer group; the joiners sharing the work use the same one.
        consumer: Name of this worker inside the group; a restarted worker should reuse its name.
        maxlen: Approximate bound on each stream's length (``XADD MAXLEN ~``).
        claim_idle_ms: How long another consumer's entry must have been pending and untouched before
            :meth:`claim_pending` takes it over. Longer than the slowest batch a worker processes, or
            live workers' entries are taken from them and processed twice.
        deliver_malformed: Deliver entries that are not RequestOpened records as
            :class:`~leanrec.events.bus.Undecodable` messages, pending until acknowledged, instead of
            acknowledging them here; for a consumer that keeps what it cannot read.
        shards: Streams the records are split over, by request (see the module's docstring). Every
            client of one bus must use the same number.

    Raises:
        ValueError: If ``maxlen`` or ``shards`` is not positive or ``claim_idle_ms`` is negative.
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
        shards: int = 1,
    ) -> None:
        if maxlen <= 0:
            raise ValueError(f"maxlen must be positive, got {maxlen}")
        if claim_idle_ms < 0:
            raise ValueError(f"claim_idle_ms must be >= 0, got {claim_idle_ms}")
        if shards <= 0:
            raise ValueError(f"shards must be positive, got {shards}")
        self.url = url
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.maxlen = maxlen
        self.claim_idle_ms = claim_idle_ms
        self.deliver_malformed = deliver_malformed
        self.shards = shards
        self.streams: list[str] = [stream] if shards == 1 else [f"{stream}:{{{k}}}" for k in range(shards)]
        """Keys of the streams, in shard order."""
        self._shard_of_stream = {name: k for k, name in enumerate(self.streams)}
        self._next_read = 0
        self.appended = 0
        self.malformed = 0
        self.trimmed = 0
        self.last_malformed: str | None = None
        self._client: Client = connect(url)
        self._roundtrip = round_trips(self._client)
        with self._errors():
            self._ensure_groups()

    # ------------------------------------------------------------------------------- plumbing
    def _errors(self) -> AbstractContextManager[None]:
        return answering("Redis event bus", self.url)

    def _id(self, shard: int, entry_id: str) -> str:
        """The bus's id of a stream entry: the entry id, prefixed with its stream when sharded."""
        return entry_id if self.shards == 1 else f"{shard}/{entry_id}"

    def _split_id(self, bus_id: object) -> tuple[int, str] | None:
        """``(shard, entry id)`` of a bus id, or None if it is not one of this bus's ids."""
        if not isinstance(bus_id, str):
            return None
        if self.shards == 1:
            return (0, bus_id) if _valid_id(bus_id) else None
        shard, sep, entry_id = bus_id.partition("/")
        if not sep or not shard.isdigit() or int(shard) >= self.shards or not _valid_id(entry_id):
            return None
        return int(shard), entry_id

    def _ensure_groups(self) -> None:
        """Create each stream and the group (at the stream's start) unless they exist."""
        replies = self._roundtrip(
            [("XGROUP", "CREATE", s, self.group, "0", "MKSTREAM") for s in self.streams]
        )
        for reply in replies:
            if isinstance(reply, Exception) and not str(reply).startswith("BUSYGROUP"):
                raise reply

    def _grouped(self, call: Any) -> Any:
        """Run ``call()``; if a stream or the group is gone (deleted, flushed), recreate it and retry once."""
        with self._errors():
            try:
                return call()
            except redis.exceptions.ResponseError as err:
                if not str(err).startswith("NOGROUP"):
                    raise
                self._ensure_groups()
                return call()

    def _each(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """One command per stream in one round trip; recreate missing groups once; raise the first error."""

        def run() -> list[Any]:
            replies = self._roundtrip(commands)
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return replies

        return self._grouped(run)

    def _read(self, shard: int, start: str, count: int) -> list[tuple[str, dict[bytes, bytes]]]:
        """One XREADGROUP page of a stream from ``start`` (``>``: new entries; an id: own pending after)."""
        stream = self.streams[shard]
        if not isinstance(self._client, redis.RedisCluster):
            resp = self._grouped(
                lambda: self._client.xreadgroup(self.group, self.consumer, {stream: start}, count=count)
            )
            return _entries(resp)
        # On a cluster, XREADGROUP goes to its stream's master by name: the client would otherwise
        # ask its default node which key the command names, and that node may be the one that died.
        # Named that way, the client does not refresh its slot map when the node is gone: refresh it
        # here and try the stream's master once more (a replica promoted since the last refresh).
        command = ("XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", count, "STREAMS", stream, start)
        client = self._client

        def read() -> Any:
            try:
                return client.execute_command(*command, target_nodes=client.get_node_from_key(stream))
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                client.nodes_manager.initialize()
                return client.execute_command(*command, target_nodes=client.get_node_from_key(stream))

        return _entries(self._grouped(read))

    def _decode_all(
        self, shard: int, entries: Sequence[tuple[str, Mapping[bytes, bytes]]]
    ) -> list[tuple[str, RequestOpened | Undecodable]]:
        """Parse one stream's entries; count the malformed ones and acknowledge them (or deliver them).

        Trimmed ones are acknowledged as lost: nothing of them is left to deliver.
        """
        stream = self.streams[shard]
        out: list[tuple[str, RequestOpened | Undecodable]] = []
        dropped: list[str] = []
        for entry_id, fields in entries:
            if not fields:  # XADD needs a field: an empty entry is one trimmed away while pending
                self.trimmed += 1
                dropped.append(entry_id)
                log.warning("stream %r: pending entry %s was trimmed before it was acked", stream, entry_id)
                continue
            try:
                out.append((self._id(shard, entry_id), decode_opened(fields, entry_id, stream)))
            except MalformedEntryError as err:
                self.malformed += 1
                self.last_malformed = str(err)
                if self.deliver_malformed:
                    out.append((self._id(shard, entry_id), Undecodable(tuple(fields.items()), err.reason)))
                    log.warning("%s; delivered to be set aside", err)
                    continue
                dropped.append(entry_id)
                log.warning("%s; skipped and acknowledged", err)
        if dropped:
            with self._errors():
                self._client.xack(stream, self.group, *dropped)
        return out

    # ------------------------------------------------------------------------------- protocol
    def append_many(self, messages: Sequence[RequestOpened]) -> list[str]:
        """Append records in order with one pipeline of ``XADD MAXLEN ~``; returns their ids.

        Every record is checked before anything is sent, so a bad one refuses the whole batch.

        Raises:
            TypeError: If a message is not a RequestOpened (event batches go to the transient store).
            ValueError: If a record could not be read back (see :func:`encode_opened`).

        """
        commands = self.append_commands(messages)
        if not commands:
            return []
        with self._errors():  # an error reply of a lost shard (a cluster's) is a lost server too
            return self.appended_by(commands, self._roundtrip(commands))

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
        return [
            (
                "XADD",
                self.streams[shard_of(m.request_id, self.shards)],
                *trim,
                "*",
                *chain.from_iterable(f.items()),
            )
            for m, f in zip(messages, encoded, strict=True)
        ]

    def appended_by(self, commands: Sequence[tuple[Any, ...]], replies: Sequence[Any]) -> list[str]:
        """The ids the replies to :meth:`append_commands`'s ``commands`` give; raises the first error."""
        errors = [r for r in replies if isinstance(r, Exception)]
        if errors:
            raise errors[0]
        ids = [
            self._id(self._shard_of_stream[_str(c[1])], _str(eid))
            for c, eid in zip(commands, replies, strict=True)
        ]
        self.appended += len(ids)
        return ids

    @property
    def client(self) -> Client:
        """The client of the server (or cluster) the streams are on."""
        return self._client

    def consume(self, max_count: int) -> list[tuple[str, RequestOpened | Undecodable]]:
        """Deliver up to ``max_count`` new records to this consumer, without blocking.

        They stay pending (to this consumer) until acknowledged. Malformed entries are skipped (unless
        delivered, ``deliver_malformed``), so reading goes on until ``max_count`` records are found or
        no stream has new entries. Streams are read in turn, from a different one at each call, so a
        busy stream does not starve the others.
        """
        out: list[tuple[str, RequestOpened | Undecodable]] = []
        first = self._next_read
        self._next_read = (first + 1) % self.shards
        live = [(first + k) % self.shards for k in range(self.shards)]
        while live and len(out) < max_count:
            drained = []
            for shard in live:
                want = max_count - len(out)
                if want <= 0:
                    break
                entries = self._read(shard, ">", want)
                out += self._decode_all(shard, entries)
                if len(entries) < want:
                    drained.append(shard)
            live = [s for s in live if s not in drained]
        return out

    def ack(self, ids: Sequence[str]) -> int:
        """Acknowledge records (whichever consumer holds them); returns how many were pending.

        Ids that are not this bus's ids count as not pending, as in the in-memory bus.
        """
        by_shard: dict[int, list[str]] = {}
        for bus_id in ids:
            split = self._split_id(bus_id)
            if split is not None:
                by_shard.setdefault(split[0], []).append(split[1])
        if not by_shard:
            return 0
        with self._errors():
            replies = self._roundtrip(
                [("XACK", self.streams[k], self.group, *entries) for k, entries in by_shard.items()]
            )
        errors = [r for r in replies if isinstance(r, Exception) and not str(r).startswith("NOGROUP")]
        if errors:
            raise errors[0]
        return sum(int(r) for r in replies if not isinstance(r, Exception))

    def claim_pending(self) -> list[tuple[str, RequestOpened | Undecodable]]:
        """Records delivered and not acknowledged that this consumer should now process, oldest first.

        These are this consumer's own pending records (whatever their idle time: a restarted worker
        gets back what it held) and those of other consumers idle at least ``claim_idle_ms``, which
        become this consumer's. Each stays pending until acknowledged; a later call returns it again.
        With several streams, each stream's records are in order; the streams follow each other.
        """
        out: list[tuple[str, RequestOpened | Undecodable]] = []
        for shard in range(self.shards):
            out += self._claim_stream(shard)
        return out

    def _claim_stream(self, shard: int) -> list[tuple[str, RequestOpened | Undecodable]]:
        stream = self.streams[shard]
        found: dict[str, Mapping[bytes, bytes]] = {}
        start = "0"
        while True:
            page = self._read(shard, start, _PAGE)
            found.update(page)
            if len(page) < _PAGE:
                break
            start = page[-1][0]
        cursor: bytes | str = "0-0"
        while True:
            resp = self._grouped(
                lambda c=cursor: self._client.xautoclaim(
                    stream, self.group, self.consumer, self.claim_idle_ms, start_id=c, count=_PAGE
                )
            )
            cursor, entries = resp[0], resp[1]
            for entry_id, fields in entries:
                found.setdefault(_str(entry_id), fields or {})
            for entry_id in resp[2] if len(resp) > 2 else ():  # Redis 7: pending ids whose data is gone
                found.setdefault(_str(entry_id), {})
            if _str(cursor) == "0-0":
                break
        return self._decode_all(shard, sorted(found.items(), key=lambda kv: _id_key(kv[0])))

    def _summaries(self) -> list[Any]:
        return self._each([("XPENDING", s, self.group) for s in self.streams])

    def pending(self) -> int:
        """Records delivered and not yet acknowledged, in the whole group (every consumer, every stream).

        Per group rather than per consumer because that is the work not yet done: it must reach 0
        when the joiners have drained the bus, whichever of them took what. One consumer's share is
        :meth:`pending_mine`.
        """
        return sum(int(_pending_count(r)) for r in self._summaries())

    def pending_mine(self) -> int:
        """Records delivered to this consumer and not yet acknowledged."""
        return sum(
            int(count)
            for r in self._summaries()
            for name, count in _consumers(r)
            if _str(name) == self.consumer
        )

    # ------------------------------------------------------------------------------- extras
    def length(self) -> int:
        """Entries the streams hold (``XLEN``), acknowledged or not, until MAXLEN trims them."""
        with self._errors():
            return sum(int(n) for n in self._roundtrip([("XLEN", s) for s in self.streams]))

    def close(self) -> None:
        """Close the connections to the server; pending records stay pending for a claim."""
        self._roundtrip.close()
        self._client.close()


def _entries(resp: Any) -> list[tuple[str, dict[bytes, bytes]]]:
    """The entries of an XREADGROUP reply of one stream."""
    if isinstance(resp, dict):  # RESP3 replies map stream -> entries
        resp = list(resp.items())
    return [(_str(eid), fields or {}) for _, entries in resp or () for eid, fields in entries]


def _pending_count(summary: Any) -> int:
    """The count of an ``XPENDING stream group`` reply, parsed (a dict) or raw (a list)."""
    return int(summary["pending"] if isinstance(summary, dict) else summary[0])


def _consumers(summary: Any) -> list[tuple[Any, int]]:
    """``(consumer, pending)`` pairs of an ``XPENDING stream group`` reply, parsed or raw."""
    if isinstance(summary, dict):
        return [(c["name"], int(c["pending"])) for c in summary["consumers"]]
    return [(name, int(n)) for name, n in summary[3] or ()]
