"""The logging sidecar on Redis: lazy against eager against logging off, on the same ranked lists.

    python benchmarks/sidecar_log.py [--requests 2000] [--items 100] [--featureset FILE] [--repeat 3]

Starts a ``redis-server`` of its own and, for each logging mode, ``leanrec serve --featureset FILE``
(the synthetic world's FeatureSet by default: 2,548 bytes of request side, 300 per item), then plays
the same clients against it (one keep-alive connection of prepared bytes, so that the client takes
little of the CPU it shares with the sidecar): each request POSTs a ranked list of ``--items`` items
with every feature (an Arrow IPC body, or JSON with ``--json``), and the client then scrolls as the
world's depth model says (a pagination signal when it passes the head, sometimes too late) and sends
one event batch (a view per item seen, some clicks). Prints, per mode, the sidecar's own CPU time
per ranked request (read from its process, its paginate and events calls included), the client-side
p50 and p99 of ``/v1/log``, and the bytes the sidecar wrote to Redis per request, with lazy / eager
ratios; medians over ``--repeat`` runs, the modes in alternating order.

What logging costs the sidecar is its CPU with logging on less its CPU with logging off on the same
calls: with logging off the sidecar still reads, checks and packs every body, signs and checks the
tokens and answers every call, and that work is the same in every mode. Exits non-zero unless lazy
logging costs the sidecar at most 2 ms of CPU per ranked request (its paginate and events calls
included) and at most half of what eager logging costs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import redis
from rich.console import Console
from rich.table import Table

from leanrec.featurefile import dump_featureset, load_featureset
from leanrec.schema import FeatureSet, Role, Side
from leanrec.world import WorldConfig, default_featureset

MODES = ("off", "eager", "lazy")
CPU_BOUND_MS = 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Client:
    """One keep-alive HTTP/1.1 connection that POSTs prepared bodies and reads the answers.

    The sidecar's CPU is what is measured; on a machine of two cores the client shares them with it,
    so it does as little as a client can: a request is one ``sendall`` of prepared bytes, an answer
    one read of its headers and its ``Content-Length`` of body.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def post(self, path: str, body: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.sock.sendall(head + body)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self.buf += self._recv()
        lines = self.buf[:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(
            int(v) for k, _, v in (h.partition(":") for h in lines[1:]) if k.lower() == "content-length"
        )
        while len(self.buf) < end + 4 + length:
            self.buf += self._recv()
        answer, self.buf = self.buf[end + 4 : end + 4 + length], self.buf[end + 4 + length :]
        return status, answer

    def _recv(self) -> bytes:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise SystemExit("the sidecar closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a process, all its threads (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def values(fs: FeatureSet, rng: np.random.Generator, n: int) -> tuple[dict, dict]:
    """Request-side and item-side features of one ranked list, drawn within each feature's range."""
    out: tuple[dict, dict] = ({}, {})
    for k, (side, rows) in enumerate(((Side.REQUEST, 1), (Side.ITEM, n))):
        for slot in fs.layout(side).slots:
            f = slot.feature
            a = (
                rng.normal(size=(rows, f.size)).astype(np.float32)
                if f.is_float
                else rng.integers(f.rows, size=(rows, f.size))
            )
            out[k][f.name] = a[0] if side is Side.REQUEST else (a[:, 0] if f.size == 1 else a)
    return out


def arrow_body(fs: FeatureSet, user: int, items: np.ndarray, request: dict, item: dict) -> bytes:
    cols = {"item_id": pa.array(items), "score": pa.array(np.linspace(1, 0, len(items), dtype=np.float32))}
    for slot in fs.layout(Side.ITEM).slots:
        f, a = slot.feature, item[slot.feature.name]
        cols[f.name] = (
            pa.FixedSizeListArray.from_arrays(np.ascontiguousarray(a).ravel(), f.size)
            if f.size > 1
            else pa.array(a)
        )
    head = {"user_id": user, "features": {k: np.asarray(v).tolist() for k, v in request.items()}}
    table = pa.table(cols).replace_schema_metadata({"leanrec": json.dumps(head)})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def json_body(user: int, items: np.ndarray, request: dict, item: dict) -> bytes:
    feats = {k: np.asarray(v).tolist() for k, v in {**request, **item}.items()}
    return json.dumps({"user_id": user, "items": items.tolist(), "features": feats}).encode()


def traffic(fs: FeatureSet, requests: int, items: int, binary: bool, seed: int) -> list[tuple]:
    """The same clients for every mode: body, items, scroll depth, whether it signals, clicks."""
    rng = np.random.default_rng(seed)
    out = []
    for r in range(requests):
        request, item = values(fs, rng, items)
        item_id = fs.role(Role.ITEM_ID)
        ids = rng.choice(item_id.rows if item_id else 2**31 - 1, size=items, replace=False)
        if item_id is not None:
            item[item_id.name] = ids
        body = arrow_body(fs, r, ids, request, item) if binary else json_body(r, ids, request, item)
        depth = min(int(rng.geometric(1 / 6)), items)  # most sessions view about six items
        signals = depth > 6 and rng.random() < 0.8  # a fast scroller's signal comes too late
        clicks = [p for p in range(depth) if rng.random() < 0.3]
        out.append((body, ids, depth, signals, clicks))
    return out


def run_mode(mode: str, fs_path: Path, redis_port: int, db: int, plays: list[tuple], binary: bool) -> dict:
    url = f"redis://127.0.0.1:{redis_port}/{db}"
    redis.Redis.from_url(url).flushdb()
    port = free_port()
    cmd = [
        shutil.which("leanrec") or "leanrec",
        "serve",
        "--featureset",
        str(fs_path),
        "--logging",
        mode,
        "--store-url",
        url,
        "--bus-url",
        url,
        "--port",
        str(port),
    ]
    server = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, env={**os.environ, "LEANREC_SECRET": "bench-secret-0123456789"}
    )
    base = f"http://127.0.0.1:{port}"
    content_type = "application/vnd.apache.arrow.stream" if binary else "application/json"
    try:
        with httpx.Client(base_url=base, timeout=30.0) as http:
            for _ in range(200):
                try:
                    if http.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            for body, *_ in plays[:20]:  # warm-up: imports, first allocations
                http.post("/v1/log", content=body, headers={"content-type": content_type})
            time.sleep(0.5)
            written0 = metric(http, "leanrec_kv_bytes_written")
            client = Client(port)
            cpu0 = cpu_seconds(server.pid)
            latency = []
            for b, (body, ids, depth, signals, clicks) in enumerate(plays):
                t0 = time.perf_counter()
                status, answer = client.post("/v1/log", body, content_type)
                latency.append(time.perf_counter() - t0)
                if status != 200:
                    raise SystemExit(f"/v1/log answered {status}: {answer.decode()}")
                auth = json.loads(answer)
                auth = {"request_id": auth["request_id"], "token": auth["token"]}
                if signals:
                    body = json.dumps({**auth, "seen_up_to": depth - 1}).encode()
                    if (status := client.post("/v1/paginate", body)[0]) != 200:
                        raise SystemExit(f"/v1/paginate answered {status}")
                now = int(time.time() * 1000)
                events = [
                    {"position": p, "item_id": int(ids[p]), "kind": "view", "ts_ms": now}
                    for p in range(depth)
                ]
                events += [
                    {"position": p, "item_id": int(ids[p]), "kind": "click", "ts_ms": now} for p in clicks
                ]
                body = json.dumps({**auth, "batch_id": f"b{b}", "events": events}).encode()
                if (status := client.post("/v1/events", body)[0]) != 200:
                    raise SystemExit(f"/v1/events answered {status}")
            client.close()
            while (health := http.get("/healthz").json())["logging_queue"]:  # the lane has logged all
                time.sleep(0.05)
            cpu = cpu_seconds(server.pid) - cpu0
            written = metric(http, "leanrec_kv_bytes_written") - written0
    finally:
        server.terminate()
        server.wait(timeout=20)
    lat = np.array(latency) * 1000
    n = len(plays)
    return {
        "cpu_ms": 1000 * cpu / n,
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "bytes": written / n,
        "lost": health["lost_logging"],
    }


def metric(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + "_total ") or line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2_000)
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--featureset", help="a FeatureSet file (default: the synthetic world's)")
    ap.add_argument("--json", action="store_true", help="JSON bodies instead of Arrow IPC")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    console = Console()
    work = Path(tempfile.mkdtemp(prefix="leanrec-sidecar-"))
    if args.featureset:
        fs_path = Path(args.featureset)
    else:
        fs_path = work / "world.toml"
        fs_path.write_text(dump_featureset(default_featureset(WorldConfig())[0]))
    fs = load_featureset(fs_path)
    plays = traffic(fs, args.requests, args.items, not args.json, args.seed)
    redis_port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                redis.Redis(port=redis_port).ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.1)
        runs: dict[str, list[dict]] = {m: [] for m in MODES}
        for k in range(args.repeat):
            for mode in MODES if k % 2 == 0 else MODES[::-1]:
                runs[mode].append(run_mode(mode, fs_path, redis_port, 1, plays, not args.json))
                r = runs[mode][-1]
                console.print(f"run {k + 1} {mode}: {r['cpu_ms']:.3f} ms CPU/request, p99 {r['p99']:.2f} ms")
    finally:
        server.terminate()
        server.wait(timeout=10)
    med = {
        m: {key: float(np.median([r[key] for r in rs])) for key in ("cpu_ms", "p50", "p99", "bytes")}
        for m, rs in runs.items()
    }
    body = "JSON" if args.json else "Arrow IPC"
    table = Table(
        title=f"/v1/log on Redis, {args.requests:,} ranked lists of {args.items} items ({body}), "
        f"medians of {args.repeat}"
    )
    for col in ("figure", "off", "eager", "lazy", "lazy / eager"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    rows = (
        ("sidecar CPU per ranked request, ms", "cpu_ms", "{:.3f}"),
        ("/v1/log p50, ms", "p50", "{:.2f}"),
        ("/v1/log p99, ms", "p99", "{:.2f}"),
        ("bytes written to Redis per request", "bytes", "{:,.0f}"),
    )
    for m in MODES:  # what logging adds to the same calls, each run against its own off run
        costs = [r["cpu_ms"] - o["cpu_ms"] for r, o in zip(runs[m], runs["off"], strict=True)]
        med[m]["logging_ms"] = float(np.median(costs))
    rows = (
        *rows[:1],
        ("of which logging (less logging off), ms", "logging_ms", "{:.3f}"),
        *rows[1:],
    )
    for label, key, fmt in rows:
        ratio = med["lazy"][key] / med["eager"][key] if med["eager"][key] else float("nan")
        table.add_row(label, *(fmt.format(med[m][key]) for m in MODES), f"{ratio:.3f}")
    console.print(table)
    lazy, eager = med["lazy"]["logging_ms"], med["eager"]["logging_ms"]
    failures = []
    if lazy > CPU_BOUND_MS:
        failures.append(
            f"lazy logging costs the sidecar {lazy:.3f} ms of CPU per request, above {CPU_BOUND_MS}"
        )
    if lazy > 0.5 * eager:
        failures.append(f"lazy logging costs {lazy / eager:.2f}x what eager logging costs, above 0.5")
    for f in failures:
        console.print(f"[red]FAIL[/red] {f}")
    if not failures:
        console.print(
            f"PASS lazy logging costs the sidecar {lazy:.3f} ms of CPU per ranked request, "
            f"{lazy / eager:.2f}x what eager logging costs"
        )
    print(
        f"\n`python benchmarks/sidecar_log.py --requests {args.requests} --items {args.items} "
        f"--repeat {args.repeat} --seed {args.seed}{' --json' if args.json else ''}`:\n"
    )
    print("| figure | logging off | eager | lazy | lazy / eager |\n|---|---:|---:|---:|---:|")
    for label, key, fmt in rows:
        ratio = med["lazy"][key] / med["eager"][key] if med["eager"][key] else float("nan")
        print(f"| {label} | " + " | ".join(fmt.format(med[m][key]) for m in MODES) + f" | {ratio:.3f} |")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
