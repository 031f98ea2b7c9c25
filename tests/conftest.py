"""Shared fixtures: a small seeded world, so tests run in seconds."""

from __future__ import annotations

import pytest

from leanrec.world import World, WorldConfig


@pytest.fixture(scope="session")
def small_config() -> WorldConfig:
    return WorldConfig(n_users=400, n_items=3_000, n_creators=200, seed=11)


@pytest.fixture
def small_world(small_config: WorldConfig) -> World:
    """A fresh small world per test (worlds mutate as traffic flows)."""
    return World(small_config)
