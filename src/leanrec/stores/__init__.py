"""Storage roles (protocols) and their backends, chosen by URL."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from leanrec.clock import Clock
from leanrec.stores.features import FeatureStore, MemoryFeatureStore
from leanrec.stores.transient import MemoryTransientStore, StoreFullError, TransientStats, TransientStore

__all__ = [
    "FeatureStore",
    "MemoryFeatureStore",
    "MemoryTransientStore",
    "StoreFullError",
    "TransientStats",
    "TransientStore",
    "open_transient_store",
]


def open_transient_store(url: str, clock: Clock | None = None) -> TransientStore:
    """Open a TransientStore from a URL.

    ``memory://`` (optionally ``memory://?max_bytes=N``) is the embedded store.

    Raises:
        ValueError: For a scheme leanrec has no backend for, or a malformed option.

    """
    parsed = urlparse(url)
    if parsed.scheme == "memory":
        opts = parse_qs(parsed.query, keep_blank_values=True)  # "max_bytes=" is malformed, not unset
        try:
            max_bytes = int(opts.get("max_bytes", [str(1 << 30)])[0])
        except ValueError:
            raise ValueError(f"{url}: max_bytes must be an integer") from None
        return MemoryTransientStore(max_bytes=max_bytes, clock=clock)
    raise ValueError(f"no TransientStore backend for {url!r}; known schemes: memory://")
