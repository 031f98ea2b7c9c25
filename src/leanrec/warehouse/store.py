"""The Warehouse: Parquet datasets of joined records, request-level or impression-level.

Files are zstd-compressed Parquet under Hive-style partitions (``dt=YYYY-MM-DD/hour=HH/``) of the
request time. Each file is written under a hidden temporary name and renamed into place, so a reader
(pyarrow, DuckDB, Spark) never sees half a file. The path may be a local folder or any URI that
``pyarrow.fs`` opens (``s3://…``, ``gs://…``).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from leanrec.energy.ledger import CostLedger
from leanrec.schema import FeatureSet
from leanrec.warehouse.records import RequestRecord
from leanrec.warehouse.tables import (
    FEATURESET_KEY,
    LAYOUT_KEY,
    TableLayout,
    records_table,
    request_to_impression,
    schema,
)


class WarehouseError(ValueError):
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
        layout: Request-level (default) or impression-level.
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
        self.filesystem.create_dir(self.root, recursive=True)

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
            table = records_table(self.featureset, records, self.layout)
            hours = table.column("ts_ms").to_numpy() // 3_600_000
            written = []
            for hour in np.unique(hours):
                part = table.filter(pa.array(hours == hour))
                when = datetime.fromtimestamp(int(hour) * 3600, UTC)
                folder = f"{self.root}/dt={when:%Y-%m-%d}/hour={when:%H}"
                self.filesystem.create_dir(folder, recursive=True)
                name = f"part-{uuid.uuid4().hex[:16]}.parquet"
                tmp, final = f"{folder}/.{name}.tmp", f"{folder}/{name}"
                pq.write_table(part, tmp, filesystem=self.filesystem, compression="zstd")
                self.filesystem.move(tmp, final)
                size = self.filesystem.get_file_info(final).size
                cost.ops += 1
                cost.bytes_written += size
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
        """All committed files of this warehouse."""
        return read_table(self.uri, self.featureset, self.layout)

    def read_examples(self) -> pa.Table:
        """Every committed example as an impression row, sorted by request id and position.

        The same view of either layout, so the two can be compared row for row.
        """
        table = self.read()
        if self.layout is TableLayout.REQUEST:
            table = request_to_impression(table, self.featureset)
        return table.sort_by([("request_id", "ascending"), ("position", "ascending")])

    def bytes_stored(self) -> int:
        """Size of every Parquet file under the path."""
        return warehouse_bytes(self.uri)


def _files(uri: str) -> tuple[pafs.FileSystem, list[pafs.FileInfo]]:
    filesystem, root = _open_fs(uri)
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise WarehouseError(f"warehouse path {uri} does not exist")
    if info.type != pafs.FileType.Directory:
        raise WarehouseError(f"warehouse path {uri} is not a folder")
    found = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    return filesystem, [
        f
        for f in found
        if f.type == pafs.FileType.File
        and f.base_name.endswith(".parquet")
        and not f.base_name.startswith(".")
    ]


def warehouse_bytes(uri: str) -> int:
    """Bytes of the committed Parquet files under a warehouse path."""
    return sum(f.size for f in _files(uri)[1])


def featureset_of(uri: str) -> FeatureSet:
    """The FeatureSet a warehouse was written with, from its first file's metadata.

    Raises:
        WarehouseError: The path is missing or empty, or its files carry no FeatureSet.

    """
    filesystem, files = _files(uri)
    if not files:
        raise WarehouseError(f"warehouse {uri} holds no Parquet files")
    meta = pq.read_schema(files[0].path, filesystem=filesystem).metadata or {}
    if FEATURESET_KEY not in meta:
        raise WarehouseError(
            f"{files[0].path} is not a leanrec warehouse file (no FeatureSet in its metadata)"
        )
    return FeatureSet.from_json(meta[FEATURESET_KEY].decode())


def read_table(uri: str, fs: FeatureSet, layout: TableLayout | None = None) -> pa.Table:
    """Read a warehouse as a table of the schema ``fs`` derives.

    Raises:
        WarehouseError: The path is missing or empty, or holds the other layout.

    """
    filesystem, files = _files(uri)
    if not files:
        raise WarehouseError(f"warehouse {uri} holds no Parquet files")
    found = pq.read_schema(files[0].path, filesystem=filesystem).metadata or {}
    got = TableLayout(found.get(LAYOUT_KEY, b"request").decode())
    if layout is not None and got is not layout:
        raise WarehouseError(f"warehouse {uri} is {got.value}-level, expected {layout.value}-level")
    want = schema(fs, got)
    dataset = ds.dataset([f.path for f in files], filesystem=filesystem, format="parquet")
    return dataset.to_table(columns=want.names).cast(want)
