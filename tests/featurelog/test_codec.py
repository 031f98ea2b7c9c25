"""The logged blob: byte-exact round trips, no per-value framing, and refusals."""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest

from leanrec.featurelog import codec
from leanrec.featurelog.codec import HEADER_BYTES, BlobKind, CodecError, ForeignBlobError, RowTable
from leanrec.schema import PAD_ID, FeatureBlock, FeatureSet, Side
from leanrec.world import default_featureset

EXTREME_IDS = np.array([2**63 - 1, -(2**63), -2, 2**63 - 2, -(2**63) + 1, 2**32, -(2**31) - 1], np.int64)
"""Ids no int32 holds, the int64 extremes among them (any value but the padding id is an id)."""


@pytest.fixture(scope="module")
def fs() -> FeatureSet:
    return default_featureset()[0]


def _random_block(fs: FeatureSet, side: Side, rows: int, seed: int, id_bits: int = 64) -> FeatureBlock:
    """Rows of arbitrary bit patterns: NaNs with payloads, infinities, subnormals, -0.0 among them.

    Ids are arbitrary ``id_bits``-bit integers: with 64, the int64 extremes and padding among them;
    with 32, what the int32 ids of codec versions 1 and 2 could hold.
    """
    lay = fs.layout(side)
    rng = np.random.default_rng(seed)
    floats = rng.integers(0, 2**32, (rows, lay.float_width), dtype=np.uint32).view("<f4")
    top = 2 ** (id_bits - 1)
    ints = rng.integers(-top, top, (rows, lay.int_width), dtype=np.int64)
    if id_bits == 64:
        ints[:, : len(EXTREME_IDS)] = EXTREME_IDS
        ints[:, len(EXTREME_IDS)] = PAD_ID
    specials = np.array([0x80000000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x7F800000, 0x00000001], np.uint32)
    floats.view(np.uint32)[:, : len(specials)] = specials  # -0.0, NaNs (quiet, negative, signalling), ...
    floats[:, -1] = -0.0
    floats[0, -2] = np.nan
    return FeatureBlock(floats, ints)


def _scores(rows: int, seed: int) -> np.ndarray:
    """Scores of arbitrary bit patterns, a NaN with a payload and -0.0 among them."""
    scores = np.random.default_rng(seed).integers(0, 2**32, rows, dtype=np.uint32).view("<f4")
    scores.view(np.uint32)[:2] = [0xFFC00001, 0x80000000][:rows]
    return scores


def _v2_header(fs: FeatureSet, kind: BlobKind, first: int, rows: int) -> bytes:
    return struct.pack("<2sBBIHHHH", b"LR", 2, kind, fs.fingerprint, fs.version, first, rows, 0)


def _i4(a: np.ndarray) -> bytes:
    assert (np.asarray(a) == np.asarray(a).astype("<i4")).all()  # what version 2 could hold
    return np.asarray(a).astype("<i4").tobytes()


def _v2_request(fs: FeatureSet, block: FeatureBlock) -> bytes:
    """A REQUEST blob as codec version 2 wrote it: the floats, then the ints as int32."""
    return _v2_header(fs, BlobKind.REQUEST, 0, 1) + block.floats.astype("<f4").tobytes() + _i4(block.ints)


def _v2_page(fs: FeatureSet, first: int, ids: np.ndarray, block: FeatureBlock, scores: np.ndarray) -> bytes:
    """A PAGE blob as codec version 2 wrote it: int32 ids, scores, floats, int32 ints."""
    head = _v2_header(fs, BlobKind.PAGE, first, len(ids))
    return (
        head
        + _i4(ids)
        + scores.astype("<f4").tobytes()
        + block.floats.astype("<f4").tobytes()
        + _i4(block.ints)
    )


def _v2_impressions(
    fs: FeatureSet, ids: np.ndarray, request: FeatureBlock, items: FeatureBlock, scores: np.ndarray
) -> list[bytes]:
    """IMPRESSION blobs as codec version 2 wrote them: id, score, request floats and ints, item's."""
    return [
        _v2_header(fs, BlobKind.IMPRESSION, p, 1)
        + _i4(ids[p : p + 1])
        + scores[p : p + 1].astype("<f4").tobytes()
        + request.floats.astype("<f4").tobytes()
        + _i4(request.ints)
        + items.floats[p].astype("<f4").tobytes()
        + _i4(items.ints[p])
        for p in range(len(ids))
    ]


