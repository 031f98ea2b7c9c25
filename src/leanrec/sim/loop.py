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

from leanrec.audit.plan import against_truth
from leanrec.audit.report import write_audit
from leanrec.audit.run import AuditConfig, audit, heldout, latency_ms
from leanrec.clock import ManualClock
from leanrec.funnel.ranker import Funnel
from leanrec.models.ranker import LateRanker
from leanrec.models.scorer import ModelScorer
from leanrec.schema import FeatureSet
from leanrec.sim.demo import DemoResult
from leanrec.sim.pipeline import Pipeline, PipelineConfig, Plumbing, build_pipeline
from leanrec.sim.traffic import TrafficConfig, TrafficSim, TrafficStats
from leanrec.train.metrics import auc
from leanrec.train.reader import Batch
from leanrec.train.trainer import TrainConfig, TrainResult, save_checkpoint, split_of, train
from leanrec.warehouse.store import ParquetWarehouse, warehouse_bytes
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


def _serve(
    world: World,
    model: LateRanker,
    fs: FeatureSet,
    requests: int,
    seed: int,
    folder: Path,
    progress: Callable[[int], None] | None,
) -> tuple[TrafficStats, Pipeline]:
    """One round of seeded traffic ranked by ``model``, logged and stored lean under ``fs``."""
    if folder.exists():
        shutil.rmtree(folder)
    pconf = PipelineConfig()
    clock = ManualClock()
    pipe = build_pipeline(Plumbing.LEAN, fs, clock, folder, pconf)
    sim = TrafficSim(
        world,
        Funnel(world, scorer=ModelScorer(model), featureset=fs),
        [pipe],
        clock,
        TrafficConfig(requests=requests, seed=seed),
        pconf,
        track_scored=False,
    )
    return sim.run(progress), pipe


def close_loop(
    round0: DemoResult,
    requests: int,
    seed: int,
    out: Path,
    train_config: TrainConfig | None = None,
    world_config: WorldConfig | None = None,
    progress: Callable[[str, int], None] | None = None,
    audit_budget: float | None = None,
) -> dict:
    """Train on round 0's lean warehouse, serve round 1 with the model, and compare the rounds.

    With ``audit_budget`` the loop goes one round further (see :func:`audit_round`).

    Args:
        round0: The demo run that ranked with the stand-in.
        requests: Requests of each round.
        seed: The demo's seed (the same world and traffic for round 1).
        out: The demo's output folder; round 1's warehouse goes to ``out/round1``.
        train_config: Training settings.
        world_config: The world of round 0.
        progress: Called with (phase, count).
        audit_budget: Audit the model, prune within this AUC budget, retrain and serve round 2.

    """
    cfg = train_config or TrainConfig(epochs=5, patience=2, seed=seed)
    wconf = world_config or WorldConfig(seed=seed)
    lean = out / "warehouse" / "lean"
    world = World(wconf)
    model, result = train(str(lean), world.featureset, cfg, progress=progress)
    oracle = oracle_auc(world, lean, cfg)
    tick = None if progress is None else (lambda n: progress("round 1", n))
    round1, pipe1 = _serve(world, model, world.featureset, requests, seed, out / "round1" / "warehouse", tick)
    r0, r1 = _online(round0.traffic), _online(round1)
    report = {
        "round0": r0,
        "round1": r1,
        "clicks_per_request_ratio": r1["clicks_per_request"] / max(r0["clicks_per_request"], 1e-12),
        "model": {
            "test_auc": result.test["auc"],
            "oracle_auc": oracle,
            "auc_gap": oracle - result.test["auc"],
            "valid_auc": result.valid_auc,
            "wide_valid_auc": result.wide_valid_auc,
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "examples_per_second": result.examples_per_second,
            # Training is priced like the plumbing: CPU seconds at the demo's watts per core.
            "training_cpu_seconds": result.train_cpu_seconds + result.setup_cpu_seconds,
            "training_joules": (result.train_cpu_seconds + result.setup_cpu_seconds)
            * round0.report["energy"]["lean"]["coefficients"]["watts_per_core"],
            "test_metrics": {k: float(v) for k, v in result.test.items() if np.isfinite(v)},
        },
    }
    if audit_budget is not None:
        report["audit"] = audit_round(
            model, result, (round1, pipe1), requests, seed, out, audit_budget, cfg, wconf, progress
        )
    return report


