"""What every Redis backend shares: how it connects, and how a lost server is reported."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
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


_LOST = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def roundtrip(client: redis.Redis, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Send ``commands`` in one write and read their replies: one round trip, like a pipeline.

    A pipeline of redis-py costs more of the client's CPU than the round trip itself for the two
    or three commands a logging call sends (its bookkeeping per pipeline, per command and per
    reply); here the commands are packed and sent at once and the raw replies read back in order.
    A reply that is an error comes back as its exception, as from a pipeline run with
    ``raise_on_error=False``. A connection found lost is dropped and the batch sent once more on a
    fresh one (a server that restarted, or closed an idle connection), as redis-py retries.

    Raises:
        redis.exceptions.ConnectionError: The server did not answer, twice.
        redis.exceptions.TimeoutError: It did not answer in time, twice.

    """
    pool = client.connection_pool
    for attempt in (0, 1):
        conn = None
        try:
            conn = pool.get_connection()
            conn.send_packed_command(conn.pack_commands(commands))
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except redis.exceptions.ResponseError as err:
                    replies.append(err)
            return replies
        except _LOST:
            if conn is not None:
                conn.disconnect()  # what was sent may be half read: never reuse it
            if attempt:
                raise
        finally:
            if conn is not None:
                pool.release(conn)
    raise AssertionError("unreachable")  # pragma: no cover