def _as_v1(blob: bytes, kind: BlobKind, fs: FeatureSet) -> bytes:
    """A version 2 blob as codec version 1 wrote it: version byte 1, no scores."""
    assert blob[2] == 2
    rows = int.from_bytes(blob[12:14], "little")
    head = blob[:2] + bytes([1]) + blob[3:HEADER_BYTES]
    body = blob[HEADER_BYTES:]
    if kind is BlobKind.REQUEST:  # no scores to drop
        return head + body
    if kind is BlobKind.PAGE:  # ids, then the scores to drop
        return head + body[: 4 * rows] + body[8 * rows :]
    assert kind is BlobKind.IMPRESSION  # item id, then its score
    return head + body[:4] + body[8:]


def _other_version(fs: FeatureSet) -> FeatureSet:
    return FeatureSet(fs.name, fs.version + 1, fs.features, fs.retired)


def _other_shape(fs: FeatureSet) -> FeatureSet:
    feats = tuple(dataclasses.replace(f, size=49) if f.name == "u_hist" else f for f in fs.features)
    return FeatureSet(fs.name, fs.version, feats)


# ----------------------------------------------------------------------------------- REQUEST
def test_request_round_trip_is_byte_exact(fs: FeatureSet) -> None:
    block = _random_block(fs, Side.REQUEST, 1, seed=1)
    assert np.isnan(block.floats).any()
    assert np.signbit(block.floats[0, -1]) and block.floats[0, -1] == 0
    blob = codec.encode_request(fs, block)
    back = codec.decode_request(fs, blob)
    assert back.same_bytes(block)
    assert back.floats.dtype == np.dtype("<f4")
    assert back.ints.dtype == np.dtype("<i8")
    assert back.ints[0, : len(EXTREME_IDS)].tolist() == EXTREME_IDS.tolist()
    assert not back.ints.flags.writeable  # a view over the blob, not a copy


def test_request_blob_is_header_plus_raw_row_ids_first(fs: FeatureSet) -> None:
    lay = fs.layout(Side.REQUEST)
    block = _random_block(fs, Side.REQUEST, 1, seed=2)
    blob = codec.encode_request(fs, block)
    assert HEADER_BYTES == 16
    assert len(blob) == HEADER_BYTES + lay.row_bytes == HEADER_BYTES + 8 * lay.int_width + 4 * lay.float_width
    assert blob[HEADER_BYTES:] == block.ints.astype("<i8").tobytes() + block.floats.astype("<f4").tobytes()
    assert blob[:2] == b"LR"
    assert blob[2] == codec.CODEC_VERSION == 3
    assert blob[3] == BlobKind.REQUEST


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_request_blob_decodes_its_int32_ids_as_int64(fs: FeatureSet, version: int) -> None:
    block = _random_block(fs, Side.REQUEST, 1, seed=3, id_bits=32)
    old = _v2_request(fs, block)
    if version == 1:
        old = _as_v1(old, BlobKind.REQUEST, fs)
    assert len(old) == HEADER_BYTES + 4 * (
        fs.layout(Side.REQUEST).float_width + fs.layout(Side.REQUEST).int_width
    )
    back = codec.decode_request(fs, old)
    assert back.ints.dtype == np.dtype("<i8") and back.same_bytes(block)
    assert (back.ints < 0).any()  # negative int32 ids stay negative when widened
    with pytest.raises(CodecError, match=r"\d+ B"):  # an older header on a version 3 body
        codec.decode_request(fs, old[:HEADER_BYTES] + codec.encode_request(fs, block)[HEADER_BYTES:])


def test_request_of_more_than_one_row_is_refused(fs: FeatureSet) -> None:
    with pytest.raises(CodecError, match="one row"):
        codec.encode_request(fs, _random_block(fs, Side.REQUEST, 2, seed=3))


