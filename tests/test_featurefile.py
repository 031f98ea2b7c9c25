from __future__ import annotations

from pathlib import Path

import pytest

from leanrec.cli import main
from leanrec.featurefile import FeatureSetFileError, dump_featureset, layout_summary, parse_featureset
from leanrec.schema import Feature, FeatureSet, Kind, Owner, Role, Side
from leanrec.world import WorldConfig, default_featureset

SHOP = """
name = "shop"
version = 3

[[features]]
name = "sku"
owner = "item"
kind = "sparse"
dtype = "string"
rows = 1000
evict = "lru"
role = "item_id"

[[features]]
name = "price"
owner = "item"
kind = "dense"
dtype = "float32"

[[features]]
name = "bought"
owner = "user"
kind = "sequence"
size = 20
dtype = "string"
rows = 1000
map = "managed"
evict = "lru"
role = "history"

[[features]]
name = "taste"
owner = "user"
kind = "dense"
size = 8
space = "tt"
changes = "rarely"
doc = "a \\"quoted\\" doc, ünïcode"

[[features]]
name = "hour"
owner = "context"
kind = "sparse"
dtype = "int64"
rows = 24
map = "hash"

[retired]
old_price = "worth nothing measurable"
"""


def test_a_file_declares_features_roles_and_retired_names() -> None:
    fs = parse_featureset(SHOP)
    assert (fs.name, fs.version, len(fs)) == ("shop", 3, 5)
    assert fs.role(Role.ITEM_ID).name == "sku" and fs.role(Role.HISTORY).name == "bought"
    assert fs.role(Role.USER_ID) is None
    assert fs["taste"].space == "tt" and fs["taste"].doc == 'a "quoted" doc, ünïcode'
    assert fs["taste"].rarely and [f.name for f in fs.features if f.changes] == ["taste"]
    assert fs.retired == {"old_price": "worth nothing measurable"}
    sku, bought, hour = fs["sku"], fs["bought"], fs["hour"]
    assert (sku.rows, sku.string_ids, sku.id_map, sku.id_evict) == (1000, True, "managed", "lru")
    assert (bought.rows, bought.string_ids, bought.id_map, bought.id_evict) == (1000, True, "managed", "lru")
    assert (hour.rows, hour.string_ids, hour.id_map, hour.id_evict) == (24, False, "hash", "")
    assert (fs["price"].rows, fs["price"].string_ids, fs["price"].id_map) == (0, False, "")
    # request side: taste (8 float32), bought (20 int64 ids), hour (1 id); item side: price, sku
    assert layout_summary(fs) == {
        "request": {"features": 3, "float_columns": 8, "int_columns": 21, "bytes": 8 * 4 + 21 * 8},
        "item": {"features": 2, "float_columns": 1, "int_columns": 1, "bytes": 4 + 8},
    }


@pytest.mark.parametrize("seed", [0, 7])
def test_what_is_written_reads_back_as_the_same_featureset(seed: int) -> None:
    fs, _ = default_featureset(WorldConfig(n_users=500, n_items=2000, seed=seed))
    pruned = fs.retire({"u_noise_00": "noise", "i_noise_emb": "noise"})
    for one in (fs, pruned, parse_featureset(SHOP)):
        back = parse_featureset(dump_featureset(one))
        assert back == one and back.fingerprint == one.fingerprint
        assert back.layout(Side.REQUEST) == one.layout(Side.REQUEST)
    text = dump_featureset(parse_featureset(SHOP))
    assert 'dtype = "string"' in text and 'map = "hash"' in text and 'evict = "lru"' in text
    assert text.count("changes = ") == 1 and 'changes = "rarely"' in text


def _with(feature: str) -> str:
    return f'name = "x"\nversion = 1\n\n[[features]]\n{feature}\n'


