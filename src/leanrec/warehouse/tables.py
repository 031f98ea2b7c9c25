"""Arrow schemas of the warehouse layouts, derived from the FeatureSet, and conversions.

- Request-level (default): one row per request; request-side features once; ``items`` is a list of
  structs, one per viewed item, with its position, id, first-view time, the ranker's score, features
  and labels.
- Impression-level (baseline): one row per viewed item; request-side columns repeated in each.
- Deduplicated: request-level rows in which a key stands for the user's features and one for each
  viewed item's. Each owner's features fall into groups by how often they change (``Feature.changes``):
  an item's counters and its embedding, a user's recent history and their long-term profile. Each
  group's distinct rows are stored once in a side table of the partition, keyed by a 64-bit hash of
  their exact bytes, and a faster group's row holds the key of its owner's slower one; an item viewed
  in many requests, a user's embeddings across their requests, are stored once
  (:func:`dedup_tables`, :func:`undedup`).

``score`` is the score the ranker gave the item at its position, as logged with its features: not a
feature (no model reads it as an input), kept for off-policy evaluation and for comparing a new model
with the logged one. It is null where the ranker gave none; files written before it was kept have
no such column, and readers give nulls for them (:func:`with_scores`).

A feature of size 1 is a scalar column; a wider one is a fixed-size list. Everything here works on
whole columns: no loop per row or per value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import StrEnum

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from leanrec.events.model import LABELS
from leanrec.schema import Feature, FeatureBlock, FeatureSet, Layout, Owner, Side
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
    """The side tables of a deduplicated warehouse partition, each of the distinct rows of one group.

    A group is an owner's features that change at one rate (``Feature.changes``). A faster group's
    row holds the key of its owner's slower row, so a request row or an item holds one key, however
    many groups its features fall into.
    """

    USERS = "users"
    """User features that may change from one request to the next, keyed by ``user_key``."""
    SLOW = "slow"
    """The request's slowly changing features (user or context), keyed by ``slow_key``."""
    ITEMS = "items"
    """Item features that may change from one request to the next, keyed by ``item_key``."""
    ITEMS_SLOW = "items_slow"
    """Slowly changing item features, keyed by ``item_slow_key``."""


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
KEY_FIELDS = {
    DedupTable.USERS: pa.field("user_key", pa.uint64(), nullable=False),
    DedupTable.SLOW: pa.field("slow_key", pa.uint64(), nullable=False),
    DedupTable.ITEMS: pa.field("item_key", pa.uint64(), nullable=False),
    DedupTable.ITEMS_SLOW: pa.field("item_slow_key", pa.uint64(), nullable=False),
}
"""Deduplicated layout: the column of each side table's key, a 64-bit hash of its row's exact bytes."""
CHAINS = {
    Side.REQUEST: (DedupTable.USERS, DedupTable.SLOW),
    Side.ITEM: (DedupTable.ITEMS, DedupTable.ITEMS_SLOW),
}
"""Each side's groups, fastest first: a row of one holds the key of the next (where both exist)."""
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


ENTITY_IDS = {Side.REQUEST: "user_id", Side.ITEM: "item_id"}
"""The id of each side's entity: in the deduplicated layout, a column of its slowest group."""


def dedup_groups(fs: FeatureSet, side: Side) -> list[tuple[DedupTable, list[str]]]:
    """The deduplicated groups of one side that hold features, fastest first, with their columns.

    Request side: the user features that may change per request, then the slowly changing user and
    context features; context features that change per request stay in the request row. Item side:
    the features that may change per request, then the slowly changing ones. The entity's id
    (:data:`ENTITY_IDS`) joins the slowest group: it never changes, and a key then stands for it.
    """
    slots = [s.feature for s in fs.layout(side).slots]
    if side is Side.REQUEST:
        fast = [f.name for f in slots if f.owner is Owner.USER and not f.rarely]
    else:
        fast = [f.name for f in slots if not f.rarely]
    groups = zip(CHAINS[side], (fast, [f.name for f in slots if f.rarely]), strict=True)
    out = [(table, names) for table, names in groups if names]
    if out:
        out[-1][1].insert(0, ENTITY_IDS[side])
    return out


def _grouped(fs: FeatureSet, side: Side) -> set[str]:
    return {n for _, names in dedup_groups(fs, side) for n in names}


def _row_key(fs: FeatureSet, side: Side) -> list[pa.Field]:
    """The key a request row (or a viewed item) holds: its fastest group's, if it has any group."""
    groups = dedup_groups(fs, side)
    return [KEY_FIELDS[groups[0][0]]] if groups else []


