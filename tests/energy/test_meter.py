"""The energy meter: the estimate path is exact for a known workload; RAPL counters, wrap-around included."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from leanrec.energy.carbon import DEFAULT_G_PER_KWH, GridIntensity, grid_intensity
from leanrec.energy.meter import ESTIMATED, MEASURED, EnergyMeter, Joules, Nvml, PowerModel, Rapl


def _powercap(root: Path, packages: dict[str, tuple[int, int]], sub: bool = True) -> Path:
    """A fake powercap tree: package domains with (energy_uj, max_energy_range_uj), plus a sub-domain."""
    for i, (name, (energy, span)) in enumerate(packages.items()):
        d = root / f"intel-rapl:{i}"
        d.mkdir(parents=True)
        (d / "name").write_text(name + "\n")
        (d / "energy_uj").write_text(f"{energy}\n")
        (d / "max_energy_range_uj").write_text(f"{span}\n")
        if sub:  # a core sub-domain is part of its package and must not be counted again
            s = root / f"intel-rapl:{i}:0"
            s.mkdir()
            (s / "name").write_text("core\n")
            (s / "energy_uj").write_text("999999\n")
            (s / "max_energy_range_uj").write_text(f"{span}\n")
    return root


def _set(root: Path, i: int, energy: int) -> None:
    (root / f"intel-rapl:{i}" / "energy_uj").write_text(f"{energy}\n")


def test_rapl_sums_packages_and_handles_a_counter_that_wrapped(tmp_path: Path) -> None:
    root = _powercap(tmp_path, {"package-0": (1_000_000, 262_143_328_850), "package-1": (5_000, 10_000_000)})
    rapl = Rapl(root)
    assert rapl.available and len(rapl.domains) == 2
    before = rapl.read()
    _set(root, 0, 4_000_000)  # +3 J
    _set(root, 1, 2_000)  # wrapped: 10,000,000 - 5,000 + 2,000 µJ = 9.997 J
    assert rapl.joules(before, rapl.read()) == pytest.approx(3.0 + 9.997)


def test_rapl_without_a_readable_tree_is_not_available(tmp_path: Path) -> None:
    assert not Rapl(tmp_path / "missing").available
    root = _powercap(tmp_path / "t", {"dram": (1, 10)}, sub=False)  # no package domain
    assert not Rapl(root).available


class _FixedRapl(Rapl):
    """Counters that advance by a known amount between readings."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.root = root

    def read(self) -> list[int]:
        out = super().read()
        _set(self.root, 0, out[0] + 2_500_000)  # the next reading is 2.5 J later
        return out


def test_the_meter_measures_the_cpu_from_rapl_where_it_can(tmp_path: Path) -> None:
    rapl = _FixedRapl(_powercap(tmp_path, {"package-0": (0, 10**12)}))
    meter = EnergyMeter(PowerModel(7.0), rapl=rapl, gpu=Nvml())
    with meter.measure() as r:
        pass
    assert r.cpu == Joules(2.5, MEASURED)
    assert r.memory.mark == ESTIMATED and r.total.mark == ESTIMATED


def _busy(seconds: float) -> None:
    t0 = time.process_time()
    while time.process_time() - t0 < seconds:
        pass


def test_the_estimate_is_exact_for_a_known_workload(tmp_path: Path) -> None:
    power = PowerModel(watts_per_core=12.0, memory_watts_per_gb=0.5, source="test")
    meter = EnergyMeter(power, rapl=Rapl(tmp_path / "none"), gpu=Nvml())
    with meter.measure() as r:
        _busy(0.3)
    assert r.cpu.mark == ESTIMATED and r.cpu_seconds >= 0.3
    assert r.cpu.joules == pytest.approx(12.0 * r.cpu_seconds, rel=1e-12)
    assert power.cpu_joules(100.0) == 1200.0
    assert power.memory_joules(3600.0 * 8) == pytest.approx(0.5 * 8 * 3600)
    assert r.to_dict()["cpu_mark"] == ESTIMATED and r.to_dict()["power_source"] == "test"


def test_a_known_cpu_gets_its_tdp_per_core_and_an_unknown_one_the_stated_default(tmp_path: Path) -> None:
    assert PowerModel.for_cpu("Intel(R) Xeon(R) Platinum 8280 CPU @ 2.70GHz").watts_per_core == pytest.approx(
        205 / 28
    )
    unknown = PowerModel.for_cpu("Intel(R) Xeon(R) Processor")
    assert unknown == PowerModel() and "default" in unknown.source
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7763 64-Core Processor\n")
    assert PowerModel.of_this_machine(info).watts_per_core == pytest.approx(280 / 64)
    with pytest.raises(ValueError, match="watts per core"):
        PowerModel(watts_per_core=0)


def test_grid_intensity_given_default_or_from_an_energy_mix_file(tmp_path: Path) -> None:
    assert grid_intensity().g_per_kwh == DEFAULT_G_PER_KWH
    assert grid_intensity("FRA", g_per_kwh=50.0) == GridIntensity(50.0, "given")
    mix = tmp_path / "global_energy_mix.json"
    mix.write_text(json.dumps({"FRA": {"carbon_intensity": 56.0, "country_name": "France", "year": 2022}}))
    fra = grid_intensity("fra", mix=mix)
    assert fra.g_per_kwh == 56.0 and "France" in fra.source
    assert fra.grams(3.6e6) == pytest.approx(56.0)  # one kWh
    with pytest.raises(ValueError, match="not in"):
        grid_intensity("XXX", mix=mix)
    with pytest.raises(ValueError, match="at least 0"):
        GridIntensity(-1.0, "bad")
