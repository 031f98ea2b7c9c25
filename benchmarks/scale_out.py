"""Several `leanrec serve` processes behind nginx: the same traffic against 1, 2 and 4 of them.

    python benchmarks/scale_out.py [--workers 1,2,4] [--requests 1000] [--concurrency 16] [--repeat 3]

Starts a ``redis-server`` of its own. Then, ``--repeat`` times, for each process count in turn
(interleaved, so drift on a noisy machine hits every count alike): empties Redis, starts
``leanrec serve --workers N --nginx-conf FILE`` (lazy logging, on that Redis) and a real nginx from
the config it wrote (as ``nobody`` when run as root), warms them up, and runs the simulated clients of
``leanrec simulate`` through nginx with the same seed, session count and concurrency. Around the
measured run it reads the CPU time of the serving processes (every worker and the ``leanrec serve``
that started them), of nginx (its master and workers), of Redis and of the client (this process), all
from ``/proc/PID/stat``; after it, a joiner joins every ranked request and counts the labels lost
(viewed items whose frozen features it did not find) against the items the clients viewed.

It prints, per process count, the medians over the repeats: sessions/s, the serving processes' CPU
per session (the sum over them), nginx's, Redis's and the client's CPU per session, the share of the
sessions the busiest and the idlest process ranked, and the labels lost over all repeats. The one
process behind nginx is the baseline: the same traffic, the same routing hop. Exits non-zero if a
label is lost, a session fails or a process ranks nothing. On a machine of two cores the client,
nginx, Redis and the processes share the cores, so more processes than cores add no speed: the table
says what they cost. This is a measurement, never a timed test.

Every serving process runs numpy's BLAS on ``--blas-threads`` threads: 1 by default, for every count
alike, so that the counts differ only in their processes. ``--blas-threads auto`` leaves it to
``leanrec serve``, which gives N > 1 workers ``cores // N`` threads each and leaves one process on
OpenBLAS's own default (a thread per core, whose threads spin while they wait).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from leanrec.join.worker import build_joiner
from leanrec.serve.config import ServeConfig
from leanrec.serve.nginx import Nginx
from leanrec.serve.workers import THREAD_VARIABLES
from leanrec.sim.client import simulate
from leanrec.world import WorldConfig

sys.path.insert(0, str(Path(__file__).parent))
from serve_redis import RedisServer


def free_ports(n: int) -> list[int]:
    """``n`` consecutive ports free now on 127.0.0.1."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        socks = []
        try:
            for port in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return list(range(base, base + n))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise SystemExit(f"no {n} consecutive free ports")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a process, all its threads (Linux ``/proc``); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The children of a process (nginx's workers), from ``/proc``."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


class Workers:
    """``leanrec serve --workers N --nginx-conf FILE``, until every worker answers."""

    def __init__(
        self, args: argparse.Namespace, n: int, url: str, conf: Path, nginx_port: int, log: Path
    ) -> None:
        self.ports = free_ports(n)
        flags = ["serve", "--workers", str(n), "--port", str(self.ports[0]), "--nginx-conf", str(conf)]
        flags += ["--nginx-port", str(nginx_port), "--store-url", url, "--bus-url", url]
        flags += ["--window-ms", str(args.window_ms), "--lateness-ms", str(args.lateness_ms)]
        flags += [
            "--n-users",
            str(args.n_users),
            "--n-items",
            str(args.n_items),
            "--seed",
            str(args.world_seed),
        ]
        self.log = log
        env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
        env.update({"COLUMNS": "250", "NO_COLOR": "1"})
        if args.blas_threads != "auto":  # the same threads for every process count
            env.update(dict.fromkeys(THREAD_VARIABLES, args.blas_threads))
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "leanrec.cli", *flags], stdout=out, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.monotonic() + 180
        waiting = set(self.ports)
        while waiting:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"leanrec serve --workers {n} did not come up:\n{log.read_text()}")
            for port in list(waiting):
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                        waiting.discard(port)
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        workers = [int(p) for p in re.findall(r"worker \d+: pid (\d+)", log.read_text())]
        self.pids = [self.proc.pid, *workers]  # one worker: the command serves in its own process

    def ranked(self) -> list[float]:
        out = []
        for port in self.ports:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            out.append(
                sum(
                    s.value
                    for f in text_string_to_metric_families(text)
                    for s in f.samples
                    if s.name == "leanrec_ranked_requests_total"
                )
            )
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Run:
    """One measured run of one process count."""

    sessions_per_s: float
    serving_cpu_ms: float
    nginx_cpu_ms: float
    redis_cpu_ms: float
    client_cpu_ms: float
    busiest_share: float
    idlest_share: float
    failed: int
    not_ok: dict[str, int]
    unjoined: int
    labels_lost: int
    examples: int
    viewed: int


