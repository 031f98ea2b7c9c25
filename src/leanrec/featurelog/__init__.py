"""Feature logging: the codec, and the eager (naive) and lazy (lean) loggers."""

from leanrec.featurelog.codec import BlobKind, CodecError
from leanrec.featurelog.loggers import (
    ContextCache,
    EagerLogger,
    FeatureLogger,
    Fetched,
    LazyLogger,
    LoggerStats,
    Paging,
    RequestContext,
    key,
)

__all__ = [
    "BlobKind",
    "CodecError",
    "ContextCache",
    "EagerLogger",
    "FeatureLogger",
    "Fetched",
    "LazyLogger",
    "LoggerStats",
    "Paging",
    "RequestContext",
    "key",
]
