"""What only a Redis Cluster has: a sharded bus spread over the masters, a request on one shard, and
failover: a master killed while a ranking service logs, its replica promoted, and nothing lost.

The contract suites run every protocol test on the session's cluster too; these are the cluster's own.
A test that kills a node starts a cluster of its own. They fail rather than skip under CI.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import redis
from redis.crc import key_slot

import leanrec
from leanrec.clock import ManualClock
from leanrec.events import RequestOpened, open_event_bus
from leanrec.events.redis_bus import RedisEventBus
from leanrec.featurefile import parse_featureset
from leanrec.featurelog.loggers import key
from leanrec.ids import scrambled_ids
from leanrec.serve.service import LoggingUnavailable
from leanrec.stores import open_transient_store
from leanrec.stores.local_cluster import LocalRedisCluster
from leanrec.warehouse.store import ParquetWarehouse
from leanrec.warehouse.tables import TableLayout

from ..serve.conftest import SHOP_FEATURESET, _shop_features

T0 = 1_700_000_000_000


def _masters(url: str) -> dict[str, redis.Redis]:
    """A plain client of each master of the cluster at ``url``, by node name."""
    cluster = redis.RedisCluster.from_url(url.replace("redis+cluster://", "redis://").split(",")[0])
    try:
        return {n.name: redis.Redis(host=n.host, port=n.port) for n in cluster.get_primaries()}
    finally:
        cluster.close()


def _opened(n: int, start: int = 0) -> list[RequestOpened]:
    return [
        RequestOpened(f"req-{i}", user_id=i, ts_ms=T0 + i, n_items=40, fs_version=1) for i in range(start, n)
    ]


def test_the_sharded_bus_spreads_requests_over_every_master(cluster_url: str) -> None:
    bus = open_event_bus(cluster_url)
    assert isinstance(bus, RedisEventBus) and bus.shards == 16
    ids = bus.append_many(_opened(600))
    client = bus.client
    per_master: dict[str, int] = {}
    for stream in bus.streams:
        node = client.get_node_from_key(stream).name
        per_master[node] = per_master.get(node, 0) + int(client.xlen(stream))
    assert sum(per_master.values()) == 600
    assert len(per_master) == 3 and all(0 < n < 400 for n in per_master.values()), per_master
    # every record of a request goes on the one stream its id names
    again = bus.append_many(_opened(5))
    assert [i.partition("/")[0] for i in again] == [i.partition("/")[0] for i in ids[:5]]
    bus.close()


def test_two_workers_split_every_stream_and_a_dead_ones_records_are_taken_over(cluster_url: str) -> None:
    a = open_event_bus(cluster_url, consumer="a", claim_idle_ms=0)
    b = open_event_bus(cluster_url, consumer="b", claim_idle_ms=0)
    a.append_many(_opened(300))
    got_a, got_b = a.consume(150), b.consume(1_000)
    assert len(got_a) == 150 and len(got_b) == 150
    assert {m.request_id for _, m in got_a}.isdisjoint({m.request_id for _, m in got_b})
    assert len({mid.partition("/")[0] for mid, _ in got_b}) > 8  # b read from most of the 16 streams
    assert a.pending() == 300 and a.pending_mine() == 150
    taken = b.claim_pending()  # a died: b takes over what a held (and gets back its own)
    assert {mid for mid, _ in taken} == {mid for mid, _ in got_a + got_b}
    assert b.ack([mid for mid, _ in taken]) == 300 and a.pending() == 0
    a.close()
    b.close()


def test_a_requests_entries_share_one_shard(cluster_url: str) -> None:
    rid = "9f2c4e1ab7d03355"
    keys = [key(rid, s) for s in ("u", "p0", "p3", "ev", "seen")]
    assert len({key_slot(k.encode()) for k in keys}) == 1
    store = open_transient_store(cluster_url)
    store.put_many({k: b"x" for k in keys[:3]}, 60_000)
    holders = [name for name, m in _masters(cluster_url).items() if m.dbsize()]
    assert len(holders) == 1
    store.close()  # type: ignore[attr-defined]


def test_shared_rows_live_on_the_shards_of_their_hashes_and_join_one_request_at_a_time(
    cluster_url: str, tmp_path: Path
) -> None:
    """The library's entry point, one request per call as a sidecar logs, with content-addressed rows."""
    clock = ManualClock(T0)
    log = leanrec.open_logging(
        parse_featureset(SHOP_FEATURESET),
        cluster_url,
        cluster_url,
        clock=clock,
        secret="cluster-test-secret",
        lateness_ms=5_000,
        window_ms=60_000,
        shared_rows=True,
    )
    joiner = log.joiner(tmp_path / "wh")
    rng = np.random.default_rng(8)
    items = scrambled_ids(5_000, 3)[:30]
    feats = _shop_features(rng, items)  # the same items with the same features in every request
    viewed = {}
    for i in range(12):
        logged = log.ranked(i % 4, items, feats)
        depth = 3 + i
        events = [
            {"position": p, "item_id": int(items[p]), "kind": "view", "ts_ms": clock.now_ms()}
            for p in range(depth)
        ]
        assert log.events(logged.request_id, logged.token, events, batch_id=f"b{i}").accepted == depth
        viewed[logged.request_id] = depth
        clock.advance(10)
    stats = log.parts.logger.stats  # type: ignore[union-attr]
    assert stats.write_failures == 0 and stats.rows_reused > 0
    assert stats.rows_written == (stats.logged_by_position > 0).sum()  # each logged item's row sent once
    row_holders = [
        name
        for name, m in _masters(cluster_url).items()
        if any(m.scan_iter(match="lr:{r[0-9a-f]*}", count=1000))
    ]
    assert len(row_holders) >= 2  # rows spread over the shards by their hashes
    clock.advance(60_000 + 5_000 + 10_000)
    assert joiner.poll() == len(viewed)
    assert joiner.join_due() == len(viewed)
    joiner.flush()
    assert joiner.stats.labels_lost == 0
    rows = ParquetWarehouse(str(tmp_path / "wh"), log.featureset, TableLayout.REQUEST).read_examples()
    rids, counts = np.unique(rows.column("request_id").to_numpy(zero_copy_only=False), return_counts=True)
    assert dict(zip(rids.tolist(), counts.tolist(), strict=True)) == viewed
    np.testing.assert_array_equal(
        np.stack(rows.column("look").to_numpy(zero_copy_only=False))[: viewed[rids[0]]],
        feats["look"][: viewed[rids[0]]],
    )