# ----------------------------------------------------------------------------------- PAGE
@pytest.mark.parametrize(("first", "rows"), [(0, 6), (6, 9), (96, 4), (0, 1), (65_000, 3)])
def test_page_round_trip_is_byte_exact(fs: FeatureSet, first: int, rows: int) -> None:
    lay = fs.layout(Side.ITEM)
    block = _random_block(fs, Side.ITEM, rows, seed=first + rows)
    ids = np.random.default_rng(first).integers(-(2**63), 2**63 - 1, rows, dtype=np.int64)
    ids[: len(EXTREME_IDS)] = EXTREME_IDS[:rows]
    scores = _scores(rows, seed=first)
    blob = codec.encode_page(fs, first, ids, block, scores)
    assert len(blob) == HEADER_BYTES + rows * (8 + 4 + lay.row_bytes)
    # item ids, then the item ints, then the scores and the floats
    ints_end = HEADER_BYTES + 8 * rows * (1 + lay.int_width)
    assert blob[HEADER_BYTES : HEADER_BYTES + 8 * rows] == ids.astype("<i8").tobytes()
    assert blob[HEADER_BYTES + 8 * rows : ints_end] == block.ints.astype("<i8").tobytes()
    assert blob[ints_end : ints_end + 4 * rows] == scores.tobytes()
    assert blob[ints_end + 4 * rows :] == block.floats.tobytes()
    page = codec.decode_page(fs, blob)
    assert page.first_position == first
    assert page.item_ids.dtype == np.dtype("<i8")
    assert page.item_ids.tobytes() == ids.tobytes()
    assert page.block.same_bytes(block)
    assert page.scores.dtype == np.dtype("<f4")
    assert np.array_equal(page.scores.view(np.uint32), scores.view(np.uint32))


def test_a_page_without_scores_holds_nan_for_each(fs: FeatureSet) -> None:
    block = _random_block(fs, Side.ITEM, 4, seed=1)
    page = codec.decode_page(fs, codec.encode_page(fs, 6, np.arange(4), block))
    assert np.isnan(page.scores).all() and len(page.scores) == 4
    with pytest.raises(CodecError, match="3 scores for 4"):
        codec.encode_page(fs, 6, np.arange(4), block, np.zeros(3, np.float32))


def _old_widths(fs: FeatureSet, side: Side) -> int:
    """Bytes of one row's features in codec versions 1 and 2 (int32 ids)."""
    lay = fs.layout(side)
    return 4 * (lay.float_width + lay.int_width)


def test_a_version_2_page_decodes_its_int32_ids_as_int64(fs: FeatureSet) -> None:
    block = _random_block(fs, Side.ITEM, 9, seed=2, id_bits=32)
    ids = np.array([100, -5, 2**31 - 1, -(2**31), 0, 7, 8, 9, 10], np.int64)
    scores = _scores(9, seed=3)
    old = _v2_page(fs, 6, ids, block, scores)
    assert len(old) == HEADER_BYTES + 9 * (4 + 4 + _old_widths(fs, Side.ITEM))
    page = codec.decode_page(fs, old)
    assert page.first_position == 6
    assert page.item_ids.dtype == np.dtype("<i8") and page.item_ids.tolist() == ids.tolist()
    assert page.block.ints.dtype == np.dtype("<i8") and page.block.same_bytes(block)
    assert np.array_equal(page.scores.view(np.uint32), scores.view(np.uint32))
    with pytest.raises(CodecError, match=r"\d+ B"):  # a version 2 header on a version 3 body
        codec.decode_page(fs, old[:HEADER_BYTES] + codec.encode_page(fs, 6, ids, block)[HEADER_BYTES:])


def test_a_version_1_page_decodes_with_nan_scores(fs: FeatureSet) -> None:
    block = _random_block(fs, Side.ITEM, 9, seed=2, id_bits=32)
    ids = np.arange(100, 109, dtype=np.int64)
    old = _as_v1(_v2_page(fs, 6, ids, block, _scores(9, seed=3)), BlobKind.PAGE, fs)
    assert len(old) == HEADER_BYTES + 9 * (4 + _old_widths(fs, Side.ITEM))
    page = codec.decode_page(fs, old)
    assert page.first_position == 6
    assert np.array_equal(page.item_ids, ids) and page.item_ids.dtype == np.dtype("<i8")
    assert page.block.same_bytes(block)
    assert np.isnan(page.scores).all() and len(page.scores) == 9
    with pytest.raises(CodecError, match=r"\d+ B"):  # a version 1 header on a version 2 body
        codec.decode_page(fs, old[:HEADER_BYTES] + _v2_page(fs, 6, ids, block, _scores(9, 3))[HEADER_BYTES:])


