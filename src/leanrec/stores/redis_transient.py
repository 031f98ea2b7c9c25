"""RedisTransientStore: the TransientStore protocol on a Redis server.

Each batch is one round trip: ``put_many`` sends ``SET key value PX ttl_ms`` for every entry at
once, ``get_many`` is one ``MGET``, ``delete_many`` one ``DEL``, ``touch_many`` one
``PEXPIRE … GT`` and ``EXISTS`` per key. Redis expires keys itself (on
access and by its active expiry cycle), so ``purge_expired`` has nothing to do.

On a Redis Cluster (``redis+cluster://``) a batch is one pipeline that the cluster client splits by
shard and sends to every shard before it reads a reply; ``MGET`` and ``DEL`` are split by slot. The
server-side figures (expiries, keys, memory) are sums over the cluster's masters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict
from typing import Any

import redis
import redis.exceptions

from leanrec.stores.redis_common import (
    Client,
    answering,
    connect,
    key_count,
    redact,
    round_trips,
    same_server,
    server_totals,
)
from leanrec.stores.transient import OnceAppend, StoreFullError, TransientStats, checked_batch


class RedisTransientStore:
    """TransientStore on a Redis server, one round trip per batch.

    Counters of this client (writes, reads, hits, misses, deletes, bytes, rejected writes) are kept
    client-side. The rest comes from the server: ``expiries`` is the growth of ``INFO stats``
    ``expired_keys`` since the store was opened (server-wide, so it counts every database's expiries),
    ``keys_held`` is ``DBSIZE`` (which includes keys past their TTL that Redis has not reclaimed yet),
    and ``bytes_held`` is the growth of ``INFO memory`` ``used_memory_dataset`` since the store was
    opened, clamped at 0. ``bytes_held`` is an approximation: it includes allocator rounding and
    whatever other data the server gained or released meanwhile (other clients, other databases), and
    it jitters by some hundred bytes. ``used_memory_dataset`` is ``used_memory`` less the server's
    bookkeeping; ``used_memory`` itself is not used because it counts the clients' query buffers, which
    grow by tens of kB after one pipelined batch and shrink only when the client idles.
    ``peak_bytes_held`` is the largest ``bytes_held`` this client observed.

    With ``max_bytes``, a batch is refused whole with :class:`StoreFullError` when the dataset memory
    plus the batch's bytes (keys plus values, less the values it replaces) would exceed the dataset
    memory at open plus ``max_bytes``. A Redis ``OOM`` reply (the server's ``maxmemory``) is a
    StoreFullError too.

    Args:
        url: ``redis://[user:password@]host:port/db``, as ``redis.Redis.from_url`` takes it, or
            ``redis+cluster://[user:password@]host:port[,host:port...]`` for a Redis Cluster.
        max_bytes: Bound on the memory this store may add to the server (the cluster); ``None`` for
            no bound.

    Raises:
        ValueError: If ``max_bytes`` is not positive.
        ConnectionError: If the server at ``url`` does not answer.

    """

    def __init__(self, url: str, max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.url = url
        self.max_bytes = max_bytes
        self._client: Client = connect(url)
        self._cluster = isinstance(self._client, redis.RedisCluster)
        self._roundtrip = round_trips(self._client)
        self._append_sha: str | None = None
        self._stats = TransientStats()
        with self._errors():
            self._expired_at_open = self._expired_keys()
            self._used_at_open = self._used_memory()

    def _errors(self) -> AbstractContextManager[None]:
        return answering("Redis transient store", self.url)

    def _expired_keys(self) -> int:
        return server_totals(self._client, "stats")["expired_keys"]

    def _used_memory(self) -> int:
        """The server's ``used_memory_dataset``: memory of keys and values, without client buffers.

        On a cluster, the sum over its masters.
        """
        return server_totals(self._client, "memory")["used_memory_dataset"]

    def _bytes_held(self, used_memory: int) -> int:
        held = max(0, used_memory - self._used_at_open)
        self._stats.peak_bytes_held = max(self._stats.peak_bytes_held, held)
        return held

    def _check_bound(self, items: Mapping[str, bytes], replaces: bool = True) -> None:
        """Refuse the batch if it would take the server past its bound; needs one or two round trips."""
        if self.max_bytes is None:
            return
        keys = list(items) if replaces else []
        old_lengths: list[int] = []
        if keys:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.strlen(key)
            old_lengths = pipe.execute()
        used = self._used_memory()
        self._bytes_held(used)
        incoming = sum(len(k.encode()) + len(v) for k, v in items.items())
        replaced = (
            sum(len(k.encode()) + n for k, n in zip(keys, old_lengths, strict=True) if n) if replaces else 0
        )
        if used + incoming - replaced > self._used_at_open + self.max_bytes:
            self._stats.rejected_writes += len(items)
            raise StoreFullError(
                f"transient store full: Redis at {redact(self.url)} holds {used - self._used_at_open} B "
                f"more than at open, batch of {incoming} B would exceed the bound of {self.max_bytes} B"
            )

    def put_many(self, items: Mapping[str, bytes], ttl_ms: int) -> None:
        """Write all entries with one TTL in one round trip; refuse the whole batch if it does not fit.

        Raises:
            ValueError: If ``ttl_ms`` is not positive.
            TypeError: If a value is not bytes-like.
            StoreFullError: If the batch would exceed ``max_bytes`` or the server is out of memory.

        """
        items = checked_batch(items, ttl_ms)
        if not items:
            return
        with self._errors():
            self._check_bound(items)
            px = int(ttl_ms)
            results = self._roundtrip([("SET", key, value, "PX", px) for key, value in items.items()])
            self._took(items, results)

    def put_many_and_append(
        self, items: Mapping[str, bytes], ttl_ms: int, bus: Any, messages: Sequence[Any]
    ) -> tuple[Exception | None, Exception | None] | None:
        """:meth:`put_many` and ``bus.append_many(messages)`` in one round trip, if they can share one.

        A ranked request's first write and its RequestOpened record go to the same server in most
        deployments; one round trip instead of two halves what logging a ranking costs in waits.

        Returns:
            None if ``bus`` is not a Redis stream on this server and database (then nothing was
            sent: write and append apart); else what each refused with (a StoreFullError, a
            ConnectionError...), None for each that took.

        Raises:
            ValueError: If ``ttl_ms`` is not positive, or a message would not read back.
            TypeError: If a value is not bytes-like, or a message not a RequestOpened.

        """
        client = getattr(bus, "client", None)
        if (
            self.max_bytes is not None  # the bound needs its own round trip first: keep them apart
            or not hasattr(bus, "append_commands")
            or not same_server(client, self._client)
        ):
            return None
        items = checked_batch(items, ttl_ms)
        appends = bus.append_commands(messages)
        px = int(ttl_ms)
        try:
            with self._errors():
                replies = self._roundtrip([("SET", k, v, "PX", px) for k, v in items.items()] + appends)
        except ConnectionError as exc:
            return exc, exc
        put_error: Exception | None = None
        try:
            with self._errors():
                self._took(items, replies[: len(items)])
        except (StoreFullError, ConnectionError, OSError) as exc:
            put_error = exc
        try:
            bus.appended_by(appends, replies[len(items) :])
        except (ConnectionError, OSError, redis.exceptions.RedisError) as exc:
            return put_error, exc
        return put_error, None

    def put_many_and_append_once(
        self, items: Mapping[str, bytes], ttl_ms: int, entries: Sequence[OnceAppend]
    ) -> tuple[Exception | None, list[bool]] | None:
        """:meth:`put_many` then :meth:`append_once`, in one round trip, the SETs first.

        An event batch that touches pages not logged yet logs them and appends itself; one round trip
        instead of two. The server runs the commands of one connection in order, so the pages are
        written before the events are appended (log-on-touch), and each append stays one atomic
        script, so a batch id is still taken once.

        Returns:
            None if the store has a byte bound (its check needs a round trip of its own: nothing was
            sent, write and append apart); else what the write refused with (a StoreFullError...,
            None if it took) and, per entry, whether it was appended.

        Raises:
            ValueError: If ``ttl_ms`` is not positive.
            TypeError: If a value is not bytes-like.
            ConnectionError: If the server did not answer (whether anything was written is unknown,
                as for :meth:`append_once`).

        """
        if self.max_bytes is not None:
            return None
        items = checked_batch(items, ttl_ms)
        if not entries:
            return None
        px = int(ttl_ms)
        with self._errors():
            if self._append_sha is None:
                self._append_sha = self._client.script_load(self._APPEND_ONCE)
            sets = [("SET", k, v, "PX", px) for k, v in items.items()]
            appends = [
                ("EVALSHA", self._append_sha, 2, e.guard_key, e.list_key, e.token, e.chunk, px)
                for e in entries
            ]
            replies = self._roundtrip(sets + appends)
            put_error: Exception | None = None
            try:
                self._took(items, replies[: len(items)])
            except (StoreFullError, redis.exceptions.RedisError) as exc:
                put_error = exc
            results = replies[len(items) :]
            lost = [i for i, r in enumerate(results) if isinstance(r, redis.exceptions.NoScriptError)]
            if lost:  # a restarted server lost the script: those were not appended, send them again
                self._append_sha = None  # load it before the next EVALSHA
                again = self._append_once([entries[i] for i in lost], px)
                for i, r in zip(lost, again, strict=True):
                    results[i] = r
            errors = [r for r in results if isinstance(r, Exception)]
            if errors:
                raise errors[0]
        out = [bool(r) for r in results]
        self._stats.writes += sum(out)
        self._stats.bytes_written += sum(len(e.chunk) for e, ok in zip(entries, out, strict=True) if ok)
        return put_error, out

    def _took(self, items: Mapping[str, bytes], replies: list[Any], keys: list[str] | None = None) -> None:
        """Count a batch written, or undo and refuse it if the server refused part of it (see below).

        ``keys`` are the keys of ``replies`` in order (default: one reply per item).
        """
        self._refuse_on_oom(list(items) if keys is None else keys, replies)
        self._stats.writes += len(items)
        self._stats.bytes_written += sum(len(v) for v in items.values())

    def _refuse_on_oom(self, keys: list[str], results: list[Any]) -> None:
        """Undo a batch the server refused in part for lack of memory, then raise StoreFullError.

        A key the batch did write is deleted again, so no part of the batch stays; a value it replaced
        is lost with it.
        """
        errors = [r for r in results if isinstance(r, Exception)]
        if not errors:
            return
        oom = [
            e for e in errors if isinstance(e, redis.exceptions.ResponseError) and str(e).startswith("OOM")
        ]
        written = [k for k, r in zip(keys, results, strict=True) if not isinstance(r, Exception)]
        if written:
            self._client.delete(*written)
        if oom:
            self._stats.rejected_writes += len(keys)
            raise StoreFullError(f"Redis at {redact(self.url)} is out of memory: {oom[0]}") from oom[0]
        raise errors[0]

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Read values in key order with one MGET; a key past its TTL reads as missing."""
        if not keys:
            return []
        with self._errors():
            if self._cluster:  # one MGET per slot, sent to each shard
                out: list[bytes | None] = self._client.mget_nonatomic(list(keys))
            else:
                out = self._client.mget(list(keys))
        hits = [v for v in out if v is not None]
        self._stats.reads += len(keys)
        self._stats.hits += len(hits)
        self._stats.misses += len(keys) - len(hits)
        self._stats.bytes_read += sum(len(v) for v in hits)
        return out

    def touch_many(self, keys: Sequence[str], ttl_ms: int) -> list[bool]:
        """``PEXPIRE key ttl_ms GT`` and ``EXISTS key`` for every key, in one round trip.

        ``GT`` never shortens a TTL another writer set longer; since it answers 0 both for a missing
        key and for one that already lives longer, ``EXISTS`` says which. On a cluster the pipeline
        goes to every shard the keys live on at once.

        Raises:
            ValueError: If ``ttl_ms`` is not positive.

        """
        if ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be positive, got {ttl_ms}")
        if not keys:
            return []
        px = int(ttl_ms)
        commands: list[tuple[Any, ...]] = []
        for key in keys:
            commands += [("PEXPIRE", key, px, "GT"), ("EXISTS", key)]
        with self._errors():
            replies = self._roundtrip(commands)
        errors = [r for r in replies if isinstance(r, Exception)]
        if errors:
            raise errors[0]
        out = [bool(r) for r in replies[1::2]]
        self._stats.touches += sum(out)
        return out

    def append_many(self, items: Mapping[str, bytes], ttl_ms: int) -> None:
        """RPUSH one chunk to each key's list and reset its TTL, in one pipeline.

        Raises:
            ValueError: If ``ttl_ms`` is not positive.
            TypeError: If a value is not bytes-like, or a key holds a plain value.
            StoreFullError: If the batch would exceed ``max_bytes`` or the server is out of memory.

        """
        items = checked_batch(items, ttl_ms)
        if not items:
            return
        with self._errors():
            self._check_bound(items, replaces=False)
            pipe = self._client.pipeline(transaction=False)
            for key, value in items.items():
                pipe.rpush(key, value)
                pipe.pexpire(key, int(ttl_ms))
            results = pipe.execute(raise_on_error=False)
        wrong = [
            r for r in results if isinstance(r, redis.exceptions.ResponseError) and "WRONGTYPE" in str(r)
        ]
        if wrong:
            raise TypeError(f"a key of the batch holds a value, not a list: {wrong[0]}")
        self._took(items, results, [k for k in items for _ in (0, 1)])

    def get_lists_many(self, keys: Sequence[str]) -> list[list[bytes]]:
        """LRANGE every key in one pipeline; an empty list for a missing key."""
        if not keys:
            return []
        with self._errors():
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.lrange(key, 0, -1)
            results = pipe.execute(raise_on_error=False)
        for key, r in zip(keys, results, strict=True):
            if isinstance(r, Exception):
                raise TypeError(f"{key!r} cannot be read as a list: {r}")
        out: list[list[bytes]] = [list(r) for r in results]
        self._stats.reads += len(keys)
        self._stats.hits += sum(1 for r in out if r)
        self._stats.misses += sum(1 for r in out if not r)
        self._stats.bytes_read += sum(len(c) for r in out for c in r)
        return out

    # KEYS: guard set, list; ARGV: token, chunk, ttl. Atomic: a replay never appends.
    _APPEND_ONCE = """
    if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
    redis.call('RPUSH', KEYS[2], ARGV[2])
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    redis.call('PEXPIRE', KEYS[2], ARGV[3])
    return 1
    """

    def _append_once(self, entries: Sequence[OnceAppend], ttl_ms: int) -> list[Any]:
        """EVALSHA the script per entry in one pipeline; load it first (again after a server restart)."""
        for attempt in (0, 1):
            if self._append_sha is None or attempt:
                self._append_sha = self._client.script_load(self._APPEND_ONCE)
            sha = self._append_sha
            results = self._roundtrip(
                [("EVALSHA", sha, 2, e.guard_key, e.list_key, e.token, e.chunk, ttl_ms) for e in entries]
            )
            missing = [r for r in results if isinstance(r, redis.exceptions.NoScriptError)]
            if not missing:
                break
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            raise errors[0]
        return results

    def append_once(self, entries: Sequence[OnceAppend], ttl_ms: int) -> list[bool]:
        """Per entry, one server-side script: SADD the token, and only if it was new RPUSH the chunk."""
        if ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be positive, got {ttl_ms}")
        if not entries:
            return []
        with self._errors():
            self._check_bound({e.list_key: e.chunk for e in entries}, replaces=False)
            results = self._append_once(entries, int(ttl_ms))
        out = [bool(r) for r in results]
        self._stats.writes += sum(out)
        self._stats.bytes_written += sum(len(e.chunk) for e, ok in zip(entries, out, strict=True) if ok)
        return out

    def delete_many(self, keys: Sequence[str]) -> int:
        """Delete the keys with one DEL; returns how many existed (a key past its TTL does not)."""
        if not keys:
            return 0
        with self._errors():
            n = int(self._client.delete(*keys))
        self._stats.deletes += n
        return n

    def purge_expired(self) -> int:
        """Nothing to do: Redis drops expired keys itself. Returns 0."""
        return 0

    def stats(self) -> TransientStats:
        """A snapshot of the counters; the server-side ones take one round trip."""
        with self._errors():
            expired, used, keys = self._expired_keys(), self._used_memory(), key_count(self._client)
        self._stats.expiries = max(0, expired - self._expired_at_open)
        self._stats.keys_held = keys
        self._stats.bytes_held = self._bytes_held(used)
        return TransientStats(**asdict(self._stats))

    def close(self) -> None:
        """Close the connections to the server."""
        self._roundtrip.close()
        self._client.close()
