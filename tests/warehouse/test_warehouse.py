"""ParquetWarehouse: partitions, compression, atomic commits, readers, schemas and refusals."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from leanrec.featurefile import reserved_names
from leanrec.schema import PAD_ID, FeatureBlock, FeatureSet, Side
from leanrec.warehouse import (
    ParquetWarehouse,
    RequestRecord,
    TableLayout,
    WarehouseError,
    arrays_block,
    read_table,
    records_table,
    warehouse_bytes,
)
from leanrec.warehouse.store import dedup_copy, featureset_of, side_paths, sorted_impression_bytes
from leanrec.warehouse.tables import (
    FEATURESET_KEY,
    LAYOUT_KEY,
    SIDE_KEY,
    DedupTable,
    dedup_groups,
    dedup_tables,
    parquet_options,
    row_keys,
    schema,
    undedup,
)
from leanrec.world import WorldConfig, default_featureset

LAYOUTS = [TableLayout.REQUEST, TableLayout.IMPRESSION]
ALL_LAYOUTS = [*LAYOUTS, TableLayout.DEDUP]
HOUR_MS = 3_600_000
T0 = int(datetime(2026, 11, 2, 8, tzinfo=UTC).timestamp() * 1000)


@pytest.fixture(scope="module")
def fs(small_config: WorldConfig) -> FeatureSet:
    return default_featureset(small_config)[0]


def raw_ids(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Raw 64-bit ids of ``shape``: small ones, padding, and ones near both ends of int64."""
    small = rng.integers(-1, 20, shape)
    extreme = np.where(
        rng.random(shape) < 0.5,
        rng.integers(2**63 - 50, 2**63 - 1, shape),
        rng.integers(-(2**63), -(2**63) + 50, shape),
    )
    return np.where(rng.random(shape) < 0.5, small, extreme).astype(np.int64)


def make_records(fs: FeatureSet, times: list[int], seed: int = 0) -> list[RequestRecord]:
    """One record per time, with 1..7 viewed items each, random exact features, labels and scores.

    Ids (item ids and id features) are raw int64, small or near either end of the range. A fifth of
    the scores are NaN (the ranker gave none there), and every fourth record has none at all.
    """
    rng = np.random.default_rng(seed)
    req, item = fs.layout(Side.REQUEST), fs.layout(Side.ITEM)
    out = []
    for i, ts in enumerate(times):
        k = int(rng.integers(1, 8))
        positions = np.sort(rng.choice(100, k, replace=False)).astype(np.int32)
        out.append(
            RequestRecord(
                f"w{seed:02d}-{i:04d}",
                int(rng.integers(-(2**63), 2**63 - 1)),
                ts,
                fs.version,
                FeatureBlock(
                    rng.normal(size=(1, req.float_width)).astype(np.float32),
                    raw_ids(rng, (1, req.int_width)),
                ),
                positions,
                np.where((ids := raw_ids(rng, (k,))) == PAD_ID, -2, ids),  # no item is the padding id
                ts + np.sort(rng.integers(100, 500_000, k)).astype(np.int64),
                FeatureBlock(
                    rng.normal(size=(k, item.float_width)).astype(np.float32),
                    raw_ids(rng, (k, item.int_width)),
                ),
                {
                    "click": rng.random(k) < 0.4,
                    "like": rng.random(k) < 0.2,
                    "share": rng.random(k) < 0.1,
                    "hide": rng.random(k) < 0.1,
                    "watch_ms": rng.integers(0, 90_000, k).astype(np.int32),
                },
                None
                if i % 4 == 3
                else np.where(rng.random(k) < 0.2, np.nan, rng.normal(size=k)).astype(np.float32),
            )
        )
    return out


def want_scores(records: Sequence[RequestRecord]) -> list[float | None]:
    """The scores a warehouse holds for ``records``, in record order: null where NaN or none."""
    got = np.concatenate([np.full(len(r), np.nan) if r.scores is None else r.scores for r in records])
    return [None if np.isnan(x) else float(x) for x in got.astype(np.float32)]


def without_scores(table: pa.Table, layout: TableLayout) -> pa.Table:
    """A warehouse table as written before scores were kept: no ``score`` column (or field)."""
    if layout is TableLayout.IMPRESSION:
        return table.drop_columns(["score"])
    index = table.schema.get_field_index("items")
    fields = [f for f in table.schema.field(index).type.value_type if f.name != "score"]
    items = pa.field("items", pa.list_(pa.struct(fields)), nullable=False)
    return table.cast(table.schema.set(index, items))  # the schema's metadata kept


