"""Ctrl-C (SIGINT) ends ``roost serve`` and ``roost listen`` cleanly: exit 130,
no traceback, no asyncio complaints. Real subprocesses, real signals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.e2e.helpers import RawWS, add_users, connect, users_with_keys
from tests.e2e.server import ServerProcess

pytestmark = pytest.mark.embedded_only  # signals to one `roost serve`

REPO = Path(__file__).resolve().parents[2]

# What an unclean asyncio shutdown prints (besides a traceback).
NOISE = (
    "Traceback",
    "Task was destroyed",
    "Event loop is closed",
    "Unclosed",
    "unclosed",
    "Exception ignored",
    "KeyboardInterrupt",
    "CancelledError",
)


def assert_clean(stderr: str) -> None:
    for text in NOISE:
        assert text not in stderr, f"{text!r} on stderr:\n{stderr[-3000:]}"


async def test_ctrl_c_stops_serve_with_130_and_a_clean_log(server: ServerProcess) -> None:
    tokens = add_users(server, ["alice"])
    ws = await RawWS.open(server, tokens["alice"])  # a live session during the stop
    assert server.proc is not None
    server.proc.send_signal(signal.SIGINT)
    code = await asyncio.wait_for(asyncio.to_thread(server.proc.wait), 20)
    await ws.close()
    log = server.log()
    assert code == 130, log
    assert_clean(log)
    # Everything the server wrote is its structured log: one JSON object a line.
    for line in log.splitlines():
        assert isinstance(json.loads(line), dict), line
    assert '"msg": "stopped"' in log, "the graceful shutdown must have run"


async def start_listen(server: ServerProcess, token: str, state: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "roost.cli.main",
        "listen",
        "--url",
        server.url,
        "--token",
        token,
        "--state",
        str(state),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def interrupt(listen: asyncio.subprocess.Process) -> tuple[int, str]:
    listen.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(listen.communicate(), 20)
    assert listen.returncode is not None
    return listen.returncode, err.decode()


async def test_ctrl_c_in_listen_while_messages_stream_in(server: ServerProcess, tmp_path: Path) -> None:
    tokens = await users_with_keys(server, ["alice", "bob"], tmp_path)
    alice = await connect(server, tokens["alice"], tmp_path / "a.state")
    listen = await start_listen(server, tokens["bob"], tmp_path / "b.state")

    async def keep_sending() -> None:
        for i in range(100_000):  # bounded; cancelled long before
            await alice.send(f"hi {i}", to="bob")
            await asyncio.sleep(0.005)

    sender = asyncio.create_task(keep_sending())
    try:
        assert listen.stdout is not None
        first = await asyncio.wait_for(listen.stdout.readline(), 20)
        assert json.loads(first)["sender"] == "alice"  # messages are flowing: interrupt mid-stream
        code, err = await interrupt(listen)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        await alice.close()
    assert code == 130, err
    assert_clean(err)
    assert err.strip() == "", err


async def test_ctrl_c_in_listen_while_the_server_is_gone(server: ServerProcess, tmp_path: Path) -> None:
    tokens = await users_with_keys(server, ["alice", "bob"], tmp_path)
    alice = await connect(server, tokens["alice"], tmp_path / "a.state")
    await asyncio.wait_for(alice.send("hi", to="bob"), 10)
    listen = await start_listen(server, tokens["bob"], tmp_path / "b.state")
    assert listen.stdout is not None
    await asyncio.wait_for(listen.stdout.readline(), 20)  # connected and received
    await alice.close()
    server.kill9()  # listen is now losing its connection or backing off to reconnect
    code, err = await interrupt(listen)
    assert code == 130, err
    assert_clean(err)
