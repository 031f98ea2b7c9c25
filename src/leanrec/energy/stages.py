"""Joules per stage: the cost ledger's CPU seconds, bytes and memory held, priced by stated coefficients.

Nothing here is measured: the ledger counts, and these coefficients turn counts into energy, so every
figure is marked ``estimated``. The per-byte coefficients are stated and overridable
(:class:`Coefficients`); the defaults are orders of magnitude for equipment inside one data centre:

- network: a 12.8 Tb/s switch drawing about 500 W spends about 40 pJ per bit on each hop; with the
  network cards at both ends and a few hops that is about 5 nJ per byte moved;
- storage writes: a data-centre SSD writing about 2 GB/s at about 10 W spends about 5 nJ per byte, and
  warehouses keep three replicas: 15 nJ per byte written;
- storage at rest: a 16 TB drive idles at about 5 W (0.3 W per TB); three replicas, about 1 W per TB;
- memory held (the transient store's RAM while a request waits for its labels): the power model's
  watts per GB.
"""

from __future__ import annotations

from dataclasses import dataclass

from leanrec.energy.carbon import GridIntensity, grid_intensity
from leanrec.energy.ledger import CostLedger, StageCost
from leanrec.energy.meter import ESTIMATED, PowerModel

STORAGE_STAGES = frozenset({"warehouse_write"})
"""Stages whose bytes written land on disk (the rest go to memory: the transient store, the bus)."""


@dataclass(frozen=True)
class Coefficients:
    """Energy per byte moved, written and kept (see the module's notes for the defaults).

    Attributes:
        network_j_per_byte: Joules per byte sent to or read from another machine.
        storage_write_j_per_byte: Joules per byte written to replicated storage.
        storage_w_per_tb: Watts per TB kept at rest, replicas included.

    """

    network_j_per_byte: float = 5e-9
    storage_write_j_per_byte: float = 15e-9
    storage_w_per_tb: float = 1.0

    def __post_init__(self) -> None:
        for name in ("network_j_per_byte", "storage_write_j_per_byte", "storage_w_per_tb"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be at least 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class EnergyModel:
    """Everything that turns a ledger into joules and grams: power model, per-byte coefficients, grid."""

    power: PowerModel
    coeffs: Coefficients
    grid: GridIntensity

    @staticmethod
    def default() -> EnergyModel:
        """The power model of the machine it runs on, the stated coefficients and grid intensity."""
        return EnergyModel(PowerModel.of_this_machine(), Coefficients(), grid_intensity())


@dataclass(frozen=True)
class StageEnergy:
    """Estimated joules of one stage, by what they were spent on."""

    cpu: float
    network: float
    storage: float
    memory: float

    @property
    def total(self) -> float:
        """All of it."""
        return self.cpu + self.network + self.storage + self.memory


def stage_energy(
    cost: StageCost,
    stage: str,
    power: PowerModel,
    coeffs: Coefficients,
    held_seconds: float = 0.0,
) -> StageEnergy:
    """Joules of one stage's counts.

    Args:
        cost: The stage's counts.
        stage: Its name (``warehouse_write`` writes to storage; other writes go to memory).
        power: Watts per core and per GB.
        coeffs: Joules per byte.
        held_seconds: How long a byte written to memory stays there (the transient store keeps an
            entry until its request is joined); added to the stage's own byte-seconds held.

    """
    to_disk = stage in STORAGE_STAGES
    byte_seconds = cost.byte_seconds_held + (0.0 if to_disk else cost.bytes_written * held_seconds)
    return StageEnergy(
        cpu=power.cpu_joules(cost.cpu_seconds),
        network=(cost.bytes_written + cost.bytes_read) * coeffs.network_j_per_byte,
        storage=cost.bytes_written * coeffs.storage_write_j_per_byte if to_disk else 0.0,
        memory=power.memory_joules(byte_seconds / 1e9),
    )


def ledger_energy(ledger: CostLedger, model: EnergyModel, requests: int, held_seconds: float = 0.0) -> dict:
    """Joules and gCO2e of every stage of a ledger, in all and per 1,000 requests (marked estimated).

    Args:
        ledger: The pipeline's cost ledger.
        model: Power model, coefficients and grid.
        requests: Requests the ledger covers.
        held_seconds: How long the transient store holds an entry.

    Raises:
        ValueError: No requests to divide by.

    """
    if requests < 1:
        raise ValueError(f"energy per 1,000 requests needs at least one request, got {requests}")
    power, coeffs, grid = model.power, model.coeffs, model.grid
    stages = {n: stage_energy(c, n, power, coeffs, held_seconds) for n, c in sorted(ledger.stages.items())}
    joules = sum(s.total for s in stages.values())
    per_k = 1000 / requests
    return {
        "mark": ESTIMATED,
        "power_source": power.source,
        "grid_source": grid.source,
        "grid_g_per_kwh": grid.g_per_kwh,
        "coefficients": {
            "network_j_per_byte": coeffs.network_j_per_byte,
            "storage_write_j_per_byte": coeffs.storage_write_j_per_byte,
            "storage_w_per_tb": coeffs.storage_w_per_tb,
            "watts_per_core": power.watts_per_core,
            "memory_watts_per_gb": power.memory_watts_per_gb,
            "held_seconds": held_seconds,
        },
        "stages": {
            n: {
                "cpu": s.cpu,
                "network": s.network,
                "storage": s.storage,
                "memory": s.memory,
                "total": s.total,
            }
            for n, s in stages.items()
        },
        "joules": joules,
        "joules_per_1k_requests": joules * per_k,
        "gco2e_per_1k_requests": grid.grams(joules) * per_k,
    }
