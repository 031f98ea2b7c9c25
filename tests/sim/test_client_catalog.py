"""Simulated clients drive the world the service ranks: learnt from it, or refused when it differs."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from leanrec.serve.app import create_app
from leanrec.serve.config import ServeConfig
from leanrec.sim.client import TargetError, _served_world
from leanrec.world import WorldConfig


def _health(**settings: object) -> dict:
    with TestClient(create_app(ServeConfig(**settings))) as client:
        return client.get("/healthz").json()


def test_the_service_says_which_catalog_it_serves_and_simulate_learns_its_world() -> None:
    health = _health(n_users=400, n_items=3000, seed=9)
    assert health["catalog"]["world"] == {"n_users": 400, "n_items": 3000, "seed": 9}
    assert health["catalog"]["featureset"] == "demo"
    learnt = _served_world(health, "http://127.0.0.1:1", None)
    assert (learnt.n_users, learnt.n_items, learnt.seed) == (400, 3000, 9)
    given = WorldConfig(n_users=400, n_items=3000, seed=9)
    assert _served_world(health, "http://127.0.0.1:1", given) is given


def test_simulate_refuses_another_world_and_a_sidecar() -> None:
    health = _health(n_users=400, n_items=3000, seed=7)
    with pytest.raises(TargetError, match=r"ranks the world .*'seed': 7.*, not .*'seed': 8"):
        _served_world(health, "http://127.0.0.1:1", WorldConfig(n_users=400, n_items=3000, seed=8))
    sidecar = {"catalog": {"featureset": "shop", "version": 1, "world": None}}
    with pytest.raises(TargetError, match="ranks no synthetic world"):
        _served_world(sidecar, "http://127.0.0.1:1", None)
