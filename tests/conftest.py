"""Shared fixtures: a small seeded world, so tests run in seconds, and a user's own FeatureSet."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import redis

from leanrec.schema import FeatureBlock, FeatureSet, Kind, Layout, Side
from leanrec.stores.local_cluster import ClusterStartError, LocalRedisCluster
from leanrec.stores.redis_common import connect
from leanrec.train.metrics import auc
from leanrec.warehouse import ParquetWarehouse, RequestRecord, TableLayout
from leanrec.world import World, WorldConfig


@pytest.fixture(autouse=True)
def _token_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test serves with a key of its own, as a deployment must (the built-in one is refused).

    A test of that refusal removes it; subprocesses started by a test inherit it.
    """
    monkeypatch.setenv("LEANREC_SECRET", "leanrec-test-suite-key-0123456789")


@pytest.fixture(scope="session")
def small_config() -> WorldConfig:
    return WorldConfig(n_users=400, n_items=3_000, n_creators=200, seed=11)


@pytest.fixture
def small_world(small_config: WorldConfig) -> World:
    """A fresh small world per test (worlds mutate as traffic flows)."""
    return World(small_config)


# A shop's FeatureSet: no name in common with the synthetic world's, so code that looks features up
# by name instead of by role fails on it. (name, owner, kind, size, vocab, extra keys)
SHOP_FEATURES: tuple[tuple[str, str, str, int, int, dict[str, str]], ...] = (
    ("buyer", "user", "sparse", 1, 60, {"role": "user_id"}),
    ("recent", "user", "sequence", 6, 120, {"role": "history"}),
    ("recent_aisle", "user", "sequence", 6, 8, {}),
    ("taste", "user", "dense", 4, 0, {"space": "style"}),
    ("budget", "user", "dense", 1, 0, {}),
    ("weekday", "context", "sparse", 1, 7, {}),
    ("product", "item", "sparse", 1, 120, {"role": "item_id"}),
    ("aisle", "item", "sparse", 1, 8, {}),
    ("look", "item", "dense", 4, 0, {"space": "style"}),
    ("price", "item", "dense", 1, 0, {}),
    ("badges", "item", "multi_hot", 3, 30, {}),
)
T0_MS = 1_793_606_400_000  # 2026-11-02 08:00 UTC


