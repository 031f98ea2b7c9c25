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
from dataclasses import dataclass
from itertools import chain

import numpy as np

from leanrec.errors import InputError
from leanrec.featurelog.ranked import RankedBatch
from leanrec.schema import PAD_ID, FeatureBlock, FeatureSet, Layout, Owner, Side, Slot


class FeatureInputError(InputError, ValueError):
    """Arrays that do not match the FeatureSet, with the feature and what was wrong.

    Attributes:
        feature: The feature (or field) at fault, ``""`` when it is the request as a whole.
        status: The HTTP status the sidecar answers with: 413 for a list over the limit, else 422.

    """

    def __init__(self, message: str, feature: str = "", status: int = 422) -> None:
        super().__init__(message)
        self.feature, self.status = feature, status


@dataclass(frozen=True)
class _Group:
    """Features of one side, one block (floats or ids) and one size, packed with one stack and one copy.

    Attributes:
        slots: Their slots, in layout order.
        names: Their names.
        columns: ``(k * size,)`` int64 columns inside the block, feature after feature.
        is_float: Whether they live in the float block.
        size: Values per row of each.

    """

    slots: tuple[Slot, ...]
    names: tuple[str, ...]
    columns: np.ndarray
    is_float: bool
    size: int


@dataclass(frozen=True)
class _Plan:
    """How one layout is packed: its features in groups of one block and size."""

    groups: tuple[_Group, ...]
    index: dict[str, int]  # each feature's index in the layout, to check features in layout order
    names: frozenset[str]
    id_slots: tuple[Slot, ...]  # the id features, in int-block order
    id_ends: np.ndarray  # (len(id_slots),) one past each one's last column
    vocab: np.ndarray  # (int_width,) the vocabulary of each int column


_PLANS: dict[int, tuple[Layout, _Plan]] = {}


def _plan(layout: Layout) -> _Plan:
    """The packing plan of ``layout``, built once per layout object (a layout hashes slowly)."""
    held = _PLANS.get(id(layout))
    if held is not None and held[0] is layout:
        return held[1]
    by_kind: dict[tuple[bool, int], list[Slot]] = {}
    for slot in layout.slots:
        by_kind.setdefault((slot.feature.is_float, slot.feature.size), []).append(slot)
    groups = tuple(
        _Group(
            tuple(slots),
            tuple(s.feature.name for s in slots),
            (np.array([s.offset for s in slots], np.int64)[:, None] + np.arange(size)).ravel(),
            is_float,
            size,
        )
        for (is_float, size), slots in by_kind.items()
    )
    index = {s.feature.name: i for i, s in enumerate(layout.slots)}
    ids = tuple(s for s in layout.slots if not s.feature.is_float)
    sizes = [s.feature.size for s in ids]
    vocab = np.repeat(np.array([s.feature.vocab for s in ids], np.int64), sizes)
    plan = _Plan(groups, index, frozenset(index), ids, np.cumsum(sizes), vocab)
    if len(_PLANS) >= 64:  # FeatureSets built on the fly (e.g. one owner's) must not pile up
        _PLANS.clear()
    _PLANS[id(layout)] = (layout, plan)
    return plan


_NUMBERS = {True: frozenset({float, int}), False: frozenset({int})}


