"""Storage roles (protocols) and their backends, chosen by URL."""

from __future__ import annotations

from urllib.parse import parse_qs, urlencode, urlparse

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
    ``redis://host:port/db`` (optionally ``?max_bytes=N``) is :class:`RedisTransientStore` on that
    server; it runs on the server's time, so ``clock`` does not apply to it.

    Raises:
        ValueError: For a scheme leanrec has no backend for, or a malformed option.
        ConnectionError: If a server backend does not answer.

    """
    parsed = urlparse(url)
    opts = parse_qs(parsed.query, keep_blank_values=True)  # "max_bytes=" is malformed, not unset
    max_bytes: int | None = None
    if "max_bytes" in opts:
        try:
            max_bytes = int(opts["max_bytes"][0])
        except ValueError:
            raise ValueError(f"{url}: max_bytes must be an integer") from None
    if parsed.scheme == "memory":
        return MemoryTransientStore(max_bytes=1 << 30 if max_bytes is None else max_bytes, clock=clock)
    if parsed.scheme == "redis":
        from leanrec.stores.redis_transient import RedisTransientStore  # imports redis only when used

        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"{url}: max_bytes must be positive, got {max_bytes}")
        rest = {k: v for k, v in opts.items() if k != "max_bytes"}
        server_url = parsed._replace(query=urlencode(rest, doseq=True)).geturl()
        return RedisTransientStore(server_url, max_bytes=max_bytes)
    raise ValueError(f"no TransientStore backend for {url!r}; known schemes: memory://, redis://")