def write_old(root: Path, fs: FeatureSet, layout: TableLayout, records: list[RequestRecord]) -> Path:
    """Write ``records`` as one file of a warehouse written before scores were kept."""
    table = without_scores(records_table(fs, records, layout), layout)
    assert "score" not in str(table.schema)
    when = datetime.fromtimestamp(records[0].ts_ms // 1000, UTC)  # the hour of its requests
    assert all(r.ts_ms // HOUR_MS == records[0].ts_ms // HOUR_MS for r in records)
    folder = root / f"dt={when:%Y-%m-%d}" / f"hour={when:%H}"
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-old.parquet", compression="zstd")
    return folder / "part-old.parquet"


def write(root: Path, fs: FeatureSet, layout: TableLayout, records: list[RequestRecord]) -> ParquetWarehouse:
    wh = ParquetWarehouse(str(root), fs, layout)
    wh.append(records)
    wh.flush()
    return wh


def cols(table: pa.Table) -> dict[str, pa.ChunkedArray]:
    return {name: table.column(name) for name in table.column_names}


def bits(block: FeatureBlock) -> np.ndarray:
    assert block.ints.dtype == np.int64, block.ints.dtype
    return np.hstack([block.floats.view(np.uint32), block.ints.view(np.uint32)])


# --------------------------------------------------------------------------- files and partitions
@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_files_are_zstd_parquet_under_hive_partitions(
    fs: FeatureSet, tmp_path: Path, layout: TableLayout
) -> None:
    times = [T0 + 5, T0 + HOUR_MS - 1, T0 + HOUR_MS, T0 + 16 * HOUR_MS + 7, T0 + 16 * HOUR_MS + 9]
    records = make_records(fs, times)
    wh = ParquetWarehouse(str(tmp_path / "wh"), fs, layout)
    wh.append(records)
    written = wh.flush()
    assert len(written) == 3  # 08h, 09h, and 00h of the next day
    dedup = layout is TableLayout.DEDUP
    rel = sorted(str(Path(p).relative_to(tmp_path / "wh")) for p in written)
    pattern = re.compile(r"dt=\d{4}-\d{2}-\d{2}/hour=\d{2}/part-[0-9a-f]+\.parquet")
    assert all(pattern.fullmatch(r) for r in rel), rel
    assert [r.rsplit("/", 1)[0] for r in rel] == [
        "dt=2026-11-02/hour=08",
        "dt=2026-11-02/hour=09",
        "dt=2026-11-03/hour=00",
    ]
    # A deduplicated file has its two side tables beside it, named after it.
    every = [*written, *(str(s) for p in written for s in side_paths(p).values())] if dedup else written
    assert sorted(str(p) for p in (tmp_path / "wh").rglob("*.parquet")) == sorted(every)
    for path in written:
        folder = Path(path).parent
        day, hour = folder.parent.name.split("=")[1], int(folder.name.split("=")[1])
        pf = pq.ParquetFile(path)
        ts = pf.read(columns=["ts_ms"]).column("ts_ms").to_numpy()
        for t in ts:
            when = datetime.fromtimestamp(int(t) / 1000, UTC)
            assert (f"{when:%Y-%m-%d}", when.hour) == (day, hour)
    for path in every:
        meta = pq.ParquetFile(path).metadata
        codecs = {
            meta.row_group(g).column(c).compression
            for g in range(meta.num_row_groups)
            for c in range(meta.num_columns)
        }
        assert codecs == {"ZSTD"}
        # Dictionaries for ids and labels that repeat; none for distinct times and keys, nor for floats,
        # which rarely repeat a value.
        chunks = {
            meta.row_group(g).column(c).path_in_schema: meta.row_group(g).column(c)
            for g in range(meta.num_row_groups)
            for c in range(meta.num_columns)
        }
        assert {c.has_dictionary_page for c in chunks.values() if c.physical_type == "FLOAT"} == {False}
        for name, chunk in chunks.items():
            if name.split(".")[-1] == "view_ms" or (path not in written and name.endswith("_key")):
                assert not chunk.has_dictionary_page, name  # distinct times, a side table's own keys
    assert sorted(Path(p).name for p in wh.files) == sorted(Path(p).name for p in written)
    assert wh.bytes_stored() == sum(Path(p).stat().st_size for p in every)
    assert wh.flush() == []  # nothing buffered, nothing written


def test_the_buffer_commits_itself_when_full(fs: FeatureSet, tmp_path: Path) -> None:
    wh = ParquetWarehouse(str(tmp_path / "wh"), fs, TableLayout.REQUEST, flush_rows=3)
    records = make_records(fs, [T0 + i for i in range(4)])
    wh.append(records[:2])
    assert list((tmp_path / "wh").rglob("*.parquet")) == []
    wh.append(records[2:])
    assert len(list((tmp_path / "wh").rglob("*.parquet"))) == 1
    assert wh.read().num_rows == 4


def test_files_are_written_under_a_hidden_name_and_renamed(
    fs: FeatureSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "wh"
    seen: list[str] = []
    real = pq.write_table

    def spy(table: pa.Table, where: str, **kwargs: object) -> None:
        real(table, where, **kwargs)
        seen.append(str(where))
        # The half-committed file is on disk now: no reader may see it.
        assert Path(where).name.startswith(".")
        with pytest.raises(WarehouseError, match="holds no Parquet files"):
            read_table(str(root), fs)
        assert warehouse_bytes(str(root)) == 0
        assert ds.dataset(str(root), format="parquet").files == []
        assert list(root.rglob("*.parquet")) == []

    monkeypatch.setattr(pq, "write_table", spy)
    wh = write(root, fs, TableLayout.REQUEST, make_records(fs, [T0 + 1, T0 + 2]))
    assert len(seen) == 1
    assert not Path(seen[0]).exists()
    assert [Path(p).name for p in wh.files] == [Path(seen[0]).name.removeprefix(".").removesuffix(".tmp")]
    assert wh.read().num_rows == 2


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_a_leftover_temp_file_breaks_no_reader(fs: FeatureSet, tmp_path: Path, layout: TableLayout) -> None:
    root = tmp_path / "wh"
    records = make_records(fs, [T0 + 1, T0 + 2, T0 + 3])
    wh = write(root, fs, layout, records)
    size = wh.bytes_stored()
    part = Path(wh.files[0]).parent
    (part / ".part-x.parquet.tmp").write_bytes(b"PAR1 half a file")  # a writer died mid-commit
    n = sum(len(r) for r in records) if layout is TableLayout.IMPRESSION else 3
    assert read_table(str(root), fs, layout).num_rows == n
    assert warehouse_bytes(str(root)) == size
    dataset = ds.dataset(str(root), format="parquet", partitioning="hive")
    assert dataset.count_rows() == n  # deduplicated: the side tables' _names are not the dataset's
    # DuckDB globs _names too: a deduplicated warehouse's request files are its part-* files.
    glob = f"{root}/**/{'part-*' if layout is TableLayout.DEDUP else '*'}.parquet"
    got = duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}', hive_partitioning=true)").fetchall()
    assert got == [(n,)]


# --------------------------------------------------------------------------- readers
def test_pyarrow_and_duckdb_open_both_layouts_as_they_are(fs: FeatureSet, tmp_path: Path) -> None:
    records = make_records(fs, [T0 + 10 * i for i in range(6)] + [T0 + HOUR_MS + 1], seed=3)
    n_examples = sum(len(r) for r in records)
    for layout, rows in ((TableLayout.REQUEST, len(records)), (TableLayout.IMPRESSION, n_examples)):
        root = tmp_path / layout.value
        write(root, fs, layout, records)
        table = ds.dataset(str(root), format="parquet", partitioning="hive").to_table()
        assert table.num_rows == rows
        assert sorted(set(table.column("hour").to_pylist())) == [8, 9]
        assert set(table.column("dt").to_pylist()) == {"2026-11-02"}
        glob = f"{root}/**/*.parquet"
        con = duckdb.connect()
        src = f"read_parquet('{glob}', hive_partitioning=true)"
        assert con.sql(f"SELECT count(*) FROM {src}").fetchall() == [(rows,)]
        assert con.sql(f"SELECT count(DISTINCT request_id) FROM {src}").fetchall() == [(len(records),)]
        hours = con.sql(f"SELECT DISTINCT CAST(hour AS INTEGER) FROM {src} ORDER BY 1").fetchall()
        assert hours == [(8,), (9,)]
        if layout is TableLayout.REQUEST:
            assert con.sql(f"SELECT sum(len(items)) FROM {src}").fetchall() == [(n_examples,)]
            clicks = con.sql(f"SELECT count(*) FROM (SELECT unnest(items) AS it FROM {src}) WHERE it.click")
        else:
            clicks = con.sql(f"SELECT count(*) FROM {src} WHERE click")
        want_clicks = sum(int(r.labels["click"].sum()) for r in records)
        assert clicks.fetchall() == [(want_clicks,)]
        # A feature vector reads back with its values, in DuckDB too.
        r = records[2]
        [(u_emb,)] = con.sql(
            f"SELECT u_emb_0 FROM {src} WHERE request_id = '{r.request_id}' LIMIT 1"
        ).fetchall()
        slot = next(s for s in fs.layout(Side.REQUEST).slots if s.feature.name == "u_emb_0")
        assert np.array_equal(np.array(u_emb, np.float32), r.request.floats[0, slot.offset : slot.stop])
        con.close()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_schema_carries_the_featureset_and_layout(
    fs: FeatureSet, tmp_path: Path, layout: TableLayout
) -> None:
    wh = write(tmp_path / "wh", fs, layout, make_records(fs, [T0]))
    meta = pq.read_schema(wh.files[0]).metadata
    assert FeatureSet.from_json(meta[FEATURESET_KEY].decode()) == fs
    assert meta[LAYOUT_KEY].decode() == layout.value
    assert wh.read().schema.metadata[FEATURESET_KEY] == fs.to_json().encode()


def test_request_level_rows_hold_the_request_side_once(fs: FeatureSet, tmp_path: Path) -> None:
    records = make_records(fs, [T0 + i for i in range(5)], seed=8)
    table = write(tmp_path / "wh", fs, TableLayout.REQUEST, records).read().sort_by("request_id")
    req_names = fs.layout(Side.REQUEST).names
    item_names = fs.layout(Side.ITEM).names
    assert table.num_rows == len(records)
    item_type = table.schema.field("items").type.value_type
    inner = {item_type.field(i).name for i in range(item_type.num_fields)}
    assert not inner & set(req_names)  # no request-side feature inside an item
    assert set(item_names) <= inner
    assert set(req_names) <= set(table.column_names)
    lengths = pc.list_value_length(table.column("items")).to_pylist()
    assert lengths == [len(r) for r in records]
    got = arrays_block(fs.layout(Side.REQUEST), cols(table), table.num_rows)
    want = FeatureBlock.concat([r.request for r in records])
    assert np.array_equal(bits(got), bits(want))
    for i, r in enumerate(records):
        items = table.column("items")[i].values
        item_cols = {name: items.field(name) for name in item_names}
        block = arrays_block(fs.layout(Side.ITEM), item_cols, len(r))
        assert np.array_equal(bits(block), bits(r.items))
        assert items.field("position").to_numpy().tolist() == r.positions.tolist()
        assert items.field("watch_ms").to_numpy().tolist() == r.labels["watch_ms"].tolist()
        assert items.field("score").type == pa.float32()
        assert items.field("score").to_pylist() == want_scores([r])  # beside the item's other fields


def test_impression_level_rows_are_one_per_viewed_item(fs: FeatureSet, tmp_path: Path) -> None:
    records = make_records(fs, [T0 + i for i in range(5)], seed=9)
    table = write(tmp_path / "wh", fs, TableLayout.IMPRESSION, records).read()
    table = table.sort_by([("request_id", "ascending"), ("position", "ascending")])
    assert table.num_rows == sum(len(r) for r in records)
    req = arrays_block(fs.layout(Side.REQUEST), cols(table), table.num_rows)
    items = arrays_block(fs.layout(Side.ITEM), cols(table), table.num_rows)
    parent = np.repeat(np.arange(len(records)), [len(r) for r in records])
    want_req = FeatureBlock.concat([r.request for r in records]).take(parent)  # repeated in every row
    assert np.array_equal(bits(req), bits(want_req))
    assert np.array_equal(bits(items), bits(FeatureBlock.concat([r.items for r in records])))
    assert (
        table.column("item_id").to_numpy().tolist() == np.concatenate([r.item_ids for r in records]).tolist()
    )
    assert table.schema.field("score").type == pa.float32()  # one float per row
    assert table.column("score").to_pylist() == want_scores(records)


# --------------------------------------------------------------------------- the ranker's scores
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_score_column_is_the_warehouses_own_and_no_feature_can_take_its_name(
    fs: FeatureSet, tmp_path: Path, layout: TableLayout
) -> None:
    table = write(tmp_path / "wh", fs, layout, make_records(fs, [T0 + i for i in range(8)], seed=2)).read()
    item_type = table.schema.field("items").type.value_type if layout is TableLayout.REQUEST else table.schema
    field = item_type.field("score")
    assert field.type == pa.float32() and field.nullable  # null where the ranker gave none
    assert "score" in reserved_names()
    assert "score" not in {f.name for f in fs.features}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scores_read_back_at_their_positions_in_pyarrow_and_duckdb(
    fs: FeatureSet, tmp_path: Path, layout: TableLayout
) -> None:
    records = make_records(fs, [T0 + 10 * i for i in range(9)], seed=12)
    assert any(r.scores is None for r in records)
    assert any(r.scores is not None and np.isnan(r.scores).any() for r in records)
    wh = write(tmp_path / "wh", fs, layout, records)
    rows = wh.read_examples()  # sorted by request id and position, as the records are
    assert rows.column("score").to_pylist() == want_scores(records)
    src = f"read_parquet('{tmp_path / 'wh'}/**/*.parquet', hive_partitioning=true)"
    if layout is TableLayout.REQUEST:
        unnested = f"(SELECT request_id, unnest(items) AS it FROM {src})"
        query = f"SELECT request_id, it.position, it.score FROM {unnested}"
    else:
        query = f"SELECT request_id, position, score FROM {src}"
    got = duckdb.sql(query + " ORDER BY 1, 2").fetchall()
    assert [s for _, _, s in got] == want_scores(records)
    assert [(rid, p) for rid, p, _ in got] == [(r.request_id, int(p)) for r in records for p in r.positions]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_warehouse_written_before_scores_were_kept_reads_with_null_scores(
    fs: FeatureSet, tmp_path: Path, layout: TableLayout
) -> None:
    records = make_records(fs, [T0 + 1_000 * i for i in range(6)], seed=13)
    old_root = tmp_path / "old"
    write_old(old_root, fs, layout, records)
    old = ParquetWarehouse(str(old_root), fs, layout)
    now = write(tmp_path / "now", fs, layout, records)
    got, want = old.read_examples(), now.read_examples()
    assert got.schema.equals(want.schema)
    assert got.column("score").null_count == got.num_rows == sum(len(r) for r in records)
    for name in want.column_names:  # everything else as a warehouse written today holds it
        if name != "score":
            assert got.column(name).equals(want.column(name)), name
    assert old.committed([records[0].request_id, "nope"]) == {records[0].request_id}
    if layout is TableLayout.REQUEST:  # the impression layout of an old file can be measured too
        assert sorted_impression_bytes(str(old_root), fs) > 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_folder_of_files_with_and_without_scores_reads_as_one(
    fs: FeatureSet, tmp_path: Path, layout: TableLayout
) -> None:
    before = make_records(fs, [T0 + i for i in range(4)], seed=14)  # the hour before the upgrade
    after = make_records(fs, [T0 + HOUR_MS + i for i in range(5)], seed=15)
    root = tmp_path / "wh"
    write_old(root, fs, layout, before)
    write(root, fs, layout, after)
    rows = ParquetWarehouse(str(root), fs, layout).read_examples()
    assert rows.num_rows == sum(len(r) for r in (*before, *after))
    old = pc.is_in(rows.column("request_id"), pa.array([r.request_id for r in before]))
    assert rows.filter(old).column("score").null_count == sum(len(r) for r in before)
    assert rows.filter(pc.invert(old)).column("score").to_pylist() == want_scores(after)


# --------------------------------------------------------------------------- refusals
def test_read_table_refuses_unusable_paths_with_a_clear_error(fs: FeatureSet, tmp_path: Path) -> None:
    with pytest.raises(WarehouseError, match="does not exist"):
        read_table(str(tmp_path / "nowhere"), fs)
    a_file = tmp_path / "file.parquet"
    a_file.write_bytes(b"x")
    with pytest.raises(WarehouseError, match="is not a folder"):
        read_table(str(a_file), fs)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WarehouseError, match="holds no Parquet files"):
        read_table(str(empty), fs)
    (empty / "dt=2026-11-02" / "hour=08").mkdir(parents=True)
    (empty / "dt=2026-11-02" / "hour=08" / ".part-z.parquet.tmp").write_bytes(b"half")
    with pytest.raises(WarehouseError, match="holds no Parquet files"):
        read_table(str(empty), fs)
    with pytest.raises(WarehouseError, match="does not exist"):
        warehouse_bytes(str(tmp_path / "nowhere"))


def test_read_table_refuses_the_wrong_layout(fs: FeatureSet, tmp_path: Path) -> None:
    records = make_records(fs, [T0])
    lean = write(tmp_path / "lean", fs, TableLayout.REQUEST, records)
    naive = write(tmp_path / "naive", fs, TableLayout.IMPRESSION, records)
    with pytest.raises(WarehouseError, match="is request-level, expected impression-level"):
        read_table(lean.uri, fs, TableLayout.IMPRESSION)
    with pytest.raises(WarehouseError, match="is impression-level, expected request-level"):
        read_table(naive.uri, fs, TableLayout.REQUEST)
    # Without a layout asked for, each reads as what it is.
    assert read_table(lean.uri, fs).schema.names[-1] == "items"
    assert read_table(naive.uri, fs).num_rows == len(records[0])


# --------------------------------------------------------------------------- FeatureSet versions
RETIRED = {
    "u_noise_00": "noise",
    "u_emb_2": "stale embedding",
    "u_hist_age": "no gain",
    "u_gender": "policy",
    "c_dow": "no gain",
    "i_noise_emb": "stale embedding",
    "i_tags": "no gain",
}


@pytest.fixture(scope="module")
def v2(fs: FeatureSet) -> FeatureSet:
    return fs.retire(RETIRED)


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_a_v1_warehouse_reads_under_v2_without_the_retired_columns(
    fs: FeatureSet, v2: FeatureSet, tmp_path: Path, layout: TableLayout
) -> None:
    records = make_records(fs, [T0 + 1_000 * i for i in range(6)], seed=4)
    old = write(tmp_path / "wh", fs, layout, records)
    as_v1 = old.read_examples()
    as_v2 = ParquetWarehouse(old.uri, v2, layout).read_examples()
    assert as_v2.num_rows == as_v1.num_rows == sum(len(r) for r in records)
    assert not set(RETIRED) & set(as_v2.column_names)
    assert as_v2.column_names == [n for n in as_v1.column_names if n not in RETIRED]
    for name in as_v2.column_names:  # every surviving value identical to the v1 read
        assert as_v2.column(name).equals(as_v1.column(name)), name
    assert as_v2.schema.metadata[FEATURESET_KEY] == v2.to_json().encode()
    assert set(as_v2.column("fs_version").to_pylist()) == {1}  # rows still say what they were logged under
    # as blocks: the v1 blocks cut to v2's layout
    for side in Side:
        got = arrays_block(v2.layout(side), cols(as_v2), as_v2.num_rows)
        want = v2.project(arrays_block(fs.layout(side), cols(as_v1), as_v1.num_rows), fs, side)
        assert np.array_equal(bits(got), bits(want)), side
    if layout is not TableLayout.IMPRESSION:  # nested too: the items structs hold only v2's item fields
        item_type = read_table(old.uri, v2).schema.field("items").type.value_type
        inner = [item_type.field(i).name for i in range(item_type.num_fields)]
        assert "i_tags" not in inner and "i_noise_emb" not in inner and "i_emb" in inner


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_a_folder_of_v1_and_v2_files_reads_under_v2(
    fs: FeatureSet, v2: FeatureSet, tmp_path: Path, layout: TableLayout
) -> None:
    day = 24 * HOUR_MS
    old_records = make_records(fs, [T0 + 1_000 * i for i in range(5)], seed=5)
    new_records = make_records(v2, [T0 + day + 1_000 * i for i in range(4)], seed=6)
    root = tmp_path / "wh"
    write(root, fs, layout, old_records)
    write(root, v2, layout, new_records)  # the next day, after the audit
    assert {p.parent.parent.name for p in root.rglob("*.parquet")} == {"dt=2026-11-02", "dt=2026-11-03"}
    assert featureset_of(str(root)) == v2  # the newest version, which reads every file
    table = ParquetWarehouse(str(root), v2, layout).read_examples()
    assert table.num_rows == sum(len(r) for r in (*old_records, *new_records))
    versions = table.column("fs_version").to_numpy()
    old_rows = table.filter(pa.array(versions == 1))
    new_rows = table.filter(pa.array(versions == 2))
    assert set(old_rows.column("request_id").to_pylist()) == {r.request_id for r in old_records}
    # old rows: exactly what a v1 read of those files gives, cut to v2
    only_old = write(tmp_path / "old", fs, layout, old_records).read_examples()
    for side in Side:
        want = v2.project(arrays_block(fs.layout(side), cols(only_old), only_old.num_rows), fs, side)
        assert np.array_equal(
            bits(arrays_block(v2.layout(side), cols(old_rows), old_rows.num_rows)), bits(want)
        )
    # new rows: the v2 records as they were written
    want_items = FeatureBlock.concat([r.items for r in sorted(new_records, key=lambda r: r.request_id)])
    assert np.array_equal(
        bits(arrays_block(v2.layout(Side.ITEM), cols(new_rows), new_rows.num_rows)), bits(want_items)
    )
    wh = ParquetWarehouse(str(root), v2, layout)
    ids = [old_records[0].request_id, new_records[0].request_id, "nope"]
    assert wh.committed(ids) == set(ids[:2])


@pytest.mark.parametrize("layout", ALL_LAYOUTS)
def test_a_v2_warehouse_is_refused_under_v1(
    fs: FeatureSet, v2: FeatureSet, tmp_path: Path, layout: TableLayout
) -> None:
    new = write(tmp_path / "wh", v2, layout, make_records(v2, [T0], seed=7))
    with pytest.raises(
        WarehouseError, match=r"written under FeatureSet demo v2 .*not demo v1 .*newer version"
    ) as err:
        read_table(new.uri, fs)
    assert "features not in the written FeatureSet: ['u_noise_00', 'u_emb_2'" in str(err.value)
    other = FeatureSet("other", 3, fs.features)
    with pytest.raises(WarehouseError, match="another lineage"):
        read_table(write(tmp_path / "v1", fs, layout, make_records(fs, [T0])).uri, other)


def test_featureset_of_refuses_a_folder_no_version_reads(fs: FeatureSet, tmp_path: Path) -> None:
    root = tmp_path / "wh"
    write(root, fs, TableLayout.REQUEST, make_records(fs, [T0]))
    wider = FeatureSet(fs.name, 2, (*fs.features[:-1], dataclasses.replace(fs.features[-1], size=7)))
    write(root, wider, TableLayout.REQUEST, make_records(wider, [T0 + 24 * HOUR_MS], seed=1))
    with pytest.raises(WarehouseError, match=f"features of another shape: \\['{fs.features[-1].name}'\\]"):
        featureset_of(str(root))
    with pytest.raises(WarehouseError, match="features of another shape"):
        read_table(str(root), wider)


def test_read_table_refuses_a_parquet_file_not_from_leanrec(fs: FeatureSet, tmp_path: Path) -> None:
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "part-0.parquet")
    with pytest.raises(WarehouseError, match="not a leanrec warehouse file"):
        read_table(str(tmp_path), fs)
    with pytest.raises(WarehouseError, match="not a leanrec warehouse file"):
        featureset_of(str(tmp_path))


