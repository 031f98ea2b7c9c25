"""The token key: no deployment signs with the built-in development secret, and keys rotate.

The built-in secret is in leanrec's source, so anyone can sign tokens with it: ``leanrec serve`` (and
the sidecar, and ``create_app``) refuse to start with it unless told this is a development run, and
the library refuses it on shared backends (on ``memory://`` it signs with a key of its own, which no
other process needs). During a rotation tokens signed with the previous key are still accepted.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

import leanrec
from leanrec.clock import SystemClock
from leanrec.events import RequestRef
from leanrec.featurefile import parse_featureset
from leanrec.ids import scrambled_ids
from leanrec.serve.app import create_app
from leanrec.serve.config import DEVELOPMENT_SECRET, ConfigError, ServeConfig
from leanrec.serve.rankinglog import Logged, RankingLog
from leanrec.serve.tokens import TokenError, TokenSigner
from leanrec.world import USER_SALT

SMALL = ["--n-users", "400", "--n-items", "3000"]
USER = int(scrambled_ids(400, USER_SALT)[3])
OLD, NEW = "the-key-of-last-month-0123456789", "the-key-of-this-month-9876543210"


@pytest.fixture
def no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """No key in the environment (the test suite sets one for every test)."""
    monkeypatch.delenv("LEANREC_SECRET", raising=False)
    monkeypatch.delenv("LEANREC_SECRET_PREVIOUS", raising=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(argv: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "leanrec.cli", "serve", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LEANREC_SECRET", "LEANREC_SECRET_PREVIOUS")}
    return {**env, **extra}


def _refused(argv: list[str], env: dict[str, str]) -> str:
    """Run ``leanrec serve``; it must exit 2 at once with one line on stderr; returns that line."""
    proc = _serve(argv, env)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"leanrec serve {' '.join(argv)} started instead of refusing the development secret")
    assert proc.returncode == 2, (out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def shop_file(tmp_path: Path, shop_toml: str) -> Path:
    path = tmp_path / "shop.toml"
    path.write_text(shop_toml)
    return path


@pytest.mark.parametrize(
    ("extra_env", "config_text"),
    [
        ({}, ""),
        ({"LEANREC_SECRET": ""}, ""),
        ({}, f'secret = "{DEVELOPMENT_SECRET}"\n'),
        ({"LEANREC_SECRET": NEW}, f'secret_previous = "{DEVELOPMENT_SECRET}"\n'),
    ],
    ids=["no key", "an empty key", "the built-in key in the config", "the built-in key as the previous one"],
)
@pytest.mark.parametrize("sidecar", [False, True], ids=["world", "sidecar"])
def test_serve_refuses_to_sign_with_the_development_secret(
    tmp_path: Path, shop_file: Path, extra_env: dict[str, str], config_text: str, sidecar: bool
) -> None:
    config = tmp_path / "leanrec.toml"
    config.write_text(config_text)
    argv = ["--config", str(config), "--port", str(_free_port())]
    argv += ["--featureset", str(shop_file)] if sidecar else SMALL
    line = _refused(argv, _env(**extra_env))
    assert "development secret" in line
    assert "LEANREC_SECRET" in line
    assert "--dev" in line


def _healthy(argv: list[str], env: dict[str, str]) -> str:
    """Start ``leanrec serve``, wait for /healthz to answer 200, stop it; returns what it printed."""
    port = _free_port()
    proc = _serve([*argv, "--port", str(port)], env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"leanrec serve exited {proc.returncode}: {out} {err}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail("leanrec serve did not answer /healthz in 60 s")
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    return out


@pytest.mark.parametrize("how", ["LEANREC_SECRET", "--dev", "development = true"])
def test_serve_starts_with_a_key_of_its_own_or_as_a_development_run(tmp_path: Path, how: str) -> None:
    config = tmp_path / "leanrec.toml"
    config.write_text("development = true\n" if how == "development = true" else "")
    argv = ["--config", str(config), *SMALL, *(["--dev"] if how == "--dev" else [])]
    out = _healthy(argv, _env(LEANREC_SECRET=NEW) if how == "LEANREC_SECRET" else _env())
    said = " ".join(out.split())
    if how == "LEANREC_SECRET":
        assert "development" not in said
    else:  # a development run says so, where it starts
        assert "development run" in said and "development secret" in said


def test_a_development_flag_must_be_a_boolean(tmp_path: Path) -> None:
    config = tmp_path / "leanrec.toml"
    config.write_text('development = "yes"\n')
    with pytest.raises(ConfigError, match="development must be true or false"):
        ServeConfig.load(config)


@pytest.mark.usefixtures("no_secret")
def test_create_app_refuses_the_development_secret_too() -> None:
    with pytest.raises(ConfigError, match="development secret"):
        create_app(ServeConfig(n_users=400, n_items=3_000))
    with TestClient(create_app(ServeConfig(n_users=400, n_items=3_000, development=True))) as client:
        assert client.post("/v1/rank", json={"user_id": USER}).status_code == 200


# ------------------------------------------------------------------------------------------ rotation
def test_a_rotated_signer_signs_with_the_new_key_and_accepts_the_previous_one() -> None:
    now = SystemClock().now_ms()
    ref = RequestRef("r1", 7, now, 100)
    old = TokenSigner(OLD.encode(), 60_000)
    rotated = TokenSigner(NEW.encode(), 60_000, previous=OLD.encode())
    assert rotated.check(old.sign(ref), "r1", now) == ref  # a token handed out before the rotation
    assert rotated.check(rotated.sign(ref), "r1", now) == ref
    with pytest.raises(TokenError, match="signature does not match"):
        old.check(rotated.sign(ref), "r1", now)  # signed with the new key, not the old one
    stranger = TokenSigner(b"somebody-else-entirely-0123456789", 60_000)
    with pytest.raises(TokenError, match="signature does not match"):
        rotated.check(stranger.sign(ref), "r1", now)


@pytest.mark.parametrize("where", ["config", "environment"])
def test_serve_accepts_tokens_of_the_previous_key_during_a_rotation(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    # The process of last month and the one that replaces it share one Redis, as a rolling restart does.
    settings = {"store_url": redis_url, "bus_url": redis_url, "n_users": 400, "n_items": 3_000}
    monkeypatch.setenv("LEANREC_SECRET", OLD)
    with TestClient(create_app(ServeConfig(**settings))) as before:
        old = before.post("/v1/rank", json={"user_id": USER}).json()
    monkeypatch.setenv("LEANREC_SECRET", NEW)
    if where == "environment":
        monkeypatch.setenv("LEANREC_SECRET_PREVIOUS", OLD)
        config = ServeConfig(**settings, secret_previous="not-the-key-0123456789abcdef")  # env wins
    else:
        config = ServeConfig(**settings, secret_previous=OLD)
    with TestClient(create_app(config)) as after:
        now = SystemClock().now_ms()
        event = {"position": 0, "item_id": old["items"][0], "kind": "click", "ts_ms": now}
        auth = {"request_id": old["request_id"], "token": old["token"]}
        r = after.post("/v1/events", json={**auth, "batch_id": "b1", "events": [event]})
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == 1
        r = after.post("/v1/paginate", json={**auth, "seen_up_to": 20})
        assert r.status_code == 200, r.text
        new = after.post("/v1/rank", json={"user_id": USER}).json()
        assert TokenSigner(NEW.encode(), 60_000).check(new["token"], new["request_id"], now + 1)
        forged = TokenSigner(b"somebody-else-entirely-0123456789", 10**9).sign(
            RequestRef(old["request_id"], USER, now, 100)
        )
        r = after.post("/v1/events", json={**auth, "token": forged, "batch_id": "b2", "events": [event]})
        assert r.status_code == 401


# ------------------------------------------------------------------------------------------ library
def _ranked(log: RankingLog, shop_features) -> tuple[Logged, np.ndarray]:
    rng = np.random.default_rng(3)
    items = rng.choice(5000, 20, replace=False)
    return log.ranked(7, items, shop_features(rng, items)), items


@pytest.mark.usefixtures("no_secret")
def test_the_library_refuses_the_development_secret_on_shared_backends(
    redis_url: str, shop_toml: str
) -> None:
    fs = parse_featureset(shop_toml)
    with pytest.raises(ConfigError, match="development secret") as refused:
        leanrec.open_logging(fs, redis_url, redis_url)
    assert "LEANREC_SECRET" in str(refused.value) and "development=True" in str(refused.value)
    with pytest.raises(ConfigError, match="development secret"):
        leanrec.open_logging(fs, "memory://", redis_url)
    leanrec.open_logging(fs, redis_url, redis_url, development=True)
    leanrec.open_logging(fs, redis_url, redis_url, secret=NEW)


@pytest.mark.usefixtures("no_secret")
def test_the_library_in_one_process_signs_with_a_key_of_its_own(shop_toml: str, shop_features) -> None:
    # memory:// backends: no other process can check these tokens, so no shared key is needed, and
    # none that anyone can read is used.
    fs = parse_featureset(shop_toml)
    one, two = leanrec.open_logging(fs), leanrec.open_logging(fs)
    logged, _ = _ranked(one, shop_features)
    now = SystemClock().now_ms()
    assert one.paginate(logged.request_id, logged.token, 10) >= 0
    for signer in (TokenSigner(DEVELOPMENT_SECRET.encode(), 10**9), two.parts.signer):
        with pytest.raises(TokenError, match="signature does not match"):
            signer.check(logged.token, logged.request_id, now)


def test_the_library_accepts_the_previous_key(
    redis_url: str, shop_toml: str, shop_features, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LEANREC_SECRET", raising=False)
    fs = parse_featureset(shop_toml)
    before = leanrec.open_logging(fs, redis_url, redis_url, secret=OLD)
    logged, items = _ranked(before, shop_features)
    after = leanrec.open_logging(fs, redis_url, redis_url, secret=NEW, secret_previous=OLD)
    click = [{"position": 1, "item_id": int(items[1]), "kind": "click", "ts_ms": SystemClock().now_ms()}]
    assert after.events(logged.request_id, logged.token, click, batch_id="b1").accepted == 1
    stranger = leanrec.open_logging(fs, redis_url, redis_url, secret="somebody-else-entirely-0123456789")
    with pytest.raises(TokenError, match="signature does not match"):
        stranger.paginate(logged.request_id, logged.token, 3)
