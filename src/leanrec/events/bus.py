"""EventBus: the append-only log between the serving side and the joiners.

The serving side appends a :class:`RequestOpened` record when it ranks: it is the unit of join work.
(Event batches wait in the transient store beside the request's features, so whichever joiner takes
the record finds them.) A consumer acknowledges a record only once what it produced from it is
durable, so a consumer that dies loses nothing: its unacknowledged records can be claimed again.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class RequestOpened:
    """A request was ranked and logged; its attribution window starts now.

    Attributes:
        request_id: Id of the request.
        user_id: Who it was ranked for.
        ts_ms: Rank time.
        n_items: Length of the ranked list.
        fs_version: FeatureSet version its features were logged with.

    """

    request_id: str
    user_id: int
    ts_ms: int
    n_items: int
    fs_version: int


Message = RequestOpened


@dataclass(frozen=True)
class Undecodable:
    """A bus entry that is not a RequestOpened record, delivered as stored so its consumer can set it aside.

    A backend that can hold foreign entries (a Redis stream any client may write to) delivers these
    when asked to (``deliver_malformed``), instead of acknowledging them itself, so that the consumer
    acknowledges them only once they are kept somewhere.

    Attributes:
        fields: The entry's fields and their raw values, as stored.
        reason: What is wrong with it.

    """

    fields: tuple[tuple[bytes, bytes], ...]
    reason: str


@runtime_checkable
class EventBus(Protocol):
    """Append, consume and acknowledge messages."""

    def append_many(self, messages: Sequence[Message]) -> list[str]:
        """Append messages in order; returns their ids."""
        ...

    def consume(self, max_count: int) -> list[tuple[str, Message]]:
        """Deliver up to ``max_count`` new messages; they stay pending until acknowledged."""
        ...

    def ack(self, ids: Sequence[str]) -> int:
        """Acknowledge delivered messages; returns how many were pending."""
        ...

    def claim_pending(self) -> list[tuple[str, Message]]:
        """Deliver again every message delivered but not acknowledged (recovery after a crash)."""
        ...

    def pending(self) -> int:
        """Messages delivered and not yet acknowledged."""
        ...


class MemoryEventBus:
    """In-process EventBus: a queue and a table of pending deliveries."""

    def __init__(self) -> None:
        self._queue: deque[tuple[str, Message]] = deque()
        self._pending: OrderedDict[str, Message] = OrderedDict()
        self._next = 0
        self.appended = 0

    def append_many(self, messages: Sequence[Message]) -> list[str]:
        """Append in order."""
        ids = []
        for msg in messages:
            mid = f"{self._next}-0"
            self._next += 1
            self._queue.append((mid, msg))
            ids.append(mid)
        self.appended += len(ids)
        return ids

    def consume(self, max_count: int) -> list[tuple[str, Message]]:
        """Deliver the oldest new messages."""
        out = []
        while self._queue and len(out) < max_count:
            mid, msg = self._queue.popleft()
            self._pending[mid] = msg
            out.append((mid, msg))
        return out

    def ack(self, ids: Sequence[str]) -> int:
        """Forget acknowledged deliveries."""
        return sum(self._pending.pop(mid, None) is not None for mid in ids)

    def claim_pending(self) -> list[tuple[str, Message]]:
        """Every pending delivery, oldest first."""
        return list(self._pending.items())

    def pending(self) -> int:
        """Count of unacknowledged deliveries."""
        return len(self._pending)

    def backlog(self) -> int:
        """Messages appended and not yet delivered."""
        return len(self._queue)
