"""offline-drain and group-fanout at tiny scale through the real ``roost bench`` command."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from roost.bench.offline_drain import plan
from roost.cli.main import main


def run_bench(tmp_path: Path, *argv: str) -> dict:
    out = tmp_path / "report.json"
    assert main(["bench", *argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_offline_plan_spreads_every_sender_over_the_recipients() -> None:
    sends = plan(40, [f"s{i}" for i in range(4)], [f"r{i}" for i in range(5)])
    assert sum(n for _, _, n in sends) == 40
    per_recipient = Counter[str]()
    for _, to, n in sends:
        per_recipient[to] += n
    assert per_recipient == {f"r{i}": 8 for i in range(5)}
    assert {s for s, _, _ in sends} == {"s0", "s1", "s2", "s3"}


def test_offline_drain_receives_every_message_once(tmp_path: Path) -> None:
    report = run_bench(
        tmp_path,
        "offline-drain",
        # enough messages that the drain's server CPU spans several clock ticks
        # (/proc counts 10 ms ticks; 600 messages drained in one and read as 0.0)
        "--messages",
        "3000",
        "--recipients",
        "6",
        "--senders",
        "5",
        "--timeout",
        "30",
    )
    r = report["results"]
    assert r["messages"] == r["acked"] == 3000 and r["queue_errors"] == 0
    assert r["received"] == 3000 and r["missing"] == 0 and r["recipients_short"] == 0
    assert r["duplicates"] == 0 and r["errors"] == 0
    assert r["connected"] == r["recipients"] == 6
    assert 0 < r["drain_seconds"] < 30
    # drain_seconds is rounded to the millisecond in the report: allow for that error
    seconds = r["drain_seconds"]
    assert abs(r["rate_achieved"] - 3000 / seconds) <= 3000 * 0.0005 / (seconds * (seconds - 0.0005)) + 1
    assert r["queue_rate"] > 0 and r["server_cpu_pct"] > 0


def test_group_fanout_reaches_every_member_and_the_offline_half_later(tmp_path: Path) -> None:
    plots = tmp_path / "plots"
    report = run_bench(
        tmp_path, "group-fanout", "--sizes", "4,12", "--posts", "5", "--interval", "0.01",
        "--plot", str(plots),
    )  # fmt: skip
    phases = report["results"]["groups"]
    assert [(p["size"], p["label"]) for p in phases] == [
        (4, "4 all online"), (4, "4 half offline"), (12, "12 all online"), (12, "12 half offline"),
    ]  # fmt: skip
    for phase in phases:
        assert phase["posts_complete"] == phase["posts"] == 5
        assert phase["deliveries"] == 5 * phase["online_receivers"]
        assert 0 < phase["p50_ms"] <= phase["p99_ms"] <= phase["max_ms"] < 5000
        assert phase["errors"] == 0 and phase["duplicates"] == 0
    online, offline = phases[2], phases[3]
    assert online["online_receivers"] == 11 and offline["online_receivers"] == 5
    assert offline["offline_members"] == 6
    assert offline["offline_received_all"] and offline["missing"] == 0
    assert (plots / "group-fanout-time-to-all.png").stat().st_size > 1000
