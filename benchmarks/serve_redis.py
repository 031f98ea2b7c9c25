"""`leanrec serve` on Redis: logging off, lazy (lean) and eager (naive), on the same seeded traffic.

    python benchmarks/serve_redis.py [--requests 1000] [--concurrency 8] [--repeat 3] [--sustain-seconds 60]

Starts its own ``redis-server`` on a free port. Then, ``--repeat`` times, for each logging mode in turn
(interleaved, so drift on a noisy machine hits every mode alike): empties Redis, starts
``leanrec serve`` on it, warms it up, and runs ``leanrec.sim.client.simulate`` against it with the same
seed, request count and concurrency. Around the measured run it reads Redis's own counters
(``INFO stats`` ``total_net_input_bytes``, ``INFO commandstats``, ``INFO memory``) and the service's
``leanrec_http_seconds`` histogram; after it, ``--light-requests`` more sessions run one at a time.
It prints, per mode, the medians over the repeats: requests/s, p50 and p99 of ``/v1/rank``
(client-measured at ``--concurrency``; server-side handling time estimated from the histogram's
buckets; client-measured one session at a time, which is the service's own latency without
queueing), bytes written to Redis per request, commands per request and dataset memory added per
request, and the ratios lazy/eager and lazy/off of every figure.

Then a sustained run: ``--sustain-seconds`` of lazy traffic with a ``leanrec join`` worker beside it
(short attribution window, so joins happen during the run); after the traffic it waits for the joiner
to join and acknowledge everything, stops it with SIGTERM, and checks that no label was lost: every
viewed item of every session (the simulator's count) is an example in the warehouse.

Bounds (the exit code is 1 if one is missed): lazy writes at most 15% of eager's bytes to Redis;
p99 of /v1/rank with lazy logging (client-measured at ``--concurrency``) is at most 1.2 x its p99
with logging off; every measured session is answered 200; the sustained run loses no label. On a
small machine the client, the service and Redis share the cores, so the p99s move by tens of
percent from run to run: hence the interleaved repeats and the medians. This is a measurement,
never a timed test.
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
import redis
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from leanrec.sim.client import SimReport, simulate
from leanrec.warehouse.store import ParquetWarehouse
from leanrec.warehouse.tables import TableLayout
from leanrec.world import WorldConfig, default_featureset

MODES = ("off", "lazy", "eager")
LEAN_BYTES_BOUND = 0.15
P99_BOUND = 1.2
SETTLE_MS = 2_000  # the joiner's settle time after window + lateness


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server without persistence."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed")
        self.port = free_port()
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--daemonize", "no", "--dir", str(workdir), "--logfile", str(workdir / "redis.log")]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(port=self.port, socket_timeout=5)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise SystemExit(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def counters(self) -> dict[str, float]:
        """Bytes received, commands by name, and dataset memory: Redis's own figures."""
        stats, cmds, mem = (
            self.client.info("stats"),
            self.client.info("commandstats"),
            self.client.info("memory"),
        )
        out = {"net_input_bytes": float(stats["total_net_input_bytes"])}
        out["dataset_bytes"] = float(mem["used_memory_dataset"])
        for name, value in cmds.items():
            out[f"calls:{name.removeprefix('cmdstat_')}"] = float(value["calls"])
        return out

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Process:
    """A leanrec subprocess, its output in a log file."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        # a key of the benchmark's own: leanrec serve refuses the built-in development secret
        env = {"LEANREC_SECRET": "bench-secret-0123456789", **os.environ, "COLUMNS": "250", "NO_COLOR": "1"}
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "leanrec.cli", *args], stdout=out, stderr=subprocess.STDOUT, env=env
            )

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def output(self) -> str:
        return self.log.read_text()


def world_flags(args: argparse.Namespace) -> list[str]:
    return ["--n-users", str(args.n_users), "--n-items", str(args.n_items), "--seed", str(args.world_seed)]


def start_server(
    args: argparse.Namespace, url: str, mode: str, log: Path, **extra: int
) -> tuple[Process, str]:
    port = free_port()
    flags = ["serve", "--port", str(port), "--store-url", url, "--bus-url", url, "--logging", mode]
    for name, value in extra.items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    proc = Process(flags + world_flags(args), log)
    target = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise SystemExit(f"leanrec serve exited:\n{proc.output()}")
        try:
            if httpx.get(f"{target}/healthz", timeout=1).status_code == 200:
                return proc, target
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.stop()
    raise SystemExit(f"leanrec serve did not answer in 60 s:\n{proc.output()}")


def rank_buckets(target: str) -> dict[float, float]:
    """Cumulative bucket counts of leanrec_http_seconds{endpoint="rank"}."""
    text = httpx.get(f"{target}/metrics", timeout=10).text
    out: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "leanrec_http_seconds_bucket" and s.labels.get("endpoint") == "rank":
                out[float(s.labels["le"])] = s.value
    return out


def bucket_quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float:
    """A quantile in ms of the observations between two scrapes, interpolated inside its bucket."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for bound, cum in zip(bounds, counts, strict=True):
        if cum >= rank:
            if bound == float("inf"):
                return lower * 1000
            return (lower + (bound - lower) * (rank - below) / max(cum - below, 1e-12)) * 1000
        lower, below = bound, cum
    return lower * 1000


