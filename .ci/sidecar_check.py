"""Start ``leanrec serve --featureset FILE`` and log one ranking through ``POST /v1/log``.

    python .ci/sidecar_check.py LEANREC_COMMAND FEATURESET_FILE

Run by ``.ci/run`` in a virtualenv without torch: the sidecar must refuse to start without a token key
of its own, start with one, answer /healthz, accept a ranking with every feature of the file, and
refuse one with a feature missing, naming it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx

from leanrec.featurefile import load_featureset
from leanrec.schema import Side


def main() -> int:
    """0 if the sidecar logged the ranking and refused the broken one, else 1."""
    command, path = sys.argv[1], sys.argv[2]
    fs = load_featureset(path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [command, "serve", "--featureset", path, "--port", str(port)]
    bare = {k: v for k, v in os.environ.items() if k != "LEANREC_SECRET"}
    refused = subprocess.run(argv, env=bare, capture_output=True, text=True, timeout=60)
    if refused.returncode != 2 or "development secret" not in refused.stderr:
        print(f"the sidecar without a key answered {refused.returncode}: {refused.stdout} {refused.stderr}")
        return 1
    server = subprocess.Popen(argv, env={**bare, "LEANREC_SECRET": "ci-sidecar-key-0123456789"})
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            print("the sidecar did not start", file=sys.stderr)
            return 1
        n = 100
        features = {}
        for side, rows in ((Side.REQUEST, None), (Side.ITEM, n)):
            for slot in fs.layout(side).slots:
                f = slot.feature
                value = [0.5] * f.size if f.is_float else [0] * f.size
                features[f.name] = value if rows is None else [value] * rows
        body = {"user_id": 1, "items": list(range(n)), "features": features}
        ok = httpx.post(f"{base}/v1/log", json=body)
        missing = next(iter(features))
        features.pop(missing)
        refused = httpx.post(f"{base}/v1/log", json=body)
        if ok.status_code != 200 or refused.status_code != 422 or missing not in refused.json()["error"]:
            print(f"sidecar answered {ok.status_code} {ok.text} and {refused.status_code} {refused.text}")
            return 1
        why = refused.json()["error"]
        print(f"sidecar without torch: logged {ok.json()['n_items']} items; refused: {why}")
        return 0
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
