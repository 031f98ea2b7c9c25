"""The late ranker's two forward paths share parameters and agree, outputs and gradients, on raw ids."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from leanrec.funnel import Funnel
from leanrec.models import LateRanker, RankerConfig
from leanrec.models.idmap import MAP_KINDS
from leanrec.models.ranker import distinct_rows, wide_support
from leanrec.schema import FeatureSet, Side, Slot
from leanrec.world import World

EXTREME_IDS = (2**63 - 1, 2**63 - 2, -(2**63), -(2**63) + 1, -2)
"""Raw ids at the ends of int64 and a negative one next to the padding id."""


def _slot(fs: FeatureSet, name: str) -> Slot:
    """Where a feature's columns are in its side's block."""
    return next(s for s in fs.layout(fs[name].side).slots if s.feature.name == name)


@pytest.fixture
def inputs(small_world: World) -> tuple[torch.Tensor, ...]:
    batch = Funnel(small_world).rank(small_world.user_ids[:6], np.zeros(6, np.int64), np.zeros(6, np.int64))
    rng = np.random.default_rng(1)
    # 6 requests, a different number of viewed items each (as a request-level batch has them)
    counts = np.array([1, 3, 7, 2, 12, 5])
    rows = np.concatenate([b * 100 + rng.choice(100, c, replace=False) for b, c in enumerate(counts)])
    req_ints = batch.request.ints.astype(np.int64)
    item_ints = batch.items.ints[rows].astype(np.int64)
    # Ids anywhere in int64: user, item and creator ids and the history at the extremes too.
    fs = small_world.featureset
    ext = np.array(EXTREME_IDS, np.int64)
    item_ints[: len(ext), _slot(fs, "i_id").offset] = ext
    item_ints[len(ext) : 2 * len(ext), _slot(fs, "i_creator").offset] = ext
    req_ints[1:5, _slot(fs, "u_id").offset] = ext[:4]
    hist = _slot(fs, "u_hist").offset
    req_ints[4, hist : hist + 3] = ext[:3]  # request 4 clicked extreme items
    return (
        torch.from_numpy(batch.request.floats.copy()),
        torch.from_numpy(req_ints),
        torch.from_numpy(batch.items.floats[rows].copy()),
        torch.from_numpy(item_ints),
        torch.from_numpy(np.repeat(np.arange(6), counts)),
    )


def _mapped(fs: FeatureSet, kind: str) -> FeatureSet:
    """``fs`` with every id feature mapped by ``kind`` (the data's shape is the same)."""
    features = tuple(f if f.is_float else dataclasses.replace(f, map=kind) for f in fs.features)
    return FeatureSet(fs.name, fs.version, features, fs.retired)


def _item_ids(model: LateRanker, item_ints: torch.Tensor) -> np.ndarray:
    return item_ints[:, _slot(model.fs, "i_id").offset].numpy()


def _model(small_world: World, kind: str = "", inputs: tuple[torch.Tensor, ...] | None = None) -> LateRanker:
    """A model of the world's FeatureSet, its ids mapped by ``kind`` (``""``: as the world declares).

    Given ``inputs``, a managed model first observes part of them (the first half of the requests
    and of the items), so that some ids read a slot of their own and the others a residual row.
    """
    torch.manual_seed(0)
    fs = small_world.featureset if not kind else _mapped(small_world.featureset, kind)
    model = LateRanker(fs, RankerConfig(dim=16, hidden=32))
    with torch.no_grad():  # the wide part starts at zero; give it weights so every path carries signal
        for p in model.wide_parameters():
            p.normal_(0.0, 0.05)
    if inputs is not None and kind == "managed":
        model.observe(inputs[1][:3], inputs[3][: len(inputs[3]) // 2])
        table = model.tables["i_id"]
        in_slot = table.rows_of(_item_ids(model, inputs[3])) < table.slots
        assert in_slot.any() and not in_slot.all()  # both kinds of lookup are exercised
    return model


@pytest.mark.parametrize("kind", MAP_KINDS)
def test_both_paths_give_the_same_outputs(small_world: World, inputs, kind: str) -> None:
    model = _model(small_world, kind, inputs)
    assert {t.spec.kind for t in model.tables.values()} == {kind}
    model.fit_normalizer(inputs[0], inputs[2])
    request_level = model(*inputs, request_level=True)
    impression_level = model(*inputs, request_level=False)
    assert request_level.shape == (len(inputs[4]), 2)
    assert bool(torch.isfinite(request_level).all())
    torch.testing.assert_close(request_level, impression_level, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", MAP_KINDS)
def test_both_paths_give_the_same_gradients(small_world: World, inputs, kind: str) -> None:
    model = _model(small_world, kind, inputs)
    names, params = zip(*((n, p) for n, p in model.named_parameters() if p.requires_grad), strict=True)
    grads = []
    for request_level in (True, False):
        out = model(*inputs, request_level=request_level)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out, torch.ones_like(out) * 0.3)
        grads.append(torch.autograd.grad(loss, params, allow_unused=True))
    compared = 0
    for a, b in zip(*grads, strict=True):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        compared += 1
    assert compared > 10
    # The extreme ids are looked up like any other: the rows they read get gradient.
    grad = dict(zip(names, grads[0], strict=True))
    table = model.tables["i_id"]
    rows = table.rows_of(np.array(EXTREME_IDS, np.int64))
    for name, _ in table.named_parameters():
        read = rows[:, 0 if name == "weight_q" else 1] if kind == "qr" else rows
        assert (grad[f"tables.i_id.{name}"][torch.from_numpy(read)].abs().sum(1) > 0).all(), name


@pytest.fixture
def repeated(inputs) -> tuple[torch.Tensor, ...]:
    """``inputs`` whose items repeat across requests, as a popular item does in a batch.

    Request 4's first seven items are copies of request 2's, its last one and request 5's last
    one of the first item (an extreme id); request 5's fourth item is its third with one float
    changed: the same item id, other features, so another distinct row.
    """
    req_floats, req_ints, item_floats, item_ints, item_request = (x.clone() for x in inputs)
    for x in (item_floats, item_ints):
        x[13:20] = x[6:13]
        x[24] = x[0]
        x[29] = x[0]
        x[28] = x[27]
    item_floats[28, 0] += 1.0
    return req_floats, req_ints, item_floats, item_ints, item_request


def test_distinct_rows_are_the_byte_identical_rows() -> None:
    floats = torch.tensor([[1.0, 2.0], [0.0, 5.0], [1.0, 2.0], [-0.0, 5.0], [1.0, 2.0], [1.0, 2.5]])
    ints = torch.tensor([[7, 1], [8, 1], [7, 1], [8, 1], [7, 2], [7, 1]])
    first, of = distinct_rows(floats, ints)
    # Rows 0 and 2 alone are the same bytes: -0.0 is not 0.0, and one differing id or float parts rows.
    assert len(first) == 5 and of[0] == of[2] and len(set(of.tolist())) == 5
    assert torch.equal(floats[first][of], floats) and torch.equal(ints[first][of], ints)
    assert distinct_rows(floats[:2], ints[:2]) is None  # nothing repeats: nothing to gather
    first, of = distinct_rows(floats[:, :0], ints)  # a side without dense inputs: the ids decide
    assert len(first) == 3


def _grads(model: LateRanker, inputs, **path: bool) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """Logits of one forward path and the gradients of a loss on them, for every parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(*inputs, **path)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(out, torch.ones_like(out) * 0.3)
    return out.detach(), torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize("kind", MAP_KINDS)
def test_dedup_gives_the_same_outputs_and_gradients(small_world: World, repeated, kind: str) -> None:
    """Computing each distinct row's work once changes nothing the model computes.

    What goes through the same arithmetic is compared bit for bit: the item side of the distinct
    rows, gathered for each impression, is the item side of every row. The logits and gradients are
    compared to float32 rounding: the top MLP's first layer is summed in three parts (user, item,
    the rest) rather than in one product, target attention multiplies a block of queries by the
    history rather than one query at a time, and an item's impressions are summed in another order.
    """
    first, of = distinct_rows(repeated[2], repeated[3])
    assert len(first) == len(repeated[4]) - 9  # the nine copies; the changed row stays apart
    model = _model(small_world, kind, repeated)
    model.fit_normalizer(repeated[0], repeated[2])
    with torch.no_grad():
        every = model.item_side(repeated[2], repeated[3])
        once = model.item_side(repeated[2][first], repeated[3][first]).take(of)
        for field in dataclasses.fields(every):
            assert torch.equal(getattr(once, field.name), getattr(every, field.name)), field.name
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    out, grads = _grads(model, repeated, request_level=True)
    assert bool(torch.isfinite(out).all())
    for request_level in (True, False):  # impression-level: a user row per impression, the rest alike
        dedup_out, dedup_grads = _grads(model, repeated, request_level=request_level, dedup=True)
        torch.testing.assert_close(dedup_out, out, rtol=1e-6, atol=1e-6)
        compared = set()
        for name, a, b in zip(names, grads, dedup_grads, strict=True):
            if a is None or b is None:
                assert a is None and b is None
                continue
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
            compared.add(name)
        # Every parameter is compared, the split first layer of the top MLP and the item tower among them.
        assert len(compared) == len(names)
        assert {"top.0.weight", "top.0.bias", "item_dense.0.weight", "query.weight"} <= compared
        assert any(n.startswith("tables.i_id.") for n in compared)


def test_target_attention_reads_each_history_where_it_lies(small_world: World, inputs) -> None:
    """Blocks of queries per request give each impression its attention over its own request's history.

    The impressions come in any order and requests hold 0 to 12 of them (one block, several, the
    last one padded), and the result is the attention of each query over a copy of its request's
    history.
    """
    model = _model(small_world)
    req_floats, req_ints, _, _, item_request = inputs
    order = torch.randperm(len(item_request), generator=torch.Generator().manual_seed(3))
    rows = torch.cat([item_request[order], torch.tensor([6])])  # a 7th request: with and without items
    user = model.user_side(torch.cat([req_floats, req_floats[:2]]), torch.cat([req_ints, req_ints[:2]]))
    query = torch.randn(len(rows), model.config.dim, requires_grad=True)
    got = model.target_attention(user.history, user.mask, query, rows)
    history, mask = user.history[rows], user.mask[rows]
    att = torch.einsum("nld,nd->nl", history, query) / model.config.dim**0.5
    want = torch.einsum("nl,nld->nd", att.masked_fill(~mask, float("-inf")).softmax(-1), history)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    grads = [torch.autograd.grad(x.square().sum(), query, retain_graph=True)[0] for x in (got, want)]
    assert float(grads[1].abs().max()) > 1.0  # entries of order 1 and more: rounding of a few 1e-7 each
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)


def test_the_forward_leaves_a_managed_map_alone_and_observe_changes_it(small_world: World, inputs) -> None:
    model = _model(small_world)  # the world's id features are managed by default
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for mode in (model.train, model.eval):
        mode()
        model(*inputs)
        for name, value in model.state_dict().items():
            assert torch.equal(value, before[name]), name
    with pytest.raises(RuntimeError, match="training mode"):
        model.observe(inputs[1], inputs[3])  # serving never observes
    model.train()
    resets = model.observe(inputs[1], inputs[3])
    assert set(resets) == set(model.tables)
    # The item id table holds every item of the batch and every item of its histories.
    table = model.tables["i_id"]
    hist = inputs[1][:, _slot(model.fs, "u_hist").offset :][:, : model.fs["u_hist"].size].numpy()
    expect = set(_item_ids(model, inputs[3]).tolist()) | set(hist[hist != -1].tolist())
    assert set(table.slot_ids[table.slot_ids != -1].tolist()) == expect
    assert set(EXTREME_IDS[:3]) <= expect
    assert resets["i_id"].tolist() == sorted(table.rows_of(np.array(sorted(expect))).tolist())
    assert int(table.step) == 1 and table.counters()["admissions"] == len(expect)


def test_the_user_side_depends_on_the_request_only(small_world: World, inputs) -> None:
    model = _model(small_world)
    req_floats, req_ints, item_floats, item_ints, item_request = inputs
    user = model.user_side(req_floats, req_ints)
    assert user.vector.shape[0] == req_floats.shape[0]
    # changing an item changes its score but not the user side
    out = model(*inputs)
    item_floats2 = item_floats.clone()
    item_floats2[0] += 1.0
    out2 = model(req_floats, req_ints, item_floats2, item_ints, item_request)
    assert not torch.equal(out[0], out2[0])
    torch.testing.assert_close(out[1:], out2[1:])


@pytest.mark.parametrize("kind", MAP_KINDS)
def test_padding_adds_nothing_and_learns_nothing_through_training(
    small_world: World, inputs, kind: str
) -> None:
    model = _model(small_world, kind, inputs)
    req_floats, req_ints, *rest = inputs
    ints = req_ints.clone()
    slot = _slot(small_world.featureset, "u_topics")
    ints[:, slot.stop - 1] = -1  # pad the last topic of every user
    table = model.tables["u_topics"]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(2):
        loss = model(req_floats, ints, *rest).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        # real rows did learn
        assert any(torch.count_nonzero(p.grad) > 0 for p in table.parameters())
    padded = torch.full((6, 3), -1, dtype=torch.int64)
    assert torch.count_nonzero(table(padded)) == 0  # padding reads zeros, ever
    # Every topic padded: the table gets no gradient at all.
    ints[:, slot.offset : slot.stop] = -1
    loss = model(req_floats, ints, *rest).square().mean()
    for p, g in zip(table.parameters(), torch.autograd.grad(loss, list(table.parameters())), strict=True):
        assert torch.count_nonzero(g) == 0, p.shape


def test_vectors_of_one_embedding_space_meet_in_a_dot_product(small_world: World, inputs) -> None:
    """With the deep part silenced, the logits are exactly the wide dot products of the raw vectors."""
    model = _model(small_world)
    fs = small_world.featureset
    assert model.space_sum.shape == (32, 2)  # u_emb_0 and u_emb_1 each against i_emb
    with torch.no_grad():
        for p in (*model.top[-1].parameters(), *model.user_wide.parameters(), *model.item_wide.parameters()):
            p.zero_()
        model.space_weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    out = model(*inputs).detach().numpy()
    req, item = fs.layout(Side.REQUEST), fs.layout(Side.ITEM)
    cols = {s.feature.name: slice(s.offset, s.stop) for s in (*req.slots, *item.slots) if s.feature.is_float}
    users = inputs[0].numpy()[inputs[4].numpy()]
    items = inputs[2].numpy()
    dot0 = (users[:, cols["u_emb_0"]] * items[:, cols["i_emb"]]).sum(1)
    dot1 = (users[:, cols["u_emb_1"]] * items[:, cols["i_emb"]]).sum(1)
    np.testing.assert_allclose(out[:, 0], dot0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:, 1], 2 * dot1, rtol=1e-5, atol=1e-5)


def test_dense_input_norms_are_each_features_first_layer_weight_norm(small_world: World) -> None:
    model = _model(small_world)
    fs = small_world.featureset
    slots = fs.layout(Side.ITEM).slots
    norms = model.dense_input_norms(Side.ITEM).detach()
    assert norms.shape == (len(slots),)
    for i, slot in enumerate(slots):
        if not slot.feature.is_float:
            assert norms[i] < 1e-5
            continue
        cols = slice(slot.offset, slot.stop)
        layers = (model.item_dense[0], model.item_linear, model.item_wide)
        expect = torch.cat([m.weight[:, cols] for m in layers]).norm()
        torch.testing.assert_close(norms[i], expect.detach())


def test_the_wide_part_is_solved_to_the_logistic_model_that_drew_the_labels(small_world: World) -> None:
    """Labels drawn from a known logistic model of a dot product and two dense inputs: fit_wide finds it."""
    model = _model(small_world)
    fs = small_world.featureset
    req, item = fs.layout(Side.REQUEST), fs.layout(Side.ITEM)
    cols = {s.feature.name: s.offset for s in (*req.slots, *item.slots) if s.feature.is_float}
    gen = torch.Generator().manual_seed(5)
    n = 40_000
    users = torch.randn(n, req.float_width, generator=gen)
    items = torch.randn(n, item.float_width, generator=gen)
    u0, i0 = cols["u_emb_0"], cols["i_emb"]
    dot = (users[:, u0 : u0 + 16] * items[:, i0 : i0 + 16]).sum(1)
    logit = -0.5 + 0.4 * dot + 0.8 * users[:, cols["u_act_00"]] - 0.6 * items[:, cols["i_views_log"]]
    click = (torch.rand(n, generator=gen) < torch.sigmoid(logit)).float()
    model.fit_normalizer(users, items)
    before = model.wide_parameters()[0].detach().clone()
    loss = model.fit_wide(users, items, torch.stack([click, click], 1), iters=200, l2=0.0)
    space, user_w, item_w = (
        p.detach() for p in (model.space_weight, model.user_wide.weight, model.item_wide.weight)
    )
    assert not torch.equal(before, user_w)
    # standardised inputs: a weight on the input is the coefficient times its spread
    u_std, i_std = model.req_std[cols["u_act_00"]], model.item_std[cols["i_views_log"]]
    assert float(space[0, 0]) == pytest.approx(0.4, abs=0.05)
    assert float(user_w[0, cols["u_act_00"]] / u_std) == pytest.approx(0.8, abs=0.08)
    assert float(item_w[0, cols["i_views_log"]] / i_std) == pytest.approx(-0.6, abs=0.08)
    others = user_w[0].clone()
    others[cols["u_act_00"]] = 0.0
    assert float(others.abs().max()) == 0.0  # inputs that drew nothing are not selected: exactly 0
    assert model.user_wide_support[0].nonzero().flatten().tolist() == [cols["u_act_00"]]
    assert model.item_wide_support[0].nonzero().flatten().tolist() == [cols["i_views_log"]]
    assert 0.0 < loss < float(torch.nn.functional.binary_cross_entropy(click.mean().expand(n), click))
    # Without the selection every input gets a weight of the order of its sampling noise.
    model.fit_wide(users, items, torch.stack([click, click], 1), iters=200, l2=0.0, alpha=None)
    others = model.user_wide.weight.detach()[0].clone()
    others[cols["u_act_00"]] = 0.0
    assert 0.0 < float(others.abs().max()) < 0.1
    assert bool(model.user_wide_support.all())


def test_the_support_of_the_wide_part_is_the_groups_that_drew_the_labels() -> None:
    """Two heads, each drawn from its own groups of 40 (one of them 4 columns wide); noise elsewhere."""
    gen = torch.Generator().manual_seed(2)
    n, groups = 20_000, torch.arange(40).repeat_interleave(torch.tensor([4] + [1] * 39))
    x = torch.randn(n, len(groups), generator=gen)
    fixed = torch.randn(n, 1, generator=gen)
    first = 0.5 * x[:, :4].sum(1) + 0.8 * fixed[:, 0]  # group 0 (4 columns) and the fixed input
    second = -0.3 * x[:, groups == 7][:, 0] + 0.2 * x[:, groups == 30][:, 0] - 2.0
    labels = torch.stack([torch.rand(n, generator=gen) < torch.sigmoid(z) for z in (first, second)], 1)
    support = wide_support(x, fixed, labels.float(), groups)
    assert support.shape == (2, len(groups))
    assert set(groups[support[0] > 0].tolist()) == {0}
    assert set(groups[support[1] > 0].tolist()) == {7, 30}
    # A group is selected whole; the same inputs give the same support.
    assert bool((support[0, :4] == 1).all())
    torch.testing.assert_close(wide_support(x, fixed, labels.float(), groups), support)
    # Labels unrelated to every group select none of them.
    coin = (torch.rand(n, 2, generator=gen) < 0.3).float()
    assert float(wide_support(x, fixed, coin, groups).sum()) == 0.0
