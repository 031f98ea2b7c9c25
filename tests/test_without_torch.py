"""The logging plumbing runs without torch: only training and the models need the ``train`` extra."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NO_TORCH = "import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "


def _run(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH + code, *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_the_library_example_logs_and_joins_without_torch(tmp_path: Path) -> None:
    example = ROOT / "examples" / "own_ranker" / "rank_and_log.py"
    done = _run(
        "runpy.run_path(sys.argv[0], run_name='__main__')",
        str(example), "--requests", "120", "--out", str(tmp_path / "out"),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines() if line.split()}
    eager, lazy, _ = rows["examples"]
    assert eager == lazy and int(lazy.replace(",", "")) > 120
    assert rows["labels_lost"][:2] == ["0", "0"]
    assert float(rows["kv_bytes_written"][2]) < 0.2  # lazy writes a fraction of what eager writes
    assert (tmp_path / "out" / "lazy").is_dir()


def test_the_plumbing_imports_no_torch_and_a_command_that_needs_it_says_so(tmp_path: Path) -> None:
    done = _run(
        "import leanrec.serve.app, leanrec.join.worker, leanrec.warehouse.store, leanrec.featurefile; "
        "from leanrec import open_logging; from leanrec.cli import main; "
        "sys.exit(main(['train', '--warehouse', sys.argv[0], '--out', 'm.pt']))",
        str(tmp_path),
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert "pip install 'leanrec[train]'" in done.stderr and len(done.stderr.strip().splitlines()) == 1
