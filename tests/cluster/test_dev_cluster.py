"""``roost dev-cluster`` as a user runs it: a real subprocess, its printed URLs
and PIDs, ``kill -9`` of one gateway, Ctrl-C at the end."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import sys
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from roost.devcluster.postgres import PgUnavailable, find_bindir
from tests.e2e.helpers import RawWS
from tests.e2e.server import free_port

REPO = Path(__file__).resolve().parents[2]
GATEWAY_LINE = re.compile(r"^gateway:\s+(\S+) \(gw(\d+), pid (\d+)\)$")
DSN_LINE = re.compile(r"^PostgreSQL: (\S+)$")
STARTUP = 90.0  # seconds: PostgreSQL initdb + start, Redis, two gateways


def free_port_pair() -> int:
    """A port P with P and P+1 free on 127.0.0.1 (dev-cluster uses consecutive ports)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")


@dataclass
class Gw:
    url: str
    pid: int


@dataclass
class DevClusterProcess:
    proc: asyncio.subprocess.Process
    gateways: list[Gw] = field(default_factory=list)
    dsn: str = ""
    seen: list[str] = field(default_factory=list)

    async def line_matching(self, pattern: str, timeout: float) -> str:
        """The next stdout line containing ``pattern`` (lines before it are kept in ``seen``)."""
        assert self.proc.stdout is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no line with {pattern!r}; got {self.seen[-20:]}")
            raw = await asyncio.wait_for(self.proc.stdout.readline(), remaining)
            if not raw:
                raise AssertionError(f"dev-cluster ended before {pattern!r}; got {self.seen[-20:]}")
            line = raw.decode().rstrip("\n")
            self.seen.append(line)
            if pattern in line:
                return line

    async def add_user(self, name: str) -> str:
        """With the command dev-cluster prints for it."""
        add = await asyncio.create_subprocess_exec(
            *roost_cmd("user", "add", name, "--store", self.dsn),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO,
        )
        out, err = await asyncio.wait_for(add.communicate(), 60)
        assert add.returncode == 0, err.decode()
        return out.decode().strip().splitlines()[-1]


def roost_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "roost.cli.main", *args]


def need_services() -> None:
    try:
        find_bindir()
    except PgUnavailable as exc:
        pytest.skip(f"PostgreSQL server binaries missing: {exc}")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server missing")


@pytest.fixture
async def start_dev_cluster() -> AsyncIterator:
    started: list[DevClusterProcess] = []

    async def start(*flags: str) -> DevClusterProcess:
        need_services()
        proc = await asyncio.create_subprocess_exec(
            *roost_cmd("dev-cluster", "--gateways", "2", "--port", str(free_port_pair()), *flags),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        dc = DevClusterProcess(proc)
        started.append(dc)
        await dc.line_matching("Ctrl-C stops everything", STARTUP)
        for line in dc.seen:
            if m := GATEWAY_LINE.match(line):
                dc.gateways.append(Gw(m.group(1), int(m.group(3))))
            elif m := DSN_LINE.match(line):
                dc.dsn = m.group(1)
        assert len(dc.gateways) == 2 and dc.dsn, dc.seen
        return dc

    yield start
    for dc in started:
        if dc.proc.returncode is None:
            dc.proc.send_signal(signal.SIGINT)  # stops and deletes PostgreSQL, Redis, gateways
            try:
                await asyncio.wait_for(dc.proc.wait(), 60)
            except TimeoutError:
                dc.proc.kill()
                await dc.proc.wait()


async def assert_serves(url: str, token: str) -> None:
    ws = await RawWS.open(Gw(url, 0), token)  # asserts the welcome
    try:
        await ws.roundtrip()
    finally:
        await ws.close()


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.timeout(180)
async def test_a_killed_gateway_is_restarted_while_the_other_keeps_serving(start_dev_cluster) -> None:
    dc = await start_dev_cluster()
    token = await dc.add_user("alice")
    gw0, gw1 = dc.gateways
    held = await RawWS.open(gw1, token)  # a session on the survivor, open across the kill
    try:
        os.kill(gw0.pid, signal.SIGKILL)
        died = await dc.line_matching("gw0", 20)
        assert "died: killed by SIGKILL" in died, died
        await held.roundtrip()  # the survivor's session is untouched...
        await assert_serves(gw1.url, token)  # ...and it takes new ones
        restarted = await dc.line_matching("gw0 restarted", 60)
        assert gw0.url in restarted and f"pid {gw0.pid})" not in restarted, restarted
        await assert_serves(gw0.url, token)
    finally:
        await held.close()
    dc.proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(dc.proc.wait(), 60) == 0


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.timeout(180)
async def test_no_restart_leaves_the_killed_gateway_down(start_dev_cluster) -> None:
    dc = await start_dev_cluster("--no-restart")
    token = await dc.add_user("bob")
    gw0, gw1 = dc.gateways
    os.kill(gw0.pid, signal.SIGKILL)
    await dc.line_matching("gw0 left down", 20)
    assert not healthy(gw0.url)
    await assert_serves(gw1.url, token)
    assert dc.proc.returncode is None, "dev-cluster must keep running"


async def test_a_taken_port_fails_at_once_naming_it() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            *roost_cmd("dev-cluster", "--gateways", "1", "--port", str(port)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and f"port {port}" in lines[0] and "in use" in lines[0], lines