# --------------------------------------------------------------------------- raw 64-bit ids
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ids_are_int64_columns_that_hold_raw_ids_near_both_ends_of_int64(
    fs: FeatureSet, tmp_path: Path, layout: TableLayout
) -> None:
    records = make_records(fs, [T0 + i for i in range(12)], seed=16)
    items = np.concatenate([r.item_ids for r in records])
    assert items.max() > 2**62 and items.min() < -(2**62)  # the data reaches beyond 32 bits both ways
    wh = write(tmp_path / "wh", fs, layout, records)
    table = wh.read()
    item_type = table.schema.field("items").type.value_type if layout is TableLayout.REQUEST else table.schema
    assert item_type.field("item_id").type == pa.int64()
    assert item_type.field("i_id").type == pa.int64()
    assert table.schema.field("user_id").type == pa.int64()
    assert table.schema.field("u_hist").type == pa.list_(pa.int64(), fs["u_hist"].size)
    rows = wh.read_examples()
    order = np.argsort([r.request_id for r in records], kind="stable")
    want = np.concatenate([records[i].item_ids for i in order])
    assert rows.column("item_id").to_numpy().tolist() == want.tolist()
    assert rows.column("user_id").to_numpy().tolist() == [
        records[i].user_id for i in order for _ in range(len(records[i]))
    ]
    src = f"read_parquet('{tmp_path / 'wh'}/**/*.parquet', hive_partitioning=true)"
    col = "it.item_id" if layout is TableLayout.REQUEST else "item_id"
    frm = f"(SELECT unnest(items) AS it FROM {src})" if layout is TableLayout.REQUEST else src
    got = duckdb.sql(f"SELECT min({col}), max({col}) FROM {frm}").fetchall()
    assert got == [(int(items.min()), int(items.max()))]  # exact in SQL too, no float on the way


