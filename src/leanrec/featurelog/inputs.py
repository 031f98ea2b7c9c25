"""A ranker's own arrays, checked against the FeatureSet and packed into the blocks loggers freeze.

A ranking service outside leanrec holds the features it scored as arrays by name: the request side
once (user and context features), the item side one row per ranked item. :func:`pack_ranked` checks
every array against its feature (present, known, the right width, numbers of the right kind, ids
inside the vocabulary) and packs them into a :class:`~leanrec.featurelog.ranked.RankedBatch`: one
vectorised copy per feature, no loop over values. A mistake raises :class:`FeatureInputError`
naming the feature, so the library and the HTTP sidecar refuse it before anything is logged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from leanrec.errors import InputError
from leanrec.featurelog.ranked import RankedBatch
from leanrec.schema import PAD_ID, FeatureBlock, FeatureSet, Owner, Side


class FeatureInputError(InputError, ValueError):
    """Arrays that do not match the FeatureSet, with the feature and what was wrong.

    Attributes:
        feature: The feature (or field) at fault, ``""`` when it is the request as a whole.
        status: The HTTP status the sidecar answers with: 413 for a list over the limit, else 422.

    """

    def __init__(self, message: str, feature: str = "", status: int = 422) -> None:
        super().__init__(message)
        self.feature, self.status = feature, status


def _block(
    fs: FeatureSet, side: Side, values: Mapping[str, object], rows: int, where: str
) -> tuple[FeatureBlock, set[str]]:
    """One side's block of ``rows`` rows from ``values``; returns it and the names it used.

    One slice copy per feature; the ids' range is checked once for the whole block (as int64, so an
    id that does not fit in 32 bits is refused rather than wrapped).
    """
    layout = fs.layout(side)
    floats = np.empty((rows, layout.float_width), "<f4")
    ints = np.empty((rows, layout.int_width), np.int64)
    for slot in layout.slots:
        f = slot.feature
        if f.name not in values:
            raise FeatureInputError(f"feature {f.name} ({f.owner.value}, {where}) is missing", f.name)
        try:
            a = np.asarray(values[f.name])
        except (TypeError, ValueError):
            raise FeatureInputError(f"feature {f.name}: not an array of numbers", f.name) from None
        if side is Side.REQUEST and a.size == f.size and a.ndim <= 2 and a.shape[:1] in ((), (1,), (f.size,)):
            a = a.reshape(1, f.size)  # a scalar, (size,) or (1, size)
        elif side is Side.ITEM and f.size == 1 and a.shape == (rows,):
            a = a.reshape(rows, 1)
        if a.shape != (rows, f.size):
            got = "x".join(map(str, np.shape(values[f.name]))) or "a scalar"
            shape = f"{f.size} values" if side is Side.REQUEST else f"{rows} rows of {f.size}"
            raise FeatureInputError(f"feature {f.name}: expected {shape}, got {got}", f.name)
        kind = a.dtype.kind
        if f.is_float:
            if kind not in "fiu":
                raise FeatureInputError(f"feature {f.name} is dense: expected numbers, got {a.dtype}", f.name)
            floats[:, slot.offset : slot.stop] = a
        else:
            if kind not in "iu":
                raise FeatureInputError(
                    f"feature {f.name} holds ids: expected integers, got {a.dtype}", f.name
                )
            ints[:, slot.offset : slot.stop] = a
    ids = [s for s in layout.slots if not s.feature.is_float]
    if ids and rows:
        sizes = [s.feature.size for s in ids]
        vocab = np.repeat([s.feature.vocab for s in ids], sizes)
        bad = ((ints < PAD_ID) | (ints >= vocab)).any(0)
        if bad.any():
            slot = ids[int(np.searchsorted(np.cumsum(sizes), int(np.argmax(bad)), side="right"))]
            f, col = slot.feature, ints[:, slot.offset : slot.stop]
            raise FeatureInputError(
                f"feature {f.name}: ids must lie in [0, {f.vocab}) (or {PAD_ID} for padding), "
                f"got {int(col.min())}..{int(col.max())}",
                f.name,
            )
    used = {s.feature.name for s in layout.slots}
    return FeatureBlock(floats, ints.astype("<i4")), used


def pack_ranked(
    fs: FeatureSet,
    user_id: int,
    item_ids: object,
    features: Mapping[str, object],
    scores: object | None = None,
    max_items: int = 1_000,
) -> RankedBatch:
    """One ranked request as a RankedBatch, from a ranker's arrays.

    Args:
        fs: The FeatureSet the ranker scored under.
        user_id: Who the request was ranked for.
        item_ids: ``(n,)`` integer ids of the ranked items, best first.
        features: Every feature of ``fs`` by name: request-side ones as ``(size,)`` (or a scalar
            for size 1), item-side ones as ``(n, size)`` (or ``(n,)`` for size 1).
        scores: ``(n,)`` scores the ranker gave, logged with each item (as float32) and kept in the
            warehouse's ``score`` column. None when the ranker gives none: every score is then NaN
            in the transient store and null in the warehouse, never a made-up order.
        max_items: Longest list accepted.

    Raises:
        FeatureInputError: A feature missing, unknown, of the wrong width or kind of number, an id
            outside its vocabulary, or more than ``max_items`` items (status 413).

    """
    items = np.asarray(item_ids)
    if items.ndim != 1 or not len(items):
        raise FeatureInputError("items: expected a non-empty list of item ids", "items")
    if not np.issubdtype(items.dtype, np.integer):
        raise FeatureInputError(f"items: expected integer ids, got {items.dtype}", "items")
    n = len(items)
    if n > max_items:
        raise FeatureInputError(f"items: {n} ranked items, limit {max_items}", "items", status=413)
    if int(items.min()) < 0 or int(items.max()) >= 2**31:
        raise FeatureInputError("items: ids must lie in [0, 2**31)", "items")
    request, used_r = _block(fs, Side.REQUEST, features, 1, "once per request")
    item_block, used_i = _block(fs, Side.ITEM, features, n, "one row per item")
    if unknown := sorted(set(features) - used_r - used_i):
        raise FeatureInputError(
            f"feature {unknown[0]} is not in FeatureSet {fs.name} v{fs.version}"
            + (f" (nor {unknown[1:]})" if len(unknown) > 1 else ""),
            unknown[0],
        )
    if scores is None:
        s = np.full(n, np.nan, np.float32)
    else:
        try:
            s = np.asarray(scores)
        except (TypeError, ValueError):
            raise FeatureInputError(f"scores: expected {n} numbers, one per item", "scores") from None
        if s.shape != (n,) or s.dtype.kind not in "fiu":
            raise FeatureInputError(f"scores: expected {n} numbers, one per item", "scores")
    return RankedBatch(
        np.array([user_id], np.int64),
        items.astype(np.int32).reshape(1, n),
        s.astype(np.float32).reshape(1, n),
        request,
        item_block,
    )


def pack_owner(
    fs: FeatureSet, owner: Owner, values: Mapping[str, object], rows: int, where: str = ""
) -> FeatureBlock:
    """``rows`` rows of one owner's block (as a FeatureStore holds it) from arrays by name.

    Each of the owner's features is checked as :func:`pack_ranked` checks it; names of other
    features are not read, so a table with more columns than the FeatureSet needs loads.

    Args:
        fs: The FeatureSet.
        owner: Whose block.
        values: Each of the owner's features: ``(rows, size)``, or ``(rows,)`` for size 1.
        rows: Entities.
        where: Where the values came from, for messages.

    Raises:
        FeatureInputError: A feature missing, of the wrong width or kind, or an id out of range.

    """
    # The owner's features alone as a FeatureSet (roles dropped: they pair features across owners):
    # its one side's layout is the owner's block, offsets and all.
    own = tuple(dataclasses.replace(f, role="") for f in fs.of(owner))
    side = Side.ITEM if owner is Owner.ITEM else Side.REQUEST
    shaped = {
        f.name: np.asarray(values[f.name]).reshape(rows, 1)
        if f.name in values and f.size == 1 and np.ndim(values[f.name]) == 1
        else values[f.name]
        for f in own
        if f.name in values
    }
    block, _ = _block(FeatureSet(fs.name, fs.version, own), side, shaped, rows, where or owner.value)
    return block
