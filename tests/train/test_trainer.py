"""Training from either warehouse layout: determinism, layout parity, checkpoints and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from leanrec.cli import main
from leanrec.schema import FeatureSet
from leanrec.sim.demo import run_demo
from leanrec.train.trainer import CheckpointError, TrainConfig, load_checkpoint, save_checkpoint, train
from leanrec.warehouse.store import WarehouseError, featureset_of
from leanrec.world import WorldConfig

CFG = TrainConfig(epochs=2, patience=2, batch_requests=32, seed=3)


@pytest.fixture(scope="module")
def warehouses(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, FeatureSet]:
    out = tmp_path_factory.mktemp("train")
    run_demo(300, 5, out, world_config=WorldConfig(n_users=400, n_items=3000, n_creators=200, seed=5))
    lean, naive = out / "warehouse" / "lean", out / "warehouse" / "naive"
    return lean, naive, featureset_of(str(lean))


def test_training_is_deterministic_for_a_seed(warehouses) -> None:
    lean, _, fs = warehouses
    a, ra = train(str(lean), fs, CFG)
    b, rb = train(str(lean), fs, CFG)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    assert ra.test == rb.test
    assert ra.examples_trained > 0 and 0.0 <= ra.test["auc"] <= 1.0


def test_both_layouts_train_on_the_same_batches_and_agree(warehouses) -> None:
    lean, naive, fs = warehouses
    m1, r1 = train(str(lean), fs, CFG)
    m2, r2 = train(str(naive), fs, TrainConfig(**{**CFG.__dict__, "request_level": False}))
    assert r1.examples_trained == r2.examples_trained
    assert r1.test["auc"] == pytest.approx(r2.test["auc"], abs=2e-3)
    # the same examples in the same batches: the parameters end up (nearly) the same
    for (name, x), (_, y) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-2, atol=1e-3, msg=name)
    assert r1.bytes_read < r2.bytes_read  # the request-level warehouse reads less


def test_the_solved_wide_part_is_the_first_candidate_and_is_kept_when_the_deep_epochs_lose(
    warehouses,
) -> None:
    lean, _, fs = warehouses
    wide_only, r0 = train(str(lean), fs, TrainConfig(**{**CFG.__dict__, "epochs": 0}))
    assert r0.wide_valid_auc is not None and r0.wide_valid_auc > 0.6  # the wide part alone ranks well
    assert r0.epochs_run == 0 and r0.best_epoch == 0
    # a learning rate that wrecks the deep part: training hands back the wide start, not the wreck
    model, r1 = train(str(lean), fs, TrainConfig(**{**CFG.__dict__, "lr": 5.0}))
    assert r1.epochs_run >= 1 and max(r1.valid_auc) < r1.wide_valid_auc
    assert r1.best_epoch == 0
    assert r1.wide_valid_auc == pytest.approx(r0.wide_valid_auc)
    for p, q in zip(model.wide_parameters(), wide_only.wide_parameters(), strict=True):
        torch.testing.assert_close(p, q)
    # without the solve, the wide part starts at zero and the first candidate is an epoch
    _, r2 = train(str(lean), fs, TrainConfig(**{**CFG.__dict__, "wide_iters": 0}))
    assert r2.wide_valid_auc is None and r2.best_epoch >= 1


def test_the_wide_part_reads_only_the_inputs_its_solve_selected_through_training(warehouses) -> None:
    lean, _, fs = warehouses
    model, result = train(str(lean), fs, CFG)
    assert result.epochs_run == CFG.epochs
    chosen = 0
    for layer, support in (
        (model.user_wide, model.user_wide_support),
        (model.item_wide, model.item_wide_support),
    ):
        assert bool((layer.weight.detach()[support == 0] == 0).all())  # Adam never moved them
        chosen += int(support.sum())
    assert 0 < chosen < model.user_wide_support.numel() + model.item_wide_support.numel()


def test_a_checkpoint_records_its_featureset_and_refuses_another(warehouses, tmp_path: Path) -> None:
    lean, _, fs = warehouses
    model, result = train(str(lean), fs, TrainConfig(epochs=1, patience=1, batch_requests=32))
    path = tmp_path / "m.pt"
    save_checkpoint(model, path, result)
    again = load_checkpoint(path, fs)
    for (name, x), (_, y) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    pruned = FeatureSet(fs.name, fs.version + 1, fs.features[:-1])
    with pytest.raises(CheckpointError, match=r"expects FeatureSet demo v1.*the data is demo v2"):
        load_checkpoint(path, pruned)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt", fs)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt", fs)


def test_bad_warehouses_are_refused_clearly(warehouses, tmp_path: Path) -> None:
    _, _, fs = warehouses
    with pytest.raises(WarehouseError, match="does not exist"):
        train(str(tmp_path / "nowhere"), fs, CFG)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WarehouseError, match="no Parquet files"):
        train(str(tmp_path / "empty"), fs, CFG)


def test_cli_train_and_evaluate(warehouses, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    lean, naive, _ = warehouses
    model = tmp_path / "model.pt"
    assert main(["train", "--warehouse", str(lean), "--out", str(model), "--epochs", "1"]) == 0
    assert model.exists()
    assert main(["evaluate", "--model", str(model), "--warehouse", str(naive)]) == 0
    out = capsys.readouterr().out
    assert "auc" in out and "ndcg@10" in out
    assert main(["train", "--warehouse", str(tmp_path / "nowhere"), "--out", str(model)]) == 2
    assert "does not exist" in " ".join(capsys.readouterr().err.split())
    other = tmp_path / "other"
    run_demo(
        60,
        6,
        other,
        world_config=WorldConfig(n_users=400, n_items=3000, n_creators=200, seed=6, history_len=20),
    )
    assert main(["evaluate", "--model", str(model), "--warehouse", str(other / "warehouse" / "lean")]) == 2
    assert "expects FeatureSet" in " ".join(capsys.readouterr().err.split())
