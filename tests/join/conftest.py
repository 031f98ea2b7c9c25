"""Fixtures of the joiner's tests: a Redis test database of their own, emptied for every test."""

from __future__ import annotations

import os

import pytest
import redis

REDIS_JOIN_URL = "redis://127.0.0.1:6379/14"
"""Database 14 of the local server: these tests empty it (the contract suites use 15)."""


@pytest.fixture
def redis_url() -> str:
    """URL of an empty Redis database; skips without a server, or fails if the variable CI is set."""
    client = redis.Redis.from_url(REDIS_JOIN_URL, socket_connect_timeout=1)
    try:
        client.ping()
        client.flushdb()
    except redis.exceptions.RedisError as err:
        message = f"Redis is required at {REDIS_JOIN_URL} for the joiner's Redis tests: {err}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    finally:
        client.close()
    return REDIS_JOIN_URL
