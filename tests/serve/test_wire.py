"""The sidecar's lean ways in: Arrow bodies, event columns, the hot routes and the logging lane.

Each lean path must answer exactly what the full path answers: the same features, the same events,
the same status and body, the same order of logging calls.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

from leanrec.events import EventBatch
from leanrec.featurelog.loggers import key
from leanrec.schema import FeatureSet, Side
from leanrec.serve.app import LogLane, _Health, create_app
from leanrec.serve.config import ServeConfig
from leanrec.serve.rankinglog import open_logging
from leanrec.serve.wire import arrow_body, event_columns, loads
from leanrec.world import WorldConfig, default_featureset


def _stream(*batches: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batches[0].schema) as writer:
        for b in batches:
            writer.write_batch(b)
    return sink.getvalue().to_pybytes()


def _batch(rng: np.random.Generator, n: int, nulls: bool = False) -> pa.RecordBatch:
    emb = rng.normal(size=(n + 3, 4)).astype(np.float32)
    cols = {
        "item_id": pa.array(rng.integers(0, 1000, n)),
        "score": pa.array(rng.normal(size=n).astype(np.float32)),
        "f32": pa.array(rng.normal(size=n).astype(np.float32)),
        "f64": pa.array(rng.normal(size=n)),
        "i64": pa.array(rng.integers(0, 50, n)),
        "i32": pa.array(rng.integers(0, 50, n).astype(np.int32)),
        # a sliced fixed-size list: its values start past the array's own offset
        "vec": pa.FixedSizeListArray.from_arrays(emb.ravel(), 4).slice(3, n),
        "name": pa.array([f"x{i}" for i in range(n)]),
    }
    if nulls:
        cols["f32"] = pa.array([None, *rng.normal(size=n - 1)], pa.float32())
        cols["i64"] = pa.array([None, *rng.integers(0, 50, n - 1).tolist()], pa.int64())
    head = {"user_id": 7, "features": {"u": [1.5], "h": [1, 2, 3]}}
    return pa.record_batch(cols).replace_schema_metadata({"leanrec": json.dumps(head)})


def _reference(raw: bytes) -> dict[str, np.ndarray]:
    """Every column as numpy, one by one, as the sidecar always read them."""
    table = pa.ipc.open_stream(raw).read_all()
    out = {}
    for name in table.column_names:
        col = table[name].combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            out[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out


@pytest.mark.parametrize(("nulls", "batches"), [(False, 1), (True, 1), (False, 3), (False, 0)])
def test_an_arrow_body_reads_as_column_by_column(nulls: bool, batches: int) -> None:
    rng = np.random.default_rng(3)
    parts = [_batch(rng, 9, nulls) for _ in range(max(batches, 1))]
    if batches == 0:
        parts = [parts[0].slice(0, 0)]
    raw = _stream(*parts)
    for _ in range(2):  # the second read goes through the schema's cached plan
        user, items, scores, features, block = arrow_body(raw)
        assert block is None  # no FeatureSet: every column by name
        want = _reference(raw)
        assert user == 7 and features["u"] == [1.5] and features["h"] == [1, 2, 3]
        np.testing.assert_array_equal(items, want.pop("item_id"))
        np.testing.assert_array_equal(scores, want.pop("score"))
        assert set(features) == {*want, "u", "h"}
        for name, a in want.items():
            assert features[name].dtype == a.dtype and features[name].shape == a.shape, name
            np.testing.assert_array_equal(features[name], a, err_msg=name)


def _body(fs, rng: np.random.Generator, n: int, change=None) -> bytes:
    from leanrec.schema import Side

    cols = {"item_id": pa.array(rng.choice(1000, n, replace=False)), "score": pa.array(rng.normal(size=n))}
    for slot in fs.layout(Side.ITEM).slots:
        f = slot.feature
        a = (
            rng.normal(size=(n, f.size)).astype(np.float32)
            if f.is_float
            else rng.integers(0, f.rows, (n, f.size))
        )
        cols[f.name] = (
            pa.array(a[:, 0]) if f.size == 1 else pa.FixedSizeListArray.from_arrays(a.ravel(), f.size)
        )
    request = {}
    for slot in fs.layout(Side.REQUEST).slots:
        f = slot.feature
        a = rng.normal(size=f.size) if f.is_float else rng.integers(0, f.rows, f.size)
        request[f.name] = a.tolist()
    if change is not None:
        change(cols)
    head = {"user_id": 3, "features": request}
    return _stream(pa.record_batch(cols).replace_schema_metadata({"leanrec": json.dumps(head)}))


def _first_item(fs, floats: bool, size: int) -> str:
    from leanrec.schema import Side

    return next(
        s.feature.name
        for s in fs.layout(Side.ITEM).slots
        if s.feature.is_float is floats and (s.feature.size == 1) == (size == 1)
    )


def _packed(fs, raw: bytes, with_fs: bool) -> object:
    from leanrec.featurelog.inputs import FeatureInputError, pack_ranked

    try:
        user, items, scores, feats, block = arrow_body(raw, fs if with_fs else None)
        b = pack_ranked(fs, user, items, feats, scores, 1_000, block)
    except FeatureInputError as exc:
        return ("refused", str(exc))
    arrays = (b.item_ids, b.scores, b.request.floats, b.request.ints, b.items.floats, b.items.ints)
    return tuple(a.tobytes() for a in arrays), block is not None


@pytest.mark.parametrize(
    "change",
    [
        "none",
        "a null",
        "an unsigned id past 2**63",
        "unsigned ids",
        "ids near both ends of int64",
        "float ids",
        "a vector of the wrong size",
        "int floats",
        "a column too many",
        "a column missing",
        "int32 ids",
    ],
)
def test_the_item_block_taken_straight_from_arrow_is_what_the_full_checks_pack(change: str) -> None:
    from leanrec.world import WorldConfig, default_featureset

    fs = default_featureset(WorldConfig())[0]
    f1, i1, fv = _first_item(fs, True, 1), _first_item(fs, False, 1), _first_item(fs, True, 2)
    changes = {
        "none": None,
        "a null": lambda c: c.update({f1: pa.array([None, *c[f1].to_pylist()[1:]], pa.float32())}),
        "an unsigned id past 2**63": lambda c: c.update(
            {i1: pa.array(np.full(len(c[i1]), 2**63 + 5, np.uint64))}
        ),
        "unsigned ids": lambda c: c.update({i1: pa.array(np.asarray(c[i1], np.uint64))}),
        "ids near both ends of int64": lambda c: c.update(
            {i1: pa.array(np.resize(np.array([2**63 - 1, -(2**63), 2**63 - 2, -2], np.int64), len(c[i1])))}
        ),
        "float ids": lambda c: c.update({i1: pa.array(np.asarray(c[i1], float))}),
        "a vector of the wrong size": lambda c: c.update({fv: c[fv].flatten().slice(0, len(c[fv]))}),
        "int floats": lambda c: c.update({f1: pa.array(np.arange(len(c[f1])))}),
        "a column too many": lambda c: c.update(extra=c[f1]),
        "a column missing": lambda c: c.pop(f1),
        "int32 ids": lambda c: c.update({i1: pa.array(np.asarray(c[i1], np.int32))}),
    }
    raw = _body(fs, np.random.default_rng(4), 30, changes[change])
    straight, full = _packed(fs, raw, True), _packed(fs, raw, False)
    assert straight[0] == full[0], change
    took_straight = straight[1] if straight[0] != "refused" else False
    assert took_straight == (change in ("none", "int floats", "int32 ids", "ids near both ends of int64")), (
        change
    )
    refused = straight[0] == "refused"
    assert refused == (
        change in ("an unsigned id past 2**63", "float ids", "a vector of the wrong size")
        or change.startswith("a column")
    ), (change, straight)


def _records(n: int, rng: np.random.Generator) -> list[dict]:
    kinds = ["view", "click", "LIKE", "share", "hide", "watch"]
    return [
        {
            "position": int(rng.integers(0, 100)),
            "item_id": int(rng.integers(-(2**63), 2**63 - 1)),  # raw 64-bit ids
            "kind": kinds[int(rng.integers(0, len(kinds)))],
            "ts_ms": int(rng.integers(0, 2**62)),
            **({"value": float(rng.random() * 1e4)} if rng.random() < 0.5 else {}),
        }
        for _ in range(n)
    ]


@pytest.mark.parametrize("n", [0, 1, 17])
def test_plain_events_become_the_columns_the_full_checks_build(n: int) -> None:
    records = _records(n, np.random.default_rng(n))
    got = event_columns("r1", records, 1_000)
    want, errors = EventBatch.from_records("r1", records)
    assert got is not None and errors == []
    assert got.to_bytes() == want.to_bytes()


@pytest.mark.parametrize(
    "change",
    [
        lambda e: e.update(position=True),
        lambda e: e.update(ts_ms=1.0),
        lambda e: e.update(item_id="5"),
        lambda e: e.update(kind="ViEw"),
        lambda e: e.update(kind="swipe"),
        lambda e: e.update(kind=3),
        lambda e: e.pop("ts_ms"),
        lambda e: e.update(value=True),
        lambda e: e.update(item_id=2**63),
        lambda e: e.update(item_id=-(2**63) - 1),
        lambda e: e.update(position=2**31),
        lambda e: e.update(ts_ms=2**64),
    ],
)
def test_events_that_are_not_plain_are_left_to_the_full_checks(change) -> None:
    records = _records(3, np.random.default_rng(1))
    change(records[1])
    assert event_columns("r1", records, 1_000) is None
    assert event_columns("r1", "not a list", 1_000) is None
    assert event_columns("r1", [*_records(2, np.random.default_rng(2)), 7], 1_000) is None
    assert event_columns("r1", _records(3, np.random.default_rng(2)), 2) is None  # over the limit


def test_json_that_orjson_refuses_is_read_as_the_standard_library_reads_it() -> None:
    assert loads(b'{"a": NaN, "b": 123456789012345678901234567890}')["b"] == 123456789012345678901234567890
    with pytest.raises(json.JSONDecodeError):
        loads(b'{"a": 1,')


# -------------------------------------------------------------------------------- the hot routes
@pytest.fixture
def sidecar(tmp_path) -> TestClient:
    from leanrec.featurefile import dump_featureset
    from leanrec.world import WorldConfig, default_featureset

    path = tmp_path / "fs.toml"
    path.write_text(dump_featureset(default_featureset(WorldConfig())[0]))
    config = ServeConfig(store_url="memory://", bus_url="memory://", featureset=str(path))
    with TestClient(create_app(config)) as client:
        yield client


def _ranked(client: TestClient) -> dict:
    from leanrec.schema import Side

    fs = client.app.state.leanrec.featureset
    rng = np.random.default_rng(0)
    feats = {}
    for side, rows in ((Side.REQUEST, 1), (Side.ITEM, 20)):
        for slot in fs.layout(side).slots:
            f = slot.feature
            a = rng.normal(size=(rows, f.size)) if f.is_float else rng.integers(0, f.rows, (rows, f.size))
            feats[f.name] = (a[0] if rows == 1 else a[:, 0] if f.size == 1 else a).tolist()
    r = client.post("/v1/log", json={"user_id": 1, "items": list(range(20)), "features": feats})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_coercible_body_goes_on_to_the_full_route_and_is_answered_as_before(sidecar: TestClient) -> None:
    body = _ranked(sidecar)
    auth = {"request_id": body["request_id"], "token": body["token"]}
    # a plain body takes the lean way; one pydantic coerces ("14", 3.0) takes FastAPI's: same answers
    plain = sidecar.post("/v1/paginate", json={**auth, "seen_up_to": 8})
    coerced = sidecar.post("/v1/paginate", json={**auth, "seen_up_to": "14"})
    assert (plain.status_code, plain.json()) == (200, {"pages_logged": 1})
    assert (coerced.status_code, coerced.json()) == (200, {"pages_logged": 1})
    now = int(time.time() * 1000)
    ev = [{"position": 0, "item_id": 0, "kind": "view", "ts_ms": now}]
    r = sidecar.post("/v1/events", json={**auth, "batch_id": "b1", "events": ev})
    assert r.json() == {"accepted": 1, "refused": {}, "messages": []}
    ev = [{"position": 1.0, "item_id": 1, "kind": "click", "ts_ms": now}]
    r = sidecar.post("/v1/events", json={**auth, "batch_id": "b2", "events": ev})
    assert r.status_code == 200 and r.json()["accepted"] == 1  # pydantic makes 1.0 the int 1
    r = sidecar.post("/v1/events", json={**auth, "batch_id": "b2", "events": ev})
    assert r.status_code == 409 and r.json()["refused"] == {"replayed": 1}
    r = sidecar.post("/v1/events", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"].startswith("malformed JSON: at character")
    st = sidecar.app.state.leanrec
    st.lane.drain()
    assert len(st.store.get_lists_many([key(body["request_id"], "ev")])[0]) == 2


# -------------------------------------------------------------------------------------- the lane
class _Recorder:
    stats = None

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def note(self, where: int) -> int:
        self.calls.append((threading.current_thread().name, where))
        return where


def test_the_lane_keeps_the_order_on_the_loop_and_on_its_thread() -> None:
    import asyncio

    health, rec = _Health(), _Recorder()
    lane = LogLane(health, None)

    async def traffic() -> list[int]:
        got = []
        for i in range(6):
            if i == 3:
                health.failed()  # a backend failed: from here on, the lane's thread
            lane.submit(rec.note, 10 * i)
            got.append(await lane.call(rec.note, 10 * i + 1))
        health.last_failure = -1e18  # healthy again: back on the loop once the thread is idle
        lane.submit(rec.note, 60)
        got.append(await lane.call(rec.note, 61))
        return got

    assert asyncio.run(traffic()) == [1, 11, 21, 31, 41, 51, 61]
    lane.drain()
    assert [w for _, w in rec.calls] == [0, 1, 10, 11, 20, 21, 30, 31, 40, 41, 50, 51, 60, 61]
    threads = [t for t, _ in rec.calls]
    assert set(threads[:6]) == {"MainThread"} and set(threads[6:12]) == {"leanrec-log"}
    assert set(threads[12:]) == {"MainThread"}
    assert lane.pending == 0


def test_a_call_that_fails_on_the_loop_raises_to_its_caller() -> None:
    import asyncio

    lane = LogLane(_Health(), None)

    def boom() -> None:
        raise ConnectionError("store down")

    async def go() -> None:
        with pytest.raises(ConnectionError, match="store down"):
            await lane.call(boom)

    asyncio.run(go())
    assert lane.pending == 0


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The commands of each Redis round trip the logging calls make, as they are made."""
    from leanrec.stores.redis_common import RoundTrips

    sent: list[list[str]] = []
    original = RoundTrips.__call__

    def counting(self: RoundTrips, commands: list) -> list:
        sent.append([c[0] for c in commands])
        return original(self, commands)

    monkeypatch.setattr(RoundTrips, "__call__", counting)
    return sent


