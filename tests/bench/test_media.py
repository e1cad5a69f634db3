"""``roost bench media`` at tiny scale through the real command (embedded server, local media store)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from roost.bench.media import parse_sizes
from roost.cli.main import main


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
