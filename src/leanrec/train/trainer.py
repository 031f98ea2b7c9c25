"""Training and evaluating the late ranker from a warehouse, one request at a time.

Requests are split into train, validation and test by a hash of their id, so the split is the same
for either warehouse layout and for every run. A request-level batch computes the user side once
per request; an impression-level batch once per item. Early stopping watches one validation metric
(click AUC); ``full_metrics`` computes the whole suite at every validation, so its share of the
training time can be measured.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from leanrec.errors import InputError
from leanrec.models.ranker import LateRanker, RankerConfig
from leanrec.schema import PAD_ID, ROLE_SHAPES, FeatureSet, Role, Side
from leanrec.train.metrics import auc, log_loss, per_request
from leanrec.train.reader import Batch, ReadStats, iter_batches
from leanrec.warehouse.store import WarehouseError


class CheckpointError(InputError, ValueError):
    """A checkpoint that cannot read the data's FeatureSet or is not a leanrec checkpoint."""


@dataclass(frozen=True)
class TrainConfig:
    """How to train.

    Attributes:
        epochs: Most passes over the training requests.
        patience: Validations without improvement before stopping early.
        lr: Adam learning rate.
        batch_requests: Requests per request-level batch.
        batch_impressions: Rows per impression-level batch.
        request_level: Compute the user side once per request (the lean way).
        dedup: Compute each distinct row's work once (``LateRanker.forward(dedup=True)``): the item
            side once per distinct item row of a batch, the top MLP's user and item terms once per
            request and distinct item row, target attention without a copy of the history per
            impression. The same model, trained the same up to float32 rounding, with less work per
            step; on by default. It applies to request-level training: impression-level training,
            the baseline, computes everything per impression.
        full_metrics: Compute the full metric suite at every validation, not only AUC.
        seed: Seeds initialisation and shuffling.
        valid_percent: Requests (by id hash) held out for validation.
        test_percent: Requests held out for the final test.
        like_weight: Weight of the like head's loss.
        weight_decay: AdamW's decoupled weight decay (keeps the large id tables from memorising).
        group_lasso: Penalty on the sum of each dense feature's first-layer weight norm, which drives
            the weights of features that earn nothing towards zero.
        wide_iters: L-BFGS iterations that solve the model's wide part before the deep epochs (see
            ``LateRanker.fit_wide``); 0 leaves it to the optimiser with the rest.
        wide_examples: Training examples the wide part is solved on (the first ones read), which
            bounds its memory: 4 bytes per dense input (both sides) per example.
        wide_l2: Penalty on the squared weights of the wide part's dense inputs (in its refit).
        wide_alpha: The wide part reads only the dense features whose relation to the labels is
            significant at this level over all features (``LateRanker.fit_wide`` selects them;
            the others stay at zero through training); None lets it read every input.

    """

    epochs: int = 5
    patience: int = 2
    lr: float = 5e-4
    batch_requests: int = 128
    batch_impressions: int = 1280
    request_level: bool = True
    dedup: bool = True
    full_metrics: bool = False
    seed: int = 0
    valid_percent: int = 10
    test_percent: int = 10
    like_weight: float = 0.5
    by_request: bool = True
    weight_decay: float = 0.0
    group_lasso: float = 1e-3
    wide_iters: int = 100
    wide_examples: int = 200_000
    wide_l2: float = 1e-4
    wide_alpha: float | None = 0.05


@dataclass
class TrainResult:
    """What a training run measured.

    ``train_seconds`` and ``train_cpu_seconds`` are the epochs' training steps; ``setup_seconds``
    and ``setup_cpu_seconds`` the one-off work before them (reading the first examples, fitting the
    normalizer, solving the wide part), which does not grow with the epochs.
    """

    epochs_run: int = 0
    best_epoch: int = 0
    valid_auc: list[float] = field(default_factory=list)
    wide_valid_auc: float | None = None
    test: dict[str, float] = field(default_factory=dict)
    examples_trained: int = 0
    train_seconds: float = 0.0
    train_cpu_seconds: float = 0.0
    setup_seconds: float = 0.0
    setup_cpu_seconds: float = 0.0
    validation_seconds: float = 0.0
    bytes_read: int = 0
    id_maps: dict[str, dict] = field(default_factory=dict)
    """Per embedding table: its map, memory, counters and collisions (``LateRanker.id_map_report``)."""

    @property
    def examples_per_second(self) -> float:
        """Training examples processed per wall-clock second of training steps."""
        return self.examples_trained / max(self.train_seconds, 1e-9)

    @property
    def examples_per_cpu_second(self) -> float:
        """Training examples processed per CPU second of training steps: the work, whatever the load."""
        return self.examples_trained / max(self.train_cpu_seconds, 1e-9)


