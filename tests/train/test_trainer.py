"""Training from either warehouse layout: determinism, layout parity, id maps, checkpoints, clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from leanrec.cli import main
from leanrec.models import LateRanker, RankerConfig
from leanrec.models.idmap import MapSpec
from leanrec.schema import FeatureSet
from leanrec.sim.demo import run_demo
from leanrec.train.trainer import (
    CheckpointError,
    TrainConfig,
    TrainResult,
    load_checkpoint,
    predict,
    save_checkpoint,
    split_batches,
    train,
)
from leanrec.warehouse.store import WarehouseError, featureset_of
from leanrec.world import WorldConfig

CFG = TrainConfig(epochs=2, patience=2, batch_requests=32, seed=3)
DEEP = TrainConfig(**{**CFG.__dict__, "epochs": 1, "patience": 1, "wide_iters": 0})
"""One epoch without the wide solve: the model handed back is the trained one, maps included (the
solved wide part alone, a candidate of its own, may win and hand back the maps as they started)."""


@pytest.fixture(scope="module")
def warehouses(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, FeatureSet]:
    out = tmp_path_factory.mktemp("train")
    run_demo(300, 5, out, world_config=WorldConfig(n_users=400, n_items=3000, n_creators=200, seed=5))
    lean, naive = out / "warehouse" / "lean", out / "warehouse" / "naive"
    return lean, naive, featureset_of(str(lean))


@pytest.fixture(scope="module")
def trained(warehouses) -> tuple[LateRanker, TrainResult]:
    """A model trained with ``CFG`` on the request-level warehouse."""
    lean, _, fs = warehouses
    return train(str(lean), fs, CFG)


@pytest.fixture(scope="module")
def deep(warehouses) -> dict[str, tuple[LateRanker, TrainResult]]:
    """Models trained with ``DEEP`` on either layout, by layout ("lean", "naive")."""
    lean, naive, fs = warehouses
    naive_cfg = TrainConfig(**{**DEEP.__dict__, "request_level": False})
    return {"lean": train(str(lean), fs, DEEP), "naive": train(str(naive), fs, naive_cfg)}


def _map_state(model: LateRanker) -> dict[str, torch.Tensor]:
    """Every id map's state but its weights: slots, scores, candidates, counters."""
    params = {n for n, _ in model.named_parameters()}
    return {n: b for n, b in model.state_dict().items() if n.startswith("tables.") and n not in params}


def _seen(model: LateRanker, batches) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Distinct ids each table reads in request-level batches (a request's ids once), with counts."""
    parts: dict[str, list[np.ndarray]] = {}
    for b in batches:
        for name, ids in model.table_ids(b.req_ints, b.item_ints).items():
            parts.setdefault(name, []).append(ids.numpy())
    out = {}
    for name, p in parts.items():
        ids = np.concatenate(p)
        out[name] = np.unique(ids[ids != -1], return_counts=True)
    return out


def test_training_is_deterministic_for_a_seed(warehouses, trained) -> None:
    lean, _, fs = warehouses
    a, ra = trained
    b, rb = train(str(lean), fs, CFG)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    assert ra.test == rb.test
    assert ra.examples_trained > 0 and 0.0 <= ra.test["auc"] <= 1.0


def test_both_layouts_train_on_the_same_batches_and_agree(warehouses, trained) -> None:
    _, naive, fs = warehouses
    m1, r1 = trained
    m2, r2 = train(str(naive), fs, TrainConfig(**{**CFG.__dict__, "request_level": False}))
    assert r1.examples_trained == r2.examples_trained
    assert r1.test["auc"] == pytest.approx(r2.test["auc"], abs=2e-3)
    assert r1.id_maps == r2.id_maps  # the same ids seen as often (see the next test)
    # the same examples in the same batches: the parameters end up (nearly) the same
    for (name, x), (_, y) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-2, atol=1e-3, msg=name)
    assert r1.bytes_read < r2.bytes_read  # the request-level warehouse reads less


def test_dedup_trains_the_same_model(warehouses, trained, tmp_path: Path) -> None:
    """Each distinct row's work once (the default) or not: the same batches, the same model to rounding."""
    lean, _, fs = warehouses
    m1, r1 = trained
    assert CFG.dedup
    m2, r2 = train(str(lean), fs, TrainConfig(**{**CFG.__dict__, "dedup": False}))
    assert r1.examples_trained == r2.examples_trained and r1.id_maps == r2.id_maps
    assert r1.test["auc"] == pytest.approx(r2.test["auc"], abs=1e-4)
    for (name, x), (_, y) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-5, msg=name)
    out = tmp_path / "model.pt"
    args = ["train", "--warehouse", str(lean), "--out", str(out), "--epochs", "1", "--no-dedup"]
    assert main(args) == 0 and load_checkpoint(out, fs) is not None


def test_both_layouts_fill_the_managed_maps_alike(deep) -> None:
    """A request's ids count once in either layout: the same slots, scores and turnover, exactly."""
    (m1, r1), (m2, r2) = deep["lean"], deep["naive"]
    assert r1.best_epoch == r2.best_epoch == 1
    maps1, maps2 = _map_state(m1), _map_state(m2)
    assert maps1 and maps1.keys() == maps2.keys()
    for name, x in maps1.items():
        assert torch.equal(x, maps2[name]), name
    assert all(t.counters()["admissions"] > 0 for t in m1.tables.values())
    assert r1.id_maps == r2.id_maps


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
    maps, start = _map_state(model), _map_state(wide_only)  # the id maps as they were at the start too
    assert all(torch.equal(x, start[name]) for name, x in maps.items())
    assert all(t.counters()["admissions"] == 0 for t in model.tables.values())
    # without the solve, the wide part starts at zero and the first candidate is an epoch
    _, r2 = train(str(lean), fs, TrainConfig(**{**CFG.__dict__, "wide_iters": 0}))
    assert r2.wide_valid_auc is None and r2.best_epoch >= 1


