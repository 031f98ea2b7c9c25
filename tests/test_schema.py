"""FeatureSet: validation, layouts, fingerprints, serialisation and row fingerprints."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from leanrec.schema import (
    PAD_ID,
    SIDE_OWNERS,
    Feature,
    FeatureBlock,
    FeatureSet,
    Kind,
    Owner,
    Role,
    Side,
)
from leanrec.world import WorldConfig, default_featureset

U, C, I = Owner.USER, Owner.CONTEXT, Owner.ITEM


def _small_fs(version: int = 1) -> FeatureSet:
    """Owners interleaved in registry order, so layouts must regroup them."""
    return FeatureSet(
        "tiny",
        version,
        (
            Feature("i_a", I, Kind.DENSE, 3),
            Feature("u_a", U, Kind.DENSE, 2),
            Feature("c_hour", C, Kind.SPARSE, 1, 24, map="qr"),
            Feature("u_id", U, Kind.SPARSE, 1, 100, evict="lru"),
            Feature("i_id", I, Kind.SPARSE, 1, 500, string_ids=True),
            Feature("u_hist", U, Kind.SEQUENCE, 4, 500),
            Feature("c_x", C, Kind.DENSE, 1),
            Feature("u_b", U, Kind.DENSE, 5),
            Feature("i_tags", I, Kind.MULTI_HOT, 3, 40, map="hash"),
        ),
    )


# ----------------------------------------------------------------------------------- validation
def test_duplicate_names_are_refused() -> None:
    feats = (Feature("x", U, Kind.DENSE), Feature("y", I, Kind.DENSE), Feature("x", I, Kind.DENSE, 2))
    with pytest.raises(ValueError, match=r"duplicate.*'x'"):
        FeatureSet("dup", 1, feats)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "bad name", "kind": Kind.DENSE}, "identifier"),
        ({"name": "1x", "kind": Kind.DENSE}, "identifier"),
        ({"name": "x", "kind": Kind.DENSE, "size": 0}, "size"),
        ({"name": "x", "kind": Kind.DENSE, "size": -3}, "size"),
        ({"name": "x", "kind": Kind.SEQUENCE, "size": 0, "rows": 10}, "size"),
        ({"name": "x", "kind": Kind.SPARSE, "size": 2, "rows": 10}, "sparse"),
        ({"name": "x", "kind": Kind.SPARSE, "rows": 0}, r"feature x: a managed map needs its embedding rows"),
        ({"name": "x", "kind": Kind.MULTI_HOT, "size": 4}, r"feature x: a managed map needs .*got 0"),
        ({"name": "x", "kind": Kind.SEQUENCE, "size": 4, "rows": -1}, r"feature x: a managed map .*got -1"),
        ({"name": "x", "kind": Kind.SPARSE, "map": "managed"}, r"feature x: a managed map needs .*rows >= 1"),
        ({"name": "x", "kind": Kind.SPARSE, "map": "managed", "rows": 0}, r"feature x: a managed map needs"),
        ({"name": "x", "kind": Kind.SPARSE, "map": "hash"}, r"feature x: a hash map needs .*rows >= 1"),
        (
            {"name": "x", "kind": Kind.SPARSE, "map": "qr", "rows": 1},
            r"feature x: a qr map needs .*rows >= 2",
        ),
        ({"name": "x", "kind": Kind.SPARSE, "map": "lsh", "rows": 9}, r"feature x: unknown map 'lsh'"),
        ({"name": "x", "kind": Kind.SPARSE, "rows": 9, "evict": "fifo"}, r"feature x: evict is lfu or lru"),
        ({"name": "x", "kind": Kind.SPARSE, "rows": 9, "map": "hash", "evict": "lru"}, "only for a managed"),
        ({"name": "x", "kind": Kind.DENSE, "rows": 5}, r"feature x: rows, map, .* not dense"),
        ({"name": "x", "kind": Kind.DENSE, "map": "hash"}, r"feature x: rows, map, .* not dense"),
        ({"name": "x", "kind": Kind.DENSE, "string_ids": True}, r"feature x: .*string ids .* not dense"),
        ({"name": "x", "kind": Kind.SPARSE, "rows": 5, "space": "two_tower"}, "embedding space"),
        ({"name": "x", "kind": Kind.DENSE, "changes": "often"}, r"feature x: changes is request or rarely"),
    ],
)
def test_invalid_features_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Feature(owner=U, **kwargs)


def test_an_id_feature_resolves_its_map_and_eviction_defaults() -> None:
    plain = Feature("x", U, Kind.SPARSE, 1, 9)
    assert (plain.map, plain.id_map, plain.evict, plain.id_evict) == ("", "managed", "", "lfu")
    assert Feature("x", U, Kind.SPARSE, 1, 9, evict="lru").id_evict == "lru"
    hashed = Feature("x", U, Kind.SPARSE, 1, 9, map="hash")
    assert (hashed.id_map, hashed.id_evict) == ("hash", "")
    assert Feature("x", U, Kind.SPARSE, 1, 2, map="qr").id_map == "qr"
    dense = Feature("x", U, Kind.DENSE, 3)
    assert (dense.id_map, dense.id_evict, dense.rows, dense.string_ids) == ("", "", 0, False)
    # ids are raw int64 whatever the rows: the rows size a model's table, not the values
    assert plain.dtype == np.dtype("<i8") and dense.dtype == np.dtype("<f4")


@pytest.mark.parametrize("version", [-1, 2**16])
def test_version_must_fit_16_bits(version: int) -> None:
    with pytest.raises(ValueError, match="version"):
        FeatureSet("v", version, (Feature("x", U, Kind.DENSE),))


def test_lookup_by_name() -> None:
    fs = _small_fs()
    assert fs["u_hist"].size == 4
    with pytest.raises(KeyError, match="nope"):
        fs["nope"]


# ----------------------------------------------------------------------------------- layouts
def _check_contiguous(slots, is_float: bool, width: int) -> None:
    offset = 0
    for slot in slots:
        if slot.feature.is_float is is_float:
            assert slot.offset == offset, slot.feature.name
            assert slot.stop == offset + slot.feature.size
            offset = slot.stop
    assert offset == width


@pytest.mark.parametrize("fs", [_small_fs(), default_featureset()[0]], ids=["tiny", "demo"])
def test_layouts_group_owners_and_pack_contiguously(fs: FeatureSet) -> None:
    req, item = fs.layout(Side.REQUEST), fs.layout(Side.ITEM)
    # request side: every user feature, then every context feature, each in registry order
    assert req.names == [f.name for f in fs.of(U)] + [f.name for f in fs.of(C)]
    assert item.names == [f.name for f in fs.of(I)]
    assert SIDE_OWNERS[Side.REQUEST] == (U, C)
    for lay, owners in ((req, (U, C)), (item, (I,))):
        feats = [f for f in fs.features if f.owner in owners]
        assert lay.float_width == sum(f.size for f in feats if f.kind is Kind.DENSE)
        assert lay.int_width == sum(f.size for f in feats if f.kind is not Kind.DENSE)
        assert lay.row_bytes == 4 * lay.float_width + 8 * lay.int_width  # float32 values, int64 ids
        _check_contiguous(lay.slots, True, lay.float_width)
        _check_contiguous(lay.slots, False, lay.int_width)
    assert len(req.slots) + len(item.slots) == len(fs)


def test_tiny_layout_offsets_by_hand() -> None:
    fs = _small_fs()
    req = {s.feature.name: s.offset for s in fs.layout(Side.REQUEST).slots}
    assert req == {"u_a": 0, "u_id": 0, "u_hist": 1, "u_b": 2, "c_hour": 5, "c_x": 7}
    item = {s.feature.name: s.offset for s in fs.layout(Side.ITEM).slots}
    assert item == {"i_a": 0, "i_id": 0, "i_tags": 1}
    assert (fs.layout(Side.REQUEST).float_width, fs.layout(Side.REQUEST).int_width) == (8, 6)
    assert fs.layout(Side.REQUEST).row_bytes == 8 * 4 + 6 * 8


def test_owner_slots_are_offsets_inside_the_owner_block() -> None:
    fs = _small_fs()
    u, c = fs.owner_slots(U), fs.owner_slots(C)
    assert {n: s.offset for n, s in u.items()} == {"u_a": 0, "u_id": 0, "u_hist": 1, "u_b": 2}
    assert {n: s.offset for n, s in c.items()} == {"c_hour": 0, "c_x": 0}
    assert fs.widths(U) == (7, 5)
    assert fs.widths(C) == (1, 1)
    assert fs.widths(I) == (3, 4)


def test_request_layout_is_user_block_then_context_block() -> None:
    """A request row assembled with hstack(user, context) puts each feature where the layout says."""
    fs = _small_fs()
    rng = np.random.default_rng(0)
    blocks = {
        o: FeatureBlock(
            rng.normal(size=(3, fs.widths(o)[0])).astype("<f4"),
            rng.integers(-(2**63), 2**63 - 1, (3, fs.widths(o)[1]), dtype=np.int64),
        )
        for o in (U, C)
    }
    row = FeatureBlock.hstack([blocks[U], blocks[C]])
    for slot in fs.layout(Side.REQUEST).slots:
        f = slot.feature
        own = fs.owner_slots(f.owner)[f.name]
        src = blocks[f.owner].floats if f.is_float else blocks[f.owner].ints
        dst = row.floats if f.is_float else row.ints
        assert np.array_equal(dst[:, slot.offset : slot.stop], src[:, own.offset : own.stop]), f.name


def test_zeros_has_the_layout_shape() -> None:
    lay = _small_fs().layout(Side.ITEM)
    z = lay.zeros(4)
    assert z.floats.shape == (4, 3)
    assert z.ints.shape == (4, 4)
    assert z.floats.dtype == np.dtype("<f4")
    assert z.ints.dtype == np.dtype("<i8")
    assert z.nbytes == 4 * lay.row_bytes


# ----------------------------------------------------------------------------------- fingerprint
def _replace(fs: FeatureSet, target: str, **changes) -> FeatureSet:
    feats = tuple(dataclasses.replace(f, **changes) if f.name == target else f for f in fs.features)
    return FeatureSet(fs.name, fs.version, feats)


@pytest.mark.parametrize(
    ("name", "changes"),
    [
        ("u_hist", {"size": 5}),
        ("u_b", {"size": 4}),
        ("c_x", {"owner": Owner.USER}),
        ("i_a", {"kind": Kind.MULTI_HOT, "rows": 10}),
        ("i_id", {"name": "i_item"}),
        ("i_id", {"string_ids": False}),
        ("u_hist", {"string_ids": True}),
    ],
)
def test_fingerprint_changes_when_a_feature_changes_shape(name: str, changes: dict) -> None:
    fs = _small_fs()
    assert _replace(fs, name, **changes).fingerprint != fs.fingerprint


def test_fingerprint_changes_when_features_are_reordered_or_removed() -> None:
    fs = _small_fs()
    assert FeatureSet(fs.name, 1, fs.features[::-1]).fingerprint != fs.fingerprint
    assert FeatureSet(fs.name, 1, fs.features[:-1]).fingerprint != fs.fingerprint


def test_fingerprint_is_stable_for_the_same_shape() -> None:
    fs = _small_fs()
    assert _small_fs().fingerprint == fs.fingerprint
    assert _replace(fs, "u_b", doc="reworded").fingerprint == fs.fingerprint
    # how a model maps ids to rows does not change the bytes a FeatureSet's blobs hold
    assert _replace(fs, "i_id", rows=7, map="hash").fingerprint == fs.fingerprint
    assert _replace(fs, "u_id", evict="", map="qr", rows=3).fingerprint == fs.fingerprint
    assert 0 <= fs.fingerprint < 2**32


# ----------------------------------------------------------------------------------- JSON
@pytest.mark.parametrize("fs", [_small_fs(), default_featureset()[0]], ids=["tiny", "demo"])
def test_json_round_trip(fs: FeatureSet) -> None:
    fs = FeatureSet(fs.name, 3, fs.features, {"old_feature": "noise, retired by audit"})
    back = FeatureSet.from_json(fs.to_json())
    assert back == fs
    assert back.fingerprint == fs.fingerprint
    assert back.layout(Side.REQUEST) == fs.layout(Side.REQUEST)
    assert back.layout(Side.ITEM) == fs.layout(Side.ITEM)
    assert back.retired == {"old_feature": "noise, retired by audit"}
    assert [f.doc for f in back.features] == [f.doc for f in fs.features]
    assert all(isinstance(f.owner, Owner) and isinstance(f.kind, Kind) for f in back.features)
    assert [(f.rows, f.map, f.evict, f.string_ids) for f in back.features] == [
        (f.rows, f.map, f.evict, f.string_ids) for f in fs.features
    ]


def test_json_written_with_vocab_reads_it_as_rows() -> None:
    fs = _small_fs()
    d = json.loads(fs.to_json())
    for f in d["features"]:
        f["vocab"] = f.pop("rows")
        for key in ("map", "evict", "string_ids"):
            del f[key]
    back = FeatureSet.from_json(json.dumps(d))
    assert [f.rows for f in back.features] == [f.rows for f in fs.features]
    assert back["i_id"].string_ids is False and back["c_hour"].id_map == "managed"
    plain = tuple(dataclasses.replace(f, map="", evict="", string_ids=False) for f in fs.features)
    assert back == FeatureSet(fs.name, fs.version, plain)


# ----------------------------------------------------------------------------------- row fingerprints
def _block(rows: int = 4) -> FeatureBlock:
    rng = np.random.default_rng(5)
    ints = rng.integers(-(2**63), 2**63 - 1, (rows, 3), dtype=np.int64)
    ints[:, 0] = PAD_ID
    return FeatureBlock(rng.normal(size=(rows, 6)).astype("<f4"), ints)


def test_row_fingerprints_are_equal_for_equal_rows() -> None:
    b = _block()
    b.floats[2] = b.floats[0]
    b.ints[2] = b.ints[0]
    fp = b.row_fingerprints()
    assert fp.dtype == np.uint64
    assert fp.shape == (4,)
    assert fp[0] == fp[2]
    assert len(set(fp.tolist())) == 3
    # same rows in another block, another order: same fingerprints
    other = b.take(np.array([3, 1, 0]))
    assert other.row_fingerprints().tolist() == [fp[3], fp[1], fp[0]]


def test_row_fingerprints_see_every_single_byte_change() -> None:
    base = _block()
    want = base.row_fingerprints()
    for arr_name in ("floats", "ints"):
        n_bytes = getattr(base, arr_name)[1].nbytes
        for byte in range(n_bytes):
            for delta in (1, 0x80):
                b = base.copy()
                raw = getattr(b, arr_name).view(np.uint8)
                raw[1, byte] ^= delta
                got = b.row_fingerprints()
                assert got[1] != want[1], (arr_name, byte, delta)
                assert np.array_equal(np.delete(got, 1), np.delete(want, 1))


def test_row_fingerprints_tell_negative_zero_and_nan_payloads_apart() -> None:
    b = FeatureBlock(np.zeros((4, 2), "<f4"), np.full((4, 1), PAD_ID, "<i8"))
    b.floats[1, 0] = -0.0
    b.floats[2, 0] = np.nan
    b.floats.view(np.uint32)[3, 0] = 0x7FC00001  # another NaN
    fp = b.row_fingerprints()
    assert len(set(fp.tolist())) == 4


# ----------------------------------------------------------------------------------- demo set
def test_default_featureset_is_a_late_stage_rankers() -> None:
    fs, noise = default_featureset(WorldConfig())
    user, item = fs.of(U), fs.of(I)
    assert len(user) >= 150
    assert len(item) >= 50
    assert len(fs.of(C)) >= 1
    hist = fs["u_hist"]
    assert (hist.owner, hist.kind, hist.size) == (U, Kind.SEQUENCE, 50)
    assert hist.rows == WorldConfig().n_items
    names = {f.name for f in fs.features}
    assert noise < names
    informative = names - noise
    for owner in (U, I):
        owned = {f.name for f in fs.of(owner)}
        assert owned & noise, f"no noise among {owner} features"
        assert owned & informative, f"no informative {owner} features"
    assert {"u_taste_00", "i_taste_00", "u_hist", "i_click_rate"} <= informative
    assert {"u_noise_00", "i_noise_00"} <= noise
    assert {Kind.DENSE, Kind.SPARSE, Kind.MULTI_HOT, Kind.SEQUENCE} == {f.kind for f in fs.features}


def test_every_owner_declares_how_often_its_features_change() -> None:
    assert Feature("x", U, Kind.DENSE, changes="rarely").rarely
    assert Feature("x", I, Kind.DENSE, changes="rarely").rarely
    assert (
        not Feature("x", C, Kind.DENSE, changes="request").rarely and not Feature("x", U, Kind.DENSE).rarely
    )
    with pytest.raises(ValueError, match="feature x: changes is request or rarely, got 'hourly'"):
        Feature("x", I, Kind.DENSE, changes="hourly")


def test_how_often_a_feature_changes_round_trips_and_changes_no_byte() -> None:
    fs, _ = default_featureset(WorldConfig())
    slow = {f.name for f in fs.features if f.rarely}
    assert {"u_emb_0", "u_emb_long", "u_id", "u_taste_00", "u_noise_00", "i_noise_emb"} <= slow
    assert not slow & {"u_act_00", "u_hist", "i_click_rate", "c_surface"}  # engagement moves these
    assert FeatureSet.from_json(fs.to_json()) == fs
    plain = FeatureSet(fs.name, fs.version, tuple(dataclasses.replace(f, changes="") for f in fs.features))
    assert plain != fs and plain.fingerprint == fs.fingerprint  # the same bytes: each reads the other
    assert fs.reads(plain) and plain.reads(fs)


# ----------------------------------------------------------------------------------- roles
def _with_history(item: dict, history: dict) -> FeatureSet:
    return FeatureSet(
        "roles",
        1,
        (
            Feature("item", I, Kind.SPARSE, 1, role=Role.ITEM_ID, **item),
            Feature("seen", U, Kind.SEQUENCE, 5, role=Role.HISTORY, **history),
        ),
    )


@pytest.mark.parametrize(
    ("item", "history"),
    [
        ({"rows": 100}, {"rows": 100}),
        ({"rows": 100}, {"rows": 100, "map": "managed", "evict": "lfu"}),  # the defaults, spelt out
        ({"rows": 100, "map": "hash", "string_ids": True}, {"rows": 100, "map": "hash", "string_ids": True}),
        ({"rows": 64, "map": "qr"}, {"rows": 64, "map": "qr"}),
    ],
)
def test_a_history_shares_the_item_ids_table(item: dict, history: dict) -> None:
    fs = _with_history(item, history)
    assert fs.role(Role.HISTORY).name == "seen" and fs.role(Role.ITEM_ID).name == "item"


@pytest.mark.parametrize(
    ("item", "history", "says"),
    [
        ({"rows": 100}, {"rows": 99}, r"\(99 rows, map managed, evict lfu\), got item with 100 rows"),
        (
            {"rows": 100},
            {"rows": 100, "map": "hash"},
            r"\(100 rows, map hash\), got item with 100 rows, map managed",
        ),
        ({"rows": 100}, {"rows": 100, "evict": "lru"}, r"evict lru\), got item with .*evict lfu$"),
        (
            {"rows": 100},
            {"rows": 100, "string_ids": True},
            r"string ids\), got item with 100 rows, map managed, evict lfu$",
        ),
    ],
)
def test_a_history_of_another_table_is_refused_naming_both(item: dict, history: dict, says: str) -> None:
    with pytest.raises(
        ValueError, match=r"history seen holds item ids, so it needs an item_id feature of the same table"
    ) as err:
        _with_history(item, history)
    assert re.search(says, str(err.value)), str(err.value)


def test_a_history_without_an_item_id_is_refused() -> None:
    with pytest.raises(ValueError, match=r"same table \(9 rows, map managed, evict lfu\)$"):
        FeatureSet("roles", 1, (Feature("seen", U, Kind.SEQUENCE, 5, 9, role=Role.HISTORY),))


# ----------------------------------------------------------------------------------- versions
def test_retire_makes_the_next_version_without_the_features_and_records_why() -> None:
    fs = _small_fs()
    v2 = fs.retire({"u_b": "noise in the audit", "i_id": "memorises items"})
    assert (v2.name, v2.version) == (fs.name, fs.version + 1)
    assert [f.name for f in v2.features] == ["i_a", "u_a", "c_hour", "u_id", "u_hist", "c_x", "i_tags"]
    assert v2.retired == {"u_b": "noise in the audit", "i_id": "memorises items"}
    assert [f.name for f in fs.features][-2:] == ["u_b", "i_tags"] and fs.retired == {}  # fs untouched
    v3 = v2.retire({"c_x": "constant"})
    assert v3.version == 3
    assert v3.retired == {"u_b": "noise in the audit", "i_id": "memorises items", "c_x": "constant"}
    assert FeatureSet.from_json(v3.to_json()) == v3


def test_retire_refuses_unknown_names_and_an_empty_mapping() -> None:
    fs = _small_fs()
    with pytest.raises(ValueError, match=r"no features \['nope', 'u_zzz'\] to retire"):
        fs.retire({"u_b": "noise", "u_zzz": "?", "nope": "?"})
    v2 = fs.retire({"u_b": "noise"})
    with pytest.raises(ValueError, match=r"tiny v2 has no features \['u_b'\]"):
        v2.retire({"u_b": "again"})  # already retired
    with pytest.raises(ValueError, match="no features named to retire"):
        fs.retire({})


def test_a_featureset_reads_itself_and_the_versions_it_retired_features_from() -> None:
    v1 = _small_fs()
    v2 = v1.retire({"u_b": "noise"})
    v3 = v2.retire({"i_tags": "noise"})
    assert v1.reads(v1) and v1.reads(_small_fs()) and v2.reads(v2)
    assert v2.reads(v1) and v3.reads(v2) and v3.reads(v1)
    assert v3.read_conflicts(v1) == []
    # the other way round: the older version needs features the newer one lacks
    assert not v1.reads(v2)
    assert v1.read_conflicts(v2) == [
        "written under a newer version (v2 > v1)",
        "features not in the written FeatureSet: ['u_b']",
    ]
    # order does not matter: features are taken by name
    assert FeatureSet(v1.name, 2, v1.features[::-1]).reads(v1)


def test_reads_refuses_another_lineage_another_shape_and_missing_features() -> None:
    v1 = _small_fs()
    assert v1.read_conflicts(FeatureSet("other", 1, v1.features)) == ["another lineage ('other', not 'tiny')"]
    assert not FeatureSet("other", 2, v1.features).reads(v1)
    for name, changes in (
        ("u_hist", {"size": 5}),
        ("c_x", {"owner": Owner.USER}),
        ("i_a", {"kind": Kind.MULTI_HOT, "rows": 10}),
        ("u_id", {"string_ids": True}),  # same bytes per value, hashes of strings: not the same ids
        ("i_id", {"string_ids": False}),
    ):
        reshaped = _replace(v1, name, **changes)
        newer = FeatureSet(v1.name, 2, reshaped.features)
        assert not newer.reads(v1), name
        assert newer.read_conflicts(v1) == [f"features of another shape: ['{name}']"]
    # how ids map to rows is a model's business: a FeatureSet that maps them otherwise reads the data
    for name, changes in (
        ("i_id", {"rows": 501}),
        ("u_hist", {"rows": 7, "map": "hash"}),
        ("c_hour", {"map": "managed", "rows": 1}),
        ("u_id", {"evict": "lfu"}),
        ("i_tags", {"map": "qr", "rows": 1_000_000}),
    ):
        remapped = FeatureSet(v1.name, 2, _replace(v1, name, **changes).features)
        assert remapped.read_conflicts(v1) == [], name
        assert remapped.columns_from(v1, Side.ITEM)[1].tolist() == list(range(v1.layout(Side.ITEM).int_width))
    # a version that adds a feature cannot read data written before it existed
    added = FeatureSet(v1.name, 2, (*v1.features, Feature("u_new", U, Kind.DENSE)))
    assert added.read_conflicts(v1) == ["features not in the written FeatureSet: ['u_new']"]
    # a retired name brought back with another shape does not read the data of the old feature
    back = FeatureSet(v1.name, 3, (*v1.retire({"u_b": "x"}).features, Feature("u_b", U, Kind.DENSE, 2)))
    assert back.read_conflicts(v1) == ["features of another shape: ['u_b']"]


@pytest.mark.parametrize("side", list(Side))
def test_projection_picks_the_surviving_columns_of_each_feature(side: Side) -> None:
    full = default_featureset(WorldConfig(n_users=50, n_items=1_000, n_creators=20))[0]
    names = [f.name for f in full.features]
    # retire every third feature: dense and id kinds, scalars and vectors, of every owner
    pruned = full.retire({n: "audit" for n in names[::3]})
    old, new = full.layout(side), pruned.layout(side)
    assert new.float_width < old.float_width and new.int_width < old.int_width
    rng = np.random.default_rng(1)
    block = FeatureBlock(
        rng.normal(size=(7, old.float_width)).astype("<f4"),
        rng.integers(-(2**63), 2**63 - 1, (7, old.int_width), dtype=np.int64),
    )
    fcols, icols = pruned.columns_from(full, side)
    assert fcols.shape == (new.float_width,) and icols.shape == (new.int_width,)
    got = pruned.project(block, full, side)
    assert got.floats.shape == (7, new.float_width) and got.ints.shape == (7, new.int_width)
    assert got.floats.flags.c_contiguous and not np.shares_memory(got.floats, block.floats)
    was = {s.feature.name: s for s in old.slots}
    for s in new.slots:  # each feature's values, sliced by name from either layout
        o = was[s.feature.name]
        src, dst = (block.floats, got.floats) if s.feature.is_float else (block.ints, got.ints)
        assert np.array_equal(dst[:, s.offset : s.stop], src[:, o.offset : o.stop]), s.feature.name
    # nothing retired: the identity
    assert full.project(block, full, side).same_bytes(block)


def test_projection_follows_the_readers_feature_order() -> None:
    v1 = _small_fs()
    shuffled = FeatureSet(v1.name, 2, v1.features[::-1])
    assert shuffled.layout(Side.REQUEST).names == ["u_b", "u_hist", "u_id", "u_a", "c_x", "c_hour"]
    # request side of v1: floats u_a (0:2), u_b (2:7), c_x (7); ints u_id (0), u_hist (1:5), c_hour (5)
    fcols, icols = shuffled.columns_from(v1, Side.REQUEST)
    assert fcols.tolist() == [2, 3, 4, 5, 6, 0, 1, 7]
    assert icols.tolist() == [1, 2, 3, 4, 0, 5]
    block = FeatureBlock(
        np.arange(16, dtype="<f4").reshape(2, 8), np.arange(12, dtype="<i8").reshape(2, 6) * 2**59
    )
    got = shuffled.project(block, v1, Side.REQUEST)
    assert np.array_equal(got.floats, block.floats[:, fcols]) and np.array_equal(
        got.ints, block.ints[:, icols]
    )


def test_projection_refuses_a_featureset_it_cannot_read() -> None:
    v1 = _small_fs()
    v2 = v1.retire({"u_b": "noise"})
    with pytest.raises(ValueError, match=r"tiny v1 cannot read tiny v2: written under a newer version"):
        v1.columns_from(v2, Side.REQUEST)
    with pytest.raises(ValueError, match="another lineage"):
        v1.project(v1.layout(Side.ITEM).zeros(2), FeatureSet("other", 1, v1.features), Side.ITEM)
