"""Fixtures shared by the contract suites: a Redis test database, flushed for every test."""

from __future__ import annotations

import os

import pytest
import redis

from leanrec.stores.redis_common import connect

REDIS_TEST_URL = "redis://127.0.0.1:6379/15"
"""Database 15 of the local server: the suites flush it, so nothing else should live there."""


def require_redis(url: str) -> None:
    """Skip without a Redis server, or fail if the environment variable CI is set."""
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.exceptions.RedisError as err:
        message = f"Redis is required at {url} for the Redis backend's contract tests: {err}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    finally:
        client.close()


def flush_redis(url: str) -> None:
    """Empty the test database (every master of a cluster), so each test starts from nothing."""
    client = connect(url)
    try:
        if isinstance(client, redis.RedisCluster):
            client.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
        else:
            client.flushdb()
    finally:
        client.close()


CLUSTER = "redis+cluster://"
"""A parameter standing for the session's local cluster, whose port is known once it has started."""


def backend_url(request: pytest.FixtureRequest, url: str) -> str:
    """``url``, or the session cluster's URL for :data:`CLUSTER` (starting it); ready and empty."""
    if url == CLUSTER:
        return request.getfixturevalue("cluster_url")
    if url.startswith("redis://"):
        require_redis(url)
        flush_redis(url)
    return url


@pytest.fixture
def redis_url() -> str:
    """URL of an empty Redis test database (skips or fails as :func:`require_redis` says)."""
    require_redis(REDIS_TEST_URL)
    flush_redis(REDIS_TEST_URL)
    return REDIS_TEST_URL
