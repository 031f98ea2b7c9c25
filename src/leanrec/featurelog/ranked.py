"""RankedBatch: what a ranker hands to logging, whichever ranker it is.

It holds the ranked item ids, the scores and the very features the late ranker scored, packed in the
FeatureSet's layouts, so a logger can freeze exactly those bytes. leanrec's own funnel returns one;
a ranking service of its own builds one from its arrays (see :func:`leanrec.featurelog.inputs.pack`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from leanrec.schema import FeatureBlock


@dataclass
class RankedBatch:
    """B ranked requests, with the features the late ranker scored.

    Attributes:
        user_ids: ``(B,)`` int64.
        item_ids: ``(B, n)`` int64 raw ids, in ranked order.
        scores: ``(B, n)`` float32 late-ranker scores, in ranked order (leanrec's funnel: descending
            along axis 1). Each is logged with its item and lands in the warehouse's ``score``
            column; NaN where the ranker gave none (stored as null there).
        request: Request-side features, B rows.
        items: Item-side features, ``B * n`` rows; request b's items are rows ``b*n .. b*n+n-1`` in
            ranked order.

    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    scores: np.ndarray
    request: FeatureBlock
    items: FeatureBlock

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        """Items ranked per request."""
        return self.item_ids.shape[1]
