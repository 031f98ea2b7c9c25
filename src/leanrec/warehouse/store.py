"""The Warehouse: Parquet datasets of joined records, request-level, impression-level or deduplicated.

Files are zstd-compressed Parquet (dictionaries for all but float columns) under Hive-style
partitions (``dt=YYYY-MM-DD/hour=HH/``) of the request time. Each file is written under a hidden
temporary name and renamed into place, so a reader (pyarrow, DuckDB, Spark) never sees half a file.
The path may be a local folder or any URI that ``pyarrow.fs`` opens (``s3://…``, ``gs://…``).

A deduplicated file ``part-X.parquet`` has its side tables beside it, ``_part-X.<table>.parquet``
for the groups of features its FeatureSet has (``users``, ``slow``, ``items``, ``items_slow``; see
:mod:`leanrec.warehouse.tables`): plain Parquet files, since a Parquet file holds one table, so any
engine reads each and joins them on their keys. A side file holds only the rows its partition's
committed side files lack: the side tables of a partition are the union of its side files, and a
distinct row is stored once per partition (once per writer, where several write one partition), not
once per file. Their names start with ``_``, which pyarrow's and Spark's dataset discovery skip, so a
folder of request files reads as one dataset. They are written and renamed into place before their
request file, whose rename commits them: a reader never meets a request file whose rows are missing,
and side files left by a writer that stopped before its request file's rename are never read. A
partition is kept or dropped whole: a file's rows may live in the side files of the files before it.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from leanrec.energy.ledger import CostLedger
from leanrec.errors import InputError
from leanrec.schema import FeatureSet, Side
from leanrec.warehouse.records import RequestRecord
from leanrec.warehouse.tables import (
    CHAINS,
    FEATURESET_KEY,
    KEY_FIELDS,
    LAYOUT_KEY,
    META_FIELDS,
    SCORE_FIELD,
    DedupTable,
    TableLayout,
    dedup_tables,
    item_struct,
    parquet_options,
    records_table,
    request_to_impression,
    schema,
    side_schema,
    undedup,
    with_scores,
)

KNOWN_PARTITIONS = 4
"""Partitions whose side table keys a deduplicated writer keeps in memory (a late record's older
partition has its keys read again from its files)."""


class WarehouseError(InputError, ValueError):
    """A warehouse path or file that cannot be used, with the reason."""


@runtime_checkable
class Warehouse(Protocol):
    """Append joined records; read them back as a table."""

    def append(self, records: Sequence[RequestRecord]) -> None:
        """Buffer records; they are committed by ``flush`` (or when the buffer is full)."""
        ...

    def flush(self) -> list[str]:
        """Commit buffered records; returns the paths of the committed files."""
        ...

    def read(self) -> pa.Table:
        """Every committed record, in this warehouse's layout."""
        ...

    def bytes_stored(self) -> int:
        """Size of the committed files."""
        ...


def _open_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError):
        return pafs.LocalFileSystem(), str(uri)


