"""The FeatureSet: the one registry every schema in leanrec is derived from.

A feature has an owner (user, item or context), a kind (dense floats, one sparse id, a fixed-width
multi-hot set of ids, an id sequence), a size (values per entity) and, for ids, the embedding rows a
model maps them into and how (see :attr:`Feature.map`). Every feature is fixed-width, so the features
of N entities pack into two contiguous blocks: one of float32 (dense kinds) and one of int64 (id
kinds, padded with ``PAD_ID``). The codec writes those blocks as raw little-endian buffers, the
warehouse turns their column slices into Arrow columns, and a model reads its inputs from the same
slices: none of them is written by hand.

Ids are the catalog's own, raw 64-bit integers of any value but ``PAD_ID`` (string ids are hashed to
64 bits at the edge, see :func:`leanrec.ids.string_ids`); nothing stores a row number. Which row of an
embedding table an id reads is the model's business, declared per feature (``map`` and ``rows``) and
kept out of the data's shape: a FeatureSet that maps ids otherwise reads the same data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property

import numpy as np

PAD_ID = -1
"""Padding value of multi-hot sets and id sequences shorter than their size; no id may take it."""

ID_MAPS = ("hash", "qr", "managed")
"""How a model maps an id feature's raw ids to embedding rows (see :attr:`Feature.map`)."""

EVICTIONS = ("lfu", "lru")
"""How a managed map chooses the row a newly admitted id takes (see :attr:`Feature.evict`)."""

CHANGES = ("request", "rarely")
"""How often a feature's value changes (see :attr:`Feature.changes`)."""

DEFAULT_ID_MAP = "managed"
"""The map of an id feature that declares none: collisionless while its rows hold every id, and
beyond that a row for each id that earns one (the frequent ones, which carry most of the traffic)."""


class Owner(StrEnum):
    """Whose property a feature is."""

    USER = "user"
    ITEM = "item"
    CONTEXT = "context"


class Kind(StrEnum):
    """How a feature's values are shaped."""

    DENSE = "dense"
    SPARSE = "sparse"
    MULTI_HOT = "multi_hot"
    SEQUENCE = "sequence"


class Role(StrEnum):
    """What a model needs to know about a feature beyond its shape.

    A model finds its inputs by role, never by name: the item's id (whose embedding table the history
    shares), the user's id, and the user's history (an id sequence of items, most recent first).
    Vectors that share an embedding space say so with ``Feature.space`` instead, since several pairs
    may share one.
    """

    ITEM_ID = "item_id"
    USER_ID = "user_id"
    HISTORY = "history"


ROLE_SHAPES: dict[Role, tuple[tuple[Owner, ...], Kind]] = {
    Role.ITEM_ID: ((Owner.ITEM,), Kind.SPARSE),
    Role.USER_ID: ((Owner.USER,), Kind.SPARSE),
    Role.HISTORY: ((Owner.USER,), Kind.SEQUENCE),
}
"""The owners and the kind a feature of each role must have."""


class Side(StrEnum):
    """Which half of a ranked request a feature belongs to.

    The request side (user and context features) is the same for all items of a request and is
    logged and stored once per request; the item side is one row per ranked item.
    """

    REQUEST = "request"
    ITEM = "item"


SIDE_OWNERS: dict[Side, tuple[Owner, ...]] = {
    Side.REQUEST: (Owner.USER, Owner.CONTEXT),
    Side.ITEM: (Owner.ITEM,),
}


