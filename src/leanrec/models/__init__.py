"""Ranking models built from the FeatureSet."""

from leanrec.models.ranker import LateRanker, RankerConfig, UserSide
from leanrec.models.scorer import ModelScorer

__all__ = ["LateRanker", "ModelScorer", "RankerConfig", "UserSide"]
