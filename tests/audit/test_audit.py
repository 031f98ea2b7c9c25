"""Feature audits: importance on a model whose answer is known, plans within budget, bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from leanrec.audit import (
    AuditConfig,
    AuditError,
    PermutationAuditor,
    audit,
    make_plan,
    permutation_importance,
)
from leanrec.audit.cost import FeatureCost, feature_costs
from leanrec.audit.importance import _ci, concat_batches, family, feature_columns, weight_importance
from leanrec.audit.related import BUCKETS, _robust_spread, relatedness, representation
from leanrec.audit.report import write_audit
from leanrec.featurefile import load_featureset
from leanrec.funnel import Funnel
from leanrec.ids import mix64
from leanrec.models import LateRanker, RankerConfig
from leanrec.schema import Feature, FeatureSet, Kind, Owner, Side
from leanrec.sim.demo import run_demo
from leanrec.train.reader import Batch
from leanrec.train.trainer import TrainConfig, train
from leanrec.warehouse.store import featureset_of
from leanrec.world import World, WorldConfig

KNOWN = ("u_emb_0", "i_emb")


def _known_model(world: World) -> LateRanker:
    """A ranker whose click logit is exactly u_emb_0 · i_emb: the deep part is silenced."""
    torch.manual_seed(0)
    model = LateRanker(world.featureset, RankerConfig(dim=8, hidden=16))
    torch.nn.init.zeros_(model.top[-1].weight)
    torch.nn.init.zeros_(model.top[-1].bias)
    with torch.no_grad():
        model.space_weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    return model.eval()


def _known_data(world: World, model: LateRanker) -> Batch:
    """Requests ranked by the funnel, clicked where the model's own logit is high (plus label noise)."""
    b = 40
    ranked = Funnel(world).rank(world.user_ids[:b], np.zeros(b, np.int64), np.zeros(b, np.int64))
    rows = np.arange(b * 100)
    req = (
        torch.from_numpy(ranked.request.floats.copy()),
        torch.from_numpy(ranked.request.ints.astype(np.int64)),
    )
    items = torch.from_numpy(ranked.items.floats.copy()), torch.from_numpy(ranked.items.ints.astype(np.int64))
    item_request = torch.from_numpy(rows // 100)
    with torch.no_grad():
        logit = model(*req, *items, item_request)[:, 0].numpy()
    rng = np.random.default_rng(0)
    click = (logit + rng.normal(0, logit.std(), len(logit)) > np.median(logit)).astype(np.float32)
    return Batch(
        *req,
        *items,
        item_request,
        torch.from_numpy(click),
        torch.zeros(len(click)),
        [f"r{i}" for i in range(b)],
        torch.from_numpy(rows % 100),
    )


@pytest.fixture
def known(small_world: World) -> tuple[LateRanker, Batch, PermutationAuditor]:
    model = _known_model(small_world)
    data = _known_data(small_world, model)
    return model, data, PermutationAuditor(model, data)


def test_permutation_finds_exactly_the_features_the_model_reads(known, small_world: World) -> None:
    _, _, auditor = known
    names = [f.name for f in small_world.featureset.features]
    imp = permutation_importance(auditor, names, repeats=3, block_size=8, tolerance=1e-4)
    assert set(imp) == set(names)
    for n in KNOWN:
        assert imp[n].loss > 0.05 and len(imp[n].block) == 1, n
    # Every other feature cannot change the output: its loss is exactly zero, decided in blocks.
    others = [n for n in names if n not in KNOWN]
    assert all(imp[n].loss == 0.0 for n in others)
    assert any(len(imp[n].block) > 1 for n in others)
    # Screening spent fewer shuffles than one full measurement per feature would.
    assert auditor.evaluations < 3 * len(names)


def test_weight_importance_reads_first_layer_norms_and_pooled_embeddings(known) -> None:
    model, data, _ = known
    w = weight_importance(model, data)
    assert set(w) == {f.name for f in model.fs.features}
    assert w["u_taste_00"] == pytest.approx(float(model.dense_input_norms(Side.REQUEST)[0].detach()))
    with torch.no_grad():
        model.tables["i_category"].weight.zero_()
    assert weight_importance(model, data)["i_category"] == 0.0
    # Weights mislead here: the features the model truly reads do not stand out by weight norm.
    dense = [n for n in w if model.fs[n].is_float]
    assert sorted(dense, key=w.get)[-1] not in KNOWN


def _costs(fs: FeatureSet) -> dict[str, FeatureCost]:
    return {f.name: FeatureCost(4.0 * f.size, 1.0 * f.size, 0.0, 0.001 * f.size, 0.0) for f in fs.features}


@pytest.mark.parametrize("budget", [0.0, 0.001, 0.05, 0.3])
def test_a_plan_never_exceeds_its_budget(known, small_world: World, budget: float) -> None:
    _, _, auditor = known
    names = [f.name for f in small_world.featureset.features]
    imp = permutation_importance(auditor, names, repeats=3, block_size=8)
    plan = make_plan(auditor, imp, _costs(small_world.featureset), budget, repeats=3)
    assert plan.loss <= budget
    # The plan's loss is one that was measured, for exactly the retired set.
    assert plan.loss == 0.0 or (len(plan.retire), plan.loss) in plan.probes
    # The zero-value features all go; what the model reads stays unless the budget allows its loss.
    assert len(plan.retire) >= len(names) - 2
    if budget < 0.05:
        assert not set(KNOWN) & set(plan.retire)
    pruned = plan.featureset(small_world.featureset)
    assert pruned.version == small_world.featureset.version + 1
    assert set(pruned.retired) == set(plan.retire)


def test_a_related_feature_of_no_value_is_never_retired(known, small_world: World) -> None:
    _, _, auditor = known
    names = [f.name for f in small_world.featureset.features]
    imp = permutation_importance(auditor, names, repeats=3, block_size=8)
    related = frozenset(n for n in names if n.startswith(("i_taste", "u_taste")))
    plan = make_plan(auditor, imp, _costs(small_world.featureset), 0.001, repeats=3, related=related)
    assert not related & set(plan.retire)
    assert set(plan.related) == related
    # Everything else of no value still goes.
    assert set(plan.retire) == set(names) - related - set(KNOWN)


def _repeated_entities(seed: int = 0) -> tuple[FeatureSet, Batch, dict[str, np.ndarray]]:
    """Items of 300 entities, each shown 1 to 40 times, with features related to ``anchor`` or not.

    ``copy`` and ``bucket`` are functions of the valuable ``anchor``; ``noise`` and ``noise_id`` are
    drawn once per entity, so they repeat with it exactly as a related feature would.
    """
    rng = np.random.default_rng(seed)
    n = 300
    entity = np.repeat(np.arange(n), rng.integers(1, 41, n))
    anchor = rng.normal(size=(n, 4))
    values = {
        "anchor": anchor,
        "copy": anchor[:, :1] + 0.7 * rng.normal(size=(n, 1)),
        "noise": rng.normal(size=(n, 1)),
        "bucket": np.digitize(anchor[:, 1:2], [-1.0, 0.0, 1.0]),
        "noise_id": rng.integers(0, 500, (n, 1)),
    }
    fs = FeatureSet(
        "entities",
        1,
        (
            Feature("u", Owner.USER, Kind.DENSE),
            Feature("anchor", Owner.ITEM, Kind.DENSE, 4),
            Feature("copy", Owner.ITEM, Kind.DENSE),
            Feature("noise", Owner.ITEM, Kind.DENSE),
            Feature("bucket", Owner.ITEM, Kind.SPARSE, 1, 4),
            Feature("noise_id", Owner.ITEM, Kind.SPARSE, 1, 500),
        ),
    )
    floats = np.hstack([values[k] for k in ("anchor", "copy", "noise")])[entity]
    ints = np.hstack([values[k] for k in ("bucket", "noise_id")])[entity]
    m = len(entity)
    batch = Batch(
        torch.zeros(1, 1),
        torch.zeros(1, 0, dtype=torch.long),
        torch.from_numpy(floats.astype(np.float32)),
        torch.from_numpy(ints.astype(np.int64)),
        torch.zeros(m, dtype=torch.long),
        torch.zeros(m),
        torch.zeros(m),
        ["r0"],
        torch.arange(m),
    )
    return fs, batch, values


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_relatedness_tells_what_valuable_features_explain_from_noise_that_repeats(seed: int) -> None:
    fs, batch, _ = _repeated_entities(seed)
    found = relatedness(fs, batch, ["anchor"], ["copy", "noise", "bucket", "noise_id", "u"], seed=seed)
    assert found["copy"].related and found["bucket"].related
    assert not found["noise"].related and not found["noise_id"].related
    # Repetition inflates what unrelated values seem to share with the anchor: the reference sees it.
    assert found["noise"].null_mean > 4 / len(batch.item_floats)
    # The request side has no valuable feature: nothing there can be related to one.
    assert "u" not in found


def test_ids_are_represented_by_their_values_whatever_their_range() -> None:
    """Raw ids anywhere in int64: a small categorical keeps a column per value, a large one hashes."""
    fs, batch, _ = _repeated_entities(0)
    cols = feature_columns(fs)
    raw = np.array([2**63 - 1, -(2**63), -2, 10**18], np.int64)  # the 4 values of ``bucket``, renamed
    ints = batch.item_ints.clone()
    ints[:, cols["bucket"].start] = torch.from_numpy(raw[ints[:, cols["bucket"].start].numpy()])
    renamed = Batch(**{**batch.__dict__, "item_ints": ints})
    small, big = (representation(b, Side.ITEM, cols["bucket"]) for b in (batch, renamed))
    assert small.shape == big.shape == (len(ints), 4)
    assert (big.sum(1) == 1).all()  # each row counts its one id in one column
    # the same partition of the rows whatever the ids' values
    assert len({tuple(c) for c in np.unique(np.hstack([small, big]), axis=0)}) == 4
    found = relatedness(fs, renamed, ["anchor"], ["copy", "noise", "bucket", "noise_id"], seed=0)
    assert found["bucket"].related and not found["noise_id"].related
    # More distinct ids than columns: each id counts in the column its hash names.
    noise = representation(batch, Side.ITEM, cols["noise_id"])
    ids = batch.item_ints[:, cols["noise_id"].start].numpy()
    assert len(np.unique(ids)) > BUCKETS and noise.shape == (len(ids), BUCKETS)
    bucket = (mix64(ids) % np.uint64(BUCKETS)).astype(np.int64)
    np.testing.assert_array_equal(noise, np.eye(BUCKETS)[bucket])
    ints = batch.item_ints.clone()
    ints[::2, cols["noise_id"].start] = -1
    padded = representation(Batch(**{**batch.__dict__, "item_ints": ints}), Side.ITEM, cols["noise_id"])
    assert (padded[::2] == 0).all() and (padded[1::2].sum(1) == 1).all()  # padding counts nowhere


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_reference_of_relatedness_is_not_widened_by_a_few_tied_features(seed: int) -> None:
    """Counters at zero for most entities (the light ones) shuffle far wider than other features."""
    fs, batch, _ = _repeated_entities(seed)
    rng = np.random.default_rng(3)
    distinct, inverse = np.unique(batch.item_floats[:, :4].numpy(), axis=0, return_inverse=True)
    of_row, light = inverse.ravel(), distinct[:, 3] < 0.8  # about four entities in five are light
    tied = [np.where(light, 0.0, 3 + rng.normal(size=len(distinct)))[of_row] for _ in range(3)]
    weak = (distinct[:, 2] + rng.normal(size=len(distinct)))[of_row]  # as related as ``copy``
    extra = [Feature(f"tied_{i}", Owner.ITEM, Kind.DENSE) for i in range(3)]
    fs = FeatureSet("entities", 1, (*fs.features, *extra, Feature("weak", Owner.ITEM, Kind.DENSE)))
    floats = torch.cat([batch.item_floats, torch.from_numpy(np.stack([*tied, weak], 1)).float()], 1)
    batch = Batch(**{**batch.__dict__, "item_floats": floats})
    names = ["copy", "noise", "tied_0", "tied_1", "tied_2", "weak", "bucket", "noise_id"]
    found = relatedness(fs, batch, ["anchor"], names, seed=seed)
    assert found["copy"].related and found["weak"].related
    assert not found["noise"].related and not found["noise_id"].related


def test_a_lone_noise_feature_is_not_taken_for_related() -> None:
    """With one tested feature on a side, its reference still has enough permutations to hold."""
    wrong = 0
    for seed in range(40):  # four permutations alone took it for related in 2 of these 40
        fs, batch, _ = _repeated_entities(seed % 3)
        wrong += relatedness(fs, batch, ["anchor"], ["noise"], seed=seed)["noise"].related
    assert wrong == 0


def test_the_interval_of_a_worthless_feature_holds_its_unshuffled_draw_too() -> None:
    # The unshuffled AUC is one more draw of the shuffled ones: sd * sqrt(1 + 1/r), not sd / sqrt(r).
    x = np.array([0.001, -0.002, 0.0005, 0.0015, -0.001])
    assert _ci(x) == pytest.approx(1.96 * x.std(ddof=1) * np.sqrt(1 + 1 / 5))
    assert _ci(x[:1]) == float("inf")
    assert _robust_spread(np.array([0.0, 1.0, 2.0, 3.0, 100.0])) == pytest.approx((2.0, 1.4826))


def test_a_negative_budget_is_refused(known, small_world: World) -> None:
    _, _, auditor = known
    with pytest.raises(ValueError, match="budget"):
        make_plan(auditor, {}, _costs(small_world.featureset), -0.01)


def test_family_strips_the_index() -> None:
    assert family("u_noise_07") == "u_noise"
    assert family("u_emb_long") == "u_emb_long"
    assert family("c_hour") == "c_hour"


def test_concat_renumbers_request_rows(known) -> None:
    _, data, _ = known
    both = concat_batches([data, data])
    assert both.n_requests == 2 * data.n_requests
    assert int(both.item_request[data.n_items]) == data.n_requests


# ------------------------------------------------------------------ end to end on a small warehouse
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LateRanker]:
    out = tmp_path_factory.mktemp("audit")
    run_demo(300, 5, out, world_config=WorldConfig(n_users=400, n_items=3000, n_creators=200, seed=5))
    lean = out / "warehouse" / "lean"
    model, _ = train(str(lean), featureset_of(str(lean)), TrainConfig(epochs=1, seed=0))
    return lean, model


