"""RecBole's atomic files (``.inter``, ``.user``, ``.item``) read into Arrow tables, and interactions.

An atomic file is tab-separated text whose header names each column with its type, ``name:type``:
``token`` (an id or category, kept as text), ``token_seq`` (space-separated tokens), ``float`` and
``float_seq``. Tokens are remapped to dense ids ``0 … n-1`` in order of first appearance in the
interactions, so the same file always gives the same ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv

from leanrec.errors import InputError

TYPES = {
    "token": pa.string(),
    "token_seq": pa.list_(pa.string()),
    "float": pa.float64(),
    "float_seq": pa.list_(pa.float64()),
}


class AtomicError(InputError, ValueError):
    """An atomic file cannot be read (the message says which file and what is wrong)."""


def read_atomic(path: Path | str) -> pa.Table:
    """One atomic file as a table with typed columns named without their type suffix.

    Raises:
        AtomicError: A missing file, a header without ``name:type`` fields, an unknown type, a row
            with the wrong number of fields, or a ``float`` field that is not a number.

    """
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            header = f.readline().rstrip("\r\n").split("\t")
    except FileNotFoundError:
        raise AtomicError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise AtomicError(f"{path}: not UTF-8 text") from None
    names, types = [], []
    for field in header:
        name, sep, kind = field.rpartition(":")
        if not sep or not name:
            raise AtomicError(f"{path}: header field {field!r} is not name:type")
        if kind not in TYPES:
            raise AtomicError(f"{path}: column {name!r} has type {kind!r}; atomic types are {sorted(TYPES)}")
        names.append(name)
        types.append(kind)
    if len(set(names)) != len(names):
        raise AtomicError(f"{path}: a column name repeats in the header {names}")
    try:
        raw = pv.read_csv(
            path,
            read_options=pv.ReadOptions(skip_rows=1, column_names=names),
            parse_options=pv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=False
            ),
        )
    except pa.ArrowInvalid as exc:
        raise AtomicError(f"{path}: {exc}") from None
    columns = []
    for name, kind in zip(names, types, strict=True):
        col = raw.column(name)
        if kind.endswith("_seq"):
            col = pc.split_pattern(pc.utf8_trim_whitespace(col), " ")
        try:
            columns.append(col.cast(TYPES[kind]))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise AtomicError(f"{path}: column {name!r} ({kind}): {exc}") from None
    return pa.table(columns, names=names)


@dataclass(frozen=True)
class Interactions:
    """User-item interactions with dense ids.

    Attributes:
        user: ``(n,)`` int64 user id of each interaction.
        item: ``(n,)`` int64 item id.
        timestamp: ``(n,)`` float64 (0 where the file has none).
        user_tokens: The file's token of each user id.
        item_tokens: The file's token of each item id.

    """

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    user_tokens: np.ndarray
    item_tokens: np.ndarray

    @property
    def n_users(self) -> int:
        """Distinct users."""
        return len(self.user_tokens)

    @property
    def n_items(self) -> int:
        """Distinct items."""
        return len(self.item_tokens)

    def __len__(self) -> int:
        return len(self.user)


def _dense(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Ids in order of first appearance, and the token of each id."""
    enc = pc.dictionary_encode(col.combine_chunks())
    return enc.indices.to_numpy().astype(np.int64), np.asarray(enc.dictionary.to_pylist(), dtype=object)


