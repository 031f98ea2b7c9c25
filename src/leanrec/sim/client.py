"""``leanrec simulate --target URL``: the synthetic world's users as HTTP clients of a running service.

Each simulated session ranks, scrolls (sending pagination signals), and reports its events in
batches, with engagement drawn from the world's truth, as fast as the service answers. Its paginate
and events calls name the request in the ``X-Leanrec-Request-Id`` header too, so the target may be
nginx in front of several serving processes. The run is bounded in requests and in time, and it aims
only at loopback addresses. A pagination signal or an event batch answered 503 (the service could not
log it: its store is failing over, say) is sent again after a backoff, as a client must, for up to
``RESEND_FOR_S``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from leanrec.errors import InputError
from leanrec.events.model import EventKind
from leanrec.featurelog.loggers import Paging
from leanrec.serve.routing import REQUEST_ID_HEADER
from leanrec.world import World, WorldConfig

RESEND_FOR_S = 30.0
"""How long a client keeps sending again a call answered 503 (0.05 s between tries, doubling to 1 s)."""


class TargetError(InputError, ValueError):
    """A target the simulator refuses to load."""


def check_loopback(target: str) -> str:
    """The target URL, if it names a loopback address.

    Raises:
        TargetError: Not http(s), or a host outside 127.0.0.0/8, ``localhost`` and ``::1``.

    """
    parsed = urlparse(target)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise TargetError(f"target must be an http:// URL with a host, got {target!r}")
    host = parsed.hostname
    if host != "localhost":
        try:
            if not ipaddress.ip_address(host).is_loopback:
                raise TargetError(f"simulate only loads loopback addresses; {host} is not one")
        except ValueError:
            raise TargetError(f"simulate only loads loopback addresses; {host!r} is not one") from None
    return target.rstrip("/")


@dataclass
class SimReport:
    """What a simulation run measured on the client side, and what the server said it did."""

    requests: int = 0
    sessions_failed: int = 0
    seconds: float = 0.0
    latency_ms: dict[str, list[float]] = field(default_factory=dict)
    status: dict[str, int] = field(default_factory=dict)
    events_sent: int = 0
    viewed: int = 0
    resent: int = 0
    views_refused: int = 0
    """Views in event batches the service did not take, even when sent again (410: the window closed)."""
    sessions: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Request id -> (client's time of the ranking's answer in ms, positions viewed)."""
    server: dict[str, float] = field(default_factory=dict)

    def percentiles(self, endpoint: str) -> tuple[float, float, float]:
        """p50, p90, p99 latency in ms of one endpoint."""
        values = self.latency_ms.get(endpoint) or [float("nan")]
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        return float(p50), float(p90), float(p99)


