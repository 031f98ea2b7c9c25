"""Capacity and energy at a user's scale, naive against lean, extrapolated from a measured demo run.

The demo measures each path per request on the same traffic: transient-store bytes written, warehouse
bytes, training examples, and joules per stage. A capacity plan multiplies those per-request figures by
the requests a deployment serves, and says what it assumed. One assumption is structural: the naive
path logs every ranked item, so its serialization and transient-store figures grow with the items
ranked per request; the lean path logs what users view, which does not. Every other figure is taken
per request as measured.
"""

from __future__ import annotations

from dataclasses import dataclass

from leanrec.energy.carbon import GridIntensity
from leanrec.energy.stages import Coefficients

SECONDS_PER_DAY = 86_400
HOURS_PER_YEAR = 8_766  # 365.25 days
RANKED_STAGES = frozenset({"serialize", "kv_write", "kv_delete"})
"""Stages whose naive work is one write per ranked item (they scale with items ranked per request)."""


@dataclass(frozen=True)
class Scale:
    """A deployment's size.

    Attributes:
        daily_active_users: Users a day.
        requests_per_user: Feed requests per user per day.
        items_per_request: Items the late ranker orders per request (``None``: as measured).
        retention_days: Days the warehouse keeps training data.

    """

    daily_active_users: float
    requests_per_user: float
    items_per_request: float | None = None
    retention_days: float = 30.0

    def __post_init__(self) -> None:
        for name in ("daily_active_users", "requests_per_user", "retention_days"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name.replace('_', ' ')} must be above 0, got {getattr(self, name)}")
        if self.items_per_request is not None and not self.items_per_request >= 1:
            raise ValueError(f"items per request must be at least 1, got {self.items_per_request}")

    @property
    def requests_per_day(self) -> float:
        """Requests served a day."""
        return self.daily_active_users * self.requests_per_user


def capacity_plan(
    report: dict, scale: Scale, grid: GridIntensity, coeffs: Coefficients | None = None
) -> dict:
    """Naive and lean at ``scale``, from a demo report's measured per-request figures.

    Args:
        report: A ``leanrec demo`` report (``report.json``) with its energy section.
        scale: The deployment.
        grid: Carbon intensity of the deployment's grid.
        coeffs: Storage at rest (default: the report's own coefficients).

    Returns:
        ``inputs`` (every figure extrapolated from, with its origin) and, per path, the outputs.

    Raises:
        ValueError: A report without the figures a plan needs.

    """
    missing = [
        k
        for k in ("requests", "energy", "kv_bytes_written", "warehouse_bytes", "examples")
        if k not in report
    ]
    if missing or "ranked_per_request" not in report.get("traffic", {}):
        raise ValueError(
            f"the report lacks {missing or ['traffic.ranked_per_request']}: make it with `leanrec demo` "
            "of this version"
        )
    n = report["requests"]
    measured_items = report["traffic"]["ranked_per_request"]
    items = scale.items_per_request or measured_items
    factor = items / measured_items
    stored_w_per_tb = (coeffs or Coefficients(**_coeffs(report))).storage_w_per_tb
    rpd = scale.requests_per_day
    inputs = {
        "measured requests": (n, "demo report"),
        "items ranked per request, measured": (measured_items, "demo report"),
        "items ranked per request, planned": (items, "given" if scale.items_per_request else "as measured"),
        "daily active users": (scale.daily_active_users, "given"),
        "requests per user per day": (scale.requests_per_user, "given"),
        "requests per day": (rpd, "users × requests per user"),
        "retention days": (scale.retention_days, "given"),
        "grid gCO2e per kWh": (grid.g_per_kwh, grid.source),
        "watts per core": (
            report["energy"]["lean"]["coefficients"]["watts_per_core"],
            report["energy"]["lean"]["power_source"],
        ),
        "storage W per TB at rest": (stored_w_per_tb, "coefficient"),
    }
    paths = {}
    for path in ("naive", "lean"):
        grows = factor if path == "naive" else 1.0
        stages = report["energy"][path]["stages"]
        j_per_request = (
            sum(s["total"] * (grows if k in RANKED_STAGES else 1.0) for k, s in stages.items()) / n
        )
        kv_per_request = report["kv_bytes_written"][path] / n * grows
        wh_per_request = report["warehouse_bytes"][path] / n
        wh_per_day = wh_per_request * rpd
        held = wh_per_day * scale.retention_days
        watts = j_per_request * rpd / SECONDS_PER_DAY + held / 1e12 * stored_w_per_tb
        paths[path] = {
            "kv_write_bytes_per_second": kv_per_request * rpd / SECONDS_PER_DAY,
            "warehouse_bytes_per_day": wh_per_day,
            "warehouse_bytes_retained": held,
            "training_examples_per_day": report["examples"][path] / n * rpd,
            "joules_per_request": j_per_request,
            "average_watts": watts,
            "tonnes_co2e_per_year": watts * HOURS_PER_YEAR / 1e3 * grid.g_per_kwh / 1e6,
        }
    ratio = {k: paths["lean"][k] / v if v else float("nan") for k, v in paths["naive"].items()}
    return {"inputs": inputs, "naive": paths["naive"], "lean": paths["lean"], "ratio": ratio}


def _coeffs(report: dict) -> dict[str, float]:
    c = report["energy"]["lean"]["coefficients"]
    return {k: c[k] for k in ("network_j_per_byte", "storage_write_j_per_byte", "storage_w_per_tb")}
