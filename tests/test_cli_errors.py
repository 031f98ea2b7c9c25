"""Every mistake a user makes on the command line is refused with one line, exit code 2, no traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from leanrec.cli import main
from leanrec.models.ranker import LateRanker, RankerConfig
from leanrec.schema import Feature, FeatureSet, Kind, Owner
from leanrec.sim.demo import run_demo
from leanrec.train.trainer import save_checkpoint
from leanrec.world import WorldConfig

SMALL = WorldConfig(n_users=400, n_items=3_000, n_creators=200, seed=5)
SMALL_SERVE = ["--n-users", "400", "--n-items", "3000"]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A demo folder (which holds two warehouses), an untrained checkpoint of its FeatureSet, junk files."""
    root = tmp_path_factory.mktemp("cli-errors")
    demo = root / "leanrec-demo"
    result = run_demo(40, 3, demo, world_config=SMALL)
    lean = demo / "warehouse" / "lean"
    fs = result.pipelines[next(iter(result.pipelines))].logger.fs
    model = root / "model.pt"
    save_checkpoint(LateRanker(fs, RankerConfig(dim=8, hidden=16)), model)
    other = FeatureSet(
        "other",
        1,
        (
            Feature("u_hist", Owner.USER, Kind.SEQUENCE, 5, 100),
            Feature("i_id", Owner.ITEM, Kind.SPARSE, 1, 100),
        ),
    )
    other_model = root / "other.pt"
    save_checkpoint(LateRanker(other, RankerConfig(dim=8, hidden=16)), other_model)
    junk = root / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    listed = root / "list.json"
    listed.write_text("[1, 2, 3]")
    bad_toml = root / "bad.toml"
    bad_toml.write_text("port = \n")
    (root / "empty").mkdir()
    (root / "no-inter").mkdir()
    return {
        "root": root,
        "demo": demo,
        "lean": lean,
        "model": model,
        "other_model": other_model,
        "junk": junk,
        "list": listed,
        "bad_toml": bad_toml,
        "empty": root / "empty",
        "no_inter": root / "no-inter",
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port something listens on for the test's length."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        yield s.getsockname()[1]


def _one_line_refusal(capsys: pytest.CaptureFixture[str], argv: list[str], *words: str) -> str:
    """Run the command; it must exit 2 with one line on stderr naming ``words``, and no traceback."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse refuses a flag by exiting
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2, (argv, out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# (case id, argv with {placeholders} of the `made` fixture, words the message must hold)
CASES = [
    # evaluate
    (
        "evaluate a folder that holds warehouses",
        "evaluate --model {model} --warehouse {demo}",
        ("is not a warehouse but holds warehouses", "warehouse/lean", "give one of them"),
    ),
    (
        "evaluate a missing warehouse",
        "evaluate --model {model} --warehouse {root}/nowhere",
        ("does not exist",),
    ),
    ("evaluate an empty folder", "evaluate --model {model} --warehouse {empty}", ("holds no Parquet files",)),
    ("evaluate a file as warehouse", "evaluate --model {model} --warehouse {junk}", ("is not a folder",)),
    (
        "evaluate a model that is not a checkpoint",
        "evaluate --model {junk} --warehouse {lean}",
        ("is not a readable checkpoint", "leanrec train"),
    ),
    ("evaluate a JSON file as model", "evaluate --model {list} --warehouse {lean}", ("checkpoint",)),
    (
        "evaluate a folder as model",
        "evaluate --model {empty} --warehouse {lean}",
        ("not a readable checkpoint",),
    ),
    ("evaluate a missing model", "evaluate --model {root}/none.pt --warehouse {lean}", ("does not exist",)),
    (
        "evaluate a model of another FeatureSet",
        "evaluate --model {other_model} --warehouse {lean}",
        ("expects FeatureSet other v1",),
    ),
    # train
    ("train on a folder of warehouses", "train --warehouse {demo} --out {root}/m.pt", ("holds warehouses",)),
    (
        "train into a missing folder",
        "train --warehouse {lean} --out {root}/no/such/m.pt",
        ("must be a file path in an existing folder",),
    ),
    (
        "train with a FeatureSet file that is not one",
        "train --warehouse {lean} --out {root}/m.pt --featureset {list}",
        ("is not valid TOML",),
    ),
    (
        "train with --epochs 0",
        "train --warehouse {lean} --out {root}/m.pt --epochs 0",
        ("--epochs", "--help"),
    ),
    # audit
    ("audit a folder of warehouses", "audit --model {model} --warehouse {demo}", ("holds warehouses",)),
    ("audit a junk model", "audit --model {junk} --warehouse {lean}", ("not a readable checkpoint",)),
    (
        "audit into a file",
        "audit --model {model} --warehouse {lean} --out {junk}",
        ("--out", "exists and is not a folder"),
    ),
    ("audit with a negative budget", "audit --model {model} --warehouse {lean} --budget -1", ("budget",)),
    # plan
    ("plan without a report", "plan --report {root}/none.json --dau 10", ("run `leanrec demo` first",)),
    ("plan a folder as report", "plan --report {empty} --dau 10", ("cannot read --report", "Is a directory")),
    ("plan a binary file as report", "plan --report {model} --dau 10", ("not a leanrec demo report",)),
    ("plan a JSON list as report", "plan --report {list} --dau 10", ("not a leanrec demo report",)),
    ("plan with a negative --dau", "plan --report {list} --dau -5", ("--dau", "must be above 0")),
    # breakeven
    ("breakeven on a missing folder", "breakeven --data {root}/nowhere", ("no such file or folder",)),
    ("breakeven on a file", "breakeven --data {junk}", ("a file, not a folder",)),
    (
        "breakeven on a folder without its .inter",
        "breakeven --data {no_inter}",
        ("is not a RecBole dataset folder", "no-inter.inter"),
    ),
    (
        "breakeven with unknown models",
        "breakeven --data {no_inter} --models Pop,Nope",
        ("unknown models", "Nope"),
    ),
    ("breakeven with no models", "breakeven --data {no_inter} --models ,", ("--models is empty",)),
    # demo
    ("demo into a file", "demo --out {junk} --requests 3", ("exists and is not a folder",)),
    ("demo with --requests 0", "demo --requests 0", ("--requests", "must be at least 1")),
    # serve and join
    ("serve a missing config", "serve --config {root}/none.toml", ("config file", "does not exist")),
    ("serve an invalid config", "serve --config {bad_toml}", ("is not valid TOML",)),
    ("serve on port 70000", "serve --port 70000", ("port must be at most 65535",)),
    (
        "serve an unknown store",
        "serve --store-url foo://x",
        ("store_url must be memory://, redis://host:port/db or redis+cluster",),
    ),
    ("serve a Redis URL without a port number", "serve --bus-url redis://127.0.0.1:x/0", ("not a number",)),
    ("serve with bad logging", "serve --logging loud", ("logging must be lazy, eager or off",)),
    ("join on an in-process bus", "join --warehouse {root}/wh", ("needs a shared bus",)),
    ("join for -1 seconds", "join --max-seconds -1", ("--max-seconds", "must be above 0")),
    # simulate
    ("simulate a remote host", "simulate --target http://example.com", ("loopback",)),
    ("simulate a target without scheme", "simulate --target 127.0.0.1:8000", ("http:// URL",)),
    ("simulate for -1 seconds", "simulate --target http://127.0.0.1:1 --seconds -1", ("--seconds",)),
    # no command at all
    ("no command", "", ("required",)),
]


@pytest.mark.parametrize(("argv", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_mistake_is_one_line_and_exit_code_2(
    made: dict[str, Path], capsys: pytest.CaptureFixture[str], argv: str, words: tuple[str, ...]
) -> None:
    _one_line_refusal(capsys, argv.format(**made).split(), *words)


def test_a_target_where_nothing_listens_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    port = _free_port()
    argv = ["simulate", "--target", f"http://127.0.0.1:{port}", "--requests", "2", *SMALL_SERVE]
    _one_line_refusal(capsys, argv, f"no service answers at http://127.0.0.1:{port}", "leanrec serve")


def test_a_target_that_is_not_a_leanrec_service_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    # A listener that answers every connection with a line that is not HTTP, as a Redis port would.
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"-ERR unknown command\r\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        argv = ["simulate", "--target", f"http://127.0.0.1:{port}", "--requests", "1", *SMALL_SERVE]
        _one_line_refusal(capsys, argv, f"no service answers at http://127.0.0.1:{port}")
        thread.join(5)


def test_serve_refuses_a_taken_port_before_it_builds_anything(
    taken_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["serve", "--port", str(taken_port), *SMALL_SERVE]
    _one_line_refusal(capsys, argv, f"cannot listen on 127.0.0.1:{taken_port}", "--port")


@pytest.mark.parametrize("flag", ["--store-url", "--bus-url"])
def test_serve_and_join_refuse_a_redis_that_does_not_answer(
    made: dict[str, Path], capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    url = f"redis://127.0.0.1:{_free_port()}/0"
    serve = ["serve", flag, url, "--port", str(_free_port()), *SMALL_SERVE]
    _one_line_refusal(capsys, serve, "is not answering", url, "start it")
    join = ["join", "--bus-url", url, "--store-url", url, "--warehouse", str(made["root"] / "wh")]
    _one_line_refusal(capsys, [*join, *SMALL_SERVE, "--max-seconds", "1"], "is not answering", "start it")


def test_a_warehouse_that_cannot_be_created_is_an_input_error(made: dict[str, Path]) -> None:
    from leanrec.errors import InputError
    from leanrec.warehouse.store import ParquetWarehouse

    fs = FeatureSet("t", 1, (Feature("i_id", Owner.ITEM, Kind.SPARSE, 1, 100),))
    with pytest.raises(InputError, match="cannot create the warehouse folder"):
        ParquetWarehouse(str(made["junk"] / "wh"), fs)  # under a file: no folder can be made there


def test_serve_refuses_a_database_redis_does_not_have(capsys: pytest.CaptureFixture[str]) -> None:
    import redis

    client = redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=0.5)
    try:
        client.ping()
    except redis.exceptions.RedisError:
        pytest.skip("no Redis on 127.0.0.1:6379 to refuse database 999")
    finally:
        client.close()
    argv = ["serve", "--store-url", "redis://127.0.0.1:6379/999", "--port", str(_free_port()), *SMALL_SERVE]
    _one_line_refusal(capsys, argv, "Redis refused", "database number")


def test_a_long_message_stays_on_one_line_in_a_narrow_terminal(
    made: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    line = _one_line_refusal(
        capsys,
        ["evaluate", "--model", str(made["model"]), "--warehouse", str(made["demo"])],
        "give one of them",
    )
    assert len(line) > 40


def test_the_console_script_prints_no_traceback(made: dict[str, Path]) -> None:
    """The command end to end, in its own process, on a mistake users report (the rest run in process)."""
    argv = ["simulate", "--target", f"http://127.0.0.1:{_free_port()}", "--requests", "1", *SMALL_SERVE]
    done = subprocess.run(
        [sys.executable, "-m", "leanrec.cli", *argv], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: no service answers at http://127.0.0.1:")


@pytest.mark.parametrize("command", ["serve", "join"])
def test_shared_rows_is_a_flag_of_serve_and_join_over_the_config_file(command: str, tmp_path: Path) -> None:
    from leanrec.cli import _config, build_parser

    toml = tmp_path / "serve.toml"
    toml.write_text("shared_rows = false\n")
    parser = build_parser()
    assert _config(parser.parse_args([command, "--config", str(toml), "--shared-rows"])).shared_rows is True
    assert _config(parser.parse_args([command, "--config", str(toml)])).shared_rows is False
    toml.write_text("shared_rows = true\n")
    assert _config(parser.parse_args([command, "--config", str(toml)])).shared_rows is True
    assert build_parser().parse_args(["demo", "--shared-rows"]).shared_rows is True