@dataclass
class Run:
    """One measured run of one mode."""

    rps: float
    p50: float
    p99: float
    server_p50: float
    server_p99: float
    bytes_per_request: float
    commands_per_request: float
    dataset_per_request: float
    failed: int
    not_ok: int
    light_p50: float
    light_p99: float


def measure(args: argparse.Namespace, server: RedisServer, mode: str, workdir: Path, rep: int) -> Run:
    server.client.flushall()
    proc, target = start_server(args, server.url(0), mode, workdir / f"serve-{mode}-{rep}.log")
    world = WorldConfig(n_users=args.n_users, n_items=args.n_items, seed=args.world_seed)
    try:
        simulate(target, args.warmup, args.concurrency, 600, args.seed + 1, world)  # the same warm-up for all
        before, buckets_before = server.counters(), rank_buckets(target)
        report = simulate(target, args.requests, args.concurrency, 600, args.seed, world)
        after, buckets_after = server.counters(), rank_buckets(target)
        # light load: one session at a time, so the latency is the service's own, without queueing
        light = (
            simulate(target, args.light_requests, 1, 600, args.seed, world) if args.light_requests else None
        )
    finally:
        proc.stop()
    n = max(report.requests, 1)
    commands = sum(after[k] - before.get(k, 0.0) for k in after if k.startswith("calls:"))
    p50, _, p99 = report.percentiles("rank")
    return Run(
        rps=report.requests / report.seconds,
        p50=p50,
        p99=p99,
        server_p50=bucket_quantile(0.5, buckets_before, buckets_after),
        server_p99=bucket_quantile(0.99, buckets_before, buckets_after),
        bytes_per_request=(after["net_input_bytes"] - before["net_input_bytes"]) / n,
        commands_per_request=commands / n,
        dataset_per_request=max(after["dataset_bytes"] - before["dataset_bytes"], 0.0) / n,
        failed=report.sessions_failed + (light.sessions_failed if light else 0),
        not_ok=sum(n for k, n in report.status.items() if not k.endswith(" 200")),
        light_p50=light.percentiles("rank")[0] if light else float("nan"),
        light_p99=light.percentiles("rank")[2] if light else float("nan"),
    )


def group_state(server: RedisServer) -> tuple[int, int]:
    """(pending, lag) of the joiners' consumer group, (-1, -1) before it exists."""
    try:
        groups = server.client.xinfo_groups("lr:opened")
    except redis.exceptions.ResponseError:
        return -1, -1
    if not groups:
        return -1, -1
    g = {(k.decode() if isinstance(k, bytes) else k): v for k, v in groups[0].items()}
    return int(g["pending"]), int(g.get("lag") or 0)


