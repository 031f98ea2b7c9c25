"""The late ranker finds its inputs by role, on FeatureSets a file declares, with or without a history."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from leanrec.featurefile import parse_featureset
from leanrec.ids import scrambled_ids
from leanrec.models import LateRanker, RankerConfig
from leanrec.models.idmap import MAP_KINDS
from leanrec.schema import FeatureSet, Role, Side, Slot

ALL_IDS = ("buyer", "recent", "recent_aisle", "weekday", "product", "aisle", "badges")
ALL_DENSE = ("taste", "budget", "look", "price")
VARIANTS = {
    "history": (),
    "item id, no history": ("recent",),
    "neither item id nor history": ("recent", "product"),
    "no user dense": ("taste", "budget"),
    "no item dense": ("look", "price"),
    "no request ids": ("buyer", "recent", "recent_aisle", "weekday"),
    "no item ids": ("product", "aisle", "badges", "recent"),
    "dense only": ALL_IDS,
    "ids only": ALL_DENSE,
}


EXTREMES = torch.tensor([2**63 - 1, -(2**63), -2], dtype=torch.long)


def _inputs(fs: FeatureSet, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """6 requests with 1 to 12 items each, random values of every feature (ids padded at random).

    Ids are raw 64-bit values: each feature's ``rows`` distinct ids spread over int64, its first
    three at the extremes (the ends of int64 and -2).
    """
    gen = torch.Generator().manual_seed(seed)
    counts = torch.tensor([1, 3, 7, 2, 12, 5])

    def block(side: Side, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        layout = fs.layout(side)
        ints = torch.zeros(n, layout.int_width, dtype=torch.long)
        for s in layout.slots:
            if not s.feature.is_float:
                # The history and the item id draw from one catalog: the same raw ids.
                salt = 7 if s.feature.role in (Role.HISTORY, Role.ITEM_ID) else s.offset
                raw = torch.from_numpy(scrambled_ids(s.feature.rows, salt))
                k = min(len(EXTREMES), s.feature.rows)
                raw[:k] = EXTREMES[:k]
                picked = torch.randint(-1, s.feature.rows, (n, s.feature.size), generator=gen)
                ints[:, s.offset : s.stop] = torch.where(picked < 0, -1, raw[picked.clamp(min=0)])
        return torch.randn(n, layout.float_width, generator=gen), ints

    req_floats, req_ints = block(Side.REQUEST, len(counts))
    item_floats, item_ints = block(Side.ITEM, int(counts.sum()))
    return req_floats, req_ints, item_floats, item_ints, torch.repeat_interleave(torch.arange(6), counts)


def _slot(fs: FeatureSet, name: str) -> Slot:
    return next(s for s in fs.layout(fs[name].side).slots if s.feature.name == name)


def _model(fs: FeatureSet, inputs: tuple[torch.Tensor, ...]) -> LateRanker:
    torch.manual_seed(0)
    model = LateRanker(fs, RankerConfig(dim=8, hidden=16))
    model.fit_normalizer(inputs[0][inputs[4]], inputs[2])
    with torch.no_grad():  # the wide part starts at zero; give it weights so every path carries signal
        for p in model.wide_parameters():
            p.normal_(0.0, 0.05)
    return model


def _mapped(fs: FeatureSet, kind: str) -> FeatureSet:
    """``fs`` with every id feature mapped by ``kind``."""
    features = tuple(f if f.is_float else dataclasses.replace(f, map=kind) for f in fs.features)
    return FeatureSet(fs.name, fs.version, features, fs.retired)


@pytest.mark.parametrize("kind", MAP_KINDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_both_paths_agree_on_every_shape_of_featureset(shop, variant: str, kind: str) -> None:
    fs = _mapped(parse_featureset(shop.toml(VARIANTS[variant])), kind)
    inputs = _inputs(fs)
    model = _model(fs, inputs)
    assert {t.spec.kind for t in model.tables.values()} <= {kind}
    if kind == "managed":  # some ids in slots of their own, the others in residual rows
        model.observe(inputs[1][:3], inputs[3][:10])
    request_level = model(*inputs, request_level=True)
    assert request_level.shape == (len(inputs[4]), 2)
    assert bool(torch.isfinite(request_level).all())
    # Impression-level, and each distinct row's work once (request- or impression-level).
    paths = [(False, False), (True, True), (False, True)]
    for level, dedup in paths:
        out = model(*inputs, request_level=level, dedup=dedup)
        torch.testing.assert_close(out, request_level, rtol=1e-5, atol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for level, dedup in [(True, False), *paths]:
        loss = model(*inputs, request_level=level, dedup=dedup).sigmoid().square().mean()
        grads.append(torch.autograd.grad(loss, params, allow_unused=True))
    for other in grads[1:]:
        for a, b in zip(grads[0], other, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_history_parts_exist_only_with_a_history(shop, variant: str) -> None:
    fs = parse_featureset(shop.toml(VARIANTS[variant]))
    inputs = _inputs(fs)
    model = _model(fs, inputs)
    user = model.user_side(inputs[0], inputs[1])
    history = fs.role(Role.HISTORY)
    assert model.history == history and model.item_id == fs.role(Role.ITEM_ID)
    if history is None:
        assert model.encoder is None and model.query is None
        assert model.encoded_features == frozenset()
        assert user.history.shape == (6, 0, 8) and user.mask.shape == (6, 0)
        assert model.item_side(inputs[2], inputs[3]).query.shape == (len(inputs[4]), 0)
        assert not any(n.startswith(("encoder", "query")) for n, _ in model.named_parameters())
    else:
        assert model.encoder is not None
        assert model.encoded_features == {"recent", "recent_aisle"}
        assert user.history.shape == (6, history.size, 8)
        assert "recent" not in model.tables  # the history reads the item id's table
    # Every id feature but the history has a table; every table is one the FeatureSet names.
    ids = {f.name for f in fs.features if not f.is_float and f.role != Role.HISTORY}
    assert set(model.tables) == ids


def test_without_a_history_a_sequence_of_its_length_is_pooled_and_counts(shop) -> None:
    fs = parse_featureset(shop.toml(["recent"]))
    inputs = _inputs(fs)
    model = _model(fs, inputs)
    assert "recent_aisle" in model.pooled_index(Side.REQUEST)
    slot = _slot(fs, "recent_aisle")
    req_ints = inputs[1].clone()
    req_ints[:, slot.offset : slot.stop] = -1  # every user's sequence empty
    before, after = model(*inputs), model(inputs[0], req_ints, *inputs[2:])
    assert not torch.allclose(before, after)


def test_with_a_history_the_encoder_reads_it(shop) -> None:
    fs = parse_featureset(shop.toml())
    inputs = _inputs(fs)
    model = _model(fs, inputs)
    slot = _slot(fs, "recent")
    req_ints = inputs[1].clone()
    req_ints[:, slot.offset + 1 : slot.stop] = -1  # keep one entry of each history
    assert not torch.allclose(model(*inputs), model(inputs[0], req_ints, *inputs[2:]))


def test_an_item_sequence_of_the_historys_length_is_pooled_not_encoded(shop) -> None:
    text = (
        shop.toml()
        + '\n[[features]]\nname = "bundle"\nowner = "item"\nkind = "sequence"\nsize = 6\nrows = 120\n'
    )
    fs = parse_featureset(text)
    inputs = _inputs(fs)
    model = _model(fs, inputs)
    assert "bundle" in model.pooled_index(Side.ITEM)
    assert model.encoded_features == {"recent", "recent_aisle"}
    torch.testing.assert_close(model(*inputs), model(*inputs, request_level=False), rtol=1e-5, atol=1e-6)


def test_the_wide_part_solves_without_dense_inputs(shop) -> None:
    """No dense feature on either side: the wide part is its intercepts, and the solve finds them."""
    fs = parse_featureset(shop.toml(ALL_DENSE))
    model = LateRanker(fs, RankerConfig(dim=8, hidden=16))
    n = 2_000
    rate = 0.2
    click = (torch.rand(n, generator=torch.Generator().manual_seed(1)) < rate).float()
    model.fit_normalizer(torch.zeros(n, 0), torch.zeros(n, 0))
    model.fit_wide(torch.zeros(n, 0), torch.zeros(n, 0), torch.stack([click, click], 1))
    assert model.user_wide_support.shape == (2, 0)
    bias = float(model.user_wide.bias[0] + model.item_wide.bias[0])
    assert bias == pytest.approx(float(np.log(click.mean() / (1 - click.mean()))), abs=0.01)
