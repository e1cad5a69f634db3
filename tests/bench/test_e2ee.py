"""``roost bench e2ee`` at tiny scale through the real command: it runs, its
counts are right and every cost is positive (no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from roost.cli.main import main

SMALL = ["bench", "e2ee", "--members", "6", "--messages", "10", "--sdk-messages", "5"]


def test_e2ee_bench_reports_positive_costs_and_right_counts(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    assert main([*SMALL, "--sdk-members", "0", "--json", str(out)]) == 0
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
    assert "sdk_redistribution" not in results


def test_sdk_redistribution_measures_every_remaining_member_reading_a_new_key(tmp_path: Path) -> None:
    """12 SDK clients in worker processes against a real server: after one
    leaves, the sender's new key reaches the 10 others, each of them reads
    the next message, the one who left does not."""
    out = tmp_path / "report.json"
    argv = [*SMALL, "--sdk-members", "12", "--workers", "2", "--timeout", "90", "--json", str(out)]
    assert main(argv) == 0
    r = json.loads(out.read_text())["results"]["sdk_redistribution"]
    assert r["members"] == 12
    # Before the leave: the key handed to all 11 others, and all of them read.
    assert r["first_message"]["handed_to"] == 11
    assert r["first_message"]["members_read"] == 11
    # After it: a new key, sealed for the 10 left besides the sender, all of whom read.
    assert r["new_sender_key"] is True
    assert r["pairwise_messages"] == r["handed_to"] == 10
    assert r["members_read"] == 10
    assert r["left_member_read"] is False
    assert r["decryption_failures"] == 0
    assert 0 < r["sender_sealed_ms"] <= r["sender_acked_ms"]
    assert r["sender_cpu_ms"] > 0
    assert r["member_cpu_ms"] > 0
    assert 0 < r["read_p50_ms"] <= r["read_p99_ms"] <= r["read_max_ms"] == r["all_read_ms"]


@pytest.mark.parametrize("members", ["2", "-1"])
def test_sdk_redistribution_refuses_a_group_too_small_to_measure(members: str) -> None:
    assert main([*SMALL, "--sdk-members", members]) != 0
