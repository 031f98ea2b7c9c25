"""The bodies of the sidecar's hot calls, decoded in a few vectorised steps.

A ranked request costs the sidecar three HTTP calls (``/v1/log``, maybe ``/v1/paginate``, then
``/v1/events``), so their bodies are decoded without a Python step per feature or per event:

- :func:`arrow_body`: an Arrow IPC body of ``/v1/log``, its numeric columns taken out of the record
  batch one type at a time (one tensor per type) rather than one column at a time;
- :func:`loads`: JSON through orjson when it is installed, else the standard library, with the
  standard library's answer (and error) wherever orjson refuses what it accepts;
- :func:`event_columns`: the events of a ``/v1/events`` body as columns, straight from the parsed
  JSON, or ``None`` for a body that needs the full checks (which then name what is wrong).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from operator import itemgetter
from typing import Any

import numpy as np
import pyarrow as pa

from leanrec.events.model import EventBatch, EventKind
from leanrec.featurelog.inputs import FeatureInputError
from leanrec.schema import FeatureBlock, FeatureSet, Side

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is a dependency; the standard library still works
    orjson = None  # type: ignore[assignment]


def loads(raw: bytes | str) -> Any:
    """Parse JSON; orjson's speed where it agrees with ``json.loads``, else ``json.loads`` itself.

    orjson refuses a few things the standard library takes (``NaN``, integers beyond 64 bits): those
    bodies go to ``json.loads``, so what is accepted, and the error for what is not, do not depend
    on orjson.

    Raises:
        json.JSONDecodeError: Not JSON (from the standard library, with its position).

    """
    if orjson is not None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(raw)


def dumps(obj: Any) -> bytes:
    """Compact JSON bytes (as FastAPI's own responses are)."""
    if orjson is not None:
        return orjson.dumps(obj)
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


_NUMERIC = (pa.types.is_integer, pa.types.is_floating)


def _numeric(t: pa.DataType) -> bool:
    return any(is_(t) for is_ in _NUMERIC)


class _ArrowPlan:
    """How the columns of one Arrow schema (metadata aside) are taken out, built once per schema.

    Attributes:
        groups: Per primitive numeric type, the indices and names of its columns: one tensor each.
        lists: Fixed-size lists of numbers: ``(index, name, list size)``, one view each.
        others: Every other column: ``(index, name)``, converted as it is (nulls, strings...) for
            the FeatureSet checks to refuse or accept.

    """

    def __init__(self, schema: pa.Schema) -> None:
        by_type: dict[pa.DataType, list[tuple[int, str]]] = {}
        self.lists: list[tuple[int, str, int]] = []
        self.others: list[tuple[int, str]] = []
        for i, f in enumerate(schema):
            if _numeric(f.type):
                by_type.setdefault(f.type, []).append((i, f.name))
            elif pa.types.is_fixed_size_list(f.type) and _numeric(f.type.value_type):
                self.lists.append((i, f.name, f.type.list_size))
            else:
                self.others.append((i, f.name))
        self.groups = [([i for i, _ in cols], [n for _, n in cols]) for cols in by_type.values()]
        self.schema = schema
        self.items: dict[int, tuple[FeatureSet, _ItemPlan | None]] = {}

    def item_plan(self, fs: FeatureSet) -> _ItemPlan | None:
        """How these columns become ``fs``'s item block, or None if they are not all plain."""
        held = self.items.get(id(fs))
        if held is None or held[0] is not fs:
            held = self.items[id(fs)] = (fs, _ItemPlan.of(fs, self.schema))
        return held[1]


class _ItemPlan:
    """Where the columns of one Arrow schema go in one FeatureSet's item block.

    Built only when every column is plain: ``item_id``, maybe ``score``, and exactly the item-side
    features, each a numeric column (a fixed-size list of its size for a vector) of a kind the
    feature takes (signed integers for ids). Then a body's item block is copied straight from the
    record batch: one tensor per Arrow type and block, one view per vector; anything else (nulls,
    string or unsigned ids, another shape) goes the full way, whose checks hash string ids and name
    what is wrong.

    Attributes:
        item_id: Column of the item ids; ``score``: of the scores, or None.
        selections: ``(column indices, into the float block?, (k,) block columns)``.
        vectors: ``(column index, into the float block?, first block column, size)``.

    """

    def __init__(self) -> None:
        self.item_id = 0
        self.score: int | None = None
        self.selections: list[tuple[list[int], bool, np.ndarray]] = []
        self.vectors: list[tuple[int, bool, int, int]] = []

    @classmethod
    def of(cls, fs: FeatureSet, schema: pa.Schema) -> _ItemPlan | None:
        names = schema.names
        slots = {s.feature.name: s for s in fs.layout(Side.ITEM).slots}
        if len(set(names)) != len(names) or set(names) - {"item_id", "score"} != set(slots):
            return None
        plan = cls()
        by_kind: dict[tuple[pa.DataType, bool], tuple[list[int], list[int]]] = {}
        for i, field in enumerate(schema):
            t = field.type
            if field.name in ("item_id", "score"):
                if not _numeric(t):
                    return None
                setattr(plan, field.name, i)
                continue
            f = slots[field.name].feature
            offset = slots[field.name].offset
            if f.size == 1 and _numeric(t) and (f.is_float or pa.types.is_signed_integer(t)):
                idx, dest = by_kind.setdefault((t, f.is_float), ([], []))
                idx.append(i)
                dest.append(offset)
            elif (
                f.size > 1
                and pa.types.is_fixed_size_list(t)
                and t.list_size == f.size
                and _numeric(t.value_type)
                and (f.is_float or pa.types.is_signed_integer(t.value_type))
            ):
                plan.vectors.append((i, f.is_float, offset, f.size))
            else:
                return None
        plan.selections = [(idx, is_float, np.array(dest)) for (_, is_float), (idx, dest) in by_kind.items()]
        return plan

    def block(self, fs: FeatureSet, batch: pa.RecordBatch) -> FeatureBlock | None:
        """The item block of one record batch, or None if a value is not plain (a null)."""
        layout, n = fs.layout(Side.ITEM), batch.num_rows
        floats = np.empty((n, layout.float_width), "<f4")
        ints = np.empty((n, layout.int_width), np.int64)
        for idx, is_float, dest in self.selections:
            try:
                tensor = np.asarray(batch.select(idx).to_tensor(row_major=False))
            except (pa.ArrowInvalid, pa.ArrowTypeError):  # nulls
                return None
            (floats if is_float else ints)[:, dest] = tensor
        for i, is_float, offset, size in self.vectors:
            col = batch.column(i)
            values = col.values
            if col.null_count or values.null_count:
                return None
            start = col.offset * size
            view = values.to_numpy()[start : start + n * size].reshape(n, size)
            (floats if is_float else ints)[:, offset : offset + size] = view
        return FeatureBlock(floats, ints)


_PLANS: list[tuple[pa.Schema, _ArrowPlan]] = []


def _plan(schema: pa.Schema) -> _ArrowPlan:
    # Compared, not hashed: a schema hashes its metadata too, which holds each request's features.
    for known, plan in _PLANS:
        if known.equals(schema, check_metadata=False):
            return plan
    plan = _ArrowPlan(schema)
    _PLANS.insert(0, (schema.remove_metadata(), plan))
    del _PLANS[16:]  # a few rankers' schemas, not one per request if something varies
    return plan


def _column(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """One column as numpy, whatever it holds (nulls as NaN, strings as objects...)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
    return col.to_numpy(zero_copy_only=False)


def _columns(batch: pa.RecordBatch) -> dict[str, np.ndarray]:
    """Every column of one record batch by name: ``(rows,)``, or ``(rows, size)`` for a fixed-size list.

    The numeric columns of one type come out as one column-major tensor, a view per column; a
    fixed-size list without nulls is a view of its values. Columns with nulls take the slow way,
    one by one, so nulls read as NaN as they always did.
    """
    plan = _plan(batch.schema)
    out: dict[str, np.ndarray] = {}
    slow = list(plan.others)
    for idx, names in plan.groups:
        try:
            block = np.asarray(batch.select(idx).to_tensor(row_major=False))  # (rows, k), F order
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # nulls
            slow += list(zip(idx, names, strict=True))
            continue
        for j, name in enumerate(names):
            out[name] = block[:, j]
    for i, name, size in plan.lists:
        col = batch.column(i)
        values = col.values
        if col.null_count or values.null_count:
            slow.append((i, name))
            continue
        start = col.offset * size
        out[name] = values.to_numpy()[start : start + len(col) * size].reshape(len(col), size)
    for i, name in slow:
        out[name] = _column(batch.column(i))
    return {name: out[name] for name in batch.schema.names}  # in the stream's column order


def arrow_body(
    raw: bytes, fs: FeatureSet | None = None
) -> tuple[Any, np.ndarray, np.ndarray | None, dict[str, Any], FeatureBlock | None]:
    """The user, items, scores and features of an Arrow IPC body of /v1/log.

    The stream's rows are the ranked items: an ``item_id`` column, an optional ``score`` column, and
    one column per item-side feature (a fixed-size list for a size above 1). The request side rides
    in the schema's metadata under ``leanrec``: JSON ``{"user_id": ..., "features": {...}}``, the
    features as in the JSON body.

    Returns:
        The user id (as the metadata gives it: checked, and hashed if a string, where it is packed),
        ``(n,)`` item ids, ``(n,)`` scores or None, the features by name (request side
        as parsed from JSON, item side ``(n,)`` or ``(n, size)`` arrays), and None. With ``fs``,
        when every column is plain (see :class:`_ItemPlan`), the item side comes instead as the
        packed and checked item block of ``fs`` (the features then hold the request side only).

    Raises:
        FeatureInputError: Not an Arrow stream, or its metadata is missing or not such JSON.

    """
    try:
        reader = pa.ipc.open_stream(raw)
        batches = list(reader)
    except (pa.ArrowInvalid, OSError) as exc:
        raise FeatureInputError(f"body is not an Arrow IPC stream: {exc}") from None
    schema = reader.schema
    try:
        head = loads((schema.metadata or {})[b"leanrec"])
        user_id, request_features = head["user_id"], dict(head.get("features", {}))
    except (KeyError, TypeError, ValueError):
        raise FeatureInputError(
            'the stream\'s schema metadata needs "leanrec": {"user_id": ..., "features": {...}} as JSON',
            "leanrec",
        ) from None
    if "item_id" not in schema.names:
        raise FeatureInputError("the stream needs an item_id column", "item_id")
    if len(batches) == 1 and fs is not None:
        batch = batches[0]
        plan = _plan(batch.schema)
        items_plan = plan.item_plan(fs)
        block = items_plan.block(fs, batch) if items_plan is not None else None
        if block is not None and items_plan is not None:
            items = _column(batch.column(items_plan.item_id))
            scores = None if items_plan.score is None else _column(batch.column(items_plan.score))
            return user_id, items, scores, request_features, block
    if len(batches) == 1:
        columns = _columns(batches[0])
    else:  # several batches (or none): one table, column by column
        table = pa.Table.from_batches(batches, schema=schema)
        columns = {name: _column(table[name]) for name in table.column_names}
    items = columns.pop("item_id")
    scores = columns.pop("score", None)
    return user_id, items, scores, {**request_features, **columns}, None


_KINDS = {k.name.lower(): int(k) for k in EventKind} | {k.name: int(k) for k in EventKind}
_FIELDS = ("position", "item_id", "kind", "ts_ms")
_INT32 = (-(2**31), 2**31)


def event_columns(request_id: str, events: object, max_events: int) -> EventBatch | None:
    """The events of a ``/v1/events`` body as one EventBatch, or None if any is not plain.

    Plain: a list of at most ``max_events`` objects, each with an integer ``position`` (32 bits) and
    ``item_id`` (64 bits), a known ``kind`` (lower or upper case), an integer ``ts_ms`` (64 bits) and, if
    present, a numeric ``value``. Each field is gathered for all events at once; a body that is not
    plain is left to the full, per-event checks, which say what is wrong with which event.
    """
    if type(events) is not list or len(events) > max_events:
        return None
    if events and set(map(type, events)) != {dict}:
        return None
    try:
        cols = [list(map(itemgetter(name), events)) for name in _FIELDS]
    except KeyError:
        return None
    position, item_id, kind, ts_ms = cols
    value = [e.get("value", 0.0) for e in events]
    ints = set(map(type, position)) | set(map(type, item_id)) | set(map(type, ts_ms))
    if not ints <= {int} or not set(map(type, value)) <= {int, float}:
        return None  # bools, floats, strings: the full checks decide
    try:
        kinds = np.array(list(map(_KINDS.__getitem__, kind)), np.int8)
        pos, item, ts = (np.array(c, np.int64) for c in (position, item_id, ts_ms))
    except (KeyError, TypeError, OverflowError):
        return None  # an unknown kind, a kind that is not a string, an integer beyond 64 bits
    lo, hi = _INT32
    if len(events) and (pos.min() < lo or pos.max() >= hi):
        return None  # the full checks refuse these events one by one
    return EventBatch(
        request_id,
        pos.astype(np.int32),
        item,
        kinds,
        ts,
        np.array(value, np.float32),
    )


def is_plain_ref(body: Mapping[str, object], *fields: tuple[str, int]) -> bool:
    """Whether ``body`` holds each ``(name, max length)`` as a string no longer than that, and text.

    Text: JSON's escapes can carry a lone surrogate, which has no UTF-8 form; such a body goes to the
    full checks, which refuse it where it matters (a batch id, a key in the store).
    """
    for name, limit in fields:
        v = body.get(name)
        if type(v) is not str or len(v) > limit or not (v.isascii() or _is_text(v)):
            return False
    return True


def _is_text(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True
