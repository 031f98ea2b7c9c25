"""Grid carbon intensity: grams of CO2-equivalent per kWh, by country, from CodeCarbon's data if present.

With the optional ``carbon`` extra (``pip install leanrec[carbon]``), CodeCarbon's per-country energy
mix (``codecarbon/data/private_infra/global_energy_mix.json``, ISO 3166 alpha-3 codes) gives the
intensity of a country's grid; its data file is read directly, without importing CodeCarbon (which
would start its own trackers). Without it, or for a region it does not list, a stated default
applies, and the user can always give the figure outright.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_G_PER_KWH = 475.0
"""gCO2e per kWh when nothing better is known: roughly the world grid average of recent years."""


@dataclass(frozen=True)
class GridIntensity:
    """A grid's carbon intensity and where the figure comes from.

    Attributes:
        g_per_kwh: Grams of CO2-equivalent per kWh drawn.
        source: Printed beside every gCO2e figure.

    """

    g_per_kwh: float
    source: str

    def __post_init__(self) -> None:
        if not self.g_per_kwh >= 0:
            raise ValueError(f"a grid intensity is at least 0 gCO2e/kWh, got {self.g_per_kwh}")

    def grams(self, joules: float) -> float:
        """gCO2e of ``joules`` drawn from this grid."""
        return joules / 3.6e6 * self.g_per_kwh


def codecarbon_mix() -> Path | None:
    """CodeCarbon's per-country energy-mix file, if CodeCarbon is installed."""
    spec = importlib.util.find_spec("codecarbon")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = (
        Path(next(iter(spec.submodule_search_locations)))
        / "data"
        / "private_infra"
        / "global_energy_mix.json"
    )
    return path if path.is_file() else None


def grid_intensity(
    region: str | None = None, g_per_kwh: float | None = None, mix: Path | None = None
) -> GridIntensity:
    """The intensity to use: the figure given, else the region's from CodeCarbon's data, else the default.

    Args:
        region: ISO 3166 alpha-3 country code (``FRA``, ``USA``), case-insensitive.
        g_per_kwh: A figure given outright (wins over ``region``).
        mix: An energy-mix file in CodeCarbon's format (default: the installed CodeCarbon's).

    Raises:
        ValueError: A region the energy-mix data does not list (the message says what it lists), or
            a region given when no energy-mix data is installed.

    """
    if g_per_kwh is not None:
        return GridIntensity(g_per_kwh, "given")
    if region is None:
        return GridIntensity(DEFAULT_G_PER_KWH, f"stated default {DEFAULT_G_PER_KWH:g} gCO2e/kWh")
    mix = mix or codecarbon_mix()
    if mix is None:
        raise ValueError(
            f"region {region!r} needs CodeCarbon's energy-mix data: pip install 'leanrec[carbon]', "
            "or give the intensity in gCO2e/kWh instead"
        )
    data = json.loads(mix.read_text())
    entry = data.get(region.upper())
    if entry is None or "carbon_intensity" not in entry:
        raise ValueError(
            f"region {region!r} is not in {mix.name}; it lists ISO alpha-3 codes such as {sorted(data)[:8]}"
        )
    name, year = entry.get("country_name", region.upper()), entry.get("year", "?")
    return GridIntensity(float(entry["carbon_intensity"]), f"{name} ({year}), CodeCarbon energy mix")
