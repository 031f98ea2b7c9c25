"""A trained retrieval model as a file a serving process loads: embeddings, ids, what to mask.

A retrieval model of :mod:`leanrec.retrieval` scores a user against every item by a dot product of
their final embeddings (Pop is the same with a one-dimensional user vector of ones). Serving needs
only those two matrices, not the model or torch: :func:`save_index` writes them to one ``.npz`` with
the catalog ids of their rows and, per user, the items the model was trained on (masked at serving,
as the evaluation protocol masks them), and :class:`RetrievalIndex` answers the top ``k`` of a batch
of users with numpy alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leanrec.errors import InputError

INDEX_FORMAT = 1


class RetrievalIndexError(InputError, ValueError):
    """A retrieval index file that cannot be used, with the reason."""


def embeddings_of(model: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(U, d)`` user and ``(I, d)`` item embeddings whose dot products are ``model``'s scores.

    Raises:
        TypeError: A model that does not score by a dot product (ItemKNN).

    """
    import torch

    if hasattr(model, "_final"):
        with torch.no_grad():
            users, items = model._final()
        return users.detach().numpy().astype(np.float32), items.detach().numpy().astype(np.float32)
    counts = getattr(model, "counts", None)
    if counts is not None:  # Pop: every user's vector is 1, each item's its count
        n_users = int(getattr(model, "n_users", 1))
        return np.ones((n_users, 1), np.float32), counts.numpy().astype(np.float32)[:, None]
    raise TypeError(f"{type(model).__name__} does not score by a dot product of embeddings")


def save_index(
    path: str | Path,
    users: np.ndarray,
    items: np.ndarray,
    user_ids: np.ndarray | None = None,
    item_ids: np.ndarray | None = None,
    seen: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """Write a retrieval index.

    Args:
        path: ``.npz`` file to write.
        users: ``(U, d)`` user embeddings.
        items: ``(I, d)`` item embeddings.
        user_ids: ``(U,)`` catalog id of each user row (default ``0..U-1``).
        item_ids: ``(I,)`` catalog id of each item row (default ``0..I-1``).
        seen: ``(user_row, item_row)`` pairs the model was trained on; masked at serving.

    """
    u, i = np.asarray(users, np.float32), np.asarray(items, np.float32)
    if u.ndim != 2 or i.ndim != 2 or u.shape[1] != i.shape[1]:
        raise ValueError(f"embeddings must be (U, d) and (I, d), got {u.shape} and {i.shape}")
    uid = np.arange(len(u)) if user_ids is None else np.asarray(user_ids, np.int64)
    iid = np.arange(len(i)) if item_ids is None else np.asarray(item_ids, np.int64)
    su, si = (np.zeros(0, np.int64),) * 2 if seen is None else (np.asarray(s, np.int64) for s in seen)
    order = np.argsort(su, kind="stable")
    indptr = np.searchsorted(su[order], np.arange(len(u) + 1))
    np.savez(
        path,
        format=INDEX_FORMAT,
        users=u,
        items=i,
        user_ids=uid,
        item_ids=iid,
        seen_indptr=indptr,
        seen_items=si[order],
    )


@dataclass
class RetrievalIndex:
    """Top-``k`` retrieval by dot product over the whole catalog, for a batch of users.

    Attributes:
        users: ``(U, d)`` user embeddings.
        items: ``(I, d)`` item embeddings.
        user_ids: ``(U,)`` catalog ids of the user rows.
        item_ids: ``(I,)`` catalog ids of the item rows.
        seen_indptr: ``(U + 1,)`` CSR offsets into ``seen_items`` per user row.
        seen_items: Item rows each user was trained on, masked from their candidates.

    """

    users: np.ndarray
    items: np.ndarray
    user_ids: np.ndarray
    item_ids: np.ndarray
    seen_indptr: np.ndarray
    seen_items: np.ndarray

    def __post_init__(self) -> None:
        self._user_row = dict(zip(self.user_ids.tolist(), range(len(self.user_ids)), strict=True))
        self._items_t = np.ascontiguousarray(self.items.T)  # (d, I)

    @classmethod
    def load(cls, path: str | Path) -> RetrievalIndex:
        """Read a file :func:`save_index` wrote.

        Raises:
            RetrievalIndexError: Missing, unreadable, or not a leanrec retrieval index.

        """
        try:
            with np.load(path, allow_pickle=False) as data:
                if int(data["format"]) != INDEX_FORMAT:
                    got = int(data["format"])
                    raise RetrievalIndexError(f"{path}: retrieval index format {got} is not known")
                arrays = {k: data[k] for k in ("users", "items", "user_ids", "item_ids")}
                arrays |= {k: data[k] for k in ("seen_indptr", "seen_items")}
        except FileNotFoundError:
            raise RetrievalIndexError(f"retrieval index {path} does not exist") from None
        except (OSError, ValueError, KeyError) as exc:
            raise RetrievalIndexError(
                f"{path} is not a retrieval index ({exc}); write one with leanrec.retrieval.save_index"
            ) from None
        return cls(**arrays)

    @property
    def n_items(self) -> int:
        """Items it retrieves from."""
        return len(self.item_ids)

    def top(self, user_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best items of each user, best first.

        A user the index does not know (one who arrived after it was trained) gets the items of the
        mean user vector, the catalog's most generally liked.

        Args:
            user_ids: ``(B,)`` catalog user ids.
            k: Candidates per user (at most the catalog's size).

        Returns:
            ``(B, k)`` catalog item ids and ``(B, k)`` float32 scores.

        """
        rows = np.array([self._user_row.get(int(u), -1) for u in user_ids], np.int64)
        known = rows >= 0
        q = np.where(known[:, None], self.users[np.maximum(rows, 0)], self.users.mean(0))
        scores = q @ self._items_t  # (B, I)
        for b in np.flatnonzero(known):  # B is small at serving: one masked slice per user
            r = rows[b]
            scores[b, self.seen_items[self.seen_indptr[r] : self.seen_indptr[r + 1]]] = -np.inf
        k = min(k, self.n_items)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        s = np.take_along_axis(scores, top, 1)
        order = np.argsort(-s, axis=1, kind="stable")
        top, s = np.take_along_axis(top, order, 1), np.take_along_axis(s, order, 1)
        return self.item_ids[top], s.astype(np.float32)
