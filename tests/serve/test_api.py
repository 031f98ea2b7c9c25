"""The HTTP API in process: rankings, tokens, pagination and events, and every refusal of bad input.

Each refusal is a clear 4xx whose message says what was wrong, and none of them loses anything that
was accepted before: the accepted event batches stay in the transient store and are joined.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from leanrec.clock import ManualClock, SystemClock
from leanrec.energy.ledger import CostLedger
from leanrec.events import RequestRef
from leanrec.featurelog.loggers import ContextCache, LazyLogger, Paging, key
from leanrec.ids import scrambled_ids
from leanrec.join.joiner import JoinStats, LabelJoiner
from leanrec.serve.app import ServiceState, create_app
from leanrec.serve.config import ServeConfig
from leanrec.serve.tokens import TokenSigner
from leanrec.warehouse.store import ParquetWarehouse
from leanrec.warehouse.tables import TableLayout
from leanrec.world import ITEM_SALT, USER_SALT, WorldConfig, default_featureset

SMALL = {"n_users": 400, "n_items": 3_000}
USERS = scrambled_ids(SMALL["n_users"], USER_SALT)
"""The synthetic world's raw user ids: user ``k`` (a row of the world) is ``USERS[k]``."""
ITEMS = scrambled_ids(SMALL["n_items"], ITEM_SALT)


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    """A backend URL: the embedded store and bus, or the dedicated Redis."""
    if request.param == "memory":
        return "memory://"
    return request.getfixturevalue("redis_url")


def make_client(url: str = "memory://", **settings: Any) -> TestClient:
    config = ServeConfig(store_url=url, bus_url=url, **{**SMALL, **settings})
    return TestClient(create_app(config))


@pytest.fixture
def client(backend: str) -> Iterator[TestClient]:
    with make_client(backend) as c:
        yield c


def state(client: TestClient) -> ServiceState:
    return client.app.state.leanrec  # type: ignore[attr-defined]


def settle(client: TestClient) -> None:
    """Wait until the logging queued so far has run (the app may log a ranking after answering it)."""
    lane = getattr(state(client), "lane", None)
    if lane is not None:
        lane.drain()


def rank(client: TestClient, user: int = 3) -> dict[str, Any]:
    """Rank for the world's user ``user`` (a row; the request names its raw id)."""
    r = client.post("/v1/rank", json={"user_id": int(USERS[user])})
    assert r.status_code == 200, r.text
    return r.json()


def views(body: dict[str, Any], positions: range, kind: str = "view") -> list[dict[str, Any]]:
    now = SystemClock().now_ms()
    return [{"position": p, "item_id": body["items"][p], "kind": kind, "ts_ms": now + p} for p in positions]


def auth_of(body: dict[str, Any]) -> dict[str, str]:
    return {"request_id": body["request_id"], "token": body["token"]}


def events_body(body: dict[str, Any], batch_id: str, events: list) -> bytes:
    return json.dumps({**auth_of(body), "batch_id": batch_id, "events": events}).encode()


def post_events(client: TestClient, body: dict[str, Any], events: list, batch_id: str, **over: Any):
    payload = {"request_id": body["request_id"], "token": body["token"], "batch_id": batch_id}
    return client.post("/v1/events", json={**payload, "events": events, **over})


def stored_batches(client: TestClient, request_id: str) -> list[bytes]:
    """The event batches the transient store holds for a request (``lr:{id}:ev``)."""
    return state(client).store.get_lists_many([key(request_id, "ev")])[0]


def join_all(client: TestClient, warehouse: Path) -> tuple[Any, JoinStats]:
    """Join every request of the app's store and bus, as ``leanrec join`` would, with time past the window."""
    settle(client)
    st = state(client)
    cfg = st.config
    fs, _ = default_featureset(WorldConfig(n_users=cfg.n_users, n_items=cfg.n_items, seed=cfg.seed))
    clock = ManualClock(SystemClock().now_ms() + cfg.window_ms + cfg.lateness_ms + 10_000)
    ledger = CostLedger()
    ttl = cfg.window_ms + cfg.lateness_ms + cfg.ttl_grace_ms
    contexts = ContextCache(1 << 20, cfg.context_idle_ms, cfg.window_ms, clock, ledger)
    logger = LazyLogger(fs, st.store, st.bus, ledger, ttl, contexts, Paging(), cfg.lookahead)
    wh = ParquetWarehouse(str(warehouse), fs, TableLayout.REQUEST, ledger)
    joiner = LabelJoiner(logger, st.bus, wh, ledger, clock, cfg.window_ms, cfg.lateness_ms)
    joiner.poll()
    joiner.join_due()
    joiner.flush()
    return wh.read_examples(), joiner.stats