class ParquetWarehouse:
    """A Parquet warehouse in one layout, at one path.

    Args:
        uri: Local folder or a URI ``pyarrow.fs`` opens.
        fs: The FeatureSet whose columns the files hold.
        layout: Request-level (default), impression-level or deduplicated.
        ledger: Charged for building tables and writing files.
        flush_rows: Buffered requests that trigger a commit.

    """

    def __init__(
        self,
        uri: str,
        fs: FeatureSet,
        layout: TableLayout = TableLayout.REQUEST,
        ledger: CostLedger | None = None,
        flush_rows: int = 2_000,
    ) -> None:
        self.uri, self.featureset, self.layout = str(uri), fs, layout
        self.filesystem, self.root = _open_fs(self.uri)
        self.ledger = ledger or CostLedger()
        self.flush_rows = flush_rows
        self.schema = schema(fs, layout)
        self._buffer: list[RequestRecord] = []
        self._files: list[str] = []
        self._known = KnownPartitions(self.filesystem)  # deduplicated: each partition's side table keys
        try:
            self.filesystem.create_dir(self.root, recursive=True)
        except OSError as exc:
            raise WarehouseError(
                f"cannot create the warehouse folder {uri}: {exc.strerror or exc}; "
                "give a folder that can be written"
            ) from None

    def append(self, records: Sequence[RequestRecord]) -> None:
        """Buffer; commit when the buffer holds ``flush_rows`` requests."""
        self._buffer.extend(records)
        if len(self._buffer) >= self.flush_rows:
            self.flush()

    def flush(self) -> list[str]:
        """Write the buffer as one file per partition, each renamed into place when complete."""
        if not self._buffer:
            return []
        records, self._buffer = self._buffer, []
        with self.ledger.cpu("warehouse_write") as cost:
            # Deduplicated files are request-level rows split into their tables, file by file.
            built = TableLayout.REQUEST if self.layout is TableLayout.DEDUP else self.layout
            table = records_table(self.featureset, records, built)
            hours = table.column("ts_ms").to_numpy() // 3_600_000
            written = []
            for hour in np.unique(hours):
                part = table.filter(pa.array(hours == hour))
                when = datetime.fromtimestamp(int(hour) * 3600, UTC)
                folder = f"{self.root}/dt={when:%Y-%m-%d}/hour={when:%H}"
                name = f"part-{uuid.uuid4().hex[:16]}.parquet"
                final = f"{folder}/{name}"
                if self.layout is TableLayout.DEDUP:
                    known = self._known.of(folder)
                    sizes = write_dedup(self.filesystem, final, part, self.featureset, known)
                else:
                    sizes = [_write(self.filesystem, final, part)]
                cost.ops += len(sizes)
                cost.bytes_written += sum(sizes)
                written.append(final)
        self._files.extend(written)
        return written

    def committed(self, request_ids: Sequence[str]) -> set[str]:
        """Which of ``request_ids`` are in committed files (read from the request_id column only).

        Used when a joiner takes over records after a crash: a request committed before the crash
        must not be written again.
        """
        want = set(request_ids)
        if not want:
            return set()
        try:
            filesystem, files = _files(self.uri)
        except WarehouseError:
            return set()
        if not files:
            return set()
        dataset = ds.dataset([f.path for f in files], filesystem=filesystem, format="parquet")
        ids = dataset.to_table(columns=["request_id"], filter=ds.field("request_id").isin(list(want)))
        return set(ids.column("request_id").to_pylist())

    @property
    def files(self) -> list[str]:
        """Paths of the files this writer committed."""
        return list(self._files)

    def read(self) -> pa.Table:
        """All committed files of this warehouse (a deduplicated one as request-level rows)."""
        return read_table(self.uri, self.featureset, self.layout)

    def read_examples(self) -> pa.Table:
        """Every committed example as an impression row, sorted by request id and position.

        The same view of either layout, so the two can be compared row for row. Each row holds the
        ranker's ``score`` of its item (null where there is none, as in files written before scores
        were kept).
        """
        table = self.read()
        if self.layout is not TableLayout.IMPRESSION:
            table = request_to_impression(table, self.featureset)
        return table.sort_by([("request_id", "ascending"), ("position", "ascending")])

    def bytes_stored(self) -> int:
        """Size of every Parquet file under the path (side tables included)."""
        return warehouse_bytes(self.uri)


class _Opened:
    """Open a Parquet file of a warehouse as a context manager, turning I/O errors into WarehouseError."""

    def __init__(self, filesystem: pafs.FileSystem, path: str) -> None:
        try:
            self.source = filesystem.open_input_file(path)
        except FileNotFoundError:
            raise WarehouseError(f"warehouse file {path} does not exist") from None
        except OSError as exc:
            raise WarehouseError(f"cannot open warehouse file {path}: {exc}") from None
        try:
            self.file = pq.ParquetFile(self.source)
        except (pa.ArrowException, OSError) as exc:
            self.source.close()
            raise WarehouseError(f"{path} is not a readable Parquet file: {exc}") from None

    def __enter__(self) -> pq.ParquetFile:
        return self.file

    def __exit__(self, *exc: object) -> None:
        self.file.close()
        self.source.close()