class Shop:
    """TOML texts of a shop's FeatureSet, and warehouses of any FeatureSet with planted clicks.

    The planted model (on the features of these names that the written FeatureSet has): a click's
    logit is ``-1.2 + 0.7 taste·look - 0.8 price + 0.5 budget + 2 [product in recent]``; a like is a
    click kept with probability 0.4. A product is one of the user's recent ones a third of the time.
    Every other feature is random and drew nothing.
    """

    def toml(self, drop: Sequence[str] = (), name: str = "shop", version: int = 1) -> str:
        """The FeatureSet file of the shop's features but ``drop``."""
        lines = [f'name = "{name}"', f"version = {version}"]
        for fname, owner, kind, size, vocab, extra in SHOP_FEATURES:
            if fname in drop:
                continue
            lines += ["", "[[features]]", f'name = "{fname}"', f'owner = "{owner}"', f'kind = "{kind}"']
            lines += [f"size = {size}"] * (size != 1) + [f"rows = {vocab}"] * (vocab != 0)
            lines += [f'{k} = "{v}"' for k, v in extra.items()]
        return "\n".join(lines) + "\n"

    def write(
        self,
        root: Path,
        fs: FeatureSet,
        requests: int = 600,
        seed: int = 0,
        layout: TableLayout = TableLayout.REQUEST,
    ) -> float:
        """Write ``requests`` random requests of ``fs`` to a warehouse at ``root``.

        Returns:
            The AUC of the planted logits for the clicks drawn: what a perfect model would reach.

        """
        rng = np.random.default_rng(seed)
        names = {f.name for f in fs.features}
        counts = rng.integers(2, 11, requests)
        n = int(counts.sum())
        request_of = np.repeat(np.arange(requests), counts)
        length = rng.integers(1, 7, requests)
        recent = np.stack([rng.choice(120, 6, replace=False) for _ in range(requests)])
        recent = np.where(np.arange(6) < length[:, None], recent, -1)
        product = rng.integers(0, 120, n)
        pick = rng.integers(0, length[request_of])
        from_recent = ("recent" in names) & (rng.random(n) < 1 / 3)
        product = np.where(from_recent, recent[request_of, pick], product)
        taste, look = rng.normal(size=(requests, 4)), rng.normal(size=(n, 4))
        budget, price = rng.normal(size=(requests, 1)), rng.normal(size=(n, 1))
        known = {
            "recent": recent,
            "recent_aisle": np.where(recent >= 0, recent % 8, -1),
            "taste": taste,
            "budget": budget,
            "product": product,
            "aisle": product % 8,
            "look": look,
            "price": price,
        }
        logit = np.full(n, -1.2)
        if {"taste", "look"} <= names:
            logit += 0.7 * (taste[request_of] * look).sum(1)
        if "price" in names:
            logit -= 0.8 * price[:, 0]
        if "budget" in names:
            logit += 0.5 * budget[request_of, 0]
        if {"recent", "product"} <= names:
            logit += 2.0 * (recent[request_of] == product[:, None]).any(1)
        click = rng.random(n) < 1 / (1 + np.exp(-logit))
        like = click & (rng.random(n) < 0.4)
        req = _block(fs.layout(Side.REQUEST), requests, known, rng)
        item = _block(fs.layout(Side.ITEM), n, known, rng)
        starts = np.r_[0, np.cumsum(counts)]
        records = []
        for r in range(requests):
            rows = slice(starts[r], starts[r + 1])
            k = int(counts[r])
            ts = T0_MS + r * 10_000
            records.append(
                RequestRecord(
                    f"s{seed}-{r:05d}",
                    int(rng.integers(0, 60)),
                    ts,
                    fs.version,
                    req.take(slice(r, r + 1)),
                    np.sort(rng.choice(100, k, replace=False)).astype(np.int32),
                    product[rows].astype(np.int32),
                    ts + np.arange(1, k + 1, dtype=np.int64) * 1_000,
                    item.take(rows),
                    {
                        "click": click[rows],
                        "like": like[rows],
                        "share": np.zeros(k, bool),
                        "hide": np.zeros(k, bool),
                        "watch_ms": rng.integers(0, 30_000, k).astype(np.int32),
                    },
                )
            )
        wh = ParquetWarehouse(str(root), fs, layout)
        wh.append(records)
        wh.flush()
        return auc(click.astype(np.float64), logit)


def _block(layout: Layout, n: int, known: dict[str, np.ndarray], rng: np.random.Generator) -> FeatureBlock:
    """``n`` rows of a layout: the planted values where a feature has them, random values elsewhere."""
    block = layout.zeros(n)
    for s in layout.slots:
        f = s.feature
        if f.name in known:
            values = known[f.name]
        elif f.is_float:
            values = rng.normal(size=(n, f.size))
        else:
            values = rng.integers(0, f.rows, (n, f.size))
            if f.kind in (Kind.MULTI_HOT, Kind.SEQUENCE):  # padded after a random length
                values = np.where(np.arange(f.size) < rng.integers(1, f.size + 1, (n, 1)), values, -1)
        dst = block.floats if f.is_float else block.ints
        dst[:, s.offset : s.stop] = np.asarray(values).reshape(n, f.size)
    return block


@pytest.fixture(scope="session")
def shop() -> Shop:
    """A shop's FeatureSet files and warehouses (see :class:`Shop`)."""
    return Shop()


def _started_cluster(folder: Path) -> LocalRedisCluster:
    """A local Redis Cluster (3 masters with a replica each), running.

    Skips where redis-server is missing; fails instead when the environment variable CI is set.
    """
    try:
        return LocalRedisCluster(folder).start()
    except ClusterStartError as err:
        if os.environ.get("CI"):
            pytest.fail(f"a Redis Cluster is required for the cluster tests: {err}")
        pytest.skip(f"a Redis Cluster is required for the cluster tests: {err}")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    """The session's local Redis Cluster, started once (see :func:`_started_cluster`)."""
    cluster = _started_cluster(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[LocalRedisCluster]:
    """A cluster of this test's own, for a test that kills one of its nodes."""
    cluster = _started_cluster(tmp_path / "cluster")
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster: LocalRedisCluster) -> str:
    """URL of the session's cluster, emptied for this test."""
    client = connect(redis_cluster.url)
    try:
        client.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
    finally:
        client.close()
    return redis_cluster.url