def dedup_item_struct(fs: FeatureSet) -> pa.StructType:
    """Type of one viewed item inside a deduplicated row: a key stands for its id and features."""
    grouped = _grouped(fs, Side.ITEM)
    meta = [f for f in ITEM_META_FIELDS if f.name not in grouped]
    return pa.struct([*meta, SCORE_FIELD, *_row_key(fs, Side.ITEM), *LABEL_FIELDS])


def schema(fs: FeatureSet, layout: TableLayout) -> pa.Schema:
    """Arrow schema of a warehouse layout, with the FeatureSet in its metadata.

    Deduplicated, this is the schema of the request files; :func:`side_schema` gives their side tables'.
    """
    req = _fields(fs.layout(Side.REQUEST))
    if layout is TableLayout.REQUEST:
        fields = [*META_FIELDS, *req, pa.field("items", pa.list_(item_struct(fs)), nullable=False)]
    elif layout is TableLayout.DEDUP:
        grouped = _grouped(fs, Side.REQUEST)
        fields = [
            *(f for f in (*META_FIELDS, *req) if f.name not in grouped),
            *_row_key(fs, Side.REQUEST),
            pa.field("items", pa.list_(dedup_item_struct(fs)), nullable=False),
        ]
    else:
        fields = [*META_FIELDS, *req, *_item_fields(fs)]
    return pa.schema(
        fields, metadata={FEATURESET_KEY: fs.to_json().encode(), LAYOUT_KEY: layout.value.encode()}
    )


def side_schema(fs: FeatureSet, table: DedupTable) -> pa.Schema:
    """Arrow schema of a side table of the deduplicated layout: its key, its features, the next key.

    The next key is that of its owner's slower group (see :data:`CHAINS`), where there is one. Its
    metadata names the layout and the table; the FeatureSet is in the request files' metadata, which
    are read first, and is not repeated (a few kB per file), nor are the types, which it gives.

    Raises:
        ValueError: ``fs`` has no feature in that table's group.

    """
    side = next(s for s, chain in CHAINS.items() if table in chain)
    groups = dedup_groups(fs, side)
    at = next((i for i, (t, _) in enumerate(groups) if t is table), None)
    if at is None:
        raise ValueError(f"the FeatureSet has no feature of the {table.value} side table")
    ids = {f.name: f for f in (*META_FIELDS, *ITEM_META_FIELDS)}
    features = [ids[name] if name in ids else feature_field(fs[name]) for name in groups[at][1]]
    following = [KEY_FIELDS[groups[at + 1][0]]] if at + 1 < len(groups) else []
    meta = {LAYOUT_KEY: TableLayout.DEDUP.value.encode(), SIDE_KEY: table.value.encode()}
    return pa.schema([KEY_FIELDS[table], *features, *following], metadata=meta)


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
        elif pa.types.is_floating(t):
            if arr.null_count == 0 and _scattered_repeats(arr, stride):
                leaves.append(path)
        elif pa.types.is_integer(t) and len(arr) > 2 * pc.count_distinct(arr).as_py():
            leaves.append(path)  # an id or a label that repeats; times, keys and counters go plain
        elif not pa.types.is_integer(t):
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


def _dedup_groups(
    fs: FeatureSet, side: Side, column: Callable[[str], pa.Array], entity: np.ndarray
) -> tuple[np.ndarray | None, dict[DedupTable, pa.Table]]:
    """Deduplicate one side's groups, slowest first, so that each faster row can hold the slower key.

    Args:
        fs: The FeatureSet.
        side: Request or item side.
        column: A feature's column, one value per row (request) or per viewed item.
        entity: ``(n,)`` the user or item id of each row, to keep an entity's versions side by side.

    Returns:
        ``(n,)`` uint64 keys of the fastest group (``None`` if the side has no group), and each
        group's table of distinct rows.

    """
    sides: dict[DedupTable, pa.Table] = {}
    keys: np.ndarray | None = None
    for table, names in reversed(dedup_groups(fs, side)):
        cols = [_column(column(n)) for n in names]
        if keys is not None:
            cols.append(pa.array(keys))
        table_keys, rows = _distinct(cols, entity)
        index = pa.array(rows)
        sides[table] = pa.Table.from_arrays(
            [pa.array(table_keys[rows]), *(c.take(index) for c in cols)], schema=side_schema(fs, table)
        )
        keys = table_keys
    return keys, sides