def _write(filesystem: pafs.FileSystem, path: str, table: pa.Table, store_schema: bool = True) -> int:
    """Write one Parquet file under a hidden temporary name, rename it into place; its size.

    Without ``store_schema``, the file holds no copy of its Arrow schema (pyarrow's
    ``ARROW:schema``, which repeats the schema and its metadata in every footer): Parquet's own
    types less fixed-size lists' sizes, which the reader gives back, and the schema's metadata in
    the file's key-value metadata.
    """
    folder, name = path.rsplit("/", 1)
    filesystem.create_dir(folder, recursive=True)
    tmp = f"{folder}/.{name}.tmp"
    options = parquet_options(table)
    if store_schema:
        pq.write_table(table, tmp, filesystem=filesystem, **options)
    else:
        with pq.ParquetWriter(tmp, table.schema, filesystem=filesystem, store_schema=False, **options) as w:
            w.write_table(table)
            if table.schema.metadata:
                w.add_key_value_metadata(table.schema.metadata)
    filesystem.move(tmp, path)
    return filesystem.get_file_info(path).size


def side_paths(path: str) -> dict[DedupTable, str]:
    """Paths of the side tables of a deduplicated request file: ``_<name>.<table>.parquet`` beside it."""
    folder, name = path.rsplit("/", 1)
    stem = name.removesuffix(".parquet")
    return {t: f"{folder}/_{stem}.{t.value}.parquet" for t in DedupTable}


def partition_sides(filesystem: pafs.FileSystem, folder: str) -> dict[DedupTable, list[str]]:
    """The committed side files of a deduplicated partition, per side table, in name order.

    A side file is committed once its request file is: a writer that stopped between the two left
    side files that no committed row refers to, and they are not read.
    """
    try:
        found = filesystem.get_file_info(pafs.FileSelector(folder))
    except (FileNotFoundError, OSError):
        return {}
    names = {f.base_name for f in found if f.type == pafs.FileType.File}
    out: dict[DedupTable, list[str]] = {}
    for name in sorted(names):
        stem, _, rest = name.removeprefix("_").partition(".")
        table = rest.removesuffix(".parquet")
        if name.startswith("_") and table in DedupTable._value2member_map_ and f"{stem}.parquet" in names:
            out.setdefault(DedupTable(table), []).append(f"{folder}/{name}")
    return out


KnownKeys = dict[DedupTable, np.ndarray]
"""The keys of the rows a partition's committed side files hold, per side table."""


def known_keys(filesystem: pafs.FileSystem, folder: str) -> KnownKeys:
    """The keys already in a deduplicated partition (its committed side files' key columns)."""
    known: KnownKeys = {}
    for table, paths in partition_sides(filesystem, folder).items():
        column = KEY_FIELDS[table].name
        keys = []
        for path in paths:
            with _Opened(filesystem, path) as pf:
                keys.append(pf.read(columns=[column]).column(column).to_numpy())
        known[table] = np.concatenate(keys)
    return known


class KnownPartitions:
    """The side table keys of the partitions a deduplicated writer wrote last, newest last.

    A partition met for the first time (or again, after it was let go) has its keys read from its
    committed side files (:func:`known_keys`); at most ``limit`` are kept.
    """

    def __init__(self, filesystem: pafs.FileSystem, limit: int = KNOWN_PARTITIONS) -> None:
        self.filesystem, self.limit = filesystem, limit
        self._keys: dict[str, KnownKeys] = {}

    def of(self, folder: str) -> KnownKeys:
        """The keys of a partition, kept up to date by :func:`write_dedup`."""
        known = self._keys.pop(folder, None)
        if known is None:
            known = known_keys(self.filesystem, folder)
        self._keys[folder] = known
        while len(self._keys) > self.limit:
            self._keys.pop(next(iter(self._keys)))
        return known


