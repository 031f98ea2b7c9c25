"""A ranker's own arrays, checked against the FeatureSet and packed into the blocks loggers freeze.

A ranking service outside leanrec holds the features it scored as arrays by name: the request side
once (user and context features), the item side one row per ranked item. :func:`pack_ranked` checks
every array against its feature (present, known, the right width, numbers of the right kind, ids
that fit in 64 bits, strings where the feature declares string ids, hashed here by
:func:`leanrec.ids.string_ids`) and packs them into a :class:`~leanrec.featurelog.ranked.RankedBatch`:
one vectorised copy per feature, no loop over values. A mistake raises :class:`FeatureInputError`
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
from leanrec.ids import beyond_int64, string_ids
from leanrec.schema import PAD_ID, Feature, FeatureBlock, FeatureSet, Layout, Owner, Role, Side, Slot


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
    plan = _Plan(groups, index, frozenset(index))
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
    missing feature, mixed dtypes, a bool, a nested list, strings) is left to the one-by-one checks,
    which accept or refuse it naming the feature.
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
    kinds = "fiu" if group.is_float else "i"  # uint64 may not fit in int64: checked one by one
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
    group that is not plain (strings among them) is checked and copied feature by feature, in
    layout order, so the first one at fault is the one named.
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
            a = _values_of(f, values[f.name])
        except FeatureInputError:
            raise
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
            ints[:, slot.offset : slot.stop] = _int64(f"feature {f.name}", f.string_ids, a)
    return FeatureBlock(floats, ints), plan.names


def _values_of(f: Feature, v: object) -> np.ndarray:
    """A feature's values as an array: string ids hashed, integers past int64 refused as such.

    Python integers past int64 turn a list into floats or objects for numpy; they are found here,
    while they are still integers, so the refusal says what they are.
    """
    if f.string_ids:
        return _string_ids_of(f"feature {f.name}", v)
    a = np.asarray(v)
    if not f.is_float and (a.dtype.kind == "O" or (a.dtype.kind == "f" and not isinstance(v, np.ndarray))):
        _string_ids_of(f"feature {f.name}", v)  # raises for an integer past int64, else the checks refuse
    return a


def _string_ids_of(name: str, v: object) -> np.ndarray:
    """The values of a feature or field ``name`` that declares string ids: strings hashed, ints kept.

    Integers among the strings are ids already (the padding id of a short sequence among them), so
    a list such as ``["sku-1", "sku-2", -1]`` keeps its padding: a list is taken as objects, never as
    the strings numpy would make of its integers. Values of no string come back as numbers, for the
    integer checks to take or refuse (an integer past int64 refused here, where it still is one).

    Raises:
        FeatureInputError: A value among the strings that is neither a string nor an integer, or an
            integer that is no int64.
        TypeError, ValueError: ``v`` is no array at all (a ragged list).

    """
    a = v if isinstance(v, np.ndarray) else np.asarray(v, dtype=object)
    if a.dtype.kind in "US" and a.size:
        return _hashed(name, a)
    if a.dtype.kind != "O" or not a.size:
        return a
    flat = a.ravel()
    is_str = np.fromiter((isinstance(x, str) for x in flat), bool, len(flat))
    if is_str.all():
        return _hashed(name, a)
    field = name.split()[-1]
    others = flat[~is_str].tolist()
    for x in others:
        if isinstance(x, bool | np.bool_) or not isinstance(x, int | np.integer):
            if not is_str.any() and not isinstance(x, bool | np.bool_):  # floats: for the integer checks
                return np.asarray(others).reshape(a.shape)
            raise FeatureInputError(
                f"{name} holds string ids: expected strings or integer ids, got {type(x).__name__} {x!r}",
                field,
            )
        if not -(2**63) <= x < 2**63:
            raise FeatureInputError(f"{name}: ids are int64, got {x}", field)
    out = np.empty(len(flat), np.int64)
    out[~is_str] = others
    if is_str.any():
        out[is_str] = _hashed(name, flat[is_str])
    return out.reshape(a.shape)


def _hashed(name: str, a: np.ndarray) -> np.ndarray:
    """String ids (of feature or field ``name``) as their 64-bit ids, same shape."""
    try:
        return string_ids(a.ravel()).reshape(a.shape)
    except (ValueError, TypeError, OverflowError) as exc:  # pyarrow's errors are ValueErrors too
        raise FeatureInputError(f"{name} holds string ids: {exc}", name.split()[-1]) from None


def _int64(name: str, strings: bool, a: np.ndarray) -> np.ndarray:
    """Integer ids (of feature or field ``name``), refusing what int64 cannot hold.

    Unsigned ids past 2**63 are refused rather than wrapped: the caller says whether they are the
    two's-complement int64 of its ids.
    """
    field = name.split()[-1]
    if beyond_int64(a).any():
        raise FeatureInputError(
            f"{name}: ids are int64, got {int(a.max())}; give unsigned ids past 2**63 as their "
            "two's-complement int64 (numpy: ids.view(np.int64))",
            field,
        )
    if a.dtype.kind not in "iu":
        raise FeatureInputError(
            f"{name} holds ids: expected {'integers or strings' if strings else 'integers'}, got {a.dtype}",
            field,
        )
    return a


def ranked_ids(fs: FeatureSet, item_ids: object) -> np.ndarray:
    """The ranked items' ids as ``(n,)`` int64: strings hashed where the item id declares string ids.

    Raises:
        FeatureInputError: Not a non-empty list of ids, or one of them the padding id.

    """
    item = fs.role(Role.ITEM_ID)
    strings = item is not None and item.string_ids
    try:
        items = _string_ids_of("items", item_ids) if strings else np.asarray(item_ids)
    except FeatureInputError:
        raise
    except (TypeError, ValueError):
        raise FeatureInputError("items: expected a non-empty list of item ids", "items") from None
    if items.ndim != 1 or not len(items):
        raise FeatureInputError("items: expected a non-empty list of item ids", "items")
    if items.dtype.kind in "USO" and not strings:
        raise FeatureInputError(
            f"items: expected integer ids, got {items.dtype} (string ids need an item_id "
            'feature declared with dtype = "string")',
            "items",
        )
    items = _int64("items", strings, items).astype(np.int64)
    if (items == PAD_ID).any():
        raise FeatureInputError(f"items: {PAD_ID} is the padding id, not an item", "items")
    return items


def user_key(fs: FeatureSet, user_id: object) -> int:
    """A request's user id as an int64: a string hashed where the user id declares string ids.

    Raises:
        FeatureInputError: Neither an integer of 64 bits nor (for string user ids) a string.

    """
    user = fs.role(Role.USER_ID)
    if isinstance(user_id, str) and user is not None and user.string_ids:
        return int(string_ids([user_id])[0])
    if (
        isinstance(user_id, bool)
        or not isinstance(user_id, int | np.integer)
        or not -(2**63) <= user_id < 2**63
    ):
        kind = "an integer or a string" if user is not None and user.string_ids else "a 64-bit integer"
        raise FeatureInputError(f"user_id: expected {kind}, got {user_id!r}", "user_id")
    return int(user_id)


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
        user_id: Who the request was ranked for (a string where the user id declares string ids).
        item_ids: ``(n,)`` ids of the ranked items, best first: int64, or strings where the item
            id declares string ids.
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
            that does not fit in 64 bits, or more than ``max_items`` items (status 413).

    """
    n = len(item_ids) if hasattr(item_ids, "__len__") else 0
    if n > max_items:
        raise FeatureInputError(f"items: {n} ranked items, limit {max_items}", "items", status=413)
    items = ranked_ids(fs, item_ids)
    user = user_key(fs, user_id)
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
        np.array([user], np.int64),
        items.reshape(1, n),
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
        FeatureInputError: A feature missing, of the wrong width or kind, or an id that does not fit.

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