def test_the_wide_part_reads_only_the_inputs_its_solve_selected_through_training(trained) -> None:
    model, result = trained
    assert result.epochs_run == CFG.epochs
    chosen = 0
    for layer, support in (
        (model.user_wide, model.user_wide_support),
        (model.item_wide, model.item_wide_support),
    ):
        assert bool((layer.weight.detach()[support == 0] == 0).all())  # Adam never moved them
        chosen += int(support.sum())
    assert 0 < chosen < model.user_wide_support.numel() + model.item_wide_support.numel()


def test_the_managed_maps_learn_in_training_and_stay_put_in_evaluation(warehouses, deep) -> None:
    lean, _, fs = warehouses
    model, _ = deep["lean"]
    assert {t.spec.kind for t in model.tables.values()} == {"managed"}  # the default map
    torch.manual_seed(DEEP.seed)
    fresh = _map_state(LateRanker(fs, RankerConfig()))
    maps = _map_state(model)
    for name, table in model.tables.items():
        assert int(table.step) > 0 and table.counters()["admissions"] > 0, name
        assert not torch.equal(maps[f"tables.{name}.slot_ids"], fresh[f"tables.{name}.slot_ids"]), name
    # Evaluation and serving read the maps and never change them.
    before = {n: x.clone() for n, x in model.state_dict().items()}
    predict(model, split_batches(str(lean), fs, CFG, 2))
    model.eval()
    b = split_batches(str(lean), fs, CFG, 1)[0]
    with torch.no_grad():
        model(b.req_floats, b.req_ints, b.item_floats, b.item_ints, b.item_request)
    for name, x in model.state_dict().items():
        assert torch.equal(x, before[name]), name


def test_the_result_reports_each_tables_map(warehouses, deep) -> None:
    lean, _, fs = warehouses
    model, result = deep["lean"]
    assert set(result.id_maps) == set(model.tables)
    seen = _seen(model, split_batches(str(lean), fs, DEEP, 0))  # what training read
    for name, table in model.tables.items():
        collisions = table.collisions(*seen[name])
        del collisions["rows_in_use"]
        expect = {"map": "managed", "memory_bytes": table.memory_bytes, **table.counters(), **collisions}
        assert result.id_maps[name] == expect, name
    # The item id table reads the history too; every item fits in its slots, so none collides.
    i_id = result.id_maps["i_id"]
    assert i_id["ids_seen"] == len(seen["i_id"][0]) > 0 and i_id["ids_seen"] <= i_id["rows"]
    assert i_id["collision_rate_head"] == i_id["collision_rate_rest"] == 0.0
    assert i_id["memory_bytes"] > i_id["rows"] * model.config.dim * 4  # the weights and the map's state


def test_a_table_smaller_than_its_ids_evicts_and_keeps_the_frequent_ones(warehouses) -> None:
    """The same data under a FeatureSet of small item tables: managed and hashed for one memory."""
    lean, _, fs = warehouses
    results = {}
    for kind in ("managed", "hash"):
        small = FeatureSet(
            fs.name,
            fs.version,
            tuple(
                dataclasses.replace(f, rows=128, map=kind) if f.name in ("i_id", "u_hist") else f
                for f in fs.features
            ),
            fs.retired,
        )
        model, result = train(str(lean), small, DEEP)
        assert model.tables["i_id"].spec == MapSpec(kind, 128)
        results[kind] = result.id_maps["i_id"]
    managed, hashed = results["managed"], results["hash"]
    assert managed["ids_seen"] == hashed["ids_seen"] > 10 * 128
    assert managed["map"] == "managed" and hashed["map"] == "hash"
    assert managed["evictions"] > 0 and managed["admissions"] > managed["rows"]
    assert hashed["admissions"] == hashed["evictions"] == 0
    # Among so many ids nearly every one shares a hashed row; the most frequent hold slots of their own.
    assert hashed["collision_rate_head"] > 0.9 and hashed["collision_rate_rest"] > 0.9
    assert managed["collision_rate_head"] == 0.0 and managed["collision_rate_rest"] > 0.5


def test_a_checkpoint_records_its_featureset_and_refuses_another(warehouses, deep, tmp_path: Path) -> None:
    lean, _, fs = warehouses
    model, result = deep["lean"]
    path = tmp_path / "m.pt"
    save_checkpoint(model, path, result)
    again = load_checkpoint(path, fs)
    for (name, x), (_, y) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    # Each map is restored exactly: the same row for every id, the same counters, the same scores.
    assert all(t.counters()["admissions"] > 0 for t in model.tables.values())  # maps of substance
    for name, (ids, _) in _seen(model, split_batches(str(lean), fs, DEEP, 0)).items():
        table, restored = model.tables[name], again.tables[name]
        np.testing.assert_array_equal(restored.rows_of(ids), table.rows_of(ids))
        assert restored.counters() == table.counters(), name
    test = split_batches(str(lean), fs, CFG, 2)
    for a, b in zip(predict(model, test), predict(again, test), strict=True):
        np.testing.assert_array_equal(a, b)
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
