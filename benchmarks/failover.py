"""A Redis Cluster master killed under traffic: what ranking, logging and the joiner do, and what is lost.

    python benchmarks/failover.py [--seconds 60] [--kill-at 20] [--concurrency 8]

Starts a local Redis Cluster (3 masters with a replica each, from Debian's ``redis-server``), one
``leanrec serve`` (lazy logging) and one ``leanrec join`` on it, and drives ``leanrec simulate``'s
sessions for ``--seconds``. At ``--kill-at`` it SIGKILLs one master; its replica is promoted after the
cluster's node timeout (1 s). A client sends a 503-answered pagination signal or event batch again
with a backoff, as clients must. It prints:

* rank answers by status (ranking must answer 200 throughout), calls sent again, and when
  ``/healthz`` said a backend was down;
* per phase (before the kill, from the kill until the cluster serves every slot again, after), the
  positions the clients viewed, the examples the warehouse holds for those requests, and the
  difference; with what the system counted lost: the joiner's lost labels and the requests whose
  RequestOpened record never reached the bus;
* whether the joiner ever exited (it must not).

What no one can count is a write the killed master acknowledged and had not yet copied to its replica
(Redis replicates asynchronously); the difference between viewed, examples and counted loss is that.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pyarrow.compute as pc

from leanrec.events import open_event_bus
from leanrec.sim.client import SimReport, simulate
from leanrec.stores.local_cluster import LocalRedisCluster
from leanrec.warehouse import ParquetWarehouse, TableLayout
from leanrec.world import WorldConfig, default_featureset

sys.path.insert(0, str(Path(__file__).parent))
from serve_redis import SETTLE_MS, Process, scrape, start_server, world_flags


class Watch(threading.Thread):
    """Polls ``/healthz`` every 0.2 s: when a backend was down, and what the service counted."""

    def __init__(self, target: str) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.down: list[float] = []  # monotonic times of answers with a backend down
        self.last: dict = {}
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.target, timeout=2.0) as http:
            while not self.stop.is_set():
                try:
                    body = http.get("/healthz").json()
                    self.last = body
                    if any(v != "up" for v in body.get("backends", {}).values()):
                        self.down.append(time.monotonic())
                except (httpx.HTTPError, ValueError):
                    self.down.append(time.monotonic())
                self.stop.wait(0.2)


def examples_by_request(warehouse: Path, world: WorldConfig) -> dict[str, int]:
    fs, _ = default_featureset(world)
    try:
        table = ParquetWarehouse(str(warehouse), fs, TableLayout.REQUEST).read_examples()
    except ValueError:  # nothing written
        return {}
    counts = pc.value_counts(table.column("request_id")).to_pylist()
    return {c["values"]: c["counts"] for c in counts}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="length of the traffic (default 60)")
    p.add_argument("--kill-at", type=float, default=20.0, help="when a master is killed (default 20 s in)")
    p.add_argument("--concurrency", type=int, default=8, help="sessions in flight (default 8)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--n-users", type=int, default=10_000)
    p.add_argument("--n-items", type=int, default=50_000)
    p.add_argument("--world-seed", type=int, default=7)
    p.add_argument("--window-ms", type=int, default=10_000, help="attribution window (default 10 s)")
    p.add_argument("--lateness-ms", type=int, default=2_000)
    args = p.parse_args()
    os.environ.setdefault("LEANREC_SECRET", os.urandom(16).hex())
    world = WorldConfig(n_users=args.n_users, n_items=args.n_items, seed=args.world_seed)
    work = Path(tempfile.mkdtemp(prefix="leanrec-failover-"))
    warehouse = work / "warehouse"
    with LocalRedisCluster(work / "cluster") as cluster:
        url = cluster.url
        timing = {"window_ms": args.window_ms, "lateness_ms": args.lateness_ms}
        serve, target = start_server(args, url, "lazy", work / "serve.log", **timing)
        join_flags = ["join", "--store-url", url, "--bus-url", url, "--poll-ms", "250"]
        join_flags += ["--warehouse", str(warehouse), "--window-ms", str(args.window_ms)]
        join_flags += ["--lateness-ms", str(args.lateness_ms)]
        joiner = Process(join_flags + world_flags(args), work / "join.log")
        watch = Watch(target)
        watch.start()
        killed: dict[str, float] = {}

        def kill() -> None:
            killed["port"] = cluster.kill_master()
            killed["at"] = time.monotonic()
            killed["at_ms"] = time.time() * 1000
            killed["promoted_in"] = cluster.wait_ready(timeout_s=60)
            killed["ready_ms"] = time.time() * 1000

        timer = threading.Timer(args.kill_at, kill)
        started = time.monotonic()
        print(
            f"failover run: {args.seconds:.0f} s of lazy traffic on a local Redis Cluster "
            f"({cluster.masters} masters + {cluster.masters * cluster.replicas} replicas), "
            f"a master killed at {args.kill_at:.0f} s ...",
            flush=True,
        )
        timer.start()
        try:
            report: SimReport = simulate(target, 10**9, args.concurrency, args.seconds, args.seed, world)
            timer.join()
            ended = time.monotonic()
            due = (args.window_ms + args.lateness_ms + SETTLE_MS) / 1000 + 2.0
            probe = open_event_bus(url, consumer="failover-probe")
            deadline = ended + due + 180
            while time.monotonic() < deadline:
                if time.monotonic() > ended + due and probe.pending() == 0 and joiner.proc.poll() is None:
                    time.sleep(1.0)  # a last batch the joiner read may still be flushing
                    if probe.pending() == 0:
                        break
                time.sleep(0.5)
            joiner_alive = joiner.proc.poll() is None
            metrics, health = scrape(target), watch.last
        finally:
            watch.stop.set()
            join_rc = joiner.stop()
            serve.stop()
    out = joiner.output()
    m = re.search(r"joined (\d+) requests, (\d+) examples, (\d+) labels lost", out)
    labels_lost = int(m[3]) if m else -1
    outages = re.search(r"rode out (\d+) Redis outages", out)
    by_request = examples_by_request(warehouse, world)

    phases = {"before the kill": [0, 0, 0], "kill → all slots served": [0, 0, 0], "after": [0, 0, 0]}
    for rid, (t_ms, depth) in report.sessions.items():
        phase = (
            "before the kill"
            if t_ms < killed["at_ms"]
            else "kill → all slots served"
            if t_ms < killed["ready_ms"]
            else "after"
        )
        row = phases[phase]
        row[0] += 1
        row[1] += depth
        row[2] += by_request.get(rid, 0)
    ranks = {k: v for k, v in report.status.items() if k.startswith("rank ")}
    down = sorted(t - started for t in watch.down)
    lost = health.get("lost_logging", {})
    unopened = metrics.get("leanrec_log_bus_failures_total", 0) - metrics.get(
        "leanrec_log_bus_resent_total", 0
    )
    print(
        f"master :{killed['port']} killed at {killed['at'] - started:.1f} s; every slot served again "
        f"{killed['promoted_in']:.1f} s later"
    )
    print(
        f"sessions: {report.requests:,} in {report.seconds:.1f} s; rank answers {ranks}; "
        f"failed sessions {report.sessions_failed}"
    )
    print(
        f"calls answered 503 and sent again: {report.resent:,}; "
        f"answers: {dict(sorted(report.status.items()))}"
    )
    if down:
        print(
            f"/healthz said a backend was down from {down[0]:.1f} s to {down[-1]:.1f} s ({len(down)} answers)"
        )
    print(
        f"serving side: {lost.get('entries', 0)} entries and {lost.get('opened_records', 0)} records "
        f"not taken at first, {lost.get('opened_records_resent', 0)} records sent again and taken; "
        f"{unopened:.0f} records never taken"
    )
    print(
        f"joiner: exited during the run: {'no' if joiner_alive else 'YES'}; exit code {join_rc}; "
        f"rode out {outages[1] if outages else 0} outages; labels lost (counted): {labels_lost}"
    )
    print()
    print(f"{'phase':<26}{'sessions':>10}{'viewed':>10}{'examples':>10}{'viewed - examples':>19}")
    for name, (n, viewed, examples) in phases.items():
        print(f"{name:<26}{n:>10,}{viewed:>10,}{examples:>10,}{viewed - examples:>19,}")
    total_viewed = sum(r[1] for r in phases.values())
    total_examples = sum(r[2] for r in phases.values())
    print(
        f"{'all':<26}{report.requests:>10,}{total_viewed:>10,}{total_examples:>10,}"
        f"{total_viewed - total_examples:>19,}"
    )
    counted = max(labels_lost, 0) + report.views_refused
    print(
        f"views in event batches refused after the window closed (410, counted by the service as "
        f"refused events): {report.views_refused:,}"
    )
    print()
    print(
        f"viewed {total_viewed:,} - counted lost {counted:,} = {total_viewed - counted:,}; "
        f"examples in the warehouse {total_examples:,}; uncounted {total_viewed - counted - total_examples:,}"
    )
    after = phases["after"]
    ok = ranks.keys() == {"rank 200"} and joiner_alive and after[1] == after[2]
    print(
        "PASS" if ok else "FAIL",
        "ranking answered 200 throughout, the joiner never exited, nothing lost after the failover",
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
