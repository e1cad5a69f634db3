"""reconnect-storm at small scale on a real cluster (PostgreSQL + Redis + 2 gateways)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from roost.bench.storm import recipients_plan
from roost.cli.main import main
from roost.devcluster.postgres import PgUnavailable


def test_recipients_plan_spreads_messages() -> None:
    assert recipients_plan(10, 5) == {0: 1, 2: 1, 4: 1, 6: 1, 8: 1}
    assert recipients_plan(3, 7) == {0: 3, 1: 2, 2: 2}
    assert recipients_plan(3, 0) == {}


@pytest.mark.redis
@pytest.mark.postgres
def test_storm_reconnects_everyone_elsewhere_and_loses_nothing(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server missing")
    out = tmp_path / "report.json"
    argv = ["bench", "reconnect-storm", "--cluster", "2", "--connections", "200", "--messages", "120"]
    try:
        assert main([*argv, "--timeout", "30", "--json", str(out)]) == 0
    except PgUnavailable as exc:
        pytest.skip(f"PostgreSQL server binaries missing: {exc}")
    r = json.loads(out.read_text())["results"]
    for mode in ("jitter", "no_jitter"):
        run = r[mode]
        assert run["held_by_victim"] == 200
        assert run["converged"] and run["lost_connection"] == run["reconnected"] == 200
        assert run["not_reconnected"] == 0
        assert run["messages_acked"] == run["messages_received"] == 120 and run["lost"] == 0
        assert run["missing_reconnected"] == 0 and run["gaps"] == 0
        assert run["disconnects"].get("lost") == 200  # every socket died with the gateway
        assert 0 < run["reconnect_p50_s"] <= run["reconnect_all_s"] <= run["drained_all_s"] < 30
        assert run["peak_server_cpu_pct"] > 0
    assert r["jitter"]["jitter"] is True and r["no_jitter"]["jitter"] is False
    # Without jitter every client waits the same first delay (0.25 s): nobody is back before it.
    assert r["no_jitter"]["timeline"] and min_reconnect_after(r["no_jitter"]) >= 0.25


def min_reconnect_after(run: dict) -> float:
    """The first poll at which some client was back."""
    return next(t for t, back, _ in run["timeline"] if back > 0)


def test_cpu_timeline_counts_a_stretch_shorter_than_one_interval() -> None:
    """A storm over before the first periodic sample still reports the CPU it used."""
    import asyncio
    import os
    import time

    from roost.bench.storm import CpuTimeline

    async def run() -> tuple[float, CpuTimeline]:
        timeline = CpuTimeline([os.getpid()], interval=10.0).start()
        end = time.monotonic() + 0.1
        while time.monotonic() < end:  # busy: about one core for 0.1 s
            pass
        return timeline.stop(), timeline

    peak, timeline = asyncio.run(run())
    assert 30 < peak <= 200
    assert len(timeline.points) == 1 and timeline.cpu_seconds > 0.03