def _ranked_features(fs: FeatureSet, n: int, seed: int) -> dict[str, np.ndarray]:
    """Every feature of ``fs`` for a ranked list of ``n`` items, drawn within range."""
    rng = np.random.default_rng(seed)
    feats = {}
    for side, rows in ((Side.REQUEST, 1), (Side.ITEM, n)):
        for slot in fs.layout(side).slots:
            f = slot.feature
            a = rng.normal(size=(rows, f.size)) if f.is_float else rng.integers(0, f.rows, (rows, f.size))
            feats[f.name] = a[0] if rows == 1 else a[:, 0] if f.size == 1 else a
    return feats


def test_a_rankings_first_write_and_its_record_share_one_round_trip(redis_url: str, round_trips) -> None:
    sent = round_trips
    fs = default_featureset(WorldConfig())[0]
    feats = _ranked_features(fs, 20, seed=5)
    for mode, writes in (("lazy", 2), ("eager", 20)):
        log = open_logging(fs, redis_url, redis_url, logging=mode)
        sent.clear()
        logged = log.ranked(1, np.arange(20), feats, np.linspace(1, 0, 20))
        assert sent == [["SET"] * writes + ["XADD"]], (mode, sent)
        first = key(logged.request_id, "u" if mode == "lazy" else "i0")
        assert log.parts.store.get_many([first])[0] is not None
        assert log.parts.bus.consume(10)[-1][1].request_id == logged.request_id
        assert log.parts.logger.stats.bus_failures == log.parts.logger.stats.write_failures == 0