# ------------------------------------------------------------------------------------------ rank
def test_rank_returns_100_distinct_items_and_a_token(client: TestClient) -> None:
    body = rank(client)
    assert len(body["items"]) == 100
    assert len(set(body["items"])) == 100
    assert set(body["items"]) <= set(ITEMS.tolist())  # the catalog's raw ids
    assert any(abs(i) >= 2**31 for i in body["items"])  # as they are, not narrowed to 32 bits
    ref = state(client).signer.check(body["token"], body["request_id"], SystemClock().now_ms())
    assert (ref.request_id, ref.user_id, ref.n_items) == (body["request_id"], int(USERS[3]), 100)
    other = rank(client)
    assert other["request_id"] != body["request_id"]


def test_rank_refuses_an_unknown_user(client: TestClient) -> None:
    for unknown in (400, 3, -1, 2**63 - 1, -(2**63), 2**64, "alice"):  # a row number is no user id either
        assert unknown not in USERS.tolist()
        r = client.post("/v1/rank", json={"user_id": unknown})
        assert r.status_code == 422, (unknown, r.text)
        assert f"unknown user {unknown!r}" in r.json()["error"]
    r = client.post("/v1/rank", json={"user_id": [1]})
    assert r.status_code == 422
    assert "user_id" in r.json()["error"]


def test_rank_logs_the_request_side_and_head_page(client: TestClient) -> None:
    body = rank(client)
    rid = body["request_id"]
    settle(client)
    got = state(client).store.get_many([key(rid, "u"), key(rid, "p0"), key(rid, "p1")])
    assert got[0] is not None and got[1] is not None
    assert got[2] is None  # lazy: page 1 waits for a signal or a touch


# ------------------------------------------------------------------------------------- the token
def test_paginate_and_events_are_checked_against_the_token(client: TestClient) -> None:
    a, b = rank(client, 1), rank(client, 2)
    ok = client.post(
        "/v1/paginate", json={"request_id": a["request_id"], "token": a["token"], "seen_up_to": 14}
    )
    assert ok.status_code == 200
    assert ok.json() == {"pages_logged": 2}  # positions up to 14 + 2 lie in pages 1 (6..14) and 2 (15..23)
    rid = a["request_id"]
    assert state(client).store.get_many([key(rid, "p1"), key(rid, "p2"), key(rid, "p3")])[2] is None
    wrong = client.post(
        "/v1/paginate", json={"request_id": a["request_id"], "token": b["token"], "seen_up_to": 10}
    )
    assert wrong.status_code == 401
    assert f"token is for request {b['request_id']}, not {a['request_id']}" in wrong.json()["error"]
    r = post_events(client, a, views(a, range(3)), "b1")
    assert r.status_code == 200 and r.json()["accepted"] == 3
    r = post_events(client, a, views(a, range(3)), "b2", token=b["token"])
    assert r.status_code == 401
    assert len(stored_batches(client, a["request_id"])) == 1


# ------------------------------------------------------------------------------------- refusals
def test_malformed_json_is_400_with_where(client: TestClient) -> None:
    for path in ("/v1/rank", "/v1/paginate", "/v1/events"):
        r = client.post(path, content=b'{"user_id": 3,', headers={"content-type": "application/json"})
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"].startswith("malformed JSON: at character"), r.text


def test_a_wrongly_shaped_body_is_422_naming_the_field(client: TestClient) -> None:
    body = rank(client)
    r = client.post("/v1/events", json={"request_id": body["request_id"], "token": body["token"]})
    assert r.status_code == 422
    assert "batch_id: Field required" in r.json()["error"]
    assert "events: Field required" in r.json()["error"]


def test_forged_tokens_are_401(client: TestClient) -> None:
    body = rank(client)
    payload, mac = body["token"].split(".")
    forged = f"{payload}.{'A' * len(mac)}"
    r = post_events(client, body, views(body, range(2)), "f1", token=forged)
    assert r.status_code == 401
    assert "signature does not match" in r.json()["error"]
    # a token signed with another deployment's key, for a list of 1,000 items
    ref = RequestRef(body["request_id"], int(USERS[3]), SystemClock().now_ms(), 1_000)
    other = TokenSigner(b"another-deployment-secret", 60_000).sign(ref)
    r = post_events(client, body, views(body, range(2)), "f2", token=other)
    assert r.status_code == 401
    assert "forged" in r.json()["error"]
    r = post_events(client, body, views(body, range(2)), "f3", token="not-a-token")
    assert r.status_code == 401
    assert r.json()["error"] == "malformed token"
    assert stored_batches(client, body["request_id"]) == []


