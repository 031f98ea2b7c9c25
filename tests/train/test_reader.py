"""The streaming warehouse reader, on the two warehouses of a real (small) demo run."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from leanrec.schema import Feature, FeatureSet, Kind, Owner, Side
from leanrec.sim.demo import run_demo
from leanrec.train.reader import Batch, ReadStats, iter_batches, shard, warehouse_files
from leanrec.warehouse.store import ParquetWarehouse, WarehouseError, dedup_copy, read_table, side_paths
from leanrec.warehouse.tables import FEATURESET_KEY, DedupTable, TableLayout
from leanrec.world import World, WorldConfig, default_featureset

CONFIG = WorldConfig(n_users=400, n_items=3_000, n_creators=200, seed=3)


@dataclass
class Demo:
    fs: FeatureSet
    lean: str
    naive: str
    examples: int
    lean_split: str  # the same examples over 4 files of several row groups each
    naive_split: str
    dedup: str  # the lean warehouse's files, deduplicated


def _split_copy(src: str, dst: Path, parts: int, row_groups_per_part: int) -> str:
    """Rewrite a warehouse's examples over ``parts`` files of several row groups (metadata kept)."""
    table = pa.concat_tables([pq.ParquetFile(p).read() for p in warehouse_files(src)])
    bounds = np.linspace(0, table.num_rows, parts + 1).astype(int)
    for k in range(parts):
        part = table.slice(bounds[k], bounds[k + 1] - bounds[k])
        folder = dst / "dt=2026-11-02" / f"hour={k:02d}"
        folder.mkdir(parents=True)
        size = max(1, part.num_rows // row_groups_per_part)
        pq.write_table(part, folder / f"part-{k}.parquet", row_group_size=size, compression="zstd")
    return str(dst)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    out = tmp_path_factory.mktemp("demo")
    result = run_demo(requests=150, seed=3, out=out, world_config=CONFIG)
    lean, naive = str(out / "warehouse" / "lean"), str(out / "warehouse" / "naive")
    return Demo(
        fs=default_featureset(CONFIG)[0],
        lean=lean,
        naive=naive,
        examples=result.report["examples"]["lean"],
        lean_split=_split_copy(lean, out / "split" / "lean", 4, 3),
        naive_split=_split_copy(naive, out / "split" / "naive", 4, 3),
        dedup=_dedup(lean, str(out / "warehouse" / "dedup"), default_featureset(CONFIG)[0]),
    )


def _dedup(src: str, dst: str, fs: FeatureSet) -> str:
    dedup_copy(src, dst, fs)
    return dst


def examples(batches: list[Batch]) -> dict[str, np.ndarray]:
    """Every example of a stream with its request's features, sorted by (request id, position)."""
    out: dict[str, list[np.ndarray]] = {}
    for b in batches:
        rows = b.item_request.numpy()
        cols = {
            "request_id": np.asarray(b.request_ids, dtype=object)[rows],
            "position": b.positions.numpy(),
            "item_floats": b.item_floats.numpy().view(np.uint32),  # bit-exact comparisons
            "item_ints": b.item_ints.numpy(),
            "req_floats": b.req_floats[b.item_request].numpy().view(np.uint32),
            "req_ints": b.req_ints[b.item_request].numpy(),
            "click": b.click.numpy(),
            "like": b.like.numpy(),
        }
        for k, v in cols.items():
            out.setdefault(k, []).append(v)
    cat = {k: np.concatenate(v) for k, v in out.items()}
    order = np.lexsort((cat["position"], cat["request_id"].astype(str)))
    return {k: v[order] for k, v in cat.items()}


def keys(batches: list[Batch]) -> list[tuple[str, int]]:
    """(request id, position) of every example, in stream order."""
    return [
        (b.request_ids[r], p)
        for b in batches
        for r, p in zip(b.item_request.tolist(), b.positions.tolist(), strict=True)
    ]


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert np.array_equal(a[k], b[k]), k


# --------------------------------------------------------------------------- same examples


def test_both_layouts_yield_the_same_examples(demo: Demo) -> None:
    lean = list(iter_batches(demo.lean, demo.fs, batch_requests=32))
    naive = list(iter_batches(demo.naive, demo.fs, batch_impressions=300))
    a, b = examples(lean), examples(naive)
    assert_same(a, b)
    assert len(a["position"]) == demo.examples > 0
    assert sum(x.n_items for x in lean) == sum(x.n_items for x in naive) == demo.examples
    assert 0 < a["click"].sum() < demo.examples  # both labels present
    assert set(np.unique(a["click"])) <= {0.0, 1.0} and set(np.unique(a["like"])) <= {0.0, 1.0}
    assert (a["req_ints"] == -1).any()  # PAD_ID kept as is (short user histories)
    # Ids arrive raw, 64 bits whole: the world's own item and user ids, not rows.
    world = World(CONFIG)
    slots = {s.feature.name: s.offset for side in Side for s in demo.fs.layout(side).slots}
    items, users = a["item_ints"][:, slots["i_id"]], a["req_ints"][:, slots["u_id"]]
    assert np.isin(items, world.item_ids).all() and np.isin(users, world.user_ids).all()
    assert (np.abs(items) >= 2**40).any() and (items < 0).any()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"batch_requests": 32},
        {"batch_requests": 32, "shuffle_seed": 5},
        {"batch_requests": 16, "by_request": True},
        {"batch_requests": 32, "logged_scores": True},
    ],
)
def test_the_deduplicated_layout_yields_the_same_batches_as_request_level(demo: Demo, kw: dict) -> None:
    stats = {name: ReadStats() for name in ("lean", "dedup")}
    lean = list(iter_batches(demo.lean, demo.fs, stats=stats["lean"], **kw))
    dedup = list(iter_batches(demo.dedup, demo.fs, stats=stats["dedup"], **kw))
    assert keys(dedup) == keys(lean)  # the same examples in the same batches
    assert_same(examples(dedup), examples(lean))
    for a, b in zip(lean, dedup, strict=True):
        assert torch.equal(a.item_request, b.item_request) and a.request_ids == b.request_ids
        assert (a.scores is None) == (b.scores is None)
        if a.scores is not None:
            assert torch.equal(a.scores.view(torch.int32), b.scores.view(torch.int32))  # NaNs too
    assert stats["dedup"].files == stats["lean"].files == 1 and stats["dedup"].bytes_read > 0
    assert stats["dedup"].examples == stats["lean"].examples == demo.examples


