"""What every Redis backend shares: how it connects, and how a lost server is reported.

Every backend takes a single server's URL, ``redis://[user:password@]host:port/db``, or a Redis
Cluster's, ``redis+cluster://[user:password@]host:port[,host:port...]`` (seed nodes: the client
discovers the rest, and follows the cluster through failovers). On a cluster, commands go through
redis-py's cluster client, which sends each key's commands to the master of its slot; every key of a
request shares the request's hash tag (``lr:{<request_id>}:…``), so a request's keys live on one shard.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.cluster
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry


def redact(url: str) -> str:
    """The URL without its password, fit for an error message."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))


CLUSTER_SCHEME = "redis+cluster"

Client = redis.Redis | redis.RedisCluster
"""A client of one server, or of a cluster."""


def is_cluster(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://``)."""
    return urlsplit(url).scheme == CLUSTER_SCHEME


def cluster_seeds(url: str) -> list[tuple[str, int]]:
    """The seed nodes ``(host, port)`` of a ``redis+cluster://`` URL.

    Raises:
        ValueError: If a seed has no host or no valid port, or the URL names a database (a cluster
            has database 0 only).

    """
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError(f"{redact(url)}: a Redis Cluster has database 0 only")
    seeds = []
    for seed in netloc.split(","):
        host, _, port = seed.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{redact(url)}: seed {seed!r} is not host:port")
        seeds.append((host, int(port)))
    return seeds


def connect(url: str) -> Client:
    """A client with short timeouts: a ranking must not wait on a hung server (its logging is counted).

    A cluster client retries a command once after refreshing its view of the cluster (a moved slot, a
    promoted replica); a master that is down answers an error at once rather than after a backoff, and
    the caller counts it. Give a cluster several seed nodes: the client needs one of them to answer
    when it starts.

    Raises:
        ConnectionError: No seed node of a cluster answers.

    """
    if not is_cluster(url):
        return redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    parts = urlsplit(url)
    try:
        return redis.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in cluster_seeds(url)],
            username=parts.username,
            password=parts.password,
            socket_connect_timeout=0.5,
            socket_timeout=0.5,
            retry=Retry(NoBackoff(), 1),
            reinitialize_steps=1,  # a MOVED reply refreshes the slot map at once (after a failover)
        )
    except redis.exceptions.RedisClusterUnreachableError as err:  # raised before any command
        raise ConnectionError(f"no seed node of the Redis Cluster at {redact(url)} answers: {err}") from None


def server_totals(client: Client, section: str) -> dict[str, int]:
    """``INFO section``'s integer fields, summed over a cluster's masters (as they are on one server)."""
    if not isinstance(client, redis.RedisCluster):
        return {k: v for k, v in client.info(section).items() if isinstance(v, int)}
    totals: dict[str, int] = {}
    for info in client.info(section, target_nodes=redis.RedisCluster.PRIMARIES).values():
        for k, v in info.items():
            if isinstance(v, int):
                totals[k] = totals.get(k, 0) + v
    return totals


def key_count(client: Client) -> int:
    """Keys held (``DBSIZE``), summed over a cluster's masters."""
    if isinstance(client, redis.RedisCluster):
        return int(client.dbsize(target_nodes=redis.RedisCluster.PRIMARIES))
    return int(client.dbsize())


@contextmanager
def answering(what: str, url: str) -> Iterator[None]:
    """Turn a lost or hung server into a ConnectionError that names it (without its password)."""
    try:
        yield
    except _LOST as err:
        raise ConnectionError(f"{what} at {redact(url)} is not answering: {err}") from err


_LOST = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterDownError,  # a master is down and not yet replaced
    redis.exceptions.TryAgainError,  # a slot is moving
    redis.exceptions.SlotNotCoveredError,
    redis.exceptions.ClusterError,
    redis.exceptions.RedisClusterUnreachableError,  # no seed node answers
)

_SERVER = ("host", "port", "db", "path", "username", "password")


def same_server(a: object, b: object) -> bool:
    """Whether two clients talk to the same server and database, or the same cluster (as the same user)."""
    if isinstance(a, redis.RedisCluster) and isinstance(b, redis.RedisCluster):
        nodes_a = {n.name for n in a.get_nodes()}
        return bool(nodes_a & {n.name for n in b.get_nodes()}) and all(
            a.nodes_manager.connection_kwargs.get(k) == b.nodes_manager.connection_kwargs.get(k)
            for k in ("username", "password")
        )
    if not isinstance(a, redis.Redis) or not isinstance(b, redis.Redis):
        return False
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


class ClusterRoundTrips:
    """:class:`RoundTrips` on a cluster: one pipeline, sent to each shard its commands at once.

    The cluster client groups the commands by the master of their keys' slot, writes every group before
    reading any reply, and returns the replies in the commands' order (an error as its exception).
    """

    def __init__(self, client: redis.RedisCluster) -> None:
        self._client = client

    def __call__(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands``, return their replies in order (see :class:`RoundTrips`)."""
        pipe = self._client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return pipe.execute(raise_on_error=False)

    def close(self) -> None:
        """Nothing to close: the connections are the cluster client's."""


def round_trips(client: Client) -> RoundTrips | ClusterRoundTrips:
    """The round trips fit for ``client``: raw on one server, a pipeline per shard on a cluster."""
    if isinstance(client, redis.RedisCluster):
        return ClusterRoundTrips(client)
    return RoundTrips(client)
