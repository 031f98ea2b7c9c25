"""Replaying recorded sessions against a catalog service: ``leanrec replay``.

A sessions file (Parquet) holds one row per session, in the order to replay: ``user_id``, ``items``
(a list of the items the user engaged with in that session), optionally ``likes`` (the subset they
liked) and a column per context feature of the service's FeatureSet. For each session the replay
asks ``/v1/rank`` for the user's list, then plays a user who scrolls it: they view position after
position and give up ``patience`` positions after their last engagement (or after the head, if
nothing in it engaged them); a ranked item of the session is an engagement (a click, and a like if
it is among ``likes``) when the user reaches it. As a real client, it sends a pagination signal as
the user nears each next page (but in ``fast_scroll_share`` of the sessions it never arrives, and
the events alone must make the service log the pages they touch), then the session's events in
one batch (its paginate and events calls name the request in the ``X-Leanrec-Request-Id`` header,
for a load balancer to route by). Each session's list is scored against its items: NDCG@10 and
recall@10 over the list, and engagements, so that two rankers replayed on the same sessions compare
on the same traffic.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from leanrec.errors import InputError
from leanrec.featurefile import load_featureset
from leanrec.featurelog.loggers import Paging
from leanrec.serve.routing import REQUEST_ID_HEADER
from leanrec.sim.client import TargetError, _check_answers, check_loopback, scrape

STEP_MS = 20  # between one position's view and the next: a session's events stay inside a short window


class SessionsError(InputError, ValueError):
    """A sessions file that cannot be replayed, with the reason."""


@dataclass(frozen=True)
class Sessions:
    """Sessions to replay, as columns.

    Attributes:
        user_id: ``(S,)`` users.
        items: ``S`` arrays of the items each session engaged with.
        likes: ``S`` arrays of the items it liked (a subset of ``items``).
        context: Context feature values by name, ``(S,)`` or ``(S, size)`` each.

    """

    user_id: np.ndarray
    items: list[np.ndarray]
    likes: list[np.ndarray]
    context: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.user_id)


def read_sessions(path: str | Path, context_names: list[str]) -> Sessions:
    """Read a sessions file.

    Raises:
        SessionsError: Unreadable, without ``user_id`` or ``items``, or without a context feature.

    """
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise SessionsError(f"sessions file {path} does not exist") from None
    except (OSError, pa.ArrowException) as exc:
        raise SessionsError(f"{path} is not a readable Parquet file: {exc}") from None
    for col in ("user_id", "items", *context_names):
        if col not in table.column_names:
            raise SessionsError(f"{path}: needs a {col} column, has {table.column_names}")

    def lists(name: str) -> list[np.ndarray]:
        col = table.column(name).combine_chunks()
        offsets = col.offsets.to_numpy()
        flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        return np.split(flat, offsets[1:-1])

    items = lists("items")
    likes = lists("likes") if "likes" in table.column_names else [np.zeros(0, np.int64)] * len(items)
    context = {}
    for name in context_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type):
            context[name] = np.stack(col.to_numpy(zero_copy_only=False))
        else:
            context[name] = col.to_numpy(zero_copy_only=False)
    return Sessions(table.column("user_id").to_numpy().astype(np.int64), items, likes, context)


def ranking_metrics(ranked: np.ndarray, relevant: np.ndarray, k: int = 10) -> tuple[float, float]:
    """NDCG@k and recall@k of one ranked list against a set of relevant items (binary gains)."""
    if not len(relevant):
        return 0.0, 0.0
    hit = np.isin(ranked[:k], relevant)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = discounts[: min(k, len(relevant))].sum()
    return float((hit * discounts[: len(hit)]).sum() / ideal), float(hit.sum() / len(relevant))


def scroll_depth(hits: np.ndarray, n: int, head: int, patience: int) -> int:
    """Positions a user views: until ``patience`` positions pass after the last engagement.

    Args:
        hits: Sorted positions holding an item that engages the user.
        n: Length of the list.
        head: Positions always viewed (the first screen).
        patience: Positions a user views past their last engagement before giving up.

    """
    depth = head
    for p in hits:  # a session's engagements: a handful
        if p >= depth + patience:
            break
        depth = max(depth, p + 1)
    return int(min(n, depth + patience))


@dataclass
class ReplayReport:
    """What a replay did and what the ranking earned."""

    sessions: int = 0
    failed: int = 0
    viewed: int = 0
    engagements: int = 0
    likes: int = 0
    ndcg: list[float] = field(default_factory=list)
    recall: list[float] = field(default_factory=list)
    signals_sent: int = 0
    signals_lost: int = 0
    events_sent: int = 0
    events_accepted: int = 0
    status: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    server: dict[str, float] = field(default_factory=dict)
    catalog: dict = field(default_factory=dict)

    def figures(self) -> dict[str, float]:
        """The per-session figures: NDCG@10, recall@10, engagements and views per session."""
        s = max(self.sessions, 1)
        return {
            "ndcg@10": float(np.mean(self.ndcg)) if self.ndcg else 0.0,
            "recall@10": float(np.mean(self.recall)) if self.recall else 0.0,
            "engagements_per_session": self.engagements / s,
            "viewed_per_session": self.viewed / s,
        }


async def _session(
    http: httpx.AsyncClient,
    sessions: Sessions,
    i: int,
    rng: np.random.Generator,
    report: ReplayReport,
    paging: Paging,
    lookahead: int,
    patience: int,
    fast_share: float,
) -> None:
    routed: dict[str, str] = {}  # the request id header, once ranked: a load balancer routes by it

    async def call(endpoint: str, body: dict) -> httpx.Response:
        response = await http.post(f"/v1/{endpoint}", json=body, headers=routed)
        key = f"{endpoint} {response.status_code}"
        report.status[key] = report.status.get(key, 0) + 1
        return response

    body: dict = {"user_id": int(sessions.user_id[i])}
    if sessions.context:
        body["context"] = {k: np.asarray(v[i]).tolist() for k, v in sessions.context.items()}
    ranked = await call("rank", body)
    if ranked.status_code != 200:
        report.failed += 1
        return
    out = ranked.json()
    items = np.asarray(out["items"], np.int64)
    relevant, liked = sessions.items[i], sessions.likes[i]
    ndcg, recall = ranking_metrics(items, relevant)
    report.ndcg.append(ndcg)
    report.recall.append(recall)
    hits = np.flatnonzero(np.isin(items, relevant))
    depth = scroll_depth(hits, len(items), paging.head, patience)
    hits = hits[hits < depth]
    report.sessions += 1
    report.viewed += depth
    report.engagements += len(hits)
    auth = {"request_id": out["request_id"], "token": out["token"]}
    routed[REQUEST_ID_HEADER] = out["request_id"]
    fast = rng.random() < fast_share
    for page in range(1, paging.count(len(items))):
        at = max(paging.bounds(page, len(items))[0] - lookahead, 0)
        if at >= depth:
            break
        if fast:
            report.signals_lost += 1
            continue
        await call("paginate", {**auth, "seen_up_to": at})
        report.signals_sent += 1
    now = int(time.time() * 1000)
    events = [
        {"position": p, "item_id": int(items[p]), "kind": "view", "ts_ms": now + STEP_MS * p}
        for p in range(depth)
    ]
    for p in hits.tolist():
        events.append(
            {"position": p, "item_id": int(items[p]), "kind": "click", "ts_ms": now + STEP_MS * p + 5}
        )
        if np.isin(items[p], liked):
            events.append(
                {"position": p, "item_id": int(items[p]), "kind": "like", "ts_ms": now + STEP_MS * p + 9}
            )
            report.likes += 1
    report.events_sent += len(events)
    answer = await call("events", {**auth, "batch_id": uuid.uuid4().hex[:12], "events": events})
    if answer.status_code == 200:
        report.events_accepted += int(answer.json()["accepted"])


def served_catalog(health: dict, target: str, featureset: str | None) -> dict:
    """The catalog the service ranks, as its /healthz says; refuses one that is not ``featureset``'s.

    Raises:
        TargetError: The service ranks the synthetic world, only logs, or serves another FeatureSet.

    """
    catalog = health.get("catalog") or {}
    if catalog.get("world") is not None:
        raise TargetError(
            f"{target} ranks the synthetic world: replay drives a catalog service; use simulate"
        )
    if not catalog.get("ranks", False):
        raise TargetError(
            f"{target} ranks nothing (it logs {catalog.get('featureset')!r} for a ranker of its own): "
            "start it with --features-url (and --retrieval) to replay sessions against it"
        )
    if featureset is not None:
        fs = load_featureset(featureset)
        mine = (fs.name, fs.version, fs.fingerprint)
        theirs = (catalog.get("featureset"), catalog.get("version"), catalog.get("fingerprint"))
        if mine != theirs:
            raise TargetError(
                f"{target} serves FeatureSet {theirs[0]} v{theirs[1]} ({theirs[2]}), not {featureset}'s "
                f"{mine[0]} v{mine[1]} ({mine[2]}); leave out --featureset to replay against what it serves"
            )
    return catalog


async def _run(
    target: str,
    path: str | Path,
    featureset: str | None,
    concurrency: int,
    seed: int,
    patience: int,
    fast_share: float,
    progress: Callable[[int], None] | None,
    transport: httpx.AsyncBaseTransport | None,
) -> ReplayReport:
    report = ReplayReport()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=target, limits=limits, timeout=30.0, transport=transport) as http:
        health = await _check_answers(http, target)
        report.catalog = served_catalog(health, target, featureset)
        sessions = read_sessions(path, list(report.catalog.get("context", [])))
        started = time.perf_counter()
        queue = iter(range(len(sessions)))

        async def worker() -> None:
            for i in queue:  # shared: sessions start in the file's order
                rng = np.random.default_rng([seed, i])  # a session plays the same whatever the interleaving
                try:
                    await _session(http, sessions, i, rng, report, Paging(), 2, patience, fast_share)
                except httpx.HTTPError:
                    report.failed += 1
                if progress:
                    progress(1)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        report.seconds = time.perf_counter() - started
        metrics = await http.get("/metrics")
        report.server = scrape(metrics.text) if metrics.status_code == 200 else {}
    return report


def replay(
    target: str,
    sessions: str | Path,
    featureset: str | None = None,
    concurrency: int = 4,
    seed: int = 7,
    patience: int = 10,
    fast_scroll_share: float = 0.2,
    progress: Callable[[int], None] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> ReplayReport:
    """Replay a sessions file against a catalog service (see the module docstring).

    Args:
        target: Base URL of ``leanrec serve --featureset F --features-url URL`` on a loopback address.
        sessions: The sessions file.
        featureset: The FeatureSet file the sessions were written for; the service must serve it.
            None replays against whatever catalog the service serves.
        concurrency: Sessions in flight at once.
        seed: Seeds which sessions scroll fast.
        patience: Positions a user views past their last engagement.
        fast_scroll_share: Sessions whose pagination signals never arrive.
        progress: Called once per finished session.
        transport: How to reach the service (default: HTTP; ``httpx.ASGITransport`` calls an app
            in the same process).

    Raises:
        TargetError: No catalog service at ``target``, or one of another FeatureSet.
        SessionsError: The sessions file cannot be replayed.

    """
    if concurrency < 1 or patience < 1 or not 0 <= fast_scroll_share <= 1:
        raise ValueError("concurrency and patience must be >= 1, fast_scroll_share in [0, 1]")
    target = check_loopback(target)
    return asyncio.run(
        _run(
            target, sessions, featureset, concurrency, seed, patience, fast_scroll_share, progress, transport
        )
    )