def test_a_deduplicated_v1_warehouse_reads_under_v2(demo: Demo) -> None:
    v2 = demo.fs.retire(RETIRED)
    read = {fs.version: ReadStats() for fs in (demo.fs, v2)}
    v1_batches = list(iter_batches(demo.dedup, demo.fs, batch_requests=32, stats=read[1]))
    v2_batches = list(iter_batches(demo.dedup, v2, batch_requests=32, stats=read[2]))
    assert_same(examples(v2_batches), cut(examples(v1_batches), demo.fs, v2))
    assert_same(examples(v2_batches), examples(list(iter_batches(demo.lean, v2, batch_requests=32))))
    assert read[2].bytes_read < read[1].bytes_read  # retired columns, of rows and side tables, not read


def test_a_deduplicated_file_without_its_side_table_is_refused(demo: Demo, tmp_path: Path) -> None:
    copy = _dedup(demo.lean, str(tmp_path / "dedup"), demo.fs)
    (path,) = warehouse_files(copy)
    Path(side_paths(path)[DedupTable.SLOW]).unlink()
    with pytest.raises(
        WarehouseError, match=r"part-[0-9a-f]+\.parquet: no column \w+ in the file or its partition"
    ):
        list(iter_batches(copy, demo.fs))


def test_request_level_batches(demo: Demo) -> None:
    fs = demo.fs
    req, item = fs.layout(Side.REQUEST), fs.layout(Side.ITEM)
    batches = list(iter_batches(demo.lean, fs, batch_requests=32))
    assert [b.n_requests for b in batches] == [32, 32, 32, 32, 22]
    for b in batches:
        r, n = b.n_requests, b.n_items
        assert b.req_floats.shape == (r, req.float_width) and b.req_floats.dtype == torch.float32
        assert b.req_ints.shape == (r, req.int_width) and b.req_ints.dtype == torch.int64
        assert b.item_floats.shape == (n, item.float_width) and b.item_floats.dtype == torch.float32
        assert b.item_ints.shape == (n, item.int_width) and b.item_ints.dtype == torch.int64
        for t, dtype in ((b.item_request, torch.int64), (b.positions, torch.int64)):
            assert t.shape == (n,) and t.dtype == dtype
        for t in (b.click, b.like):
            assert t.shape == (n,) and t.dtype == torch.float32
        assert len(b.request_ids) == r == len(set(b.request_ids))
        assert n > r  # several items per request
        ir = b.item_request
        assert int(ir.min()) == 0 and int(ir.max()) == r - 1  # every request has items, all < R
        assert bool((ir[1:] >= ir[:-1]).all())  # items grouped by request
        first = torch.ones(n, dtype=torch.bool)
        first[1:] = ir[1:] != ir[:-1]
        assert bool((b.positions[first] == 0).all())  # each request's items start at position 0


