"""Arrow schemas of the warehouse layouts, derived from the FeatureSet, and conversions.

- Request-level (default): one row per request; request-side features once; ``items`` is a list of
  structs, one per viewed item, with its position, id, first-view time, the ranker's score, features
  and labels.
- Impression-level (baseline): one row per viewed item; request-side columns repeated in each.
- Deduplicated: request-level rows that hold each viewed item's features, and the request's slowly
  changing features (``changes = "rarely"``), as a key into a side table of the distinct rows of a
  file: an item viewed in many requests, a user's embeddings across their requests, are stored once
  per file (:func:`dedup_tables`, :func:`undedup`). The key is a 64-bit hash of the row's exact bytes.

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
SIDE_KEY = b"leanrec.side"
"""Metadata key of a deduplicated warehouse's side files: which side table the file holds."""


class TableLayout(StrEnum):
    """Warehouse row layouts."""

    REQUEST = "request"
    IMPRESSION = "impression"
    DEDUP = "dedup"


class DedupTable(StrEnum):
    """The side tables of a deduplicated warehouse file."""

    ITEMS = "items"
    """Distinct item feature rows, keyed by ``item_key``."""
    SLOW = "slow"
    """Distinct rows of the request's slowly changing features, keyed by ``slow_key``."""


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
ITEM_KEY_FIELD = pa.field("item_key", pa.uint64(), nullable=False)
"""Deduplicated layout: hash of a viewed item's feature row, its key in the items side table."""
SLOW_KEY_FIELD = pa.field("slow_key", pa.uint64(), nullable=False)
"""Deduplicated layout: hash of a request's slowly changing features, its key in the slow side table."""
KEY_FIELDS = {DedupTable.ITEMS: ITEM_KEY_FIELD, DedupTable.SLOW: SLOW_KEY_FIELD}
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


def slow_names(fs: FeatureSet) -> list[str]:
    """The request-side features declared slowly changing, in layout order."""
    return [s.feature.name for s in fs.layout(Side.REQUEST).slots if s.feature.rarely]


def dedup_item_struct() -> pa.StructType:
    """Type of one viewed item inside a deduplicated row: its features are a key into the items table."""
    return pa.struct([*ITEM_META_FIELDS, SCORE_FIELD, ITEM_KEY_FIELD, *LABEL_FIELDS])


def schema(fs: FeatureSet, layout: TableLayout) -> pa.Schema:
    """Arrow schema of a warehouse layout, with the FeatureSet in its metadata.

    Deduplicated, this is the schema of the request files; :func:`side_schema` gives their side tables'.
    """
    req = _fields(fs.layout(Side.REQUEST))
    if layout is TableLayout.REQUEST:
        fields = [*META_FIELDS, *req, pa.field("items", pa.list_(item_struct(fs)), nullable=False)]
    elif layout is TableLayout.DEDUP:
        slow = set(slow_names(fs))
        fields = [
            *META_FIELDS,
            *(f for f in req if f.name not in slow),
            *([SLOW_KEY_FIELD] if slow else []),
            pa.field("items", pa.list_(dedup_item_struct()), nullable=False),
        ]
    else:
        fields = [*META_FIELDS, *req, *_item_fields(fs)]
    return pa.schema(
        fields, metadata={FEATURESET_KEY: fs.to_json().encode(), LAYOUT_KEY: layout.value.encode()}
    )


def side_schema(fs: FeatureSet, table: DedupTable) -> pa.Schema:
    """Arrow schema of a side table of the deduplicated layout: its key, then its features.

    Its metadata names the layout and the table; the FeatureSet is in the request file's metadata,
    which is read first, and is not repeated (a few kB per file).
    """
    if table is DedupTable.ITEMS:
        features = _fields(fs.layout(Side.ITEM))
    else:
        features = [feature_field(fs[name]) for name in slow_names(fs)]
    meta = {LAYOUT_KEY: TableLayout.DEDUP.value.encode(), SIDE_KEY: table.value.encode()}
    return pa.schema([KEY_FIELDS[table], *features], metadata=meta)


def _scattered_repeats(arr: pa.Array, stride: int) -> bool:
    """Whether most values of a float column repeat earlier ones, mostly not those of the row before.

    ``stride`` is the values per row (a vector's size): a value is compared, bit for bit, with the
    same element of the previous row.
    """
    n = len(arr)
    repeats = n - pc.count_distinct(arr).as_py()
    if 2 * repeats <= n:
        return False
    bits = np.asarray(arr.to_numpy(zero_copy_only=False)).view(
        np.uint32 if arr.type == pa.float32() else np.uint64
    )
    adjacent = int(np.count_nonzero(bits[stride:] == bits[:-stride])) if n > stride else 0
    return 2 * adjacent < repeats


