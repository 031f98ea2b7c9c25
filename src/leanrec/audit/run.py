"""One audit: held-out data, importance three ways, cost, and the prune plan.

The held-out requests are the validation and test splits of the warehouse (the same hash split the
trainer uses), so no request the model was trained on is audited on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from leanrec.audit.cost import FeatureCost, feature_costs
from leanrec.audit.importance import (
    Importance,
    PermutationAuditor,
    concat_batches,
    permutation_importance,
    weight_importance,
)
from leanrec.audit.plan import PrunePlan, make_plan, measurable_value, rank_agreement
from leanrec.audit.related import Related, relatedness
from leanrec.errors import InputError
from leanrec.models.ranker import LateRanker
from leanrec.train.reader import Batch
from leanrec.train.trainer import TrainConfig, split_batches
from leanrec.warehouse.store import WarehouseError, featureset_of


class AuditError(InputError, ValueError):
    """An audit cannot run on these inputs (the message says why)."""


@dataclass
class AuditConfig:
    """How to audit.

    Attributes:
        budget: Most held-out AUC the prune plan may lose.
        repeats: Shuffles per single feature.
        screen_repeats: Shuffles per block in the first pass.
        block_size: Most features in a first-pass block.
        tolerance: Joint loss under which a block is decided as a whole (default: a quarter of the budget).
        plan_repeats: Shuffles per prefix the plan search probes.
        items_logged: Items logged per request (default: the held-out requests' mean viewed items).
        latency_repeats: Timed single-request scorings for the p99 latency.
        related_z: Standard deviations above the reference at which valuable features explain a
            feature of no measurable value, which then counts as informative and is kept.
        seed: Seeds every shuffle.

    """

    budget: float = 0.001
    repeats: int = 5
    screen_repeats: int = 2
    block_size: int = 16
    tolerance: float | None = None
    plan_repeats: int = 3
    items_logged: float | None = None
    latency_repeats: int = 200
    related_z: float = 4.0
    seed: int = 0


@dataclass
class AuditResult:
    """What an audit found."""

    base_auc: float
    heldout_requests: int
    heldout_examples: int
    weights: dict[str, float]
    importance: dict[str, Importance]
    costs: dict[str, FeatureCost]
    related: dict[str, Related]
    plan: PrunePlan
    latency_p99_ms: float
    weight_vs_permutation: float
    evaluations: int
    seconds: float

    def to_dict(self) -> dict:
        """JSON-ready."""
        return {
            "base_auc": self.base_auc,
            "heldout_requests": self.heldout_requests,
            "heldout_examples": self.heldout_examples,
            "latency_p99_ms": self.latency_p99_ms,
            "weight_vs_permutation_spearman": self.weight_vs_permutation,
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "features": {
                n: {
                    "weight": self.weights[n],
                    **{k: v for k, v in asdict(self.importance[n]).items() if k != "block"},
                    "block_size": len(self.importance[n].block),
                    **asdict(self.costs[n]),
                    **(
                        {f"related_{k}": v for k, v in asdict(self.related[n]).items()}
                        if n in self.related
                        else {}
                    ),
                    "retired": n in self.plan.reasons,
                }
                for n in self.importance
            },
            "plan": {
                "budget": self.plan.budget,
                "loss": self.plan.loss,
                "retire": self.plan.retire,
                "probes": self.plan.probes,
                "reasons": self.plan.reasons,
                "related": self.plan.related,
            },
        }


def heldout(uri: str, model: LateRanker, cfg: TrainConfig) -> Batch:
    """The validation and test requests of a warehouse, read under the model's FeatureSet.

    Raises:
        AuditError: The warehouse is of another FeatureSet lineage, or holds no held-out request.

    """
    try:
        written = featureset_of(uri)
    except WarehouseError as exc:
        raise AuditError(str(exc)) from None
    fs = model.fs
    if written.name != fs.name:
        raise AuditError(
            f"the model is of FeatureSet {fs.name} v{fs.version} and the warehouse {uri} of "
            f"{written.name} v{written.version}: different lineages, the model cannot read that data"
        )
    if conflicts := fs.read_conflicts(written):
        raise AuditError(
            f"the model is of FeatureSet {fs.name} v{fs.version}, which cannot read the warehouse {uri} "
            f"of v{written.version}: {'; '.join(conflicts)}"
        )
    batches = [b for part in (1, 2) for b in split_batches(uri, fs, cfg, part)]
    if not batches:
        raise AuditError(f"warehouse {uri} holds no held-out requests to audit on")
    return concat_batches(batches)


def latency_ms(model: LateRanker, data: Batch, n_items: int, repeats: int, seed: int = 0) -> np.ndarray:
    """Milliseconds to score one request of ``n_items`` held-out items, ``repeats`` times."""
    rng = np.random.default_rng(seed)
    model.eval()
    out = np.empty(repeats)
    rows = torch.zeros(n_items, dtype=torch.long)
    for k in range(repeats):
        r = int(rng.integers(data.n_requests))
        items = torch.from_numpy(rng.integers(0, data.n_items, n_items))
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(
                data.req_floats[r : r + 1],
                data.req_ints[r : r + 1],
                data.item_floats[items],
                data.item_ints[items],
                rows,
            )
        out[k] = (time.perf_counter() - t0) * 1e3
    return out


def audit(
    model: LateRanker,
    warehouse: str,
    config: AuditConfig | None = None,
    train_config: TrainConfig | None = None,
    keep: frozenset[str] = frozenset(),
    progress: Callable[[str, int, int], None] | None = None,
) -> AuditResult:
    """Audit a trained model on its warehouse's held-out requests and plan what to prune.

    Args:
        model: The trained late ranker.
        warehouse: Its warehouse (a FeatureSet version the model can read).
        config: Audit settings.
        train_config: The split the model was trained with.
        keep: Features never retired, besides the features of the history and item id roles the
            model is built on (the history shares the item id's table, so neither goes alone).
        progress: Called with (phase, advance, total).

    Raises:
        AuditError: Bad inputs (lineage, budget, an empty warehouse).

    """
    config, train_config = config or AuditConfig(), train_config or TrainConfig()
    if not config.budget >= 0:
        raise AuditError(f"--budget must be at least 0, got {config.budget}")
    t0 = time.perf_counter()
    data = heldout(warehouse, model, train_config)
    auditor = PermutationAuditor(model, data)
    names = [f.name for f in model.fs.features]
    weights = weight_importance(model, data)
    tick = (lambda phase, total: lambda n: progress(phase, n, total)) if progress else (lambda *_: None)
    importance = permutation_importance(
        auditor,
        names,
        repeats=config.repeats,
        screen_repeats=config.screen_repeats,
        block_size=config.block_size,
        tolerance=config.budget / 4 if config.tolerance is None else config.tolerance,
        seed=config.seed,
        progress=tick("permutation importance", len(names)),
    )
    p99 = float(np.percentile(latency_ms(model, data, 100, config.latency_repeats, config.seed), 99))
    items_logged = config.items_logged or data.n_items / data.n_requests
    costs = feature_costs(model, warehouse, items_logged, 100, p99)
    keep = keep | {f.name for f in (model.history, model.item_id) if f is not None}
    worth = {n: measurable_value(i) for n, i in importance.items()}
    related = relatedness(
        model.fs,
        data,
        [n for n, v in worth.items() if v > 0],
        [n for n, v in worth.items() if v == 0 and n not in keep],
        z=config.related_z,
        seed=config.seed,
    )
    plan = make_plan(
        auditor,
        importance,
        costs,
        config.budget,
        config.plan_repeats,
        keep,
        frozenset(n for n, r in related.items() if r.related),
        config.seed,
        tick("prune plan", len({i.block if len(i.block) > 1 else (n,) for n, i in importance.items()})),
    )
    loss = {n: i.loss for n, i in importance.items()}
    dense = [n for n in names if model.fs[n].is_float]
    return AuditResult(
        base_auc=auditor.base_auc,
        heldout_requests=data.n_requests,
        heldout_examples=data.n_items,
        weights=weights,
        importance=importance,
        costs=costs,
        related=related,
        plan=plan,
        latency_p99_ms=p99,
        weight_vs_permutation=rank_agreement(weights, loss, dense),
        evaluations=auditor.evaluations,
        seconds=time.perf_counter() - t0,
    )
