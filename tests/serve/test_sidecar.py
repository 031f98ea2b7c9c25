"""The HTTP logging sidecar: a ranker in any language logs through ``POST /v1/log``.

The service is started from a FeatureSet file that shares no feature name with the synthetic world's,
builds no world, checks every ranking against the file, and freezes and logs it as ``/v1/rank`` does;
paginate and events are the calls a client of ``/v1/rank`` makes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from fastapi.testclient import TestClient
from tests.serve.test_faults import metric

from leanrec.clock import ManualClock, SystemClock
from leanrec.ids import string_ids
from leanrec.join.joiner import LabelJoiner
from leanrec.schema import FeatureSet, Side
from leanrec.serve.app import ARROW_STREAM, ServiceState, create_app
from leanrec.serve.config import ServeConfig
from leanrec.warehouse.store import ParquetWarehouse
from leanrec.warehouse.tables import TableLayout


@pytest.fixture(params=["memory", "redis", "redis-shared-rows"])
def sidecar(request: pytest.FixtureRequest, tmp_path: Path, shop_toml: str) -> Iterator[TestClient]:
    url = "memory://" if request.param == "memory" else request.getfixturevalue("redis_url")
    (tmp_path / "shop.toml").write_text(shop_toml)
    config = ServeConfig(
        store_url=url,
        bus_url=url,
        featureset=str(tmp_path / "shop.toml"),
        max_items=200,
        shared_rows=request.param.endswith("shared-rows"),
    )
    with TestClient(create_app(config)) as client:
        yield client


def _state(client: TestClient) -> ServiceState:
    return client.app.state.leanrec  # type: ignore[attr-defined]


def _json_body(user: int, items: np.ndarray, feats: dict[str, np.ndarray], scores: np.ndarray) -> dict:
    return {
        "user_id": user,
        "items": items.tolist(),
        "scores": scores.tolist(),
        "features": {k: np.asarray(v).tolist() for k, v in feats.items()},
    }


def _arrow_body(fs: FeatureSet, user: int, items: np.ndarray, feats: dict, scores: np.ndarray) -> bytes:
    """The binary body: item rows as columns, the request side in the schema's metadata."""
    cols = {"item_id": pa.array(items), "score": pa.array(scores)}
    for f in (s.feature for s in fs.layout(Side.ITEM).slots):
        a = np.asarray(feats[f.name])
        cols[f.name] = pa.FixedSizeListArray.from_arrays(a.ravel(), f.size) if f.size > 1 else pa.array(a)
    request = {
        s.feature.name: np.asarray(feats[s.feature.name]).tolist() for s in fs.layout(Side.REQUEST).slots
    }
    table = pa.table(cols).replace_schema_metadata(
        {"leanrec": json.dumps({"user_id": user, "features": request})}
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _log(client: TestClient, fs: FeatureSet, user: int, items, feats, scores, binary: bool):
    if binary:
        body = _arrow_body(fs, user, items, feats, scores)
        return client.post("/v1/log", content=body, headers={"content-type": ARROW_STREAM})
    return client.post("/v1/log", json=_json_body(user, items, feats, scores))


def _join(client: TestClient, warehouse: Path) -> tuple[Any, LabelJoiner]:
    st = _state(client)
    st.lane.drain()
    cfg = st.config
    clock = ManualClock(SystemClock().now_ms() + cfg.window_ms + cfg.lateness_ms + 10_000)
    wh = ParquetWarehouse(str(warehouse), st.featureset, TableLayout.REQUEST)
    joiner = LabelJoiner(st.logger, st.bus, wh, wh.ledger, clock, cfg.window_ms, cfg.lateness_ms)
    joiner.poll()
    joiner.join_due()
    joiner.flush()
    return wh.read_examples(), joiner


def test_a_sidecar_serves_a_featureset_file_and_ranks_no_world_of_its_own(sidecar: TestClient) -> None:
    st = _state(sidecar)
    assert st.world is None and st.funnel is None and st.featureset.name == "shop"
    r = sidecar.post("/v1/rank", json={"user_id": 1})
    assert r.status_code == 404 and "POST the ranking to /v1/log" in r.json()["error"]
    spec = sidecar.get("/openapi.json").json()
    assert ARROW_STREAM in spec["paths"]["/v1/log"]["post"]["requestBody"]["content"]


def test_rankings_logged_as_json_and_as_arrow_are_joined_byte_for_byte(
    sidecar: TestClient, tmp_path: Path, shop_features
) -> None:
    fs = _state(sidecar).featureset
    rng = np.random.default_rng(5)
    sent = {}
    for user in range(6):
        items = rng.choice(5000, size=100, replace=False)
        feats = shop_features(rng, items)
        scores = np.sort(rng.random(100))[::-1]
        r = _log(sidecar, fs, user, items, feats, scores, binary=user % 2 == 1)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["n_items"] == 100
        auth = {"request_id": out["request_id"], "token": out["token"]}
        seen = [0, 3, 5] + ([8, 12] if user < 3 else [40])  # users 3..5 scroll past any signal
        if user < 3:
            assert sidecar.post("/v1/paginate", json={**auth, "seen_up_to": 12}).status_code == 200
        now = SystemClock().now_ms()
        events = [{"position": p, "item_id": int(items[p]), "kind": "click", "ts_ms": now} for p in seen]
        r = sidecar.post("/v1/events", json={**auth, "batch_id": f"b{user}", "events": events})
        assert r.status_code == 200 and r.json()["accepted"] == len(seen), r.text
        sent[out["request_id"]] = (items, feats, seen)
    rows, joiner = _join(sidecar, tmp_path / "wh")
    assert joiner.stats.labels_lost == 0
    assert rows.num_rows == sum(len(s) for _, _, s in sent.values())
    # /metrics counts what shared rows sent and spared, as the logger counted it (0 without them)
    ls = _state(sidecar).logger.stats
    for name in ("written", "extended", "rewritten", "reused"):
        assert metric(sidecar, f"leanrec_log_shared_rows_{name}_total") == getattr(ls, f"rows_{name}")
    shared = _state(sidecar).config.shared_rows
    assert (ls.rows_written > 0) is shared
    for rid, (items, feats, seen) in sent.items():
        mine = rows.filter(pc.equal(rows["request_id"], rid))
        assert mine["position"].to_pylist() == seen
        assert mine["item_id"].to_pylist() == items[seen].tolist()
        look = np.stack(mine["look"].to_numpy(zero_copy_only=False))
        np.testing.assert_array_equal(look, feats["look"][seen])
        np.testing.assert_array_equal(mine["price"].to_numpy(), feats["price"][seen].astype(np.float32))
        assert mine["bought"].to_pylist()[0] == feats["bought"].tolist()


@pytest.mark.parametrize(
    ("change", "status", "names"),
    [
        (lambda b: b["features"].pop("taste"), 422, "feature taste"),
        (lambda b: b["features"].update(look=[v[:7] for v in b["features"]["look"]]), 422, "feature look"),
        (lambda b: b["features"].update(hour=[1.5]), 422, "feature hour holds ids: expected integers"),
        (
            lambda b: b.update(items=b["items"] * 3, scores=b["scores"] * 3),
            413,
            "300 ranked items, limit 200",
        ),
        (lambda b: b.pop("user_id"), 422, "user_id: Field required"),
    ],
)
def test_bad_sidecar_input_is_refused_naming_what_was_wrong_and_loses_nothing(
    sidecar: TestClient, tmp_path: Path, shop_features, change, status: int, names: str
) -> None:
    rng = np.random.default_rng(8)
    items = rng.choice(5000, size=100, replace=False)
    good = sidecar.post("/v1/log", json=_json_body(1, items, shop_features(rng, items), np.zeros(100)))
    assert good.status_code == 200
    body = _json_body(2, items, shop_features(rng, items), np.zeros(100))
    change(body)
    r = sidecar.post("/v1/log", json=body)
    assert r.status_code == status and names in r.json()["error"], r.text
    auth = {"request_id": good.json()["request_id"], "token": good.json()["token"]}
    now = SystemClock().now_ms()
    ev = [{"position": 2, "item_id": int(items[2]), "kind": "click", "ts_ms": now}]
    assert sidecar.post("/v1/events", json={**auth, "batch_id": "x", "events": ev}).status_code == 200
    rows, joiner = _join(sidecar, tmp_path / "wh")
    assert rows["request_id"].to_pylist() == [auth["request_id"]] and joiner.stats.labels_lost == 0


def test_a_body_over_the_limit_and_a_broken_arrow_stream_are_refused(tmp_path: Path, shop_toml: str) -> None:
    (tmp_path / "shop.toml").write_text(shop_toml)
    config = ServeConfig(featureset=str(tmp_path / "shop.toml"), max_body_bytes=4_096)
    with TestClient(create_app(config)) as client:
        r = client.post("/v1/log", content=b"x" * 5_000, headers={"content-type": ARROW_STREAM})
        assert r.status_code == 413 and "larger than 4096 bytes" in r.json()["error"]
        r = client.post("/v1/log", content=b"not arrow", headers={"content-type": ARROW_STREAM})
        assert r.status_code == 422 and "not an Arrow IPC stream" in r.json()["error"]
        assert _state(client).logger.stats.entries_written == 0


@pytest.mark.parametrize("shared_rows", [False, True], ids=["lazy", "lazy-shared-rows"])
def test_leanrec_join_joins_what_the_sidecar_logged_under_the_featureset_file(
    redis_url: str, tmp_path: Path, shop_toml: str, shop_features, shared_rows: bool
) -> None:
    from leanrec.join.worker import run_worker

    (tmp_path / "shop.toml").write_text(shop_toml)
    config = ServeConfig(
        store_url=redis_url,
        bus_url=redis_url,
        featureset=str(tmp_path / "shop.toml"),
        window_ms=3_000,
        lateness_ms=0,
        poll_ms=100,
        warehouse=str(tmp_path / "wh"),
        shared_rows=shared_rows,
    )
    rng = np.random.default_rng(2)
    with TestClient(create_app(config)) as client:
        fs = _state(client).featureset
        logged = []
        for user in range(4):
            items = rng.choice(5000, size=50, replace=False)
            out = _log(client, fs, user, items, shop_features(rng, items), np.zeros(50), binary=True).json()
            now = SystemClock().now_ms()
            ev = [{"position": 1, "item_id": int(items[1]), "kind": "like", "ts_ms": now}]
            auth = {"request_id": out["request_id"], "token": out["token"]}
            assert client.post("/v1/events", json={**auth, "batch_id": "b", "events": ev}).status_code == 200
            logged.append(out["request_id"])
        _state(client).lane.drain()
    report = run_worker(config, max_seconds=3_000 / 1000 + 2_000 / 1000 + 4)
    assert report.requests_joined == 4 and report.labels_lost == 0
    rows = ParquetWarehouse(str(tmp_path / "wh"), fs).read_examples()
    assert sorted(rows["request_id"].to_pylist()) == sorted(logged) and all(rows["like"].to_pylist())


# ------------------------------------------------------------------------------ raw and string ids
INT64_ENDS = np.array([2**63 - 1, -(2**63), 2**63 - 2, -2, -(2**63) + 1, 0], np.int64)
"""Ids at both ends of int64 (and 0): none of them is the padding id."""


def _log_events(client: TestClient, out: dict, events: list[dict], batch_id: str) -> None:
    auth = {"request_id": out["request_id"], "token": out["token"]}
    r = client.post("/v1/events", json={**auth, "batch_id": batch_id, "events": events})
    assert r.status_code == 200 and r.json()["accepted"] == len(events), r.text


def test_raw_ids_at_both_ends_of_int64_come_out_of_the_warehouse_unchanged(
    sidecar: TestClient, tmp_path: Path, shop_features
) -> None:
    fs = _state(sidecar).featureset
    rng = np.random.default_rng(9)
    users = [2**63 - 1, -(2**63), -2, 2**62 + 12_345]
    sent = {}
    for b, user in enumerate(users):
        items = np.concatenate([INT64_ENDS, rng.integers(-(2**63), 2**63 - 1, 14)])
        items = items[rng.permutation(len(items))]
        feats = shop_features(rng, items)
        feats["bought"] = np.array([*np.roll(INT64_ENDS, -b)[:5], *[-1] * 7], np.int64)  # raw history, padded
        feats["region"] = np.array(INT64_ENDS[b])  # any id feature takes any int64
        r = _log(sidecar, fs, user, items, feats, np.zeros(len(items)), binary=b % 2 == 1)
        assert r.status_code == 200, r.text
        seen = [int(p) for p in np.flatnonzero(np.isin(items, INT64_ENDS))] + [len(items) - 1]
        now = SystemClock().now_ms()
        events = [{"position": p, "item_id": int(items[p]), "kind": "click", "ts_ms": now} for p in seen]
        _log_events(sidecar, r.json(), events, f"b{b}")
        sent[r.json()["request_id"]] = (user, items, feats, sorted(seen))
    rows, joiner = _join(sidecar, tmp_path / "wh")
    assert joiner.stats.labels_lost == 0 and joiner.stats.mismatched_events == 0
    assert rows.num_rows == sum(len(s[3]) for s in sent.values())
    for rid, (user, items, feats, seen) in sent.items():
        mine = rows.filter(pc.equal(rows["request_id"], rid))
        assert mine["position"].to_pylist() == seen
        assert mine["item_id"].type == pa.int64() and mine["sku"].type == pa.int64()
        assert mine["item_id"].to_pylist() == items[seen].tolist()
        assert mine["sku"].to_pylist() == items[seen].tolist()
        assert mine["user_id"].to_pylist() == [user] * len(seen)
        assert mine["bought"].to_pylist() == [feats["bought"].tolist()] * len(seen)
        assert mine["region"].to_pylist() == [int(feats["region"])] * len(seen)
        assert all(mine["click"].to_pylist())


def _string_shop(shop_toml: str) -> str:
    """The shop's FeatureSet with string ids: its item id and history, and a user id of its own."""
    text = shop_toml.replace('role = "history"', 'role = "history"\ndtype = "string"')
    text = text.replace('role = "item_id"', 'role = "item_id"\ndtype = "string"')
    user = '\n[[features]]\nname = "shopper"\nowner = "user"\nkind = "sparse"\nrows = 1000\n'
    return text + user + 'dtype = "string"\nrole = "user_id"\n'


@pytest.fixture(params=["memory", "redis"])
def string_sidecar(request: pytest.FixtureRequest, tmp_path: Path, shop_toml: str) -> Iterator[TestClient]:
    url = "memory://" if request.param == "memory" else request.getfixturevalue("redis_url")
    (tmp_path / "strings.toml").write_text(_string_shop(shop_toml))
    config = ServeConfig(store_url=url, bus_url=url, featureset=str(tmp_path / "strings.toml"), max_items=200)
    with TestClient(create_app(config)) as client:
        yield client


@pytest.mark.parametrize("binary", [False, True], ids=["json", "arrow"])
def test_string_ids_are_hashed_as_string_ids_hashes_them_and_joined_as_those_hashes(
    string_sidecar: TestClient, tmp_path: Path, shop_features, binary: bool
) -> None:
    fs = _state(string_sidecar).featureset
    assert all(fs[n].string_ids for n in ("sku", "bought", "shopper")) and not fs["region"].string_ids
    rng = np.random.default_rng(10)
    sent = {}
    for b in range(3):
        user = f"user-{b}@shop.example"
        items = np.array([f"sku-{k:05d}" for k in rng.choice(5000, 30, replace=False)])
        feats: dict = shop_features(rng, np.zeros(len(items)))
        feats["sku"] = items
        feats["shopper"] = np.array(user)
        bought = [f"sku-{k:05d}" for k in rng.choice(5000, 4 + b, replace=False)]
        feats["bought"] = np.array([*bought, *[-1] * (12 - len(bought))], object)  # -1 pads strings too
        r = _log(string_sidecar, fs, user, items, feats, np.zeros(len(items)), binary)
        assert r.status_code == 200, r.text
        seen = [0, 2, 7]
        now = SystemClock().now_ms()
        events = [{"position": p, "item_id": str(items[p]), "kind": "click", "ts_ms": now} for p in seen]
        events.append(
            {"position": 9, "item_id": int(string_ids([items[9]])[0]), "kind": "view", "ts_ms": now}
        )
        _log_events(string_sidecar, r.json(), events, f"b{b}")  # a string, or the id it hashes to
        sent[r.json()["request_id"]] = (user, items, bought, [*seen, 9])
    rows, joiner = _join(string_sidecar, tmp_path / "wh")
    assert joiner.stats.labels_lost == 0 and joiner.stats.mismatched_events == 0
    assert rows.num_rows == 3 * 4
    for rid, (user, items, bought, seen) in sent.items():
        mine = rows.filter(pc.equal(rows["request_id"], rid))
        hashes = string_ids(items[seen]).tolist()
        assert mine["position"].to_pylist() == seen
        assert mine["item_id"].to_pylist() == hashes
        assert mine["sku"].to_pylist() == hashes
        assert mine["click"].to_pylist() == [True, True, True, False]
        [user_hash] = string_ids([user]).tolist()
        assert mine["user_id"].to_pylist() == [user_hash] * len(seen)
        assert mine["shopper"].to_pylist() == [user_hash] * len(seen)
        history = [*string_ids(bought).tolist(), *[-1] * (12 - len(bought))]
        assert mine["bought"].to_pylist() == [history] * len(seen)


def test_string_ids_are_refused_where_no_feature_declares_them(
    sidecar: TestClient, string_sidecar: TestClient, shop_features
) -> None:
    rng = np.random.default_rng(11)
    items = rng.choice(5000, 10, replace=False)
    feats = shop_features(rng, items)
    body = _json_body(1, items, feats, np.zeros(10))
    r = sidecar.post("/v1/log", json={**body, "items": [f"sku-{i}" for i in items]})
    assert r.status_code == 422 and 'declared with dtype = "string"' in r.json()["error"], r.text
    r = sidecar.post("/v1/log", json={**body, "user_id": "alice"})
    assert r.status_code == 422 and "user_id: expected a 64-bit integer, got 'alice'" in r.json()["error"]
    good = sidecar.post("/v1/log", json=body).json()
    now = SystemClock().now_ms()
    r = sidecar.post(
        "/v1/events",
        json={**{k: good[k] for k in ("request_id", "token")}, "batch_id": "s", "events": [
            {"position": 1, "item_id": "sku-1", "kind": "click", "ts_ms": now}
        ]},
    )  # fmt: skip
    assert r.status_code == 422 and "item_id" in r.json()["error"], r.text
    # A FeatureSet of string ids still refuses what is neither a string nor a 64-bit integer.
    feats = {**shop_features(rng, np.zeros(10)), "sku": [f"s{i}" for i in range(10)], "shopper": "bob"}
    feats["bought"] = ["s1"] * 12
    body = _json_body(1, np.array([f"s{i}" for i in range(10)]), feats, np.zeros(10))
    assert string_sidecar.post("/v1/log", json={**body, "user_id": "bob"}).status_code == 200
    r = string_sidecar.post("/v1/log", json={**body, "user_id": [1]})
    assert r.status_code == 422 and "user_id" in r.json()["error"], r.text
    r = string_sidecar.post("/v1/log", json={**body, "items": [1.5] * 10})
    assert r.status_code == 422 and "items" in r.json()["error"], r.text
