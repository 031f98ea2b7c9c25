"""The SQL that flattens request rows into impression rows: in DuckDB, the examples leanrec reads."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np
import pytest

from leanrec.schema import FeatureBlock, FeatureSet, Side
from leanrec.train.reader import iter_batches
from leanrec.warehouse import ParquetWarehouse, RequestRecord, TableLayout, schema
from leanrec.warehouse import sql as wsql
from leanrec.warehouse.sql import (
    COUNTED,
    DUCKDB_COUNTS,
    DUCKDB_IMPRESSIONS,
    duckdb_dedup_impressions,
    duckdb_dedup_views,
    duckdb_requests_view,
)
from leanrec.warehouse.store import dedup_copy
from leanrec.world import WorldConfig, default_featureset

ROOT = Path(__file__).resolve().parents[2]
HOUR_MS = 3_600_000
T0 = int(datetime(2026, 11, 2, 8, tzinfo=UTC).timestamp() * 1000)
LABELS = ("click", "like", "share", "hide", "watch_ms")


@pytest.fixture(scope="module")
def fs(small_config: WorldConfig) -> FeatureSet:
    return default_featureset(small_config)[0]


def records(fs: FeatureSet, n: int, seed: int) -> list[RequestRecord]:
    """``n`` requests over three hours, 1..9 viewed items each, random features, labels and scores.

    Every label is drawn on its own, so a query that reads one label's field for another fails; a
    fifth of the scores are NaN (stored as null) and every fifth request has none.
    """
    rng = np.random.default_rng(seed)
    req, item = fs.layout(Side.REQUEST), fs.layout(Side.ITEM)
    out = []
    for i in range(n):
        k = int(rng.integers(1, 10))
        ts = T0 + int(rng.integers(0, 3 * HOUR_MS))
        scores = np.where(rng.random(k) < 0.2, np.nan, rng.normal(size=k)).astype(np.float32)
        out.append(
            RequestRecord(
                f"q{seed}-{i:04d}",
                int(rng.integers(0, 2**62)),
                ts,
                fs.version,
                FeatureBlock(
                    rng.normal(size=(1, req.float_width)).astype(np.float32),
                    rng.integers(0, 1_000, (1, req.int_width)),
                ),
                np.sort(rng.choice(60, k, replace=False)).astype(np.int32),
                rng.integers(0, 2**62, k),
                ts + np.sort(rng.integers(100, 400_000, k)),
                FeatureBlock(
                    rng.normal(size=(k, item.float_width)).astype(np.float32),
                    rng.integers(0, 1_000, (k, item.int_width)),
                ),
                {
                    "click": rng.random(k) < 0.4,
                    "like": rng.random(k) < 0.2,
                    "share": rng.random(k) < 0.1,
                    "hide": rng.random(k) < 0.15,
                    "watch_ms": rng.integers(0, 60_000, k).astype(np.int32),
                },
                None if i % 5 == 4 else scores,
            )
        )
    return out


@pytest.fixture(scope="module")
def warehouse(fs: FeatureSet, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[RequestRecord]]:
    """A request-level warehouse of 60 requests in two flushes: several files over three hours."""
    root = tmp_path_factory.mktemp("wh") / "it's here"  # a quote in the path, as a user's may have
    wh = ParquetWarehouse(str(root), fs, TableLayout.REQUEST)
    recs = records(fs, 60, seed=5)
    for part in (recs[:25], recs[25:]):
        wh.append(part)
        wh.flush()
    assert len(wh.files) > 3
    return str(root), recs


def impressions(uri: str) -> dict[str, list]:
    """DuckDB's flattening of the warehouse, sorted by request id and position: column name → values."""
    with duckdb.connect() as con:
        con.execute(duckdb_requests_view(uri))
        con.execute(f"CREATE VIEW impressions AS {DUCKDB_IMPRESSIONS}")
        rel = con.sql("SELECT * FROM impressions ORDER BY request_id, position")
        return dict(zip(rel.columns, (list(c) for c in zip(*rel.fetchall(), strict=True)), strict=True))


