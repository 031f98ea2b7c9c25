"""MovieLens 100K end to end through leanrec's commands: lean against naive, then round 2 against retrieval.

    python examples/movielens/prepare.py --data ../shared/data/ml-100k --out ml-work
    python examples/movielens/run.py --work ml-work --redis redis://127.0.0.1:6379

Runs, against the Redis at ``--redis`` (databases 6 to 9, emptied first), what a deployment runs:

1. **Round 1, lean against naive on the same traffic.** ``leanrec serve`` ranks the catalog twice
   over (retrieval's order: no late ranker yet), one service logging lazily into a request-level
   warehouse, one eagerly into an impression-level one, each with its ``leanrec join``. Before each
   of chunks 1 and 2, ``leanrec features load`` writes that chunk's feature snapshot (features move
   on between chunks); ``leanrec replay`` replays the chunk's sessions against both services.
2. **Training.** ``leanrec train`` on the lean warehouse: the round-2 late ranker.
3. **Round 2 on held-out sessions.** Two services without logging, one in retrieval's order and one
   with the round-2 ranker; chunks 3 and 4 are replayed against both.

Prints the lean and naive plumbing side by side (transient-store bytes, warehouse bytes, examples,
labels lost, skewed examples) and the round-2 ranker against retrieval alone (NDCG@10, recall@10
over the 100 ranked, engagements per session), and writes them to ``<work>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import redis
from rich.console import Console
from rich.table import Table

from leanrec.featurefile import load_featureset
from leanrec.ids import IdIndex
from leanrec.schema import Owner, Side
from leanrec.warehouse.store import ParquetWarehouse, warehouse_bytes
from leanrec.warehouse.tables import TableLayout

ROUND_1, HELD_OUT = (1, 2), (3, 4)
DBS = {"lean": 6, "naive": 7, "features": 8, "held_out": 9}
WINDOW_MS, LATENESS_MS = 8_000, 2_000
LEANREC = [sys.executable, "-m", "leanrec.cli"]


def free_port() -> int:
    """A TCP port free on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(console: Console, *args: str) -> None:
    """A leanrec command; its output shown, its failure fatal."""
    console.print(f"$ leanrec {' '.join(args)}", style="dim", markup=False, soft_wrap=True)
    done = subprocess.run([*LEANREC, *args], text=True, capture_output=True)
    if done.returncode != 0:
        sys.exit(f"leanrec {args[0]} failed ({done.returncode}): {done.stderr.strip()}")
    if done.stdout.strip():
        console.print(done.stdout.rstrip(), markup=False, highlight=False, soft_wrap=True)


def start(console: Console, log: Path, *args: str) -> subprocess.Popen:
    """A long-running leanrec command in the background, its output into ``log``."""
    console.print(f"$ leanrec {' '.join(args)} &", style="dim", markup=False, soft_wrap=True)
    proc = subprocess.Popen([*LEANREC, *args], stdout=log.open("w"), stderr=subprocess.STDOUT)
    STARTED.append(proc)
    return proc


