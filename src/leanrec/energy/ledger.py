"""The cost ledger every stage reports to.

A stage adds operations, bytes serialized, bytes written and read, bytes held in memory × seconds and
CPU seconds. The energy model turns these into joules later; here they are only counted, so that the
lean and the naive paths can be compared on the same traffic.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields


@dataclass
class StageCost:
    """Accumulated cost of one stage."""

    ops: int = 0
    bytes_serialized: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    byte_seconds_held: float = 0.0
    cpu_seconds: float = 0.0

    def add(self, other: StageCost) -> None:
        """Add another stage's counts into this one."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class _Charge:
    """The context manager of :meth:`CostLedger.cpu`.

    A class rather than a generator: it runs a few times per logged request on the sidecar's hot
    path, where a generator-based context manager costs several times more.
    """

    __slots__ = ("cost", "t0")

    def __init__(self, cost: StageCost) -> None:
        self.cost, self.t0 = cost, 0.0

    def __enter__(self) -> StageCost:
        self.t0 = time.process_time()
        return self.cost

    def __exit__(self, *exc: object) -> None:
        self.cost.cpu_seconds += time.process_time() - self.t0


class CostLedger:
    """Per-stage cost counters of one pipeline.

    Stages are named by what they do (``rank``, ``serialize``, ``kv_write``, ``kv_read``,
    ``context``, ``join``, ``warehouse_write``); each is created on first use.
    """

    def __init__(self) -> None:
        self.stages: dict[str, StageCost] = {}

    def __getitem__(self, stage: str) -> StageCost:
        cost = self.stages.get(stage)
        if cost is None:
            cost = self.stages[stage] = StageCost()
        return cost

    def add(self, stage: str, **counts: float) -> None:
        """Add counts (field name → amount) to a stage."""
        cost = self[stage]
        for name, value in counts.items():
            setattr(cost, name, getattr(cost, name) + value)

    def cpu(self, stage: str) -> _Charge:
        """Charge the CPU time of the enclosed ``with`` block to ``stage`` (it yields the stage's cost)."""
        return _Charge(self[stage])

    def total(self) -> StageCost:
        """All stages added up."""
        out = StageCost()
        for cost in self.stages.values():
            out.add(cost)
        return out

    def to_dict(self) -> dict[str, dict[str, float]]:
        """JSON-ready counters, one object per stage."""
        return {name: asdict(cost) for name, cost in sorted(self.stages.items())}
