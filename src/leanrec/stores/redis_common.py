"""What every Redis backend shares: how it connects, and how a lost server is reported."""

from __future__ import annotations

import threading
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

_SERVER = ("host", "port", "db", "path", "username", "password")


def same_server(a: redis.Redis, b: redis.Redis) -> bool:
    """Whether two clients talk to the same server and database (as the same user)."""
    ka, kb = a.connection_pool.connection_kwargs, b.connection_pool.connection_kwargs
    return all(ka.get(k) == kb.get(k) for k in _SERVER)


def _resp(commands: Sequence[tuple[Any, ...]]) -> bytes:
    """The commands in the Redis protocol, as one buffer (bytes as they are, str as UTF-8, ints)."""
    out: list[bytes] = []
    for command in commands:
        out.append(b"*%d\r\n" % len(command))
        for arg in command:
            if isinstance(arg, str):
                arg = arg.encode()
            elif isinstance(arg, int):
                arg = b"%d" % arg
            out += (b"$%d\r\n" % len(arg), arg, b"\r\n")
    return b"".join(out)


class RoundTrips:
    """Commands sent in one write and their raw replies read back: one round trip, like a pipeline.

    A pipeline of redis-py costs more of the client's CPU than the round trip itself for the two or
    three commands a logging call sends (taking a connection from the pool and checking it, packing
    each argument, its bookkeeping per pipeline and per reply). Here one connection is kept for
    these round trips, the commands are packed into one buffer and sent with one write, and the
    replies are read in order. A reply that is an error comes back as its exception, as from a
    pipeline run with ``raise_on_error=False``. A connection found lost (a server that restarted, or
    closed it) is dropped and the batch sent once more on a fresh one, as redis-py retries.

    Args:
        client: Whose pool (server, database, timeouts) the connection comes from.

    """

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._conn: Any = None
        self._lock = threading.Lock()  # one round trip at a time on the one connection

    def __call__(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands``, return their replies in order.

        Raises:
            redis.exceptions.ConnectionError: The server did not answer, twice.
            redis.exceptions.TimeoutError: It did not answer in time, twice.

        """
        packed = [_resp(commands)]
        with self._lock:
            for attempt in (0, 1):
                try:
                    if self._conn is None:
                        self._conn = self._pool.make_connection()
                    self._conn.send_packed_command(packed, check_health=False)
                    replies: list[Any] = []
                    for _ in commands:
                        try:
                            replies.append(self._conn.read_response())
                        except redis.exceptions.ResponseError as err:
                            replies.append(err)
                    return replies
                except _LOST:
                    if self._conn is not None:
                        self._conn.disconnect()  # what was sent may be half read: start afresh
                    if attempt:
                        raise
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Close the connection (a later round trip opens another)."""
        with self._lock:
            if self._conn is not None:
                self._conn.disconnect()
