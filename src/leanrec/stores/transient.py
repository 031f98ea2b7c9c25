"""TransientStore: the short-lived key-value store that holds frozen features until they are joined.

Batch-first: a logger writes a request's blobs in one ``put_many``, a joiner reads them in one
``get_many``. Every entry carries a TTL, so nothing outlives the attribution window even if a joiner
never comes for it.
"""

from __future__ import annotations

import heapq
import os
import shutil
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple, Protocol, runtime_checkable

from leanrec.clock import Clock, SystemClock


class OnceAppend(NamedTuple):
    """One guarded append: ``chunk`` goes to ``list_key`` unless ``token`` is in ``guard_key``'s set."""

    list_key: str
    chunk: bytes
    guard_key: str
    token: str


class StoreFullError(RuntimeError):
    """A write would exceed the store's byte bound; nothing of the batch was written."""


def checked_batch(items: Mapping[str, bytes], ttl_ms: int) -> dict[str, bytes]:
    """A validated copy of a batch every store takes: positive TTL, bytes-like values made bytes.

    Raises:
        ValueError: If ``ttl_ms`` is not positive.
        TypeError: If a value is not bytes-like.

    """
    if ttl_ms <= 0:
        raise ValueError(f"ttl_ms must be positive, got {ttl_ms}")
    for key, value in items.items():
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"value of {key!r} must be bytes, got {type(value).__name__}")
    # Sizes are byte lengths: len() of a memoryview counts elements, not bytes.
    return {k: v if isinstance(v, bytes) else bytes(v) for k, v in items.items()}


@dataclass
class TransientStats:
    """Counters of a TransientStore since it was opened."""

    writes: int = 0
    bytes_written: int = 0
    reads: int = 0
    bytes_read: int = 0
    hits: int = 0
    misses: int = 0
    expiries: int = 0
    deletes: int = 0
    rejected_writes: int = 0
    touches: int = 0  # keys whose TTL touch_many extended (or found already long enough)
    keys_held: int = 0
    bytes_held: int = 0
    peak_bytes_held: int = 0
    bytes_spilled: int = 0  # of bytes_held, the values an embedded store keeps on disk
    peak_bytes_spilled: int = 0

    def to_dict(self) -> dict[str, int]:
        """JSON-ready counters."""
        return asdict(self)


