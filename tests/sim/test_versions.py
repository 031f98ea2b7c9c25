"""Serving and logging a FeatureSet version that retired features: a lean run writes a v2 warehouse."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from leanrec.clock import ManualClock
from leanrec.funnel import Funnel
from leanrec.sim.demo import check_examples
from leanrec.sim.pipeline import PipelineConfig, Plumbing, build_pipeline
from leanrec.sim.traffic import TrafficConfig, TrafficSim
from leanrec.train.reader import iter_batches, warehouse_files
from leanrec.warehouse.store import WarehouseError, featureset_of
from leanrec.warehouse.tables import FEATURESET_KEY
from leanrec.world import World

RETIRED = {
    "u_taste_00": "audit",
    "i_click_rate": "audit",
    "u_noise_11": "noise",
    "u_emb_3": "stale",
    "u_hist_creator": "no gain",
    "c_surface": "no gain",
    "i_noise_emb": "stale",
    "i_creator": "no gain",
}


def test_a_lean_run_under_a_pruned_featureset_writes_a_v2_warehouse(
    small_world: World, tmp_path: Path
) -> None:
    fs = small_world.featureset
    pruned = fs.retire(RETIRED)
    clock, pconf = ManualClock(), PipelineConfig()
    pipe = build_pipeline(Plumbing.LEAN, pruned, clock, tmp_path / "wh", pconf)
    funnel = Funnel(small_world, featureset=pruned)
    sim = TrafficSim(
        small_world, funnel, [pipe], clock, TrafficConfig(requests=120, seed=4, late_share=0.0), pconf
    )
    stats = sim.run()
    assert pipe.logger.stats.write_failures == 0
    uri = str(tmp_path / "wh")
    files = warehouse_files(uri)
    assert files
    for f in files:
        assert pq.read_schema(f).metadata[FEATURESET_KEY].decode() == pruned.to_json()
    assert featureset_of(uri) == pruned
    table = pipe.warehouse.read_examples()
    assert set(table.column("fs_version").to_pylist()) == {2}
    assert not set(RETIRED) & set(table.column_names)
    assert table.num_rows == stats.viewed > 120  # every view joined (no batch is sent late here)
    # byte for byte what the pruned late ranker scored
    skewed, _ = check_examples(pruned, table, sim.scored, small_world)
    assert skewed == 0
    assert sum(b.n_items for b in iter_batches(uri, pruned)) == table.num_rows
    with pytest.raises(WarehouseError, match=r"newer version \(v2 > v1\)"):
        iter_batches(uri, fs)