def write_dedup(
    filesystem: pafs.FileSystem, path: str, table: pa.Table, fs: FeatureSet, known: KnownKeys | None = None
) -> list[int]:
    """Write request-level rows as one deduplicated file at ``path`` and its side tables; their sizes.

    Args:
        filesystem: Where to write.
        path: The request file.
        table: Request-level rows.
        fs: Their FeatureSet.
        known: The keys the partition's committed side files hold: rows with those keys are not
            written again, and the keys of the rows written are added once the file is committed.
            ``None`` writes every distinct row of the file (side tables per file).

    The side tables are renamed into place first: the request file's rename commits them all.

    Raises:
        WarehouseError: Two different feature rows share a key (never seen: a 64-bit hash).

    """
    try:
        rows, sides = dedup_tables(table, fs)
    except ValueError as exc:
        raise WarehouseError(f"{path}: {exc}") from None
    paths = side_paths(path)
    new: KnownKeys = {}
    sizes = []
    for t, side in sides.items():
        keys = side.column(KEY_FIELDS[t].name).to_numpy()
        fresh = ~np.isin(keys, known[t]) if known is not None and t in known else np.ones(len(keys), bool)
        if fresh.any():  # no Arrow schema copy: the request files' FeatureSet gives the types
            sizes.append(_write(filesystem, paths[t], side.filter(pa.array(fresh)), store_schema=False))
            new[t] = keys[fresh]
    sizes.append(_write(filesystem, path, rows))
    if known is not None:
        for t, keys in new.items():
            known[t] = np.concatenate([known[t], keys]) if t in known else keys
    return sizes


def dedup_copy(uri: str, out: str, fs: FeatureSet) -> int:
    """Write a request-level warehouse's files again, deduplicated, under ``out``; the bytes written.

    File by file, with the same partitions, records and names, and the writer's own code and
    compression: only the layout differs, so the two sizes compare layouts alone. As the
    warehouse's writer does, each file's side tables hold only rows its partition lacks so far.

    Raises:
        WarehouseError: The warehouse is not request-level, or the path is not a warehouse.

    """
    _, root = _open_fs(uri)
    out_fs, out_root = _open_fs(out)
    total = 0
    partitions = KnownPartitions(out_fs)
    for info, whole in _request_tables(uri):
        table = whole.select(schema(fs, TableLayout.REQUEST).names)
        relative = info.path[len(root.rstrip("/")) :].lstrip("/")
        path = f"{out_root.rstrip('/')}/{relative}"
        total += sum(write_dedup(out_fs, path, table, fs, partitions.of(path.rsplit("/", 1)[0])))
    return total


def dedup_bytes(uri: str, fs: FeatureSet) -> int:
    """Bytes a request-level warehouse takes deduplicated: :func:`dedup_copy` into a folder then removed."""
    with tempfile.TemporaryDirectory(prefix="leanrec-dedup-") as tmp:
        return dedup_copy(uri, tmp, fs)


def _is_side(info: pafs.FileInfo) -> bool:
    return info.base_name.startswith("_")


def _files(uri: str, sides: bool = False) -> tuple[pafs.FileSystem, list[pafs.FileInfo]]:
    """The committed warehouse files under ``uri``; with ``sides``, deduplicated side tables as well."""
    filesystem, root = _open_fs(uri)
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise WarehouseError(
            f"warehouse path {uri} does not exist; give the folder a demo or a joiner wrote "
            "(e.g. leanrec-demo/warehouse/lean)"
        )
    if info.type != pafs.FileType.Directory:
        raise WarehouseError(
            f"warehouse path {uri} is not a folder; give the folder a demo or a joiner wrote "
            "(e.g. leanrec-demo/warehouse/lean)"
        )
    found = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    files = [
        f
        for f in found
        if f.type == pafs.FileType.File
        and f.base_name.endswith(".parquet")
        and not f.base_name.startswith(".")
        and (sides or not _is_side(f))
    ]
    # A warehouse keeps its files in Hive partitions (key=value folders) under its root; files
    # under other folders belong to warehouses inside this one, as leanrec-demo/ holds two.
    inner = sorted({r for r in (_warehouse_root(root, f.path) for f in files) if r != root.rstrip("/")})
    if inner:
        names = ", ".join(inner[:4]) + (f" and {len(inner) - 4} more" if len(inner) > 4 else "")
        raise WarehouseError(f"{uri} is not a warehouse but holds warehouses: {names}; give one of them")
    return filesystem, files