def test_page_with_mismatched_ids_and_rows_is_refused(fs: FeatureSet) -> None:
    with pytest.raises(CodecError, match="3 item ids for 4"):
        codec.encode_page(fs, 0, np.arange(3), _random_block(fs, Side.ITEM, 4, seed=0))


def test_page_position_outside_the_header_is_refused(fs: FeatureSet) -> None:
    with pytest.raises(CodecError, match="position"):
        codec.encode_page(fs, 2**16, np.arange(1), _random_block(fs, Side.ITEM, 1, seed=0))


# ----------------------------------------------------------------------------------- IMPRESSION
def test_impressions_round_trip_is_byte_exact(fs: FeatureSet) -> None:
    n = 100
    request = _random_block(fs, Side.REQUEST, 1, seed=4)
    items = _random_block(fs, Side.ITEM, n, seed=5)
    ids = np.random.default_rng(6).integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
    ids[: len(EXTREME_IDS)] = EXTREME_IDS
    scores = _scores(n, seed=6)
    blobs = codec.encode_impressions(fs, ids, request, items, scores)
    assert len(blobs) == n
    req_lay, item_lay = fs.layout(Side.REQUEST), fs.layout(Side.ITEM)
    assert {len(b) for b in blobs} == {HEADER_BYTES + 8 + 4 + req_lay.row_bytes + item_lay.row_bytes}
    # the item id, the request's and the item's ints, then the score and the floats
    assert blobs[7][HEADER_BYTES : HEADER_BYTES + 8] == ids[7:8].tobytes()
    at = HEADER_BYTES + 8 * (1 + req_lay.int_width)
    assert blobs[7][HEADER_BYTES + 8 : at] == request.ints.tobytes()
    assert blobs[7][at : at + 8 * item_lay.int_width] == items.ints[7].tobytes()
    at += 8 * item_lay.int_width
    assert blobs[7][at : at + 4] == scores[7:8].tobytes()

    positions, got_ids, got_req, got_items, got_scores = codec.decode_impressions(fs, blobs)
    assert np.array_equal(positions, np.arange(n))
    assert got_ids.dtype == np.dtype("<i8") and got_ids.tobytes() == ids.tobytes()
    assert got_items.same_bytes(items)
    assert got_req.same_bytes(FeatureBlock.concat([request] * n))
    assert np.array_equal(got_scores.view(np.uint32), scores.view(np.uint32))


def test_impressions_without_scores_hold_nan(fs: FeatureSet) -> None:
    request, items = _random_block(fs, Side.REQUEST, 1, seed=1), _random_block(fs, Side.ITEM, 3, seed=2)
    blobs = codec.encode_impressions(fs, np.arange(3), request, items)
    assert np.isnan(codec.decode_impressions(fs, blobs)[4]).all()
    with pytest.raises(CodecError, match="2 scores for 3"):
        codec.encode_impressions(fs, np.arange(3), request, items, np.zeros(2, np.float32))


def test_version_2_impressions_decode_their_int32_ids_as_int64(fs: FeatureSet) -> None:
    request = _random_block(fs, Side.REQUEST, 1, seed=3, id_bits=32)
    items = _random_block(fs, Side.ITEM, 5, seed=4, id_bits=32)
    ids = np.array([50, -(2**31), 2**31 - 1, -7, 54], np.int64)
    scores = _scores(5, seed=5)
    old = _v2_impressions(fs, ids, request, items, scores)
    want = HEADER_BYTES + 4 + 4 + _old_widths(fs, Side.REQUEST) + _old_widths(fs, Side.ITEM)
    assert {len(b) for b in old} == {want}
    positions, got_ids, got_req, got_items, got_scores = codec.decode_impressions(fs, old[::-1])
    assert positions.tolist() == [4, 3, 2, 1, 0]
    assert got_ids.dtype == np.dtype("<i8") and got_ids.tolist() == ids[::-1].tolist()
    assert got_items.ints.dtype == np.dtype("<i8") and got_items.same_bytes(items.take(np.arange(5)[::-1]))
    assert got_req.same_bytes(FeatureBlock.concat([request] * 5))
    assert np.array_equal(got_scores.view(np.uint32), scores[::-1].view(np.uint32))
    new = codec.encode_impressions(fs, ids, request, items, scores)
    with pytest.raises(CodecError, match=r"\d+ B"):  # one request's entries are of one version
        codec.decode_impressions(fs, [old[0], new[1]])


