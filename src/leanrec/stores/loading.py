"""Loading a catalog's features into a FeatureStore from Parquet: ``leanrec features load``.

A users file and an items file hold one row per entity: its id (column ``user_id`` or ``item_id``,
a 64-bit integer, or a string where the FeatureSet's id feature declares string ids)
and a column per feature of that owner, named as the FeatureSet names it: a number for a feature of
size 1, a list (or fixed-size list) of ``size`` values otherwise. A feature with the user-id or
item-id role may be left out: it is the entity's id. Columns the FeatureSet does not name are not
read, so a file written for an earlier version (with features since retired) loads as it is.
Loading is a write: loading a newer file over the same store updates the entities it holds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from leanrec.errors import InputError
from leanrec.featurelog.inputs import FeatureInputError, pack_owner
from leanrec.ids import beyond_int64, string_ids
from leanrec.schema import PAD_ID, FeatureSet, Owner, Role
from leanrec.stores.features import FeatureStore

ID_COLUMNS = {Owner.USER: "user_id", Owner.ITEM: "item_id"}
ID_ROLES = {Owner.USER: Role.USER_ID, Owner.ITEM: Role.ITEM_ID}


class FeatureFileError(InputError, ValueError):
    """A users or items file that cannot be loaded, with the file and the reason."""


def _values(col: pa.ChunkedArray, name: str, where: str) -> np.ndarray:
    """A column as ``(rows,)`` or ``(rows, size)`` numbers, in one flatten."""
    arr = col.combine_chunks()
    if arr.null_count:
        raise FeatureFileError(f"{where}: column {name} has {arr.null_count} empty value(s)")
    if pa.types.is_fixed_size_list(arr.type):
        return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        if len(arr) and (lengths != lengths[0]).any():
            raise FeatureFileError(
                f"{where}: column {name} holds lists of {lengths.min()}..{lengths.max()} values; "
                "every row needs the feature's size"
            )
        size = int(lengths[0]) if len(arr) else 0
        return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), size)
    try:
        return arr.to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid as exc:
        raise FeatureFileError(f"{where}: column {name} is not numbers ({arr.type}): {exc}") from None


def load_entities(
    store: FeatureStore,
    fs: FeatureSet,
    owner: Owner,
    path: str | Path,
    batch_rows: int = 5_000,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write every entity of one Parquet file into ``store``.

    Args:
        store: The FeatureStore (of ``fs``).
        fs: The FeatureSet whose ``owner`` features the file holds.
        owner: ``Owner.USER`` or ``Owner.ITEM``.
        path: The Parquet file.
        batch_rows: Entities per write.
        progress: Called with ``(done, total)`` after each write.

    Returns:
        Entities written.

    Raises:
        FeatureFileError: Unreadable file, no id column, a feature's column missing or malformed, or
            values the FeatureSet refuses (each message names the file and the feature).

    """
    where = str(path)
    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise FeatureFileError(f"{where} does not exist; give a Parquet file of {owner.value}s") from None
    except (OSError, pa.ArrowException) as exc:
        raise FeatureFileError(f"{where} is not a readable Parquet file: {exc}") from None
    id_col, id_feature = ID_COLUMNS[owner], fs.role(ID_ROLES[owner])
    names = pf.schema_arrow.names
    if id_col not in names:
        raise FeatureFileError(f"{where}: needs an {id_col} column (the {owner.value}'s id), has {names}")
    wanted = [f.name for f in fs.of(owner)]
    missing = [n for n in wanted if n not in names and not (id_feature and n == id_feature.name)]
    if missing:
        raise FeatureFileError(
            f"{where}: no column for {owner.value} feature(s) {missing} of FeatureSet {fs.name} v{fs.version}"
        )
    columns = [id_col, *(n for n in wanted if n in names)]
    total, done = pf.metadata.num_rows, 0
    for rb in pf.iter_batches(batch_size=batch_rows, columns=columns):
        table = pa.Table.from_batches([rb])
        ids = _values(table.column(id_col), id_col, where)
        strings = id_feature is not None and id_feature.string_ids
        if strings and ids.dtype.kind in "OUS":
            try:
                ids = string_ids(ids)
            except ValueError as exc:
                raise FeatureFileError(f"{where}: {id_col}: {exc}") from None
        if ids.dtype.kind not in "iu" or beyond_int64(ids).any():
            want = "64-bit integer or string ids" if strings else "64-bit integer ids"
            raise FeatureFileError(f"{where}: {id_col} must hold {want}, got {ids.dtype}")
        if (ids == PAD_ID).any():
            raise FeatureFileError(
                f"{where}: {id_col} holds {PAD_ID}, the padding id, which no entity may have"
            )
        values = {n: _values(table.column(n), n, where) for n in columns[1:]}
        if id_feature is not None and id_feature.name not in values:
            values[id_feature.name] = ids
        try:
            block = pack_owner(fs, owner, values, len(ids), where)
        except FeatureInputError as exc:
            raise FeatureFileError(f"{where}: {exc}") from None
        store.put_many(owner, ids.astype(np.int64), block)
        done += len(ids)
        if progress:
            progress(done, total)
    return done


def catalog_prefix(fs: FeatureSet) -> str:
    """Key prefix of a catalog's features in a shared Redis: one per FeatureSet lineage and version.

    A version's rows have its own widths, so versions (a FeatureSet and the pruned one that
    follows an audit) are loaded and served side by side without overwriting each other.
    """
    return f"lr:f:{fs.name}:v{fs.version}"


def open_catalog_store(url: str, fs: FeatureSet) -> FeatureStore:
    """The FeatureStore of a catalog at ``url`` (``redis://host:port/db``), under :func:`catalog_prefix`.

    Raises:
        ConnectionError: The server does not answer.

    """
    from leanrec.stores.redis_features import RedisFeatureStore

    return RedisFeatureStore(url, fs, prefix=catalog_prefix(fs))
