"""Readiness (/readyz), the SIGTERM drain, and the connection id in the logs.

Real ``roost serve`` subprocesses; the cluster case stops the test's own
PostgreSQL and Redis to see /readyz turn 503 and come back.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.cluster import ClusterServer, ClusterServices
from tests.e2e.conftest import AnyServer
from tests.e2e.helpers import RawWS, add_users
from tests.e2e.server import free_port


def readyz(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_readyz(url: str, status: int, timeout: float = 10.0) -> dict[str, Any]:
    """Poll /readyz (bounded) until it answers ``status``; its body."""
    deadline = time.monotonic() + timeout
    while True:
        code, body = readyz(url)
        if code == status:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"/readyz stayed {code} {body}, wanted {status}")
        time.sleep(0.05)


def test_readyz_answers_200_while_up(server: AnyServer) -> None:
    for url in server.urls:
        assert readyz(url) == (200, {"status": "ready"})
    # /healthz is unchanged liveness.
    with urllib.request.urlopen(server.url + "/healthz", timeout=5) as resp:
        assert json.loads(resp.read())["status"] == "ok"


@pytest.mark.embedded_only
def test_sigterm_drain_turns_readyz_503_and_spreads_1001_closes(make_server: Any) -> None:
    period, n = 2.0, 6
    srv = make_server("--drain-seconds", str(period))
    tokens = add_users(srv, [f"d{i}" for i in range(n)])

    async def run() -> None:
        clients = [await RawWS.open(srv, tok) for tok in tokens.values()]
        loop = asyncio.get_running_loop()
        closed_at: list[float] = []
        codes: list[int | None] = []

        async def watch(c: RawWS) -> None:
            codes.append(await c.wait_closed(timeout=period + 10))
            closed_at.append(loop.time())

        watchers = [asyncio.create_task(watch(c)) for c in clients]
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGTERM)
        # The listener still answers while draining: a load balancer sees 503.
        body = await asyncio.to_thread(wait_readyz, srv.url, 503)
        assert body["status"] == "unready" and "draining" in body["reason"]
        # ... and a new WebSocket upgrade is refused with 503.
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await RawWS.open(srv)
        assert refused.value.status == 503
        await asyncio.gather(*watchers)
        for c in clients:
            await c.close()
        assert codes == [1001] * n
        spread = max(closed_at) - min(closed_at)
        # Evenly over the period: the last closes ~ period * (n-1)/n after the first.
        assert spread >= period * (n - 1) / n * 0.7, spread

    asyncio.run(run())
    assert srv.proc is not None
    assert srv.proc.wait(timeout=15) == 0


@pytest.mark.embedded_only
def test_drain_seconds_zero_closes_all_at_once(make_server: Any) -> None:
    srv = make_server("--drain-seconds", "0")
    tokens = add_users(srv, ["z0", "z1", "z2"])

    async def run() -> list[int | None]:
        clients = [await RawWS.open(srv, tok) for tok in tokens.values()]
        assert srv.proc is not None
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(*(c.wait_closed(timeout=10) for c in clients))
        assert time.monotonic() - started < 2.0
        for c in clients:
            await c.close()
        return list(codes)

    assert asyncio.run(run()) == [1001, 1001, 1001]
    assert srv.terminate() == 0


@pytest.mark.redis
@pytest.mark.postgres
def test_readyz_503_while_postgres_or_redis_is_down(
    cluster_services: ClusterServices, tmp_path: Path
) -> None:
    cluster_services.flush_redis()
    srv = ClusterServer(cluster_services, tmp_path)
    srv.start()
    try:
        url = srv.urls[0]
        wait_readyz(url, 200)
        cluster_services.pg.stop()
        try:
            body = wait_readyz(url, 503)
            assert body["reason"].startswith("store"), body
        finally:
            cluster_services.pg.start()
        wait_readyz(url, 200, timeout=20)
        cluster_services.redis.stop()
        try:
            body = wait_readyz(url, 503)
            assert body["reason"].startswith("redis"), body
        finally:
            cluster_services.redis.start()
        wait_readyz(url, 200, timeout=20)
    finally:
        srv.stop()


def _connection_lines(lines: list[dict[str, Any]]) -> dict[str, list[str]]:
    """conn id -> the messages logged with it."""
    by_conn: dict[str, list[str]] = {}
    for line in lines:
        if "conn" in line:
            by_conn.setdefault(line["conn"], []).append(line["msg"])
    return by_conn


async def _two_sessions(srv: AnyServer) -> None:
    tokens = add_users(srv, ["la", "lb"])
    for tok in tokens.values():
        c = await RawWS.open(srv, tok)
        await c.roundtrip()
        await c.close()


def _wait_for_log(srv: Any, pattern: str, count: int, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = srv.log_path.read_text()
        if len(re.findall(pattern, text)) >= count or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


@pytest.mark.embedded_only
def test_json_logs_by_default_off_a_terminal_with_a_connection_id(make_server: Any) -> None:
    srv = make_server()  # stderr is a file: json
    asyncio.run(_two_sessions(srv))
    text = _wait_for_log(srv, '"disconnected"', 2)
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    by_conn = _connection_lines(lines)
    sessions = [msgs for msgs in by_conn.values() if "connected" in msgs]
    assert len(sessions) == 2, by_conn
    for msgs in sessions:
        assert "disconnected" in msgs
    # Lines outside any connection carry none.
    assert "conn" not in next(line for line in lines if line["msg"] == "listening")


@pytest.mark.embedded_only
def test_console_log_format_carries_the_connection_id(make_server: Any) -> None:
    srv = make_server("--log-format", "console")
    asyncio.run(_two_sessions(srv))
    text = _wait_for_log(srv, r" disconnected ", 2)
    assert not any(line.startswith("{") for line in text.splitlines())
    pattern = r"^\d\d:\d\d:\d\d\.\d{3} INFO  roost\.gateway (dis)?connected user=(\w+) .*conn=([0-9a-f]{8})"
    found = [m.groups() for m in re.finditer(pattern, text, re.MULTILINE)]
    ids = {user: set() for _, user, _ in found}
    for _, user, conn in found:
        ids[user].add(conn)
    # One id per connection, the same on its connected and disconnected lines.
    assert len(found) == 4, text
    assert all(len(v) == 1 for v in ids.values()) and len(set.union(*ids.values())) == 2


def test_console_is_the_default_log_format_on_a_terminal(tmp_path: Path) -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "roost.cli.main",
            "serve",
            "--data-dir",
            str(tmp_path),
            "--port",
            str(free_port()),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=slave,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 15
        while b"listening" not in out and time.monotonic() < deadline and proc.poll() is None:
            if select.select([master], [], [], 0.2)[0]:
                out += os.read(master, 4096)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        os.close(master)
    line = next(line for line in out.decode().splitlines() if "listening" in line)
    assert re.match(r"\d\d:\d\d:\d\d\.\d{3} INFO  roost\.gateway listening host=127\.0\.0\.1 ", line), line
