"""Fixtures shared by the contract suites: a Redis test database, flushed for every test."""

from __future__ import annotations

import os

import pytest
import redis

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
    """Empty the test database, so each test starts from nothing."""
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


@pytest.fixture
def redis_url() -> str:
    """URL of an empty Redis test database (skips or fails as :func:`require_redis` says)."""
    require_redis(REDIS_TEST_URL)
    flush_redis(REDIS_TEST_URL)
    return REDIS_TEST_URL
