"""LoggingService: the serving side's entry points after a ranking.

``ranked`` freezes and logs what the late ranker scored; ``paginate`` takes the client's scroll
signal; ``events`` validates a client's event batch, lets the logger log any touched page that is not
logged yet, and appends the batch to the bus. The HTTP service wraps exactly these calls.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from leanrec.events.bus import EventBus
from leanrec.events.model import EventBatch, EventLimits, RequestRef, ValidationReport, validate
from leanrec.featurelog.loggers import FeatureLogger
from leanrec.funnel.ranker import RankedBatch


@dataclass
class ServiceStats:
    """What clients sent and what was refused."""

    requests: int = 0
    paginations: int = 0
    event_batches: int = 0
    events_accepted: int = 0
    events_refused: Counter[str] = field(default_factory=Counter)


class LoggingService:
    """Logging entry points of one ranking service.

    Args:
        logger: Eager or lazy.
        bus: Where validated event batches go.
        limits: What an event batch may hold.

    """

    def __init__(self, logger: FeatureLogger, bus: EventBus, limits: EventLimits) -> None:
        self.logger, self.bus, self.limits = logger, bus, limits
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

    def events(self, ref: RequestRef, batch: EventBatch) -> ValidationReport:
        """Validate, log touched pages, append; refused events are counted, never fatal."""
        good, report = validate(batch, ref, self.limits)
        self.stats.event_batches += 1
        self.stats.events_refused.update(report.refused)
        if len(good):
            self.logger.touch(ref, good)
            self.bus.append_many([good])
            self.stats.events_accepted += len(good)
        return report