@runtime_checkable
class TransientStore(Protocol):
    """Put, get and delete many entries, each with a time to live."""

    def put_many(self, items: Mapping[str, bytes], ttl_ms: int) -> None:
        """Write all entries, each expiring ``ttl_ms`` from now; all or none are written."""
        ...

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Values in key order; ``None`` for a missing or expired key."""
        ...

    def delete_many(self, keys: Sequence[str]) -> int:
        """Delete the keys; returns how many existed."""
        ...

    def touch_many(self, keys: Sequence[str], ttl_ms: int) -> list[bool]:
        """Extend each existing key to live at least ``ttl_ms`` from now (never shortened); no bytes sent.

        Returns:
            Per key, whether it exists (False: missing, expired or evicted, and nothing was done).

        """
        ...

    def append_many(self, items: Mapping[str, bytes], ttl_ms: int) -> None:
        """Append one chunk to the list at each key, creating it; the list expires ``ttl_ms`` from now."""
        ...

    def get_lists_many(self, keys: Sequence[str]) -> list[list[bytes]]:
        """The chunks appended to each key, in order; empty for a missing or expired key."""
        ...

    def append_once(self, entries: Sequence[OnceAppend], ttl_ms: int) -> list[bool]:
        """Append each chunk unless its token is already in its guard set; True where appended.

        Checking the guard and appending is one atomic step per entry, so a replayed batch is refused
        and a retry after a failed call is never mistaken for a replay.
        """
        ...

    def purge_expired(self) -> int:
        """Drop every expired entry now; returns how many."""
        ...

    def stats(self) -> TransientStats:
        """Counters since the store was opened."""
        ...


class _Spilled(NamedTuple):
    """Where a spilled value lies: ``length`` bytes at ``offset`` of segment ``segment``."""

    segment: int
    offset: int
    length: int


class _SpillFiles:
    """Append-only segment files under a private folder, each removed once nothing in it is live.

    Entries leave a transient store roughly in the order they came (joined when their window
    closes, or expired), so a segment empties as a whole and the disk held follows the live bytes.
    """

    def __init__(self, folder: str, segment_bytes: int) -> None:
        os.makedirs(folder, exist_ok=True)
        self.root = tempfile.mkdtemp(prefix="leanrec-spill-", dir=folder)
        self.segment_bytes = segment_bytes
        self._fds: dict[int, int] = {}
        self._live: dict[int, int] = {}
        self._size = 0
        self._active = -1
        self._finalizer = weakref.finalize(self, _SpillFiles._remove, self._fds, self.root)

    @staticmethod
    def _remove(fds: dict[int, int], root: str) -> None:
        for fd in fds.values():
            os.close(fd)
        fds.clear()
        shutil.rmtree(root, ignore_errors=True)

    def _roll(self) -> None:
        self._active += 1
        path = os.path.join(self.root, f"{self._active:08d}.seg")
        self._fds[self._active] = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._live[self._active] = 0
        self._size = 0

    def write(self, values: Sequence[bytes]) -> list[_Spilled]:
        """Append values in one write; returns where each lies."""
        if self._active < 0 or self._size >= self.segment_bytes:
            self._roll()
        seg, start = self._active, self._size
        lengths = [len(v) for v in values]
        os.pwrite(self._fds[seg], b"".join(values), start)
        out, offset = [], start
        for n in lengths:
            out.append(_Spilled(seg, offset, n))
            offset += n
        self._size = offset
        self._live[seg] += offset - start
        return out

    def read(self, where: _Spilled) -> bytes:
        """The bytes of one spilled value."""
        return os.pread(self._fds[where.segment], where.length, where.offset)

    def release(self, where: _Spilled) -> None:
        """A spilled value is no longer live; a segment left with none is removed (or emptied)."""
        self._live[where.segment] -= where.length
        if self._live[where.segment] > 0:
            return
        if where.segment == self._active:  # the file being written empties: begin it again
            os.ftruncate(self._fds[where.segment], 0)
            self._size = 0
            return
        os.close(self._fds.pop(where.segment))
        del self._live[where.segment]
        os.unlink(os.path.join(self.root, f"{where.segment:08d}.seg"))

    def close(self) -> None:
        """Remove every segment and the folder."""
        self._finalizer()


class MemoryTransientStore:
    """In-process TransientStore with TTLs, a byte bound and counters.

    Expired entries are dropped when read and by ``purge_expired`` (every write runs it too), so
    the memory they held is released without a background thread. A write that would exceed
    ``max_bytes`` after purging is refused whole with :class:`StoreFullError`; entries already held
    are never evicted to make room, because they are labels waiting to be joined.

    With ``spill_dir``, values written by ``put_many`` beyond ``memory_bytes`` go to segment files
    there instead of memory, so a simulation can hold what a real server would hold at its rate
    (several GB of frozen features) on a machine that has the disk but not the memory. Spilled bytes
    still count in ``bytes_held`` (what a server would keep in memory) and apart in
    ``bytes_spilled``. Lists (event batches, replay guards) stay in memory: they are small.

    Args:
        max_bytes: Bound on keys plus values held, in memory and spilled.
        clock: Time source; inject a ManualClock to drive TTLs in tests and simulations.
        memory_bytes: With ``spill_dir``, the bytes held in memory before values spill.
        spill_dir: Folder for spill files (a private subfolder, removed by ``close``); None keeps
            everything in memory.
        segment_bytes: Size at which a spill file is closed and the next begun.

    """

    def __init__(
        self,
        max_bytes: int = 1 << 30,
        clock: Clock | None = None,
        memory_bytes: int | None = None,
        spill_dir: str | os.PathLike | None = None,
        segment_bytes: int = 64 << 20,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if memory_bytes is not None and memory_bytes < 0:
            raise ValueError(f"memory_bytes must be at least 0, got {memory_bytes}")
        if segment_bytes <= 0:
            raise ValueError(f"segment_bytes must be positive, got {segment_bytes}")
        self.max_bytes = max_bytes
        self.clock = clock or SystemClock()
        self.memory_bytes = max_bytes if spill_dir is None or memory_bytes is None else memory_bytes
        self._spill = None if spill_dir is None else _SpillFiles(os.fspath(spill_dir), segment_bytes)
        self._data: dict[str, tuple[bytes | list[bytes] | _Spilled, int]] = {}
        self._expiry: list[tuple[int, str]] = []
        self._stats = TransientStats()

    @staticmethod
    def _size(key: str, value: bytes | list[bytes] | _Spilled) -> int:
        if isinstance(value, _Spilled):
            return len(key) + value.length
        return len(key) + (sum(map(len, value)) if isinstance(value, list) else len(value))

    def _drop(self, key: str) -> None:
        value, _ = self._data.pop(key)
        self._stats.keys_held -= 1
        self._stats.bytes_held -= self._size(key, value)
        if isinstance(value, _Spilled):
            self._stats.bytes_spilled -= value.length
            self._spill.release(value)  # type: ignore[union-attr]

    def _live(self, key: str, now: int) -> tuple[bytes | list[bytes] | _Spilled, int] | None:
        """The entry at ``key``, or None if it is missing or past its TTL (then it is dropped)."""
        entry = self._data.get(key)
        if entry is not None and entry[1] <= now:
            self._drop(key)
            self._stats.expiries += 1
            return None
        return entry

    def _reserve(self, net_bytes: int, n: int) -> None:
        """Purge what expired, then refuse a batch adding ``net_bytes`` that would not fit."""
        self.purge_expired()
        if self._stats.bytes_held + net_bytes > self.max_bytes:
            self._stats.rejected_writes += n
            raise StoreFullError(
                f"transient store full: holding {self._stats.bytes_held} B, batch of {net_bytes} B "
                f"would exceed the bound of {self.max_bytes} B"
            )

    def _place(self, key: str, value: bytes | list[bytes] | _Spilled, expire_at: int) -> None:
        if key in self._data:
            self._drop(key)
        self._data[key] = (value, expire_at)
        heapq.heappush(self._expiry, (expire_at, key))
        self._stats.keys_held += 1
        self._stats.bytes_held += self._size(key, value)
        self._stats.peak_bytes_held = max(self._stats.peak_bytes_held, self._stats.bytes_held)
        if isinstance(value, _Spilled):
            self._stats.bytes_spilled += value.length
            self._stats.peak_bytes_spilled = max(self._stats.peak_bytes_spilled, self._stats.bytes_spilled)

    def _spilled(self, items: dict[str, bytes]) -> dict[str, bytes | _Spilled]:
        """The batch as it will be held: values past the memory bound replaced by where they spilled."""
        if self._spill is None:
            return items  # type: ignore[return-value]
        room = self.memory_bytes - (self._stats.bytes_held - self._stats.bytes_spilled)
        out: dict[str, bytes | _Spilled] = {}
        spill: list[str] = []
        for key, value in items.items():
            if len(key) + len(value) <= room:
                out[key] = value
                room -= len(key) + len(value)
            else:
                spill.append(key)
        if spill:
            for key, where in zip(spill, self._spill.write([items[k] for k in spill]), strict=True):
                out[key] = where
        return out

    def put_many(self, items: Mapping[str, bytes], ttl_ms: int) -> None:
        """Write all entries with one TTL; refuse the whole batch if it does not fit."""
        items = checked_batch(items, ttl_ms)
        incoming = sum(self._size(k, v) for k, v in items.items())
        self._reserve(
            incoming - sum(self._size(k, self._data[k][0]) for k in items if k in self._data), len(items)
        )
        expire_at = self.clock.now_ms() + int(ttl_ms)
        for key in items:
            if key in self._data:  # the old value's room is free before the new one is placed
                self._drop(key)
        for key, value in self._spilled(items).items():
            self._place(key, value, expire_at)
        self._stats.bytes_written += sum(len(v) for v in items.values())
        self._stats.writes += len(items)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Read values; an entry past its TTL reads as missing and is dropped.

        Raises:
            TypeError: If a key holds a list (written by ``append_many``).

        """
        now = self.clock.now_ms()
        out: list[bytes | None] = []
        for key in keys:
            entry = self._live(key, now)
            if entry is None:
                self._stats.misses += 1
                out.append(None)
                continue
            if isinstance(entry[0], list):
                raise TypeError(f"{key!r} holds a list; read it with get_lists_many")
            value = self._spill.read(entry[0]) if isinstance(entry[0], _Spilled) else entry[0]  # type: ignore[union-attr]
            self._stats.hits += 1
            self._stats.bytes_read += len(value)
            out.append(value)
        self._stats.reads += len(keys)
        return out

    def touch_many(self, keys: Sequence[str], ttl_ms: int) -> list[bool]:
        """Extend each live key to expire no sooner than ``ttl_ms`` from now; True where it exists.

        Raises:
            ValueError: If ``ttl_ms`` is not positive.

        """
        if ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be positive, got {ttl_ms}")
        now = self.clock.now_ms()
        expire_at = now + int(ttl_ms)
        out = []
        for key in keys:
            entry = self._live(key, now)
            out.append(entry is not None)
            if entry is not None and entry[1] < expire_at:
                self._data[key] = (entry[0], expire_at)
                heapq.heappush(self._expiry, (expire_at, key))  # the older heap entry no longer matches
        self._stats.touches += sum(out)
        return out

    def append_many(self, items: Mapping[str, bytes], ttl_ms: int) -> None:
        """Append one chunk to each key's list and reset its TTL; all or none are written.

        Raises:
            TypeError: If a key holds a value written by ``put_many``.

        """
        items = checked_batch(items, ttl_ms)
        now = self.clock.now_ms()
        for key in items:
            entry = self._live(key, now)
            if entry is not None and not isinstance(entry[0], list):
                raise TypeError(f"{key!r} holds a value, not a list")
        self._reserve(sum(len(v) + (0 if k in self._data else len(k)) for k, v in items.items()), len(items))
        expire_at = now + int(ttl_ms)
        for key, value in items.items():
            old = self._data.get(key)
            self._place(key, [*(old[0] if old else []), value], expire_at)  # type: ignore[misc]
            self._stats.bytes_written += len(value)
        self._stats.writes += len(items)

    def get_lists_many(self, keys: Sequence[str]) -> list[list[bytes]]:
        """The chunks appended to each key, oldest first; empty for a missing key."""
        now = self.clock.now_ms()
        out: list[list[bytes]] = []
        for key in keys:
            entry = self._live(key, now)
            if entry is None:
                self._stats.misses += 1
                out.append([])
                continue
            if not isinstance(entry[0], list):
                raise TypeError(f"{key!r} holds a value; read it with get_many")
            self._stats.hits += 1
            self._stats.bytes_read += sum(map(len, entry[0]))
            out.append(list(entry[0]))
        self._stats.reads += len(keys)
        return out

    def append_once(self, entries: Sequence[OnceAppend], ttl_ms: int) -> list[bool]:
        """Append each chunk whose token is new to its guard set (a list of tokens here)."""
        out = []
        for entry in entries:
            (seen,) = self.get_lists_many([entry.guard_key])
            token = entry.token.encode()
            if token in seen:
                out.append(False)
                continue
            self.append_many({entry.list_key: entry.chunk, entry.guard_key: token}, ttl_ms)
            out.append(True)
        return out

    def delete_many(self, keys: Sequence[str]) -> int:
        """Delete the keys that exist; an entry past its TTL no longer exists (it counts as expired)."""
        now, n = self.clock.now_ms(), 0
        for key in keys:
            entry = self._data.get(key)
            if entry is not None:
                self._drop(key)
                if entry[1] <= now:
                    self._stats.expiries += 1
                else:
                    n += 1
        self._stats.deletes += n
        return n

    def purge_expired(self) -> int:
        """Drop every entry whose TTL has passed."""
        now, n = self.clock.now_ms(), 0
        while self._expiry and self._expiry[0][0] <= now:
            expire_at, key = heapq.heappop(self._expiry)
            entry = self._data.get(key)
            if entry is not None and entry[1] == expire_at:  # not rewritten with a later TTL
                self._drop(key)
                n += 1
        self._stats.expiries += n
        if not self._data:
            self._expiry.clear()
        return n

    def close(self) -> None:
        """Release the spill files (the store holds nothing on disk afterwards)."""
        if self._spill is not None:
            for key in [k for k, (v, _) in self._data.items() if isinstance(v, _Spilled)]:
                self._drop(key)
            self._spill.close()

    def stats(self) -> TransientStats:
        """A snapshot of the counters."""
        return TransientStats(**asdict(self._stats))

    def __len__(self) -> int:
        return len(self._data)
