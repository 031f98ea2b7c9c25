"""Events: the model, its validation, and the bus that carries them to the joiner."""

from leanrec.events.bus import EventBus, MemoryEventBus, Message, RequestOpened
from leanrec.events.model import (
    LABELS,
    EventBatch,
    EventKind,
    EventLimits,
    RequestRef,
    ValidationReport,
    validate,
)

__all__ = [
    "LABELS",
    "EventBatch",
    "EventBus",
    "EventKind",
    "EventLimits",
    "MemoryEventBus",
    "Message",
    "RequestOpened",
    "RequestRef",
    "ValidationReport",
    "validate",
]
