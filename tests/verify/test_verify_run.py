"""A short real verify run: server subprocess, SDK clients, every nemesis on."""

from __future__ import annotations

from roost.verify.run import NEMESES, verify_embedded


async def test_short_embedded_run_under_faults_has_no_violations() -> None:
    result = await verify_embedded(clients=12, duration=12.0, seed=11, rate=40.0, nemeses=NEMESES)
    report = result.report
    assert report.violations == [], report.violations[:5]
    assert report.acked > 200 and report.delivered >= report.acked // 2
    assert sum(result.faults.values()) >= 2, result.faults
    assert result.as_json()["violations"] == []