def scrape(target: str) -> dict[str, float]:
    text = httpx.get(f"{target}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("leanrec_") and "_bucket" not in s.name:
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def sustained(args: argparse.Namespace, server: RedisServer, workdir: Path, console: Console) -> dict:
    server.client.flushall()
    warehouse = workdir / "warehouse"
    timing = {"window_ms": args.window_ms, "lateness_ms": args.lateness_ms}
    proc, target = start_server(args, server.url(0), "lazy", workdir / "serve-sustained.log", **timing)
    join_flags = ["join", "--store-url", server.url(0), "--bus-url", server.url(0), "--poll-ms", "250"]
    join_flags += ["--warehouse", str(warehouse), "--window-ms", str(args.window_ms)]
    join_flags += ["--lateness-ms", str(args.lateness_ms)]
    joiner = Process(join_flags + world_flags(args), workdir / "join-sustained.log")
    world = WorldConfig(n_users=args.n_users, n_items=args.n_items, seed=args.world_seed)
    try:
        console.print(
            f"sustained run: {args.sustain_seconds:.0f} s of lazy traffic with a joiner beside it ..."
        )
        report: SimReport = simulate(target, 10**9, args.concurrency, args.sustain_seconds, args.seed, world)
        mid_run_files = len(list(warehouse.rglob("*.parquet"))) if warehouse.exists() else 0
        ended = time.monotonic()
        due = (args.window_ms + args.lateness_ms + SETTLE_MS) / 1000 + 1.0
        deadline = ended + due + 120
        while time.monotonic() < deadline:
            if time.monotonic() > ended + due and group_state(server) == (0, 0):
                break
            time.sleep(0.25)
        drained_in = time.monotonic() - ended
        metrics = scrape(target)
    finally:
        join_rc = joiner.stop()
        proc.stop()
    out = joiner.output()
    m = re.search(r"took over (\d+) pending, joined (\d+) requests, (\d+) examples, (\d+) labels lost", out)
    joined, examples_reported, labels_lost = (int(m[2]), int(m[3]), int(m[4])) if m else (-1, -1, -1)
    fs, _ = default_featureset(world)
    try:
        examples = ParquetWarehouse(str(warehouse), fs, TableLayout.REQUEST).read_examples().num_rows
    except ValueError:
        examples = 0
    refused = sum(v for k, v in metrics.items() if k.startswith("leanrec_events_refused"))
    return {
        "seconds": report.seconds,
        "sessions": report.requests,
        "rps": report.requests / report.seconds,
        "failed": report.sessions_failed,
        "statuses": report.status,
        "viewed": report.viewed,
        "examples": examples,
        "examples_reported": examples_reported,
        "joined": joined,
        "labels_lost": labels_lost,
        "join_rc": join_rc,
        "pending_after": group_state(server),
        "mid_run_files": mid_run_files,
        "drained_in": drained_in,
        "refused": refused,
        "write_failures": metrics.get("leanrec_log_write_failures_total", -1),
        "context_bytes": metrics.get("leanrec_context_bytes_held", 0.0),
        "not_logged": metrics.get("leanrec_rankings_not_logged_total", 0.0),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1_000, help="sessions per measured run (default 1000)")
    p.add_argument("--warmup", type=int, default=100, help="sessions before each measured run (default 100)")
    p.add_argument("--concurrency", type=int, default=8, help="sessions in flight (default 8)")
    p.add_argument(
        "--light-requests", type=int, default=300, help="sessions one at a time after each run (default 300)"
    )
    p.add_argument("--repeat", type=int, default=3, help="runs per mode; medians are reported (default 3)")
    p.add_argument("--seed", type=int, default=7, help="seed of the simulated users (default 7)")
    p.add_argument("--n-users", type=int, default=10_000, help="users of the world (leanrec serve's default)")
    p.add_argument(
        "--n-items", type=int, default=50_000, help="items of the corpus (leanrec serve's default)"
    )
    p.add_argument("--world-seed", type=int, default=7, help="seed of the world (default 7)")
    p.add_argument(
        "--sustain-seconds", type=float, default=60.0, help="sustained lazy run (default 60; 0 skips)"
    )
    p.add_argument("--window-ms", type=int, default=5_000, help="attribution window of the sustained run")
    p.add_argument("--lateness-ms", type=int, default=2_000, help="lateness of the sustained run")
    args = p.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 150)
    workdir = Path(tempfile.mkdtemp(prefix="leanrec-bench-"))
    server = RedisServer(workdir)
    started = time.monotonic()
    try:
        runs: dict[str, list[Run]] = {m: [] for m in MODES}
        for rep in range(args.repeat):
            for mode in MODES:
                run = measure(args, server, mode, workdir, rep)
                runs[mode].append(run)
                console.print(
                    f"  run {rep + 1}/{args.repeat} {mode:>5}: {run.rps:6.1f} req/s, "
                    f"rank p50 {run.p50:6.2f} ms, p99 {run.p99:6.2f} ms, "
                    f"{run.bytes_per_request:9,.0f} B/request to Redis"
                )
        summary = sustained(args, server, workdir, console) if args.sustain_seconds > 0 else None
    finally:
        server.stop()
    med = {
        m: {f: statistics.median(getattr(r, f) for r in runs[m]) for f in Run.__dataclass_fields__}
        for m in MODES
    }
    table = Table(
        title=f"leanrec serve on Redis: {args.requests} sessions x {args.repeat} runs per mode, concurrency "
        f"{args.concurrency}, world {args.n_users} users / {args.n_items} items (medians)"
    )
    table.add_column("figure")
    for m in MODES:
        table.add_column(f"logging {m}", justify="right")
    table.add_column("lazy / eager", justify="right")
    table.add_column("lazy / off", justify="right")

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.3f}" if b else "-"

    rows = (
        ("requests/s", "rps", "{:,.1f}"),
        ("/v1/rank p50 ms (client)", "p50", "{:.2f}"),
        ("/v1/rank p99 ms (client)", "p99", "{:.2f}"),
        ("/v1/rank p50 ms (server, from buckets)", "server_p50", "{:.2f}"),
        ("/v1/rank p99 ms (server, from buckets)", "server_p99", "{:.2f}"),
        ("/v1/rank p50 ms (client, 1 session at a time)", "light_p50", "{:.2f}"),
        ("/v1/rank p99 ms (client, 1 session at a time)", "light_p99", "{:.2f}"),
        ("bytes written to Redis / request", "bytes_per_request", "{:,.0f}"),
        ("Redis commands / request", "commands_per_request", "{:.2f}"),
        ("Redis dataset memory added / request", "dataset_per_request", "{:,.0f}"),
        ("failed sessions", "failed", "{:.0f}"),
        ("responses other than 200", "not_ok", "{:.0f}"),
    )
    for label, f, fmt in rows:
        values = [fmt.format(med[m][f]) for m in MODES]
        table.add_row(
            label, *values, ratio(med["lazy"][f], med["eager"][f]), ratio(med["lazy"][f], med["off"][f])
        )
    console.print(table)

    lean_bytes = med["lazy"]["bytes_per_request"] / med["eager"]["bytes_per_request"]
    p99_ratio = med["lazy"]["p99"] / med["off"]["p99"]
    failed = sum(r.failed + r.not_ok for rs in runs.values() for r in rs)
    checks = [
        (f"lean writes <= {LEAN_BYTES_BOUND:.0%} of naive's bytes to Redis", lean_bytes <= LEAN_BYTES_BOUND),
        (f"p99 /v1/rank lazy <= {P99_BOUND} x off (concurrency {args.concurrency})", p99_ratio <= P99_BOUND),
        ("every session of the measured runs answered 200", failed == 0),
    ]
    values = [f"{lean_bytes:.1%}", f"{p99_ratio:.3f} x", f"{failed} failed sessions or non-200 responses"]
    if summary is not None:
        s = summary
        lost = (
            s["labels_lost"] != 0
            or s["examples"] != s["viewed"]
            or s["failed"]
            or s["write_failures"]
            or s["not_logged"]
        )
        console.print(
            f"sustained lazy run: {s['sessions']:,} sessions in {s['seconds']:.1f} s ({s['rps']:.1f}/s), "
            f"failed {s['failed']}, responses {dict(sorted(s['statuses'].items()))}; "
            f"{s['mid_run_files']} warehouse files committed during the traffic; joiner drained "
            f"{s['drained_in']:.1f} s after it (exit code {s['join_rc']}, "
            f"group pending/lag {s['pending_after']})"
        )
        console.print(
            f"  viewed items (simulator) {s['viewed']:,}; examples in the warehouse {s['examples']:,} "
            f"(joiner says {s['examples_reported']:,} from {s['joined']:,} requests); labels lost "
            f"{s['labels_lost']}; events refused {s['refused']:.0f}; log write failures "
            f"{s['write_failures']:.0f}; rankings not logged {s['not_logged']:.0f}; "
            f"frozen contexts still held {s['context_bytes'] / 2**20:,.1f} MiB"
        )
        sustain_ok = not lost and s["join_rc"] == 0 and s["pending_after"] == (0, 0)
        checks.append((f"sustained {args.sustain_seconds:.0f} s run loses no label", sustain_ok))
        values.append(
            f"{s['examples']:,} examples / {s['viewed']:,} viewed items, {s['labels_lost']} labels lost"
        )
    ok = True
    for (text, passed), value in zip(checks, values, strict=True):
        ok &= passed
        console.print(f"[{'green' if passed else 'red'}]{'PASS' if passed else 'MISS'}[/] {text}: {value}")
    console.print(f"total {time.monotonic() - started:.0f} s; logs in {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
