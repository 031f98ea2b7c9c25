"""Cost accounting: what each stage computes, moves, stores and holds."""

from leanrec.energy.ledger import CostLedger, StageCost

__all__ = ["CostLedger", "StageCost"]
