"""A ranking service of one's own, logging through leanrec: the library's way in, end to end.

    python examples/own_ranker/rank_and_log.py [--requests 500] [--out own-ranker]
        [--store-url memory://] [--bus-url memory://]

A shop ranks its 5,000 products for each request with its own model (here a dot product of two-tower
vectors less a price term), then hands leanrec the ranked ids, the scores and the features it scored
them with, as numpy arrays by name (``featureset.toml`` beside this file declares them). Simulated
clients scroll (most see the first page, some scroll on, some faster than their pagination signal)
and click; a joiner in the same process turns it all into a warehouse. It runs the same traffic twice,
lazily and eagerly, and prints what each wrote to the transient store and the examples each kept.
Nothing here needs torch or a server; give ``--store-url``/``--bus-url`` a ``redis://`` URL to log
to Redis instead (then both runs share it: use an empty database).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

import leanrec
from leanrec.clock import ManualClock

HERE = Path(__file__).parent
N_PRODUCTS, N_USERS, RANKED = 5_000, 300, 100
WINDOW_MS = 60_000


class ShopRanker:
    """The shop's own ranker and the features it scores with (a stand-in for any model)."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.look = rng.normal(size=(N_PRODUCTS, 8)).astype(np.float32)
        self.price = rng.gamma(2.0, 15.0, size=N_PRODUCTS).astype(np.float32)
        self.taste = rng.normal(size=(N_USERS, 8)).astype(np.float32)
        self.region = rng.integers(30, size=N_USERS)
        self.bought = np.full((N_USERS, 20), -1)
        for u in range(N_USERS):
            k = rng.integers(0, 21)
            self.bought[u, :k] = rng.choice(N_PRODUCTS, size=k, replace=False)

    def rank(self, user: int, hour: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """The top products for ``user``, their scores, and every feature the scores came from."""
        scores = self.look @ self.taste[user] - 0.01 * self.price
        top = np.argsort(-scores)[:RANKED]
        features = {
            "region": self.region[user],
            "taste": self.taste[user],
            "bought": self.bought[user],
            "hour": hour,
            "sku": top,
            "price": self.price[top],
            "look": self.look[top],
        }
        return top, scores[top], features


def run(logging: str, args: argparse.Namespace, out: Path) -> dict[str, int]:
    """Rank, log, let the clients scroll and click, and join: returns what it cost and kept."""
    clock = ManualClock(1_700_000_000_000)
    log = leanrec.open_logging(
        HERE / "featureset.toml", args.store_url, args.bus_url, logging=logging, clock=clock,
        window_ms=WINDOW_MS, lateness_ms=10_000,
    )  # fmt: skip
    joiner = log.joiner(out / logging)
    ranker, rng = ShopRanker(seed=1), np.random.default_rng(2)
    for i in range(args.requests):
        user = int(rng.integers(N_USERS))
        items, scores, features = ranker.rank(user, hour=(i // 50) % 24)
        logged = log.ranked(user, items, features, scores)
        depth = min(int(rng.geometric(1 / 8)), RANKED)  # most see about the first page
        if depth > 6 and rng.random() < 0.7:  # the client signals the scroll (or is too fast to)
            log.paginate(logged.request_id, logged.token, depth - 1)
        clicks = [p for p in range(depth) if rng.random() < 0.3]
        events = [
            {"position": p, "item_id": int(items[p]), "kind": "view", "ts_ms": clock.now_ms()}
            for p in range(depth)
        ]
        events += [
            {"position": p, "item_id": int(items[p]), "kind": "click", "ts_ms": clock.now_ms()}
            for p in clicks
        ]
        log.events(logged.request_id, logged.token, events, batch_id="b0")
        clock.advance(20)  # 50 requests a second
    clock.advance(WINDOW_MS + 10_000 + 5_000)  # every window has closed
    joiner.drain()
    stats = log.parts.store.stats()
    return {"kv_bytes_written": stats.bytes_written, "examples": joiner.stats.examples,
            "labels_lost": joiner.stats.labels_lost}  # fmt: skip


def main() -> None:
    """Run the same traffic with eager and lazy logging and print them side by side."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--out", default="own-ranker", help="folder of the two warehouses")
    ap.add_argument("--store-url", default="memory://")
    ap.add_argument("--bus-url", default="memory://")
    args = ap.parse_args()
    out = Path(args.out)
    eager, lazy = run("eager", args, out), run("lazy", args, out)
    where = os.path.relpath(HERE / "featureset.toml")
    print(f"{args.requests} ranked requests of {RANKED} products, logged under {where}:")
    print(f"{'':24}{'eager':>14}{'lazy':>14}{'lazy / eager':>14}")
    for key in ("kv_bytes_written", "examples", "labels_lost"):
        ratio = f"{lazy[key] / eager[key]:.3f}" if eager[key] else "-"
        print(f"{key:24}{eager[key]:>14,}{lazy[key]:>14,}{ratio:>14}")
    print(f"warehouses: {out / 'eager'} (impression rows), {out / 'lazy'} (request rows)")


if __name__ == "__main__":
    main()