def test_audit_end_to_end_writes_a_pruned_version(trained, tmp_path: Path) -> None:
    lean, model = trained
    result = audit(model, str(lean), AuditConfig(budget=0.002, repeats=2, latency_repeats=20))
    assert result.plan.loss <= 0.002
    costs = result.costs
    # Stored bytes are measured per column; an item-side vector costs more to log than a user scalar.
    assert costs["i_emb"].logged_bytes > costs["u_act_00"].logged_bytes > 0
    assert all(c.stored_bytes > 0 for c in costs.values())
    assert sum(c.work_share for c in costs.values()) < 1
    pruned = write_audit(result, model.fs, tmp_path)
    assert (tmp_path / "audit.html").read_text().count("data:image/png") == 2
    assert load_featureset(tmp_path / "featureset.toml") == pruned


def test_the_audit_command_prints_its_table_and_writes_the_pruned_version(
    trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from leanrec.cli import main
    from leanrec.train.trainer import save_checkpoint

    lean, model = trained
    save_checkpoint(model, tmp_path / "model.pt")
    args = [
        "audit",
        "--model",
        str(tmp_path / "model.pt"),
        "--warehouse",
        str(lean),
        "--out",
        str(tmp_path / "a"),
        "--repeats",
        "2",
    ]
    assert main(args) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "feature audit: held-out AUC" in out and "retire" in out and "pruned FeatureSet demo v2" in out
    assert load_featureset(tmp_path / "a" / "featureset.toml").version == 2
    with pytest.raises(SystemExit):
        main([*args, "--budget", "-0.1"])
    assert "budget must be at least 0" in capsys.readouterr().err


def test_feature_costs_follow_the_featureset(trained) -> None:
    lean, model = trained
    costs = feature_costs(model, str(lean), items_logged=10.0)
    fs = model.fs
    assert costs["u_emb_long"].logged_bytes == 64 * 4
    assert costs["i_emb"].logged_bytes == 16 * 4 * 10.0
    dense = sum(c.input_share for n, c in costs.items() if fs[n].is_float)
    assert dense == pytest.approx(1.0)


def test_a_model_of_another_lineage_is_refused(trained) -> None:
    lean, _ = trained
    other = FeatureSet(
        "other",
        1,
        (
            Feature("u_hist", Owner.USER, Kind.SEQUENCE, 5, 100),
            Feature("i_id", Owner.ITEM, Kind.SPARSE, 1, 100),
        ),
    )
    with pytest.raises(AuditError, match="different lineages"):
        audit(LateRanker(other, RankerConfig(dim=8, hidden=16)), str(lean))


def test_a_negative_budget_is_refused_before_any_work(trained) -> None:
    lean, model = trained
    with pytest.raises(AuditError, match="at least 0"):
        audit(model, str(lean), AuditConfig(budget=-0.001))


def test_a_missing_warehouse_is_refused(trained, tmp_path: Path) -> None:
    _, model = trained
    with pytest.raises(AuditError):
        audit(model, str(tmp_path / "nowhere"))


@pytest.mark.parametrize(
    "names",
    [
        ["u_taste_03", "u_emb_0"],
        ["i_emb", "i_category"],
        ["u_hist_cat", "u_topics", "u_act_07"],
        ["c_surface"],
    ],
)
def test_an_incremental_shuffle_scores_as_a_full_forward_pass_would(trained, names: list[str]) -> None:
    """The auditor updates parts of the model; the result must equal shuffling the inputs outright."""
    lean, model = trained
    from leanrec.audit.run import heldout

    data = heldout(str(lean), model, TrainConfig())
    auditor = PermutationAuditor(model, data)
    side = auditor.columns[names[0]].side
    got = auditor.losses(names, 1, 3)[0]
    rng = np.random.default_rng(3)  # one permutation per side, the request side's first
    perms = [torch.from_numpy(rng.permutation(n)) for n in (data.n_requests, data.n_items)]
    perm = perms[0 if side is Side.REQUEST else 1]
    floats, ints = (
        (data.req_floats, data.req_ints) if side is Side.REQUEST else (data.item_floats, data.item_ints)
    )
    floats, ints = floats.clone(), ints.clone()
    for n in names:
        c = auditor.columns[n]
        block = floats if c.is_float else ints
        block[:, c.start : c.stop] = block[perm, c.start : c.stop]
    inputs = [data.req_floats, data.req_ints, data.item_floats, data.item_ints]
    inputs[0 if side is Side.REQUEST else 2], inputs[1 if side is Side.REQUEST else 3] = floats, ints
    with torch.no_grad():
        logits = model(*inputs, data.item_request)[:, 0].numpy()
    from leanrec.train.metrics import auc

    assert got == pytest.approx(auditor.base_auc - auc(data.click.numpy(), logits), abs=1e-6)


def test_a_shuffle_grown_on_another_scores_as_both_shuffled_at_once(trained) -> None:
    """The plan grows its retired set one unit at a time; each step must score as the whole set."""
    lean, model = trained
    from leanrec.audit.run import heldout

    auditor = PermutationAuditor(model, heldout(str(lean), model, TrainConfig()))
    first, then = ["u_emb_0", "u_hist_cat", "i_category"], ["u_hist", "i_emb", "u_act_07", "u_emb_0"]
    grown = auditor.score(auditor.shuffle(then, 3, 5, auditor.shuffle(first, 3, 5)))
    at_once = auditor.losses([*first, *then], 3, 5)
    np.testing.assert_allclose(grown, at_once, atol=1e-9)
    assert (at_once > 0.01).all()  # the set matters, so a dropped shuffle would show
