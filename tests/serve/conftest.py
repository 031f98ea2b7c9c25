"""A dedicated ``redis-server`` for the serving tests, which stop and restart it at will.

The shared server on 6379 is left alone: these tests kill their Redis mid-run, so they get their own,
on a free port, without persistence, started once per session and emptied before each test.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import redis

from leanrec.ids import scrambled_ids
from leanrec.warehouse.store import ParquetWarehouse, WarehouseError
from leanrec.warehouse.tables import TableLayout
from leanrec.world import USER_SALT, WorldConfig, default_featureset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_redis_server() -> str:
    """Path of ``redis-server``; skip without it, or fail if the environment variable CI is set."""
    path = shutil.which("redis-server")
    if path is None:
        message = "redis-server is not installed: the serving tests need a Redis they can stop and restart"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


class RedisServer:
    """A ``redis-server`` subprocess on one port, which can be stopped and started again on it.

    Attributes:
        port: Its TCP port on 127.0.0.1 (kept across restarts).
        host: Always ``127.0.0.1``.

    """

    host = "127.0.0.1"

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary, self.workdir = binary, workdir
        self.port = _free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "redis.log"

    def url(self, db: int = 0) -> str:
        """``redis://127.0.0.1:<port>/<db>``."""
        return f"redis://{self.host}:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        """A client with short timeouts (close it when done)."""
        return redis.Redis(host=self.host, port=self.port, db=db, socket_timeout=2, socket_connect_timeout=1)

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _ping(self) -> bool:
        client = redis.Redis(host=self.host, port=self.port, socket_timeout=0.2, socket_connect_timeout=0.2)
        try:
            return bool(client.ping())
        except redis.exceptions.RedisError:
            return False
        finally:
            client.close()

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server on its port and wait until it answers PING."""
        if self.running:
            return
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.workdir),
            "--logfile", str(self.log),
        ]  # fmt: skip
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = self.log.read_text()[-2000:] if self.log.exists() else ""
                raise RuntimeError(f"redis-server on port {self.port} exited at start:\n{tail}")
            if self._ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING in {timeout_s} s")

    def stop(self, kill: bool = False) -> None:
        """Stop the server (SIGTERM, or SIGKILL if ``kill``) and wait until its port refuses."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            if kill:
                self._proc.kill()
            else:
                self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._proc = None

    def pause(self) -> None:
        """SIGSTOP: the server hangs (connections are accepted by the kernel, nothing answers)."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Stop, then start again on the same port (empty: nothing is persisted)."""
        self.stop()
        self.start()

    def flushall(self) -> None:
        """Empty every database of this (dedicated) server."""
        client = self.client()
        try:
            client.flushall()
        finally:
            client.close()


@pytest.fixture(scope="session")
def _redis_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    binary = require_redis_server()
    server = RedisServer(binary, tmp_path_factory.mktemp("redis"))
    for attempt in range(3):  # another process may take the free port before redis binds it
        try:
            server.start()
            break
        except RuntimeError:
            if attempt == 2:
                raise
            server.port = _free_port()
    try:
        yield server
    finally:
        server.stop(kill=True)