@dataclass(frozen=True)
class Feature:
    """One registered feature.

    Attributes:
        name: Unique name across the FeatureSet; it is also the warehouse column name.
        owner: Who the feature describes.
        kind: Value shape.
        size: Values per entity (1 for a scalar or a single id; the width of a vector, set or sequence).
        rows: For id kinds, the rows of the embedding table a model maps the ids into (its memory),
            0 for dense. The ids themselves may be any 64-bit value but ``PAD_ID``.
        doc: What the feature is, for reports and audits.
        space: For dense vectors: the name of the embedding space they live in (e.g. a pretrained
            two-tower's). A user-side and an item-side vector of one space can be compared by a dot
            product, and the late ranker does so.
        role: What a model reads it as (see :class:`Role`), or ``""`` for an ordinary input.
        map: For id kinds, how a model maps an id to a row (one of ``ID_MAPS``; ``""`` is
            ``DEFAULT_ID_MAP``): ``hash`` (modulo the rows), ``qr`` (the quotient-remainder trick, two
            smaller tables whose product rarely collides) or ``managed`` (a row for each id that earns
            one, a shared residual hash for the rest).
        evict: For a managed map, the row a newcomer takes when every row is held: ``lfu`` (the
            least frequent, counts decaying; the default) or ``lru`` (the least recently seen).
        string_ids: The ids arrive as strings and are hashed to 64 bits at the edge.
        changes: How often the value changes: ``request`` (may differ from one request to the
            next: counters, context, recent history; ``""`` means it) or ``rarely`` (slowly
            changing: ids, embeddings, categories, long-term profiles). The deduplicated warehouse
            layout stores an owner's ``rarely`` features and the rest apart, each once per distinct
            value, so that a counter's drift does not copy the embedding beside it; nothing else
            reads it.

    """

    name: str
    owner: Owner
    kind: Kind
    size: int = 1
    rows: int = 0
    doc: str = ""
    space: str = ""
    role: str = ""
    map: str = ""
    evict: str = ""
    string_ids: bool = False
    changes: str = ""

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"feature name {self.name!r} must be an identifier")
        if self.size < 1:
            raise ValueError(f"feature {self.name}: size must be >= 1, got {self.size}")
        if self.kind is Kind.SPARSE and self.size != 1:
            raise ValueError(f"feature {self.name}: a sparse id has size 1, got {self.size}")
        if self.kind is Kind.DENSE:
            if self.rows or self.map or self.evict or self.string_ids:
                raise ValueError(
                    f"feature {self.name}: rows, map, evict and string ids are for id kinds, not dense"
                )
        else:
            if self.map and self.map not in ID_MAPS:
                raise ValueError(
                    f"feature {self.name}: unknown map {self.map!r} (known: {', '.join(ID_MAPS)})"
                )
            if self.rows < (2 if self.id_map == "qr" else 1):
                raise ValueError(
                    f"feature {self.name}: a {self.id_map} map needs its embedding rows "
                    f"(rows >= {2 if self.id_map == 'qr' else 1}), got {self.rows}"
                )
            if self.evict and (self.id_map != "managed" or self.evict not in EVICTIONS):
                raise ValueError(
                    f"feature {self.name}: evict is {' or '.join(EVICTIONS)} and only for a managed map, "
                    f"got {self.evict!r} with a {self.id_map} map"
                )
        if self.changes and self.changes not in CHANGES:
            raise ValueError(f"feature {self.name}: changes is {' or '.join(CHANGES)}, got {self.changes!r}")
        if self.space and self.kind is not Kind.DENSE:
            raise ValueError(f"feature {self.name}: only dense vectors live in an embedding space")
        if self.role:
            if self.role not in Role.__members__.values():
                known = ", ".join(r.value for r in Role)
                raise ValueError(f"feature {self.name}: unknown role {self.role!r} (known: {known})")
            owners, kind = ROLE_SHAPES[Role(self.role)]
            if self.owner not in owners or self.kind is not kind:
                raise ValueError(
                    f"feature {self.name}: the {self.role} role needs a {kind.value} feature of the "
                    f"{' or '.join(o.value for o in owners)}, "
                    f"got a {self.kind.value} of the {self.owner.value}"
                )

    @property
    def is_float(self) -> bool:
        """Whether the feature lives in the float32 block (dense) or the int64 block (ids)."""
        return self.kind is Kind.DENSE

    @property
    def dtype(self) -> np.dtype:
        """Numpy dtype of one value, little-endian."""
        return np.dtype("<f4") if self.is_float else np.dtype("<i8")

    @property
    def id_map(self) -> str:
        """The map of an id feature, its default resolved; ``""`` for dense."""
        return "" if self.is_float else (self.map or DEFAULT_ID_MAP)

    @property
    def id_evict(self) -> str:
        """The eviction of a managed map, its default resolved; ``""`` for other maps."""
        return (self.evict or EVICTIONS[0]) if self.id_map == "managed" else ""

    @property
    def rarely(self) -> bool:
        """Whether the feature is declared slowly changing (``changes = "rarely"``)."""
        return self.changes == "rarely"

    @property
    def side(self) -> Side:
        """The half of a request this feature belongs to."""
        return Side.ITEM if self.owner is Owner.ITEM else Side.REQUEST

    def to_dict(self) -> dict[str, object]:
        """JSON-ready description."""
        return {
            "name": self.name,
            "owner": self.owner.value,
            "kind": self.kind.value,
            "size": self.size,
            "rows": self.rows,
            "doc": self.doc,
            "space": self.space,
            "role": self.role,
            "map": self.map,
            "evict": self.evict,
            "string_ids": self.string_ids,
            "changes": self.changes,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> Feature:
        """Inverse of :meth:`to_dict`; reads the ``vocab`` of FeatureSets written before ``rows``."""
        return cls(
            str(d["name"]),
            Owner(d["owner"]),
            Kind(d["kind"]),
            int(d["size"]),
            int(d.get("rows", d.get("vocab", 0))),
            str(d.get("doc", "")),
            str(d.get("space", "")),
            str(d.get("role", "")),
            str(d.get("map", "")),
            str(d.get("evict", "")),
            bool(d.get("string_ids", False)),
            str(d.get("changes", "")),
        )


@dataclass(frozen=True)
class Slot:
    """Where one feature's values sit inside a side's packed blocks."""

    feature: Feature
    offset: int  # first column inside the float block (dense) or the int block (ids)

    @property
    def stop(self) -> int:
        """One past the last column."""
        return self.offset + self.feature.size


@dataclass(frozen=True)
class Layout:
    """The packing of one side's features into a float32 block and an int64 block.

    Attributes:
        side: Request side or item side.
        slots: One slot per feature, in FeatureSet order.
        float_width: Columns of the float32 block.
        int_width: Columns of the int64 block.

    """

    side: Side
    slots: tuple[Slot, ...]
    float_width: int
    int_width: int

    @property
    def row_bytes(self) -> int:
        """Bytes one entity's features take in the packed blocks (float32 and int64 values)."""
        return 4 * self.float_width + 8 * self.int_width

    @property
    def names(self) -> list[str]:
        """Feature names in order."""
        return [s.feature.name for s in self.slots]

    def zeros(self, n: int = 0) -> FeatureBlock:
        """A block of ``n`` zero rows of this layout."""
        return FeatureBlock(np.zeros((n, self.float_width), "<f4"), np.zeros((n, self.int_width), "<i8"))


@dataclass(frozen=True)
class FeatureSet:
    """A versioned, typed registry of features.

    Attributes:
        name: Lineage name; versions of one lineage share it.
        version: Increases whenever features are added or retired.
        features: The registered features, in a fixed order.
        retired: Names retired from earlier versions, with the reason, kept so that old warehouse data
            and audit reports stay explainable.

    """

    name: str
    version: int
    features: tuple[Feature, ...]
    retired: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [f.name for f in self.features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"FeatureSet {self.name}: duplicate feature names {dupes}")
        if not 0 <= self.version < 2**16:
            raise ValueError(f"FeatureSet version must fit in 16 bits, got {self.version}")
        for role in Role:
            if len(held := [f.name for f in self.features if f.role == role]) > 1:
                raise ValueError(f"FeatureSet {self.name}: one feature may have the {role} role, got {held}")
        history, item = self.role(Role.HISTORY), self.role(Role.ITEM_ID)
        if history is not None and (item is None or _table(item) != _table(history)):
            # The history's ids are items: it shares the item id's embedding table and map.
            raise ValueError(
                f"FeatureSet {self.name}: the history {history.name} holds item ids, so it needs an "
                f"item_id feature of the same table ({_describe_table(history)})"
                + ("" if item is None else f", got {item.name} with {_describe_table(item)}")
            )

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"no feature {name!r} in FeatureSet {self.name} v{self.version}")

    def role(self, role: Role) -> Feature | None:
        """The feature that has ``role``, or None if this FeatureSet has none."""
        return next((f for f in self.features if f.role == role), None)

    def of(self, *owners: Owner) -> list[Feature]:
        """Features of the given owners, in registry order."""
        return [f for f in self.features if f.owner in owners]

    @cached_property
    def layouts(self) -> dict[Side, Layout]:
        """Packing of each side: owners in ``SIDE_OWNERS`` order, features in registry order."""
        out = {}
        for side, owners in SIDE_OWNERS.items():
            slots, fw, iw = [], 0, 0
            for owner in owners:
                for f in self.of(owner):
                    if f.is_float:
                        slots.append(Slot(f, fw))
                        fw += f.size
                    else:
                        slots.append(Slot(f, iw))
                        iw += f.size
            out[side] = Layout(side, tuple(slots), fw, iw)
        return out

    def layout(self, side: Side) -> Layout:
        """Packing of one side."""
        return self.layouts[side]

    def widths(self, owner: Owner) -> tuple[int, int]:
        """Float and int columns of one owner's block.

        A side's block is its owners' blocks side by side (``FeatureBlock.hstack``) in ``SIDE_OWNERS``
        order, so an owner's block can be fetched and stored on its own.
        """
        feats = self.of(owner)
        return (sum(f.size for f in feats if f.is_float), sum(f.size for f in feats if not f.is_float))

    def owner_slots(self, owner: Owner) -> dict[str, Slot]:
        """Slots of one owner's features, with offsets inside that owner's own block."""
        return self._owner_slots[owner]

    @cached_property
    def _owner_slots(self) -> dict[Owner, dict[str, Slot]]:
        out: dict[Owner, dict[str, Slot]] = {}
        for owner in Owner:
            fw = iw = 0
            slots = out[owner] = {}
            for f in self.of(owner):
                if f.is_float:
                    slots[f.name] = Slot(f, fw)
                    fw += f.size
                else:
                    slots[f.name] = Slot(f, iw)
                    iw += f.size
        return out

    def retire(self, reasons: Mapping[str, str]) -> FeatureSet:
        """The next version of this lineage without the named features, e.g. after a feature audit.

        Survivors keep their order, so the new layouts are the old ones with the retired columns cut
        out, and data written under this version stays readable under the next (see :meth:`reads`).

        Args:
            reasons: Name of each feature to retire -> why (kept in ``retired`` for reports).

        Returns:
            A FeatureSet of the same name, ``version + 1``, whose ``retired`` is this one's plus
            ``reasons``.

        Raises:
            ValueError: ``reasons`` is empty or names features this version does not have.

        """
        if not reasons:
            raise ValueError(f"FeatureSet {self.name} v{self.version}: no features named to retire")
        have = {f.name for f in self.features}
        if unknown := sorted(set(reasons) - have):
            raise ValueError(f"FeatureSet {self.name} v{self.version} has no features {unknown} to retire")
        return FeatureSet(
            self.name,
            self.version + 1,
            tuple(f for f in self.features if f.name not in reasons),
            {**self.retired, **reasons},
        )

    def read_conflicts(self, written: FeatureSet) -> list[str]:
        """Why data written under ``written`` cannot be read under this FeatureSet (empty when it can).

        Reading takes this FeatureSet's features from the written data by name, so it needs the same
        lineage, a version no older than the written one (a reader never guesses at a future
        version's features), and every feature of its own present in ``written`` with the same owner,
        kind, size and id type (raw or string ids); the rows and maps of ids are a model's business and
        may differ. Features ``written`` has beyond those (retired since) are skipped.
        """
        if written.name != self.name:
            return [f"another lineage ({written.name!r}, not {self.name!r})"]
        out = []
        if written.version > self.version:
            out.append(f"written under a newer version (v{written.version} > v{self.version})")
        old = {f.name: f for f in written.features}
        if missing := [f.name for f in self.features if f.name not in old]:
            out.append(f"features not in the written FeatureSet: {missing}")
        if reshaped := [f.name for f in self.features if f.name in old and _shape(old[f.name]) != _shape(f)]:
            out.append(f"features of another shape: {reshaped}")
        return out

    def reads(self, written: FeatureSet) -> bool:
        """Whether data written under ``written`` can be read under this FeatureSet.

        True for ``written`` itself and for every earlier version this one retired features from;
        see :meth:`read_conflicts` for the rules and the reasons when it is False.
        """
        return not self.read_conflicts(written)

    def columns_from(self, written: FeatureSet, side: Side) -> tuple[np.ndarray, np.ndarray]:
        """Columns of ``written``'s blocks of ``side`` that make up this FeatureSet's blocks of it.

        Returns:
            ``(float_width,)`` and ``(int_width,)`` int64 indices into ``written``'s float and int
            blocks of ``side``, in this FeatureSet's column order.

        Raises:
            ValueError: Data written under ``written`` cannot be read under this FeatureSet.

        """
        if conflicts := self.read_conflicts(written):
            raise ValueError(
                f"FeatureSet {self.name} v{self.version} cannot read {written.name} v{written.version}: "
                + "; ".join(conflicts)
            )
        src = {s.feature.name: s for s in written.layout(side).slots}
        out = []
        for is_float in (True, False):
            slots = [src[s.feature.name] for s in self.layout(side).slots if s.feature.is_float is is_float]
            starts = np.array([s.offset for s in slots], np.int64)
            sizes = np.array([s.feature.size for s in slots], np.int64)
            # Each feature's columns are a run from its old offset: shift a global arange per run.
            shift = np.repeat(starts - (np.cumsum(sizes) - sizes), sizes)
            out.append(shift + np.arange(sizes.sum(), dtype=np.int64))
        return out[0], out[1]

    def project(self, block: FeatureBlock, written: FeatureSet, side: Side) -> FeatureBlock:
        """A block of ``side`` in this FeatureSet's layout, from one in ``written``'s layout.

        The retired columns are dropped; the result owns its bytes (a gather, not a view), so it can
        be frozen and logged as it is.

        Raises:
            ValueError: Data written under ``written`` cannot be read under this FeatureSet.

        """
        return block.take_columns(*self.columns_from(written, side))

    @cached_property
    def fingerprint(self) -> int:
        """32-bit hash of the shape of every feature: blobs carry it so a mismatch is caught.

        The shape is what :meth:`read_conflicts` compares: owner, kind, size and, for features of
        string ids, that their ids are hashes of strings (raw ids add nothing, so their hash is
        what it is without the mark). How ids map to rows is left out: it changes no byte.
        """
        shape = [
            (f.name, f.owner.value, f.kind.value, f.size, *(["string"] if f.string_ids else []))
            for f in self.features
        ]
        digest = hashlib.blake2b(json.dumps([self.name, shape]).encode(), digest_size=4).digest()
        return int.from_bytes(digest, "little")

    def to_json(self) -> str:
        """Serialise the registry, e.g. into warehouse file metadata."""
        return json.dumps(
            {
                "name": self.name,
                "version": self.version,
                "features": [f.to_dict() for f in self.features],
                "retired": self.retired,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> FeatureSet:
        """Inverse of :meth:`to_json`."""
        d = json.loads(text)
        feats = tuple(Feature.from_dict(f) for f in d["features"])
        return cls(d["name"], d["version"], feats, dict(d.get("retired", {})))


def _shape(f: Feature) -> tuple[Owner, Kind, int, bool]:
    """What must match for values of one feature to be read as another's."""
    return f.owner, f.kind, f.size, f.string_ids


def _table(f: Feature) -> tuple[int, str, str, bool]:
    """What an id feature's embedding table is: its rows, its map, its eviction, its id type."""
    return f.rows, f.id_map, f.id_evict, f.string_ids


def _describe_table(f: Feature) -> str:
    rows, id_map, evict, strings = _table(f)
    return (
        f"{rows} rows, map {id_map}"
        + (f", evict {evict}" if evict else "")
        + (", string ids" if strings else "")
    )


@dataclass
class FeatureBlock:
    """Features of N entities of one side, packed as the side's Layout says.

    Attributes:
        floats: ``(N, layout.float_width)`` float32.
        ints: ``(N, layout.int_width)`` int64.

    """

    floats: np.ndarray
    ints: np.ndarray

    def __len__(self) -> int:
        return self.floats.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by both blocks."""
        return self.floats.nbytes + self.ints.nbytes

    def take(self, rows: np.ndarray | slice) -> FeatureBlock:
        """A block of the selected rows (a copy for index arrays, a view for slices)."""
        return FeatureBlock(self.floats[rows], self.ints[rows])

    def take_columns(self, float_cols: np.ndarray, int_cols: np.ndarray) -> FeatureBlock:
        """A block of the selected float and int columns, in that order (a copy).

        Args:
            float_cols: ``(F,)`` column indices into ``floats``.
            int_cols: ``(I,)`` column indices into ``ints``.

        """
        return FeatureBlock(np.take(self.floats, float_cols, axis=1), np.take(self.ints, int_cols, axis=1))

    def copy(self) -> FeatureBlock:
        """An independent copy: freezing features means owning their bytes."""
        return FeatureBlock(self.floats.copy(), self.ints.copy())

    @staticmethod
    def concat(blocks: list[FeatureBlock]) -> FeatureBlock:
        """Stack blocks of the same layout row-wise."""
        return FeatureBlock(
            np.concatenate([b.floats for b in blocks]), np.concatenate([b.ints for b in blocks])
        )

    @staticmethod
    def hstack(blocks: list[FeatureBlock]) -> FeatureBlock:
        """Join blocks of different owners column-wise (e.g. user then context)."""
        return FeatureBlock(np.hstack([b.floats for b in blocks]), np.hstack([b.ints for b in blocks]))

    def same_bytes(self, other: FeatureBlock) -> bool:
        """Whether both blocks hold exactly the same bytes (NaN payloads and -0.0 included)."""
        return (
            self.floats.shape == other.floats.shape
            and self.ints.shape == other.ints.shape
            and np.array_equal(self.floats.view(np.uint32), other.floats.view(np.uint32))
            and np.array_equal(self.ints, other.ints)
        )

    def row_fingerprints(self) -> np.ndarray:
        """``(N,)`` uint64 hash of each row's exact bytes, to check frozen features byte for byte."""
        bits = np.hstack([self.floats.view(np.uint32), self.ints.view(np.uint32)]).astype(np.uint64)
        weights = np.random.default_rng(0x1EA4).integers(1, 2**63, size=bits.shape[1], dtype=np.uint64)
        return (bits * weights).sum(axis=1, dtype=np.uint64)  # wraps modulo 2**64