def dedup_tables(table: pa.Table, fs: FeatureSet) -> tuple[pa.Table, dict[DedupTable, pa.Table]]:
    """Split request-level rows into deduplicated rows and their side tables.

    Args:
        table: Request-level rows of ``schema(fs, TableLayout.REQUEST)``.
        fs: Their FeatureSet: its groups (:func:`dedup_groups`) give the side tables.

    Returns:
        The rows (``schema(fs, TableLayout.DEDUP)``) and, per side table of ``fs``, the distinct rows
        of its group in ``table`` (``side_schema``).

    Raises:
        ValueError: A hash collision (see :func:`_distinct`).

    """
    sch = schema(fs, TableLayout.DEDUP)
    items = _column(table.column("items"))
    flat = pc.list_flatten(items)
    item_keys, sides = _dedup_groups(fs, Side.ITEM, flat.field, flat.field("item_id").to_numpy())
    request_keys, request_sides = _dedup_groups(
        fs, Side.REQUEST, table.column, table.column("user_id").to_numpy()
    )
    sides.update(request_sides)
    have = {f.name for f in flat.type}
    fields = list(dedup_item_struct(fs))
    children = [flat.field(f.name) if f.name in have else pa.array(item_keys) for f in fields]
    struct = pa.StructArray.from_arrays(children, fields=fields)
    columns: dict[str, pa.Array | pa.ChunkedArray] = {
        "items": pa.ListArray.from_arrays(_list_offsets(items), struct, type=sch.field("items").type)
    }
    if request_keys is not None:
        columns[_row_key(fs, Side.REQUEST)[0].name] = pa.array(request_keys)
    cols = [_column(columns[f.name] if f.name in columns else table.column(f.name)) for f in sch]
    return pa.Table.from_arrays(cols, schema=sch), sides


def _resolver(
    sides: dict[DedupTable, pa.Table], chain: Sequence[DedupTable], base: Callable[[str], pa.Array | None]
) -> Callable[[str], pa.Array]:
    """A column getter for one side: from ``base`` (the rows, or the viewed items) or its side tables.

    A side table's rows are found by the key that ``base`` holds, or else that the faster table
    before it in ``chain`` holds; each table is looked up once.
    """
    found: dict[DedupTable, pa.Array] = {}

    def index(table: DedupTable) -> pa.Array:
        if table not in found:
            name = KEY_FIELDS[table].name
            keys = base(name)
            if keys is None:
                at = chain.index(table)
                if at == 0 or chain[at - 1] not in sides:
                    raise ValueError(f"no key of the {table.value} side table")
                keys = take(chain[at - 1], name)
            side = sides[table]
            rows = pc.index_in(keys, value_set=_column(side.column(name)))
            if rows.null_count:
                raise ValueError(f"{rows.null_count} keys missing from the {table.value} side table")
            found[table] = rows
        return found[table]

    def take(table: DedupTable, name: str) -> pa.Array:
        return _column(sides[table].column(name)).take(index(table))

    def get(name: str) -> pa.Array:
        values = base(name)
        if values is not None:
            return values
        for table in chain:
            if table in sides and name in sides[table].column_names:
                return take(table, name)
        raise ValueError(f"no column {name} in the rows or their side tables")

    return get


def undedup(
    rows: pa.Table | pa.RecordBatch,
    sides: dict[DedupTable, pa.Table],
    request: Sequence[str],
    item: Sequence[str],
) -> pa.RecordBatch:
    """Inverse of :func:`dedup_tables`: request-level columns from deduplicated rows and side tables.

    Args:
        rows: Deduplicated rows, or some of their columns (with the keys of the side columns asked for).
        sides: Side tables holding the rows' keys (a partition's, or a file's), or some of their
            columns (with their keys, and the keys of the slower tables asked for through them).
        request: Top-level columns to return, in this order, each from the rows or a side table.
        item: Fields of the ``items`` structs to return, in this order, each from the rows' items or
            a side table; no ``items`` column when empty.

    Raises:
        ValueError: A key that its side table lacks, or a column that none holds.

    """
    names = set(rows.schema.names)
    get = _resolver(sides, CHAINS[Side.REQUEST], lambda n: _column(rows.column(n)) if n in names else None)
    out = {name: get(name) for name in request}
    if item:
        lists = _column(rows.column("items"))
        flat = pc.list_flatten(lists)
        have = {f.name for f in flat.type}
        get_item = _resolver(sides, CHAINS[Side.ITEM], lambda n: flat.field(n) if n in have else None)
        struct = pa.StructArray.from_arrays([get_item(n) for n in item], names=list(item))
        out["items"] = pa.ListArray.from_arrays(_list_offsets(lists), struct)
    return pa.RecordBatch.from_arrays(list(out.values()), names=list(out))
