"""Auditing a user's own FeatureSet, with and without a history, and the loop its pruned version closes.

The warehouses hold random requests of a shop's FeatureSet (no feature named as the synthetic world's)
with clicks drawn from a planted model (see ``Shop`` in ``tests/conftest.py``): taste·look, price,
budget and, with a history, whether the product is among the user's recent ones.
"""

from __future__ import annotations

import json

import pytest

from leanrec.audit import AuditConfig, audit
from leanrec.audit.cost import _forward_work, feature_costs
from leanrec.cli import main
from leanrec.featurefile import load_featureset, parse_featureset
from leanrec.train.trainer import load_checkpoint

VARIANTS = {"history": (), "no history": ("recent",)}
SEED = 2  # the assertions were checked on data seeds 0-3


@pytest.fixture(scope="module", params=list(VARIANTS))
def audited(request: pytest.FixtureRequest, shop, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A shop warehouse, a model `leanrec train` fitted on it, and `leanrec audit`'s report folder."""
    root = tmp_path_factory.mktemp("audit-roles")
    fs = parse_featureset(shop.toml(VARIANTS[request.param]))
    shop.write(root / "wh", fs, 600, seed=SEED)
    wh, model, out = str(root / "wh"), str(root / "model.pt"), root / "audit"
    assert main(["train", "--warehouse", wh, "--out", model, "--epochs", "2"]) == 0
    args = ["audit", "--model", model, "--warehouse", wh, "--out", str(out), "--budget", "0.005"]
    assert main([*args, "--repeats", "3"]) == 0
    return {"fs": fs, "wh": wh, "model": model, "out": out, "root": root}


def test_the_audit_keeps_the_role_features_and_the_planted_ones(audited: dict) -> None:
    fs = audited["fs"]
    report = json.loads((audited["out"] / "audit.json").read_text())
    assert set(report["features"]) == {f.name for f in fs.features}
    retired = set(report["plan"]["retire"])
    roles = {f.name for f in fs.features if f.role in ("history", "item_id")}
    assert roles and not roles & retired  # the model is built on them
    # Checked on data seeds 0-3: the planted inputs cost far more than the budget when shuffled.
    assert not {"taste", "look", "price"} & retired
    pruned = load_featureset(audited["out"] / "featureset.toml")
    assert pruned.name == fs.name and pruned.reads(fs)
    assert {f.name for f in pruned.features} == {f.name for f in fs.features} - retired


def test_the_encoder_is_charged_to_the_history_only(audited: dict) -> None:
    model = load_checkpoint(audited["model"], audited["fs"])
    costs = feature_costs(model, audited["wh"], items_logged=6.0)
    assert set(costs) == {f.name for f in audited["fs"].features}
    assert sum(c.work_share for c in costs.values()) < 1.0  # towers and the top MLP are not attributed
    _, history_work = _forward_work(model, 100)
    if model.history is None:
        assert history_work == 0.0
    else:
        # The same lookups as its aligned sequence, plus the encoder and the target attention.
        assert history_work > 0.0
        assert costs["recent"].work_share > costs["recent_aisle"].work_share
        assert costs["recent"].logged_bytes == costs["recent_aisle"].logged_bytes


def test_the_pruned_featureset_trains_and_evaluates_on_the_parent_warehouse(
    audited: dict, capsys: pytest.CaptureFixture
) -> None:
    toml, wh, v2 = audited["out"] / "featureset.toml", audited["wh"], str(audited["root"] / "v2.pt")
    assert main(["train", "--warehouse", wh, "--featureset", str(toml), "--out", v2, "--epochs", "1"]) == 0
    assert main(["evaluate", "--model", v2, "--warehouse", wh]) == 0
    assert "auc" in capsys.readouterr().out
    model = load_checkpoint(v2, audited["fs"])
    assert model.fs == load_featureset(toml)
    # The pruned model audits on the parent's warehouse too.
    result = audit(model, wh, AuditConfig(repeats=2, latency_repeats=10))
    assert set(result.importance) == {f.name for f in model.fs.features}
