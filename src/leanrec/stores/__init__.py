"""Storage roles (protocols) and their backends, chosen by URL."""

from __future__ import annotations

from urllib.parse import parse_qs, urlencode, urlparse

import numpy as np

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


CLUSTER_SCHEME = "redis+cluster"
_KNOWN = "known schemes: memory://, redis://, redis+cluster://"


def open_feature_store(
    url: str,
    featureset: FeatureSet,
    blocks: dict[Owner, FeatureBlock] | None = None,
    ids: dict[Owner, np.ndarray] | None = None,
) -> FeatureStore:
    """Open a FeatureStore from a URL.

    ``memory://`` is :class:`MemoryFeatureStore` over ``blocks``, which it needs (it holds nothing
    else). ``redis://[user:password@]host:port/db`` is
    :class:`~leanrec.stores.redis_features.RedisFeatureStore` on that server; ``blocks``, if given,
    are written into it first (row ``k`` of a block as ``ids[owner][k]``, or as ``k`` without
    ``ids``), overwriting those entities. ``redis+cluster://host:port[,host:port...]`` is the same
    store on a Redis Cluster.

    Raises:
        ValueError: For a scheme leanrec has no backend for, or ``memory://`` without blocks.
        ConnectionError: If a server backend does not answer.

    """
    scheme = urlparse(url).scheme
    if scheme == "memory":
        if blocks is None:
            raise ValueError(f"{url}: the in-process feature store needs its blocks")
        return MemoryFeatureStore(featureset, blocks, ids)
    if scheme in ("redis", CLUSTER_SCHEME):
        from leanrec.stores.redis_features import RedisFeatureStore  # imports redis only when used

        store = RedisFeatureStore(url, featureset)
        if blocks is not None:
            store.load_from(MemoryFeatureStore(featureset, blocks, ids))
        return store
    raise ValueError(f"no FeatureStore backend for {url!r}; {_KNOWN}")


def _int_option(url: str, opts: dict[str, list[str]], name: str) -> int | None:
    if name not in opts:
        return None
    try:
        return int(opts[name][0])
    except ValueError:
        raise ValueError(f"{url}: {name} must be an integer") from None


def open_transient_store(url: str, clock: Clock | None = None) -> TransientStore:
    """Open a TransientStore from a URL.

    ``memory://`` (optionally ``memory://?max_bytes=N``) is the embedded store;
    ``memory://?max_bytes=N&memory_bytes=M&spill_dir=PATH`` keeps at most M bytes in memory and
    spills further values to files under PATH. ``redis://host:port/db`` (optionally
    ``?max_bytes=N``) is :class:`RedisTransientStore` on that server; it runs on the server's time,
    so ``clock`` does not apply to it. ``redis+cluster://host:port[,host:port...]`` (optionally
    ``?max_bytes=N``) is the same store on a Redis Cluster.

    Raises:
        ValueError: For a scheme leanrec has no backend for, or a malformed option.
        ConnectionError: If a server backend does not answer.

    """
    parsed = urlparse(url)
    opts = parse_qs(parsed.query, keep_blank_values=True)  # "max_bytes=" is malformed, not unset
    max_bytes = _int_option(url, opts, "max_bytes")
    if parsed.scheme == "memory":
        unknown = set(opts) - {"max_bytes", "memory_bytes", "spill_dir"}
        if unknown:
            raise ValueError(f"{url}: unknown option {sorted(unknown)[0]!r} of the embedded store")
        spill_dir = opts["spill_dir"][0] if "spill_dir" in opts else None
        if spill_dir == "":
            raise ValueError(f"{url}: spill_dir must name a folder")
        return MemoryTransientStore(
            max_bytes=1 << 30 if max_bytes is None else max_bytes,
            clock=clock,
            memory_bytes=_int_option(url, opts, "memory_bytes"),
            spill_dir=spill_dir,
        )
    if parsed.scheme in ("redis", CLUSTER_SCHEME):
        from leanrec.stores.redis_transient import RedisTransientStore  # imports redis only when used

        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"{url}: max_bytes must be positive, got {max_bytes}")
        rest = {k: v for k, v in opts.items() if k != "max_bytes"}
        server_url = parsed._replace(query=urlencode(rest, doseq=True)).geturl()
        return RedisTransientStore(server_url, max_bytes=max_bytes)
    raise ValueError(f"no TransientStore backend for {url!r}; {_KNOWN}")