_ROWS_NEEDED = r"shop.toml: feature 1 \(a\): a managed map needs its embedding rows \(rows >= 1\), got 0$"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name = [", "not valid TOML"),
        ('version = 1\n[[features]]\nname = "a"\nowner = "user"\nkind = "dense"\n', "name is missing"),
        ('name = "x"\nversion = "one"\n[[features]]\n', "version must be a whole number"),
        ('name = "x"\nversion = 1\n', "no features"),
        ('name = "x"\nversion = 1\nowner = "me"\n', r"unknown key\(s\) \['owner'\]"),
        (_with('name = "a"\nowner = "shop"\nkind = "dense"'), r"feature 1 \(a\): owner must be one of"),
        (_with('name = "a"\nowner = "user"\nkind = "float"'), r"kind must be one of dense \| sparse"),
        (_with('name = "a"\nowner = "user"\nkind = "dense"\nwidth = 3'), r"unknown key\(s\) \['width'\]"),
        (_with('name = "a"\nowner = "user"\nkind = "dense"\nsize = 0'), "size must be >= 1"),
        (_with('name = "a"\nowner = "user"\nkind = "dense"\nsize = 2.5'), "size must be a whole number"),
        (_with('name = "a"\nowner = "user"\nkind = "sparse"'), _ROWS_NEEDED),
        (_with('name = "a"\nowner = "user"\nkind = "sparse"\nmap = "managed"'), _ROWS_NEEDED),
        (_with('name = "a"\nowner = "user"\nkind = "sparse"\nmap = "managed"\nrows = 0'), _ROWS_NEEDED),
        (
            _with('name = "a"\nowner = "user"\nkind = "multi_hot"\nsize = 3\nrows = -2'),
            r"\(a\): a managed .*got -2",
        ),
        (
            _with('name = "a"\nowner = "user"\nkind = "sparse"\nmap = "qr"\nrows = 1'),
            r"\(a\): a qr map .*>= 2",
        ),
        (
            _with('name = "a"\nowner = "user"\nkind = "sparse"\nmap = "lsh"\nrows = 9'),
            r"\(a\): unknown map 'lsh'",
        ),
        (
            _with('name = "a"\nowner = "user"\nkind = "sparse"\nmap = 3\nrows = 9'),
            r"\(a\): map must be a string",
        ),
        (
            _with('name = "a"\nowner = "user"\nkind = "sparse"\nrows = 9\nmap = "hash"\nevict = "lru"'),
            "only for a managed",
        ),
        (
            _with('name = "a"\nowner = "user"\nkind = "sparse"\nrows = 9\nevict = "fifo"'),
            "evict is lfu or lru",
        ),
        (_with('name = "a"\nowner = "user"\nkind = "sparse"\nvocab = 9'), r"unknown key\(s\) \['vocab'\]"),
        (
            _with('name = "a"\nowner = "user"\nkind = "sparse"\nrows = 9\ndtype = "int32"'),
            "dtype is int64 or string",
        ),
        (_with('name = "a"\nowner = "user"\nkind = "dense"\ndtype = "float64"'), "dtype is float32"),
        (_with('name = "a"\nowner = "user"\nkind = "dense"\ndtype = "string"'), "dtype is float32"),
        (_with('name = "a"\nowner = "user"\nkind = "dense"\nrows = 4'), r"\(a\): rows, map, .* not dense"),
        (_with('name = "a"\nowner = "user"\nkind = "sparse"\nrows = 9\nrole = "star"'), "unknown role"),
        (_with('name = "a"\nowner = "user"\nkind = "sparse"\nrows = 9\nrole = "item_id"'), "needs a sparse"),
        (_with('name = "a b"\nowner = "user"\nkind = "dense"'), "must be an identifier"),
        (_with('owner = "user"\nkind = "dense"'), r"feature 1: name is missing"),
        (
            _with('name = "h"\nowner = "user"\nkind = "sequence"\nsize = 5\nrows = 9\nrole = "history"'),
            r"history h holds item ids, so it needs an item_id feature of the same table \(9 rows",
        ),
        (
            _with('name = "h"\nowner = "user"\nkind = "sequence"\nsize = 5\nrows = 9\nrole = "history"')
            + '\n[[features]]\nname = "i"\nowner = "item"\nkind = "sparse"\nrows = 9\ndtype = "string"\n'
            + 'role = "item_id"\n',
            r"same table \(9 rows, map managed, evict lfu\), got i with 9 rows, .*string ids",
        ),
        (
            _with('name = "h"\nowner = "user"\nkind = "sequence"\nsize = 5\nrows = 9\nrole = "history"')
            + '\n[[features]]\nname = "i"\nowner = "item"\nkind = "sparse"\nrows = 10\nrole = "item_id"\n',
            r"same table \(9 rows, map managed, evict lfu\), got i with 10 rows",
        ),
        (
            _with('name = "a"\nowner = "user"\nkind = "dense"')
            + '\n[[features]]\nname = "a"\nowner = "item"\nkind = "dense"\n',
            "duplicate feature names",
        ),
        (_with('name = "a"\nowner = "user"\nkind = "dense"') + "\n[retired]\nb = 1\n", "maps each retired"),
        (
            _with('name = "item_id"\nowner = "item"\nkind = "sparse"\nrows = 9\nrole = "item_id"'),
            r"feature name\(s\) \['item_id'\] are warehouse columns",
        ),
        (_with('name = "click"\nowner = "item"\nkind = "dense"'), r"\['click'\] are warehouse columns"),
        (_with('name = "score"\nowner = "item"\nkind = "dense"'), r"\['score'\] are warehouse columns"),
        (
            _with('name = "a"\nowner = "user"\nkind = "dense"\nchanges = "daily"'),
            r"shop.toml: feature 1 \(a\): changes is request or rarely, got 'daily'$",
        ),
    ],
)
def test_every_mistake_is_refused_with_what_was_wrong(text: str, message: str) -> None:
    with pytest.raises(FeatureSetFileError, match=message):
        parse_featureset(text, "shop.toml")


