"""Ranking models built from the FeatureSet."""

from leanrec.models.ranker import LateRanker, RankerConfig, UserSide, distinct_rows
from leanrec.models.scorer import ModelScorer

__all__ = ["LateRanker", "ModelScorer", "RankerConfig", "UserSide", "distinct_rows"]
