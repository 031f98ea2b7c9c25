"""The logged blob: byte-exact round trips, no per-value framing, and refusals."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from leanrec.featurelog import codec
from leanrec.featurelog.codec import HEADER_BYTES, BlobKind, CodecError, ForeignBlobError
from leanrec.schema import FeatureBlock, FeatureSet, Side
from leanrec.world import default_featureset


@pytest.fixture(scope="module")
def fs() -> FeatureSet:
    return default_featureset()[0]


def _random_block(fs: FeatureSet, side: Side, rows: int, seed: int) -> FeatureBlock:
    """Rows of arbitrary bit patterns: NaNs with payloads, infinities, subnormals, -0.0 among them."""
    lay = fs.layout(side)
    rng = np.random.default_rng(seed)
    floats = rng.integers(0, 2**32, (rows, lay.float_width), dtype=np.uint32).view("<f4")
    ints = rng.integers(-(2**31), 2**31, (rows, lay.int_width), dtype=np.int64).astype("<i4")
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


def _as_v1(blob: bytes, kind: BlobKind, fs: FeatureSet) -> bytes:
    """The same blob as codec version 1 wrote it: version byte 1, no scores."""
    rows = int.from_bytes(blob[12:14], "little")
    head = blob[:2] + bytes([1]) + blob[3:HEADER_BYTES]
    body = blob[HEADER_BYTES:]
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
    assert back.ints.dtype == np.dtype("<i4")


def test_request_blob_is_header_plus_raw_row(fs: FeatureSet) -> None:
    lay = fs.layout(Side.REQUEST)
    block = _random_block(fs, Side.REQUEST, 1, seed=2)
    blob = codec.encode_request(fs, block)
    assert HEADER_BYTES == 16
    assert len(blob) == HEADER_BYTES + lay.row_bytes
    assert blob[HEADER_BYTES:] == block.floats.astype("<f4").tobytes() + block.ints.astype("<i4").tobytes()
    assert blob[:2] == b"LR"
    assert blob[3] == BlobKind.REQUEST


def test_request_of_more_than_one_row_is_refused(fs: FeatureSet) -> None:
    with pytest.raises(CodecError, match="one row"):
        codec.encode_request(fs, _random_block(fs, Side.REQUEST, 2, seed=3))


# ----------------------------------------------------------------------------------- PAGE
@pytest.mark.parametrize(("first", "rows"), [(0, 6), (6, 9), (96, 4), (0, 1), (65_000, 3)])
def test_page_round_trip_is_byte_exact(fs: FeatureSet, first: int, rows: int) -> None:
    block = _random_block(fs, Side.ITEM, rows, seed=first + rows)
    ids = np.random.default_rng(first).integers(0, 50_000, rows).astype(np.int32)
    scores = _scores(rows, seed=first)
    blob = codec.encode_page(fs, first, ids, block, scores)
    assert len(blob) == HEADER_BYTES + rows * (4 + 4 + fs.layout(Side.ITEM).row_bytes)
    assert blob[HEADER_BYTES + 4 * rows : HEADER_BYTES + 8 * rows] == scores.tobytes()  # after the ids
    page = codec.decode_page(fs, blob)
    assert page.first_position == first
    assert np.array_equal(page.item_ids, ids)
    assert page.block.same_bytes(block)
    assert page.scores.dtype == np.dtype("<f4")
    assert np.array_equal(page.scores.view(np.uint32), scores.view(np.uint32))


def test_a_page_without_scores_holds_nan_for_each(fs: FeatureSet) -> None:
    block = _random_block(fs, Side.ITEM, 4, seed=1)
    page = codec.decode_page(fs, codec.encode_page(fs, 6, np.arange(4), block))
    assert np.isnan(page.scores).all() and len(page.scores) == 4
    with pytest.raises(CodecError, match="3 scores for 4"):
        codec.encode_page(fs, 6, np.arange(4), block, np.zeros(3, np.float32))


def test_a_version_1_page_decodes_with_nan_scores(fs: FeatureSet) -> None:
    block = _random_block(fs, Side.ITEM, 9, seed=2)
    ids = np.arange(100, 109, dtype=np.int32)
    old = _as_v1(codec.encode_page(fs, 6, ids, block, _scores(9, seed=3)), BlobKind.PAGE, fs)
    assert len(old) == HEADER_BYTES + 9 * (4 + fs.layout(Side.ITEM).row_bytes)
    page = codec.decode_page(fs, old)
    assert page.first_position == 6
    assert np.array_equal(page.item_ids, ids)
    assert page.block.same_bytes(block)
    assert np.isnan(page.scores).all() and len(page.scores) == 9
    with pytest.raises(CodecError, match=r"\d+ B"):  # a version 1 header on a version 2 body
        codec.decode_page(fs, old[:HEADER_BYTES] + codec.encode_page(fs, 6, ids, block)[HEADER_BYTES:])


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
    ids = np.random.default_rng(6).permutation(50_000)[:n].astype(np.int32)
    scores = _scores(n, seed=6)
    blobs = codec.encode_impressions(fs, ids, request, items, scores)
    assert len(blobs) == n
    req_lay, item_lay = fs.layout(Side.REQUEST), fs.layout(Side.ITEM)
    assert {len(b) for b in blobs} == {HEADER_BYTES + 4 + 4 + req_lay.row_bytes + item_lay.row_bytes}
    assert blobs[7][HEADER_BYTES + 4 : HEADER_BYTES + 8] == scores[7:8].tobytes()  # after the item id

    positions, got_ids, got_req, got_items, got_scores = codec.decode_impressions(fs, blobs)
    assert np.array_equal(positions, np.arange(n))
    assert np.array_equal(got_ids, ids)
    assert got_items.same_bytes(items)
    assert got_req.same_bytes(FeatureBlock.concat([request] * n))
    assert np.array_equal(got_scores.view(np.uint32), scores.view(np.uint32))


def test_impressions_without_scores_hold_nan(fs: FeatureSet) -> None:
    request, items = _random_block(fs, Side.REQUEST, 1, seed=1), _random_block(fs, Side.ITEM, 3, seed=2)
    blobs = codec.encode_impressions(fs, np.arange(3), request, items)
    assert np.isnan(codec.decode_impressions(fs, blobs)[4]).all()
    with pytest.raises(CodecError, match="2 scores for 3"):
        codec.encode_impressions(fs, np.arange(3), request, items, np.zeros(2, np.float32))


def test_version_1_impressions_decode_with_nan_scores(fs: FeatureSet) -> None:
    request, items = _random_block(fs, Side.REQUEST, 1, seed=3), _random_block(fs, Side.ITEM, 5, seed=4)
    ids = np.arange(50, 55, dtype=np.int32)
    new = codec.encode_impressions(fs, ids, request, items, _scores(5, seed=5))
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
    ids = np.arange(1_000, 1_020, dtype=np.int32)
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
    ids = np.arange(6, dtype=np.int32)
    return {
        BlobKind.REQUEST: codec.encode_request(fs, request),
        BlobKind.PAGE: codec.encode_page(fs, 0, ids, items),
        BlobKind.IMPRESSION: codec.encode_impressions(fs, ids, request, items)[0],
    }


def _decode(fs: FeatureSet, kind: BlobKind, blob: bytes) -> object:
    if kind is BlobKind.REQUEST:
        return codec.decode_request(fs, blob)
    if kind is BlobKind.PAGE:
        return codec.decode_page(fs, blob)
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