def test_a_feature_of_other_rows_or_map_reads_and_one_of_string_ids_does_not(
    fs: FeatureSet, tmp_path: Path
) -> None:
    root = tmp_path / "wh"
    records = make_records(fs, [T0 + i for i in range(3)], seed=17)
    write(root, fs, TableLayout.REQUEST, records)
    u_id = fs["u_id"]
    remapped = FeatureSet(
        fs.name,
        2,
        tuple(dataclasses.replace(f, rows=7, map="hash") if f.name == "u_id" else f for f in fs.features),
    )
    table = read_table(str(root), remapped)  # a model's table of the ids, not the data's shape
    got = arrays_block(remapped.layout(Side.REQUEST), cols(table), table.num_rows)
    slot = remapped.layout(Side.REQUEST).slots[remapped.layout(Side.REQUEST).names.index("u_id")]
    want = np.concatenate([r.request.ints for r in sorted(records, key=lambda r: r.request_id)])
    old_slot = fs.layout(Side.REQUEST).slots[fs.layout(Side.REQUEST).names.index("u_id")]
    assert np.array_equal(got.ints[:, slot.offset : slot.stop], want[:, old_slot.offset : old_slot.stop])
    strings = FeatureSet(
        fs.name,
        2,
        tuple(dataclasses.replace(f, string_ids=True) if f.name == u_id.name else f for f in fs.features),
    )
    with pytest.raises(WarehouseError, match=r"features of another shape: \['u_id'\]"):
        read_table(str(root), strings)


