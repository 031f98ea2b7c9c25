"""Content-addressed feature rows: stored once per distinct content, referenced by a 64-bit hash.

Across requests the same item feature row (same item, same feature values) is logged again and
again, and a user's slowly changing features (``changes = "rarely"``) with each of their requests.
With the lazy logger's ``shared_rows`` option, each such row is stored once, as a ROW blob under
``lr:{r<16 hex digits>}``, the hash of its exact bytes, and a page (a request side) keeps only the
hash in its place (see :mod:`leanrec.featurelog.codec`).

Key scheme: a shared row is its own Redis Cluster hash tag, so it lives on the shard of its hash, not
on the shard of any request that uses it; a request's own keys keep ``lr:{<request_id>}:…``. A
joiner reading one request therefore reads its own keys from one shard, then its rows from up to
as many shards as the cluster has (a second round trip, sent to every shard at once, an MGET per
hash slot). Measured by ``benchmarks/shared_rows.py`` on a local cluster of 3 masters (1,000
requests of the synthetic world, medians of 3): 3 round trips per joined request instead of 2 (the
event batches, the request's keys, its rows), 4.6 shards touched instead of 2, 12.8 MGET and LRANGE
commands instead of 2, and 2.3x the joiner's CPU per example (95 µs against 41 µs).

Lifetime: a row is written once, with the TTL of the request that first uses it, and every later use
extends it (``TransientStore.touch_many``, no bytes sent) to at least the using request's TTL, so a
row outlives every request that references it and nothing outlives its TTL. A logger remembers the
rows it wrote or extended with their expiry (:class:`RowCache`, bounded): a row that already outlives
the new request needs nothing; one that would expire sooner is extended, ``row_slack_ms`` past
the request's TTL, so the next uses within that slack need nothing either; one the cache does not know is
written (identical content, so overwriting is harmless); an extension that finds the key gone (an
eviction, a server restart) writes the bytes in a follow-up. The joiner never deletes a shared
row (other requests may use it): rows expire by their TTL.

The hash is 64 bits: two different rows alive at once collide with probability about
``rows**2 / 2**65`` (1e8 rows held at once: 3e-4), in which case a join would read the other row.
"""

from __future__ import annotations

import numpy as np

from leanrec.featurelog.codec import RowTable
from leanrec.schema import FeatureBlock, FeatureSet

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_S29, _S31 = np.uint64(29), np.uint64(31)
_MULTIPLIERS: dict[int, tuple[np.ndarray, np.ndarray]] = {}
_SEEDS: dict[tuple[int, int, int], np.uint64] = {}


def _mix(x: np.ndarray) -> np.ndarray:
    """A final avalanche, elementwise: a bijection of uint64 whose low bits depend on every input bit.

    In place on a fresh array. Array arithmetic wraps modulo 2**64 silently (only numpy scalars
    warn), so no ``errstate``, which would cost more than the arithmetic on a page's few rows.
    """
    x ^= x >> _S31
    x *= _M1
    x ^= x >> _S29
    return x


def _multipliers(width: int) -> tuple[np.ndarray, np.ndarray]:
    """Two ``(width,)`` fixed odd uint64 multipliers per column (so a value's column counts)."""
    got = _MULTIPLIERS.get(width)
    if got is None:
        rng = np.random.default_rng(0x5EED)
        odd = [
            rng.integers(0, 2**63, size=width, dtype=np.uint64) * np.uint64(2) + np.uint64(1) for _ in "ab"
        ]
        got = _MULTIPLIERS[width] = (odd[0], odd[1])
    return got


def _seed(fs: FeatureSet, table: RowTable) -> np.uint64:
    key = (fs.fingerprint, fs.version, int(table))
    got = _SEEDS.get(key)
    if got is None:
        got = _SEEDS[key] = _mix(
            np.array([(fs.fingerprint << 24) | (fs.version << 8) | int(table)], np.uint64)
        )[0]
    return got


def row_hashes(fs: FeatureSet, table: RowTable, block: FeatureBlock) -> np.ndarray:
    """``(n,)`` uint64 hash of each row's exact bytes (NaN payloads and -0.0 included).

    Each value ``x`` of column ``j`` becomes ``g(x * a_j)`` (``g`` an xor-shift: a bijection, as is
    the product with an odd ``a_j``), the row's values are summed weighted by ``b_j`` (modulo
    2**64), and the sum is mixed with a seed of the FeatureSet and table, so rows of another
    FeatureSet or table never share a key. About a dozen numpy operations over the whole
    ``(n, columns)`` matrix: no loop per row or per column. Not built to resist rows crafted to
    collide: every row is the ranker's own.
    """
    n, wi = block.ints.shape
    words = np.empty((n, wi + block.floats.shape[1]), np.uint64)
    words[:, :wi] = block.ints  # int64 to uint64 keeps the bits
    words[:, wi:] = block.floats.view(np.uint32)  # float32 blocks: their bits, widened
    a, b = _multipliers(words.shape[1])
    words *= a
    words ^= words >> _S29
    summed = words @ b  # wraps modulo 2**64
    summed ^= _seed(fs, table)
    return _mix(summed)


def row_keys(hashes: np.ndarray) -> list[str]:
    """The transient key of each row: ``lr:{r<16 hex digits>}``, the braces its own hash tag."""
    text = np.ascontiguousarray(hashes, ">u8").tobytes().hex()
    return [f"lr:{{r{text[i : i + 16]}}}" for i in range(0, len(text), 16)]


class RowCache:
    """Rows this logger wrote or extended recently, with when each expires: direct-mapped, bounded.

    A row's slot is its hash's low bits; a newer row taking the slot forgets the older one, which
    costs at worst one write (or extension) more. Lookups and updates are vectorised.

    Args:
        slots: Rows remembered at most (rounded up to a power of two); 16 bytes each.

    """

    def __init__(self, slots: int = 1 << 18) -> None:
        if slots <= 0:
            raise ValueError(f"row cache slots must be positive, got {slots}")
        size = 1 << (int(slots) - 1).bit_length()
        self._mask = np.uint64(size - 1)
        self._hash = np.zeros(size, np.uint64)
        self._expiry = np.zeros(size, np.int64)  # 0: nothing known (a zero hash reads as unknown too)

    def expiry(self, hashes: np.ndarray) -> np.ndarray:
        """``(n,)`` int64 ms when each row is known to expire; 0 where the cache does not know it."""
        slot = (hashes & self._mask).astype(np.intp)
        return np.where(self._hash[slot] == hashes, self._expiry[slot], 0)

    def remember(self, hashes: np.ndarray, expire_at_ms: int) -> None:
        """The rows live until at least ``expire_at_ms`` (a later expiry already known is kept)."""
        if not len(hashes):
            return
        slot = (hashes & self._mask).astype(np.intp)
        known = np.where(self._hash[slot] == hashes, self._expiry[slot], 0)
        self._hash[slot] = hashes
        self._expiry[slot] = np.maximum(known, expire_at_ms)

    def forget(self, hashes: np.ndarray) -> None:
        """Forget the rows (their write failed, or they were found gone)."""
        slot = (hashes & self._mask).astype(np.intp)
        self._expiry[slot[self._hash[slot] == hashes]] = 0
