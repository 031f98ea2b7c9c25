"""Raw ids at the edge: string ids hashed to 64 bits, and a bijective mix of 64-bit ids.

leanrec carries a catalog's ids as they are, int64 of any value but ``PAD_ID`` (-1). A catalog whose
ids are strings (``"sku-1234"``, a UUID) declares the feature's ids as strings, and every way in (the
library, the sidecar, the feature loader) hashes them here, so the same string is the same id in the
transient store, the warehouse, training and serving.

The hash is 64-bit FNV-1a over the string's UTF-8 bytes, read as a two's-complement int64:

    h = 0xcbf29ce484222325
    for each byte b:  h = ((h ^ b) * 0x100000001b3) mod 2**64
    id = h - 2**64 if h >= 2**63 else h         (and -2 if that is -1, the padding id)

It is a published, language-neutral function (a client can compute the same id in any language) and
needs no key. It is not a cryptographic hash: it is for ids, not secrets. Two distinct strings share
an id with chance about n**2 / 2**65 for n strings (1 in 37 million for a million strings); an id map
collides far more often than that (see ``leanrec.models.idmap``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)


def string_ids(values: Sequence[str] | np.ndarray | pa.Array) -> np.ndarray:
    """The 64-bit ids of strings: FNV-1a of their UTF-8 bytes (see the module's docstring).

    Vectorised over byte positions: one numpy pass per byte of the longest string, each over every
    string still that long, so a batch of short ids costs a few array operations, not a loop per id.

    Args:
        values: ``(n,)`` strings (a list, a numpy array of str or object, or an Arrow string array).

    Returns:
        ``(n,)`` int64 ids.

    Raises:
        ValueError: A value is missing (None) or not a string.

    """
    arr = (
        values
        if isinstance(values, pa.Array)
        else pa.array(np.asarray(values, dtype=object), pa.large_string())
    )
    if not pa.types.is_string(arr.type) and not pa.types.is_large_string(arr.type):
        raise ValueError(f"string ids must be strings, got {arr.type}")
    if arr.null_count:
        raise ValueError("string ids must not be missing (null)")
    arr = arr.cast(pa.large_string())
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = (
        np.frombuffer(arr.buffers()[2], np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    )
    starts, lengths = offsets[:-1], np.diff(offsets)
    h = np.full(len(arr), FNV_OFFSET, np.uint64)
    order = np.argsort(-lengths, kind="stable")  # longest first: rows still running are a prefix
    longest = int(lengths.max()) if len(arr) else 0
    sorted_len, sorted_start = lengths[order], starts[order]
    with np.errstate(over="ignore"):
        for k in range(longest):
            live = int(np.searchsorted(-sorted_len, -k, side="left"))  # rows longer than k bytes
            rows = order[:live]
            h[rows] = (h[rows] ^ data[sorted_start[:live] + k].astype(np.uint64)) * FNV_PRIME
    out = h.view(np.int64)
    out[out == -1] = -2  # -1 is the padding id
    return out


def beyond_int64(ids: np.ndarray) -> np.ndarray:
    """Which of ``ids`` no int64 can hold: unsigned values of 2**63 and more, ``(*S)`` bool.

    Such an id is refused, or unknown, everywhere; it is never wrapped onto a negative int64, since
    only the caller knows whether its unsigned ids mean their two's complement.
    """
    a = np.asarray(ids)
    if a.dtype.kind != "u":
        return np.zeros(a.shape, bool)
    return a >= np.uint64(2**63)


def mix64(ids: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer of ``ids``' 64 bits: a bijection of uint64 that scatters every bit.

    Args:
        ids: ``(*S)`` int64 or uint64.

    Returns:
        ``(*S)`` uint64.

    """
    z = np.asarray(ids).astype(np.int64, copy=False).view(np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def scrambled_ids(n: int, salt: int = 0) -> np.ndarray:
    """``n`` distinct raw 64-bit ids for entities numbered ``0 .. n-1``.

    How a catalog of its own numbering (the synthetic world, MovieLens) gets ids spread over the
    whole int64 range, so that nothing downstream works only because ids happen to be small.

    Args:
        n: Entities.
        salt: Distinguishes catalogs (users and items get different ids).

    Returns:
        ``(n,)`` int64, distinct (``mix64`` is a bijection), none of them the padding id.

    """
    out = mix64(np.arange(n, dtype=np.int64) + np.int64(salt + 1) * np.int64(1 << 40)).view(np.int64)
    if (out == -1).any():  # a bijection's one preimage of the padding id: vanishingly unlikely
        raise ValueError(f"scrambled ids of {n} entities with salt {salt} would hold the padding id")
    return out


class IdIndex:
    """Rows of raw ids: the position of each id in an array of distinct ids, by binary search.

    How a catalog numbered by its own rows (an array of features, a latent matrix) finds the row of
    a raw id: one sort at construction, a vectorised ``searchsorted`` per lookup.

    Args:
        ids: ``(n,)`` distinct int64 ids; row ``k`` is ``ids[k]``.
        what: What the ids are, for messages ("user", "item").

    Raises:
        ValueError: ``ids`` is not 1-D or holds an id twice.

    """

    def __init__(self, ids: np.ndarray, what: str = "entity") -> None:
        self.ids = np.asarray(ids, np.int64)
        if self.ids.ndim != 1:
            raise ValueError(f"{what} ids must be one-dimensional, got shape {self.ids.shape}")
        self.what = what
        self._order = np.argsort(self.ids, kind="stable")
        self._sorted = self.ids[self._order]
        if len(self._sorted) > 1 and (np.diff(self._sorted) == 0).any():
            raise ValueError(f"{what} ids are not distinct")

    def __len__(self) -> int:
        return len(self.ids)

    def find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``ids`` (``(*S)`` integers) and whether each is known (rows of unknown ones are 0).

        An unsigned id past 2**63 is no int64, so it is unknown (never wrapped onto a negative id).
        """
        given = np.asarray(ids)
        beyond = beyond_int64(given)
        ids = given.astype(np.int64)
        if not len(self._sorted):
            return np.zeros(ids.shape, np.int64), np.zeros(ids.shape, bool)
        at = np.minimum(np.searchsorted(self._sorted, ids), len(self._sorted) - 1)
        known = (self._sorted[at] == ids) & ~beyond
        return np.where(known, self._order[at], 0), known

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows of ``ids`` (``(*S)`` int64 in and out).

        Raises:
            KeyError: Naming (up to five of) the ids it does not hold.

        """
        rows, known = self.find(ids)
        if not known.all():
            raise KeyError(f"no {self.what} with id(s) {np.asarray(ids)[~known][:5].tolist()}")
        return rows
