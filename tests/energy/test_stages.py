"""Joules per stage from the ledger: every coefficient applied where it belongs, and nowhere else."""

from __future__ import annotations

import pytest

from leanrec.energy.carbon import GridIntensity
from leanrec.energy.ledger import CostLedger
from leanrec.energy.meter import PowerModel
from leanrec.energy.stages import Coefficients, EnergyModel, ledger_energy


def _model() -> EnergyModel:
    return EnergyModel(
        PowerModel(watts_per_core=10.0, memory_watts_per_gb=0.5, source="test"),
        Coefficients(network_j_per_byte=1e-9, storage_write_j_per_byte=2e-9, storage_w_per_tb=1.0),
        GridIntensity(360.0, "test"),
    )


def test_each_count_is_priced_by_its_own_coefficient() -> None:
    led = CostLedger()
    led.add("kv_write", cpu_seconds=2.0, bytes_written=1_000_000_000)
    led.add("kv_read", bytes_read=500_000_000)
    led.add("warehouse_write", cpu_seconds=1.0, bytes_written=2_000_000_000)
    led.add("context", byte_seconds_held=4e9)
    got = ledger_energy(led, _model(), requests=500, held_seconds=10.0)
    s = got["stages"]
    # kv_write: 20 J of CPU, 1 J of network, 1 GB held 10 s at 0.5 W/GB = 5 J, no storage.
    assert s["kv_write"] == pytest.approx(
        {"cpu": 20.0, "network": 1.0, "storage": 0.0, "memory": 5.0, "total": 26.0}
    )
    assert s["kv_read"]["total"] == pytest.approx(0.5)
    # The warehouse: 10 J of CPU, 2 J of network, 4 J of storage; nothing held in memory.
    assert s["warehouse_write"] == pytest.approx(
        {"cpu": 10.0, "network": 2.0, "storage": 4.0, "memory": 0.0, "total": 16.0}
    )
    assert s["context"]["memory"] == pytest.approx(2.0)  # 4 GB·s at 0.5 W/GB
    assert got["joules"] == pytest.approx(26.0 + 0.5 + 16.0 + 2.0)
    assert got["joules_per_1k_requests"] == pytest.approx(2 * got["joules"])
    assert got["gco2e_per_1k_requests"] == pytest.approx(2 * got["joules"] / 3.6e6 * 360.0)
    assert got["mark"] == "estimated" and got["power_source"] == "test"


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one request"):
        ledger_energy(CostLedger(), _model(), requests=0)
    with pytest.raises(ValueError, match="network_j_per_byte"):
        Coefficients(network_j_per_byte=-1.0)
