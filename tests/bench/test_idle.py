"""idle-connections at small scale through the real ``roost bench`` command, and its pure helpers."""

from __future__ import annotations

import json
import random
from pathlib import Path

from roost.bench.conn_worker import (
    OP_PING,
    OP_TEXT,
    client_frame,
    parse_frames,
    reconnect_delay,
    split_evenly,
)
from roost.bench.idle import plan_connections, slope
from roost.cli.main import main


def run_bench(tmp_path: Path, *argv: str) -> dict:
    out = tmp_path / "report.json"
    assert main(["bench", *argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_client_frames_parse_back_whatever_their_length() -> None:
    payloads = [b"", b"x" * 125, b"y" * 126, b"z" * 70_000]
    wire = b"".join(client_frame(OP_TEXT, p) for p in payloads) + client_frame(OP_PING, b"hb")
    frames, used = parse_frames(bytearray(wire))
    assert used == len(wire)
    assert frames == [(OP_TEXT, p) for p in payloads] + [(OP_PING, b"hb")]
    # A frame cut short stays in the buffer until the rest arrives.
    frames, used = parse_frames(bytearray(wire[:-1]))
    assert used == len(wire) - len(client_frame(OP_PING, b"hb")) and len(frames) == len(payloads)


def test_reconnect_delay_is_the_sdk_policy() -> None:
    rng = random.Random(7)
    delays = [reconnect_delay(3, True, 0.25, 8.0, rng) for _ in range(2000)]
    assert min(delays) >= 0 and max(delays) <= 2.0 and max(delays) > 1.8  # uniform(0, 0.25 * 2**3)
    assert reconnect_delay(3, False, 0.25, 8.0, rng) == 2.0  # no jitter: everyone waits the same
    assert reconnect_delay(10, False, 0.25, 8.0, rng) == 8.0  # capped


def test_connections_spread_over_gateways_and_processes() -> None:
    users = [f"u{i}" for i in range(7)]
    url_lists, conns = plan_connections(users, {u: "t" + u for u in users}, ["a", "b", "c"])
    assert url_lists == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert [c[2] for c in conns] == [0, 1, 2, 0, 1, 2, 0]
    parts = split_evenly(conns, 3)
    assert [len(p) for p in parts] == [3, 2, 2] and [c for p in parts for c in p] == conns
    assert slope([(0, 100), (10, 150), (20, 200)]) == 5.0


def test_idle_connections_reports_memory_per_connection_and_heartbeat_cpu(tmp_path: Path) -> None:
    report = run_bench(
        tmp_path, "idle-connections", "--connections", "200", "--steps", "2",
        "--idle-seconds", "2", "--settle", "0.5",
    )  # fmt: skip
    r = report["results"]
    assert r["connected"] == r["connections"] == r["open_after_idle"] == 200
    assert r["connect_failed"] == 0 and r["dropped_during_idle"] == 0
    assert r["gateways"] == 1 and r["connections_per_gateway"] == 200
    assert [s["connections"] for s in r["samples"]] == [0, 100, 200]
    assert r["samples"][-1]["rss_kib"] > r["samples"][0]["rss_kib"]
    # An idle authenticated connection costs something, and far less than 1 MiB.
    assert 0 < r["kib_per_connection"] < 1024
    assert r["heartbeat_s"] == 30 and r["heartbeat_cpu_pct"] >= 0
    assert report["machine"]["cores"] >= 1
