"""The warehouse: request-level (default) and impression-level Parquet datasets."""

from leanrec.warehouse.records import RequestRecord
from leanrec.warehouse.store import ParquetWarehouse, Warehouse, WarehouseError, read_table, warehouse_bytes
from leanrec.warehouse.tables import (
    TableLayout,
    arrays_block,
    block_arrays,
    impression_to_request,
    records_table,
    request_to_impression,
    schema,
)

__all__ = [
    "ParquetWarehouse",
    "RequestRecord",
    "TableLayout",
    "Warehouse",
    "WarehouseError",
    "arrays_block",
    "block_arrays",
    "impression_to_request",
    "read_table",
    "records_table",
    "request_to_impression",
    "schema",
    "warehouse_bytes",
]