# --------------------------------------------------------------------------------------- failover
def test_a_master_killed_while_logging_loses_nothing_a_client_sends_again(
    own_cluster: LocalRedisCluster, tmp_path: Path
) -> None:
    """Rank, page and report events before, during and after a master's failover.

    Ranking never fails; logging that fails meanwhile is counted; an event batch answered
    unavailable is sent again, as a client does, until it lands; the records the bus refused go again
    with the logger's next tick. Every viewed item ends in the warehouse.
    """
    url = own_cluster.url
    clock = ManualClock(T0)
    log = leanrec.open_logging(
        parse_featureset(SHOP_FEATURESET),
        url,
        url,
        clock=clock,
        secret="cluster-test-secret",
        lateness_ms=5_000,
        window_ms=60_000,
    )
    joiner = log.joiner(tmp_path / "wh")
    rng = np.random.default_rng(5)
    catalog = scrambled_ids(5_000, 3)
    viewed: dict[str, int] = {}
    resent = 0

    def session(i: int) -> None:
        nonlocal resent
        items = catalog[rng.choice(5_000, size=30, replace=False)]
        logged = log.ranked(i, items, _shop_features(rng, items))  # never raises: failures are counted
        depth = int(rng.integers(1, 20))
        events = [
            {"position": p, "item_id": int(items[p]), "kind": "view", "ts_ms": clock.now_ms()}
            for p in range(depth)
        ]
        deadline = time.monotonic() + 30
        while True:
            try:
                result = log.events(logged.request_id, logged.token, events, batch_id=f"b{i}")
                break
            except LoggingUnavailable:  # answered 503: send the same batch again
                assert time.monotonic() < deadline, "the cluster never took the batch"
                resent += 1
                time.sleep(0.1)
        assert result.accepted == depth, result
        viewed[logged.request_id] = depth
        clock.advance(10)

    for i in range(40):
        session(i)
    time.sleep(0.3)  # replication is asynchronous: let the replicas have what was acknowledged
    own_cluster.kill_master()
    down_until = time.monotonic() + 1.0
    i = 40
    while time.monotonic() < down_until:  # the master is down, its replica not yet promoted
        session(i)
        i += 1
    own_cluster.wait_ready()
    for j in range(i, i + 40):
        session(j)
    stats = log.parts.logger.stats  # type: ignore[union-attr]
    assert stats.write_failures + stats.bus_failures > 0  # the kill was felt, and counted
    deadline = time.monotonic() + 10
    while stats.bus_resent < stats.bus_failures:  # records the bus refused go again at each tick
        assert time.monotonic() < deadline, "a record the bus refused was never sent again"
        log.parts.logger.tick()  # type: ignore[union-attr]
        time.sleep(0.2)
    assert stats.bus_resent == stats.bus_failures
    clock.advance(60_000 + 5_000 + 10_000)
    assert joiner.poll() == len(viewed)
    assert joiner.join_due() == len(viewed)
    joiner.flush()
    assert joiner.stats.labels_lost == 0
    rows = ParquetWarehouse(str(tmp_path / "wh"), log.featureset, TableLayout.REQUEST).read_examples()
    rids, counts = np.unique(rows.column("request_id").to_numpy(zero_copy_only=False), return_counts=True)
    got = dict(zip(rids.tolist(), counts.tolist(), strict=True))
    assert got == viewed
