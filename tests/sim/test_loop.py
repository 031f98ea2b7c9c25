"""Closing the loop: a model trained on round 0's warehouse ranks round 1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from leanrec.funnel import Funnel
from leanrec.models import LateRanker, ModelScorer
from leanrec.sim.demo import run_demo
from leanrec.sim.loop import close_loop
from leanrec.train.trainer import TrainConfig
from leanrec.warehouse.store import featureset_of
from leanrec.world import World, WorldConfig

WORLD = WorldConfig(n_users=400, n_items=3000, n_creators=200, seed=9)


def test_a_model_scores_the_funnels_candidates_user_side_once(small_world: World) -> None:
    model = LateRanker(small_world.featureset)
    funnel = Funnel(small_world, scorer=ModelScorer(model))
    users = small_world.user_ids[:3]
    batch = funnel.rank(users, np.zeros(3, np.int64), np.zeros(3, np.int64))
    assert np.array_equal(batch.user_ids, users)
    assert batch.item_ids.shape == (3, 100)
    assert np.all(np.diff(batch.scores, axis=1) <= 0)  # ordered by the model's scores
    assert len({tuple(r) for r in batch.item_ids.tolist()}) == 3


def test_close_loop_reports_both_rounds_and_the_oracle(tmp_path: Path) -> None:
    round0 = run_demo(200, 9, tmp_path, world_config=WORLD)
    loop = close_loop(
        round0, 200, 9, tmp_path, TrainConfig(epochs=1, patience=1, batch_requests=32), world_config=WORLD
    )
    for r in ("round0", "round1"):
        assert loop[r]["clicks_per_request"] > 0
    assert loop["round0"]["clicks_per_request"] == pytest.approx(
        round0.traffic.clicks / round0.traffic.requests
    )
    m = loop["model"]
    assert 0.5 <= m["oracle_auc"] <= 1.0 and 0.0 <= m["test_auc"] <= 1.0
    assert m["auc_gap"] == pytest.approx(m["oracle_auc"] - m["test_auc"])
    watts = round0.report["energy"]["lean"]["coefficients"]["watts_per_core"]
    assert m["training_cpu_seconds"] > 0 and m["training_joules"] == pytest.approx(
        m["training_cpu_seconds"] * watts
    )
    assert any((tmp_path / "round1" / "warehouse").rglob("*.parquet"))


def test_the_audit_round_serves_the_pruned_featureset_and_shows_the_saving(tmp_path: Path) -> None:
    round0 = run_demo(200, 9, tmp_path, world_config=WORLD)
    cfg = TrainConfig(epochs=1, patience=1, batch_requests=32)
    loop = close_loop(round0, 200, 9, tmp_path, cfg, world_config=WORLD, audit_budget=0.002)
    audit = loop["audit"]
    assert audit["plan_loss"] <= 0.002
    assert audit["retired"], "a model trained on so little data leaves much to retire"
    assert audit["featureset"] == {"before": 1, "after": 2}
    assert audit["features"]["after"] == audit["features"]["before"] - len(audit["retired"])
    # Fewer features logged and stored on the same traffic.
    assert audit["ratio"]["logged_bytes_per_request"] < 1
    assert audit["ratio"]["warehouse_bytes_per_example"] < 1
    written = featureset_of(str(tmp_path / "round2" / "warehouse"))
    assert written.version == 2 and set(written.retired) == set(audit["retired"])
    assert (tmp_path / "audit" / "audit.html").exists() and (tmp_path / "audit" / "pruned.pt").exists()