def test_impression_level_batches(demo: Demo) -> None:
    batches = list(iter_batches(demo.naive, demo.fs, batch_impressions=300))
    sizes = [b.n_items for b in batches]
    assert sizes[:-1] == [300] * (len(sizes) - 1) and 0 < sizes[-1] <= 300
    for b in batches:
        assert b.n_requests == b.n_items == len(b.request_ids)
        assert torch.equal(b.item_request, torch.arange(b.n_items))
    # the layout is detected from the metadata; naming it gives the same stream
    named = list(iter_batches(demo.naive, demo.fs, TableLayout.IMPRESSION, batch_impressions=300))
    assert keys(named) == keys(batches)


def test_batches_run_across_row_groups_and_files(demo: Demo) -> None:
    files = warehouse_files(demo.lean_split)
    assert len(files) == 4 and files == sorted(files)
    assert all(pq.ParquetFile(f).num_row_groups >= 3 for f in files)
    lean = list(iter_batches(demo.lean_split, demo.fs, batch_requests=32))
    naive = list(iter_batches(demo.naive_split, demo.fs, batch_impressions=300))
    assert [b.n_requests for b in lean] == [32, 32, 32, 32, 22]
    assert [b.n_items for b in naive][:-1] == [300] * (len(naive) - 1)
    whole = examples(list(iter_batches(demo.lean, demo.fs)))
    assert_same(examples(lean), whole)
    assert_same(examples(naive), whole)
    assert keys(lean) == keys(list(iter_batches(demo.lean, demo.fs, batch_requests=32)))


# --------------------------------------------------------------------------- sharding and shuffling


@pytest.mark.parametrize("which", ["lean_split", "naive_split"])
def test_shards_hold_each_example_once(demo: Demo, which: str) -> None:
    uri = getattr(demo, which)
    files = warehouse_files(uri)
    per_rank = [shard(files, rank, 2) for rank in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == files and not set(per_rank[0]) & set(per_rank[1])
    assert shard(files[::-1], 1, 2) == per_rank[1]  # the same partition whatever the order given
    got = [keys(list(iter_batches(uri, demo.fs, files=f, batch_requests=16))) for f in per_rank]
    assert all(got)
    assert not set(got[0]) & set(got[1])
    assert len(got[0]) + len(got[1]) == demo.examples
    assert set(got[0]) | set(got[1]) == set(keys(list(iter_batches(uri, demo.fs))))
    assert list(iter_batches(uri, demo.fs, files=[])) == []  # a rank without files reads nothing


def test_shard_arguments() -> None:
    assert shard(["c", "a", "b"], 0, 1) == ["a", "b", "c"]
    assert shard(["a"], 1, 2) == []
    for rank, world in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError):
            shard(["a"], rank, world)


@pytest.mark.parametrize("which", ["lean_split", "naive_split"])
def test_shuffle_is_deterministic_and_keeps_every_example(demo: Demo, which: str) -> None:
    uri = getattr(demo, which)

    def run(seed: int | None) -> list[Batch]:
        return list(iter_batches(uri, demo.fs, batch_requests=32, batch_impressions=300, shuffle_seed=seed))

    plain, once, again, other = run(None), run(5), run(5), run(6)
    assert keys(once) == keys(again)
    assert keys(once) != keys(plain) and keys(other) != keys(once)
    assert_same(examples(once), examples(plain))
    for a, b in zip(once, again, strict=True):
        assert torch.equal(a.item_floats, b.item_floats) and torch.equal(a.req_ints, b.req_ints)
    if which == "lean_split":  # requests move as units: items still grouped, positions from 0
        for b in once:
            ir = b.item_request
            assert bool((ir[1:] >= ir[:-1]).all())
        assert [b.n_requests for b in once] == [32, 32, 32, 32, 22]


# --------------------------------------------------------------------------- bytes read