def test_an_event_batch_and_the_pages_it_touches_share_one_round_trip(redis_url: str, round_trips) -> None:
    sent = round_trips
    fs = default_featureset(WorldConfig())[0]
    feats = _ranked_features(fs, 40, seed=6)
    log = open_logging(fs, redis_url, redis_url, logging="lazy")
    items = np.arange(100, 140)
    logged = log.ranked(1, items, feats)
    now = log.clock.now_ms()
    clicks = [{"position": p, "item_id": int(items[p]), "kind": "click", "ts_ms": now} for p in (2, 20, 31)]
    sent.clear()
    result = log.events(logged.request_id, logged.token, clicks, batch_id="b1")
    # a fast scroll: pages 2 (15-23) and 3 (24-32) are written before the batch is appended
    assert result.accepted == 3 and sent == [["SET", "SET", "EVALSHA"]], sent
    store, logger = log.parts.store, log.parts.logger
    opened = log.parts.bus.consume(10)[-1][1]
    fetched = logger.fetch(opened, np.array([2, 20, 31]))
    assert fetched.found.all() and fetched.item_ids.tolist() == [102, 120, 131]
    assert len(store.get_lists_many([key(logged.request_id, "ev")])[0]) == 1
    assert logger.stats.pages_on_touch == 2 and logger.stats.write_failures == 0
    sent.clear()
    again = log.events(logged.request_id, logged.token, clicks, batch_id="b1")
    assert again.accepted == 0 and again.refused == {"replayed": 3}
    assert sent == [["EVALSHA"]]  # nothing left to log: the append alone
    assert len(store.get_lists_many([key(logged.request_id, "ev")])[0]) == 1
    store._client.script_flush()  # a restarted server: the script is sent again, the batch taken once
    late = [{"position": 38, "item_id": int(items[38]), "kind": "click", "ts_ms": now}]
    sent.clear()
    assert log.events(logged.request_id, logged.token, late, batch_id="b2").accepted == 1
    assert sent == [["SET", "EVALSHA"], ["EVALSHA"]], sent
    assert len(store.get_lists_many([key(logged.request_id, "ev")])[0]) == 2
    assert logger.fetch(opened, np.array([38])).found.all()
