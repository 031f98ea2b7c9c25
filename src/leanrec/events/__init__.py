"""Events: the model, its validation, and the bus that carries them to the joiner."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from leanrec.events.bus import EventBus, MemoryEventBus, Message, RequestOpened, Undecodable
from leanrec.events.model import (
    LABELS,
    EventBatch,
    EventKind,
    EventLimits,
    RequestRef,
    ValidationReport,
    validate,
)

__all__ = [
    "LABELS",
    "EventBatch",
    "EventBus",
    "EventKind",
    "EventLimits",
    "MemoryEventBus",
    "Message",
    "RequestOpened",
    "RequestRef",
    "Undecodable",
    "ValidationReport",
    "open_event_bus",
    "validate",
]


def open_event_bus(url: str, **kwargs: Any) -> EventBus:
    """Open an EventBus from a URL.

    ``memory://`` is the in-process :class:`MemoryEventBus` (it takes no options).
    ``redis://[user:password@]host:port/db`` is :class:`~leanrec.events.redis_bus.RedisEventBus` on
    that server; ``kwargs`` go to it (``stream``, ``group``, ``consumer``, ``maxlen``,
    ``claim_idle_ms``, ``deliver_malformed``, ``shards``).
    ``redis+cluster://[user:password@]host:port[,host:port...]`` is the same bus on a Redis Cluster,
    sharded over :data:`CLUSTER_SHARDS` streams unless ``shards`` says otherwise.

    Raises:
        ValueError: For a scheme leanrec has no backend for.
        TypeError: For options the backend does not take.
        ConnectionError: If a server backend does not answer.

    """
    scheme = urlparse(url).scheme
    if scheme == "memory":
        if kwargs:
            raise TypeError(f"MemoryEventBus takes no options, got {sorted(kwargs)}")
        return MemoryEventBus()
    if scheme in ("redis", "redis+cluster"):
        from leanrec.events.redis_bus import RedisEventBus  # imports redis only when used

        if scheme == "redis+cluster":
            kwargs.setdefault("shards", CLUSTER_SHARDS)
        return RedisEventBus(url, **kwargs)
    raise ValueError(f"no EventBus backend for {url!r}; known schemes: memory://, redis://, redis+cluster://")


CLUSTER_SHARDS = 16
"""Streams of a bus on a Redis Cluster: enough that a cluster's masters (3 to a dozen) share them."""