def _per_request(stats: TrafficStats, pipe: Pipeline) -> dict[str, float]:
    examples = max(stats.viewed, 1)
    return {
        "logged_bytes_per_request": pipe.ledger["kv_write"].bytes_written / max(stats.requests, 1),
        "warehouse_bytes_per_example": warehouse_bytes(str(pipe.warehouse.uri)) / examples,
        **_online(stats),
    }


def paired_latency(runs: list[tuple[LateRanker, Batch]], repeats: int, seed: int = 0) -> list[np.ndarray]:
    """Milliseconds per request of each model, timed in alternation on the same requests.

    Args:
        runs: Each model with the held-out requests read under its own FeatureSet.
        repeats: Requests timed per model.
        seed: Picks the requests (the same for every model).

    """
    out = [np.empty(repeats) for _ in runs]
    for k in range(repeats):
        for m, (model, data) in enumerate(runs):
            out[m][k] = latency_ms(model, data, 100, 1, seed + k)[0]
    return out


def audit_round(
    model: LateRanker,
    result: TrainResult,
    round1: tuple[TrafficStats, Pipeline],
    requests: int,
    seed: int,
    out: Path,
    budget: float,
    cfg: TrainConfig,
    wconf: WorldConfig,
    progress: Callable[[str, int], None] | None = None,
) -> dict:
    """Audit round 1's model, prune within ``budget``, retrain, serve round 2, and show the saving.

    Round 2 serves the same seeded traffic as round 1 with the pruned model, logging and storing
    under the pruned FeatureSet, so the two rounds compare one to one.
    """
    lean = str(out / "warehouse" / "lean")
    tick = None if progress is None else (lambda phase, n, _total: progress(phase, n))
    found = audit(model, lean, AuditConfig(budget=budget, seed=seed), cfg, progress=tick)
    write_audit(found, model.fs, out / "audit")
    pruned_fs = found.plan.featureset(model.fs)
    pruned, pruned_result = train(lean, pruned_fs, cfg, progress=progress)
    save_checkpoint(model, out / "audit" / "model.pt", result)
    save_checkpoint(pruned, out / "audit" / "pruned.pt", pruned_result)
    world = World(wconf)
    tick2 = None if progress is None else (lambda n: progress("round 2", n))
    round2 = _serve(world, pruned, pruned_fs, requests, seed, out / "round2" / "warehouse", tick2)
    runs = [(m, heldout(lean, m, cfg)) for m in (model, pruned)]
    full_ms, pruned_ms = paired_latency(runs, 300, seed)
    before, after = _per_request(*round1), _per_request(*round2)
    before["p99_latency_ms"], after["p99_latency_ms"] = (
        np.percentile(full_ms, 99),
        np.percentile(pruned_ms, 99),
    )
    before["test_auc"], after["test_auc"] = result.test["auc"], pruned_result.test["auc"]
    names = [f.name for f in model.fs.features]
    return {
        "budget": budget,
        "featureset": {"before": model.fs.version, "after": pruned_fs.version},
        "features": {"before": len(model.fs), "after": len(pruned_fs)},
        "retired": found.plan.retire,
        "kept_related": found.plan.related,
        "plan_loss": found.plan.loss,
        "audit_seconds": found.seconds,
        "weight_vs_permutation_spearman": found.weight_vs_permutation,
        "truth": against_truth(found.plan.retire, world.noise_features, names),
        "before": {k: float(v) for k, v in before.items()},
        "after": {k: float(v) for k, v in after.items()},
        "ratio": {k: float(after[k] / before[k]) if before[k] else float("nan") for k in before},
        "auc_change": float(after["test_auc"] - before["test_auc"]),
    }
