"""A FeatureSet declared in a TOML file: the one form a user writes, and the one an audit writes back.

A file holds the lineage's ``name`` and ``version``, one ``[[features]]`` table per feature, in the
order the layouts pack them, and an optional ``[retired]`` table (name = why) of features earlier
versions had::

    name = "myshop"
    version = 1

    [[features]]
    name = "item"            # an identifier; also the warehouse column
    owner = "item"           # user | item | context
    kind = "sparse"          # dense | sparse | multi_hot | sequence
    dtype = "string"         # id kinds: int64 (the default) or string (hashed to 64 bits)
    rows = 100000            # id kinds: rows of the embedding table a model maps the ids into
    map = "managed"          # id kinds: managed (the default) | hash | qr
    evict = "lfu"            # managed maps: lfu (the default) | lru
    role = "item_id"         # item_id | user_id | history (what a model reads it as)
    doc = "the item's id"

    [[features]]
    name = "country"
    owner = "user"
    kind = "sparse"
    rows = 300
    changes = "rarely"       # user and context features: request (the default) | rarely

    [[features]]
    name = "recent"
    owner = "user"
    kind = "sequence"
    size = 50                # values per entity (vector width, set or sequence length)
    dtype = "string"
    rows = 100000            # a history shares the item id's table: the same rows, map and dtype
    role = "history"

    [[features]]
    name = "taste"
    owner = "user"
    kind = "dense"
    size = 16
    space = "two_tower"      # dense vectors of one space (user and item side) meet in a dot product

``size`` defaults to 1, ``doc``, ``space`` and ``role`` to empty. ``changes`` says how often a user or
context feature's value changes: ``request`` (the default: counters, context, recent history) or
``rarely`` (embeddings, long-term profiles), which the deduplicated warehouse stores once per distinct
value rather than once per request. Every id feature needs ``rows``; its
ids may be any 64-bit integers but -1 (padding), or strings with ``dtype = "string"``. ``dtype`` may
be given for dense features and must then be ``float32``. Every mistake is refused with one line
naming the file, the feature and what was wrong.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from leanrec.errors import InputError
from leanrec.schema import Feature, FeatureSet, Kind, Owner, Side

FEATURE_KEYS = (
    "name",
    "owner",
    "kind",
    "dtype",
    "size",
    "rows",
    "map",
    "evict",
    "doc",
    "space",
    "role",
    "changes",
)
"""Keys a ``[[features]]`` table may have."""


class FeatureSetFileError(InputError, ValueError):
    """A FeatureSet file that cannot be used, with the reason."""


def _choice(where: str, key: str, value: Any, enum: type) -> Any:
    try:
        return enum(value)
    except ValueError:
        known = " | ".join(e.value for e in enum)
        raise FeatureSetFileError(f"{where}: {key} must be one of {known}, got {value!r}") from None


def _typed(where: str, table: dict[str, Any], key: str, want: type, default: Any) -> Any:
    value = table.get(key, default)
    if want is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise FeatureSetFileError(f"{where}: {key} must be a whole number, got {value!r}")
    if want is str and not isinstance(value, str):
        raise FeatureSetFileError(f"{where}: {key} must be a string, got {value!r}")
    return value


def _feature(where: str, table: Any) -> Feature:
    if not isinstance(table, dict):
        raise FeatureSetFileError(f"{where}: a feature is a [[features]] table, got {table!r}")
    if unknown := sorted(set(table) - set(FEATURE_KEYS)):
        raise FeatureSetFileError(f"{where}: unknown key(s) {unknown}; known: {list(FEATURE_KEYS)}")
    for key in ("name", "owner", "kind"):
        if key not in table:
            raise FeatureSetFileError(f"{where}: {key} is missing")
    name = _typed(where, table, "name", str, "")
    where = f"{where} ({name})"
    owner = _choice(where, "owner", table["owner"], Owner)
    kind = _choice(where, "kind", table["kind"], Kind)
    dtypes = ("float32",) if kind is Kind.DENSE else ("int64", "string")
    if (dtype := table.get("dtype", dtypes[0])) not in dtypes:
        raise FeatureSetFileError(
            f"{where}: a {kind.value} feature's dtype is {' or '.join(dtypes)}, got {dtype!r}"
        )
    ints = {key: _typed(where, table, key, int, default) for key, default in (("size", 1), ("rows", 0))}
    strs = {
        key: _typed(where, table, key, str, "") for key in ("doc", "space", "role", "map", "evict", "changes")
    }
    try:
        return Feature(name, owner, kind, **ints, **strs, string_ids=dtype == "string")
    except ValueError as exc:  # the feature's own rules; its message names it, as ``where`` does
        raise FeatureSetFileError(f"{where}: {str(exc).removeprefix(f'feature {name}: ')}") from None


def reserved_names() -> frozenset[str]:
    """Column names the warehouse gives every request and item (ids, times, positions, scores, labels)."""
    from leanrec.warehouse.tables import ITEM_META_FIELDS, LABEL_FIELDS, META_FIELDS, SCORE_FIELD

    fields = (*META_FIELDS, *ITEM_META_FIELDS, SCORE_FIELD, *LABEL_FIELDS)
    return frozenset(f.name for f in fields) | {"items"}


def parse_featureset(text: str, source: str = "FeatureSet file") -> FeatureSet:
    """The FeatureSet a TOML text declares.

    Args:
        text: The file's contents.
        source: What to call it in messages (normally its path).

    Raises:
        FeatureSetFileError: Not TOML, a missing or mistyped key, an unknown owner, kind or role, a
            feature no layout can hold, or features that break a FeatureSet rule (names twice, a role
            held twice, a history without an item id of its table, an id map without its rows).

    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FeatureSetFileError(f"{source} is not valid TOML: {exc}") from None
    if unknown := sorted(set(data) - {"name", "version", "features", "retired"}):
        raise FeatureSetFileError(
            f"{source}: unknown key(s) {unknown}; "
            "a FeatureSet file has name, version, [[features]] and [retired]"
        )
    for key in ("name", "version"):
        if key not in data:
            raise FeatureSetFileError(f"{source}: {key} is missing")
    name = _typed(source, data, "name", str, "")
    version = _typed(source, data, "version", int, 0)
    tables = data.get("features", [])
    if not isinstance(tables, list) or not tables:
        raise FeatureSetFileError(f"{source}: no features; declare each in a [[features]] table")
    features = tuple(_feature(f"{source}: feature {i + 1}", t) for i, t in enumerate(tables))
    if clash := sorted({f.name for f in features} & reserved_names()):
        raise FeatureSetFileError(
            f"{source}: feature name(s) {clash} are warehouse columns of every request or item; "
            "name the feature otherwise (its role says what it is)"
        )
    retired = data.get("retired", {})
    if not isinstance(retired, dict) or not all(isinstance(v, str) for v in retired.values()):
        raise FeatureSetFileError(f"{source}: [retired] maps each retired feature's name to why (a string)")
    try:
        return FeatureSet(name, version, features, dict(retired))
    except ValueError as exc:
        raise FeatureSetFileError(f"{source}: {exc}") from None


