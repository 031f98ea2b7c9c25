"""A trained late ranker as the funnel's late-stage scorer (closing the loop)."""

from __future__ import annotations

import numpy as np
import torch

from leanrec.models.ranker import LateRanker
from leanrec.schema import FeatureBlock


class ModelScorer:
    """Scores ranked candidates with a trained model, the user side once per request.

    Args:
        model: A trained late ranker of the FeatureSet the funnel serves.

    """

    def __init__(self, model: LateRanker) -> None:
        self.model = model.eval()

    def score(self, request: FeatureBlock, items: FeatureBlock, n: int) -> np.ndarray:
        """Click logits ``(B, n)`` for B request rows and ``B * n`` item rows."""
        b = len(request)
        with torch.no_grad():
            logits = self.model(
                torch.from_numpy(np.ascontiguousarray(request.floats)),
                torch.from_numpy(request.ints.astype(np.int64)),
                torch.from_numpy(np.ascontiguousarray(items.floats)),
                torch.from_numpy(items.ints.astype(np.int64)),
                torch.arange(b).repeat_interleave(n),
            )
        return logits[:, 0].numpy().reshape(b, n)
