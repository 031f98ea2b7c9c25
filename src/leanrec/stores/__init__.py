"""Storage roles (protocols) and their backends, chosen by URL."""

from __future__ import annotations

from urllib.parse import parse_qs, urlencode, urlparse

from leanrec.clock import Clock
from leanrec.schema import FeatureBlock, FeatureSet, Owner
from leanrec.stores.features import FeatureStore, MemoryFeatureStore
from leanrec.stores.transient import (
    MemoryTransientStore,
    OnceAppend,
    StoreFullError,
    TransientStats,
    TransientStore,
)

__all__ = [
    "FeatureStore",
    "MemoryFeatureStore",
    "MemoryTransientStore",
    "OnceAppend",
    "StoreFullError",
    "TransientStats",
    "TransientStore",
    "open_feature_store",
    "open_transient_store",
]


def open_feature_store(
    url: str, featureset: FeatureSet, blocks: dict[Owner, FeatureBlock] | None = None
) -> FeatureStore:
    """Open a FeatureStore from a URL.

    ``memory://`` is :class:`MemoryFeatureStore` over ``blocks``, which it needs (it holds nothing
    else). ``redis://[user:password@]host:port/db`` is
    :class:`~leanrec.stores.redis_features.RedisFeatureStore` on that server; ``blocks``, if given,
    are written into it first (entity ``k`` of a block as id ``k``), overwriting those entities.

    Raises:
        ValueError: For a scheme leanrec has no backend for, or ``memory://`` without blocks.
        ConnectionError: If a server backend does not answer.

    """
    scheme = urlparse(url).scheme
    if scheme == "memory":
        if blocks is None:
            raise ValueError(f"{url}: the in-process feature store needs its blocks")
        return MemoryFeatureStore(featureset, blocks)
    if scheme == "redis":
        from leanrec.stores.redis_features import RedisFeatureStore  # imports redis only when used

        store = RedisFeatureStore(url, featureset)
        if blocks is not None:
            store.load_from(MemoryFeatureStore(featureset, blocks))
        return store
    raise ValueError(f"no FeatureStore backend for {url!r}; known schemes: memory://, redis://")


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
