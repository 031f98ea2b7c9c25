"""The commands' tables in an 80-column terminal: every name and number printed whole, no cell cut."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from leanrec.cli import main


def _whole(text: str, *values: str) -> None:
    assert "…" not in text, text
    tokens = set(re.sub(r"[│┃┏┓┗┛┡┩╇━─┳┻]", " ", text).split())
    missing = [v for v in values if v not in tokens]
    assert not missing, (missing, text)


def test_the_commands_print_whole_tables_in_80_columns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`leanrec breakeven` and `leanrec plan` as a user runs them in an 80-column terminal."""
    monkeypatch.setenv("COLUMNS", "80")
    folder = tmp_path / "toy"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = {(u, int(i)) for u in range(40) for i in rng.choice(30, 12, replace=False)}
    (folder / "toy.inter").write_text(
        "user_id:token\titem_id:token\n" + "".join(f"u{u}\ti{i}\n" for u, i in sorted(rows))
    )
    assert main(["breakeven", "--data", str(folder), "--models", "Pop,ItemKNN"]) == 0
    out = capsys.readouterr().out
    _whole(out, "Pop", "ItemKNN")
    assert "Recall@10" in out or "R@10 = Recall@10" in " ".join(out.split())
    assert max(len(line.rstrip()) for line in out.splitlines()) <= 80
    report = tmp_path / "report.json"
    report.write_text(
        json.dumps(
            {
                "requests": 1000,
                "traffic": {"ranked_per_request": 100.0},
                "kv_bytes_written": {"naive": 1_000_000_000, "lean": 50_000_000},
                "warehouse_bytes": {"naive": 40_000_000, "lean": 20_000_000},
                "examples": {"naive": 9000, "lean": 9000},
                "energy": {
                    p: {
                        "stages": {"serialize": {"total": 300.0}},
                        "coefficients": {
                            "watts_per_core": 10.0,
                            "network_j_per_byte": 5e-9,
                            "storage_write_j_per_byte": 15e-9,
                            "storage_w_per_tb": 1.0,
                        },
                        "power_source": "test",
                    }
                    for p in ("naive", "lean")
                },
            }
        )
    )
    assert main(["plan", "--report", str(report), "--dau", "2e6", "--grid-intensity", "300"]) == 0
    out = capsys.readouterr().out
    _whole(out, "2e+06", "0.500", "1.000")
    assert max(len(line.rstrip()) for line in out.splitlines()) <= 80