def _warehouse_root(root: str, path: str) -> str:
    """The folder a Parquet file's warehouse starts at: its folder, less trailing key=value parts."""
    parts = path[len(root.rstrip("/")) :].strip("/").split("/")[:-1]
    while parts and "=" in parts[-1]:
        parts.pop()
    return "/".join([root.rstrip("/"), *parts]) if parts else root.rstrip("/")


def warehouse_bytes(uri: str) -> int:
    """Bytes of the committed Parquet files under a warehouse path (side tables included)."""
    return sum(f.size for f in _files(uri, sides=True)[1])


def written_featureset(path: str, metadata: dict[bytes, bytes] | None) -> FeatureSet:
    """The FeatureSet a warehouse file was written under, from its Arrow schema metadata.

    Raises:
        WarehouseError: The file carries no FeatureSet, or one that cannot be parsed.

    """
    raw = (metadata or {}).get(FEATURESET_KEY)
    if raw is None:
        raise WarehouseError(f"{path} is not a leanrec warehouse file (no FeatureSet in its metadata)")
    try:
        return FeatureSet.from_json(raw.decode())
    except (ValueError, KeyError, TypeError) as exc:
        raise WarehouseError(f"{path}: unreadable FeatureSet in its metadata ({exc})") from None


def check_readable(path: str, written: FeatureSet, fs: FeatureSet) -> None:
    """Refuse a file whose data ``fs`` cannot read (another lineage, a newer version, other shapes).

    Files of earlier versions that ``fs`` retired features from pass: their retired columns are
    simply not read.

    Raises:
        WarehouseError: Naming both FeatureSets and what does not match.

    """
    if conflicts := fs.read_conflicts(written):
        raise WarehouseError(
            f"warehouse file {path} was written under FeatureSet {written.name} v{written.version} "
            f"({written.fingerprint:08x}), not {fs.name} v{fs.version} ({fs.fingerprint:08x}): "
            + "; ".join(conflicts)
        )


class SideCache:
    """The side tables of the deduplicated partitions a reader met, each column read once.

    A deduplicated file's rows refer to the side files of its whole partition, so each file read
    would otherwise read them all again.
    """

    def __init__(self) -> None:
        self._columns: dict[str, dict[DedupTable, set[str]]] = {}
        self._tables: dict[tuple[str, DedupTable, tuple[str, ...]], pa.Table] = {}
        self._featuresets: dict[bytes, FeatureSet] = {}

    def featureset(self, path: str, pf: pq.ParquetFile) -> FeatureSet:
        """The FeatureSet a request file was written under, parsed once per distinct one."""
        meta = pf.schema_arrow.metadata or {}
        raw = meta.get(FEATURESET_KEY, b"")
        if raw not in self._featuresets:
            self._featuresets[raw] = written_featureset(path, meta)
        return self._featuresets[raw]

    def columns(self, filesystem: pafs.FileSystem, folder: str) -> dict[DedupTable, set[str]]:
        """The columns each side table of a partition holds (over all its files and versions)."""
        if folder not in self._columns:
            have: dict[DedupTable, set[str]] = {}
            for table, paths in partition_sides(filesystem, folder).items():
                for path in paths:
                    with _Opened(filesystem, path) as pf:
                        have.setdefault(table, set()).update(pf.schema_arrow.names)
            self._columns[folder] = have
        return self._columns[folder]

    def read(
        self,
        filesystem: pafs.FileSystem,
        folder: str,
        table: DedupTable,
        columns: Sequence[str],
        types: pa.Schema,
    ) -> tuple[pa.Table, int]:
        """The named columns of a partition's side table, and the compressed bytes read (0 if held).

        Side files store no Arrow schema of their own: ``types`` (``side_schema`` of the reading
        file's FeatureSet) gives their columns' types back. Files of a FeatureSet version without
        some column give nulls there: no row of theirs is asked for it (a file's rows refer to rows
        of its own version).
        """
        at = (folder, table, tuple(sorted(columns)))
        if at in self._tables:
            return self._tables[at], 0
        parts, read = [], 0
        for path in partition_sides(filesystem, folder).get(table, []):
            with _Opened(filesystem, path) as pf:
                names = [n for n in columns if n in pf.schema_arrow.names]
                parts.append(pf.read(columns=names).cast(pa.schema([types.field(n) for n in names])))
                for g in range(pf.num_row_groups):
                    meta = pf.metadata.row_group(g)
                    read += sum(
                        meta.column(i).total_compressed_size
                        for i in range(meta.num_columns)
                        if meta.column(i).path_in_schema.split(".")[0] in names
                    )
        if not parts:
            raise WarehouseError(f"{folder} has no committed {table.value} side table")
        self._tables[at] = pa.concat_tables(parts, promote_options="default").select(list(columns))
        return self._tables[at], read