@pytest.mark.parametrize(
    ("token", "status"),
    [(".ó\U00093d88똠Ñ", 401), ("abc.dé", 401), ("é.abc", 401), ("\x00.\x00", 401), ("abc.\ud800", 422)],
)
def test_a_token_of_any_characters_is_refused_not_a_server_error(
    client: TestClient, token: str, status: int
) -> None:
    # 401 for any text; 422 for a lone surrogate, which JSON may carry and which is no text at all
    body = rank(client)
    events = {**auth_of(body), "token": token, "batch_id": "t1", "events": views(body, range(2))}
    paginate = {**auth_of(body), "token": token, "seen_up_to": 3}
    for path, payload in (("/v1/events", events), ("/v1/paginate", paginate)):
        # JSON with \u escapes: a lone surrogate has no UTF-8 form, and JSON may carry it all the same
        r = client.post(path, content=json.dumps(payload), headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
        assert "token" in r.json()["error"]


def test_a_batch_id_that_is_no_text_is_422_not_a_server_error(client: TestClient) -> None:
    # JSON may carry a lone surrogate (\ud800), which no store can take as a key: refused at the edge.
    body = rank(client)
    payload = {**auth_of(body), "batch_id": "b\ud800", "events": views(body, range(2))}
    r = client.post("/v1/events", content=json.dumps(payload), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert "batch_id" in r.json()["error"] and "unicode" in r.json()["error"]
    assert stored_batches(client, body["request_id"]) == []
    assert post_events(client, body, views(body, range(2)), "bé").status_code == 200  # any real text is fine


def test_a_call_with_an_expired_token_is_410_like_any_call_after_the_window(client: TestClient) -> None:
    body = rank(client)
    st = state(client)
    old = SystemClock().now_ms() - st.signer.valid_ms - 5_000
    token = st.signer.sign(RequestRef(body["request_id"], int(USERS[3]), old, 100))
    r = post_events(client, body, views(body, range(2)), "e1", token=token)
    assert r.status_code == 410
    assert "token expired" in r.json()["error"]
    r = client.post("/v1/paginate", json={"request_id": body["request_id"], "token": token, "seen_up_to": 4})
    assert r.status_code == 410
    assert "token expired" in r.json()["error"]
    assert stored_batches(client, body["request_id"]) == []


def test_unknown_paths_and_methods_are_refused_in_the_same_body_as_any_refusal(client: TestClient) -> None:
    r = client.get("/v1/nowhere")
    assert r.status_code == 404 and r.json() == {"error": "no such path: /v1/nowhere"}
    r = client.get("/v1/events")
    assert r.status_code == 405 and r.json() == {"error": "GET is not allowed on /v1/events"}
    assert "POST" in r.headers["allow"]


def test_a_replayed_batch_is_409(client: TestClient) -> None:
    body = rank(client)
    events = views(body, range(4))
    assert post_events(client, body, events, "once").status_code == 200
    r = post_events(client, body, events, "once")
    assert r.status_code == 409
    assert "batch 'once' was accepted before" in r.json()["error"]
    assert r.json()["refused"] == {"replayed": 4}
    assert len(stored_batches(client, body["request_id"])) == 1


def test_positions_beyond_the_list_are_refused(client: TestClient) -> None:
    body = rank(client)
    now = SystemClock().now_ms()
    beyond = [{"position": 100, "item_id": int(ITEMS[1]), "kind": "view", "ts_ms": now}]
    r = post_events(client, body, beyond, "only-beyond")
    assert r.status_code == 422
    assert "position outside the ranked list of 100" in r.json()["error"]
    assert r.json()["refused"] == {"bad_position": 1}
    r = post_events(client, body, [*views(body, range(2)), *beyond], "mixed")
    assert r.status_code == 200
    assert r.json()["accepted"] == 2 and r.json()["refused"] == {"bad_position": 1}
    r = client.post(
        "/v1/paginate", json={"request_id": body["request_id"], "token": body["token"], "seen_up_to": 100}
    )
    assert r.status_code == 422
    assert "seen_up_to=100 is beyond the ranked list of 100" in r.json()["error"]


def _metric(client: TestClient, name: str, **labels: str) -> float:
    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise AssertionError(f"no sample {name}{labels} in /metrics")


def test_an_event_naming_another_item_than_the_one_ranked_there_is_refused(client: TestClient) -> None:
    body = rank(client)
    assert _metric(client, "leanrec_events_refused_total", reason="wrong_item") == 0  # there before any
    wrong = views(body, range(3, 4))
    wrong[0]["item_id"] = body["items"][4]  # an item of the list, at another position
    r = post_events(client, body, wrong, "only-wrong")
    assert r.status_code == 422
    assert "item_id is not the item ranked at its position" in r.json()["error"]
    assert r.json()["refused"] == {"wrong_item": 1}
    assert stored_batches(client, body["request_id"]) == []
    # In a batch, the others go on; the wrong one is refused and said why.
    stranger = {**views(body, range(5, 6))[0], "item_id": int(ITEMS[0]) ^ 12345}
    r = post_events(client, body, [*views(body, range(2)), stranger], "mixed")
    assert r.status_code == 200
    assert r.json()["accepted"] == 2 and r.json()["refused"] == {"wrong_item": 1}
    assert any("item_id is not the item ranked" in m for m in r.json()["messages"])
    # Through FastAPI's route too (a body the lean way in leaves to it: a position written as 6.0).
    other = {**views(body, range(6, 7))[0], "item_id": body["items"][0], "position": 6.0}
    r = post_events(client, body, [other], "routed")
    assert r.status_code == 422 and r.json()["refused"] == {"wrong_item": 1}
    assert _metric(client, "leanrec_events_refused_total", reason="wrong_item") == 3
    assert client.get("/healthz").json()["events"] == {"accepted": 2, "refused": {"wrong_item": 3}}


def test_an_eager_service_leaves_the_item_check_to_the_join(tmp_path: Path, traffic, examples) -> None:
    # Eager logging holds no ranked list in the process: a wrong item is accepted, and the join drops it.
    with make_client(logging="eager") as client:
        body = rank(client)
        wrong = {**views(body, range(1))[0], "item_id": body["items"][1]}
        r = post_events(client, body, [*views(body, range(1, 3)), wrong], "b1")
        assert r.status_code == 200 and r.json()["accepted"] == 3
        assert client.get("/healthz").json()["events"]["refused"] == {"wrong_item": 0}
        settle(client)
        st = state(client)
        cfg = st.config
        fs, _ = default_featureset(WorldConfig(n_users=cfg.n_users, n_items=cfg.n_items, seed=cfg.seed))
        clock = ManualClock(SystemClock().now_ms() + cfg.window_ms + cfg.lateness_ms + 10_000)
        wh = ParquetWarehouse(str(tmp_path / "wh"), fs, TableLayout.IMPRESSION, CostLedger())
        joiner = LabelJoiner(st.logger, st.bus, wh, CostLedger(), clock, cfg.window_ms, cfg.lateness_ms)
        joiner.poll()
        joiner.join_due()
        joiner.flush()
        assert joiner.stats.mismatched_events == 1
        assert sorted(wh.read_examples().column("position").to_pylist()) == [1, 2]


def test_an_oversized_body_is_413_by_content_length() -> None:
    with make_client(max_body_bytes=4_096) as client:
        body = rank(client)
        big = events_body(body, "big", views(body, range(100)))
        assert len(big) > 4_096
        r = client.post("/v1/events", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert r.json()["error"] == "request body larger than 4096 bytes"
        assert stored_batches(client, body["request_id"]) == []


def test_an_oversized_streamed_body_is_413() -> None:
    """A chunked body declares no length: it is counted as it arrives and refused past the bound."""
    with make_client(max_body_bytes=4_096) as client:
        body = rank(client)
        big = events_body(body, "big", views(body, range(100)))

        def chunks() -> Iterator[bytes]:
            for start in range(0, len(big), 1_000):
                yield big[start : start + 1_000]

        r = client.post("/v1/events", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert r.json()["error"] == "request body larger than 4096 bytes"
        assert stored_batches(client, body["request_id"]) == []
        # a streamed body within the bound is read whole and accepted
        small = events_body(body, "ok", views(body, range(3)))
        r = client.post(
            "/v1/events", content=iter([small[:50], small[50:]]), headers={"content-type": "application/json"}
        )
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == 3


def test_too_many_events_in_one_batch_is_413() -> None:
    with make_client(max_events=10) as client:
        body = rank(client)
        r = post_events(client, body, views(body, range(11)), "many")
        assert r.status_code == 413
        assert r.json()["error"] == "11 events in one batch, limit 10"


# --------------------------------------------------------- nothing accepted before a refusal is lost
def test_refusals_lose_nothing_accepted_before(client: TestClient, tmp_path: Path, traffic, examples) -> None:
    """Good sessions, then every kind of bad input between more good batches; then join everything."""
    t = traffic(client, seed=5)
    t.run(12)
    target = rank(client, 9)
    rid = target["request_id"]
    first = views(target, range(3))
    assert post_events(client, target, first, "good-1").json()["accepted"] == 3
    other = rank(client, 10)
    old = SystemClock().now_ms() - state(client).signer.valid_ms - 1
    expired = state(client).signer.sign(RequestRef(rid, int(USERS[9]), old, 100))
    payload, mac = target["token"].split(".")
    forged = f"{payload}.{mac[::-1]}"
    json_type = {"content-type": "application/json"}
    now = SystemClock().now_ms()
    beyond = [{"position": 250, "item_id": int(ITEMS[0]), "kind": "view", "ts_ms": now}]
    bad_calls = [
        (
            400,
            lambda: client.post("/v1/events", content=b'{"request_id": "' + rid.encode(), headers=json_type),
        ),
        (401, lambda: post_events(client, target, views(target, range(3, 5)), "x1", token=forged)),
        (410, lambda: post_events(client, target, views(target, range(3, 5)), "x2", token=expired)),
        (401, lambda: post_events(client, target, views(target, range(3, 5)), "x3", token=other["token"])),
        (409, lambda: post_events(client, target, first, "good-1")),
        (422, lambda: post_events(client, target, beyond, "x4")),
        (422, lambda: client.post("/v1/paginate", json={**auth_of(target), "seen_up_to": 1_000})),
        (413, lambda: client.post("/v1/events", content=b"[" + b" " * 300_000 + b"]", headers=json_type)),
        (
            413,
            lambda: client.post("/v1/events", content=iter([b"{" + b" " * 200_000] * 2), headers=json_type),
        ),
    ]
    for want, call in bad_calls:
        r = call()
        assert r.status_code == want, r.text
        assert r.json()["error"], r.text
    second = views(target, range(3, 8), kind="view")
    click = views(target, range(5, 6), kind="click")
    assert post_events(client, target, second + click, "good-2").json()["accepted"] == 6
    # the store holds exactly the two accepted batches of the target, and every batch of the sessions
    assert len(stored_batches(client, rid)) == 2
    for session_rid, n in t.batches.items():
        assert len(stored_batches(client, session_rid)) == n
    table, stats = join_all(client, tmp_path / "wh")
    expected = dict(t.expected)
    for p in range(8):
        labels = {"click": int(p == 5), "like": 0, "share": 0, "hide": 0, "watch_ms": 0}
        expected[(rid, p)] = {"item_id": target["items"][p], **labels}
    _, compare = examples
    compare(table, expected)  # every accepted event joined: nothing lost, nothing twice
    assert stats.labels_lost == 0 and stats.mismatched_events == 0
    assert stats.requests_joined == len(t.request_ids) + 2  # the sessions, the target and `other`


# ------------------------------------------------------------------------------- description, metrics
def test_openapi_lists_the_three_post_routes(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/v1/rank", "/v1/paginate", "/v1/events"):
        assert "post" in spec["paths"][path], path
    assert "/healthz" in spec["paths"]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_api_pages_need_nothing_but_the_service(page: str) -> None:
    # A machine without internet shows them whole: every script, style and icon comes from the app.
    with make_client() as client:
        r = client.get(page)
        assert r.status_code == 200 and "text/html" in r.headers["content-type"]
        assert re.findall(r"https?://[^\s'\"<>)]+", r.text) == []  # no other host named anywhere
        assets = set(re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", r.text))
        assert "/openapi.json" in assets
        assert any(a.endswith(".js") for a in assets), assets
        for asset in sorted(assets):
            got = client.get(asset)
            assert got.status_code == 200, asset
            assert len(got.content) > 0, asset


def test_metrics_parse_and_count_rankings(client: TestClient) -> None:
    for user in range(3):
        rank(client, user)
    settle(client)
    text = client.get("/metrics").text
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels
    }
    assert samples["leanrec_ranked_requests_total"] == 3
    assert samples["leanrec_log_write_failures_total"] == 0
    assert samples["leanrec_log_entries_written_total"] == 6  # the request side and the head, thrice


def test_healthz_is_ok_with_backends_up(client: TestClient) -> None:
    rank(client)
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and not h["logging_degraded"]
    assert h["backends"] == {"transient_store": "up", "event_bus": "up"}
    assert h["lost_logging"]["entries"] == 0 and h["lost_logging"]["opened_records"] == 0
    assert not any(h["lost_logging"].values())