@pytest.fixture
def redis_server(_redis_session: RedisServer) -> Iterator[RedisServer]:
    """The dedicated Redis, running and empty; a test may stop and restart it (same port)."""
    _redis_session.start()
    _redis_session.flushall()
    yield _redis_session
    _redis_session.start()  # a test that stopped it leaves it running for the next


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of database 0 of the dedicated, empty Redis."""
    return redis_server.url(0)


# ------------------------------------------------------------------------------------ seeded traffic
LABEL_NAMES = ("click", "like", "share", "hide")


@dataclass
class Traffic:
    """Seeded client sessions against a service, and the examples a join of them must produce.

    Each session ranks, then reports views of its first ``depth`` positions (and clicks, likes,
    shares, hides and watch times) in batches sent out of order, some sent twice under a new batch id,
    some after a pagination signal and some without one (a fast scroll: the pages are logged on touch).

    Attributes:
        client: An httpx-like client of the service (``TestClient``, or ``httpx.Client`` with a base URL).
        seed: Seeds the users, depths and engagement.
        expected: ``(request_id, position)`` -> ``item_id`` and labels, one entry per viewed item.

    """

    client: Any
    seed: int
    n_users: int = 400
    expected: dict[tuple[str, int], dict[str, int]] = field(default_factory=dict)
    request_ids: list[str] = field(default_factory=list)
    batches: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.user_ids = scrambled_ids(self.n_users, USER_SALT)  # the synthetic world's raw user ids

    def rank(self) -> dict[str, Any]:
        """One ranking (for a user drawn among the world's, by raw id); the response body."""
        user = int(self.user_ids[int(self.rng.integers(0, self.n_users))])
        r = self.client.post("/v1/rank", json={"user_id": user, "surface": int(self.rng.integers(0, 3))})
        assert r.status_code == 200, r.text
        return r.json()

    def session(self) -> str:
        """Rank, scroll, report events; returns the request id."""
        body = self.rank()
        rid, items = body["request_id"], body["items"]
        auth = {"request_id": rid, "token": body["token"]}
        rng = self.rng
        depth = int(min(len(items), rng.geometric(0.2)))
        if rng.random() < 0.1:
            depth = int(rng.integers(20, len(items) + 1))  # the long tail reads deep
        now = time.time_ns() // 1_000_000
        per_position: dict[int, list[dict[str, Any]]] = {}
        for p in range(depth):
            item = int(items[p])
            evs = [{"position": p, "item_id": item, "kind": "view", "ts_ms": now + p}]
            for name, prob in zip(LABEL_NAMES, (0.25, 0.1, 0.05, 0.05), strict=True):
                if rng.random() < prob:
                    evs.append({"position": p, "item_id": item, "kind": name, "ts_ms": now + p + 1})
            if any(e["kind"] == "click" for e in evs):
                evs.append(
                    {"position": p, "item_id": item, "kind": "watch", "ts_ms": now + p + 2,
                     "value": float(rng.integers(1, 60_000))}
                )  # fmt: skip
            per_position[p] = evs
            self.expected[(rid, p)] = {
                "item_id": item,
                **{name: int(any(e["kind"] == name for e in evs)) for name in LABEL_NAMES},
                "watch_ms": int(max((e.get("value", 0) for e in evs if e["kind"] == "watch"), default=0)),
            }
        chunks = [list(range(s, min(s + 4, depth))) for s in range(0, depth, 4)]
        fast = rng.random() < 0.5  # a fast scroll sends no pagination signal
        order = rng.permutation(len(chunks))  # batches arrive out of order
        for k in order:
            chunk = chunks[int(k)]
            if not fast:
                r = self.client.post("/v1/paginate", json={**auth, "seen_up_to": chunk[-1]})
                assert r.status_code == 200, r.text
            events = [e for p in chunk for e in per_position[p]]
            rng.shuffle(events)
            self.send(auth, events)
            if rng.random() < 0.1:
                self.send(auth, events)  # the same events again under a new batch id: joins are idempotent
        self.request_ids.append(rid)
        return rid

    def send(self, auth: dict[str, str], events: list[dict[str, Any]]) -> None:
        """Send one batch; it must be accepted whole."""
        r = self.client.post("/v1/events", json={**auth, "batch_id": uuid.uuid4().hex, "events": events})
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == len(events), r.text
        self.batches[auth["request_id"]] = self.batches.get(auth["request_id"], 0) + 1

    def run(self, n: int) -> list[str]:
        """``n`` sessions; their request ids."""
        return [self.session() for _ in range(n)]

    def expected_for(self, request_ids: Iterable[str]) -> dict[tuple[str, int], dict[str, int]]:
        """The expected examples of some requests only."""
        want = set(request_ids)
        return {k: v for k, v in self.expected.items() if k[0] in want}


def warehouse_examples(uri: str | Path, n_users: int = 400, n_items: int = 3_000, seed: int = 7) -> pa.Table:
    """Every committed example of a request-level warehouse, as impression rows (empty if none)."""
    fs, _ = default_featureset(WorldConfig(n_users=n_users, n_items=n_items, seed=seed))
    wh = ParquetWarehouse(str(uri), fs, TableLayout.REQUEST)
    try:
        return wh.read_examples()
    except WarehouseError:
        return pa.table({"request_id": pa.array([], pa.string()), "position": pa.array([], pa.int16())})


def compare_examples(table: pa.Table, expected: dict[tuple[str, int], dict[str, int]]) -> None:
    """Assert the table holds exactly the expected examples, each once, with the expected labels."""
    keys = list(
        zip(table.column("request_id").to_pylist(), table.column("position").to_pylist(), strict=True)
    )
    twice = {k: n for k, n in Counter(keys).items() if n > 1}
    assert not twice, f"{len(twice)} examples written more than once, e.g. {list(twice.items())[:3]}"
    missing = set(expected) - set(keys)
    extra = set(keys) - set(expected)
    assert not missing, f"{len(missing)} examples missing, e.g. {sorted(missing)[:3]}"
    assert not extra, f"{len(extra)} unexpected examples, e.g. {sorted(extra)[:3]}"
    cols = {name: table.column(name).to_pylist() for name in ("item_id", *LABEL_NAMES, "watch_ms")}
    for i, k in enumerate(keys):
        got = {name: int(values[i]) for name, values in cols.items()}
        assert got == expected[k], f"example {k}: got {got}, expected {expected[k]}"


@pytest.fixture
def traffic() -> type[Traffic]:
    """The :class:`Traffic` class (fixtures are how tests here share helpers)."""
    return Traffic


@pytest.fixture
def examples() -> tuple[Any, Any]:
    """``(warehouse_examples, compare_examples)``."""
    return warehouse_examples, compare_examples


# ------------------------------------------------------------------ a FeatureSet of a shop's own
# It shares no feature name with the synthetic world's: nothing may work only because names match.
SHOP_FEATURESET = """
name = "shop"
version = 1

[[features]]
name = "region"
owner = "user"
kind = "sparse"
rows = 30

[[features]]
name = "taste"
owner = "user"
kind = "dense"
size = 8
space = "tt"

[[features]]
name = "bought"
owner = "user"
kind = "sequence"
size = 12
rows = 5000
role = "history"

[[features]]
name = "hour"
owner = "context"
kind = "sparse"
rows = 24

[[features]]
name = "sku"
owner = "item"
kind = "sparse"
rows = 5000
role = "item_id"

[[features]]
name = "price"
owner = "item"
kind = "dense"

[[features]]
name = "look"
owner = "item"
kind = "dense"
size = 8
space = "tt"
"""


@pytest.fixture
def shop_toml() -> str:
    """A FeatureSet file's text: a shop's user, context and item features, with history and item id."""
    return SHOP_FEATURESET


def _shop_features(rng: np.random.Generator, items: np.ndarray) -> dict[str, np.ndarray]:
    n = len(items)
    return {
        "region": np.array(rng.integers(30)),
        "taste": rng.normal(size=8).astype(np.float32),
        "bought": np.where(np.arange(12) < 7, rng.integers(5000, size=12), -1),
        "hour": np.array([13]),
        "sku": items,
        "price": rng.gamma(2.0, 10.0, size=n),  # float64: dense features take any real numbers
        "look": rng.normal(size=(n, 8)).astype(np.float32),
    }


@pytest.fixture
def shop_features() -> Callable[[np.random.Generator, np.ndarray], dict[str, np.ndarray]]:
    """Draws every feature of ``shop_toml`` for a ranked list of item ids, as a ranker would hold them."""
    return _shop_features
