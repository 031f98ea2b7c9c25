"""The request id header a load balancer routes by, in process: rank, log and the library take a chosen
id; paginate and events refuse a header that names another request than the body; the nginx config
routes by it. Real nginx in front of real processes is ``test_scaleout.py``."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import leanrec
from leanrec.cli import main
from leanrec.clock import SystemClock
from leanrec.ids import scrambled_ids
from leanrec.serve.app import create_app
from leanrec.serve.config import ServeConfig
from leanrec.serve.routing import (
    PROCESS_KEEP_ALIVE_S,
    REQUEST_ID_HEADER,
    UPSTREAM_KEEPALIVE_S,
    RequestIdError,
    check_request_id,
    nginx_conf,
    upstream_host,
)
from leanrec.serve.workers import THREAD_VARIABLES, _worker_environment, serve_one
from leanrec.world import USER_SALT

SMALL = {"n_users": 400, "n_items": 3_000}
USERS = scrambled_ids(SMALL["n_users"], USER_SALT)


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(create_app(ServeConfig(**SMALL))) as c:
        yield c


def rank(client: TestClient, headers: dict[str, str | bytes] | None = None, user: int = 3):
    return client.post("/v1/rank", json={"user_id": int(USERS[user])}, headers=headers or {})


def views(body: dict, positions: range) -> list[dict]:
    now = SystemClock().now_ms()
    return [{"position": p, "item_id": body["items"][p], "kind": "view", "ts_ms": now + p} for p in positions]


def sample(client: TestClient, name: str) -> float:
    text = client.get("/metrics").text
    return sum(
        s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == f"{name}_total"
    )


def test_rank_takes_the_request_id_the_header_chose_and_its_later_calls_go_on_with_it(client) -> None:
    r = rank(client, {REQUEST_ID_HEADER: "0f3a9c2b7d1e4f5a8b6c0d2e4f6a8b0c"})  # nginx's $request_id
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["request_id"] == "0f3a9c2b7d1e4f5a8b6c0d2e4f6a8b0c"
    auth = {"request_id": body["request_id"], "token": body["token"]}
    routed = {REQUEST_ID_HEADER: body["request_id"]}
    r = client.post("/v1/paginate", json={**auth, "seen_up_to": 10}, headers=routed)
    assert r.status_code == 200 and r.json()["pages_logged"] == 1
    r = client.post(
        "/v1/events", json={**auth, "batch_id": "b1", "events": views(body, range(8))}, headers=routed
    )
    assert r.status_code == 200 and r.json()["accepted"] == 8
    # Without the header (one process, no balancer) the calls go on as before.
    r = client.post("/v1/paginate", json={**auth, "seen_up_to": 20})
    assert r.status_code == 200 and r.json()["pages_logged"] == 1
    assert sample(client, "leanrec_signals_without_context") == 0
    # Ids drawn by the service are unchanged.
    assert re.fullmatch(r"[0-9a-f]{16}", rank(client).json()["request_id"])


def test_paginate_and_events_refuse_a_header_that_names_another_request(client) -> None:
    body = rank(client).json()
    auth = {"request_id": body["request_id"], "token": body["token"]}
    other = {REQUEST_ID_HEADER: "someone-else"}
    r = client.post("/v1/paginate", json={**auth, "seen_up_to": 10}, headers=other)
    assert r.status_code == 400
    assert "names request 'someone-else' but the body names" in r.json()["error"]
    plain = {**auth, "batch_id": "b1", "events": views(body, range(3))}
    assert client.post("/v1/events", json=plain, headers=other).status_code == 400
    # A body the lean path leaves to FastAPI's checks (an item id as a string) is refused the same way.
    odd = {**auth, "batch_id": "b2", "events": [{**views(body, range(1))[0], "item_id": "x"}]}
    r = client.post("/v1/events", json=odd, headers=other)
    assert r.status_code == 400 and REQUEST_ID_HEADER in r.json()["error"]
    # Nothing was logged or accepted by the refused calls.
    assert sample(client, "leanrec_pages_on_signal") == 0
    assert sample(client, "leanrec_events_accepted") == 0


@pytest.mark.parametrize("bad", ["", "a" * 65, "lr:{x}", "a|b", "é".encode()])
def test_rank_refuses_a_header_that_cannot_name_a_request(client, bad: str | bytes) -> None:
    r = rank(client, {REQUEST_ID_HEADER: bad})
    assert r.status_code == 422, r.text
    assert "letters, digits" in r.json()["error"]


def test_rank_refuses_an_id_that_names_a_ranking_the_process_still_holds(client) -> None:
    first = rank(client, {REQUEST_ID_HEADER: "req-1"})
    assert first.status_code == 200
    client.app.state.leanrec.lane.drain()  # type: ignore[attr-defined]
    again = rank(client, {REQUEST_ID_HEADER: "req-1"}, user=5)
    assert again.status_code == 409 and "still holds" in again.json()["error"]
    # The first ranking is intact: its token still opens its later calls.
    auth = {"request_id": "req-1", "token": first.json()["token"]}
    assert client.post("/v1/paginate", json={**auth, "seen_up_to": 10}).json()["pages_logged"] == 1


def test_the_sidecar_and_the_library_log_under_a_chosen_id(
    tmp_path: Path, shop_toml: str, shop_features
) -> None:
    (tmp_path / "shop.toml").write_text(shop_toml)
    rng = np.random.default_rng(3)
    items = np.arange(1, 31, dtype=np.int64)
    feats = shop_features(rng, items)
    config = ServeConfig(featureset=str(tmp_path / "shop.toml"))
    with TestClient(create_app(config)) as sidecar:
        body = {
            "user_id": 9,
            "items": items.tolist(),
            "features": {k: np.asarray(v).tolist() for k, v in feats.items()},
        }
        r = sidecar.post("/v1/log", json=body, headers={REQUEST_ID_HEADER: "order-77"})
        assert r.status_code == 200, r.text
        assert r.json()["request_id"] == "order-77"
        r = sidecar.post("/v1/log", json=body, headers={REQUEST_ID_HEADER: "no spaces"})
        assert r.status_code == 422
    log = leanrec.open_logging(tmp_path / "shop.toml")
    logged = log.ranked(9, items, feats, request_id="call-0042")
    assert logged.request_id == "call-0042"
    assert log.paginate("call-0042", logged.token, 20) == 2
    with pytest.raises(RequestIdError, match="still holds"):
        log.ranked(9, items, feats, request_id="call-0042")
    with pytest.raises(RequestIdError, match="letters, digits"):
        log.ranked(9, items, feats, request_id="a b")


def test_check_request_id_takes_what_keys_and_tokens_can_hold() -> None:
    assert check_request_id("A-z_09") == "A-z_09"
    assert check_request_id("f" * 64) == "f" * 64
    for bad in ("", "f" * 65, "a}b", "a.b", "a b"):
        with pytest.raises(RequestIdError):
            check_request_id(bad)


def test_the_nginx_config_hashes_every_process_on_the_header() -> None:
    conf = nginx_conf([("127.0.0.1", 8001), ("127.0.0.1", 8002), ("127.0.0.1", 8003)], 8000)
    upstream = conf[conf.index("upstream leanrec") :]
    upstream = upstream[: upstream.index("}")]
    assert "hash $leanrec_request_id consistent;" in upstream
    assert re.findall(r"server (\S+);", upstream) == ["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"]
    assert "listen 127.0.0.1:8000;" in conf
    assert f"proxy_set_header {REQUEST_ID_HEADER} $leanrec_request_id;" in conf
    assert conf.count('if ($http_x_leanrec_request_id = "")') == 2  # paginate and events need it
    # nginx lets an idle connection go before the process would close it under a call (a 502).
    idle = int(re.search(r"keepalive_timeout (\d+)s;", upstream).group(1))
    assert idle == UPSTREAM_KEEPALIVE_S < PROCESS_KEEP_ALIVE_S


def test_a_serving_process_keeps_idle_connections_longer_than_nginx(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    seen: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    serve_one(ServeConfig(port=8001))
    assert seen["port"] == 8001 and seen["timeout_keep_alive"] == PROCESS_KEEP_ALIVE_S > UPSTREAM_KEEPALIVE_S


def test_serve_refuses_workers_it_cannot_place(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--workers", "3", "--port", "65534"]) == 2
    assert "need ports up to 65536" in capsys.readouterr().err
    conf = tmp_path / "nginx.conf"
    argv = ["serve", "--workers", "2", "--port", "18401", "--nginx-conf", str(conf), "--nginx-port", "18402"]
    assert main(argv) == 2
    assert "is a worker's port" in capsys.readouterr().err
    assert main(["serve", "--context-max-bytes", "0"]) == 2
    assert "context_max_bytes must be positive" in capsys.readouterr().err


def test_wildcard_hosts_are_reached_on_loopback_and_ipv6_is_bracketed() -> None:
    conf = nginx_conf([(upstream_host("0.0.0.0"), 8001), (upstream_host("::"), 8002)], 8000, "::")
    assert "server 127.0.0.1:8001;" in conf and "server [::1]:8002;" in conf
    assert "listen [::]:8000;" in conf


def test_workers_share_the_cores_among_their_blas_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    cores = len(os.sched_getaffinity(0))
    with _worker_environment(2):
        assert {os.environ[n] for n in THREAD_VARIABLES} == {str(max(1, cores // 2))}
    assert not any(n in os.environ for n in THREAD_VARIABLES)  # the parent's own environment is back
    with _worker_environment(4 * cores):
        assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stands
    with _worker_environment(2):
        assert os.environ["OMP_NUM_THREADS"] == "3" and "OPENBLAS_NUM_THREADS" not in os.environ
