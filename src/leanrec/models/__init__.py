"""Ranking models built from the FeatureSet."""

from leanrec.models.ranker import LateRanker, RankerConfig, UserSide

__all__ = ["LateRanker", "RankerConfig", "UserSide"]
