"""`leanrec plan`: per-request figures times the deployment's requests, every input printed beside them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leanrec.cli import main
from leanrec.energy.capacity import HOURS_PER_YEAR, Scale, capacity_plan
from leanrec.energy.carbon import GridIntensity, codecarbon_mix


def _report() -> dict:
    """A demo report of 1,000 requests with round per-request figures."""

    def energy(serialize: float, other: float) -> dict:
        return {
            "stages": {"serialize": {"total": serialize}, "join": {"total": other}},
            "coefficients": {
                "watts_per_core": 10.0,
                "network_j_per_byte": 5e-9,
                "storage_write_j_per_byte": 15e-9,
                "storage_w_per_tb": 1.0,
            },
            "power_source": "test",
        }

    return {
        "requests": 1000,
        "traffic": {"ranked_per_request": 100.0},
        "kv_bytes_written": {"naive": 1_000_000_000, "lean": 50_000_000},
        "warehouse_bytes": {"naive": 40_000_000, "lean": 20_000_000},
        "examples": {"naive": 9000, "lean": 9000},
        "energy": {"naive": energy(300.0, 100.0), "lean": energy(20.0, 100.0)},
    }


def test_a_plan_multiplies_the_measured_figures_by_the_requests_served() -> None:
    scale = Scale(daily_active_users=1e6, requests_per_user=8.64, retention_days=10)  # 100 requests/s
    plan = capacity_plan(_report(), scale, GridIntensity(500.0, "test"))
    naive, lean = plan["naive"], plan["lean"]
    assert naive["kv_write_bytes_per_second"] == pytest.approx(1e6 * 100)  # 1 MB per request, 100/s
    assert lean["kv_write_bytes_per_second"] == pytest.approx(5e4 * 100)
    assert naive["warehouse_bytes_per_day"] == pytest.approx(40_000 * 8.64e6)
    assert lean["warehouse_bytes_retained"] == pytest.approx(20_000 * 8.64e6 * 10)
    assert (
        naive["training_examples_per_day"] == lean["training_examples_per_day"] == pytest.approx(9 * 8.64e6)
    )
    assert naive["joules_per_request"] == pytest.approx(0.4) and lean["joules_per_request"] == pytest.approx(
        0.12
    )
    # 0.12 J per request at 100 requests/s is 12 W, plus 1.728 TB held at 1 W/TB.
    assert lean["average_watts"] == pytest.approx(12.0 + 1.728)
    assert lean["tonnes_co2e_per_year"] == pytest.approx(13.728 * HOURS_PER_YEAR / 1e3 * 500 / 1e6)
    assert plan["ratio"]["joules_per_request"] == pytest.approx(0.3)
    assert plan["inputs"]["requests per day"] == (pytest.approx(8.64e6), "users × requests per user")


def test_the_naive_path_grows_with_items_ranked_and_the_lean_path_does_not() -> None:
    grid = GridIntensity(500.0, "test")
    base = capacity_plan(_report(), Scale(1e6, 10), grid)
    more = capacity_plan(_report(), Scale(1e6, 10, items_per_request=500), grid)
    assert more["naive"]["kv_write_bytes_per_second"] == pytest.approx(
        5 * base["naive"]["kv_write_bytes_per_second"]
    )
    # Serialization (300 J) grows five-fold; the join (100 J) does not.
    assert more["naive"]["joules_per_request"] == pytest.approx((5 * 300 + 100) / 1000)
    assert more["lean"] == base["lean"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("daily_active_users", 0), ("requests_per_user", -1), ("retention_days", 0), ("items_per_request", 0.5)],
)
def test_a_scale_out_of_range_is_refused(field: str, value: float) -> None:
    kwargs = {"daily_active_users": 10.0, "requests_per_user": 1.0, field: value}
    with pytest.raises(ValueError, match=field.replace("_", " ").split()[0]):
        Scale(**kwargs)


def test_the_command_prints_inputs_and_outputs_and_refuses_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "report.json"
    report.write_text(json.dumps(_report()))
    assert main(["plan", "--report", str(report), "--dau", "2e6", "--grid-intensity", "300"]) == 0
    out = capsys.readouterr().out
    for text in ("extrapolated from", "daily active users", "items ranked per request", "average power"):
        assert text in out
    assert main(["plan", "--report", str(tmp_path / "none.json"), "--dau", "10"]) == 2
    assert "run `leanrec demo` first" in " ".join(capsys.readouterr().err.split())
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"requests": 10}))
    assert main(["plan", "--report", str(old), "--dau", "10"]) == 2
    assert "lacks" in " ".join(capsys.readouterr().err.split())
    with pytest.raises(SystemExit):
        main(["plan", "--report", str(report), "--dau", "-5"])
    assert "must be above 0" in capsys.readouterr().err


def test_the_demo_refuses_a_bad_energy_flag_before_it_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(out), "--grid-intensity", "-3"])
    assert "must be at least 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(out), "--watts-per-core", "0"])
    assert "must be above 0" in capsys.readouterr().err
    if codecarbon_mix() is None:  # without the carbon extra a region cannot be looked up
        assert main(["demo", "--out", str(out), "--region", "FRA"]) == 2
        assert "leanrec[carbon]" in " ".join(capsys.readouterr().err.split())
    assert not (out / "warehouse").exists()
