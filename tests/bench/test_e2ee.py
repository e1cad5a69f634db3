"""``roost bench e2ee`` at tiny scale through the real command: it runs, its
counts are right and every cost is positive (no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from roost.cli.main import main


def test_e2ee_bench_reports_positive_costs_and_right_counts(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    argv = ["bench", "e2ee", "--members", "6", "--messages", "10", "--sdk-messages", "5"]
    assert main([*argv, "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert all(value > 0 for value in results["protocol"].values())
    redistribution = results["redistribution"]
    assert redistribution["members"] == 6
    assert redistribution["pairwise_messages"] == 4  # neither the sender nor who left
    for key in ("sender_cpu_ms", "member_cpu_us", "readable_after_ms", "readable_after_ms_here"):
        assert redistribution[key] > 0, key
    sdk = results["sdk"]
    assert sdk["messages"] == 5
    assert sdk["per_message_cpu_us"] > 0
    assert sdk["first_message_cpu_ms"] > 0