def test_duckdb_flattens_request_rows_into_the_impression_rows_leanrec_reads(
    fs: FeatureSet, warehouse: tuple[str, list[RequestRecord]]
) -> None:
    uri, recs = warehouse
    got = impressions(uri)
    want = ParquetWarehouse(uri, fs, TableLayout.REQUEST).read_examples()
    names = schema(fs, TableLayout.IMPRESSION).names
    # Every column of the impression layout, then the partition columns the folders name.
    assert list(got) == [*names[: names.index("position")], "dt", "hour", *names[names.index("position") :]]
    assert len(got["request_id"]) == want.num_rows == sum(len(r) for r in recs)
    for name in names:  # row for row, every value (vector features as lists, null scores as null)
        assert got[name] == want.column(name).to_pylist(), name
    hours = {datetime.fromtimestamp(t // 1000, UTC).strftime("%H") for t in got["ts_ms"]}
    assert set(got["hour"]) == hours and len(hours) == 3


def test_duckdb_gives_the_examples_and_labels_of_the_training_reader(
    fs: FeatureSet, warehouse: tuple[str, list[RequestRecord]]
) -> None:
    uri, recs = warehouse
    got = impressions(uri)
    rows = list(zip(*(got[c] for c in ("request_id", "position", "click", "like")), strict=True))
    read = []
    for batch in iter_batches(uri, fs, layout=TableLayout.REQUEST, batch_requests=7):
        ids = [batch.request_ids[i] for i in batch.item_request.tolist()]
        read += zip(ids, batch.positions.tolist(), batch.click.tolist(), batch.like.tolist(), strict=True)
    assert rows == sorted((r, p, bool(c), bool(lk)) for r, p, c, lk in read)
    # And both are the records as joined: item ids and all five labels at their positions.
    want = sorted(
        (r.request_id, int(p), int(i), *(r.labels[name][j].item() for name in LABELS))
        for r in recs
        for j, (p, i) in enumerate(zip(r.positions, r.item_ids, strict=True))
    )
    cols = ("request_id", "position", "item_id", *LABELS)
    assert list(zip(*(got[c] for c in cols), strict=True)) == want


def test_duckdb_counts_the_examples_and_each_label(
    fs: FeatureSet, warehouse: tuple[str, list[RequestRecord]]
) -> None:
    uri, recs = warehouse
    with duckdb.connect() as con:
        con.execute(duckdb_requests_view(uri))
        con.execute(f"CREATE VIEW impressions AS {DUCKDB_IMPRESSIONS}")
        row = con.execute(DUCKDB_COUNTS).fetchone()
    want = {
        "requests": len(recs),
        "examples": sum(len(r) for r in recs),
        **{name: sum(int(r.labels[name].sum()) for r in recs) for name in LABELS},
    }
    assert dict(zip(COUNTED, row, strict=True)) == want
    assert all(want[name] > 0 for name in COUNTED)


def test_duckdb_reads_the_rows_of_a_deduplicated_warehouse_not_its_side_tables(
    fs: FeatureSet, warehouse: tuple[str, list[RequestRecord]], tmp_path: Path
) -> None:
    uri, recs = warehouse
    dedup_copy(uri, str(tmp_path / "dedup"), fs)
    assert list((tmp_path / "dedup").rglob("_part-*.items.parquet"))
    with duckdb.connect() as con:
        con.execute(duckdb_requests_view(str(tmp_path / "dedup")))
        con.execute(f"CREATE VIEW impressions AS {DUCKDB_IMPRESSIONS}")
        counts = dict(zip(COUNTED, con.execute(DUCKDB_COUNTS).fetchone(), strict=True))
    assert counts["requests"] == len(recs) and counts["examples"] == sum(len(r) for r in recs)
    assert counts["click"] == sum(int(r.labels["click"].sum()) for r in recs)


def test_duckdb_joins_a_deduplicated_warehouse_back_into_the_impression_rows_leanrec_reads(
    fs: FeatureSet, warehouse: tuple[str, list[RequestRecord]], tmp_path: Path
) -> None:
    uri, recs = warehouse
    dedup_copy(uri, str(tmp_path / "it's dedup"), fs)
    with duckdb.connect() as con:
        for statement in duckdb_dedup_views(str(tmp_path / "it's dedup"), fs):
            con.execute(statement)
        rel = con.sql(f"SELECT * FROM ({duckdb_dedup_impressions(fs)}) ORDER BY request_id, position")
        got = dict(zip(rel.columns, (list(c) for c in zip(*rel.fetchall(), strict=True)), strict=True))
    assert list(got) == list(impressions(uri))  # the request-level flattening's columns, in its order
    want = ParquetWarehouse(uri, fs, TableLayout.REQUEST).read_examples()
    assert len(got["request_id"]) == want.num_rows == sum(len(r) for r in recs)
    for name in schema(fs, TableLayout.IMPRESSION).names:  # row for row, every value
        assert got[name] == want.column(name).to_pylist(), name


def test_the_readme_quotes_the_queries_as_they_are_run() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in ("DUCKDB_IMPRESSIONS", "SPARK_IMPRESSIONS", "DUCKDB_COUNTS", "SPARK_COUNTS"):
        assert getattr(wsql, name) in readme, name


def test_leanrec_imports_neither_duckdb_nor_spark(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['duckdb'] = sys.modules['pyspark'] = None; "
        "import leanrec, leanrec.warehouse, leanrec.warehouse.sql, leanrec.train.reader, leanrec.cli; "
        "print(len(leanrec.warehouse.sql.DUCKDB_IMPRESSIONS))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 0