def load_featureset(path: str | Path) -> FeatureSet:
    """The FeatureSet a TOML file declares (see the module's docstring for the format).

    Raises:
        FeatureSetFileError: The file is missing or unreadable, or :func:`parse_featureset` refuses it.

    """
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise FeatureSetFileError(f"FeatureSet file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise FeatureSetFileError(f"FeatureSet file {path} cannot be read: {why}") from None
    return parse_featureset(text, str(path))


def _toml_str(value: str) -> str:
    # A JSON string is a TOML basic string: the same quotes and escapes.
    return json.dumps(value, ensure_ascii=False)


def dump_featureset(fs: FeatureSet) -> str:
    """The TOML text that :func:`parse_featureset` reads back as ``fs`` (defaults left out)."""
    lines = [f"name = {_toml_str(fs.name)}", f"version = {fs.version}"]
    for f in fs.features:
        lines += ["", "[[features]]", f"name = {_toml_str(f.name)}"]
        lines += [f"owner = {_toml_str(f.owner.value)}", f"kind = {_toml_str(f.kind.value)}"]
        lines += [f"size = {f.size}"] if f.size != 1 else []
        lines += ['dtype = "string"'] if f.string_ids else []
        lines += [f"rows = {f.rows}"] if f.rows else []
        pairs = (
            ("map", f.map),
            ("evict", f.evict),
            ("space", f.space),
            ("role", f.role),
            ("changes", f.changes),
        )
        lines += [f"{k} = {_toml_str(v)}" for k, v in pairs if v]
        lines += [f"doc = {_toml_str(f.doc)}"] if f.doc else []
    if fs.retired:
        lines += ["", "[retired]"] + [f"{_toml_str(n)} = {_toml_str(why)}" for n, why in fs.retired.items()]
    return "\n".join(lines) + "\n"


def layout_summary(fs: FeatureSet) -> dict[str, dict[str, int]]:
    """Bytes each side of a request takes in the packed blocks the codec logs.

    Returns:
        Per side (``request``: user and context features, once per request; ``item``: per ranked
        item): ``features``, ``float_columns``, ``int_columns`` and ``bytes``.

    """
    out = {}
    for side in Side:
        layout = fs.layout(side)
        out[side.value] = {
            "features": len(layout.slots),
            "float_columns": layout.float_width,
            "int_columns": layout.int_width,
            "bytes": layout.row_bytes,
        }
    return out