def join_all(config: ServeConfig, ranked: int, timeout: float = 120.0) -> tuple[int, int, int]:
    """Join until ``ranked`` requests are joined; (requests joined, examples, labels lost)."""
    joiner, _ = build_joiner(config)
    deadline = time.monotonic() + timeout
    while joiner.stats.requests_joined < ranked and time.monotonic() < deadline:
        joiner.poll()
        if joiner.join_due():
            joiner.flush()
        time.sleep(0.1)
    joiner.flush()
    return joiner.stats.requests_joined, joiner.stats.examples, joiner.stats.labels_lost


def measure(
    args: argparse.Namespace, nginx_bin: str, server: RedisServer, n: int, workdir: Path, rep: int
) -> Run:
    server.client.flushall()
    prefix = Path(tempfile.mkdtemp(prefix=f"nginx-{n}-{rep}-", dir=workdir))
    os.chmod(prefix, 0o755)
    (nginx_port,) = free_ports(1)
    log = workdir / f"serve-{n}-{rep}.log"
    workers = Workers(args, n, server.url(), prefix / "nginx.conf", nginx_port, log)
    nginx = None
    try:
        nginx = Nginx(nginx_bin, prefix, prefix / "nginx.conf")
        try:
            nginx.wait_listening(nginx_port)
        except RuntimeError as err:
            raise SystemExit(str(err)) from None
        target = f"http://127.0.0.1:{nginx_port}"
        world = WorldConfig(n_users=args.n_users, n_items=args.n_items, seed=args.world_seed)
        warm = simulate(target, args.warmup, args.concurrency, 600, args.seed + 1, world)
        ranked_before = workers.ranked()
        nginx_pids = [nginx.proc.pid, *children(nginx.proc.pid)]
        groups = {"serving": workers.pids, "nginx": nginx_pids, "redis": [server.proc.pid]}
        before = {k: sum(map(cpu_seconds, pids)) for k, pids in groups.items()}
        client_before = time.process_time()
        report = simulate(target, args.requests, args.concurrency, 600, args.seed, world)
        client_cpu = time.process_time() - client_before
        after = {k: sum(map(cpu_seconds, pids)) for k, pids in groups.items()}
        ranked = [b - a for a, b in zip(ranked_before, workers.ranked(), strict=True)]
        config = ServeConfig(
            store_url=server.url(),
            bus_url=server.url(),
            window_ms=args.window_ms,
            lateness_ms=args.lateness_ms,
            warehouse=str(workdir / f"warehouse-{n}-{rep}"),
            n_users=args.n_users,
            n_items=args.n_items,
            seed=args.world_seed,
        )
        total = warm.requests + report.requests  # every ranked request is joined, the warm-up's too
        joined, examples, lost = join_all(config, total)
    finally:
        if nginx is not None:
            nginx.stop()
        workers.stop()
    sessions = max(report.requests, 1)
    per_ms = {k: (after[k] - before[k]) * 1000 / sessions for k in groups}
    shares = [r / max(sum(ranked), 1) for r in ranked]
    not_ok: dict[str, int] = {}
    for status in (warm.status, report.status):
        for k, v in status.items():
            if not k.endswith(" 200"):
                not_ok[k] = not_ok.get(k, 0) + v
    return Run(
        sessions_per_s=report.requests / report.seconds,
        serving_cpu_ms=per_ms["serving"],
        nginx_cpu_ms=per_ms["nginx"],
        redis_cpu_ms=per_ms["redis"],
        client_cpu_ms=client_cpu * 1000 / sessions,
        busiest_share=max(shares),
        idlest_share=min(shares),
        failed=warm.sessions_failed + report.sessions_failed + sum(not_ok.values()),
        not_ok=not_ok,
        unjoined=total - joined,
        labels_lost=lost,
        examples=examples,
        viewed=warm.viewed + report.viewed,
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="1,2,4", help="process counts to compare (default 1,2,4)")
    p.add_argument("--requests", type=int, default=1_000, help="sessions per measured run (default 1000)")
    p.add_argument("--warmup", type=int, default=100, help="sessions before each measured run (default 100)")
    p.add_argument("--concurrency", type=int, default=16, help="sessions in flight (default 16)")
    p.add_argument("--repeat", type=int, default=3, help="runs per process count; medians (default 3)")
    p.add_argument("--seed", type=int, default=7, help="seed of the simulated users (default 7)")
    p.add_argument("--n-users", type=int, default=10_000, help="users of the world (leanrec serve's default)")
    p.add_argument(
        "--n-items", type=int, default=50_000, help="items of the corpus (leanrec serve's default)"
    )
    p.add_argument("--world-seed", type=int, default=7, help="seed of the world (default 7)")
    p.add_argument(
        "--window-ms", type=int, default=10_000, help="attribution window (short: the joins follow the run)"
    )
    p.add_argument("--lateness-ms", type=int, default=5_000, help="lateness after the window")
    p.add_argument(
        "--blas-threads",
        default="1",
        help="numpy's BLAS threads in every serving process (default 1, for every count alike); auto: "
        "as leanrec serve sets them (cores // N for N > 1 workers, OpenBLAS's own default for one)",
    )
    p.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = p.parse_args()
    os.environ.setdefault("LEANREC_SECRET", os.urandom(16).hex())  # the workers' shared token key
    counts = [int(x) for x in args.workers.split(",")]
    nginx_bin = shutil.which(
        "nginx", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    )
    if nginx_bin is None:
        raise SystemExit("nginx is not installed (apt-get install nginx)")
    console = Console(width=None if sys.stdout.isatty() else 150)
    workdir = Path(tempfile.mkdtemp(prefix="leanrec-scale-"))
    os.chmod(workdir, 0o755)  # nginx's folders are inside, and its workers run as nobody
    server = RedisServer(workdir)
    started = time.monotonic()
    runs: dict[int, list[Run]] = {n: [] for n in counts}
    try:
        for rep in range(args.repeat):
            for n in counts:
                run = measure(args, nginx_bin, server, n, workdir, rep)
                runs[n].append(run)
                console.print(
                    f"  run {rep + 1}/{args.repeat}, {n} process(es): {run.sessions_per_s:6.1f} sessions/s, "
                    f"serving CPU {run.serving_cpu_ms:5.2f} ms/session, nginx {run.nginx_cpu_ms:4.2f} ms, "
                    f"labels lost {run.labels_lost}, examples {run.examples:,} of {run.viewed:,} viewed, "
                    f"not joined {run.unjoined}, answers other than 200 {run.not_ok or 'none'}"
                )
    finally:
        server.stop()
    table = Table(
        title=f"leanrec serve --workers N behind nginx, lazy logging on Redis: {args.requests} sessions x "
        f"{args.repeat} runs per N, concurrency {args.concurrency}, world {args.n_users} users / "
        f"{args.n_items} items, {os.cpu_count()} cores, BLAS threads {args.blas_threads} (medians)"
    )
    names = (
        "processes",
        "sessions/s",
        "serving CPU ms/session",
        "nginx CPU ms/session",
        "Redis CPU ms/session",
        "client CPU ms/session",
        "ranked by busiest / idlest",
        "examples / viewed items (all runs)",
        "labels lost (all runs)",
        "failed calls (all runs)",
    )
    for name in names:
        table.add_column(name, justify="right")
    rows = []
    ok = True
    for n in counts:
        rs = runs[n]

        def med(field: str, rs: list[Run] = rs) -> float:
            return statistics.median(getattr(r, field) for r in rs)

        lost = sum(r.labels_lost for r in rs)
        failed = sum(r.failed + r.unjoined for r in rs)
        examples, viewed = sum(r.examples for r in rs), sum(r.viewed for r in rs)
        ok &= lost == 0 and failed == 0 and examples == viewed and min(r.idlest_share for r in rs) > 0
        rows.append(
            [
                str(n),
                f"{med('sessions_per_s'):,.1f}",
                f"{med('serving_cpu_ms'):.2f}",
                f"{med('nginx_cpu_ms'):.2f}",
                f"{med('redis_cpu_ms'):.2f}",
                f"{med('client_cpu_ms'):.2f}",
                f"{med('busiest_share'):.0%} / {med('idlest_share'):.0%}",
                f"{examples:,} / {viewed:,}",
                f"{lost}",
                f"{failed}",
            ]
        )
        table.add_row(*rows[-1])
    console.print(table)
    if args.markdown:
        print("| " + " | ".join(names) + " |")
        print("|" + "---:|" * len(names))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    console.print(f"total {time.monotonic() - started:.0f} s; logs in {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