# --------------------------------------------------------------------------- deduplicated layout
def repeated_records(fs: FeatureSet, n: int, seed: int = 0) -> list[RequestRecord]:
    """Records of 3 users and 6 items as traffic repeats them: each user's slow features and each
    item's features take one of two versions, across requests.

    Item 0's versions differ only in a 0.0 made -0.0, item 1's in a NaN's payload: distinct bytes,
    so distinct rows. The other request features and everything per item but features stay random.
    """
    rng = np.random.default_rng(seed)
    base = make_records(fs, [T0 + 10 * i for i in range(n)], seed)
    req, item = fs.layout(Side.REQUEST), fs.layout(Side.ITEM)
    slow = [s for s in req.slots if s.feature.rarely]
    assert slow, "the demo FeatureSet declares slow user features"
    users = raw_ids(rng, (3,))
    profiles = [
        FeatureBlock(
            rng.normal(size=(2, req.float_width)).astype(np.float32), raw_ids(rng, (2, req.int_width))
        )
        for _ in users
    ]
    item_ids = np.arange(100, 106, dtype=np.int64)
    versions = FeatureBlock(
        rng.normal(size=(12, item.float_width)).astype(np.float32), raw_ids(rng, (12, item.int_width))
    )
    versions.floats[0, 0], versions.floats[6, 0] = 0.0, -0.0
    versions.floats[1, 0] = np.nan
    versions.floats.view(np.uint32)[7, 0] = 0x7FC00001  # another NaN
    versions.floats[7, 1:], versions.ints[7] = versions.floats[1, 1:], versions.ints[1]
    versions.floats[6, 1:], versions.ints[6] = versions.floats[0, 1:], versions.ints[0]
    out = []
    for i, r in enumerate(base):
        u = i % 3
        request = r.request.copy()
        profile = profiles[u].take(slice(int(rng.integers(2)), None))
        for s in slow:
            src, dst = (
                (profile.floats, request.floats) if s.feature.is_float else (profile.ints, request.ints)
            )
            dst[0, s.offset : s.stop] = src[0, s.offset : s.stop]
        k = len(r)
        which = rng.integers(0, 6, k)
        rows = which + 6 * rng.integers(0, 2, k)
        out.append(
            dataclasses.replace(
                r, user_id=int(users[u]), request=request, item_ids=item_ids[which], items=versions.take(rows)
            )
        )
    return out


