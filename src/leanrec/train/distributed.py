"""Data-parallel training across processes with ``torch.distributed`` (gloo, CPU).

Each rank reads its own shard of the warehouse files (:func:`~leanrec.train.reader.shard`) and runs
the training loop of :mod:`leanrec.train.trainer`, with the model wrapped in
``DistributedDataParallel`` so gradients are averaged across ranks at every step. What the ranks
agree on, and how:

* Initial weights: the same seed on every rank (and DDP broadcasts rank 0's at construction).
* Normalizer statistics and the solved wide part (its weights and the inputs it may read): fitted
  on rank 0's first training examples and broadcast.
* Managed id maps: every rank counts the ids of its shard before training, the counts are merged,
  and every rank fills its maps from the merged counts at once; they are not updated batch by batch
  (a rank alone would see its shard's ids only).
* Uneven inputs: ranks may hold different numbers of batches; each epoch's steps run under DDP's
  ``join()``, so a rank that runs out shadows the others' all-reduces instead of hanging. A rank
  that joined early does not step its optimizer, so after each epoch the parameters (DDP does this)
  and the Adam state are copied from a rank that ran the most steps: every rank starts the next epoch
  identical.
* Early stopping: validation predictions are gathered from every rank and the AUC is computed over
  the whole validation split, so every rank sees the same number and stops at the same epoch, and
  restores the same best state. The test metrics are likewise over the whole test split.

Per rank, a :class:`~leanrec.train.trainer.TrainResult` counts that rank's own examples, bytes and
times; its ``valid_auc`` and ``test`` are global.
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from leanrec.models.ranker import LateRanker, RankerConfig
from leanrec.schema import FeatureSet
from leanrec.train.reader import shard, warehouse_files
from leanrec.train.trainer import IdCounts, Replicas, TrainConfig, TrainResult, _train

_NORMALIZER = ("req_mean", "req_std", "item_mean", "item_std")
_WIDE_SUPPORT = ("user_wide_support", "item_wide_support")


def free_port() -> int:
    """A loopback TCP port free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Ranks(Replicas):
    """The training loop's collectives for one rank of an initialised process group."""

    def __init__(self) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    observes_batches = False

    def prefill(self, model: LateRanker, seen: IdCounts) -> IdCounts:
        # Every rank's ids, merged, observed once by every rank: the maps' slots, their rows' resets
        # and so the parameters stay the same everywhere (batch by batch, each rank would see only
        # its shard's ids, and the uneven batches of DDP's join leave no step for a collective).
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, seen.tables())
        merged = IdCounts()
        for part in parts:
            for name, (ids, counts) in part.items():
                merged.add_counts(name, ids, counts)
        model.train()
        managed = model.managed_tables()
        for name, (ids, counts) in merged.tables().items():
            if name in managed:
                managed[name].observe(torch.from_numpy(ids), counts)
        return merged

    def wrap(self, model: LateRanker) -> nn.Module:
        # The buffers (normalizer statistics) are shared by share_fitted and never change: no need to
        # broadcast them at every forward.
        return DistributedDataParallel(model, forward_sync_buffers=False)

    def share_fitted(self, model: LateRanker) -> None:
        for name in (*_NORMALIZER, *_WIDE_SUPPORT):
            dist.broadcast(getattr(model, name), src=0)
        for p in model.wide_parameters():
            dist.broadcast(p.data, src=0)

    def join(self, wrapped: nn.Module):
        return wrapped.join()

    def end_epoch(self, model: LateRanker, opt: torch.optim.Optimizer, steps: int) -> None:
        # DDP's join already copied the parameters from a last joiner (the largest rank among those
        # with the most steps); copy that rank's optimizer state too, so Adam moments and step
        # counts agree before the next epoch.
        counts = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        dist.all_gather(counts, torch.tensor([steps], dtype=torch.int64))
        most = max(int(c) for c in counts)
        src = max(r for r, c in enumerate(counts) if int(c) == most)
        box = [opt.state_dict() if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        if self.rank != src:
            opt.load_state_dict(box[0])
        for p in model.parameters():  # the same parameters everywhere (a no-op after DDP's sync)
            dist.broadcast(p.data, src=src)

    def gather(self, arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        parts: list = [None] * self.world_size
        dist.all_gather_object(parts, arrays)
        out, offset = [], 0
        for *columns, groups in parts:
            groups = np.asarray(groups, dtype=np.int64)
            out.append((*columns, groups + offset))  # ranks hold disjoint requests
            offset += int(groups.max()) + 1 if len(groups) else 0
        return tuple(np.concatenate(col) for col in zip(*out, strict=True))


def _worker(
    rank: int,
    world_size: int,
    port: int,
    uri: str,
    fs_json: str,
    cfg: TrainConfig,
    model_config: RankerConfig,
    out: str,
) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}")
    try:
        fs = FeatureSet.from_json(fs_json)
        files = shard(warehouse_files(uri), rank, world_size)
        model, result = _train(uri, fs, cfg, model_config, None, files, _Ranks())
        torch.save({"state": model.state_dict(), "result": asdict(result)}, Path(out) / f"rank-{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def train_distributed(
    uri: str,
    fs: FeatureSet,
    world_size: int,
    cfg: TrainConfig = TrainConfig(),  # noqa: B008 (frozen)
    port: int | None = None,
    *,
    model_config: RankerConfig | None = None,
    states_dir: str | Path | None = None,
) -> tuple[LateRanker, list[TrainResult]]:
    """Train a late ranker with ``world_size`` data-parallel processes, each on its shard of files.

    Args:
        uri: Warehouse folder (either layout).
        fs: The FeatureSet the model is built for.
        world_size: Processes (ranks) to spawn.
        cfg: Training settings (as for :func:`~leanrec.train.trainer.train`).
        port: Loopback TCP port of the rendezvous; a free one when None.
        model_config: Model sizes.
        states_dir: Keep each rank's final state and result here as ``rank-<r>.pt`` (default: a
            temporary folder, removed).

    Returns:
        The model of rank 0 and the TrainResult of every rank, by rank.

    Raises:
        WarehouseError: The warehouse is missing or empty (checked before spawning).
        torch.multiprocessing.ProcessRaisedException: A rank failed (e.g. rank 0 has no training
            requests); the other ranks are stopped.

    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    warehouse_files(uri)  # fail here, not in every rank
    model_config = model_config or RankerConfig()
    with tempfile.TemporaryDirectory(prefix="leanrec-ddp-") as tmp:
        out = Path(states_dir) if states_dir is not None else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        args = (world_size, port or free_port(), str(uri), fs.to_json(), cfg, model_config, str(out))
        mp.spawn(_worker, args=args, nprocs=world_size, join=True)
        saved = [torch.load(out / f"rank-{r}.pt", weights_only=False) for r in range(world_size)]
    model = LateRanker(fs, model_config)
    model.load_state_dict(saved[0]["state"])
    return model, [TrainResult(**s["result"]) for s in saved]
