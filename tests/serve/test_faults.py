"""Faults on a real Redis, with real processes: a joiner killed mid-run, a joiner drained by SIGTERM,
a crash between commit and acknowledgement, and Redis going away while the service ranks.

The serving side runs in process (``TestClient``) on the dedicated Redis; joiners run as
``leanrec join`` subprocesses on the same Redis, as they would beside ``leanrec serve``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from leanrec.clock import ManualClock
from leanrec.ids import scrambled_ids
from leanrec.join.worker import build_joiner
from leanrec.serve.app import create_app
from leanrec.serve.config import ServeConfig
from leanrec.world import USER_SALT

WORLD = {"n_users": 400, "n_items": 3_000}
USERS = scrambled_ids(WORLD["n_users"], USER_SALT)
"""The synthetic world's raw user ids: user ``k`` (a row of the world) is ``USERS[k]``."""
WINDOW_MS, LATENESS_MS = 1_500, 500
SETTLE_MS = 2_000  # LabelJoiner's default settle: a request is joined window + lateness + settle after it
JOIN_DELAY_S = (WINDOW_MS + LATENESS_MS + SETTLE_MS) / 1000


def serve_config(url: str, warehouse: Path, **over: Any) -> ServeConfig:
    settings = {"window_ms": WINDOW_MS, "lateness_ms": LATENESS_MS, "poll_ms": 100, **WORLD, **over}
    return ServeConfig(store_url=url, bus_url=url, warehouse=str(warehouse), **settings)


