"""What each feature costs: bytes logged, bytes stored, model input, late-ranker work.

Logged bytes follow from the FeatureSet (raw little-endian values, the request side once per
request, the item side once per logged item). Stored bytes are measured: the compressed size of the
feature's column chunks in the warehouse's Parquet metadata, per example. Model cost is the feature's
share of the input width and of the embedding lookups, and its share of the late ranker's work for
one request (first-layer multiply-adds and lookups it causes, against the whole forward pass counted
by torch's FLOP counter); its latency is that share of the measured p99 latency, an attribution
rather than a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.parquet as pq
import torch
from torch.utils.flop_counter import FlopCounterMode

from leanrec.models.ranker import LateRanker
from leanrec.schema import FeatureSet, Side
from leanrec.train.reader import warehouse_files
from leanrec.warehouse.store import _open_fs


@dataclass
class FeatureCost:
    """Costs of one feature.

    Attributes:
        logged_bytes: Bytes logged per request.
        stored_bytes: Warehouse bytes per example (compressed, measured).
        input_share: Share of the model's dense input width (dense) or of its lookups per request (ids).
        work_share: Share of the late ranker's work for one request.
        latency_ms: ``work_share`` of the measured p99 latency (an attribution).

    """

    logged_bytes: float
    stored_bytes: float
    input_share: float
    work_share: float
    latency_ms: float

    def weight(self, totals: FeatureCost) -> float:
        """One number to order by: the mean of the feature's shares of logged, stored and work."""
        return (
            self.logged_bytes / max(totals.logged_bytes, 1e-12)
            + self.stored_bytes / max(totals.stored_bytes, 1e-12)
            + self.work_share
        ) / 3


def stored_bytes_per_example(uri: str, fs: FeatureSet) -> dict[str, float]:
    """Compressed warehouse bytes of each feature's columns per example, from Parquet metadata."""
    filesystem, _ = _open_fs(uri)
    sizes: dict[str, int] = {}
    examples = 0
    names = {f.name for f in fs.features}
    for path in warehouse_files(uri):
        with filesystem.open_input_file(path) as handle:
            meta = pq.ParquetFile(handle).metadata
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                parts = col.path_in_schema.split(".")
                # Item features of request-level rows sit at items.list.element.<name>[...].
                name = parts[3] if parts[0] == "items" and len(parts) > 3 else parts[0]
                if name in names:
                    sizes[name] = sizes.get(name, 0) + col.total_compressed_size
                elif name == "position":
                    examples += col.num_values
    return {n: sizes.get(n, 0) / max(examples, 1) for n in names}


def _counted(fn, *args) -> float:
    """Multiply-adds of ``fn(*args)``, counted by torch's FLOP counter."""
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        fn(*args)
    return counter.get_total_flops() / 2


def _forward_work(model: LateRanker, n_items: int) -> tuple[float, float]:
    """Multiply-adds of one request with ``n_items`` items.

    Returns:
        The whole forward pass, and the part that exists for the history alone (its encoder and the
        target attention; 0 for a FeatureSet without a history).

    """
    req, item = model.fs.layout(Side.REQUEST), model.fs.layout(Side.ITEM)
    args = (
        torch.zeros(1, req.float_width),
        torch.full((1, req.int_width), -1, dtype=torch.long),
        torch.zeros(n_items, item.float_width),
        torch.full((n_items, item.int_width), -1, dtype=torch.long),
        torch.zeros(n_items, dtype=torch.long),
    )
    model.eval()
    history = 0.0
    if model.encoder is not None and model.history is not None:
        length = model.history.size
        tokens = torch.zeros(1, length, model.config.dim)
        history = _counted(model.encoder, tokens) + 2 * n_items * length * model.config.dim
    return _counted(model, *args), history


def feature_costs(
    model: LateRanker,
    warehouse: str,
    items_logged: float,
    items_ranked: int = 100,
    latency_p99_ms: float = 0.0,
) -> dict[str, FeatureCost]:
    """Costs of every feature of the model's FeatureSet.

    Args:
        model: The late ranker (its FeatureSet and layer sizes).
        warehouse: Warehouse whose stored bytes are measured.
        items_logged: Items whose features are logged per request (measured by the logger).
        items_ranked: Items the late ranker scores per request.
        latency_p99_ms: Measured p99 latency of one request; 0 leaves ``latency_ms`` at 0.

    """
    fs, cfg = model.fs, model.config
    stored = stored_bytes_per_example(warehouse, fs)
    req_in, item_in = (sum(m.out_features for m in model.input_layers(s).values()) for s in Side)
    dense_width = sum(f.size for f in fs.features if f.is_float)
    lookups = {
        f.name: f.size * (1 if f.side is Side.REQUEST else items_ranked)
        for f in fs.features
        if not f.is_float
    }
    total_lookups = sum(lookups.values())
    work: dict[str, float] = {}
    for f in fs.features:
        rows = 1 if f.side is Side.REQUEST else items_ranked
        if f.is_float:
            work[f.name] = f.size * (req_in if f.side is Side.REQUEST else item_in) * rows
        else:
            work[f.name] = lookups[f.name] * cfg.dim
    # The rest of the forward pass (towers, top MLP) is shared by all features and not attributed.
    forward, history = _forward_work(model, items_ranked)
    total = forward + total_lookups * cfg.dim
    if model.history is not None:  # the encoder and the target attention exist for the history
        work[model.history.name] += history
    out = {}
    for f in fs.features:
        per_value = f.dtype.itemsize * f.size
        logged = per_value * (1 if f.side is Side.REQUEST else items_logged)
        share = work[f.name] / total
        out[f.name] = FeatureCost(
            logged_bytes=float(logged),
            stored_bytes=stored[f.name],
            input_share=f.size / dense_width if f.is_float else lookups[f.name] / total_lookups,
            work_share=share,
            latency_ms=share * latency_p99_ms,
        )
    return out


def totals(costs: dict[str, FeatureCost]) -> FeatureCost:
    """Sums over features."""
    c = list(costs.values())
    return FeatureCost(
        sum(x.logged_bytes for x in c),
        sum(x.stored_bytes for x in c),
        sum(x.input_share for x in c),
        sum(x.work_share for x in c),
        sum(x.latency_ms for x in c),
    )