def parquet_options(table: pa.Table) -> dict[str, object]:
    """Parquet writer options of every warehouse file, any layout: zstd, and dictionaries where they pay.

    A column of ids, labels or times gets a dictionary, as Parquet's default has it. A float column
    gets one only when most of its values repeat others that zstd would not find next to them
    (:func:`_scattered_repeats`): request-side features in impression rows in the order they were
    joined, say. Embeddings, counters and noise rarely repeat: their dictionary overflows, the writer
    falls back to plain pages but keeps the dictionary page it wrote, and the column takes more than
    its plain bytes (a 64-float embedding of 2,570 users: 973 kB against 658 kB raw); and values that
    repeat the row before (impression rows sorted by request) compress better plain. One rule for
    every layout, so that their sizes compare the layouts alone.
    """
    leaves: list[str] = []

    def walk(path: str, arr: pa.Array, stride: int) -> None:
        t = arr.type
        if pa.types.is_struct(t):
            for field, child in zip(t, arr.flatten(), strict=True):
                walk(f"{path}.{field.name}", child, stride)
        elif pa.types.is_fixed_size_list(t):
            walk(f"{path}.list.element", arr.flatten(), t.list_size)
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            walk(f"{path}.list.element", arr.flatten(), stride)
        elif not pa.types.is_floating(t) or (arr.null_count == 0 and _scattered_repeats(arr, stride)):
            leaves.append(path)

    for name in table.column_names:
        walk(name, _column(table.column(name)), 1)
    return {"compression": "zstd", "use_dictionary": leaves}


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


# --------------------------------------------------------------------------- deduplicated layout

_P1 = np.uint64(0x9E3779B185EBCA87)  # xxHash64's primes: odd, well mixed
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)
_P3 = np.uint64(0x165667B19E3779F9)