def distinct_rows(block: FeatureBlock) -> int:
    return len(np.unique(bits(block), axis=0))


def leaves(arr: pa.Array) -> list[object]:
    """Every value of an array as exact bits, nested structs and lists included (NaN equals its bits)."""
    if pa.types.is_struct(arr.type):
        return [x for child in arr.flatten() for x in leaves(child)]
    if pa.types.is_list(arr.type):
        return [pc.list_value_length(arr).to_pylist(), *leaves(arr.flatten())]
    if pa.types.is_fixed_size_list(arr.type):
        return leaves(arr.flatten())
    if pa.types.is_floating(arr.type):
        values = np.asarray(arr.to_numpy(zero_copy_only=False), np.float32)
        return [arr.is_null().to_pylist(), values.view(np.uint32).tolist()]
    return [arr.to_pylist()]


def same_table(a: pa.Table, b: pa.Table) -> bool:
    """Same schema (metadata too) and the same bits in every column (``Table.equals`` has NaN != NaN)."""
    return a.schema.equals(b.schema, check_metadata=True) and all(
        leaves(a.column(n).combine_chunks()) == leaves(b.column(n).combine_chunks()) for n in a.column_names
    )


def test_deduplicated_files_hold_each_distinct_row_once_and_read_back_the_same_examples(
    fs: FeatureSet, tmp_path: Path
) -> None:
    records = repeated_records(fs, 40)
    whs = {layout: write(tmp_path / layout.value, fs, layout, records) for layout in ALL_LAYOUTS}
    dedup = whs[TableLayout.DEDUP]
    examples = {layout: wh.read_examples() for layout, wh in whs.items()}
    assert examples[TableLayout.DEDUP].num_rows == sum(len(r) for r in records)
    for layout in LAYOUTS:  # every value, every type, every byte of every feature (-0.0 and NaN payloads)
        assert same_table(examples[TableLayout.DEDUP], examples[layout]), layout
    # read() gives the request-level rows, as request-level files hold them
    assert same_table(
        dedup.read().sort_by("request_id"), whs[TableLayout.REQUEST].read().sort_by("request_id")
    )
    # one file of rows and its four side tables, one per group of features
    (path,) = dedup.files
    sides = {t: pq.read_table(p) for t, p in side_paths(path).items()}
    rows = pq.read_table(path)
    groups = {t: set(names) for side in Side for t, names in dedup_groups(fs, side)}
    assert set(groups) == set(DedupTable)  # the demo FeatureSet has features in each
    items = FeatureBlock.concat([r.items for r in records])
    assert sides[DedupTable.ITEMS].num_rows == distinct_rows(items) == 12  # both -0.0 and both NaNs kept
    assert sides[DedupTable.ITEMS_SLOW].num_rows == 12  # the -0.0 and the NaN are slow features
    assert sides[DedupTable.SLOW].num_rows == 6  # 3 users, 2 versions each
    assert sides[DedupTable.USERS].num_rows == 40  # the per-request user features are random
    for table, names in groups.items():  # each group's features in its table alone
        assert names <= set(sides[table].column_names) and not names & set(rows.column_names)
    # a row holds its fastest group's key, which holds the slower one's
    assert "user_key" in rows.column_names and "slow_key" in sides[DedupTable.USERS].column_names
    item_fields = {f.name for f in rows.schema.field("items").type.value_type}
    assert not item_fields & set(fs.layout(Side.ITEM).names) and "item_key" in item_fields
    assert "item_slow_key" in sides[DedupTable.ITEMS].column_names
    for side in sides:  # what the file is, in its key-value metadata (there is no Arrow schema copy)
        meta = pq.read_metadata(side_paths(path)[side]).metadata
        assert meta == {LAYOUT_KEY: b"dedup", SIDE_KEY: side.value.encode()}


