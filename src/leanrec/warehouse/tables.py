"""Arrow schemas of the two warehouse layouts, derived from the FeatureSet, and conversions.

- Request-level (default): one row per request; request-side features once; ``items`` is a list of
  structs, one per viewed item, with its position, id, first-view time, the ranker's score, features
  and labels.
- Impression-level (baseline): one row per viewed item; request-side columns repeated in each.

``score`` is the score the ranker gave the item at its position, as logged with its features: not a
feature (no model reads it as an input), kept for off-policy evaluation and for comparing a new model
with the logged one. It is null where the ranker gave none; files written before it was kept have
no such column, and readers give nulls for them (:func:`with_scores`).

A feature of size 1 is a scalar column; a wider one is a fixed-size list. Everything here works on
whole columns: no loop per row or per value.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from leanrec.events.model import LABELS
from leanrec.schema import Feature, FeatureBlock, FeatureSet, Layout, Side
from leanrec.warehouse.records import RequestRecord

FEATURESET_KEY = b"leanrec.featureset"
LAYOUT_KEY = b"leanrec.layout"


class TableLayout(StrEnum):
    """Warehouse row layouts."""

    REQUEST = "request"
    IMPRESSION = "impression"


META_FIELDS = (
    pa.field("request_id", pa.string(), nullable=False),
    pa.field("ts_ms", pa.int64(), nullable=False),
    pa.field("user_id", pa.int64(), nullable=False),
    pa.field("fs_version", pa.uint16(), nullable=False),
)
ITEM_META_FIELDS = (
    pa.field("position", pa.int16(), nullable=False),
    pa.field("item_id", pa.int64(), nullable=False),
    pa.field("view_ms", pa.int64(), nullable=False),
)
SCORE_FIELD = pa.field("score", pa.float32(), nullable=True)
"""The ranker's score of each viewed item; null where it gave none."""
LABEL_FIELDS = tuple(
    pa.field(name, pa.int32() if name == "watch_ms" else pa.bool_(), nullable=False) for name in LABELS
)


def feature_field(f: Feature) -> pa.Field:
    """Arrow field of one feature."""
    value = pa.float32() if f.is_float else pa.int64()
    return pa.field(f.name, value if f.size == 1 else pa.list_(value, f.size), nullable=False)


def _fields(layout: Layout) -> list[pa.Field]:
    return [feature_field(s.feature) for s in layout.slots]


def _item_fields(fs: FeatureSet) -> list[pa.Field]:
    """Columns of one viewed item, in either layout."""
    return [*ITEM_META_FIELDS, SCORE_FIELD, *_fields(fs.layout(Side.ITEM)), *LABEL_FIELDS]


def item_struct(fs: FeatureSet) -> pa.StructType:
    """Type of one viewed item inside a request-level row."""
    return pa.struct(_item_fields(fs))


def schema(fs: FeatureSet, layout: TableLayout) -> pa.Schema:
    """Arrow schema of a warehouse layout, with the FeatureSet in its metadata."""
    req = _fields(fs.layout(Side.REQUEST))
    if layout is TableLayout.REQUEST:
        fields = [*META_FIELDS, *req, pa.field("items", pa.list_(item_struct(fs)), nullable=False)]
    else:
        fields = [*META_FIELDS, *req, *_item_fields(fs)]
    return pa.schema(
        fields, metadata={FEATURESET_KEY: fs.to_json().encode(), LAYOUT_KEY: layout.value.encode()}
    )


def block_arrays(layout: Layout, block: FeatureBlock) -> list[pa.Array]:
    """One Arrow array per feature, sliced from the packed blocks."""
    out = []
    for s in layout.slots:
        src = block.floats if s.feature.is_float else block.ints
        cols = np.ascontiguousarray(src[:, s.offset : s.stop])
        if s.feature.size == 1:
            out.append(pa.array(cols[:, 0]))
        else:
            out.append(pa.FixedSizeListArray.from_arrays(pa.array(cols.ravel()), s.feature.size))
    return out


def arrays_block(layout: Layout, columns: dict[str, pa.Array | pa.ChunkedArray], n: int) -> FeatureBlock:
    """Inverse of :func:`block_arrays`: pack feature columns back into a FeatureBlock.

    Columns absent from ``columns`` (retired from a later FeatureSet version) are left as zeros.
    """
    block = layout.zeros(n)
    for s in layout.slots:
        col = columns.get(s.feature.name)
        if col is None:
            continue
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        values = col.flatten() if s.feature.size > 1 else col
        dst = block.floats if s.feature.is_float else block.ints
        dst[:, s.offset : s.stop] = values.to_numpy(zero_copy_only=False).reshape(n, s.feature.size)
    return block


