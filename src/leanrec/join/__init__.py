"""Joining frozen features with later engagement."""

from leanrec.join.joiner import JoinStats, LabelJoiner, RecordSink

__all__ = ["JoinStats", "LabelJoiner", "RecordSink"]
