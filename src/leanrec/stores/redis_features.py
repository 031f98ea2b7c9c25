"""RedisFeatureStore: the FeatureStore protocol on Redis hashes, one hash per entity.

An entity's features are its row of the owner's block (``FeatureSet.widths(owner)`` columns, laid out
as ``FeatureSet.owner_slots(owner)`` says), kept as two raw little-endian buffers: the hash
``{prefix}:{owner}:{id}`` has the field ``f`` (the float32 row) and the field ``i`` (the int64 row).
Storing the row as bytes rather than one field per feature keeps a read of N entities at one pipeline
of N ``HMGET`` and one ``np.frombuffer`` over the joined replies, with no Python work per value, and
keeps the bytes exactly those of the in-process store (NaN payloads and ``-0.0`` included).

A row whose length does not match the FeatureSet's widths (written with another FeatureSet version,
or by another program) is refused rather than misread.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager

import numpy as np
import redis
import redis.exceptions

from leanrec.ids import beyond_int64
from leanrec.schema import FeatureBlock, FeatureSet, Owner
from leanrec.stores.features import MemoryFeatureStore
from leanrec.stores.redis_common import answering, connect, redact

_F32 = np.dtype("<f4")
_I64 = np.dtype("<i8")


class RedisFeatureStore:
    """FeatureStore on a Redis server: one hash per entity, one pipeline per batch.

    Ids are deduplicated before they are sent (a candidate list repeats items across requests), so
    the server sees each entity once per batch.

    Args:
        url: ``redis://[user:password@]host:port/db``, as ``redis.Redis.from_url`` takes it.
        featureset: Defines each owner's row widths and feature slots.
        prefix: Key prefix; stores of different FeatureSet lineages on one server need distinct ones.

    Raises:
        ConnectionError: If the server at ``url`` does not answer (the URL's password is redacted).

    """

    def __init__(self, url: str, featureset: FeatureSet, prefix: str = "lr:f") -> None:
        self.url = url
        self.featureset = featureset
        self.prefix = prefix
        self._client: redis.Redis = connect(url)
        with self._errors():
            self._client.ping()

    def _errors(self) -> AbstractContextManager[None]:
        return answering("Redis feature store", self.url)

    # ------------------------------------------------------------------------------- helpers
    @staticmethod
    def _ids(ids: np.ndarray) -> np.ndarray:
        """``ids`` as a 1-D int64 array; refuses anything that is not integer ids, or past int64."""
        arr = np.asarray(ids)
        if arr.size == 0:
            return np.zeros(0, np.int64)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise TypeError(f"ids must be a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
        if beyond_int64(arr).any():
            raise ValueError(f"ids are int64, got {int(arr.max())} (past 2**63)")  # never wrap around
        return arr.astype(np.int64, copy=False)

    def key(self, owner: Owner, entity_id: int) -> str:
        """Redis key of one entity's hash."""
        return f"{self.prefix}:{Owner(owner).value}:{int(entity_id)}"

    def _keys(self, owner: Owner, ids: np.ndarray) -> list[str]:
        head = f"{self.prefix}:{Owner(owner).value}:"
        return [f"{head}{i}" for i in ids.tolist()]

    def _missing(self, owner: Owner, ids: np.ndarray) -> KeyError:
        shown = ", ".join(str(i) for i in ids[:10].tolist()) + (", ..." if len(ids) > 10 else "")
        return KeyError(
            f"feature store holds no {Owner(owner).value} features for {len(ids)} id(s): [{shown}] "
            f"(Redis at {redact(self.url)}, prefix {self.prefix!r})"
        )

    def _rows(
        self, owner: Owner, ids: np.ndarray, values: Sequence[bytes | None], width: int, dtype: np.dtype
    ) -> np.ndarray:
        """Decode one field of N hashes into an ``(N, width)`` array with one ``np.frombuffer``.

        Raises:
            KeyError: If an entity has no such field (it is not in the store).
            ValueError: If a row's length does not match the FeatureSet's width.

        """
        n = len(values)
        lengths = np.fromiter((-1 if v is None else len(v) for v in values), np.int64, count=n)
        absent = lengths < 0
        if absent.any():
            raise self._missing(owner, ids[absent])
        wrong = lengths != width * dtype.itemsize
        if wrong.any():
            k = int(np.argmax(wrong))
            raise ValueError(
                f"{self.key(owner, ids[k])} holds a row of {lengths[k]} B, the FeatureSet "
                f"{self.featureset.name} v{self.featureset.version} says {width * dtype.itemsize} B "
                f"(written with another FeatureSet?)"
            )
        buf = bytearray().join(values)  # type: ignore[arg-type]  # writable: callers own the result
        return np.frombuffer(buf, dtype).reshape(n, width)

    # ------------------------------------------------------------------------------- protocol
    def get_many(self, owner: Owner, ids: np.ndarray) -> FeatureBlock:
        """Rows of ``ids`` in order, as an owner block of N rows that the caller owns.

        One pipeline of ``HMGET key f i`` over the distinct ids.

        Raises:
            KeyError: Naming the owner and the ids the store does not hold.

        """
        ids = self._ids(ids)
        fw, iw = self.featureset.widths(owner)
        if len(ids) == 0:
            return FeatureBlock(np.zeros((0, fw), _F32), np.zeros((0, iw), _I64))
        uniq, inverse = np.unique(ids, return_inverse=True)
        with self._errors():
            pipe = self._client.pipeline(transaction=False)
            for key in self._keys(owner, uniq):
                pipe.hmget(key, "f", "i")
            replies = pipe.execute()
        floats = self._rows(owner, uniq, [r[0] for r in replies], fw, _F32)
        ints = self._rows(owner, uniq, [r[1] for r in replies], iw, _I64)
        return FeatureBlock(floats[inverse], ints[inverse])  # back to the asked order, duplicates too

    def put_many(self, owner: Owner, ids: np.ndarray, block: FeatureBlock) -> None:
        """Overwrite (or create) the hashes of ``ids`` with the rows of ``block``: one pipeline of HSET.

        Values are cast to float32 and int64 as the in-process store casts them.

        Raises:
            ValueError: If ``block`` does not have one row per id, or not the owner's widths.

        """
        ids = self._ids(ids)
        fw, iw = self.featureset.widths(owner)
        if len(block) != len(ids) or block.ints.shape[0] != len(ids):
            raise ValueError(f"{len(ids)} ids but a block of {len(block)} rows")
        got = (block.floats.shape[1], block.ints.shape[1])
        if got != (fw, iw):
            raise ValueError(f"{Owner(owner).value} block has widths {got}, FeatureSet says {(fw, iw)}")
        if len(ids) == 0:
            return
        fbytes = np.ascontiguousarray(block.floats, _F32).tobytes()
        ibytes = np.ascontiguousarray(block.ints, _I64).tobytes()
        fstep, istep = _F32.itemsize * fw, _I64.itemsize * iw
        with self._errors():
            pipe = self._client.pipeline(transaction=False)
            for k, key in enumerate(self._keys(owner, ids)):
                row = {"f": fbytes[k * fstep : (k + 1) * fstep], "i": ibytes[k * istep : (k + 1) * istep]}
                pipe.hset(key, mapping=row)  # type: ignore[arg-type]
            pipe.execute()

    def get_feature(self, owner: Owner, name: str, ids: np.ndarray) -> np.ndarray:
        """One feature of ``ids``: ``(N, size)``. Reads only the float or the int row (``HGET``).

        Raises:
            KeyError: If the owner has no feature ``name``, or the store does not hold some ids.

        """
        slot = self.featureset.owner_slots(owner)[name]
        is_float = slot.feature.is_float
        fw, iw = self.featureset.widths(owner)
        width, dtype, field = (fw, _F32, "f") if is_float else (iw, _I64, "i")
        ids = self._ids(ids)
        if len(ids) == 0:
            return np.zeros((0, slot.feature.size), dtype)
        uniq, inverse = np.unique(ids, return_inverse=True)
        with self._errors():
            pipe = self._client.pipeline(transaction=False)
            for key in self._keys(owner, uniq):
                pipe.hget(key, field)
            replies = pipe.execute()
        rows = self._rows(owner, uniq, replies, width, dtype)
        return rows[inverse, slot.offset : slot.stop]

    # ------------------------------------------------------------------------------- extras
    def load_from(self, store: MemoryFeatureStore, batch_size: int = 5_000) -> int:
        """Copy every entity of an in-process store into Redis, ``batch_size`` entities per pipeline.

        Each row keeps its raw id (``store.ids``).

        Returns:
            Entities copied, all owners together.

        Raises:
            ValueError: If the stores' FeatureSets differ in shape, or ``batch_size`` is not positive.

        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if store.featureset.fingerprint != self.featureset.fingerprint:
            raise ValueError(
                f"cannot load FeatureSet {store.featureset.name} v{store.featureset.version} into a store "
                f"of {self.featureset.name} v{self.featureset.version}: their features differ"
            )
        copied = 0
        for owner, block in store.blocks.items():
            for lo in range(0, len(block), batch_size):
                hi = min(lo + batch_size, len(block))
                self.put_many(owner, store.ids[owner][lo:hi], block.take(slice(lo, hi)))
                copied += hi - lo
        return copied

    def close(self) -> None:
        """Close the connections to the server."""
        self._client.close()
