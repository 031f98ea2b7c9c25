"""Several ``leanrec serve`` processes behind a real nginx: every label joins, and each process ranks.

``leanrec serve --workers N --nginx-conf FILE`` starts N processes on consecutive ports and writes the
nginx config; nginx runs from its own folder (as ``nobody`` when the tests run as root), on a free
port, and the simulated clients of ``leanrec simulate`` drive it. With lazy logging each request's
frozen features wait in the process that ranked it, so a paginate or events call that reached another
process would lose the labels of the pages it should have logged: the joiner would count them. A
round-robin nginx in front of the same processes shows that loss, so the routed runs' zero is a
measured zero.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from leanrec.join.worker import build_joiner
from leanrec.serve.config import ServeConfig
from leanrec.serve.nginx import Nginx
from leanrec.serve.routing import REQUEST_ID_HEADER
from leanrec.sim.client import SimReport, simulate
from leanrec.world import WorldConfig

WORLD = {"n_users": 400, "n_items": 3_000}
WINDOW_MS, LATENESS_MS = 1_500, 500
SESSIONS = 200


def nginx_binary() -> str:
    """Path of ``nginx`` (in /usr/sbin on Debian); skip without it, or fail if the variable CI is set."""
    path = shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if path is None:
        message = "nginx is not installed (apt-get install nginx): the scale-out tests run a real one"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_ports(n: int) -> list[int]:
    """``n`` consecutive ports that are free now on 127.0.0.1."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + n > 65_535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + n):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return list(range(base, base + n))
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports")


def metrics(port: int) -> dict[str, float]:
    """One process's leanrec_* samples, summed over labels but ``why``."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("leanrec_") and not s.name.endswith(("_bucket", "_created")):
                name = f"{s.name}{{{s.labels['why']}}}" if "why" in s.labels else s.name
                out[name] = out.get(name, 0.0) + s.value
    return out


class Workers:
    """``leanrec serve --workers N --nginx-conf FILE`` as a subprocess, until every worker answers."""

    def __init__(self, n: int, url: str, conf: Path, nginx_port: int, log: Path, **settings: int) -> None:
        self.ports = free_ports(n)
        args = [
            sys.executable, "-m", "leanrec.cli", "serve", "--workers", str(n), "--port", str(self.ports[0]),
            "--nginx-conf", str(conf), "--nginx-port", str(nginx_port), "--store-url", url, "--bus-url", url,
            "--n-users", str(WORLD["n_users"]), "--n-items", str(WORLD["n_items"]),
            "--window-ms", str(WINDOW_MS), "--lateness-ms", str(LATENESS_MS),
        ]  # fmt: skip
        for name, value in settings.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        self.log = log
        env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1"}
        with log.open("wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while f"all {n} workers answer" not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"leanrec serve --workers {n} did not come up:\n{self.output()}")
            time.sleep(0.1)
        self.pids = [int(p) for p in re.findall(r"worker \d+: pid (\d+)", self.output())]

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout=10)


@pytest.fixture
def nginx_folder() -> Iterator[Path]:
    """A folder of nginx's own, outside pytest's (private to root) temporary tree."""
    folder = Path(tempfile.mkdtemp(prefix="leanrec-nginx-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def join_all(config: ServeConfig, ranked: int, timeout: float = 60.0) -> tuple[int, int, int]:
    """Join until ``ranked`` requests are joined; (requests joined, examples, labels lost)."""
    joiner, _ = build_joiner(config)
    deadline = time.monotonic() + timeout
    while joiner.stats.requests_joined < ranked and time.monotonic() < deadline:
        joiner.poll()
        if joiner.join_due():
            joiner.flush()
        time.sleep(0.1)
    joiner.flush()
    js = joiner.stats
    return js.requests_joined, js.examples, js.labels_lost


def run_traffic(port: int, seed: int) -> SimReport:
    world = WorldConfig(n_users=WORLD["n_users"], n_items=WORLD["n_items"], seed=7)
    report = simulate(f"http://127.0.0.1:{port}", SESSIONS, 8, 60.0, seed, world)
    assert report.sessions_failed == 0, report.status
    assert report.requests == SESSIONS
    assert all(key.endswith(" 200") for key in report.status), report.status
    return report


@pytest.mark.parametrize(("n", "context_max_bytes"), [(2, 512 << 20), (4, 512 << 10)])
def test_processes_behind_nginx_lose_no_label_and_each_ranks_and_holds_within_its_bound(
    n: int, context_max_bytes: int, redis_server, nginx_folder: Path, tmp_path: Path
) -> None:
    binary = nginx_binary()
    url = redis_server.url(0)
    (nginx_port,) = free_ports(1)
    conf = nginx_folder / "nginx.conf"
    workers = Workers(n, url, conf, nginx_port, tmp_path / "serve.log", context_max_bytes=context_max_bytes)
    nginx = None
    try:
        assert len(workers.pids) == n and len(set(workers.pids)) == n
        assert "hash $leanrec_request_id consistent;" in conf.read_text()
        nginx = Nginx(binary, nginx_folder, conf)
        nginx.wait_listening(nginx_port)

        # A paginate call that names no request in the header cannot be routed: nginx refuses it.
        r = httpx.post(f"http://127.0.0.1:{nginx_port}/v1/paginate", json={"request_id": "x", "token": "y"})
        assert r.status_code == 400 and REQUEST_ID_HEADER in r.json()["error"]

        report = run_traffic(nginx_port, seed=11)
        per_process = [metrics(p) for p in workers.ports]
        ranked = [m["leanrec_ranked_requests_total"] for m in per_process]
        assert all(k > 0 for k in ranked), f"a process ranked nothing: {ranked}"
        assert sum(ranked) == SESSIONS
        for m in per_process:  # each process's contexts stay within its own byte bound
            assert m["leanrec_context_bytes_max"] == context_max_bytes
            assert 0 < m["leanrec_context_bytes_peak"] <= context_max_bytes
            assert m["leanrec_signals_without_context_total"] == 0  # every signal found its context
        if context_max_bytes < 2 << 20:  # the bound was reached, and what it pushed out was finished
            assert all(m["leanrec_contexts_released_total{evicted}"] > 0 for m in per_process)

        config = ServeConfig(
            store_url=url, bus_url=url, window_ms=WINDOW_MS, lateness_ms=LATENESS_MS,
            warehouse=str(tmp_path / "warehouse"), **WORLD,
        )  # fmt: skip
        joined, examples, lost = join_all(config, SESSIONS)
        assert joined == SESSIONS
        assert lost == 0
        assert examples == report.viewed  # every viewed item is an example

        if n == 2:  # the same processes behind round robin: the later calls land anywhere, labels are lost
            nginx.stop()
            text = conf.read_text().replace("hash $leanrec_request_id consistent;", "")
            conf.write_text(text)
            nginx = Nginx(binary, nginx_folder, conf)
            nginx.wait_listening(nginx_port)
            report = run_traffic(nginx_port, seed=12)
            joined, examples, lost = join_all(
                dataclasses.replace(config, warehouse=str(tmp_path / "warehouse-rr")), SESSIONS
            )
            assert joined == SESSIONS
            assert lost > 0 and examples < report.viewed
            assert sum(metrics(p)["leanrec_signals_without_context_total"] for p in workers.ports) > 0
    finally:
        if nginx is not None:
            nginx.stop()
        code = workers.stop()
    assert code == 0, workers.output()