def scrape(client_metrics: str) -> dict[str, float]:
    """leanrec_* samples of a /metrics page, summed over labels except ``reason``."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(client_metrics):
        for sample in family.samples:
            if not sample.name.startswith("leanrec_") or sample.name.endswith(("_bucket", "_created")):
                continue
            name = sample.name
            if "reason" in sample.labels:
                name = f"{name}{{reason={sample.labels['reason']}}}"
            out[name] = out.get(name, 0.0) + sample.value
    return out


async def _session(
    http: httpx.AsyncClient,
    world: World,
    rng: np.random.Generator,
    report: SimReport,
    paging: Paging,
    lookahead: int,
) -> None:
    user = int(world.sample_users(1, rng)[0])

    routed: dict[str, str] = {}  # the request id header, once ranked: a load balancer routes by it

    async def call(endpoint: str, body: dict) -> httpx.Response:
        give_up, wait = time.perf_counter() + RESEND_FOR_S, 0.05
        while True:
            t0 = time.perf_counter()
            response = await http.post(f"/v1/{endpoint}", json=body, headers=routed)
            report.latency_ms.setdefault(endpoint, []).append((time.perf_counter() - t0) * 1000)
            key = f"{endpoint} {response.status_code}"
            report.status[key] = report.status.get(key, 0) + 1
            if response.status_code != 503 or endpoint == "rank" or time.perf_counter() > give_up:
                return response
            report.resent += 1  # the same batch id: a batch that did land is not taken twice
            await asyncio.sleep(wait)
            wait = min(2 * wait, 1.0)

    ranked = await call("rank", {"user_id": user, "surface": int(rng.integers(0, 3))})
    if ranked.status_code != 200:
        report.sessions_failed += 1
        return
    body = ranked.json()
    items = np.array(body["items"])
    eng = world.engage(np.array([user]), items[None, :], rng)
    depth = int(eng.depth[0])
    report.requests += 1
    report.viewed += depth
    report.sessions[body["request_id"]] = (int(time.time() * 1000), depth)
    auth = {"request_id": body["request_id"], "token": body["token"]}
    routed[REQUEST_ID_HEADER] = body["request_id"]
    now = int(time.time() * 1000)
    next_page = 1
    for start in range(0, depth, 5):
        stop = min(start + 5, depth)
        while (
            next_page < paging.count(len(items))
            and paging.bounds(next_page, len(items))[0] - lookahead < stop
        ):
            at = max(paging.bounds(next_page, len(items))[0] - lookahead, 0)
            await call("paginate", {**auth, "seen_up_to": at})
            next_page += 1
        events = []
        for p in range(start, stop):
            events.append({"position": p, "item_id": int(items[p]), "kind": "view", "ts_ms": now + p})
            for kind, flags in (
                ("click", eng.click),
                ("like", eng.like),
                ("share", eng.share),
                ("hide", eng.hide),
            ):
                if flags[0, p]:
                    events.append(
                        {"position": p, "item_id": int(items[p]), "kind": kind, "ts_ms": now + p + 1}
                    )
            if eng.click[0, p]:
                events.append(
                    {
                        "position": p,
                        "item_id": int(items[p]),
                        "kind": EventKind.WATCH.name.lower(),
                        "ts_ms": now + p + 2,
                        "value": float(eng.watch_ms[0, p]),
                    }
                )
        report.events_sent += len(events)
        answer = await call("events", {**auth, "batch_id": uuid.uuid4().hex[:12], "events": events})
        if answer.status_code != 200:
            report.views_refused += stop - start


async def _run(
    target: str,
    requests: int,
    concurrency: int,
    seconds: float,
    seed: int,
    world_config: WorldConfig | None,
    progress: Callable[[int], None] | None,
) -> SimReport:
    report = SimReport()
    paging, lookahead = Paging(), 2
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=target, limits=limits, timeout=30.0) as http:
        world = World(_served_world(await _check_answers(http, target), target, world_config))
        started = time.perf_counter()
        deadline = started + seconds
        issued = 0

        async def worker(k: int) -> None:
            nonlocal issued
            rng = np.random.default_rng([seed, k])
            while issued < requests and time.perf_counter() < deadline:
                issued += 1
                try:
                    await _session(http, world, rng, report, paging, lookahead)
                except httpx.HTTPError:
                    report.sessions_failed += 1
                if progress:
                    progress(1)

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        report.seconds = time.perf_counter() - started
        try:
            metrics = await http.get("/metrics")
        except httpx.HTTPError:  # the service went away during the run: its sessions were counted
            return report
        report.server = scrape(metrics.text) if metrics.status_code == 200 else {}
    return report


def _served_world(health: dict, target: str, given: WorldConfig | None) -> WorldConfig:
    """The world the service ranks, as its /healthz says: the one to simulate users of.

    Raises:
        TargetError: The service ranks no world of its own (a sidecar), or another world than
            ``given``: users simulated from another world's truth would engage at random.

    """
    served = (health.get("catalog") or {}).get("world")
    if served is None:
        raise TargetError(
            f"{target} ranks no synthetic world (it logs {health.get('catalog', {}).get('featureset')!r} "
            "for a ranker of its own): simulate drives leanrec serve's own /v1/rank"
        )
    if given is None:
        return WorldConfig(n_users=served["n_users"], n_items=served["n_items"], seed=served["seed"])
    mine = {"n_users": given.n_users, "n_items": given.n_items, "seed": given.seed}
    if mine != served:
        raise TargetError(
            f"{target} ranks the world {served}, not {mine}; leave out --n-users, --n-items and "
            "--world-seed to simulate the users of the world it serves"
        )
    return given


async def _check_answers(http: httpx.AsyncClient, target: str) -> dict:
    """Refuse a target where no leanrec service answers, before any session is counted as failed.

    Returns:
        The service's /healthz answer.

    Raises:
        TargetError: Nothing listens there, it does not speak HTTP, or it is not a leanrec service.

    """
    try:
        health = await http.get("/healthz", timeout=5.0)
    except httpx.HTTPError as exc:
        raise TargetError(
            f"no service answers at {target} ({exc or type(exc).__name__}); start `leanrec serve` there "
            "or aim at the URL it listens on"
        ) from None
    if health.status_code not in (200, 503):  # 503: up, with a backend down (its sessions still run)
        raise TargetError(
            f"{target} answers but is not a leanrec service (GET /healthz gave {health.status_code}); "
            "aim at the URL `leanrec serve` listens on"
        )
    try:
        return dict(health.json())
    except ValueError:
        raise TargetError(f"{target} answers /healthz with no JSON: it is not a leanrec service") from None


def simulate(
    target: str,
    requests: int = 1_000,
    concurrency: int = 8,
    seconds: float = 60.0,
    seed: int = 7,
    world_config: WorldConfig | None = None,
    progress: Callable[[int], None] | None = None,
) -> SimReport:
    """Run simulated sessions against a service until ``requests`` are issued or ``seconds`` pass.

    Args:
        target: Base URL of a running ``leanrec serve`` on a loopback address.
        requests: Sessions (ranked requests) to issue at most.
        concurrency: Sessions in flight at once.
        seconds: Time bound of the run.
        seed: Seeds the users' behaviour.
        world_config: The service's world (users, items, seed), so that engagement follows the same
            truth; None learns it from the service, and a world that differs from the service's is
            refused.
        progress: Called once per finished session.

    Raises:
        TargetError: The target is not a loopback http(s) URL, or no leanrec service answers there.

    """
    if requests < 1 or concurrency < 1 or seconds <= 0:
        raise ValueError("requests and concurrency must be >= 1 and seconds > 0")
    target = check_loopback(target)
    return asyncio.run(_run(target, requests, concurrency, seconds, seed, world_config, progress))