def _dedup(cfg: TrainConfig) -> bool:
    """Whether the forward computes each distinct row's work once: request-level batches only."""
    return cfg.request_level and cfg.dedup


def split_of(request_ids: list[str], valid_percent: int, test_percent: int) -> np.ndarray:
    """0 train, 1 validation, 2 test for each request id (a stable hash of the id)."""
    bucket = np.fromiter((zlib.crc32(r.encode()) % 100 for r in request_ids), np.int64, len(request_ids))
    return np.where(bucket < valid_percent, 1, np.where(bucket < valid_percent + test_percent, 2, 0))


def _subset(batch: Batch, keep_request: np.ndarray) -> Batch | None:
    """The requests of ``batch`` where ``keep_request`` (per request row) holds, with their items."""
    keep = torch.from_numpy(keep_request)
    if not keep.any():
        return None
    new_row = torch.cumsum(keep.long(), 0) - 1
    items = keep[batch.item_request]
    return Batch(
        req_floats=batch.req_floats[keep],
        req_ints=batch.req_ints[keep],
        item_floats=batch.item_floats[items],
        item_ints=batch.item_ints[items],
        item_request=new_row[batch.item_request[items]],
        click=batch.click[items],
        like=batch.like[items],
        request_ids=[r for r, k in zip(batch.request_ids, keep_request, strict=True) if k],
        positions=batch.positions[items],
        scores=None if batch.scores is None else batch.scores[items],
    )