def test_bytes_read_counts_projected_column_chunks(demo: Demo) -> None:
    read: dict[str, ReadStats] = {}
    for name in ("lean", "naive"):
        uri = getattr(demo, name)
        stats = read[name] = ReadStats()
        batches = list(iter_batches(uri, demo.fs, stats=stats))
        assert stats.bytes_read > 0
        assert stats.examples == sum(b.n_items for b in batches) == demo.examples
        assert stats.batches == len(batches) and stats.files == 1 and stats.row_groups == 1
        everything = sum(
            md.row_group(g).column(c).total_compressed_size
            for md in (pq.ParquetFile(f).metadata for f in warehouse_files(uri))
            for g in range(md.num_row_groups)
            for c in range(md.num_columns)
        )
        assert stats.bytes_read < everything  # ids, times and other labels are not read
        assert stats.rows == (150 if name == "lean" else demo.examples)  # requests or impressions
        first = stats.bytes_read
        list(iter_batches(uri, demo.fs, stats=stats))
        assert stats.bytes_read == 2 * first  # a counter accumulates across passes
    assert read["lean"].bytes_read < read["naive"].bytes_read


def test_bytes_read_of_a_stream_cut_short(demo: Demo) -> None:
    stats = ReadStats()
    stream = iter_batches(demo.lean_split, demo.fs, batch_requests=8, stats=stats)
    next(stream)
    assert stats.files == 1 and stats.row_groups == 1  # only what was needed so far
    full = ReadStats()
    list(iter_batches(demo.lean_split, demo.fs, stats=full))
    assert 0 < stats.bytes_read < full.bytes_read and full.row_groups >= 12


# --------------------------------------------------------------------------- the ranker's scores


def logged(batches: list[Batch]) -> dict[tuple[str, int], float]:
    """(request id, position) -> the ranker's logged score, over a stream."""
    out = {}
    for b in batches:
        assert b.scores is not None and b.scores.dtype == torch.float32 and len(b.scores) == b.n_items
        for k, s in zip(keys([b]), b.scores.tolist(), strict=True):
            out[k] = s
    return out


def test_logged_scores_are_read_only_when_asked_and_are_no_model_input(demo: Demo) -> None:
    got = {}
    for name, kw in (("lean", {"batch_requests": 32}), ("naive", {"batch_impressions": 300})):
        uri = getattr(demo, name)
        plain, scored = ReadStats(), ReadStats()
        without = list(iter_batches(uri, demo.fs, stats=plain, **kw))
        with_ = list(iter_batches(uri, demo.fs, stats=scored, logged_scores=True, **kw))
        assert all(b.scores is None for b in without)  # training reads no score column
        assert_same(examples(without), examples(with_))  # the inputs and labels are the same
        assert scored.bytes_read > plain.bytes_read  # the score column is read only when asked
        got[name] = logged(with_)
    assert got["lean"] == got["naive"]  # both layouts hold the same scores
    rows = ParquetWarehouse(demo.lean, demo.fs).read_examples()
    columns = (rows[name].to_pylist() for name in ("request_id", "position", "score"))
    assert got["lean"] == {(r, p): s for r, p, s in zip(*columns, strict=True)}  # the warehouse's column
    assert all(np.isfinite(list(got["lean"].values())))
    ordered = list(iter_batches(demo.lean, demo.fs, batch_requests=16, by_request=True, logged_scores=True))
    assert logged(ordered) == got["lean"]


def _old_copy(src: str, dst: Path, layout: TableLayout) -> str:
    """A warehouse's files as written before scores were kept: no score column (metadata kept)."""
    for i, path in enumerate(warehouse_files(src)):
        table = pq.read_table(path)
        if layout is TableLayout.IMPRESSION:
            table = table.drop_columns(["score"])
        else:
            index = table.schema.get_field_index("items")
            fields = [f for f in table.schema.field(index).type.value_type if f.name != "score"]
            table = table.cast(table.schema.set(index, pa.field("items", pa.list_(pa.struct(fields)), False)))
        folder = dst / "dt=2026-11-01" / "hour=07"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, folder / f"part-old{i}.parquet")
    return str(dst)