def load_interactions(folder: Path | str, name: str | None = None) -> Interactions:
    """The ``<name>.inter`` file of a RecBole dataset folder (``name`` defaults to the folder's).

    Duplicate user-item pairs are kept, as RecBole keeps them; ids follow first appearance.

    Raises:
        AtomicError: The folder or its ``.inter`` file is missing, or the file is unreadable or lacks
            ``user_id`` / ``item_id`` token columns.

    """
    folder = Path(folder)
    path = folder / f"{name or folder.name}.inter"
    if not folder.is_dir():
        what = "no such file or folder" if not folder.exists() else "a file, not a folder"
        raise AtomicError(f"{folder}: {what}; give a RecBole dataset folder (<name>/ holding <name>.inter)")
    if not path.is_file():
        raise AtomicError(
            f"{folder} is not a RecBole dataset folder: it has no {path.name}; give a folder that holds "
            "its dataset's <folder name>.inter, as ml-100k/ holds ml-100k.inter"
        )
    table = read_atomic(path)
    for col in ("user_id", "item_id"):
        if col not in table.column_names or table.schema.field(col).type != pa.string():
            raise AtomicError(f"{path}: needs a {col}:token column, has {table.column_names}")
    user, user_tokens = _dense(table.column("user_id"))
    item, item_tokens = _dense(table.column("item_id"))
    ts = (
        table.column("timestamp").to_numpy().astype(np.float64)
        if "timestamp" in table.column_names and table.schema.field("timestamp").type == pa.float64()
        else np.zeros(len(user))
    )
    return Interactions(user, item, ts, user_tokens, item_tokens)


@dataclass(frozen=True)
class SideFeatures:
    """Features of the users (or items) of an :class:`Interactions`, as ids, row ``k`` for id ``k``.

    Every ``token`` column but the id becomes one categorical column, every ``token_seq`` column a
    bag of ids; id 0 of each vocabulary means unknown (an entity the file does not list). ``float``
    columns are left out.

    Attributes:
        cats: ``(n, C)`` int64 categorical ids.
        cat_sizes: Vocabulary size of each categorical column (unknown included).
        bags: ``(n, L)`` int64 ids of all bag columns in one vocabulary, 0-padded.
        bag_size: That vocabulary's size (padding included).
        names: The columns used, categorical then bags.

    """

    cats: np.ndarray
    cat_sizes: list[int]
    bags: np.ndarray
    bag_size: int
    names: list[str]


def side_features(path: Path | str, id_column: str, tokens: np.ndarray) -> SideFeatures:
    """The ``.user`` or ``.item`` file at ``path`` aligned to the dense ids whose tokens are ``tokens``.

    Raises:
        AtomicError: The file is unreadable or has no ``id_column`` token column.

    """
    table = read_atomic(path)
    if id_column not in table.column_names:
        raise AtomicError(f"{path}: needs a {id_column}:token column, has {table.column_names}")
    keys = table.column(id_column).to_pylist()
    row = dict(zip(keys, range(len(keys)), strict=True))
    at = np.array([row.get(t, -1) for t in tokens], dtype=np.int64)  # row of each dense id, -1 if absent
    cats, sizes, names, bag_rows, bag_size = [], [], [], None, 1
    for name in table.column_names:
        kind = table.schema.field(name).type
        if name == id_column or kind not in (pa.string(), pa.list_(pa.string())):
            continue
        names.append(name)
        if kind == pa.string():
            enc = pc.dictionary_encode(table.column(name).combine_chunks())
            ids = enc.indices.to_numpy().astype(np.int64) + 1
            cats.append(np.where(at >= 0, ids[at.clip(0)], 0))
            sizes.append(len(enc.dictionary) + 1)
            continue
        col = table.column(name).combine_chunks()
        enc = pc.dictionary_encode(col.flatten())
        flat = enc.indices.to_numpy().astype(np.int64) + bag_size
        offsets = col.offsets.to_numpy()
        width = int(np.diff(offsets).max(initial=0))
        bags = np.zeros((len(keys), width), np.int64)
        pos = np.arange(len(flat)) - np.repeat(offsets[:-1], np.diff(offsets))
        bags[np.repeat(np.arange(len(keys)), np.diff(offsets)), pos] = flat
        bag_rows = bags if bag_rows is None else np.hstack([bag_rows, bags])
        bag_size += len(enc.dictionary)
    bag_rows = np.zeros((len(keys), 1), np.int64) if bag_rows is None else bag_rows
    bags_out = np.where(at[:, None] >= 0, bag_rows[at.clip(0)], 0)
    cats_out = np.stack(cats, 1) if cats else np.zeros((len(tokens), 0), np.int64)
    return SideFeatures(cats_out, sizes, bags_out, bag_size, names)
