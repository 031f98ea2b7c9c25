"""The replayed user: how far they scroll, how a list is scored, what a sessions file must hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from leanrec.sim.client import TargetError
from leanrec.sim.replay import SessionsError, ranking_metrics, read_sessions, scroll_depth, served_catalog


def test_a_user_gives_up_patience_positions_after_the_last_engagement() -> None:
    assert scroll_depth(np.array([], int), 100, head=6, patience=10) == 16
    assert scroll_depth(np.array([3, 14, 24]), 100, head=6, patience=10) == 35
    assert scroll_depth(np.array([3, 14, 25]), 100, head=6, patience=10) == 25  # 10 misses after 14: gone
    assert scroll_depth(np.array([3, 40]), 100, head=6, patience=10) == 16  # 40 is never reached
    assert scroll_depth(np.array([95]), 100, head=90, patience=10) == 100


def test_ndcg_and_recall_at_10() -> None:
    ranked = np.arange(100)
    assert ranking_metrics(ranked, np.array([0])) == (1.0, 1.0)
    ndcg, recall = ranking_metrics(ranked, np.array([1, 50]))
    assert recall == 0.5 and ndcg == pytest.approx((1 / np.log2(3)) / (1 + 1 / np.log2(3)))
    assert ranking_metrics(ranked, np.array([], int)) == (0.0, 0.0)


def test_a_sessions_file_needs_users_items_and_the_context(tmp_path: Path) -> None:
    pq.write_table(
        pa.table({"user_id": [1, 2], "items": [[3, 4], [5]], "hour": [1, 2]}), tmp_path / "s.parquet"
    )
    s = read_sessions(tmp_path / "s.parquet", ["hour"])
    assert len(s) == 2 and s.items[0].tolist() == [3, 4] and s.context["hour"].tolist() == [1, 2]
    with pytest.raises(SessionsError, match="weekday"):
        read_sessions(tmp_path / "s.parquet", ["weekday"])
    with pytest.raises(SessionsError, match="does not exist"):
        read_sessions(tmp_path / "none.parquet", [])


def test_replay_refuses_a_world_or_a_sidecar() -> None:
    with pytest.raises(TargetError, match="synthetic world"):
        served_catalog({"catalog": {"world": {"n_users": 5}}}, "http://x", None)
    with pytest.raises(TargetError, match="ranks nothing"):
        served_catalog({"catalog": {"world": None, "ranks": False, "featureset": "shop"}}, "http://x", None)
