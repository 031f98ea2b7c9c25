"""Closing the loop: round 0 ranks with the stand-in, its warehouse trains a model, round 1 ranks with it.

Both rounds serve the same seeded traffic (the same users at the same times, behaving by the same
truth), so their online metrics (clicks and likes per request) compare one to one. The trained model
is also scored offline: its held-out click AUC against the oracle AUC that the world's true
engagement probabilities give on the same examples.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from leanrec.clock import ManualClock
from leanrec.funnel.ranker import Funnel
from leanrec.models.scorer import ModelScorer
from leanrec.sim.demo import DemoResult
from leanrec.sim.pipeline import PipelineConfig, Plumbing, build_pipeline
from leanrec.sim.traffic import TrafficConfig, TrafficSim, TrafficStats
from leanrec.train.metrics import auc
from leanrec.train.trainer import TrainConfig, split_of, train
from leanrec.warehouse.store import ParquetWarehouse
from leanrec.warehouse.tables import TableLayout
from leanrec.world import World, WorldConfig


def oracle_auc(world: World, warehouse: str | Path, cfg: TrainConfig) -> float:
    """AUC of the world's true click probabilities on the held-out test requests of a warehouse."""
    table = ParquetWarehouse(str(warehouse), world.featureset, TableLayout.REQUEST).read_examples()
    test = split_of(table.column("request_id").to_pylist(), cfg.valid_percent, cfg.test_percent) == 2
    users = table.column("user_id").to_numpy()[test]
    items = table.column("item_id").to_numpy()[test]
    return auc(table.column("click").to_numpy()[test], world.click_probability(users, items[:, None])[:, 0])


def _online(stats: TrafficStats) -> dict[str, float]:
    return {
        "clicks_per_request": stats.clicks / max(stats.requests, 1),
        "likes_per_request": stats.likes / max(stats.requests, 1),
        "viewed_per_request": stats.viewed / max(stats.requests, 1),
    }


def close_loop(
    round0: DemoResult,
    requests: int,
    seed: int,
    out: Path,
    train_config: TrainConfig | None = None,
    world_config: WorldConfig | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> dict:
    """Train on round 0's lean warehouse, serve round 1 with the model, and compare the rounds.

    Args:
        round0: The demo run that ranked with the stand-in.
        requests: Requests of each round.
        seed: The demo's seed (the same world and traffic for round 1).
        out: The demo's output folder; round 1's warehouse goes to ``out/round1``.
        train_config: Training settings.
        world_config: The world of round 0.
        progress: Called with (phase, count).

    """
    cfg = train_config or TrainConfig(epochs=5, patience=2, seed=seed)
    wconf = world_config or WorldConfig(seed=seed)
    lean = out / "warehouse" / "lean"
    world = World(wconf)
    model, result = train(str(lean), world.featureset, cfg, progress=progress)
    oracle = oracle_auc(world, lean, cfg)
    folder = out / "round1" / "warehouse"
    if folder.exists():
        shutil.rmtree(folder)
    pconf = PipelineConfig()
    clock = ManualClock()
    pipe = build_pipeline(Plumbing.LEAN, world.featureset, clock, folder, pconf)
    sim = TrafficSim(
        world,
        Funnel(world, scorer=ModelScorer(model)),
        [pipe],
        clock,
        TrafficConfig(requests=requests, seed=seed),
        pconf,
        track_scored=False,
    )
    round1 = sim.run(None if progress is None else (lambda n: progress("round 1", n)))
    r0, r1 = _online(round0.traffic), _online(round1)
    return {
        "round0": r0,
        "round1": r1,
        "clicks_per_request_ratio": r1["clicks_per_request"] / max(r0["clicks_per_request"], 1e-12),
        "model": {
            "test_auc": result.test["auc"],
            "oracle_auc": oracle,
            "auc_gap": oracle - result.test["auc"],
            "valid_auc": result.valid_auc,
            "epochs_run": result.epochs_run,
            "examples_per_second": result.examples_per_second,
            "test_metrics": {k: float(v) for k, v in result.test.items() if np.isfinite(v)},
        },
    }
