"""The markdown report and the CLI's saturation flags, from hand-made reports."""

from __future__ import annotations

from roost.bench.cli import mark_saturation
from roost.bench.report import render


def report(results: dict) -> dict:
    return {
        "scenario": "one-to-one",
        "parameters": {"pairs": 2, "with_baseline": True, "json": "x.json", "cluster": 0, "workers": 2},
        "started": "2026-01-01T00:00:00+00:00",
        "duration_s": 3.0,
        "results": results,
    }


def test_render_lists_steps_baseline_and_the_command() -> None:
    step = {"rate_offered": 1000.0, "rate_achieved": 999.0, "p50_ms": 1.5, "p99_ms": 12.0, "missing": 0}
    text = render(report({"steps": [step], "baseline": {"steps": [step]}, "baseline_ratio": 0.5}))
    assert "roost bench one-to-one --pairs 2 --with-baseline --workers 2" in text
    assert text.count("| 1,000 | 999.0 | 1.50 | 12.0 | 0 |") == 2
    assert "| `baseline_ratio` | 0.50 |" in text


def test_saturation_flags_come_from_any_step() -> None:
    results = {"steps": [{"loadgen_saturated": False, "machine_busy_pct": 40.0}], "baseline": {"steps": []}}
    assert not mark_saturation(results) and not results["machine_saturated"]
    results["baseline"]["steps"].append({"loadgen_saturated": True, "machine_busy_pct": 99.0})
    assert mark_saturation(results) and results["machine_saturated"]
