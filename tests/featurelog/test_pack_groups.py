"""Packing a ranker's arrays a block and size at a time gives what checking them one by one gives.

``pack_ranked`` stacks the features of one block and size at once when they are plain, and checks
the rest one by one; whichever way a feature goes, the packed bytes and every refusal (which
feature it names, and why) must be the same.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from leanrec.featurelog.inputs import FeatureInputError, pack_ranked
from leanrec.schema import FeatureSet, Side
from leanrec.world import WorldConfig, default_featureset

FS: FeatureSet = default_featureset(WorldConfig())[0]
N = 12


class _Opaque(np.ndarray):
    """An array the stacking does not take (its type is not ndarray): checked one by one."""


def _one_by_one(v: object) -> object:
    if isinstance(v, np.ndarray):
        return v.view(_Opaque)
    if isinstance(v, list):
        return tuple(v)
    return np.array(v).view(_Opaque)


def _features(rng: np.random.Generator, form: str) -> dict[str, object]:
    """Every feature of FS, as numpy arrays (``numpy``) or as JSON would give them (``json``)."""
    out: dict[str, object] = {}
    for side, rows in ((Side.REQUEST, 1), (Side.ITEM, N)):
        for slot in FS.layout(side).slots:
            f = slot.feature
            if f.is_float:
                a = rng.normal(size=(rows, f.size)).astype(rng.choice([np.float32, np.float64]))
            else:
                a = rng.integers(0, f.rows, (rows, f.size))
            a = a[0] if rows == 1 else a[:, 0] if f.size == 1 else a
            if form == "json":
                out[f.name] = (
                    a.tolist() if not (rows == 1 and f.size == 1 and rng.random() < 0.5) else a.item()
                )
            else:
                out[f.name] = a
    return out


def _pack(features: dict[str, object]) -> object:
    try:
        b = pack_ranked(FS, 5, np.arange(N), features, np.linspace(1, 0, N))
    except FeatureInputError as exc:
        return ("refused", str(exc), exc.feature)
    return (
        b.request.floats.tobytes(),
        b.request.ints.tobytes(),
        b.items.floats.tobytes(),
        b.items.ints.tobytes(),
    )


def _some(fs_side: Side, floats: bool, size: int | None = None) -> str:
    return next(
        s.feature.name
        for s in FS.layout(fs_side).slots
        if s.feature.is_float is floats and (size is None or (s.feature.size == 1) == (size == 1))
    )


_R1F, _R1I = _some(Side.REQUEST, True, 1), _some(Side.REQUEST, False, 1)
_RVF, _RVI = _some(Side.REQUEST, True, 2), _some(Side.REQUEST, False, 2)
_I1F, _I1I = _some(Side.ITEM, True, 1), _some(Side.ITEM, False, 1)

CHANGES: dict[str, Callable[[dict], None]] = {
    "none": lambda f: None,
    "missing": lambda f: f.pop(_I1F),
    "two missing": lambda f: (f.pop(_RVI), f.pop(_R1F)),
    "a bool": lambda f: f.update({_R1F: True}),
    "all bools": lambda f: f.update({_R1F: [True]}),
    "a float id": lambda f: f.update({_R1I: 3.0}),
    "float ids": lambda f: f.update({_I1I: np.asarray(f[_I1I], float)}),
    "ids past int32": lambda f: f.update({_I1I: np.full(N, 2**40)}),
    "the int64 extremes": lambda f: f.update({_I1I: np.full(N, 2**63 - 1), _R1I: -(2**63)}),
    "the padding id": lambda f: f.update({_I1I: np.full(N, -1)}),
    "an id beyond 64 bits": lambda f: f.update({_R1I: 2**70}),
    "an id of 2**63": lambda f: f.update({_R1I: [2**63]}),
    "a list with an id of 2**63": lambda f: f.update({_I1I: [*range(N - 1), 2**63]}),
    "uint64 ids past 2**63": lambda f: f.update({_I1I: np.full(N, 2**63, np.uint64)}),
    "a string id": lambda f: f.update({_R1I: "7"}),
    "too short": lambda f: f.update({_RVF: np.asarray(f[_RVF])[:-1]}),
    "rows short": lambda f: f.update({_I1F: np.asarray(f[_I1F])[:-1]}),
    "a string": lambda f: f.update({_R1F: "0.5"}),
    "a nested list": lambda f: f.update({_R1F: [[0.5]]}),
    "mixed dtypes": lambda f: f.update({_I1I: np.asarray(f[_I1I], np.int32)}),
    "a column": lambda f: f.update({_I1F: np.asarray(f[_I1F]).reshape(N, 1)}),
    "uint64 ids": lambda f: f.update({_I1I: np.asarray(f[_I1I], np.uint64)}),
}


IDS: dict[str, tuple[str, str] | None] = {
    "ids past int32": None,  # any int64 is an id, whatever the feature's rows
    "the int64 extremes": None,
    "the padding id": None,
    "uint64 ids": None,
    "an id beyond 64 bits": (_R1I, "ids are int64"),
    "an id of 2**63": (_R1I, "ids are int64"),
    "a list with an id of 2**63": (_I1I, "ids are int64, got 9223372036854775808"),
    "uint64 ids past 2**63": (_I1I, "ids are int64, got 9223372036854775808"),
    "a string id": (_R1I, "holds ids: expected integers"),
}
"""What each change to ids comes to: packed (None), or refused naming the feature and saying why."""


@pytest.mark.parametrize("form", ["numpy", "json"])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_stacked_and_one_by_one_pack_and_refuse_alike(form: str, change: str) -> None:
    for seed in range(3):
        features = _features(np.random.default_rng(seed), form)
        CHANGES[change](features)
        stacked = _pack(features)
        reference = _pack({k: _one_by_one(v) for k, v in features.items()})
        assert stacked == reference, (change, stacked if isinstance(stacked[0], str) else "packed")
        if change == "none" or (change in IDS and IDS[change] is None):
            assert not isinstance(stacked[0], str), stacked
        elif change in IDS:
            feature, says = IDS[change]  # type: ignore[misc]
            assert stacked[0] == "refused" and stacked[2] == feature and says in stacked[1], stacked