def test_version_1_impressions_decode_with_nan_scores(fs: FeatureSet) -> None:
    request = _random_block(fs, Side.REQUEST, 1, seed=3, id_bits=32)
    items = _random_block(fs, Side.ITEM, 5, seed=4, id_bits=32)
    ids = np.arange(50, 55, dtype=np.int64)
    new = _v2_impressions(fs, ids, request, items, _scores(5, seed=5))
    old = [_as_v1(b, BlobKind.IMPRESSION, fs) for b in new]
    assert {len(b) for b in old} == {len(new[0]) - 4}
    positions, got_ids, got_req, got_items, got_scores = codec.decode_impressions(fs, old[::-1])
    assert positions.tolist() == [4, 3, 2, 1, 0]
    assert np.array_equal(got_ids, ids[::-1])
    assert got_items.same_bytes(items.take(np.arange(5)[::-1]))
    assert got_req.same_bytes(FeatureBlock.concat([request] * 5))
    assert np.isnan(got_scores).all() and len(got_scores) == 5
    with pytest.raises(CodecError, match=r"\d+ B"):  # one request's entries are of one version
        codec.decode_impressions(fs, [old[0], new[1]])


def test_impressions_decode_any_subset_in_any_order(fs: FeatureSet) -> None:
    request = _random_block(fs, Side.REQUEST, 1, seed=7)
    items = _random_block(fs, Side.ITEM, 20, seed=8)
    ids = np.arange(20, dtype=np.int64) * 2**58 - 2**62  # spread over the int64 range
    pick = np.array([17, 3, 4, 0])
    scores = np.linspace(1, 0, 20, dtype=np.float32)
    blobs = codec.encode_impressions(fs, ids, request, items, scores)
    positions, got_ids, _, got_items, got_scores = codec.decode_impressions(fs, [blobs[p] for p in pick])
    assert np.array_equal(got_scores, scores[pick])
    assert np.array_equal(positions, pick)
    assert np.array_equal(got_ids, ids[pick])
    assert got_items.same_bytes(items.take(pick))


def test_no_impressions_decode_to_empty_blocks(fs: FeatureSet) -> None:
    positions, ids, request, items, scores = codec.decode_impressions(fs, [])
    assert len(positions) == len(ids) == len(request) == len(items) == len(scores) == 0
    assert items.floats.shape[1] == fs.layout(Side.ITEM).float_width


# ----------------------------------------------------------------------------------- refusals
def _blobs(fs: FeatureSet) -> dict[BlobKind, bytes]:
    request = _random_block(fs, Side.REQUEST, 1, seed=9)
    items = _random_block(fs, Side.ITEM, 6, seed=10)
    ids = EXTREME_IDS[:6]
    return {
        BlobKind.REQUEST: codec.encode_request(fs, request),
        BlobKind.PAGE: codec.encode_page(fs, 0, ids, items),
        BlobKind.IMPRESSION: codec.encode_impressions(fs, ids, request, items)[0],
        BlobKind.ROW: codec.encode_rows(fs, RowTable.ITEM, items)[0],
        BlobKind.PAGE_REFS: codec.encode_page_refs(fs, 0, ids, np.arange(6, dtype=np.uint64)),
        BlobKind.REQUEST_REFS: codec.encode_request_refs(
            fs, request.take_columns(codec.slow_columns(fs).fast_floats, codec.slow_columns(fs).fast_ints), 7
        ),
    }


def _decode(fs: FeatureSet, kind: BlobKind, blob: bytes) -> object:
    if kind is BlobKind.REQUEST:
        return codec.decode_request(fs, blob)
    if kind is BlobKind.PAGE:
        return codec.decode_page(fs, blob)
    if kind is BlobKind.ROW:
        return codec.decode_rows(fs, RowTable.ITEM, [blob])
    if kind is BlobKind.PAGE_REFS:
        return codec.decode_page_refs(fs, blob)
    if kind is BlobKind.REQUEST_REFS:
        return codec.decode_request_refs(fs, blob)
    return codec.decode_impressions(fs, [blob])


