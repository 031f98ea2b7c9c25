"""Training, evaluating and loading checkpoints on a user's own FeatureSet, and across its versions.

The warehouses hold random requests of a shop's FeatureSet (no feature named as the synthetic world's)
with clicks drawn from a planted model (see ``Shop`` in ``tests/conftest.py``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from leanrec.cli import main
from leanrec.featurefile import dump_featureset, parse_featureset
from leanrec.models import LateRanker, RankerConfig
from leanrec.schema import FeatureSet, Side
from leanrec.train.reader import ReadStats, iter_batches
from leanrec.train.trainer import (
    CheckpointError,
    TrainConfig,
    load_checkpoint,
    predict,
    save_checkpoint,
    split_batches,
    train,
)
from leanrec.warehouse import TableLayout

DEEP = TrainConfig(epochs=3, patience=2, lr=3e-3, batch_requests=32, wide_iters=0, seed=0)
"""The deep part alone (no wide solve), so what is learnt went through the towers and the history."""


@dataclasses.dataclass
class Shops:
    fs: FeatureSet  # v1, with a history
    lean: Path  # request-level warehouse of v1
    naive: Path  # the same requests, impression-level
    pruned: FeatureSet  # v2: the history, its aligned sequence and the badges retired
    pruned_file: Path
    v1_model: Path  # trained on lean by `leanrec train`
    v2_model: Path  # trained on lean under the pruned FeatureSet


@pytest.fixture(scope="module")
def shops(shop, tmp_path_factory: pytest.TempPathFactory) -> Shops:
    root = tmp_path_factory.mktemp("shops")
    fs = parse_featureset(shop.toml())
    shop.write(root / "lean", fs, 300, seed=7)
    shop.write(root / "naive", fs, 300, seed=7, layout=TableLayout.IMPRESSION)
    pruned = fs.retire({"recent": "costly", "recent_aisle": "goes with recent", "badges": "noise"})
    pruned_file = root / "pruned.toml"
    pruned_file.write_text(dump_featureset(pruned))
    v1, v2 = root / "v1.pt", root / "v2.pt"
    assert main(["train", "--warehouse", str(root / "lean"), "--out", str(v1), "--epochs", "1"]) == 0
    args = ["train", "--warehouse", str(root / "lean"), "--featureset", str(pruned_file), "--out", str(v2)]
    assert main([*args, "--epochs", "1"]) == 0
    return Shops(fs, root / "lean", root / "naive", pruned, pruned_file, v1, v2)


@pytest.mark.parametrize("drop", [(), ("recent",)], ids=["history", "no history"])
def test_training_learns_a_featureset_found_by_roles(shop, tmp_path: Path, drop: tuple[str, ...]) -> None:
    fs = parse_featureset(shop.toml(drop))
    oracle = shop.write(tmp_path / "wh", fs, 600, seed=0)
    model, result = train(str(tmp_path / "wh"), fs, DEEP)
    assert (model.encoder is not None) == (not drop)
    assert result.best_epoch >= 1 and result.examples_trained > 0
    # Checked on seeds 0-3 of data and training: the deep part recovers well over a third of what
    # the planted model ranks above chance (the worst seed about two thirds).
    assert result.test["auc"] > 0.5 + (oracle - 0.5) / 3


def test_cli_trains_and_evaluates_a_users_featureset(shops: Shops, capsys: pytest.CaptureFixture) -> None:
    model = load_checkpoint(shops.v1_model, shops.fs)
    assert model.fs == shops.fs and model.encoder is not None
    for warehouse in (shops.lean, shops.naive):
        assert main(["evaluate", "--model", str(shops.v1_model), "--warehouse", str(warehouse)]) == 0
        out = capsys.readouterr().out
        assert "auc" in out and "ndcg@10" in out


def test_a_pruned_checkpoint_evaluates_on_its_parent_versions_warehouse(
    shops: Shops, capsys: pytest.CaptureFixture
) -> None:
    model = load_checkpoint(shops.v2_model, shops.fs)  # the warehouse's FeatureSet is the parent, v1
    assert model.fs == shops.pruned and model.fs.version == 2
    assert model.history is None and model.encoder is None  # the history was retired
    # Through the command line, on either layout of the parent's data.
    for warehouse in (shops.lean, shops.naive):
        assert main(["evaluate", "--model", str(shops.v2_model), "--warehouse", str(warehouse)]) == 0
        assert "auc" in capsys.readouterr().out
    # Only the checkpoint's columns are read: the batches have its widths and cost fewer bytes.
    v1_stats, v2_stats = ReadStats(), ReadStats()
    (v1_batch,) = iter_batches(str(shops.lean), shops.fs, batch_requests=1_000, stats=v1_stats)
    (v2_batch,) = iter_batches(str(shops.lean), model.fs, batch_requests=1_000, stats=v2_stats)
    req = shops.pruned.layout(Side.REQUEST)
    assert v2_batch.req_ints.shape[1] == req.int_width < v1_batch.req_ints.shape[1]
    assert v2_stats.bytes_read < v1_stats.bytes_read
    # The evaluation equals the model on the parent's data projected onto its columns.
    projected = [
        dataclasses.replace(
            b,
            req_floats=b.req_floats[:, shops.pruned.columns_from(shops.fs, Side.REQUEST)[0]],
            req_ints=b.req_ints[:, shops.pruned.columns_from(shops.fs, Side.REQUEST)[1]],
            item_floats=b.item_floats[:, shops.pruned.columns_from(shops.fs, Side.ITEM)[0]],
            item_ints=b.item_ints[:, shops.pruned.columns_from(shops.fs, Side.ITEM)[1]],
        )
        for b in split_batches(str(shops.lean), shops.fs, TrainConfig(), 2)
    ]
    direct = predict(model, split_batches(str(shops.lean), model.fs, TrainConfig(), 2))
    for a, b in zip(direct, predict(model, projected), strict=True):
        assert (a == b).all()


def test_a_checkpoint_refuses_data_it_cannot_read_in_one_line(
    shops: Shops, tmp_path: Path, shop, capsys: pytest.CaptureFixture
) -> None:
    # The parent's checkpoint on the pruned version's data: a newer version than it knows.
    pruned_wh = tmp_path / "pruned"
    shop.write(pruned_wh, shops.pruned, 30, seed=1)
    with pytest.raises(CheckpointError, match=r"expects FeatureSet shop v1.*newer version \(v2 > v1\)"):
        load_checkpoint(shops.v1_model, shops.pruned)
    assert main(["evaluate", "--model", str(shops.v1_model), "--warehouse", str(pruned_wh)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "newer version" in " ".join(err.split())
    # Another lineage, and a feature of another shape.
    other = parse_featureset(shop.toml(name="bakery"))
    with pytest.raises(CheckpointError, match="another lineage"):
        load_checkpoint(shops.v2_model, other)
    reshaped = parse_featureset(shop.toml().replace("rows = 7", 'rows = 7\ndtype = "string"'))
    with pytest.raises(CheckpointError, match=r"features of another shape: \['weekday'\]"):
        load_checkpoint(shops.v2_model, reshaped)
    # Rows and maps are the model's business: data written under other ones reads the same.
    remapped = parse_featureset(shop.toml().replace("rows = 7", 'rows = 8\nmap = "hash"'))
    assert remapped["weekday"].id_map == "hash" and remapped != shops.fs
    model = load_checkpoint(shops.v2_model, remapped)
    assert model.fs == shops.pruned and model.tables["weekday"].spec.rows == 7
    # Data of the checkpoint's version that lacks features it reads.
    with pytest.raises(CheckpointError, match=r"not in the written FeatureSet: \['recent', 'recent_aisle'"):
        load_checkpoint(shops.v1_model, FeatureSet("shop", 1, shops.pruned.features))


def test_checkpoints_that_named_the_history_and_item_id_still_load(shops: Shops, tmp_path: Path) -> None:
    """Older checkpoints name the history and item id in their model config; some predate roles."""
    data = torch.load(shops.v1_model, weights_only=False)
    batch = next(iter(iter_batches(str(shops.lean), shops.fs, batch_requests=20)))
    inputs = (batch.req_floats, batch.req_ints, batch.item_floats, batch.item_ints, batch.item_request)

    def scores(model: LateRanker) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(*inputs)

    expect = scores(load_checkpoint(shops.v1_model))
    named = {**data["model_config"], "history": "recent", "item_id": "product"}
    # With roles in its FeatureSet the names are ignored (even wrong ones).
    for config in (named, {**named, "history": "elsewhere"}):
        torch.save({**data, "model_config": config}, tmp_path / "named.pt")
        torch.testing.assert_close(scores(load_checkpoint(tmp_path / "named.pt", shops.fs)), expect)
    # Without roles (written before features had them), the names give the roles back.
    fs = json.loads(data["featureset"])
    fs["features"] = [{k: v for k, v in f.items() if k != "role"} for f in fs["features"]]
    torch.save({**data, "featureset": json.dumps(fs), "model_config": named}, tmp_path / "old.pt")
    old = load_checkpoint(tmp_path / "old.pt", shops.fs)
    assert old.history is not None and old.history.name == "recent" and old.item_id.name == "product"
    torch.testing.assert_close(scores(old), expect)
    # Weights that do not fit the FeatureSet are refused, not a traceback.
    flat = parse_featureset(dump_featureset(shops.fs).replace('role = "history"\n', ""))
    save_checkpoint(LateRanker(flat, RankerConfig(**data["model_config"])), tmp_path / "flat.pt")
    torch.save(
        {**torch.load(tmp_path / "flat.pt", weights_only=False), "state": data["state"]},
        tmp_path / "mixed.pt",
    )
    with pytest.raises(CheckpointError, match="weights do not fit"):
        load_checkpoint(tmp_path / "mixed.pt")