class Joiner:
    """A ``leanrec join`` subprocess; its output goes to a file."""

    def __init__(self, config: ServeConfig, log: Path) -> None:
        args = [
            sys.executable, "-m", "leanrec.cli", "join",
            "--store-url", config.store_url, "--bus-url", config.bus_url,
            "--n-users", str(config.n_users), "--n-items", str(config.n_items), "--seed", str(config.seed),
            "--window-ms", str(config.window_ms), "--lateness-ms", str(config.lateness_ms),
            "--warehouse", config.warehouse, "--consumer", config.consumer, "--poll-ms", str(config.poll_ms),
        ]  # fmt: skip
        self.log = log
        env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1"}
        with log.open("wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        return self.log.read_text()

    def kill(self) -> None:
        """SIGKILL: no chance to flush, ack or clean up."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def term(self, timeout: float = 15.0) -> int:
        """SIGTERM, then wait for the drain; the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop_quietly(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def report(self) -> dict[str, int]:
        """The numbers of its closing line (``stopped: took over N pending, joined R requests, ...``)."""
        m = re.search(
            r"took over (\d+) pending, joined (\d+) requests, (\d+) examples, (\d+) labels lost, (\d+) files",
            self.output(),
        )
        assert m, f"no closing report in the joiner's output:\n{self.output()}"
        names = ("recovered", "requests_joined", "examples", "labels_lost", "files")
        return dict(zip(names, map(int, m.groups()), strict=True))


@pytest.fixture
def joiners(tmp_path: Path) -> Iterator[Callable[[ServeConfig], Joiner]]:
    started: list[Joiner] = []

    def start(config: ServeConfig) -> Joiner:
        j = Joiner(config, tmp_path / f"joiner-{len(started)}.log")
        started.append(j)
        return j

    yield start
    for j in started:
        j.stop_quietly()


def group_state(client: redis.Redis) -> dict[str, int]:
    """``pending`` (delivered, not acked) and ``lag`` (not delivered yet) of the joiners' group."""
    groups = client.xinfo_groups("lr:opened")
    if not groups:  # the stream was recreated (Redis came back empty) and no joiner has read it yet
        return {"pending": -1, "lag": -1}
    g = {(k.decode() if isinstance(k, bytes) else k): v for k, v in groups[0].items()}
    return {"pending": int(g["pending"]), "lag": int(g.get("lag") or 0)}


def parquet_files(warehouse: Path) -> list[Path]:
    return [p for p in warehouse.rglob("*.parquet") if not p.name.startswith(".")]


def all_joined(r: redis.Redis, warehouse: Path, n: int, read: Callable[..., Any]) -> Callable[[], bool]:
    """Whether nothing is pending in the group and the warehouse holds ``n`` examples."""
    return lambda: group_state(r)["pending"] == 0 and read(warehouse, **WORLD).num_rows == n


def wait_for(check: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# -------------------------------------------------------------------------------- (a) joiner faults
def test_sigkilled_joiner_restarted_writes_each_example_exactly_once(
    redis_server, tmp_path: Path, traffic, examples, joiners
) -> None:
    """SIGKILL the joiner twice mid-run, restart it each time: the warehouse ends exactly as expected."""
    read_examples, compare = examples
    warehouse = tmp_path / "wh"
    config = serve_config(redis_server.url(0), warehouse)
    r = redis_server.client()
    with TestClient(create_app(config)) as client:
        t = traffic(client, seed=21)
        joiner = joiners(config)
        kills: list[tuple[int, int]] = []  # (requests in the warehouse, requests ranked) at each kill
        files_before = 0  # committed files when the running worker started
        started = time.monotonic()
        # Traffic goes on while the joiner works: it is killed right after each of its first two commits
        # (it may not have acked or deleted yet), and each time later requests are still unjoined.
        while len(kills) < 2 and time.monotonic() - started < 20:
            t.run(2)
            if len(parquet_files(warehouse)) > files_before:
                joiner.kill()
                files_before = len(parquet_files(warehouse))
                joined = len(set(read_examples(warehouse, **WORLD).column("request_id").to_pylist()))
                kills.append((joined, len(t.request_ids)))
                joiner = joiners(config)  # restarted under the same consumer name
        t.run(20)  # and some more after the last restart
        last_rank = time.monotonic()
        assert len(kills) == 2, f"the joiner committed too little to be killed twice: {kills}"
        assert all(0 < joined < ranked for joined, ranked in kills), kills  # killed mid-run
        done_at = last_rank + JOIN_DELAY_S
        wait_for(
            lambda: time.monotonic() > done_at and group_state(r) == {"pending": 0, "lag": 0},
            timeout=JOIN_DELAY_S + 20,
            what="the restarted joiner to join and ack everything",
        )
        assert joiner.term() == 0, joiner.output()
    table = read_examples(warehouse, **WORLD)
    compare(table, t.expected)  # none missing, none twice, identical labels
    rep = joiner.report()
    assert rep["labels_lost"] == 0
    assert rep["recovered"] > 0  # the last worker took over what the killed one held
    assert len(set(table.column("request_id").to_pylist())) == len(t.request_ids)
    r.close()


def test_sigterm_drains_the_joiner(redis_server, tmp_path: Path, traffic, examples, joiners) -> None:
    """SIGTERM: exit 0, everything joined so far committed and acked; the rest pending for the next worker."""
    read_examples, compare = examples
    warehouse = tmp_path / "wh"
    config = serve_config(redis_server.url(0), warehouse)
    r = redis_server.client()
    with TestClient(create_app(config)) as client:
        t = traffic(client, seed=22)
        joiner = joiners(config)
        first = t.run(12)
        time.sleep(1.5)  # the second wave is due 1.5 s after the first
        second = t.run(12)
        want_first = t.expected_for(first)
        wait_for(
            lambda: read_examples(warehouse, **WORLD).num_rows >= len(want_first),
            timeout=JOIN_DELAY_S + 15,
            what="the first wave to be joined",
            every=0.1,
        )
        assert joiner.term() == 0, joiner.output()  # normally before the second wave is due
        rep = joiner.report()
        table = read_examples(warehouse, **WORLD)
        joined = set(table.column("request_id").to_pylist())
        assert joined >= set(first)
        assert rep["requests_joined"] == len(joined), joiner.output()
        assert rep["examples"] == table.num_rows
        compare(table, t.expected_for(joined))  # what it joined is committed, each once
        left = len(first) + len(second) - len(joined)
        assert left > 0, "the joiner took so long to stop that it joined everything"
        assert group_state(r) == {"pending": left, "lag": 0}  # what it joined is acked; the rest waits
        nxt = joiners(config)
        wait_for(
            all_joined(r, warehouse, len(t.expected), read_examples),
            JOIN_DELAY_S + 15,
            "the next worker",
            every=0.1,
        )
        assert nxt.term() == 0, nxt.output()
        assert nxt.report()["recovered"] == left
    compare(read_examples(warehouse, **WORLD), t.expected)
    r.close()


def test_crash_between_commit_and_ack_is_not_joined_twice(
    redis_server, tmp_path: Path, traffic, examples, joiners
) -> None:
    """A worker dies after committing some records (not acked) and after joining others (not committed)."""
    read_examples, compare = examples
    warehouse = tmp_path / "wh"
    config = serve_config(redis_server.url(0), warehouse)
    r = redis_server.client()
    with TestClient(create_app(config)) as client:
        t = traffic(client, seed=23)
        first = t.run(10)
        second = t.run(10)
    dead, wh = build_joiner(config)  # consumer "joiner-1", like the subprocess below
    clock = ManualClock(0)
    dead.clock = clock
    dead.recover()
    dead.poll()
    last_first = max(ts for ts, rid in dead._due if rid in set(first))
    clock.set(last_first)
    assert dead.join_due() == len(first)
    assert len(wh.flush()) >= 1  # committed, but the worker dies before acking and deleting
    clock.set(10**13)
    assert dead.join_due() == len(second)  # joined, but the worker dies before committing
    assert group_state(r) == {"pending": len(first) + len(second), "lag": 0}
    compare(read_examples(warehouse, **WORLD), t.expected_for(first))
    joiner = joiners(config)
    wait_for(
        all_joined(r, warehouse, len(t.expected), read_examples),
        JOIN_DELAY_S + 15,
        "the restarted worker",
        every=0.1,
    )
    assert joiner.term() == 0, joiner.output()
    rep = joiner.report()
    assert rep["recovered"] == len(first) + len(second)
    assert rep["requests_joined"] == len(second)  # the committed ones were acknowledged, not joined again
    compare(read_examples(warehouse, **WORLD), t.expected)
    r.close()


def test_the_joiner_rides_out_redis_hanging_and_restarting(
    redis_server, tmp_path: Path, traffic, examples, joiners
) -> None:
    """Redis hangs, then dies and comes back empty, under a running ``leanrec join``: it never exits.

    It says Redis is not answering, waits, and joins what is ranked after Redis is back; what it had
    joined before is committed once, and what comes after is joined whole.
    """
    read_examples, compare = examples
    warehouse = tmp_path / "wh"
    config = serve_config(redis_server.url(0), warehouse)
    r = redis_server.client()
    with TestClient(create_app(config)) as client:
        t = traffic(client, seed=24)
        joiner = joiners(config)
        first = t.run(8)
        wait_for(
            all_joined(r, warehouse, len(t.expected_for(first)), read_examples),
            JOIN_DELAY_S + 15,
            "the first wave to be joined",
            every=0.1,
        )
        redis_server.pause()  # hangs: the worker's calls time out
        time.sleep(1.5)
        redis_server.resume()
        redis_server.stop(kill=True)  # gone: connections refused
        time.sleep(1.0)
        redis_server.start()  # back, empty
        assert joiner.proc.poll() is None, joiner.output()
        t.run(8)
        r = redis_server.client()
        wait_for(
            all_joined(r, warehouse, len(t.expected), read_examples),
            JOIN_DELAY_S + 20,
            "the requests ranked after the outage to be joined",
            every=0.1,
        )
        assert joiner.term() == 0, joiner.output()
    out = joiner.output()
    assert "is not answering" in out and "trying again in" in out
    assert re.search(r"rode out \d+ Redis outages", out), out
    assert joiner.report()["labels_lost"] == 0
    compare(read_examples(warehouse, **WORLD), t.expected)
    r.close()


# ------------------------------------------------------------------------------------ (b) Redis down
def metric(client: TestClient, name: str) -> float:
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name == name and not s.labels:
                return s.value
    raise AssertionError(f"{name} not in /metrics")


def settle(client: TestClient) -> None:
    """Wait until the logging queued so far has run (the app may log a ranking after answering it)."""
    lane = getattr(client.app.state.leanrec, "lane", None)  # type: ignore[attr-defined]
    if lane is not None:
        lane.drain()


def timed_rank(client: TestClient, user: int) -> tuple[dict[str, Any], float]:
    """Rank for the world's user ``user`` (a row; the request names its raw id), timed."""
    t0 = time.perf_counter()
    r = client.post("/v1/rank", json={"user_id": int(USERS[user])})
    elapsed = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    return r.json(), elapsed


@pytest.mark.parametrize("logging_mode", ["lazy", "eager"])
def test_ranking_goes_on_while_redis_is_down(
    redis_server, tmp_path: Path, traffic, logging_mode: str
) -> None:
    url = redis_server.url(0)
    config = serve_config(url, tmp_path / "wh", logging=logging_mode, window_ms=600_000)
    with TestClient(create_app(config)) as client:
        t = traffic(client, seed=24)
        t.run(3)
        assert client.get("/healthz").json()["status"] == "ok"
        assert metric(client, "leanrec_log_write_failures_total") == 0

        redis_server.stop(kill=True)
        down = [timed_rank(client, u) for u in range(8)]
        assert all(len(body["items"]) == 100 for body, _ in down)
        settle(client)
        assert max(s for _, s in down) < 0.5, [round(s, 3) for _, s in down]
        h = client.get("/healthz").json()
        assert h["status"] == "degraded" and h["logging_degraded"] is True
        assert h["backends"]["transient_store"].startswith("down: Redis transient store at")
        assert h["backends"]["event_bus"].startswith("down: Redis event bus at")
        assert h["lost_logging"]["entries"] > 0
        assert h["lost_logging"]["opened_records"] == 8
        failures = metric(client, "leanrec_log_write_failures_total")
        assert failures == h["lost_logging"]["entries"]
        assert metric(client, "leanrec_log_bus_failures_total") == 8
        assert metric(client, "leanrec_logging_degraded") == 1
        body = down[0][0]
        auth = {"request_id": body["request_id"], "token": body["token"]}
        ev = [{"position": 0, "item_id": body["items"][0], "kind": "view", "ts_ms": time.time_ns() // 10**6}]
        r = client.post("/v1/events", json={**auth, "batch_id": "during", "events": ev})
        assert r.status_code == 503 and "send the batch again later" in r.json()["error"]
        r = client.post("/v1/paginate", json={**auth, "seen_up_to": 20})
        assert r.status_code == 200  # the signal is taken
        if logging_mode == "lazy":  # the pages (and request side) it could not log are counted
            assert metric(client, "leanrec_log_write_failures_total") >= failures + 3  # pages 0, 1, 2
        failures = metric(client, "leanrec_log_write_failures_total")

        redis_server.start()  # same port, empty
        up = [timed_rank(client, u) for u in range(5)]
        settle(client)
        assert metric(client, "leanrec_log_write_failures_total") == failures  # no new failures
        store = redis_server.client()
        for body, _ in up:
            rid = body["request_id"]
            if logging_mode == "lazy":
                assert store.exists(f"lr:{{{rid}}}:u", f"lr:{{{rid}}}:p0") == 2
            else:
                assert store.exists(*(f"lr:{{{rid}}}:i{p}" for p in range(100))) == 100
        ranked = 3 + 8 + 5
        if logging_mode == "lazy":  # a rank 1 s later ticks the logger, which resends the 8 refused records
            time.sleep(1.1)
            timed_rank(client, 5)
            settle(client)
            ranked += 1
            assert store.xlen("lr:opened") == 5 + 1 + 8
            lost = client.get("/healthz").json()["lost_logging"]
            assert (lost["opened_records"], lost["opened_records_resent"]) == (8, 8)
            assert metric(client, "leanrec_log_bus_resent_total") == 8
            assert lost["opened_records_never_taken"] == 0
        else:  # eager logging holds nothing to send again: those 8 requests are not joined (counted)
            assert store.xlen("lr:opened") == 5
        h = client.get("/healthz").json()
        assert h["backends"] == {"transient_store": "up", "event_bus": "up"}
        assert h["ranked"] == ranked
        r = client.post("/v1/events", json={**auth, "batch_id": "during", "events": ev})
        assert r.status_code == 200 and r.json()["accepted"] == 1  # the client's retry is taken
        store.close()


def test_ranking_answers_quickly_while_redis_hangs(redis_server, tmp_path: Path) -> None:
    """A hung (SIGSTOPped) Redis: with short client timeouts in the URL, ranking stays fast."""
    url = redis_server.url(0) + "?socket_timeout=0.05&socket_connect_timeout=0.05"
    config = serve_config(url, tmp_path / "wh", window_ms=600_000)
    with TestClient(create_app(config)) as client:
        timed_rank(client, 1)
        redis_server.pause()
        try:
            hung = [timed_rank(client, u)[1] for u in range(3)]
            settle(client)
            assert client.get("/healthz").json()["logging_degraded"] is True
        finally:
            redis_server.resume()
        assert max(hung) < 1.0, hung
        timed_rank(client, 2)
        assert client.get("/healthz").json()["backends"] == {"transient_store": "up", "event_bus": "up"}
