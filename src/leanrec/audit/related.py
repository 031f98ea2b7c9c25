"""Which features of no measurable value still carry information: those related to valuable features.

Permutation importance measures what the model loses without a feature *given all the others*. A
feature that duplicates a valuable one (a noisy projection of the taste a pretrained embedding
already carries, a counter that moves with another) is worth nothing by that measure, exactly like
pure noise, yet it is informative: retiring it leaves the model one substitute away from losing that
information, and an audit that retires such features alongside noise has mistaken redundancy for
worthlessness. This module tells the two apart with a test that needs no retraining: how much of the
feature's variation the valuable dense features explain on the held-out rows.

The rows repeat: a heavy user makes many requests, a popular item is shown in many. A test that
shuffled rows would take that repetition for signal. The reference distribution instead permutes the
distinct values of dense features among themselves, so every repeated entity keeps its repetition
and only its relation to the valuable features is broken. It pools many features' shuffles, and is
summarised by its median and its median absolute deviation: a few tested features have values tied
over most rows (a counter still at zero for most users), whose shuffle moves that whole tie as one
value and spreads far wider than the rest; a mean and a standard deviation would let those few set
the threshold for every feature, and informative features would then go as noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from leanrec.audit.importance import Columns, feature_columns
from leanrec.ids import mix64
from leanrec.schema import PAD_ID, FeatureSet, Side
from leanrec.train.reader import Batch

BUCKETS = 64
"""Most columns an id feature is represented by (see :func:`representation`)."""


@dataclass(frozen=True)
class Related:
    """How strongly the valuable features of a side explain one feature.

    Attributes:
        r2: Share of the feature's variance explained by the leading components of the valuable
            dense features of its side.
        null_mean: Centre (median) of the same share for unrelated values with the rows' repetition.
        null_sd: Its spread: the median absolute deviation scaled to a normal's standard deviation
            (1.4826 times it), or the standard deviation where that deviation is 0.
        related: ``r2`` is above ``null_mean + z * null_sd``.

    """

    r2: float
    null_mean: float
    null_sd: float
    related: bool


def representation(batch: Batch, side: Side, cols: Columns) -> np.ndarray:
    """A feature as numbers, ``(rows, width)``: dense values, or its ids counted per column.

    Ids are raw 64-bit values, so their columns come from the values the rows hold, not from the
    values' range: with at most ``BUCKETS`` distinct ids each has a column of its own; with more,
    each id counts in one of ``BUCKETS`` columns by a hash of its value (``mix64``), so that every
    column holds a spread of ids, frequent and rare alike. A padded slot counts nowhere.
    """
    floats, ints = (
        (batch.req_floats, batch.req_ints) if side is Side.REQUEST else (batch.item_floats, batch.item_ints)
    )
    if cols.is_float:
        return floats[:, cols.start : cols.stop].double().numpy()
    ids = ints[:, cols.start : cols.stop].numpy().astype(np.int64)
    row = np.broadcast_to(np.arange(len(ids))[:, None], ids.shape)
    ok = ids != PAD_ID
    distinct, inverse = np.unique(ids[ok], return_inverse=True)
    if len(distinct) <= BUCKETS:
        column = np.arange(len(distinct))
    else:
        column = (mix64(distinct) % np.uint64(BUCKETS)).astype(np.int64)
    out = np.zeros((len(ids), min(len(distinct), BUCKETS)))
    np.add.at(out, (row[ok], column[inverse.ravel()]), 1.0)
    return out


def _explained(basis: np.ndarray, x: np.ndarray) -> float:
    """Share of the variance of ``x (n, w)`` in the span of the orthonormal, centred ``basis (n, k)``."""
    x = x - x.mean(0)
    total = float(np.square(x).sum())
    return float(np.square(basis.T @ x).sum()) / total if total > 0 else 0.0


def _value_shuffled(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``x`` with its distinct rows permuted among themselves: repeats stay, relations break."""
    distinct, inverse = np.unique(x, axis=0, return_inverse=True)
    return distinct[rng.permutation(len(distinct))][inverse.ravel()]


def _robust_spread(x: np.ndarray) -> tuple[float, float]:
    """Median of ``x`` and its median absolute deviation scaled to a standard deviation.

    The scale is 1.4826, which makes the deviation of a normal sample its standard deviation; where
    the deviation is 0 (half the values equal) the standard deviation stands in for it.
    """
    centre = float(np.median(x))
    spread = 1.4826 * float(np.median(np.abs(x - centre)))
    if spread == 0.0:
        spread = float(x.std(ddof=1)) if len(x) > 1 else 0.0
    return centre, spread


def relatedness(
    fs: FeatureSet,
    data: Batch,
    valuable: Sequence[str],
    names: Sequence[str],
    components: int = 16,
    z: float = 4.0,
    null_features: int = 48,
    null_draws: int = 4,
    min_null: int = 64,
    seed: int = 0,
) -> dict[str, Related]:
    """For each of ``names``, whether the valuable dense features of its side explain it.

    Args:
        fs: The model's FeatureSet.
        data: Held-out requests and their items.
        valuable: Features of measurable value; their dense ones span the reference space.
        names: Features to test (normally those of no measurable value).
        components: Leading principal components of the standardised valuable features used.
        z: Spreads (``Related.null_sd``) above the reference's centre at which a feature counts as
            related.
        null_features: Dense features of a side whose values are permuted for the reference.
        null_draws: Permutations per such feature.
        min_null: Fewest permutations in a side's reference, all features together.
        seed: Seeds the permutations.

    Returns:
        Per tested feature on a side with valuable dense features, its :class:`Related`; features
        on a side without any are absent (nothing there to be related to).

    """
    rng = np.random.default_rng(seed)
    columns, wanted, out = feature_columns(fs), set(valuable), {}
    for side in Side:
        mine = [n for n in names if columns[n].side is side]
        anchors = [
            f.name for f in fs.features if f.name in wanted and columns[f.name].side is side and f.is_float
        ]
        if not mine or not anchors:
            continue
        a = np.hstack([representation(data, side, columns[n]) for n in anchors])
        a = (a - a.mean(0)) / np.where(a.std(0) > 0, a.std(0), 1.0)
        u, s, _ = np.linalg.svd(a, full_matrices=False)
        basis = u[:, : min(components, int((s > 1e-8 * s[0]).sum()))]  # orthonormal and centred
        reps = {n: representation(data, side, columns[n]) for n in mine}
        r2 = {n: _explained(basis, x) for n, x in reps.items()}
        # The reference: dense values permuted among their distinct values keep the rows' repetition.
        # Permuting the values of an id only renames them, so a side of ids alone shuffles rows,
        # which ignores the repetition and errs towards calling a feature related (kept).
        dense = [n for n in mine if columns[n].is_float]
        pool = [dense[i] for i in rng.permutation(len(dense))[:null_features]] or mine
        shuffle = _value_shuffled if dense else (lambda x, g: x[g.permutation(len(x))])
        # A side with few tested features draws more permutations of each: a reference of a handful
        # of values would put the threshold by chance.
        draws = max(null_draws, -(-min_null // len(pool)))
        null = np.array([_explained(basis, shuffle(reps[n], rng)) for n in pool for _ in range(draws)])
        centre, spread = _robust_spread(null)
        out.update({n: Related(r2[n], centre, spread, r2[n] > centre + z * spread) for n in mine})
    return out
