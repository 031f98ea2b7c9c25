"""RequestRecord: one joined request, the unit the joiner emits and the warehouse stores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leanrec.schema import FeatureBlock


@dataclass
class RequestRecord:
    """The viewed items of one request, with the features the model scored and their labels.

    Attributes:
        request_id: Id of the request.
        user_id: Who it was ranked for.
        ts_ms: Rank time.
        fs_version: FeatureSet version the features were logged with.
        request: Request side (user and context), one row.
        positions: ``(k,)`` int32 rank positions of the viewed items, ascending.
        item_ids: ``(k,)`` int64, the catalog's raw ids.
        view_ms: ``(k,)`` int64 time of the first event on each item.
        items: Item side, k rows.
        labels: Label name → ``(k,)`` array (``click``, ``like``, ``share``, ``hide``: bool;
            ``watch_ms``: int32).
        scores: ``(k,)`` float32 the score the ranker gave each item at its position, as logged;
            NaN where it gave none, and None for a request without any. Not a feature: the
            warehouse keeps it (as null where there is none) for off-policy evaluation and for
            comparing a new model with the logged one.

    """

    request_id: str
    user_id: int
    ts_ms: int
    fs_version: int
    request: FeatureBlock
    positions: np.ndarray
    item_ids: np.ndarray
    view_ms: np.ndarray
    items: FeatureBlock
    labels: dict[str, np.ndarray]
    scores: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.positions)