def test_dedup_tables_and_undedup_are_inverse_for_any_slice(fs: FeatureSet) -> None:
    table = records_table(fs, repeated_records(fs, 25, seed=2), TableLayout.REQUEST)
    rows, sides = dedup_tables(table, fs)
    assert rows.schema == schema(fs, TableLayout.DEDUP)
    request = table.column_names[:-1]
    item = [f.name for f in table.schema.field("items").type.value_type]
    whole = pa.Table.from_batches([undedup(rows, sides, request, item)]).cast(table.schema)
    assert same_table(whole, table)
    for start, length in ((3, 7), (24, 1), (0, 0)):
        part = pa.Table.from_batches([undedup(rows.slice(start, length), sides, request, item)])
        assert same_table(part.cast(table.schema), table.slice(start, length))
    # keys follow the rows' exact bytes: equal rows, equal keys; any other row, another key
    flat = pc.list_flatten(table.column("items").combine_chunks())
    same_row = np.unique(row_keys([flat.field(n) for n in fs.layout(Side.ITEM).names]), return_inverse=True)[
        1
    ]
    keys = pc.list_flatten(rows.column("items").combine_chunks()).field("item_key").to_numpy()
    assert len(set(zip(keys.tolist(), same_row.tolist(), strict=True))) == len(np.unique(keys)) == 12