def wait_healthy(port: int, proc: subprocess.Popen, log: Path) -> None:
    """Wait until the service on ``port`` answers /healthz; exit with its log if it died."""
    import httpx

    for _ in range(200):
        if proc.poll() is not None:
            sys.exit(f"a service exited at start: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    sys.exit(f"the service on port {port} did not answer: {log.read_text()[-2000:]}")


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process (a joiner writes what it holds), then wait for it."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()


def comparable(examples: pa.Table) -> pa.Table:
    """Examples without what differs between two replays of the same sessions (ids, wall times).

    Sorted by every remaining scalar column, so that two sessions of a user showing an item at the
    same position (their features differ) sort the same way in both warehouses.
    """
    wall = {"request_id", "ts_ms", "view_ms"}
    t = examples.select([c for c in examples.column_names if c not in wall and not c.endswith("_ts_ms")])
    scalar = [c for c in t.column_names if not pa.types.is_nested(t.schema.field(c).type)]
    return t.sort_by([(c, "ascending") for c in scalar])


def skew(
    examples: pa.Table, fs, work: Path, chunk_of: np.ndarray, chunks: tuple[int, ...]
) -> tuple[int, int]:
    """Examples whose features differ from the snapshot they were ranked under, and from the last one.

    The first is what freezing guarantees (0); the second is what a join that looked the features up
    again at join time would have trained on.
    """
    layout = {s.feature.name for side in Side for s in fs.layout(side).slots}
    skewed = np.zeros(examples.num_rows, bool)
    fresh = np.zeros(examples.num_rows, bool)
    latest = chunks[-1]
    for owner, id_col in ((Owner.USER, "user_id"), (Owner.ITEM, "item_id")):
        ids = examples.column(id_col).to_numpy()
        for k in (*chunks, "latest"):
            kk = latest if k == "latest" else k
            snap = pq.read_table(work / f"{'users' if owner is Owner.USER else 'items'}_{kk}.parquet")
            row = IdIndex(snap.column(id_col).to_numpy(), owner.value).rows(ids)
            rows = chunk_of == kk if k != "latest" else np.ones(len(ids), bool)
            for f in fs.of(owner):
                if f.name not in layout or f.name not in snap.column_names:
                    continue
                got = np.asarray(
                    examples.column(f.name).to_pylist() if f.size > 1 else examples.column(f.name).to_numpy()
                )
                want_col = snap.column(f.name).combine_chunks()
                want = (
                    want_col.flatten().to_numpy().reshape(len(want_col), f.size)
                    if f.size > 1
                    else want_col.to_numpy()
                )[row]
                got, want = got.reshape(len(ids), -1), want.reshape(len(ids), -1)
                same = np.isclose(got, want) if f.is_float else got == want  # raw ids compare exactly
                differs = ~same.all(1)
                (fresh if k == "latest" else skewed)[rows] |= differs[rows]
    return int(skewed.sum()), int(fresh.sum())


STARTED: list[subprocess.Popen] = []


def main() -> None:
    """Run the example (see the module docstring); stops every process it started, whatever happens."""
    try:
        _main()
    finally:
        stop(STARTED)


def _main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="ml-work", help="the folder prepare.py wrote (default ./ml-work)")
    ap.add_argument(
        "--redis", default="redis://127.0.0.1:6379", help="Redis server (databases 6-9 are emptied)"
    )
    ap.add_argument("--epochs", type=int, default=5, help="most epochs of the round-2 ranker (default 5)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the training (S) and the replays (7 + S)")
    args = ap.parse_args()
    seed = str(args.seed)
    work = Path(args.work).resolve()
    console = Console()
    fs_file = str(work / "featureset.toml")
    fs = load_featureset(fs_file)
    shutil.rmtree(
        work / "warehouse", ignore_errors=True
    )  # a warehouse of an earlier run would add to this one's
    for db in DBS.values():
        redis.Redis.from_url(f"{args.redis}/{db}").flushdb()
    features_url = f"{args.redis}/{DBS['features']}"
    config = work / "serve.toml"
    config.write_text(
        f"window_ms = {WINDOW_MS}\nlateness_ms = {LATENESS_MS}\nttl_grace_ms = 5000\npoll_ms = 500\n"
    )
    common = ["--config", str(config), "--featureset", fs_file, "--features-url", features_url]
    common += ["--retrieval", str(work / "retrieval.npz"), "--n-retrieve", "300", "--n-rank", "100"]
    os.environ.setdefault("LEANREC_SECRET", "movielens-example-secret-0123456789")

    # Round 1: lean and naive, each with its joiner.
    procs, ports, wh = [], {}, {}
    for path, mode in (("lean", "lazy"), ("naive", "eager")):
        url = f"{args.redis}/{DBS[path]}"
        ports[path] = free_port()
        wh[path] = work / "warehouse" / path
        backends = ["--store-url", url, "--bus-url", url, "--logging", mode]
        serve = start(
            console, work / f"serve-{path}.log", "serve", *common, *backends, "--port", str(ports[path])
        )
        procs.append(serve)
        wait_healthy(ports[path], serve, work / f"serve-{path}.log")
        join_args = ["join", "--config", str(config), "--featureset", fs_file, *backends]
        procs.append(
            start(
                console,
                work / f"join-{path}.log",
                *join_args,
                "--warehouse",
                str(wh[path]),
                "--consumer",
                path,
            )
        )
    replays: dict[str, list[dict]] = {"lean": [], "naive": []}
    chunk_bounds = []
    for k in ROUND_1:
        run(console, "features", "load", "--featureset", fs_file, "--users", str(work / f"users_{k}.parquet"),
            "--items", str(work / f"items_{k}.parquet"), "--store-url", features_url)  # fmt: skip
        t0 = int(time.time() * 1000)
        for path in ("lean", "naive"):
            out = work / f"replay-{path}-{k}.json"
            run(console, "replay", "--target", f"http://127.0.0.1:{ports[path]}", "--sessions",
                str(work / f"sessions_{k}.parquet"), "--featureset", fs_file,
                "--out", str(out), "--seed", str(7 + args.seed))  # fmt: skip
            replays[path].append(json.loads(out.read_text()))
        chunk_bounds.append((k, t0))
    time.sleep((WINDOW_MS + LATENESS_MS) / 1000 + 4)  # the last windows close and the joiners write them
    stop(procs)

    # Round 1's figures.
    figures = {}
    tables = {}
    for path in ("lean", "naive"):
        layout = TableLayout.REQUEST if path == "lean" else TableLayout.IMPRESSION
        examples = ParquetWarehouse(str(wh[path]), fs, layout).read_examples()
        ts = examples.column("ts_ms").to_numpy() if "ts_ms" in examples.column_names else None
        chunk_of = np.full(examples.num_rows, ROUND_1[0])
        if ts is not None:
            for k, t0 in chunk_bounds:
                chunk_of[ts >= t0] = k
        skewed, fresh = skew(examples, fs, work, chunk_of, ROUND_1)
        last = replays[path][-1]["server"]
        clicks = int(pa.compute.sum(examples.column("click")).as_py())
        figures[path] = {
            "transient_store_bytes": int(last.get("leanrec_kv_bytes_written_total", 0)),
            "warehouse_bytes": warehouse_bytes(str(wh[path])),
            "warehouse_files": sum(1 for f in wh[path].rglob("*.parquet") if "_dead_letter" not in f.parts),
            "examples": examples.num_rows,
            "views_sent": sum(r["viewed"] for r in replays[path]),
            "labels_lost": sum(r["engagements"] for r in replays[path]) - clicks,
            "skewed_examples": skewed,
            "fresh_lookup_skew": fresh,
        }
        tables[path] = examples
    # Round 2: train on the lean warehouse, replay the held-out sessions against both rankers.
    run(
        console,
        "train",
        "--warehouse",
        str(wh["lean"]),
        "--out",
        str(work / "ranker.pt"),
        "--epochs",
        str(args.epochs),
        "--seed",
        seed,
    )
    held = f"{args.redis}/{DBS['held_out']}"
    procs, ports = [], {}
    for name, extra in (("retrieval", []), ("round 2", ["--model", str(work / "ranker.pt")])):
        ports[name] = free_port()
        log = work / f"serve-{name.replace(' ', '')}.log"
        backends = ["--store-url", held, "--bus-url", held, "--logging", "off"]
        p = start(console, log, "serve", *common, *backends, *extra, "--port", str(ports[name]))
        procs.append(p)
        wait_healthy(ports[name], p, log)
    held_out: dict[str, list[dict]] = {"retrieval": [], "round 2": []}
    for k in HELD_OUT:
        run(console, "features", "load", "--featureset", fs_file, "--users", str(work / f"users_{k}.parquet"),
            "--items", str(work / f"items_{k}.parquet"), "--store-url", features_url)  # fmt: skip
        for name in held_out:
            out = work / f"replay-{name.replace(' ', '')}-{k}.json"
            run(console, "replay", "--target", f"http://127.0.0.1:{ports[name]}", "--sessions",
                str(work / f"sessions_{k}.parquet"), "--featureset", fs_file,
                "--out", str(out), "--seed", str(7 + args.seed))  # fmt: skip
            held_out[name].append(json.loads(out.read_text()))
    stop(procs)
    ranking = {}
    for name, runs in held_out.items():
        n = sum(r["sessions"] for r in runs)
        ranking[name] = {
            "sessions": n,
            "ndcg@10": sum(r["ndcg@10"] * r["sessions"] for r in runs) / n,
            "recall@10": sum(r["recall@10"] * r["sessions"] for r in runs) / n,
            "engagements_per_session": sum(r["engagements"] for r in runs) / n,
        }

    t = Table(title="MovieLens 100K, round 1: lean against naive on the same replayed sessions")
    for col in ("", "naive", "lean", "lean / naive"):
        t.add_column(col, justify="left" if not col else "right")
    for key, label in (
        ("transient_store_bytes", "transient-store bytes"),
        ("warehouse_bytes", "warehouse bytes"),
        ("warehouse_files", "warehouse files (as the joiner's commits cut them)"),
        ("examples", "examples"),
        ("labels_lost", "labels lost"),
        ("skewed_examples", "skewed examples"),
        ("fresh_lookup_skew", "examples a fresh lookup would skew"),
    ):
        a, b = figures["naive"][key], figures["lean"][key]
        ratio = f"{b / a:.3f}" if a and key.endswith("bytes") else ""
        t.add_row(label, f"{a:,}", f"{b:,}", ratio)
    console.print(t)
    t = Table(title=f"{ranking['retrieval']['sessions']:,} held-out sessions (chunks 3-4): ranker, retrieval")
    for col in ("", "retrieval alone", "round-2 ranker", "ranker / retrieval"):
        t.add_column(col, justify="left" if not col else "right")
    for key in ("ndcg@10", "recall@10", "engagements_per_session"):
        a, b = ranking["retrieval"][key], ranking["round 2"][key]
        t.add_row(key.replace("_", " "), f"{a:.4f}", f"{b:.4f}", f"{b / a:.3f}" if a else "")
    console.print(t)
    same = comparable(tables["lean"]).equals(comparable(tables["naive"]))
    console.print(f"examples identical in both warehouses (but for request ids and wall times): {same}")
    results = {"round_1": figures, "held_out": ranking, "examples_equal": same}
    (work / "results.json").write_text(json.dumps(results, indent=2))
    console.print(f"results: {work / 'results.json'}")
    wrong = [
        *(["the two warehouses hold different examples"] if not same else []),
        *(f"{p}: {v} {k.replace('_', ' ')}" for p in figures for k in ("labels_lost", "skewed_examples")
          if (v := figures[p][k])),
        *(f"the round-2 ranker is not ahead of retrieval on {k}" for k in ranking["retrieval"]
          if k != "sessions" and ranking["round 2"][k] <= ranking["retrieval"][k]),
    ]  # fmt: skip
    if wrong:
        sys.exit("; ".join(wrong))


if __name__ == "__main__":
    main()