def read_sides(
    filesystem: pafs.FileSystem,
    path: str,
    pf: pq.ParquetFile,
    request: Sequence[str],
    item: Sequence[str],
    cache: SideCache | None = None,
) -> tuple[dict[DedupTable, pa.Table], list[str], list[str], int]:
    """What to read of a deduplicated file for the named columns, and its side tables' share of them.

    A column the request file lacks is read from the side table of its partition that holds it,
    with that table's key, and the keys that lead to it from the row (a slow table's key is in the
    faster table's rows); each side table is read for those columns only.

    Args:
        filesystem: The warehouse's filesystem.
        path: The request file.
        pf: The open request file.
        request: Top-level columns wanted (request-level names).
        item: Fields of the ``items`` structs wanted.
        cache: Side tables already read (a new one if ``None``).

    Returns:
        The side tables read (those any wanted column is in, or that lead to one), the columns and
        item fields to read of the request file (keys included), and the compressed bytes of the
        side columns read (0 for those the cache held).

    Raises:
        WarehouseError: A wanted column is in neither the file nor its partition's side tables.

    """
    cache = cache or SideCache()
    folder = path.rsplit("/", 1)[0]
    top = set(pf.schema_arrow.names)
    struct = {f.name for f in pf.schema_arrow.field("items").type.value_type} if "items" in top else set()
    held = cache.columns(filesystem, folder)
    written = cache.featureset(path, pf)  # the side files' types
    tables: dict[DedupTable, pa.Table] = {}
    request_cols = [n for n in request if n in top]
    item_cols = [n for n in item if n in struct]
    read = 0
    for side, base, names, cols in (
        (Side.REQUEST, top, request, request_cols),
        (Side.ITEM, struct, item, item_cols),
    ):
        missing = [n for n in names if n not in base]
        if not missing:
            continue
        chain = CHAINS[side]
        wanted: dict[DedupTable, list[str]] = {}
        for name in missing:
            table = next((t for t in chain if name in held.get(t, ())), None)
            if table is None:
                raise WarehouseError(f"{path}: no column {name} in the file or its partition's side tables")
            wanted.setdefault(table, []).append(name)
        # Walk from the slowest table wanted to the row: each table is reached through the key the
        # row holds, or else through the faster table before it.
        for at in range(len(chain) - 1, -1, -1):
            table = chain[at]
            if table not in wanted:
                continue
            key = KEY_FIELDS[table].name
            if key in base:
                if key not in cols:
                    cols.append(key)
            elif at > 0 and key in held.get(chain[at - 1], ()):
                wanted.setdefault(chain[at - 1], []).append(key)
            else:
                raise WarehouseError(f"{path}: no key leads to the {table.value} side table")
        for table, columns in wanted.items():
            types = side_schema(written, table)
            tables[table], bytes_read = cache.read(
                filesystem, folder, table, [KEY_FIELDS[table].name, *dict.fromkeys(columns)], types
            )
            read += bytes_read
    return tables, request_cols, item_cols, read


