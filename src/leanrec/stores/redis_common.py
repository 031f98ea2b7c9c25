"""What every Redis backend shares: how it connects, and how a lost server is reported."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.exceptions


def redact(url: str) -> str:
    """The URL without its password, fit for an error message."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def connect(url: str) -> redis.Redis:
    """A client with short timeouts: a ranking must not wait on a hung server (its logging is counted)."""
    return redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)


@contextmanager
def answering(what: str, url: str) -> Iterator[None]:
    """Turn a lost or hung server into a ConnectionError that names it (without its password)."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as err:
        raise ConnectionError(f"{what} at {redact(url)} is not answering: {err}") from err