def _stacked(values: Mapping[str, object], group: _Group, side: Side, rows: int) -> np.ndarray | None:
    """``(rows, k * size)`` values of a group of features in one stack, or None to check one by one.

    Only the plain cases are stacked: Python numbers (a bare one for a size-1 request feature, else
    a list: of ``size`` numbers on the request side, of one number per row on the item side), or
    numpy arrays of one dtype of the right kind, each of the feature's shape. Anything else (a
    missing feature, mixed dtypes, a bool, a nested list) is left to the one-by-one checks, which
    accept or refuse it naming the feature.
    """
    try:
        vals = [values[name] for name in group.names]
    except KeyError:
        return None
    k, size, request = len(vals), group.size, side is Side.REQUEST
    types = set(map(type, vals))
    if types == {list}:  # JSON: request side, size numbers each; item side, one number per row
        length = size if request else rows
        if (not request and size != 1) or set(map(len, vals)) != {length}:
            return None
        if not set(map(type, chain.from_iterable(vals))) <= _NUMBERS[group.is_float]:
            return None
        try:
            a = np.fromiter(chain.from_iterable(vals), np.float64 if group.is_float else np.int64, k * length)
        except OverflowError:  # an integer beyond 64 bits
            return None
        return a.reshape(1, k * size) if request else a.reshape(k, rows).T
    if request and size == 1 and types <= _NUMBERS[group.is_float]:
        a = np.array(vals)
        return a.reshape(1, k) if a.dtype.kind in "fiu" else None
    if types != {np.ndarray}:
        return None
    dtypes = {v.dtype for v in vals}
    shapes = {v.shape for v in vals}
    if request:
        fits = shapes in ({()}, {(1,)}) if size == 1 else shapes == {(size,)}
    else:
        fits = shapes == ({(rows,)} if size == 1 else {(rows, size)})
    kinds = "fiu" if group.is_float else "iu"
    if not fits or len(dtypes) != 1 or next(iter(dtypes)).kind not in kinds:
        return None
    a = np.array(vals)  # (k, ...): one copy
    if request:
        return a.reshape(1, k * size)
    return a.T if size == 1 else a.transpose(1, 0, 2).reshape(rows, k * size)


def _block(
    fs: FeatureSet, side: Side, values: Mapping[str, object], rows: int, where: str
) -> tuple[FeatureBlock, frozenset[str]]:
    """One side's block of ``rows`` rows from ``values``; returns it and the names it used.

    The features of one block and size are stacked and copied at once (a FeatureSet has many
    features of few shapes: one copy per feature is what an HTTP request could not afford); a
    group that is not plain is checked and copied feature by feature, in layout order, so the
    first one at fault is the one named. The ids' range is checked once for the whole block
    (as int64, so an id that does not fit in 32 bits is refused rather than wrapped).
    """
    layout = fs.layout(side)
    plan = _plan(layout)
    floats = np.empty((rows, layout.float_width), "<f4")
    ints = np.empty((rows, layout.int_width), np.int64)
    one_by_one: list[tuple[int, Slot]] = []
    for group in plan.groups:
        a = _stacked(values, group, side, rows)
        if a is None:
            one_by_one += [(plan.index[name], s) for name, s in zip(group.names, group.slots, strict=True)]
        else:
            (floats if group.is_float else ints)[:, group.columns] = a
    for _, slot in sorted(one_by_one, key=lambda t: t[0]):
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
    if plan.id_slots and rows:
        bad = ((ints < PAD_ID) | (ints >= plan.vocab)).any(0)
        if bad.any():
            slot = plan.id_slots[int(np.searchsorted(plan.id_ends, int(np.argmax(bad)), side="right"))]
            f, col = slot.feature, ints[:, slot.offset : slot.stop]
            raise FeatureInputError(
                f"feature {f.name}: ids must lie in [0, {f.vocab}) (or {PAD_ID} for padding), "
                f"got {int(col.min())}..{int(col.max())}",
                f.name,
            )
    return FeatureBlock(floats, ints.astype("<i4")), plan.names


def ids_fit(fs: FeatureSet, side: Side, ints: np.ndarray) -> bool:
    """Whether every id of ``(rows, int_width)`` int64 ``ints`` of one side lies in its vocabulary."""
    plan = _plan(fs.layout(side))
    return not plan.id_slots or not len(ints) or not ((ints < PAD_ID) | (ints >= plan.vocab)).any()


def pack_ranked(
    fs: FeatureSet,
    user_id: int,
    item_ids: object,
    features: Mapping[str, object],
    scores: object | None = None,
    max_items: int = 1_000,
    item_block: FeatureBlock | None = None,
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
        item_block: The item side already packed and checked (``n`` rows: what the sidecar takes
            straight from an Arrow body's columns, see :mod:`leanrec.serve.wire`); ``features``
            then holds the request side only.

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
    if item_block is None:
        item_block, used_i = _block(fs, Side.ITEM, features, n, "one row per item")
    else:
        used_i = _plan(fs.layout(Side.ITEM)).names
    if unknown := sorted(set(features) - used_r - used_i):
        retired = fs.retired.get(unknown[0])
        raise FeatureInputError(
            f"feature {unknown[0]} is not in FeatureSet {fs.name} v{fs.version}"
            + (f": it was retired ({retired}); stop sending it" if retired else "")
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
