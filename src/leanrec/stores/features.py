"""FeatureStore: the current (mutable) features of users and items, read at rank time.

Values here change as the world moves (follower counts grow, like rates drift): that is why the
features a model scored are frozen and logged rather than looked up again at join time.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

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
    """In-process FeatureStore: one float32 and one int32 array per owner.

    Args:
        featureset: Defines each owner's block widths.
        blocks: Initial features per owner, ``N_owner`` rows each.

    """

    def __init__(self, featureset: FeatureSet, blocks: dict[Owner, FeatureBlock]) -> None:
        self.featureset = featureset
        self.blocks = blocks
        for owner, block in blocks.items():
            want = featureset.widths(owner)
            got = (block.floats.shape[1], block.ints.shape[1])
            if want != got:
                raise ValueError(f"{owner} block has widths {got}, FeatureSet says {want}")

    def _block(self, owner: Owner) -> FeatureBlock:
        try:
            return self.blocks[owner]
        except KeyError:
            raise KeyError(f"feature store holds no {owner} features") from None

    def count(self, owner: Owner) -> int:
        """Number of entities of an owner."""
        return len(self._block(owner))

    def _ids(self, owner: Owner, ids: np.ndarray) -> np.ndarray:
        """``ids`` as an index array, refusing ids the store does not hold (a negative index would wrap)."""
        ids = np.asarray(ids)
        n = len(self._block(owner))
        bad = ids[(ids < 0) | (ids >= n)]
        if len(bad):
            raise KeyError(f"no {owner} with id(s) {bad[:5].tolist()}: ids are 0..{n - 1}")
        return ids

    def get_many(self, owner: Owner, ids: np.ndarray) -> FeatureBlock:
        """Gather rows; fancy indexing returns a copy, so later writes cannot reach it."""
        return self._block(owner).take(self._ids(owner, ids))

    def get_feature(self, owner: Owner, name: str, ids: np.ndarray) -> np.ndarray:
        """Gather one feature's columns."""
        slot = self.featureset.owner_slots(owner)[name]
        block = self._block(owner)
        src = block.floats if slot.feature.is_float else block.ints
        return src[self._ids(owner, ids), slot.offset : slot.stop]

    def put_many(self, owner: Owner, ids: np.ndarray, block: FeatureBlock) -> None:
        """Scatter rows."""
        ids = self._ids(owner, ids)
        target = self._block(owner)
        target.floats[ids] = block.floats
        target.ints[ids] = block.ints
