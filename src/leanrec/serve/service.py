"""LoggingService: the serving side's entry points after a ranking.

``ranked`` freezes and logs what the late ranker scored; ``paginate`` takes the client's scroll
signal; ``events`` validates a client's event batch (and, where the process still holds the ranked list,
that each event names the item ranked at its position), lets the logger log any touched page that is not
logged yet, and appends the batch to the request's event list in the transient store
(``lr:{id}:ev``), where the joiner finds it. The HTTP service wraps exactly these calls.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from leanrec.clock import Clock
from leanrec.events.bus import EventBus
from leanrec.events.model import EventBatch, EventLimits, RequestRef, ValidationReport, validate
from leanrec.featurelog.loggers import FeatureLogger, key
from leanrec.featurelog.ranked import RankedBatch
from leanrec.stores.transient import OnceAppend, StoreFullError


class LoggingUnavailable(RuntimeError):
    """The transient store did not take an event batch; the client should send it again later."""


@dataclass
class ServiceStats:
    """What clients sent and what was refused."""

    requests: int = 0
    paginations: int = 0
    event_batches: int = 0
    events_accepted: int = 0
    events_refused: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class EventsResult:
    """What happened to an event batch: events accepted, refused by reason, and why."""

    accepted: int
    refused: dict[str, int]
    messages: list[str]

    @classmethod
    def of(cls, well_formed: int, errors: list[str], report: ValidationReport) -> EventsResult:
        """The answer to a batch of ``well_formed`` records (``errors``: one per malformed one)."""
        refused = dict(report.refused)
        if errors:
            refused["malformed"] = len(errors)
        return cls(well_formed - report.total, refused, [*errors[:5], *report.messages.values()])


class LoggingService:
    """Logging entry points of one ranking service.

    Args:
        logger: Eager or lazy; its transient store also holds the event batches.
        bus: Carries the RequestOpened records the logger emits.
        limits: What an event batch may hold, and until when it may arrive.
        clock: Arrival time of calls.

    """

    def __init__(self, logger: FeatureLogger, bus: EventBus, limits: EventLimits, clock: Clock) -> None:
        self.logger, self.bus, self.limits, self.clock = logger, bus, limits, clock
        self.stats = ServiceStats()

    def ranked(self, refs: list[RequestRef], batch: RankedBatch) -> None:
        """Freeze and log B ranked requests (``refs[b]`` is row b of ``batch``)."""
        if len(refs) != len(batch):
            raise ValueError(f"{len(refs)} request refs for a batch of {len(batch)}")
        self.logger.log_ranked(refs, batch)
        self.stats.requests += len(refs)

    def paginate(self, ref: RequestRef, seen_up_to: int) -> int:
        """The user has seen up to position ``seen_up_to``; returns pages logged."""
        if not 0 <= seen_up_to < ref.n_items:
            raise ValueError(f"seen_up_to={seen_up_to} is outside the ranked list of {ref.n_items}")
        self.stats.paginations += 1
        return self.logger.paginate(ref, seen_up_to)

    def events(self, ref: RequestRef, batch: EventBatch, batch_id: str | None = None) -> ValidationReport:
        """Validate, log touched pages, store; refused events are counted, never fatal.

        Args:
            ref: The request, as the client presents it.
            batch: Its events.
            batch_id: The client's id of this batch; a batch id seen before is refused as a replay.

        Raises:
            LoggingUnavailable: The transient store did not take the batch (nothing was accepted).

        """
        self.stats.event_batches += 1
        deadline = ref.ts_ms + self.limits.window_ms + self.limits.lateness_ms
        if self.clock.now_ms() > deadline:
            report = ValidationReport()
            report.refuse(
                "window_closed", len(batch), f"arrived after the attribution window closed (at {deadline} ms)"
            )
        else:
            good, report = validate(batch, ref, self.limits)
            good = self._same_items(ref, good, report)
            if len(good):
                self._store(ref, good, batch_id, report)
        self.stats.events_refused.update(report.refused)
        return report

    def _same_items(self, ref: RequestRef, good: EventBatch, report: ValidationReport) -> EventBatch:
        """Refuse events whose item is not the one ranked at their position, where this process knows.

        A lazy logger holds the ranked list until the request's pages are all logged: events are
        checked against it here, and a client is told at once. Once it is released, or under eager
        logging, which holds nothing, the join checks them against the logged ranking and drops and
        counts the ones that differ (``mismatched_events``): nothing wrong reaches the warehouse.
        Positions are inside the list (``validate`` refused the others).
        """
        ranked = self.logger.ranked_items(ref)
        if ranked is None or len(good) == 0:
            return good
        wrong = ranked[good.position] != good.item_id
        if not wrong.any():
            return good
        report.refuse("wrong_item", int(wrong.sum()), "item_id is not the item ranked at its position")
        return good.take(~wrong)

    def _store(
        self, ref: RequestRef, good: EventBatch, batch_id: str | None, report: ValidationReport
    ) -> None:
        ttl, events_key = self.logger.ttl_ms, key(ref.request_id, "ev")
        try:
            if batch_id is None:
                self.logger.touch(ref, good)
                self.logger.store.append_many({events_key: good.to_bytes()}, ttl)
            else:  # the guard check and the append are one atomic step: a retry is never a replay
                entry = OnceAppend(events_key, good.to_bytes(), key(ref.request_id, "seen"), batch_id)
                joint = getattr(self.logger, "touch_and_append_once", None)
                if joint is not None:  # the touched pages and the append in one round trip
                    appended = joint(ref, good, entry)
                else:
                    self.logger.touch(ref, good)
                    appended = self.logger.store.append_once([entry], ttl)[0]
                if not appended:
                    report.refuse("replayed", len(good), f"batch {batch_id!r} was accepted before")
                    return
        except (ConnectionError, StoreFullError, OSError) as exc:
            self.stats.events_refused.update(report.refused)
            raise LoggingUnavailable(f"event batch not stored: {exc}") from exc
        self.stats.events_accepted += len(good)