def test_a_featureset_without_slow_features_writes_no_slow_table(fs: FeatureSet, tmp_path: Path) -> None:
    fast = FeatureSet(fs.name, fs.version, tuple(dataclasses.replace(f, changes="") for f in fs.features))
    records = repeated_records(fs, 12, seed=3)
    wh = write(tmp_path / "wh", fast, TableLayout.DEDUP, records)
    (path,) = wh.files
    assert {t: Path(p).exists() for t, p in side_paths(path).items()} == {
        DedupTable.USERS: True,
        DedupTable.SLOW: False,
        DedupTable.ITEMS: True,
        DedupTable.ITEMS_SLOW: False,
    }
    assert "slow_key" not in pq.read_schema(side_paths(path)[DedupTable.USERS]).names
    want = write(tmp_path / "req", fast, TableLayout.REQUEST, records).read_examples()
    assert same_table(wh.read_examples(), want)


def side_rows(path: str) -> dict[DedupTable, int]:
    """Rows of each side file a deduplicated request file has (0 where it has none)."""
    return {t: pq.read_metadata(p).num_rows if Path(p).exists() else 0 for t, p in side_paths(path).items()}


def test_side_tables_span_a_partition_each_distinct_row_stored_once_across_its_files(
    fs: FeatureSet, tmp_path: Path
) -> None:
    records = repeated_records(fs, 36, seed=6)  # one hour: one partition
    want = write(tmp_path / "req", fs, TableLayout.REQUEST, records).read_examples()
    wh = ParquetWarehouse(str(tmp_path / "wh"), fs, TableLayout.DEDUP)
    for part in (records[:18], records[18:]):
        wh.append(part)
        wh.flush()
    first, second = wh.files
    assert first.rsplit("/", 1)[0] == second.rsplit("/", 1)[0]
    once = side_rows(first)
    assert once[DedupTable.ITEMS] == 12 and once[DedupTable.SLOW] == 6  # every version already seen
    assert side_rows(second)[DedupTable.ITEMS] == side_rows(second)[DedupTable.SLOW] == 0
    assert side_rows(second)[DedupTable.USERS] == 18  # random per request: all new
    assert same_table(wh.read_examples(), want)
    # A writer started later reads the keys its partition holds and writes no known row again.
    again = ParquetWarehouse(str(tmp_path / "wh"), fs, TableLayout.DEDUP)
    again.append(records[:18])
    (third,) = again.flush()
    assert side_rows(third) == dict.fromkeys(DedupTable, 0)
    # Side files whose request file was never committed (a writer stopped between the renames)
    # hold nothing a reader or a writer counts on: their rows are written again.
    Path(first).unlink()
    Path(third).unlink()
    later = ParquetWarehouse(str(tmp_path / "wh"), fs, TableLayout.DEDUP)
    later.append(records[:18])
    (fourth,) = later.flush()
    assert side_rows(fourth) == once
    assert same_table(later.read_examples(), want)


def test_a_request_level_warehouse_copies_into_the_same_deduplicated_files(
    fs: FeatureSet, tmp_path: Path
) -> None:
    records = repeated_records(fs, 30, seed=4)
    times = [dataclasses.replace(r, ts_ms=r.ts_ms + (i % 2) * HOUR_MS) for i, r in enumerate(records)]
    src = write(tmp_path / "req", fs, TableLayout.REQUEST, times)
    written = dedup_copy(src.uri, str(tmp_path / "copy"), fs)
    direct = write(tmp_path / "direct", fs, TableLayout.DEDUP, times)
    copy = ParquetWarehouse(str(tmp_path / "copy"), fs, TableLayout.DEDUP)
    assert written == copy.bytes_stored() > 0
    assert len(list((tmp_path / "copy").rglob("part-*.parquet"))) == len(src.files) == 2  # file for file
    assert same_table(copy.read_examples(), direct.read_examples())
    assert same_table(copy.read_examples(), src.read_examples())
    with pytest.raises(WarehouseError, match="is not a request-level file"):
        dedup_copy(direct.uri, str(tmp_path / "again"), fs)


def test_a_missing_side_table_or_a_key_collision_is_refused_in_one_line(
    fs: FeatureSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wh = write(tmp_path / "wh", fs, TableLayout.DEDUP, repeated_records(fs, 6, seed=5))
    Path(side_paths(wh.files[0])[DedupTable.ITEMS]).unlink()
    with pytest.raises(
        WarehouseError, match=r"part-[0-9a-f]+\.parquet: no column \w+ in the file or its partition"
    ):
        wh.read()
    monkeypatch.setattr("leanrec.warehouse.tables.row_keys", lambda cols: np.zeros(len(cols[0]), np.uint64))
    with pytest.raises(WarehouseError, match="two different feature rows share a 64-bit key"):
        write(tmp_path / "clash", fs, TableLayout.DEDUP, repeated_records(fs, 6, seed=5))


def test_columns_get_a_dictionary_only_where_their_values_repeat() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=50).astype(np.float32)
    table = pa.table(
        {
            "distinct": rng.normal(size=1000).astype(np.float32),
            "scattered": values[rng.integers(0, 50, 1000)],  # joined impression rows
            "runs": np.repeat(values, 20),  # impression rows sorted by request: plain and zstd do better
            "vectors": pa.FixedSizeListArray.from_arrays(pa.array(np.tile(values[:4], 1000)), 4),
            "ids": rng.integers(0, 300, 1000),  # ids and labels repeat
            "times": np.arange(1000),  # times, keys and counters do not
            "labels": rng.random(1000) < 0.5,
        }
    )
    options = parquet_options(table)
    assert options["compression"] == "zstd"
    assert options["use_dictionary"] == ["scattered", "ids", "labels"]