def test_a_role_is_held_by_one_feature_of_its_shape() -> None:
    ids = [Feature(f"i{k}", Owner.ITEM, Kind.SPARSE, 1, 10, role=Role.ITEM_ID) for k in range(2)]
    with pytest.raises(ValueError, match="one feature may have the item_id role"):
        FeatureSet("x", 1, tuple(ids))
    with pytest.raises(ValueError, match="the history role needs a sequence feature of the user"):
        Feature("h", Owner.ITEM, Kind.SEQUENCE, 5, 10, role=Role.HISTORY)
    # A role does not change the bytes: blobs of a FeatureSet without roles stay readable.
    plain = FeatureSet("x", 1, (Feature("i", Owner.ITEM, Kind.SPARSE, 1, 10),))
    assert FeatureSet("x", 1, (ids[0].__class__("i", Owner.ITEM, Kind.SPARSE, 1, 10, role="item_id"),)).reads(
        plain
    )


def test_featureset_check_prints_the_layout_and_refuses_a_bad_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "shop.toml"
    good.write_text(SHOP)
    assert main(["featureset", "check", str(good)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "item_id: sku" in out and "history: bought" in out
    assert "a ranked request of 100 items logs 1,400 bytes" in out  # 200 + 100 * 12
    assert "managed lru, strings" in out and "int64" in out  # how sku's ids map; the ids' width
    bad = tmp_path / "bad.toml"
    bad.write_text(_with('name = "a"\nowner = "shop"\nkind = "dense"'))
    assert main(["featureset", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "owner must be one of user | item | context, got 'shop'" in err and len(err.splitlines()) == 1
    assert main(["featureset", "check", str(tmp_path / "none.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_world_writes_its_featureset_as_a_file_that_checks(tmp_path: Path) -> None:
    out = tmp_path / "world.toml"
    assert main(["featureset", "world", "--n-users", "300", "--n-items", "2000", "--out", str(out)]) == 0
    fs, _ = default_featureset(WorldConfig(n_users=300, n_items=2000))
    assert parse_featureset(out.read_text()) == fs
    assert main(["featureset", "check", str(out)]) == 0
