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
