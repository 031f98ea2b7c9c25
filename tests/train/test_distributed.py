"""Data-parallel training: two gloo ranks on their own shards end with the same model."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from leanrec.models.ranker import LateRanker, RankerConfig
from leanrec.sim.demo import run_demo
from leanrec.train.distributed import train_distributed
from leanrec.train.reader import shard, warehouse_files
from leanrec.train.trainer import TrainConfig, split_batches, train
from leanrec.warehouse.store import featureset_of
from leanrec.world import WorldConfig

CFG = TrainConfig(epochs=1, patience=1, batch_requests=16, seed=0)
CUTS = (0.0, 0.35, 0.55, 0.85, 1.0)  # four files of uneven sizes: the ranks hold uneven batches


@pytest.fixture(scope="module")
def split_warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The lean warehouse of a small demo, rewritten as four files in the same folder layout."""
    out = tmp_path_factory.mktemp("ddp")
    run_demo(200, 4, out, world_config=WorldConfig(n_users=400, n_items=3000, n_creators=200, seed=4))
    lean, split = out / "warehouse" / "lean", out / "split"
    for path in warehouse_files(str(lean)):
        table = pq.ParquetFile(path).read()
        assert table.schema.metadata  # the FeatureSet and layout travel in the schema metadata
        folder = split / Path(path).parent.relative_to(lean)
        folder.mkdir(parents=True, exist_ok=True)
        n = table.num_rows
        for i, (a, b) in enumerate(itertools.pairwise(CUTS)):
            part = table.slice(round(a * n), round(b * n) - round(a * n))
            pq.write_table(part, folder / f"{Path(path).stem}-{i}.parquet", compression="zstd")
    return split


def test_two_ranks_train_their_shards_into_the_same_model(split_warehouse: Path, tmp_path: Path) -> None:
    uri = str(split_warehouse)
    fs = featureset_of(uri)
    files = warehouse_files(uri)
    assert len(files) == 4 and shard(files, 0, 2) != shard(files, 1, 2)

    model, results = train_distributed(uri, fs, world_size=2, cfg=CFG, states_dir=tmp_path)

    # every rank ends with exactly the same parameters and buffers, and rank 0's are returned
    s0 = torch.load(tmp_path / "rank-0.pt", weights_only=False)["state"]
    s1 = torch.load(tmp_path / "rank-1.pt", weights_only=False)["state"]
    assert s0.keys() == s1.keys() == model.state_dict().keys()
    for name, x in s0.items():
        assert torch.equal(x, s1[name]), name
        assert torch.equal(x, model.state_dict()[name]), name

    # each rank trained only its own shard: together, exactly what one process trains on
    _, single = train(uri, fs, CFG)
    assert len(results) == 2 and all(r.examples_trained > 0 for r in results)
    assert results[0].examples_trained != results[1].examples_trained  # uneven shards
    assert sum(r.examples_trained for r in results) == single.examples_trained
    # validation and test metrics are over the whole split, hence the same on every rank
    assert results[0].valid_auc == results[1].valid_auc and results[0].test == results[1].test

    # training moved the parameters away from the seeded initialisation
    torch.manual_seed(CFG.seed)
    init = LateRanker(fs, RankerConfig())
    trained = dict(model.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in init.named_parameters())

    # The managed maps were filled once, before training, from every rank's ids merged: the maps a
    # model gets from observing all the training ids at once.
    parts: dict[str, list[np.ndarray]] = {}
    for b in split_batches(uri, fs, CFG, 0):  # request-level: one request row per request
        for name, ids in init.table_ids(b.req_ints, b.item_ints).items():
            parts.setdefault(name, []).append(ids.numpy())
    assert {t.spec.kind for t in init.tables.values()} == {"managed"}
    for name, table in init.tables.items():
        ids = np.concatenate(parts[name])
        distinct, counts = np.unique(ids[ids != -1], return_counts=True)
        table.observe(torch.from_numpy(distinct), counts)
        for buffer, value in table.named_buffers():
            assert torch.equal(s0[f"tables.{name}.{buffer}"], value), (name, buffer)
        assert int(table.admissions) > 0
        # Both ranks report the maps of all the data: the ids one process trained on.
        assert results[0].id_maps[name] == results[1].id_maps[name]
        assert results[0].id_maps[name]["ids_seen"] == single.id_maps[name]["ids_seen"] == len(distinct)