def _column(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _words(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """``(n, size)`` uint64 of a feature column's exact bits: a float32 value widened, an int64 as is."""
    col = _column(col)
    values = col.flatten() if pa.types.is_fixed_size_list(col.type) else col
    arr = np.asarray(values.to_numpy(zero_copy_only=False)).reshape(len(col), -1)
    return arr.view(np.uint32).astype(np.uint64) if arr.dtype == np.float32 else arr.view(np.uint64)


def row_keys(columns: Sequence[pa.Array | pa.ChunkedArray]) -> np.ndarray:
    """``(n,)`` uint64 hash of each row's exact bytes across ``columns`` (feature columns).

    An xxHash64-style multiply-rotate per value, vectorised across rows: one pass of a few numpy
    operations per value column, so no loop per row and no copy of the rows into one matrix.
    """
    n = len(columns[0]) if columns else 0
    h = np.full(n, _P3, np.uint64)
    with np.errstate(over="ignore"):
        for col in columns:
            words = _words(col)
            for j in range(words.shape[1]):
                h ^= words[:, j] * _P2
                h = ((h << np.uint64(31)) | (h >> np.uint64(33))) * _P1
        h ^= h >> np.uint64(33)  # final avalanche, so that near rows get far keys
        h *= _P2
        h ^= h >> np.uint64(29)
    return h


def _distinct(
    columns: Sequence[pa.Array | pa.ChunkedArray], group: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Keys of the rows, and the first row of each distinct one, ordered by ``group`` then first seen.

    The side tables keep the versions of one item (of one user) side by side, which the column
    encodings compress better than an order by hash.

    Raises:
        ValueError: Two different rows hashed to one key (never seen; the layout would lose one).

    """
    keys = row_keys(columns)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    rep = first[inverse.ravel()]
    for col in columns:  # every row must hold exactly the bytes of the row its key keeps
        words = _words(col)
        if not np.array_equal(words, words[rep]):
            raise ValueError("two different feature rows share a 64-bit key; write this file request-level")
    return keys, first[np.lexsort((first, group[first]))]


def _list_offsets(lists: pa.Array) -> pa.Array:
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    return pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))


def dedup_tables(table: pa.Table, fs: FeatureSet) -> tuple[pa.Table, dict[DedupTable, pa.Table]]:
    """Split request-level rows into deduplicated rows and their side tables.

    Args:
        table: Request-level rows of ``schema(fs, TableLayout.REQUEST)``.
        fs: Their FeatureSet: its ``changes = "rarely"`` features go to the slow table.

    Returns:
        The rows (``schema(fs, TableLayout.DEDUP)``) and, per side table, its distinct rows
        (``side_schema``); no slow table when ``fs`` declares no slow feature.

    Raises:
        ValueError: A hash collision (see :func:`_distinct`).

    """
    sch = schema(fs, TableLayout.DEDUP)
    items = _column(table.column("items"))
    flat = pc.list_flatten(items)
    item_cols = [flat.field(n) for n in fs.layout(Side.ITEM).names]
    keys, rows = _distinct(item_cols, flat.field("item_id").to_numpy(zero_copy_only=False))
    index = pa.array(rows)
    sides = {
        DedupTable.ITEMS: pa.Table.from_arrays(
            [pa.array(keys[rows]), *(c.take(index) for c in item_cols)],
            schema=side_schema(fs, DedupTable.ITEMS),
        )
    }
    fields = list(dedup_item_struct())
    children = [pa.array(keys) if f.name == ITEM_KEY_FIELD.name else flat.field(f.name) for f in fields]
    struct = pa.StructArray.from_arrays(children, fields=fields)
    lists = pa.ListArray.from_arrays(_list_offsets(items), struct, type=sch.field("items").type)
    columns: dict[str, pa.Array | pa.ChunkedArray] = {"items": lists}
    if slow := slow_names(fs):
        slow_cols = [_column(table.column(n)) for n in slow]
        skeys, srows = _distinct(slow_cols, table.column("user_id").to_numpy())
        sindex = pa.array(srows)
        sides[DedupTable.SLOW] = pa.Table.from_arrays(
            [pa.array(skeys[srows]), *(c.take(sindex) for c in slow_cols)],
            schema=side_schema(fs, DedupTable.SLOW),
        )
        columns[SLOW_KEY_FIELD.name] = pa.array(skeys)
    cols = [_column(columns[f.name] if f.name in columns else table.column(f.name)) for f in sch]
    return pa.Table.from_arrays(cols, schema=sch), sides


def undedup(
    rows: pa.Table | pa.RecordBatch,
    sides: dict[DedupTable, pa.Table],
    request: Sequence[str],
    item: Sequence[str],
) -> pa.RecordBatch:
    """Inverse of :func:`dedup_tables`: request-level columns from deduplicated rows and side tables.

    Args:
        rows: Deduplicated rows, or some of their columns (with the keys of the side columns asked for).
        sides: Side tables of the rows' file, or some of their columns (with their keys).
        request: Top-level columns to return, in this order, each from the rows or the slow table.
        item: Fields of the ``items`` structs to return, in this order, each from the rows' items or
            the items table; no ``items`` column when empty.

    Raises:
        ValueError: A key that its side table lacks, or a column that neither holds.

    """
    names = set(rows.schema.names)
    out: dict[str, pa.Array] = {}
    taken: dict[DedupTable, tuple[pa.Table, pa.Array]] = {}

    def side_column(table: DedupTable, keys: pa.Array, name: str) -> pa.Array:
        if table not in taken:
            side = sides.get(table)
            if side is None:
                raise ValueError(f"no {table.value} side table for the column {name}")
            at = pc.index_in(keys, value_set=_column(side.column(KEY_FIELDS[table].name)))
            if at.null_count:
                raise ValueError(f"{at.null_count} keys missing from the {table.value} side table")
            taken[table] = (side, at)
        side, at = taken[table]
        if name not in side.column_names:
            raise ValueError(f"no column {name}")
        return _column(side.column(name)).take(at)

    for name in request:
        if name in names:
            out[name] = _column(rows.column(name))
        else:
            out[name] = side_column(DedupTable.SLOW, _column(rows.column(SLOW_KEY_FIELD.name)), name)
    if item:
        lists = _column(rows.column("items"))
        flat = pc.list_flatten(lists)
        have = {f.name for f in flat.type}
        children = [
            flat.field(n) if n in have else side_column(DedupTable.ITEMS, flat.field(ITEM_KEY_FIELD.name), n)
            for n in item
        ]
        struct = pa.StructArray.from_arrays(children, names=list(item))
        out["items"] = pa.ListArray.from_arrays(_list_offsets(lists), struct)
    return pa.RecordBatch.from_arrays(list(out.values()), names=list(out))
