"""A streaming reader from a warehouse, any layout, into torch training batches.

Each Parquet file is opened on its own and read row group by row group, with column projection: the
request id, the features the FeatureSet derives, the item position and the click and like labels, and
nothing else (inside request-level rows too: only those fields of the ``items`` structs), so a large
warehouse is never loaded whole and unused columns are never read. The ranker's logged scores are read
only when asked for (``logged_scores=True``, for off-policy evaluation or to compare a model with the
logged one): they are not a feature, and no model input is built from them. Record batches become tensors
column by column: features through :func:`~leanrec.warehouse.tables.arrays_block`, the items of
request-level rows through ``list_flatten`` and ``list_parent_indices``. There is no Python loop per
row.

A deduplicated file reads as the request-level rows it was split from: its side tables (only the
columns asked for) are read once when the file is opened, and each record batch of its request rows
takes its item features and slow request features from them by key (``pc.index_in`` and ``take``).

Files can be split across data-parallel ranks with :func:`shard`; :class:`ReadStats` counts the
compressed bytes of the column chunks read, so the two layouts can be compared by what they cost to
read.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from leanrec.schema import FeatureSet, Side
from leanrec.warehouse.store import (
    SideCache,
    WarehouseError,
    _files,
    _open_fs,
    _Opened,
    check_readable,
    layout_of,
    projection,
    read_sides,
    written_featureset,
)
from leanrec.warehouse.tables import SCORE_FIELD, TableLayout, arrays_block, undedup, with_scores

LABEL_COLUMNS = ("click", "like")
"""Labels a batch carries, as float 0/1."""


@dataclass
class Batch:
    """One training batch. Request-level: R requests and their N items; impression-level: R == N.

    Attributes:
        req_floats: ``(R, request_layout.float_width)`` float32.
        req_ints: ``(R, request_layout.int_width)`` int64 (``PAD_ID`` = -1 kept as is).
        item_floats: ``(N, item_layout.float_width)`` float32.
        item_ints: ``(N, item_layout.int_width)`` int64.
        item_request: ``(N,)`` int64: the row of ``req_*`` each item belongs to.
        click: ``(N,)`` float32 0/1.
        like: ``(N,)`` float32 0/1.
        request_ids: R request ids (impression-level: one per row, so repeated across a request's items).
        positions: ``(N,)`` int64 position of each item in its request's feed.
        scores: ``(N,)`` float32 the score the ranker gave each item when it was logged (NaN where
            it gave none, or the file predates scores), when the reader was asked for them; else
            None. Not a model input.

    """

    req_floats: torch.Tensor
    req_ints: torch.Tensor
    item_floats: torch.Tensor
    item_ints: torch.Tensor
    item_request: torch.Tensor
    click: torch.Tensor
    like: torch.Tensor
    request_ids: list[str]
    positions: torch.Tensor
    scores: torch.Tensor | None = None

    @staticmethod
    def concat(batches: Sequence[Batch]) -> Batch:
        """One batch of all requests and items of ``batches`` (request rows renumbered)."""
        offsets = np.cumsum([0, *(b.n_requests for b in batches[:-1])])
        scores = [b.scores for b in batches if b.scores is not None]  # kept only if every batch has them
        return Batch(
            req_floats=torch.cat([b.req_floats for b in batches]),
            req_ints=torch.cat([b.req_ints for b in batches]),
            item_floats=torch.cat([b.item_floats for b in batches]),
            item_ints=torch.cat([b.item_ints for b in batches]),
            item_request=torch.cat([b.item_request + int(o) for b, o in zip(batches, offsets, strict=True)]),
            click=torch.cat([b.click for b in batches]),
            like=torch.cat([b.like for b in batches]),
            request_ids=[r for b in batches for r in b.request_ids],
            positions=torch.cat([b.positions for b in batches]),
            scores=torch.cat(scores) if len(scores) == len(batches) else None,
        )

    @property
    def n_requests(self) -> int:
        """R: rows of the request side."""
        return self.req_floats.shape[0]

    @property
    def n_items(self) -> int:
        """N: examples (viewed items)."""
        return self.item_floats.shape[0]


@dataclass
class ReadStats:
    """What a reader has read; pass one to :func:`iter_batches` and it accumulates across calls.

    Attributes:
        bytes_read: Compressed bytes of the column chunks read (projected columns of the row groups
            read, from the Parquet metadata).
        files: Files opened for reading.
        row_groups: Row groups read.
        rows: Parquet rows read (requests when request-level, impressions when impression-level).
        examples: Items yielded in batches.
        batches: Batches yielded.

    """

    bytes_read: int = 0
    files: int = 0
    row_groups: int = 0
    rows: int = 0
    examples: int = 0
    batches: int = 0


def warehouse_files(uri: str) -> list[str]:
    """Sorted paths of the committed Parquet files of a warehouse (hidden temporary files left out).

    Raises:
        WarehouseError: The path is missing, not a folder, or holds no Parquet files.

    """
    _, infos = _files(str(uri))
    if not infos:
        raise WarehouseError(f"warehouse {uri} holds no Parquet files")
    return sorted(f.path for f in infos)


def shard(files: Sequence[str], rank: int, world_size: int) -> list[str]:
    """The files of one data-parallel rank: every ``world_size``-th file of the sorted list.

    Every rank computes the same partition whatever the order ``files`` come in; each file goes to
    exactly one rank (a rank may get none when there are fewer files than ranks).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return sorted(files)[rank::world_size]


def iter_batches(
    uri: str,
    fs: FeatureSet,
    layout: TableLayout | None = None,
    batch_requests: int = 256,
    batch_impressions: int = 2048,
    files: list[str] | None = None,
    shuffle_seed: int | None = None,
    stats: ReadStats | None = None,
    by_request: bool = False,
    logged_scores: bool = False,
) -> Iterator[Batch]:
    """Stream a warehouse as training batches.

    The warehouse and its first file are checked when this is called; the other files as they are
    opened.

    Args:
        uri: Warehouse folder or URI (either layout).
        fs: The FeatureSet to read; the files must have been written under one it reads: itself or
            an earlier version of its lineage that it retired features from (``FeatureSet.reads``).
            Files of several such versions may be mixed; only ``fs``'s columns are read.
        layout: Expected layout; autodetected from the file metadata when None.
        batch_requests: Requests per request-level batch (the last batch may hold fewer).
        batch_impressions: Rows per impression-level batch (the last batch may hold fewer).
        files: Read only these files (e.g. ``shard(warehouse_files(uri), rank, world_size)``), in
            this order; default: every committed file, sorted by path.
        shuffle_seed: Shuffle the order of files, of row groups within a file and of rows within each
            record batch read (requests as units when request-level), deterministically.
        stats: Accumulates bytes, row groups, rows and batches read.
        by_request: Batches of ``batch_requests`` whole requests in either layout, in an order that
            depends only on the requests (a seeded hash of their ids) and not on how they are laid
            out: a request-level and an impression-level warehouse of the same examples then give
            the same examples in the same batches, so training on them can be compared one to one.
            Reads one file at a time whole (a file holds one warehouse flush).
        logged_scores: Also read the ``score`` column into ``Batch.scores`` (NaN for files written
            before scores were kept). Off by default: training does not read it.

    Raises:
        WarehouseError: The path is missing or holds no Parquet files; a file is not a leanrec
            warehouse file, is of another layout than expected, or was written under a FeatureSet of
            another lineage, a newer version or other feature shapes.

    """
    if batch_requests < 1 or batch_impressions < 1:
        raise ValueError(f"batch sizes must be at least 1, got {batch_requests} and {batch_impressions}")
    filesystem, root = _open_fs(str(uri))
    if files is None:
        paths = warehouse_files(uri)
    else:
        if filesystem.get_file_info(root).type == pafs.FileType.NotFound:
            raise WarehouseError(f"warehouse path {uri} does not exist")
        paths = list(files)
    stats = stats if stats is not None else ReadStats()
    if not paths:
        return iter(())
    with _Opened(filesystem, paths[0]) as pf:
        found = _check_file(paths[0], pf, fs)
    if layout is not None and found is not layout:
        raise WarehouseError(f"warehouse {uri} is {found.value}-level, expected {layout.value}-level")
    if by_request:
        return _by_request(
            filesystem, paths, fs, found, batch_requests, shuffle_seed or 0, stats, logged_scores
        )
    size = batch_impressions if found is TableLayout.IMPRESSION else batch_requests
    return _generate(filesystem, paths, fs, found, size, shuffle_seed, stats, logged_scores)


# --------------------------------------------------------------------------- internals


def _generate(
    filesystem: pafs.FileSystem,
    paths: list[str],
    fs: FeatureSet,
    layout: TableLayout,
    size: int,
    shuffle_seed: int | None,
    stats: ReadStats,
    scores: bool,
) -> Iterator[Batch]:
    rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    order = [paths[i] for i in rng.permutation(len(paths))] if rng is not None else paths
    cache = SideCache()
    record_batches = (
        rb
        for path in order
        for rb in _read_file(filesystem, path, fs, layout, size, rng, stats, scores, cache)
    )
    for table in _rebatch(record_batches, size):
        batch = _to_batch(table, fs, layout, scores)
        stats.examples += batch.n_items
        stats.batches += 1
        yield batch


def _check_file(path: str, pf: pq.ParquetFile, fs: FeatureSet) -> TableLayout:
    """The layout of a file, after checking that ``fs`` reads what it was written under.

    That is ``fs`` itself or an earlier version of its lineage that ``fs`` retired features from
    (``FeatureSet.reads``); the retired columns are then simply not read.
    """
    meta = pf.schema_arrow.metadata
    check_readable(path, written_featureset(path, meta), fs)
    return layout_of(path, meta)


def _names(fs: FeatureSet, scores: bool) -> tuple[list[str], list[str]]:
    """Request columns and item columns (or ``items`` fields) a batch is built from."""
    request = ["request_id", *fs.layout(Side.REQUEST).names]
    item = ["position", *fs.layout(Side.ITEM).names, *LABEL_COLUMNS]
    return request, item + ([SCORE_FIELD.name] if scores else [])


def _projection(
    path: str, pf: pq.ParquetFile, fs: FeatureSet, layout: TableLayout, scores: bool
) -> tuple[list[str], list[int]]:
    """Column paths to read, and the indices of the Parquet leaf columns they cover."""
    request, item = _names(fs, scores)
    return projection(path, pf, request, item, layout, optional=(SCORE_FIELD.name,))


def _request_order(table: pa.Table, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: a seeded hash of its request id, and the id's rank (to break hash ties)."""
    enc = pc.dictionary_encode(_column(table.column("request_id")))
    ids = enc.dictionary.to_pylist()  # one entry per request, not per row
    hashed = np.fromiter((zlib.crc32(f"{seed}:{r}".encode()) for r in ids), np.int64, len(ids))
    rank = np.argsort(np.argsort(np.array(ids, dtype=object), kind="stable"), kind="stable")
    idx = _numpy(enc.indices, np.int64)
    return hashed[idx], rank[idx]


def _by_request(
    filesystem: pafs.FileSystem,
    paths: list[str],
    fs: FeatureSet,
    layout: TableLayout,
    batch_requests: int,
    seed: int,
    stats: ReadStats,
    scores: bool,
) -> Iterator[Batch]:
    firsts = []
    for path in paths:  # files in order of the first request they hold: the same in both layouts
        with _Opened(filesystem, path) as pf:
            firsts.append(pc.min(pf.read(columns=["request_id"]).column("request_id")).as_py() or "")
    cache = SideCache()
    for path in [p for _, p in sorted(zip(firsts, paths, strict=True))]:
        tables = [
            pa.Table.from_batches([rb])
            for rb in _read_file(filesystem, path, fs, layout, 1 << 20, None, stats, scores, cache)
        ]
        if not tables:
            continue
        table = pa.concat_tables(tables)
        hashed, rank = _request_order(table, seed)
        position = (
            _numpy(table.column("position"), np.int64)
            if layout is TableLayout.IMPRESSION
            else np.zeros(table.num_rows, np.int64)
        )
        order = np.lexsort((position, rank, hashed))
        table = table.take(pa.array(order))
        hashed, rank = hashed[order], rank[order]
        new_request = np.r_[True, (hashed[1:] != hashed[:-1]) | (rank[1:] != rank[:-1])]
        chunk = (np.cumsum(new_request) - 1) // batch_requests
        cuts = np.r_[0, np.flatnonzero(np.diff(chunk)) + 1, table.num_rows]
        for a, b in itertools.pairwise(cuts):
            batch = _to_batch(table.slice(a, b - a), fs, layout, scores)
            stats.examples += batch.n_items
            stats.batches += 1
            yield batch


def _read_file(
    filesystem: pafs.FileSystem,
    path: str,
    fs: FeatureSet,
    layout: TableLayout,
    size: int,
    rng: np.random.Generator | None,
    stats: ReadStats,
    scores: bool,
    cache: SideCache,
) -> Iterator[pa.RecordBatch]:
    """Record batches of the projected columns of one file, row group by row group.

    With ``scores``, a file written before scores were kept gets a column of nulls, so its batches
    concatenate with those of newer files. A deduplicated file's side tables are its partition's,
    read once into ``cache`` for all its files.
    """
    with _Opened(filesystem, path) as pf:
        found = _check_file(path, pf, fs)
        if found is not layout:
            raise WarehouseError(
                f"{path} is {found.value}-level; the files before it are {layout.value}-level"
            )
        sides = None
        if layout is TableLayout.DEDUP:
            request, item = _names(fs, scores)
            sides, req_cols, item_cols, side_bytes = read_sides(filesystem, path, pf, request, item, cache)
            columns, leaves = projection(path, pf, req_cols, item_cols, TableLayout.REQUEST)
            stats.bytes_read += side_bytes
            top = [*request, "items"]
        else:
            columns, leaves = _projection(path, pf, fs, layout, scores)
            top = list(dict.fromkeys(c.split(".")[0] for c in columns))
        stats.files += 1
        groups = np.arange(pf.num_row_groups)
        if rng is not None:
            rng.shuffle(groups)
        for g in groups.tolist():
            meta = pf.metadata.row_group(g)
            if meta.num_rows == 0:
                continue
            stats.bytes_read += sum(meta.column(i).total_compressed_size for i in leaves)
            stats.row_groups += 1
            for rb in pf.iter_batches(batch_size=size, row_groups=[g], columns=columns):
                if sides is not None:  # the request-level rows the deduplicated ones were split from
                    try:
                        rb = undedup(rb, sides, request, item)
                    except ValueError as exc:
                        raise WarehouseError(f"{path}: {exc}") from None
                rb = rb.select(top)  # one column order whatever the file's, so batches of files concatenate
                if scores:
                    rb = with_scores(rb, layout)
                if rng is not None:
                    rb = rb.take(pa.array(rng.permutation(rb.num_rows)))
                stats.rows += rb.num_rows
                yield rb


def _rebatch(record_batches: Iterator[pa.RecordBatch], size: int) -> Iterator[pa.Table]:
    """Tables of exactly ``size`` rows (the last may hold fewer), across row groups and files."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for rb in record_batches:
        if rb.num_rows == 0:
            continue
        if pending and not rb.schema.equals(pending[0].schema):
            try:
                rb = rb.cast(pending[0].schema)
            except (pa.ArrowException, ValueError) as exc:
                raise WarehouseError(f"warehouse files of incompatible column types: {exc}") from None
        pending.append(rb)
        count += rb.num_rows
        while count >= size:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, size)
            rest = table.slice(size)
            pending, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(pending)


def _column(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _numpy(col: pa.Array | pa.ChunkedArray, dtype: type) -> np.ndarray:
    return np.asarray(_column(col).to_numpy(zero_copy_only=False)).astype(dtype)


def _to_batch(table: pa.Table, fs: FeatureSet, layout: TableLayout, scores: bool) -> Batch:
    """Whole columns to tensors (the logged scores too, with ``scores``: NaN where null)."""
    r = table.num_rows
    cols = {name: table.column(name) for name in table.column_names}
    req = arrays_block(fs.layout(Side.REQUEST), cols, r)
    if layout is not TableLayout.IMPRESSION:
        items = _column(table.column("items"))
        flat = pc.list_flatten(items)
        item_cols: dict[str, pa.Array | pa.ChunkedArray] = {f.name: flat.field(f.name) for f in flat.type}
        n = len(flat)
        parent = _numpy(pc.list_parent_indices(items), np.int64)
    else:
        item_cols, n = cols, r
        parent = np.arange(n, dtype=np.int64)
    item = arrays_block(fs.layout(Side.ITEM), item_cols, n)
    return Batch(
        req_floats=torch.from_numpy(req.floats),
        req_ints=torch.from_numpy(req.ints.astype(np.int64)),
        item_floats=torch.from_numpy(item.floats),
        item_ints=torch.from_numpy(item.ints.astype(np.int64)),
        item_request=torch.from_numpy(parent),
        click=torch.from_numpy(_numpy(item_cols["click"], np.float32)),
        like=torch.from_numpy(_numpy(item_cols["like"], np.float32)),
        request_ids=table.column("request_id").to_pylist(),
        positions=torch.from_numpy(_numpy(item_cols["position"], np.int64)),
        scores=torch.from_numpy(_numpy(pc.fill_null(_column(item_cols["score"]), np.nan), np.float32))
        if scores
        else None,
    )
