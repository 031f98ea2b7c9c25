"""RecBole's default protocol for general recommendation: a per-user random 8:1:1 split, full ranking.

Each user's interactions are shuffled and split into train, validation and test by ratio, with
RecBole's rounding (every part but the first gets ``floor(ratio × n)``, a part whose share is between 0
and 1 interaction gets one while the training part keeps more than one, and the training part the
rest). A model then scores every item for every evaluated user; the items the user interacted with in
the earlier parts are masked, and the top ``k`` are compared with the held-out part.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from leanrec.retrieval.atomic import Interactions


def split_counts(total: np.ndarray, ratios: tuple[float, ...]) -> np.ndarray:
    """``(users, parts)`` interactions of each user in each part, with RecBole's rounding.

    Args:
        total: ``(users,)`` interactions per user.
        ratios: Share of each part.

    """
    total = np.asarray(total, dtype=np.int64)
    cnt = np.floor(np.outer(total, ratios)).astype(np.int64)
    cnt[:, 0] = total - cnt[:, 1:].sum(1)
    for i in range(1, len(ratios)):  # parts, not users: a handful of steps
        share = ratios[-i] * total
        bump = (cnt[:, 0] > 1) & (share > 0) & (share < 1)
        cnt[bump, -i] += 1
        cnt[bump, 0] -= 1
    return cnt


@dataclass(frozen=True)
class Split:
    """Train, validation and test interactions of the same users and items.

    Attributes:
        n_users: Users.
        n_items: Items.
        parts: ``(user, item)`` arrays of each part: train, validation, test.

    """

    n_users: int
    n_items: int
    parts: tuple[tuple[np.ndarray, np.ndarray], ...]

    def matrix(self, *which: int) -> sp.csr_matrix:
        """Binary users × items matrix of the union of the parts ``which``."""
        u = np.concatenate([self.parts[i][0] for i in which])
        it = np.concatenate([self.parts[i][1] for i in which])
        m = sp.csr_matrix((np.ones(len(u), np.float32), (u, it)), shape=(self.n_users, self.n_items))
        m.data[:] = 1.0  # a repeated pair is one interaction for ranking
        return m

    @property
    def train(self) -> tuple[np.ndarray, np.ndarray]:
        """The training part."""
        return self.parts[0]


def random_split(data: Interactions, ratios: tuple[float, ...] = (0.8, 0.1, 0.1), seed: int = 2020) -> Split:
    """Shuffle each user's interactions and split them by ``ratios``.

    Raises:
        ValueError: Ratios that are not positive or do not sum to 1.

    """
    if any(r <= 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-9:
        raise ValueError(f"split ratios must be positive and sum to 1, got {ratios}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data))
    order = order[np.argsort(data.user[order], kind="stable")]  # by user, shuffled within each
    _, starts, sizes = np.unique(data.user[order], return_index=True, return_counts=True)
    bounds = np.cumsum(split_counts(sizes, ratios), axis=1)[
        :, :-1
    ]  # (users, parts - 1) first row of each later part
    rank = np.arange(len(order)) - np.repeat(starts, sizes)  # position within the user's shuffled rows
    part = (rank[:, None] >= np.repeat(bounds, sizes, axis=0)).sum(1)
    rows = [order[part == p] for p in range(len(ratios))]
    return Split(data.n_users, data.n_items, tuple((data.user[r], data.item[r]) for r in rows))
