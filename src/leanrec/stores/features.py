"""FeatureStore: the current (mutable) features of users and items, read at rank time.

Values here change as the world moves (follower counts grow, like rates drift): that is why the
features a model scored are frozen and logged rather than looked up again at join time.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from leanrec.ids import IdIndex
from leanrec.schema import FeatureBlock, FeatureSet, Owner


@runtime_checkable
class FeatureStore(Protocol):
    """Read and write entity features in batches."""

    def get_many(self, owner: Owner, ids: np.ndarray) -> FeatureBlock:
        """Features of ``ids`` (shape ``(N,)``) as an owner block of N rows (a copy)."""
        ...

    def put_many(self, owner: Owner, ids: np.ndarray, block: FeatureBlock) -> None:
        """Overwrite the features of ``ids`` with the rows of ``block``."""
        ...

    def get_feature(self, owner: Owner, name: str, ids: np.ndarray) -> np.ndarray:
        """One feature of ``ids``: ``(N, size)``; cheap candidate scoring reads only what it needs."""
        ...


class MemoryFeatureStore:
    """In-process FeatureStore: one float32 and one int64 array per owner, rows found by raw id.

    Args:
        featureset: Defines each owner's block widths.
        blocks: Initial features per owner, ``N_owner`` rows each.
        ids: The raw 64-bit id of each row, per owner (``(N_owner,)``, distinct); an owner left out
            numbers its rows ``0..N_owner-1``.

    Raises:
        ValueError: A block of other widths than the FeatureSet's, or ids that are not one distinct
            id per row.

    """

    def __init__(
        self,
        featureset: FeatureSet,
        blocks: dict[Owner, FeatureBlock],
        ids: dict[Owner, np.ndarray] | None = None,
    ) -> None:
        self.featureset = featureset
        self.blocks = blocks
        self._index: dict[Owner, IdIndex] = {}
        for owner, block in blocks.items():
            want = featureset.widths(owner)
            got = (block.floats.shape[1], block.ints.shape[1])
            if want != got:
                raise ValueError(f"{owner} block has widths {got}, FeatureSet says {want}")
            given = (ids or {}).get(owner)
            own = np.arange(len(block), dtype=np.int64) if given is None else np.asarray(given, np.int64)
            if own.shape != (len(block),):
                raise ValueError(f"{len(own)} {owner} ids for a block of {len(block)} rows")
            self._index[owner] = IdIndex(own, owner.value)

    @property
    def ids(self) -> dict[Owner, np.ndarray]:
        """The raw id of each row, per owner."""
        return {owner: index.ids for owner, index in self._index.items()}

    def _block(self, owner: Owner) -> FeatureBlock:
        try:
            return self.blocks[owner]
        except KeyError:
            raise KeyError(f"feature store holds no {owner} features") from None

    def count(self, owner: Owner) -> int:
        """Number of entities of an owner."""
        return len(self._block(owner))

    def rows(self, owner: Owner, ids: np.ndarray) -> np.ndarray:
        """The rows of raw ``ids`` (``(N,)`` int64 in, ``(N,)`` int64 out).

        Raises:
            KeyError: Naming the ids the store does not hold.

        """
        self._block(owner)
        return self._index[owner].rows(ids)

    def get_many(self, owner: Owner, ids: np.ndarray) -> FeatureBlock:
        """Gather rows; fancy indexing returns a copy, so later writes cannot reach it."""
        return self._block(owner).take(self.rows(owner, ids))

    def get_feature(self, owner: Owner, name: str, ids: np.ndarray) -> np.ndarray:
        """Gather one feature's columns."""
        slot = self.featureset.owner_slots(owner)[name]
        block = self._block(owner)
        src = block.floats if slot.feature.is_float else block.ints
        return src[self.rows(owner, ids), slot.offset : slot.stop]

    def put_many(self, owner: Owner, ids: np.ndarray, block: FeatureBlock) -> None:
        """Scatter rows (of ids the store holds: it does not grow)."""
        rows = self.rows(owner, ids)
        target = self._block(owner)
        target.floats[rows] = block.floats
        target.ints[rows] = block.ints
