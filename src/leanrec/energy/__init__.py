"""Cost accounting and energy: what each stage computes, moves, stores and holds, in joules and grams."""

from leanrec.energy.carbon import GridIntensity, grid_intensity
from leanrec.energy.ledger import CostLedger, StageCost
from leanrec.energy.meter import EnergyMeter, PowerModel
from leanrec.energy.stages import Coefficients, EnergyModel, ledger_energy

__all__ = [
    "Coefficients",
    "CostLedger",
    "EnergyMeter",
    "EnergyModel",
    "GridIntensity",
    "PowerModel",
    "StageCost",
    "grid_intensity",
    "ledger_energy",
]