def _writer(fs: FeatureSet, which: str) -> FeatureSet:
    return _other_version(fs) if which == "version" else _other_shape(fs)


@pytest.mark.parametrize("which", ["version", "fingerprint"])
@pytest.mark.parametrize("kind", list(BlobKind))
def test_blob_of_another_featureset_is_refused_naming_both(
    fs: FeatureSet, which: str, kind: BlobKind
) -> None:
    other = _writer(fs, which)
    if which == "version":
        assert other.fingerprint == fs.fingerprint  # the version alone must be caught
    else:
        assert other.fingerprint != fs.fingerprint
    blob = _blobs(other)[kind]
    with pytest.raises(ForeignBlobError) as err:  # another reader's blob, not a damaged one
        _decode(fs, kind, blob)
    msg = str(err.value)
    assert f"{other.fingerprint:08x} v{other.version}" in msg
    assert f"{fs.fingerprint:08x} v{fs.version}" in msg


def test_impressions_of_two_featuresets_in_one_batch_are_refused(fs: FeatureSet) -> None:
    ours = _blobs(fs)[BlobKind.IMPRESSION]
    theirs = _blobs(_other_version(fs))[BlobKind.IMPRESSION]
    with pytest.raises(ForeignBlobError, match="different FeatureSets"):
        codec.decode_impressions(fs, [ours, ours, theirs])
    damaged = b"XX" + theirs[2:]
    with pytest.raises(CodecError, match="magic") as err:
        codec.decode_impressions(fs, [ours, damaged])
    assert not isinstance(err.value, ForeignBlobError)


@pytest.mark.parametrize("kind", list(BlobKind))
@pytest.mark.parametrize("cut", [0, 1, HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + 3, -1])
def test_truncated_blobs_are_refused(fs: FeatureSet, kind: BlobKind, cut: int) -> None:
    blob = _blobs(fs)[kind]
    with pytest.raises(CodecError, match=r"\d+ B") as err:
        _decode(fs, kind, blob[:cut])
    assert not isinstance(err.value, ForeignBlobError)


@pytest.mark.parametrize("kind", list(BlobKind))
def test_blobs_with_trailing_bytes_are_refused(fs: FeatureSet, kind: BlobKind) -> None:
    with pytest.raises(CodecError, match=r"\d+ B"):
        _decode(fs, kind, _blobs(fs)[kind] + b"\x00\x00\x00\x00")


@pytest.mark.parametrize("kind", list(BlobKind))
def test_wrong_magic_is_refused(fs: FeatureSet, kind: BlobKind) -> None:
    blob = _blobs(fs)[kind]
    with pytest.raises(CodecError, match="magic"):
        _decode(fs, kind, b"XX" + blob[2:])


@pytest.mark.parametrize("kind", list(BlobKind))
def test_unknown_codec_version_is_refused(fs: FeatureSet, kind: BlobKind) -> None:
    blob = bytearray(_blobs(fs)[kind])
    blob[2] = codec.CODEC_VERSION + 1
    with pytest.raises(CodecError, match="codec version"):
        _decode(fs, kind, bytes(blob))


@pytest.mark.parametrize(
    ("written", "read_as"),
    [
        (BlobKind.REQUEST, BlobKind.PAGE),
        (BlobKind.PAGE, BlobKind.REQUEST),
        (BlobKind.PAGE, BlobKind.IMPRESSION),
        (BlobKind.IMPRESSION, BlobKind.REQUEST),
        (BlobKind.PAGE, BlobKind.PAGE_REFS),
        (BlobKind.REQUEST, BlobKind.REQUEST_REFS),
        (BlobKind.PAGE_REFS, BlobKind.ROW),
    ],
)
def test_wrong_kind_is_refused(fs: FeatureSet, written: BlobKind, read_as: BlobKind) -> None:
    blob = _blobs(fs)[written]
    if read_as is BlobKind.IMPRESSION:  # same length as an impression, another kind in the header
        blob = blob[:HEADER_BYTES] + bytes(len(_blobs(fs)[BlobKind.IMPRESSION]) - HEADER_BYTES)
    with pytest.raises(CodecError, match=f"expected a {read_as.name} blob"):
        _decode(fs, read_as, blob)


def test_codec_error_is_a_value_error() -> None:
    assert issubclass(CodecError, ValueError)