class Replicas:
    """How the training loop cooperates with other data-parallel replicas; this base is a process alone.

    :mod:`leanrec.train.distributed` overrides each step with collectives across ranks.
    """

    rank = 0
    observes_batches = True
    """Managed id maps learn batch by batch (a process alone); replicas fill them once instead."""

    def prefill(self, model: LateRanker, seen: IdCounts) -> IdCounts:
        """Before training, with every id this replica will train on: make the maps the same everywhere.

        Returns:
            The ids every replica trains on, counted (what the maps' report is about).

        """
        return seen

    def wrap(self, model: LateRanker) -> nn.Module:
        """The module the training steps call (e.g. a ``DistributedDataParallel``)."""
        return model

    def share_fitted(self, model: LateRanker) -> None:
        """Make what the first replica fitted before training (normalizer, wide part) the same everywhere."""

    def join(self, wrapped: nn.Module) -> AbstractContextManager:
        """Context of one epoch's training steps (lets replicas hold uneven numbers of batches)."""
        return nullcontext()

    def end_epoch(self, model: LateRanker, opt: torch.optim.Optimizer, steps: int) -> None:
        """After an epoch's steps (``steps`` on this replica): make every replica's state the same."""

    def gather(self, arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        """Predictions of every replica (see :func:`predict`), so metrics cover the whole split."""
        return arrays


class IdCounts:
    """The distinct ids each embedding table read over some batches, and how often."""

    def __init__(self) -> None:
        self._parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}

    def add(self, model: LateRanker, batch: Batch) -> None:
        """Count one batch's ids (a request's ids once, whichever warehouse layout it came from)."""
        for name, ids in model.table_ids(request_rows(batch), batch.item_ints).items():
            flat = ids.numpy()
            self.add_counts(name, *np.unique(flat[flat != PAD_ID], return_counts=True))

    def add_counts(self, name: str, ids: np.ndarray, counts: np.ndarray) -> None:
        """Count distinct ``ids`` of table ``name``, each ``counts`` times."""
        self._parts.setdefault(name, []).append((ids, counts))
        if len(self._parts[name]) >= 64:  # merge as it goes: memory grows with distinct ids only
            self._parts[name] = [self.of(name)]

    def of(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(n,)`` distinct ids of table ``name`` and ``(n,)`` their counts."""
        parts = self._parts.get(name, [])
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        ids, inverse = np.unique(np.concatenate([i for i, _ in parts]), return_inverse=True)
        counts = np.bincount(inverse, weights=np.concatenate([c for _, c in parts]), minlength=len(ids))
        return ids, counts.astype(np.int64)

    def tables(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Every table's distinct ids and counts."""
        return {name: self.of(name) for name in self._parts}


def request_rows(batch: Batch) -> torch.Tensor:
    """The request-side ids of a batch, one row per request: an impression-level batch repeats them."""
    if len(batch.request_ids) == len(batch.req_ints) and len(set(batch.request_ids)) == len(
        batch.request_ids
    ):
        return batch.req_ints
    _, first = np.unique(np.asarray(batch.request_ids), return_index=True)
    return batch.req_ints[torch.from_numpy(np.sort(first))]


def _batches(
    uri: str,
    fs: FeatureSet,
    cfg: TrainConfig,
    part: int,
    stats: ReadStats,
    shuffle: int | None,
    files: list[str] | None = None,
):
    for batch in iter_batches(
        uri,
        fs,
        batch_requests=cfg.batch_requests,
        batch_impressions=cfg.batch_impressions,
        shuffle_seed=shuffle,
        stats=stats,
        files=files,
        by_request=cfg.by_request,
    ):
        sub = _subset(batch, split_of(batch.request_ids, cfg.valid_percent, cfg.test_percent) == part)
        if sub is not None:
            yield sub


def _leading(
    uri: str, fs: FeatureSet, cfg: TrainConfig, stats: ReadStats, files: list[str] | None
) -> Batch | None:
    """The first training examples of the warehouse, up to ``cfg.wide_examples`` (at least a batch)."""
    out: list[Batch] = []
    items = 0
    for b in _batches(uri, fs, cfg, 0, stats, None, files):
        out.append(b)
        items += b.n_items
        if items >= cfg.wide_examples:
            break
    return Batch.concat(out) if out else None


def split_batches(uri: str, fs: FeatureSet, cfg: TrainConfig, part: int) -> list[Batch]:
    """The batches of one split of a warehouse: 0 train, 1 validation, 2 test (unshuffled)."""
    return list(_batches(uri, fs, cfg, part, ReadStats(), None))


def predict(
    model: LateRanker, batches, request_level: bool = True, dedup: bool = False
) -> tuple[np.ndarray, ...]:
    """Click and like probabilities with labels and request groups, over batches."""
    clicks, likes, p_click, p_like, groups = [], [], [], [], []
    model.eval()
    with torch.no_grad():
        for b in batches:
            logits = model(
                b.req_floats,
                b.req_ints,
                b.item_floats,
                b.item_ints,
                b.item_request,
                request_level,
                dedup,
            )
            probs = torch.sigmoid(logits).numpy()
            p_click.append(probs[:, 0])
            p_like.append(probs[:, 1])
            clicks.append(b.click.numpy())
            likes.append(b.like.numpy())
            # Group by request id: an impression-level batch has one request row per item.
            groups.append(np.asarray(b.request_ids, dtype=object)[b.item_request.numpy()])

    def cat(xs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(xs) if xs else np.empty(0)

    request_of_item = np.unique(cat(groups).astype(str), return_inverse=True)[1] if groups else np.empty(0)
    return cat(clicks), cat(likes), cat(p_click), cat(p_like), request_of_item


def evaluate_arrays(
    click: np.ndarray,
    like: np.ndarray,
    p_click: np.ndarray,
    p_like: np.ndarray,
    groups: np.ndarray,
    full: bool = True,
) -> dict[str, float]:
    """AUC of click (and, with ``full``, log loss, like AUC, NDCG@10, MRR, recall@10 per request)."""
    out = {"auc": auc(click, p_click)}
    if full:
        out.update({"log_loss": log_loss(click, p_click), "like_auc": auc(like, p_like)})
        out.update(per_request(groups, click, p_click, k=10))
    return out


def train(
    uri: str,
    fs: FeatureSet,
    cfg: TrainConfig = TrainConfig(),
    model_config: RankerConfig | None = None,
    progress: Callable[[str, int], None] | None = None,
    files: list[str] | None = None,
) -> tuple[LateRanker, TrainResult]:
    """Train a late ranker on the warehouse at ``uri`` and test it on the held-out requests.

    Args:
        uri: Warehouse folder (either layout).
        fs: The FeatureSet the model is built for; the warehouse must hold it.
        cfg: Training settings.
        model_config: Model sizes.
        progress: Called with (phase, examples) as batches are processed.
        files: Only these warehouse files (a data-parallel shard).

    Raises:
        WarehouseError: The warehouse is missing, empty, or of another FeatureSet lineage.

    """
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # the same seed gives the same model, bit for bit
    try:
        return _train(uri, fs, cfg, model_config or RankerConfig(), progress, files)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def _train(
    uri: str,
    fs: FeatureSet,
    cfg: TrainConfig,
    model_config: RankerConfig,
    progress: Callable[[str, int], None] | None,
    files: list[str] | None,
    replicas: Replicas | None = None,
) -> tuple[LateRanker, TrainResult]:
    rep = replicas or Replicas()
    torch.manual_seed(cfg.seed)
    model = LateRanker(fs, model_config)
    stats = ReadStats()
    result = TrainResult()
    t0, c0 = time.perf_counter(), time.process_time()
    lead = _leading(uri, fs, cfg, stats, files) if rep.rank == 0 else None
    if lead is None and rep.rank == 0:
        raise WarehouseError(f"warehouse {uri} has no training requests")
    if lead is not None:
        # Per example, so both layouts give the same statistics (a request counts once per item). The
        # first batch's worth is enough for a mean and a spread.
        n = min(lead.n_items, cfg.batch_impressions)
        model.fit_normalizer(lead.req_floats[lead.item_request[:n]], lead.item_floats[:n])
        if cfg.wide_iters:
            labels = torch.stack([lead.click, lead.like], 1)
            req = lead.req_floats[lead.item_request]
            model.fit_wide(req, lead.item_floats, labels, cfg.wide_iters, cfg.wide_l2, cfg.wide_alpha)
            if progress:
                progress("solve the wide part", lead.n_items)
        del lead
    rep.share_fitted(model)
    seen = IdCounts()
    if not rep.observes_batches:
        for b in _batches(uri, fs, cfg, 0, ReadStats(), None, files):
            seen.add(model, b)
        seen = rep.prefill(model, seen)
    result.setup_seconds = time.perf_counter() - t0
    result.setup_cpu_seconds = time.process_time() - c0
    wrapped = rep.wrap(model)
    # The fused kernel updates every row of the id tables in one pass per tensor, about six times
    # faster on CPU than the per-tensor loop, and to float32 rounding the same update.
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    bce = nn.BCEWithLogitsLoss()
    best, best_state, waited = -1.0, None, 0
    if cfg.wide_iters:
        # The solved wide part alone is the first candidate: the deep epochs must beat it.
        best = result.wide_valid_auc = _validate(model, uri, fs, cfg, stats, files, rep, result)["auc"]
        best_state = _state(model)
    for epoch in range(cfg.epochs):
        model.train()
        t0, c0 = time.perf_counter(), time.process_time()
        steps = 0
        with rep.join(wrapped):
            for b in _batches(uri, fs, cfg, 0, stats, cfg.seed + epoch, files):
                if rep.observes_batches:
                    model.reset_optimizer_rows(opt, model.observe(request_rows(b), b.item_ints))
                    if epoch == 0:
                        seen.add(model, b)
                logits = wrapped(
                    b.req_floats,
                    b.req_ints,
                    b.item_floats,
                    b.item_ints,
                    b.item_request,
                    cfg.request_level,
                    _dedup(cfg),
                )
                loss = bce(logits[:, 0], b.click) + cfg.like_weight * bce(logits[:, 1], b.like)
                if cfg.group_lasso:
                    loss = loss + cfg.group_lasso * sum(model.dense_input_norms(s).sum() for s in Side)
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
                result.examples_trained += b.n_items
                if progress:
                    progress("train", b.n_items)
        rep.end_epoch(model, opt, steps)
        result.train_seconds += time.perf_counter() - t0
        result.train_cpu_seconds += time.process_time() - c0
        metrics = _validate(model, uri, fs, cfg, stats, files, rep, result)
        result.valid_auc.append(metrics["auc"])
        result.epochs_run = epoch + 1
        if metrics["auc"] > best:
            best, best_state, waited, result.best_epoch = metrics["auc"], _state(model), 0, epoch + 1
        else:
            waited += 1
            if waited >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    result.test = evaluate_arrays(
        *rep.gather(
            predict(model, _batches(uri, fs, cfg, 2, stats, None, files), cfg.request_level, _dedup(cfg))
        )
    )
    result.bytes_read = stats.bytes_read
    result.id_maps = model.id_map_report({name: seen.of(name) for name in model.tables})
    return model, result


def _validate(
    model: LateRanker,
    uri: str,
    fs: FeatureSet,
    cfg: TrainConfig,
    stats: ReadStats,
    files: list[str] | None,
    rep: Replicas,
    result: TrainResult,
) -> dict[str, float]:
    """Metrics on the validation split (over every replica's share), timed into ``result``."""
    t1 = time.perf_counter()
    metrics = evaluate_arrays(
        *rep.gather(
            predict(model, _batches(uri, fs, cfg, 1, stats, None, files), cfg.request_level, _dedup(cfg))
        ),
        full=cfg.full_metrics,
    )
    result.validation_seconds += time.perf_counter() - t1
    return metrics


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def save_checkpoint(model: LateRanker, path: str | Path, result: TrainResult | None = None) -> None:
    """Save weights with the FeatureSet they were trained under (its features, roles and version)."""
    torch.save(
        {
            "leanrec": 1,
            "featureset": model.fs.to_json(),
            "fs_version": model.fs.version,
            "fs_fingerprint": model.fs.fingerprint,
            "model_config": asdict(model.config),
            "state": model.state_dict(),
            "result": asdict(result) if result else None,
        },
        path,
    )


_GIVE_CHECKPOINT = "give a checkpoint that `leanrec train` wrote"

_LEGACY_ROLE_KEYS = {"history": Role.HISTORY, "item_id": Role.ITEM_ID}
"""Model-config keys by which checkpoints written before features carried roles named them."""


def _model_config(saved: dict) -> RankerConfig:
    """The sizes a checkpoint saved, without keys :class:`RankerConfig` no longer has."""
    known = {f.name for f in dataclasses.fields(RankerConfig)}
    return RankerConfig(**{k: v for k, v in saved.items() if k in known})


def _legacy_roles(fs: FeatureSet, saved: dict) -> FeatureSet:
    """``fs`` with the roles an older checkpoint named in its model config, if ``fs`` carries none.

    A checkpoint written before features carried roles names its history and item id in its model
    config (``history``, ``item_id``); its weights include the history encoder, so the model must be
    rebuilt with those roles. A FeatureSet that carries any role already says what it means, and
    the names are ignored.
    """
    if any(f.role for f in fs.features):
        return fs
    named = {saved[k]: role for k, role in _LEGACY_ROLE_KEYS.items() if isinstance(saved.get(k), str)}
    features = tuple(
        dataclasses.replace(f, role=named[f.name].value)
        if f.name in named
        and f.owner in ROLE_SHAPES[named[f.name]][0]
        and f.kind is ROLE_SHAPES[named[f.name]][1]
        else f
        for f in fs.features
    )
    try:
        return FeatureSet(fs.name, fs.version, features, fs.retired)
    except ValueError:  # the names do not make a valid pair (no item id of the history's vocabulary)
        return fs


def load_checkpoint(path: str | Path, fs: FeatureSet | None = None) -> LateRanker:
    """Load a model, built for the FeatureSet it was trained under.

    Args:
        path: A checkpoint :func:`save_checkpoint` wrote.
        fs: The FeatureSet of the data the model is to read (a warehouse's, see
            ``leanrec.warehouse.store.featureset_of``), or None to skip the check. The checkpoint's
            FeatureSet must read it (``FeatureSet.reads``): the same version, or an earlier version
            of its lineage that it retired features from (data logged before a feature audit). Read
            that data with ``model.fs``, so that only the model's columns are read.

    Returns:
        The model; ``model.fs`` is the checkpoint's FeatureSet, not ``fs``.

    Raises:
        CheckpointError: Not a leanrec checkpoint, or its FeatureSet cannot read ``fs``'s data
            (another lineage, a newer version, features missing or of another shape).

    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist; {_GIVE_CHECKPOINT}") from None
    except Exception as exc:  # torch raises several types for a file that is not a checkpoint
        raise CheckpointError(f"{path} is not a readable checkpoint: {exc}; {_GIVE_CHECKPOINT}") from None
    if not isinstance(data, dict) or data.get("leanrec") != 1:
        raise CheckpointError(f"{path} is not a leanrec checkpoint; {_GIVE_CHECKPOINT}")
    saved_config = data.get("model_config") or {}
    saved = _legacy_roles(FeatureSet.from_json(data["featureset"]), saved_config)
    if fs is not None and (conflicts := saved.read_conflicts(fs)):
        raise CheckpointError(
            f"checkpoint {path} expects FeatureSet {saved.name} v{saved.version} ({saved.fingerprint:08x}); "
            f"the data is {fs.name} v{fs.version} ({fs.fingerprint:08x}), which it cannot read: "
            f"{'; '.join(conflicts)}; give a warehouse of v{saved.version} or of an earlier version it "
            "retired features from, or train a model on this one"
        )
    model = LateRanker(saved, _model_config(saved_config))
    model.trained_id_maps = dict((data.get("result") or {}).get("id_maps") or {})
    try:
        model.load_state_dict(data["state"])
    except RuntimeError as exc:
        why = " ".join(str(exc).split())
        why = why if len(why) <= 200 else why[:199] + "…"
        raise CheckpointError(
            f"checkpoint {path}: its weights do not fit a model of its FeatureSet ({why}); {_GIVE_CHECKPOINT}"
        ) from None
    return model