@pytest.mark.parametrize("which", ["lean", "naive"])
def test_files_written_before_scores_were_kept_read_with_nan_scores(
    demo: Demo, tmp_path: Path, which: str
) -> None:
    layout = TableLayout.REQUEST if which == "lean" else TableLayout.IMPRESSION
    old = _old_copy(getattr(demo, which), tmp_path / "old", layout)
    batches = list(iter_batches(old, demo.fs, logged_scores=True))
    assert sum(b.n_items for b in batches) == demo.examples
    assert all(torch.isnan(b.scores).all() for b in batches if b.scores is not None)
    assert_same(examples(batches), examples(list(iter_batches(getattr(demo, which), demo.fs))))
    # Old and new files in one folder: one stream, NaN for the old rows, the scores for the new.
    mixed = _old_copy(getattr(demo, which), tmp_path / "mixed", layout)
    for path in warehouse_files(getattr(demo, which)):
        folder = tmp_path / "mixed" / "dt=2026-11-02" / "hour=08"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(pq.read_table(path), folder / Path(path).name)
    both = list(iter_batches(mixed, demo.fs, batch_requests=7, batch_impressions=50, logged_scores=True))
    scores = torch.cat([b.scores for b in both if b.scores is not None])
    assert len(scores) == 2 * demo.examples
    assert int(torch.isnan(scores).sum()) == demo.examples


# --------------------------------------------------------------------------- refusals


def test_a_missing_path_is_refused(demo: Demo, tmp_path: Path) -> None:
    with pytest.raises(WarehouseError, match="does not exist"):
        iter_batches(str(tmp_path / "nope"), demo.fs)
    with pytest.raises(WarehouseError, match="does not exist"):
        warehouse_files(str(tmp_path / "nope"))
    with pytest.raises(WarehouseError, match="does not exist"):
        list(iter_batches(demo.lean, demo.fs, files=[str(tmp_path / "gone.parquet")]))


def test_a_folder_without_parquet_files_is_refused(demo: Demo, tmp_path: Path) -> None:
    (tmp_path / "dt=2026-11-02").mkdir()
    (tmp_path / "dt=2026-11-02" / ".part-x.parquet.tmp").write_bytes(b"half a file")
    (tmp_path / "notes.txt").write_text("not data")
    with pytest.raises(WarehouseError, match="no Parquet files"):
        iter_batches(str(tmp_path), demo.fs)
    with pytest.raises(WarehouseError, match="no Parquet files"):
        warehouse_files(str(tmp_path))


def test_a_featureset_of_another_shape_is_refused(demo: Demo) -> None:
    fs = demo.fs
    last = fs.features[-1]
    reshaped = FeatureSet(fs.name, fs.version + 1, (*fs.features[:-1], dataclasses.replace(last, size=9)))
    for uri in (demo.lean, demo.naive):
        with pytest.raises(WarehouseError, match=re.escape(f"features of another shape: ['{last.name}']")):
            iter_batches(uri, reshaped)
    added = FeatureSet(fs.name, fs.version + 1, (*fs.features, Feature("u_new", Owner.USER, Kind.DENSE)))
    with pytest.raises(WarehouseError, match=re.escape("features not in the written FeatureSet: ['u_new']")):
        iter_batches(demo.lean, added)
    with pytest.raises(WarehouseError, match="another lineage"):
        iter_batches(demo.lean, FeatureSet("other", fs.version, fs.features))


# --------------------------------------------------------------------------- FeatureSet versions
RETIRED = {"u_noise_00": "noise", "u_emb_3": "stale", "u_hist_age": "no gain", "c_dow": "no gain"}
RETIRED |= {"i_noise_emb": "stale", "i_tags": "no gain", "i_creator": "memorises creators"}


def cut(ex: dict[str, np.ndarray], old: FeatureSet, new: FeatureSet) -> dict[str, np.ndarray]:
    """Examples of ``old``'s layout with the feature columns of ``new``'s layout."""
    out = dict(ex)
    for side, prefix in ((Side.REQUEST, "req"), (Side.ITEM, "item")):
        fcols, icols = new.columns_from(old, side)
        out[f"{prefix}_floats"], out[f"{prefix}_ints"] = (
            ex[f"{prefix}_floats"][:, fcols],
            ex[f"{prefix}_ints"][:, icols],
        )
    return out


