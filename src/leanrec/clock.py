"""Clocks: every component that keeps time takes one, so tests and simulations can drive time."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """A source of the current time in milliseconds."""

    def now_ms(self) -> int:
        """Milliseconds since the epoch (or since the simulation's start)."""
        ...


class SystemClock:
    """Wall-clock time."""

    def now_ms(self) -> int:
        """Milliseconds since the Unix epoch."""
        return time.time_ns() // 1_000_000


class ManualClock:
    """A clock that moves only when told to: simulations and tests set the time."""

    def __init__(self, start_ms: int = 0) -> None:
        self._now = int(start_ms)

    def now_ms(self) -> int:
        """The time last set."""
        return self._now

    def set(self, t_ms: int) -> None:
        """Move to ``t_ms``; time never runs backwards."""
        if t_ms < self._now:
            raise ValueError(f"time runs forward only: {t_ms} < {self._now}")
        self._now = int(t_ms)

    def advance(self, delta_ms: int) -> None:
        """Move forward by ``delta_ms``."""
        self.set(self._now + delta_ms)