def read_dedup(
    filesystem: pafs.FileSystem,
    path: str,
    pf: pq.ParquetFile,
    request: Sequence[str],
    item: Sequence[str],
    optional: Sequence[str] = (),
    cache: SideCache | None = None,
) -> pa.Table:
    """A deduplicated file's named columns as request-level rows (see :func:`read_sides`).

    Raises:
        WarehouseError: The file or its side tables lack a column, or a key misses its side table.

    """
    sides, request_cols, item_cols, _ = read_sides(filesystem, path, pf, request, item, cache)
    columns, _ = projection(path, pf, request_cols, item_cols, TableLayout.REQUEST, optional)
    rows = pf.read(columns=columns)
    got = {f.name for f in pf.schema_arrow.field("items").type.value_type} | {
        n for t in sides.values() for n in t.column_names
    }
    names = [n for n in item if n not in optional or n in got]
    try:
        batch = undedup(rows, sides, request, names)
    except ValueError as exc:
        raise WarehouseError(f"{path}: {exc}") from None
    return pa.Table.from_batches([batch])


def layout_of(path: str, metadata: dict[bytes, bytes] | None) -> TableLayout:
    """The row layout of a warehouse file, from its Arrow schema metadata (request-level if unset)."""
    raw = (metadata or {}).get(LAYOUT_KEY, b"request")
    try:
        return TableLayout(raw.decode())
    except ValueError:
        raise WarehouseError(f"{path}: unknown warehouse layout {raw!r}") from None


def projection(
    path: str,
    pf: pq.ParquetFile,
    request: list[str],
    item: list[str],
    layout: TableLayout,
    optional: Sequence[str] = (),
) -> tuple[list[str], list[int]]:
    """Column paths of a file to read, and the indices of the Parquet leaf columns they cover.

    Only the named columns are read; request-level rows read only the named fields of their
    ``items`` structs, so the columns of retired features are never read.

    Args:
        path: The file, for error messages.
        pf: The open file.
        request: Top-level columns (request-level) or the request-side ones (impression-level).
        item: Item columns: fields of the ``items`` structs (request-level) or top-level columns.
        layout: The file's layout.
        optional: Item columns a file may lack (``score``, in files written before it was kept):
            left out of the projection where absent.

    Raises:
        WarehouseError: The file lacks some of the columns (other than the optional ones).

    """
    leaves: dict[str, list[int]] = {}
    for i in range(pf.metadata.num_columns):
        parts = pf.schema.column(i).path.split(".")
        # A top-level column, or one field of the items structs (items.list.element.<field>...).
        key = ".".join(parts[:4]) if parts[0] == "items" else parts[0]
        leaves.setdefault(key, []).append(i)
    if layout is TableLayout.REQUEST:
        prefix = next((k.rsplit(".", 1)[0] for k in leaves if k.startswith("items.")), None)
        if prefix is None:
            raise WarehouseError(f"{path} is request-level but has no items column")
        named = {n: f"{prefix}.{n}" for n in item}
    else:
        named = {n: n for n in item}
    item_columns = [c for n, c in named.items() if n not in optional or c in leaves]
    columns = [*request, *item_columns]
    if missing := [c for c in columns if c not in leaves]:
        raise WarehouseError(f"{path} lacks the columns {missing}")
    return columns, [i for c in columns for i in leaves[c]]


def featureset_of(uri: str) -> FeatureSet:
    """The FeatureSet to read a warehouse with: the newest its files were written under.

    A warehouse may hold files of several versions of one lineage (older days written before a
    feature audit retired features); the newest version reads them all. Every file's footer is
    read to find it.

    Raises:
        WarehouseError: The path is missing or empty, a file carries no FeatureSet, or no version
            among the files reads all of them (another lineage, or reshaped features).

    """
    filesystem, files = _files(uri)
    if not files:
        raise WarehouseError(
            f"warehouse {uri} holds no Parquet files; give the folder a demo or a joiner wrote "
            "(e.g. leanrec-demo/warehouse/lean)"
        )
    found: dict[bytes, tuple[str, FeatureSet]] = {}  # parsed once per distinct FeatureSet
    for f in files:
        meta = pq.read_schema(f.path, filesystem=filesystem).metadata or {}
        raw = meta.get(FEATURESET_KEY, b"")
        if raw not in found:
            found[raw] = (f.path, written_featureset(f.path, meta))
    newest = max((fs for _, fs in found.values()), key=lambda fs: fs.version)
    for path, written in found.values():
        check_readable(path, written, newest)
    return newest


