"""SQL that flattens a request-level warehouse into impression rows, in DuckDB and in Spark SQL.

A request-level row holds the request side once and its viewed items as a list of structs
(``items``: position, item id, first-view time, the ranker's score, item features, labels). Data teams
read a warehouse with a query engine rather than with leanrec's reader; these queries turn each
request row into one row per viewed item, the request's columns beside each: the impression layout's
columns (and the engine's Hive partition columns ``dt`` and ``hour``), one row per example that
leanrec's reader yields. The counting queries count those examples and their labels.

Each query reads a table or view named ``requests`` over the warehouse's Parquet files, which the
engine registers first:

- DuckDB: the statement :func:`duckdb_requests_view` returns;
- Spark: ``spark.read.parquet(warehouse).createOrReplaceTempView("requests")``.

A deduplicated warehouse's request rows hold keys into its side tables: :func:`duckdb_dedup_views`
registers them too, and :func:`duckdb_dedup_impressions` joins them back into the same impression
rows, built from the FeatureSet, which says what the side tables are.

The counting queries read the flattened rows as a view named ``impressions`` (DuckDB:
``CREATE VIEW impressions AS`` and the query; Spark: ``CREATE OR REPLACE TEMPORARY VIEW impressions
AS`` and the query). The queries are plain strings, so leanrec imports neither engine;
``benchmarks/warehouse_engines.py`` runs them in both and the README quotes them.
"""

from __future__ import annotations

from leanrec.schema import FeatureSet, Side
from leanrec.warehouse.tables import KEY_FIELDS, TableLayout, dedup_groups, dedup_item_struct, schema

DUCKDB_IMPRESSIONS = """\
SELECT r.* EXCLUDE (items), item.*
FROM requests AS r, UNNEST(r.items) AS u(item)"""
"""DuckDB: one row per viewed item, the request's columns and then the item's fields.

The lateral ``UNNEST`` gives each element of ``items`` as a struct, and ``item.*`` spreads its
fields into columns; vector features stay lists.
"""

SPARK_IMPRESSIONS = """\
SELECT * EXCEPT (items), inline(items)
FROM requests"""
"""Spark SQL (3.5 has no ``* EXCEPT``, hence Spark 4): one row per viewed item, as in DuckDB.

``inline`` explodes an array of structs into one row per element and one column per field, so the
items need no ``arrays_zip``: they are structs already, not parallel arrays.
"""

DUCKDB_COUNTS = """\
SELECT count(DISTINCT request_id) AS requests, count(*) AS examples,
       count_if(click) AS click, count_if("like") AS "like", count_if(share) AS share,
       count_if(hide) AS hide, sum(watch_ms) AS watch_ms
FROM impressions"""
"""DuckDB: requests, examples, and each label's count (``watch_ms`` summed) over ``impressions``."""

SPARK_COUNTS = """\
SELECT count(DISTINCT request_id) AS requests, count(*) AS examples,
       count_if(click) AS click, count_if(`like`) AS `like`, count_if(share) AS share,
       count_if(hide) AS hide, sum(watch_ms) AS watch_ms
FROM impressions"""
"""Spark SQL: the same counts as :data:`DUCKDB_COUNTS` (``like`` is quoted as Spark quotes names)."""

COUNTED = ("requests", "examples", "click", "like", "share", "hide", "watch_ms")
"""The columns of the counting queries, in order."""


def duckdb_requests_view(warehouse: str) -> str:
    """The DuckDB statement that registers a warehouse's Parquet files as the view ``requests``.

    Hive partitioning gives the ``dt`` and ``hour`` columns the folders name, as Spark does. Only
    the request files are read: a deduplicated warehouse's side tables (``_part-…``) are not rows.
    """
    path = str(warehouse).rstrip("/").replace("'", "''")  # a quote in the path, doubled as SQL wants
    files = f"{path}/**/part-*.parquet"
    return f"CREATE VIEW requests AS SELECT * FROM read_parquet('{files}', hive_partitioning = true)"


def duckdb_dedup_views(warehouse: str, fs: FeatureSet) -> list[str]:
    """The DuckDB statements that register a deduplicated warehouse: ``requests`` and its side tables.

    ``requests`` is :func:`duckdb_requests_view`'s; each side table of ``fs``'s groups is a view of
    the same name (``users``, ``slow``, ``items``, ``items_slow``) over the side files of every
    partition, each key once: a row stored in several partitions has the same bytes in each.
    """
    path = str(warehouse).rstrip("/").replace("'", "''")
    views = [duckdb_requests_view(warehouse)]
    for side in Side:
        for table, _ in dedup_groups(fs, side):
            files = f"{path}/**/_part-*.{table.value}.parquet"
            views.append(
                f"CREATE VIEW {table.value} AS SELECT DISTINCT ON ({KEY_FIELDS[table].name}) * "
                f"FROM read_parquet('{files}', union_by_name = true)"
            )
    return views


def duckdb_dedup_impressions(fs: FeatureSet) -> str:
    """DuckDB: a deduplicated warehouse flattened into the rows :data:`DUCKDB_IMPRESSIONS` gives.

    Each viewed item is joined with its side table rows through the keys it and its request row
    hold (a faster group's row holds the slower one's key), and the columns are those of the
    impression layout, in its order, with the partition columns ``dt`` and ``hour`` before the
    item's. It reads the views :func:`duckdb_dedup_views` registers; the FeatureSet says which
    side tables there are, and which holds each column.
    """
    source = {f.name: "r" for f in schema(fs, TableLayout.DEDUP)} | {"dt": "r", "hour": "r"}
    source |= {f.name: "item" for f in dedup_item_struct(fs)}
    joins = []
    for side, base in ((Side.REQUEST, "r"), (Side.ITEM, "item")):
        for table, names in dedup_groups(fs, side):
            key = KEY_FIELDS[table].name
            joins.append(f"JOIN {table.value} ON {table.value}.{key} = {base}.{key}")
            source |= dict.fromkeys(names, table.value)
            base = table.value
    names = schema(fs, TableLayout.IMPRESSION).names
    at = names.index("position")
    columns = [*names[:at], "dt", "hour", *names[at:]]
    select = ",\n       ".join(f'{source[n]}."{n}"' for n in columns)
    return f"SELECT {select}\nFROM requests AS r, UNNEST(r.items) AS u(item)\n" + "\n".join(joins)