@pytest.mark.parametrize("which", ["lean_split", "naive_split"])
def test_a_v1_warehouse_reads_under_v2_and_skips_the_retired_columns(demo: Demo, which: str) -> None:
    uri, v2 = getattr(demo, which), demo.fs.retire(RETIRED)
    read = {fs.version: ReadStats() for fs in (demo.fs, v2)}
    v1_batches = list(iter_batches(uri, demo.fs, batch_requests=32, batch_impressions=300, stats=read[1]))
    v2_batches = list(iter_batches(uri, v2, batch_requests=32, batch_impressions=300, stats=read[2]))
    assert keys(v2_batches) == keys(v1_batches)
    req, item = v2.layout(Side.REQUEST), v2.layout(Side.ITEM)
    assert req.float_width < demo.fs.layout(Side.REQUEST).float_width
    assert item.int_width < demo.fs.layout(Side.ITEM).int_width
    for b in v2_batches:
        assert b.req_floats.shape[1] == req.float_width and b.item_ints.shape[1] == item.int_width
    assert_same(examples(v2_batches), cut(examples(v1_batches), demo.fs, v2))
    # the retired columns are not read: fewer bytes, from the same files, row groups and rows
    assert read[2].bytes_read < read[1].bytes_read
    for counter in ("files", "row_groups", "rows", "examples"):
        assert getattr(read[2], counter) == getattr(read[1], counter), counter


def test_a_folder_of_v1_and_v2_files_reads_under_v2(demo: Demo, tmp_path: Path) -> None:
    v2 = demo.fs.retire(RETIRED)
    files = warehouse_files(demo.lean_split)
    root = tmp_path / "mixed"
    for k, path in enumerate(files):  # the first two days as logged under v1, the others under v2
        folder = root / f"dt=2026-11-0{k + 2}" / "hour=08"
        folder.mkdir(parents=True)
        table = pq.read_table(path)
        if k >= 2:  # what a v2 pipeline writes: v2's columns and metadata
            table = read_table(str(Path(path).parent), v2)
        pq.write_table(table, folder / "part-0.parquet", row_group_size=40)
    versions = [
        FeatureSet.from_json(pq.read_schema(f).metadata[FEATURESET_KEY].decode()).version
        for f in warehouse_files(str(root))
    ]
    assert versions == [1, 1, 2, 2]
    mixed = list(iter_batches(str(root), v2, batch_requests=32))
    assert [b.n_requests for b in mixed] == [32, 32, 32, 32, 22]  # batches run across v1 and v2 files
    want = cut(examples(list(iter_batches(demo.lean, demo.fs))), demo.fs, v2)
    assert_same(examples(mixed), want)
    assert_same(examples(list(iter_batches(str(root), v2, by_request=True, batch_requests=16))), want)
    # v1 cannot read the v2 files among them
    with pytest.raises(
        WarehouseError, match=r"written under FeatureSet demo v2 .* newer version \(v2 > v1\)"
    ):
        list(iter_batches(str(root), demo.fs))


def test_a_v2_warehouse_is_refused_under_v1(demo: Demo, tmp_path: Path) -> None:
    v2 = demo.fs.retire(RETIRED)
    (tmp_path / "dt=2026-11-02").mkdir()
    pq.write_table(read_table(demo.lean, v2), tmp_path / "dt=2026-11-02" / "part-0.parquet")
    assert len(list(iter_batches(str(tmp_path), v2))) == 1
    with pytest.raises(WarehouseError) as err:
        iter_batches(str(tmp_path), demo.fs)
    msg = str(err.value)
    assert "was written under FeatureSet demo v2" in msg and "not demo v1" in msg
    assert "newer version (v2 > v1)" in msg and "features not in the written FeatureSet: ['u_noise_00'" in msg


def test_a_layout_other_than_expected_is_refused(demo: Demo) -> None:
    with pytest.raises(WarehouseError, match="request-level, expected impression-level"):
        iter_batches(demo.lean, demo.fs, TableLayout.IMPRESSION)
    mixed = [*warehouse_files(demo.lean), *warehouse_files(demo.naive)]
    with pytest.raises(WarehouseError, match="impression-level; the files before it are request-level"):
        list(iter_batches(demo.lean, demo.fs, files=mixed))


def test_a_parquet_file_not_from_leanrec_is_refused(demo: Demo, tmp_path: Path) -> None:
    pq.write_table(pa.table({"x": [1, 2, 3]}), tmp_path / "part-0.parquet")
    with pytest.raises(WarehouseError, match="not a leanrec warehouse file"):
        iter_batches(str(tmp_path), demo.fs)
    (tmp_path / "part-0.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(WarehouseError, match="not a readable Parquet file"):
        iter_batches(str(tmp_path), demo.fs)
