"""The API against its own contract: requests generated from ``/openapi.json`` by schemathesis.

For every operation the service documents, schemathesis draws requests that fit the document
(positive) and requests that break it (negative), sends them to the app in process, and checks each
answer: no 5xx (nor an exception out of the app), a documented status code, a documented content type
and headers, a body that matches the documented schema, and every request that breaks the document
refused with a 4xx. A third of the positive pagination and event calls carry a genuine request id and
token, so they get past the token check to the calls' own checks and the logging behind them, and a
third the genuine request under a drawn signature, so forged tokens of any characters reach the
signature check.

One check is left out: ``positive_data_acceptance`` (a request that fits the document is answered
2xx). The document cannot say what only the service knows, and the service rightly refuses it: a
token it did not sign, a user not in its world, features that do not match its FeatureSet.

``LEANREC_FUZZ_CASES`` sets the cases per operation and mode (default 100), ``LEANREC_FUZZ_SEED`` the
seed (default 0: the same requests every run; another seed explores others). The test prints how
many cases it sent and what failed.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, seed, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from leanrec.featurefile import load_featureset
from leanrec.ids import scrambled_ids
from leanrec.schema import Side
from leanrec.serve.app import create_app
from leanrec.serve.config import ServeConfig
from leanrec.world import USER_SALT

CASES = int(os.environ.get("LEANREC_FUZZ_CASES", "100"))
SEED = int(os.environ.get("LEANREC_FUZZ_SEED", "0"))
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


def _world_app() -> tuple[FastAPI, dict[str, Any]]:
    """A service ranking a small synthetic world, and one ranking it made."""
    app = create_app(ServeConfig(n_users=400, n_items=3_000))
    with TestClient(app) as client:
        user = int(scrambled_ids(400, USER_SALT)[3])
        ranked = client.post("/v1/rank", json={"user_id": user}).json()
    return app, ranked


def _sidecar_app(path: Path) -> tuple[FastAPI, dict[str, Any]]:
    """A logging sidecar for the FeatureSet file at ``path``, and one ranking logged through it."""
    app = create_app(ServeConfig(featureset=str(path)))
    fs = load_featureset(path)
    features: dict[str, Any] = {}
    for side, rows in ((Side.REQUEST, None), (Side.ITEM, 30)):
        for slot in fs.layout(side).slots:
            f = slot.feature
            value = [0.5] * f.size if f.is_float else [1] * f.size
            features[f.name] = value if rows is None else [value] * rows
    with TestClient(app) as client:
        body = {"user_id": 7, "items": list(range(1, 31)), "features": features}
        logged = client.post("/v1/log", json=body)
        assert logged.status_code == 200, logged.text
    return app, logged.json()


def _fuzz(app: FastAPI, genuine: dict[str, Any]) -> tuple[Counter[str], dict[str, str]]:
    """Cases sent per operation and mode, and the distinct failures found (key: operation, mode, check)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    sent: Counter[str] = Counter()
    failures: dict[str, str] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in MODES:
            if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET":
                continue  # /healthz and /metrics take nothing: no request breaks their document
            _cases(operation, mode, genuine, sent, failures)
    return sent, failures


def _cases(
    operation: Any,
    mode: GenerationMode,
    genuine: dict[str, Any],
    sent: Counter[str],
    failures: dict[str, str],
) -> None:
    """Send ``CASES`` requests of one operation and mode; count them and gather what fails."""
    where = f"{operation.label} ({mode.value})"

    @seed(SEED)
    @settings(
        max_examples=CASES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],  # failures are gathered here, not shrunk
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def one(case: schemathesis.Case) -> None:
        body = case.body
        if mode is GenerationMode.POSITIVE and isinstance(body, dict) and isinstance(body.get("token"), str):
            # A third as drawn, a third genuine, a third the genuine claims under the drawn string as
            # the signature: forged tokens of every character, which reach the signature check itself.
            kind = sent[where] % 3
            if kind:
                claims = genuine["token"].split(".")[0]
                token = genuine["token"] if kind == 1 else f"{claims}.{body['token']}"[:512]
                body.update(request_id=genuine["request_id"], token=token)
        sent[where] += 1
        try:
            case.call_and_validate(excluded_checks=[positive_data_acceptance])
        except (Exception, BaseExceptionGroup) as exc:  # schemathesis raises a BaseExceptionGroup
            text = " ".join(str(exc).split())
            what = next((line.strip() for line in str(exc).splitlines() if line.strip()[:2] == "- "), "")
            key = f"{where}: {type(exc).__name__} {what or text[:120]}"
            failures.setdefault(key, f"{text[:1_500]} body={body!r:.300}")

    one()


@pytest.fixture(params=["world", "sidecar"])
def service(request: pytest.FixtureRequest, tmp_path: Path, shop_toml: str) -> tuple[FastAPI, dict[str, Any]]:
    if request.param == "world":
        return _world_app()
    (tmp_path / "shop.toml").write_text(shop_toml)
    return _sidecar_app(tmp_path / "shop.toml")


def test_every_answer_matches_the_api_document(
    service: tuple[FastAPI, dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    app, genuine = service
    t0 = time.perf_counter()
    sent, failures = _fuzz(app, genuine)
    took = time.perf_counter() - t0
    name = request.node.callspec.id
    lines = [
        f"contract ({name}, seed {SEED}): {sum(sent.values()):,} generated cases, {len(failures)} distinct "
        f"failures, {took:.1f} s; " + ", ".join(f"{k} {v}" for k, v in sorted(sent.items())),
        *(f"  {key}\n    {detail}" for key, detail in failures.items()),
    ]
    with capsys.disabled():  # the count is the figure of the run: shown whatever pytest captures
        print("\n" + "\n".join(lines))
    assert len(sent) == 10 and all(n >= min(CASES, 1) for n in sent.values()), sent  # nothing left out
    assert not failures, "\n".join(lines)
