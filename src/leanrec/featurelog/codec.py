"""The logged blob: a compact, versioned binary encoding of frozen features.

A blob is a 16-byte header followed by raw little-endian buffers, with no per-value framing:

    magic "LR" | codec version u8 | blob kind u8 | FeatureSet fingerprint u32 | FeatureSet version u16
    | first position u16 | rows u16 | reserved u16

- ``REQUEST``: the request side (user and context features) of one request, once: its int block,
  then its float block.
- ``PAGE``: ``rows`` consecutive ranked items from ``first position``: item ids (int64), the item
  side's int block, the scores the ranker gave them (float32), then the item side's float block.
- ``IMPRESSION``: the naive layout, one item with the whole vector the model scored: item id, request
  and item side ints, its score, request and item side floats.

Content-addressed rows (the lazy logger's ``shared_rows`` option, see :mod:`leanrec.featurelog.rows`)
take three kinds more:

- ``ROW``: one shared feature row, stored once per distinct content under a key derived from its
  hash: an item's item side, or a request's slowly changing (``changes = "rarely"``) features. Its
  int block, then its float block; ``first position`` says which table it belongs to
  (:class:`RowTable`).
- ``PAGE_REFS``: a page that references its items' rows: item ids (int64), the rows' 64-bit hashes
  (uint64), the scores (float32).
- ``REQUEST_REFS``: the request side without its slowly changing features: the hash of their row
  (uint64), then the other features' int block and float block.

Ids are raw int64 and go first, after the 16-byte header, so they sit 8-byte aligned. A score is NaN
where the ranker gave none. Older blobs still decode, so a joiner reads what was logged before an
upgrade until the TTL takes it: version 2 held ids as int32 and the floats before the ints, version 1
held no scores either (NaN on decoding).

Decoding returns views over the blob (no copy) and refuses a blob of another FeatureSet
(:class:`ForeignBlobError`) or one that is not a whole blob of its kind (:class:`CodecError`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from leanrec.schema import FeatureBlock, FeatureSet, Side

MAGIC = b"LR"
CODEC_VERSION = 3
"""The version this codec writes."""
READS_VERSIONS = (1, 2, 3)
"""Versions it decodes: 2 is 3 with int32 ids after the floats, 1 is 2 without the scores."""
_HEADER = struct.Struct("<2sBBIHHHH")
HEADER_BYTES = _HEADER.size


class BlobKind(IntEnum):
    """What a blob holds."""

    REQUEST = 1
    PAGE = 2
    IMPRESSION = 3
    ROW = 4
    PAGE_REFS = 5
    REQUEST_REFS = 6


class RowTable(IntEnum):
    """Which shared rows a ROW blob belongs to (kept in its header's ``first position``)."""

    ITEM = 1  # every item-side feature
    SLOW = 2  # the request side's slowly changing features


class CodecError(ValueError):
    """A blob that cannot be decoded with the given FeatureSet, with the reason."""


class ForeignBlobError(CodecError):
    """A well-formed blob written under another FeatureSet (fingerprint or version): another reader's."""


@dataclass
class Page:
    """A decoded page of ranked items.

    Attributes:
        first_position: Rank position (0-based) of the first row.
        item_ids: ``(rows,)`` int64.
        block: Item-side features, ``rows`` rows.
        scores: ``(rows,)`` float32 the ranker's score of each item, NaN where it gave none.

    """

    first_position: int
    item_ids: np.ndarray
    block: FeatureBlock
    scores: np.ndarray


def _header(fs: FeatureSet, kind: BlobKind, first_position: int, rows: int) -> bytes:
    if not (0 <= first_position < 2**16 and 0 <= rows < 2**16):
        raise CodecError(f"position {first_position} or row count {rows} does not fit the header")
    return _HEADER.pack(MAGIC, CODEC_VERSION, kind, fs.fingerprint, fs.version, first_position, rows, 0)


def _check(fs: FeatureSet, blob: bytes, kind: BlobKind) -> tuple[int, int, int]:
    """Check a blob's header; returns its codec version, first position and row count."""
    if len(blob) < HEADER_BYTES:
        raise CodecError(f"blob of {len(blob)} B is shorter than its {HEADER_BYTES} B header")
    magic, version, got_kind, fp, fs_version, first, rows, _ = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise CodecError(f"not a leanrec blob (magic {magic!r})")
    if version not in READS_VERSIONS:
        raise CodecError(f"blob codec version {version}, this reader knows {list(READS_VERSIONS)}")
    if got_kind != kind:
        raise CodecError(f"expected a {kind.name} blob, got kind {got_kind}")
    if fp != fs.fingerprint or fs_version != fs.version:
        raise ForeignBlobError(
            f"blob written with FeatureSet fingerprint {fp:08x} v{fs_version}, "
            f"reader has {fs.name} {fs.fingerprint:08x} v{fs.version}"
        )
    return version, first, rows


def _f4(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype="<f4")


def _i8(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype="<i8")


def _id_dtype(version: int) -> np.dtype:
    """The dtype ids were written with in a blob of codec ``version``."""
    return np.dtype("<i8") if version >= 3 else np.dtype("<i4")


def _scores(scores: np.ndarray | None, n: int) -> np.ndarray:
    """``(n,)`` little-endian float32 scores; NaN for each when the ranker gave none."""
    if scores is None:
        return np.full(n, np.nan, "<f4")
    if len(scores) != n:
        raise CodecError(f"{len(scores)} scores for {n} ranked items")
    return _f4(scores)


def encode_request(fs: FeatureSet, block: FeatureBlock) -> bytes:
    """Encode one request's request-side features (a block of one row)."""
    if len(block) != 1:
        raise CodecError(f"a REQUEST blob holds one row, got {len(block)}")
    return b"".join((_header(fs, BlobKind.REQUEST, 0, 1), _i8(block.ints).data, _f4(block.floats).data))


def decode_request(fs: FeatureSet, blob: bytes) -> FeatureBlock:
    """Decode a REQUEST blob into a one-row block (views over ``blob``; a copy for older versions)."""
    version, _, _ = _check(fs, blob, BlobKind.REQUEST)
    lay = fs.layout(Side.REQUEST)
    ids = _id_dtype(version)
    expect = HEADER_BYTES + 4 * lay.float_width + ids.itemsize * lay.int_width
    if len(blob) != expect:
        raise CodecError(f"REQUEST blob is {len(blob)} B, layout needs {expect} B")
    if version >= 3:
        ints = np.frombuffer(blob, ids, lay.int_width, HEADER_BYTES).reshape(1, -1)
        floats = np.frombuffer(blob, "<f4", lay.float_width, HEADER_BYTES + 8 * lay.int_width)
        return FeatureBlock(floats.reshape(1, -1), ints)
    floats = np.frombuffer(blob, "<f4", lay.float_width, HEADER_BYTES).reshape(1, -1)
    ints = np.frombuffer(blob, ids, lay.int_width, HEADER_BYTES + 4 * lay.float_width).reshape(1, -1)
    return FeatureBlock(floats, ints.astype("<i8"))


def encode_page(
    fs: FeatureSet,
    first_position: int,
    item_ids: np.ndarray,
    block: FeatureBlock,
    scores: np.ndarray | None = None,
) -> bytes:
    """Encode ``len(item_ids)`` consecutive ranked items starting at ``first_position``.

    Args:
        fs: The FeatureSet.
        first_position: Rank position of the first item.
        item_ids: ``(rows,)`` ranked item ids.
        block: Item-side features, ``rows`` rows.
        scores: ``(rows,)`` the ranker's scores of these items; None stores NaN for each.

    """
    if len(item_ids) != len(block):
        raise CodecError(f"{len(item_ids)} item ids for {len(block)} feature rows")
    return b"".join(
        (
            _header(fs, BlobKind.PAGE, first_position, len(item_ids)),
            _i8(item_ids).data,
            _i8(block.ints).data,
            _scores(scores, len(item_ids)).data,
            _f4(block.floats).data,
        )
    )


def decode_page(fs: FeatureSet, blob: bytes) -> Page:
    """Decode a PAGE blob (views over ``blob``; a copy for older versions, NaN scores for version 1)."""
    version, first, rows = _check(fs, blob, BlobKind.PAGE)
    lay = fs.layout(Side.ITEM)
    idt = _id_dtype(version)
    per_row = idt.itemsize * (1 + lay.int_width) + 4 * lay.float_width + (4 if version >= 2 else 0)
    expect = HEADER_BYTES + rows * per_row
    if len(blob) != expect:
        raise CodecError(f"PAGE blob of {rows} rows is {len(blob)} B, layout needs {expect} B")
    off = HEADER_BYTES
    ids = np.frombuffer(blob, idt, rows, off)
    off += idt.itemsize * rows
    if version >= 3:
        ints = np.frombuffer(blob, idt, rows * lay.int_width, off).reshape(rows, lay.int_width)
        off += idt.itemsize * rows * lay.int_width
    scores = np.full(rows, np.nan, "<f4")
    if version >= 2:
        scores = np.frombuffer(blob, "<f4", rows, off)
        off += 4 * rows
    floats = np.frombuffer(blob, "<f4", rows * lay.float_width, off).reshape(rows, lay.float_width)
    off += 4 * rows * lay.float_width
    if version < 3:
        ints = np.frombuffer(blob, idt, rows * lay.int_width, off).reshape(rows, lay.int_width)
        ids, ints = ids.astype("<i8"), ints.astype("<i8")
    return Page(first, ids, FeatureBlock(floats, ints), scores)


def _impression_dtype(fs: FeatureSet, version: int = CODEC_VERSION) -> np.dtype:
    req, item = fs.layout(Side.REQUEST), fs.layout(Side.ITEM)
    score = [("score", "<f4")] if version >= 2 else []
    idt = _id_dtype(version)
    if version >= 3:
        return np.dtype(
            [
                ("header", f"V{HEADER_BYTES}"),
                ("item_id", idt),
                ("req_i", idt, (req.int_width,)),
                ("item_i", idt, (item.int_width,)),
                *score,
                ("req_f", "<f4", (req.float_width,)),
                ("item_f", "<f4", (item.float_width,)),
            ]
        )
    return np.dtype(
        [
            ("header", f"V{HEADER_BYTES}"),
            ("item_id", idt),
            *score,
            ("req_f", "<f4", (req.float_width,)),
            ("req_i", idt, (req.int_width,)),
            ("item_f", "<f4", (item.float_width,)),
            ("item_i", idt, (item.int_width,)),
        ]
    )


def encode_impressions(
    fs: FeatureSet,
    item_ids: np.ndarray,
    request: FeatureBlock,
    items: FeatureBlock,
    scores: np.ndarray | None = None,
) -> list[bytes]:
    """Encode each ranked item as its own IMPRESSION blob holding the request side too.

    This is the naive layout: the request side is repeated in every blob. The rows are packed in one
    structured array and cut into blobs, so the work is vectorised.

    Args:
        fs: The FeatureSet.
        item_ids: ``(n,)`` ranked item ids; position ``i`` is row ``i``.
        request: One-row request-side block.
        items: ``n``-row item-side block.
        scores: ``(n,)`` the ranker's scores; None stores NaN for each.

    """
    n = len(item_ids)
    rec = np.empty(n, dtype=_impression_dtype(fs))
    headers = b"".join(_header(fs, BlobKind.IMPRESSION, p, 1) for p in range(n))
    rec["header"] = np.frombuffer(headers, dtype=f"V{HEADER_BYTES}")
    rec["item_id"] = item_ids
    rec["score"] = _scores(scores, n)
    rec["req_f"] = request.floats
    rec["req_i"] = request.ints
    rec["item_f"] = items.floats
    rec["item_i"] = items.ints
    raw = rec.tobytes()
    size = rec.dtype.itemsize
    return [raw[i * size : (i + 1) * size] for i in range(n)]


def decode_impressions(
    fs: FeatureSet, blobs: list[bytes]
) -> tuple[np.ndarray, np.ndarray, FeatureBlock, FeatureBlock, np.ndarray]:
    """Decode many IMPRESSION blobs at once (of one codec version, as one request's are).

    Returns:
        positions ``(n,)``, item ids ``(n,)``, the request side repeated ``n`` rows, the item side
        ``n`` rows, scores ``(n,)`` float32 (NaN where the ranker gave none, and in version 1 blobs).

    """
    if not blobs:
        none = np.empty(0, np.float32)
        return (
            np.empty(0, np.int32),
            np.empty(0, np.int64),
            fs.layout(Side.REQUEST).zeros(),
            fs.layout(Side.ITEM).zeros(),
            none,
        )
    version = CODEC_VERSION
    if len(blobs[0]) >= HEADER_BYTES and blobs[0][2] in READS_VERSIONS:
        version = blobs[0][2]  # the layout the first blob says; others of another version are refused below
    dtype = _impression_dtype(fs, version)
    bad = [b for b in blobs if len(b) != dtype.itemsize]
    if bad:
        _check(fs, bad[0], BlobKind.IMPRESSION)  # a blob of another FeatureSet: say so, not just its size
        raise CodecError(f"IMPRESSION blob is {len(bad[0])} B, layout needs {dtype.itemsize} B")
    _check(fs, blobs[0], BlobKind.IMPRESSION)
    rec = np.frombuffer(b"".join(blobs), dtype=dtype)
    head = np.frombuffer(rec["header"].tobytes(), np.uint8).reshape(len(rec), HEADER_BYTES)
    fixed = 10  # magic, codec version, kind, fingerprint, FeatureSet version
    odd = np.flatnonzero((head[:, :fixed] != head[0, :fixed]).any(axis=1))
    if len(odd):  # the first passed the check, so this one fails it: say why, as its own type
        try:
            _check(fs, blobs[int(odd[0])], BlobKind.IMPRESSION)
        except CodecError as err:
            raise type(err)(
                f"IMPRESSION blobs of different FeatureSets or codec versions in one batch: {err}"
            ) from None
    positions = head[:, fixed : fixed + 2].copy().view("<u2").ravel().astype(np.int32)
    wide = version < 3  # int32 ids of older versions: widen (a copy)
    request = FeatureBlock(rec["req_f"], rec["req_i"].astype("<i8") if wide else rec["req_i"])
    items = FeatureBlock(rec["item_f"], rec["item_i"].astype("<i8") if wide else rec["item_i"])
    scores = rec["score"] if version >= 2 else np.full(len(rec), np.nan, "<f4")
    item_ids = rec["item_id"].astype("<i8") if wide else rec["item_id"]
    return positions, item_ids, request, items, scores


# ------------------------------------------------------------------------ content-addressed rows
@dataclass(frozen=True)
class SlowColumns:
    """Where the request side's slowly changing features sit in its blocks, and the others.

    Attributes:
        floats: ``(F,)`` int64 float-block columns of the ``changes = "rarely"`` features.
        ints: ``(I,)`` int64 int-block columns of those features.
        fast_floats: The other float-block columns.
        fast_ints: The other int-block columns.

    """

    floats: np.ndarray
    ints: np.ndarray
    fast_floats: np.ndarray
    fast_ints: np.ndarray

    def __bool__(self) -> bool:
        return bool(len(self.floats) or len(self.ints))


_SLOW: dict[tuple[int, int], SlowColumns] = {}


def slow_columns(fs: FeatureSet) -> SlowColumns:
    """The request side's slowly changing columns (by the FeatureSet's roles, never names)."""
    got = _SLOW.get((fs.fingerprint, fs.version))
    if got is not None:
        return got
    lay = fs.layout(Side.REQUEST)
    slow_f = np.zeros(lay.float_width, bool)
    slow_i = np.zeros(lay.int_width, bool)
    for slot in lay.slots:
        if slot.feature.rarely:
            (slow_f if slot.feature.is_float else slow_i)[slot.offset : slot.stop] = True
    got = SlowColumns(
        np.flatnonzero(slow_f), np.flatnonzero(slow_i), np.flatnonzero(~slow_f), np.flatnonzero(~slow_i)
    )
    _SLOW[(fs.fingerprint, fs.version)] = got
    return got


def _row_widths(fs: FeatureSet, table: RowTable) -> tuple[int, int]:
    """Float and int widths of one shared row of ``table``."""
    if table is RowTable.ITEM:
        lay = fs.layout(Side.ITEM)
        return lay.float_width, lay.int_width
    cols = slow_columns(fs)
    return len(cols.floats), len(cols.ints)


def _row_dtype(fs: FeatureSet, table: RowTable) -> np.dtype:
    fw, iw = _row_widths(fs, table)
    return np.dtype([("header", f"V{HEADER_BYTES}"), ("ints", "<i8", (iw,)), ("floats", "<f4", (fw,))])


def encode_rows(fs: FeatureSet, table: RowTable, block: FeatureBlock) -> list[bytes]:
    """Encode each row of ``block`` as its own ROW blob (packed in one array, then cut: vectorised).

    Args:
        fs: The FeatureSet.
        table: Which shared rows these are.
        block: ``n`` rows of the table's columns (the item layout, or the slow columns).

    """
    dtype = _row_dtype(fs, table)
    rec = np.empty(len(block), dtype)
    rec["header"] = np.frombuffer(_header(fs, BlobKind.ROW, int(table), 1), f"V{HEADER_BYTES}")[0]
    rec["ints"] = block.ints
    rec["floats"] = block.floats
    raw, size = rec.tobytes(), dtype.itemsize
    return [raw[i * size : (i + 1) * size] for i in range(len(rec))]


def decode_rows(fs: FeatureSet, table: RowTable, blobs: list[bytes]) -> FeatureBlock:
    """Decode ROW blobs of one table at once into an ``n``-row block (views over one joined buffer).

    Raises:
        ForeignBlobError: A row written under another FeatureSet.
        CodecError: A blob that is not a whole ROW of ``table``.

    """
    dtype = _row_dtype(fs, table)
    fw, iw = _row_widths(fs, table)
    if not blobs:
        return FeatureBlock(np.zeros((0, fw), "<f4"), np.zeros((0, iw), "<i8"))
    expect = _header(fs, BlobKind.ROW, int(table), 1)
    for blob in (b for b in blobs if len(b) != dtype.itemsize or blob_header(b) != expect):
        first = _check(fs, blob, BlobKind.ROW)[1]
        if first != table:
            raise CodecError(f"expected a {table.name} row, got row table {first}")
        raise CodecError(f"ROW blob of {len(blob)} B is not a {table.name} row ({dtype.itemsize} B)")
    rec = np.frombuffer(b"".join(blobs), dtype)
    return FeatureBlock(rec["floats"].reshape(len(rec), fw), rec["ints"].reshape(len(rec), iw))


def blob_header(blob: bytes) -> bytes:
    """The header bytes of a blob (compared whole where every blob of a batch must share it)."""
    return blob[:HEADER_BYTES]


def blob_kind(blob: bytes) -> int:
    """The kind byte of a blob's header (0 for a blob too short to have one)."""
    return blob[3] if len(blob) >= HEADER_BYTES else 0


def encode_page_refs(
    fs: FeatureSet,
    first_position: int,
    item_ids: np.ndarray,
    row_hashes: np.ndarray,
    scores: np.ndarray | None = None,
) -> bytes:
    """Encode a page that references its items' shared rows by hash.

    Args:
        fs: The FeatureSet.
        first_position: Rank position of the first item.
        item_ids: ``(rows,)`` ranked item ids.
        row_hashes: ``(rows,)`` uint64 hash of each item's ROW.
        scores: ``(rows,)`` the ranker's scores; None stores NaN for each.

    """
    if len(item_ids) != len(row_hashes):
        raise CodecError(f"{len(item_ids)} item ids for {len(row_hashes)} row hashes")
    return b"".join(
        (
            _header(fs, BlobKind.PAGE_REFS, first_position, len(item_ids)),
            _i8(item_ids).data,
            np.ascontiguousarray(row_hashes, "<u8").data,
            _scores(scores, len(item_ids)).data,
        )
    )


@dataclass
class PageRefs:
    """A decoded PAGE_REFS blob: like :class:`Page`, with row hashes in place of the features."""

    first_position: int
    item_ids: np.ndarray
    row_hashes: np.ndarray
    scores: np.ndarray


def decode_page_refs(fs: FeatureSet, blob: bytes) -> PageRefs:
    """Decode a PAGE_REFS blob (views over ``blob``)."""
    _, first, rows = _check(fs, blob, BlobKind.PAGE_REFS)
    expect = HEADER_BYTES + 20 * rows
    if len(blob) != expect:
        raise CodecError(f"PAGE_REFS blob of {rows} rows is {len(blob)} B, layout needs {expect} B")
    ids = np.frombuffer(blob, "<i8", rows, HEADER_BYTES)
    hashes = np.frombuffer(blob, "<u8", rows, HEADER_BYTES + 8 * rows)
    scores = np.frombuffer(blob, "<f4", rows, HEADER_BYTES + 16 * rows)
    return PageRefs(first, ids, hashes, scores)


def encode_request_refs(fs: FeatureSet, fast: FeatureBlock, slow_hash: int) -> bytes:
    """Encode one request's request side without its slowly changing features, and their row's hash.

    Args:
        fs: The FeatureSet.
        fast: The request side's other columns (``slow_columns(fs).fast_floats`` and
            ``.fast_ints``), one row.
        slow_hash: Hash of the ROW holding its slowly changing features.

    """
    cols = slow_columns(fs)
    if fast.floats.shape != (1, len(cols.fast_floats)) or fast.ints.shape != (1, len(cols.fast_ints)):
        raise CodecError(f"a REQUEST_REFS blob holds one row of the other columns, got {fast.floats.shape}")
    return b"".join(
        (
            _header(fs, BlobKind.REQUEST_REFS, 0, 1),
            np.array([slow_hash], "<u8").data,
            _i8(fast.ints).data,
            _f4(fast.floats).data,
        )
    )


def decode_request_refs(fs: FeatureSet, blob: bytes) -> tuple[int, FeatureBlock]:
    """Decode a REQUEST_REFS blob: the slow row's hash and the other columns, one row (views)."""
    _check(fs, blob, BlobKind.REQUEST_REFS)
    cols = slow_columns(fs)
    fw, iw = len(cols.fast_floats), len(cols.fast_ints)
    expect = HEADER_BYTES + 8 + 8 * iw + 4 * fw
    if len(blob) != expect:
        raise CodecError(f"REQUEST_REFS blob is {len(blob)} B, layout needs {expect} B")
    slow_hash = int(np.frombuffer(blob, "<u8", 1, HEADER_BYTES)[0])
    ints = np.frombuffer(blob, "<i8", iw, HEADER_BYTES + 8).reshape(1, iw)
    floats = np.frombuffer(blob, "<f4", fw, HEADER_BYTES + 8 + 8 * iw).reshape(1, fw)
    return slow_hash, FeatureBlock(floats, ints)


def join_request(fs: FeatureSet, fast: FeatureBlock, slow: FeatureBlock) -> FeatureBlock:
    """The whole request side (one row) from its other columns and its slowly changing ones."""
    cols = slow_columns(fs)
    out = fs.layout(Side.REQUEST).zeros(1)
    out.floats[:, cols.fast_floats] = fast.floats
    out.ints[:, cols.fast_ints] = fast.ints
    out.floats[:, cols.floats] = slow.floats
    out.ints[:, cols.ints] = slow.ints
    return out