def records_table(fs: FeatureSet, records: Sequence[RequestRecord], layout: TableLayout) -> pa.Table:
    """Build a warehouse table from joined records.

    Impression-level rows come in the order a streaming joiner emits them: by the time each item
    was first viewed, so the engagements of concurrent requests interleave.
    """
    sch = schema(fs, layout)
    counts = np.array([len(r) for r in records], np.int64)
    request = FeatureBlock.concat([r.request for r in records])
    items = FeatureBlock.concat([r.items for r in records])
    meta = [
        pa.array([r.request_id for r in records], pa.string()),
        pa.array(np.array([r.ts_ms for r in records], np.int64)),
        pa.array(np.array([r.user_id for r in records], np.int64)),
        pa.array(np.array([r.fs_version for r in records], np.uint16)),
    ]
    item_meta = [
        pa.array(np.concatenate([r.positions for r in records]).astype(np.int16)),
        pa.array(np.concatenate([r.item_ids for r in records]).astype(np.int64)),
        pa.array(np.concatenate([r.view_ms for r in records]).astype(np.int64)),
    ]
    labels = [pa.array(np.concatenate([r.labels[name] for r in records])) for name in LABELS]
    scores = np.concatenate(
        [np.full(len(r), np.nan, np.float32) if r.scores is None else r.scores for r in records]
    ).astype(np.float32)
    score = pa.array(scores, pa.float32(), mask=np.isnan(scores))  # NaN, no score: null
    item_cols = [*item_meta, score, *block_arrays(fs.layout(Side.ITEM), items), *labels]
    req_cols = [*meta, *block_arrays(fs.layout(Side.REQUEST), request)]
    if layout is TableLayout.REQUEST:
        struct = pa.StructArray.from_arrays(item_cols, fields=list(item_struct(fs)))
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        lists = pa.ListArray.from_arrays(offsets, struct, type=sch.field("items").type)
        return pa.Table.from_arrays([*req_cols, lists], schema=sch)
    parent = np.repeat(np.arange(len(records)), counts)
    order = np.argsort(item_meta[2].to_numpy(), kind="stable")
    table = pa.Table.from_arrays([*(c.take(parent) for c in req_cols), *item_cols], schema=sch)
    return table.take(order)


def with_scores(table: pa.Table | pa.RecordBatch, layout: TableLayout) -> pa.Table | pa.RecordBatch:
    """``table`` with a ``score`` column of nulls if it has none (a file written before scores were kept).

    Request-level, the column is a field of the ``items`` structs, added at the end of each struct
    (casting to the schema puts it in place by name); the lists keep their offsets. A table that has
    the column is returned as it is.
    """
    name = SCORE_FIELD.name
    if layout is TableLayout.IMPRESSION:
        if name in table.column_names:
            return table
        return table.append_column(SCORE_FIELD, pa.nulls(table.num_rows, SCORE_FIELD.type))
    index = table.schema.get_field_index("items")
    items = table.column(index)
    items = items.combine_chunks() if isinstance(items, pa.ChunkedArray) else items
    struct_type = items.type.value_type
    if struct_type.get_field_index(name) >= 0:
        return table
    flat = pc.list_flatten(items)
    children = [*flat.flatten(), pa.nulls(len(flat), SCORE_FIELD.type)]
    struct = pa.StructArray.from_arrays(children, fields=[*struct_type, SCORE_FIELD])
    lengths = pc.list_value_length(items).to_numpy(zero_copy_only=False)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    lists = pa.ListArray.from_arrays(offsets, struct)
    return table.set_column(index, pa.field("items", lists.type, nullable=False), lists)


def request_to_impression(table: pa.Table, fs: FeatureSet) -> pa.Table:
    """Flatten request-level rows into impression-level rows (request side repeated)."""
    sch = schema(fs, TableLayout.IMPRESSION)
    items = table.column("items").combine_chunks()
    parent = pc.list_parent_indices(items)
    flat = pc.list_flatten(items)
    req_names = [f.name for f in (*META_FIELDS, *_fields(fs.layout(Side.REQUEST)))]
    cols = [table.column(n).take(parent) for n in req_names]
    cols += [flat.field(f.name) for f in item_struct(fs)]
    return pa.Table.from_arrays(cols, schema=sch)


def impression_to_request(table: pa.Table, fs: FeatureSet) -> pa.Table:
    """Group impression-level rows by request into request-level rows, items by position."""
    sch = schema(fs, TableLayout.REQUEST)
    table = table.sort_by([("request_id", "ascending"), ("position", "ascending")])
    rid = table.column("request_id").combine_chunks()
    n = len(rid)
    starts = np.flatnonzero(
        np.concatenate([[True], pc.not_equal(rid[1:], rid[:-1]).to_numpy(zero_copy_only=False)])
    )
    starts = starts if n else np.empty(0, np.int64)
    req_names = [f.name for f in (*META_FIELDS, *_fields(fs.layout(Side.REQUEST)))]
    cols = [table.column(name).take(pa.array(starts)) for name in req_names]
    fields = list(item_struct(fs))
    struct = pa.StructArray.from_arrays(
        [table.column(f.name).combine_chunks() for f in fields], fields=fields
    )
    offsets = pa.array(np.concatenate([starts, [n]]).astype(np.int32))
    cols.append(pa.ListArray.from_arrays(offsets, struct, type=sch.field("items").type))
    return pa.Table.from_arrays(cols, schema=sch)