def read_table(uri: str, fs: FeatureSet, layout: TableLayout | None = None) -> pa.Table:
    """Read a warehouse as a table of the schema ``fs`` derives.

    Files written under earlier versions of ``fs`` that it reads (see ``FeatureSet.reads``) are read
    as well, so a folder may mix versions: only ``fs``'s columns are read from each file.

    Raises:
        WarehouseError: The path is missing or empty, holds the other layout (or both), or a file
            was not written by leanrec or under a FeatureSet ``fs`` cannot read.

    """
    filesystem, files = _files(uri)
    if not files:
        raise WarehouseError(
            f"warehouse {uri} holds no Parquet files; give the folder a demo or a joiner wrote "
            "(e.g. leanrec-demo/warehouse/lean)"
        )
    tables: list[pa.Table] = []
    got: TableLayout | None = None
    sides = SideCache()
    for f in files:
        with _Opened(filesystem, f.path) as pf:
            meta = pf.schema_arrow.metadata
            check_readable(f.path, written_featureset(f.path, meta), fs)
            found = layout_of(f.path, meta)
            if got is None:
                if layout is not None and found is not layout:
                    raise WarehouseError(
                        f"warehouse {uri} is {found.value}-level, expected {layout.value}-level"
                    )
                # A deduplicated warehouse reads as the request-level rows it was split from.
                got = found
                want = schema(
                    fs, TableLayout.IMPRESSION if got is TableLayout.IMPRESSION else TableLayout.REQUEST
                )
            elif found is not got:
                raise WarehouseError(
                    f"{f.path} is {found.value}-level; the files before it are {got.value}-level"
                )
            if got is TableLayout.DEDUP:
                request = [*(f.name for f in META_FIELDS), *fs.layout(Side.REQUEST).names]
                item = [f.name for f in item_struct(fs)]
                table = read_dedup(
                    filesystem, f.path, pf, request, item, optional=(SCORE_FIELD.name,), cache=sides
                )
                table = with_scores(table, TableLayout.REQUEST)
            else:
                columns, _ = _table_projection(f.path, pf, fs, got)
                # Read in file order, then put columns (and struct fields, by name) in the schema's order.
                table = with_scores(pf.read(columns=columns), got)
            tables.append(table.select(want.names).cast(want))
    return pa.concat_tables(tables)


def _table_projection(
    path: str, pf: pq.ParquetFile, fs: FeatureSet, layout: TableLayout
) -> tuple[list[str], list[int]]:
    """Projection of every column of the warehouse schema ``fs`` derives."""
    request = [*(f.name for f in META_FIELDS), *fs.layout(Side.REQUEST).names]
    item = [f.name for f in item_struct(fs)]
    return projection(path, pf, request, item, layout, optional=(SCORE_FIELD.name,))


def _request_tables(uri: str) -> Iterator[tuple[pafs.FileInfo, pa.Table]]:
    """Each file of a request-level warehouse, read whole (scores as nulls where a file has none).

    Raises:
        WarehouseError: A file is not request-level.

    """
    filesystem, files = _files(uri)
    for info in files:
        with _Opened(filesystem, info.path) as file:
            if layout_of(info.path, file.schema_arrow.metadata) is not TableLayout.REQUEST:
                raise WarehouseError(f"{info.path} is not a request-level file")
            table = with_scores(file.read(), TableLayout.REQUEST)
        yield info, table


def sorted_impression_bytes(uri: str, fs: FeatureSet) -> int:
    """Bytes a request-level warehouse would take in the impression layout with its rows sorted.

    The impression layout at its best: every file rewritten with one row per example, grouped by
    request and ordered by position, so each request's repeated user columns sit side by side for
    Parquet's dictionary and run-length encodings and zstd to absorb. File by file, with the same
    records per file and the same Parquet options as the warehouse writer, so only the layout differs.
    """
    total = 0
    for _, table in _request_tables(uri):
        flat = request_to_impression(table, fs)
        sink = pa.BufferOutputStream()
        pq.write_table(flat, sink, **parquet_options(flat))
        total += sink.getvalue().size
    return total
