"""The ranking funnel: retrieval, early ranking, late ranking."""

from leanrec.funnel.ranker import Funnel, LateScorer, RankedBatch, StandInScorer

__all__ = ["Funnel", "LateScorer", "RankedBatch", "StandInScorer"]
