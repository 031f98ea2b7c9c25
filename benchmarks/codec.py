"""The logged blob's cost against a plain memory copy of the same bytes.

    python benchmarks/codec.py

For each blob kind of the demo FeatureSet, times encode and decode (median of repeats) and a copy
of a bytes object of the same size, and prints the ratios. A ratio near 1 means the codec adds
little beyond moving the bytes.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from leanrec.featurelog import codec
from leanrec.funnel import Funnel
from leanrec.world import World


def timed(fn, repeat: int = 7, inner: int = 200) -> float:
    """Median seconds per call."""
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def main() -> None:
    world = World()
    fs = world.featureset
    batch = Funnel(world).rank(np.arange(4), np.zeros(4, np.int64), np.zeros(4, np.int64))
    req, items, ids = batch.request.take(slice(0, 1)), batch.items.take(slice(0, 100)), batch.item_ids[0]
    scores = batch.scores[0]  # logged with the items, as the loggers do
    page = items.take(slice(6, 15))
    user_blob = codec.encode_request(fs, req)
    page_blob = codec.encode_page(fs, 6, ids[6:15], page, scores[6:15])
    imp_blobs = codec.encode_impressions(fs, ids, req, items, scores)
    cases = {
        "request side (1 row)": (
            lambda: codec.encode_request(fs, req),
            lambda: codec.decode_request(fs, user_blob),
            len(user_blob),
        ),
        "page (9 items)": (
            lambda: codec.encode_page(fs, 6, ids[6:15], page, scores[6:15]),
            lambda: codec.decode_page(fs, page_blob),
            len(page_blob),
        ),
        "100 impressions (naive)": (
            lambda: codec.encode_impressions(fs, ids, req, items, scores),
            lambda: codec.decode_impressions(fs, imp_blobs),
            sum(map(len, imp_blobs)),
        ),
    }
    table = Table(title="codec cost against a memory copy of the same bytes (median of 7)")
    for col in ("blob", "bytes", "copy µs", "encode µs", "decode µs", "encode / copy", "decode / copy"):
        table.add_column(col, justify="left" if col == "blob" else "right")
    for name, (enc, dec, size) in cases.items():
        src = bytearray(size)
        copy = timed(lambda src=src: bytes(src))
        e, d = timed(enc), timed(dec)
        table.add_row(
            name,
            f"{size:,}",
            f"{copy * 1e6:.2f}",
            f"{e * 1e6:.2f}",
            f"{d * 1e6:.2f}",
            f"{e / copy:.1f}",
            f"{d / copy:.1f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
