"""A client killed (SIGKILL, a real subprocess) at any instant between
encrypting and the ack loses no message and never desynchronises a session:
the session state is committed with the message it encrypted or decrypted."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from roost.client import Message
from roost.client.state import ClientState
from tests.cli_subprocess import REPO
from tests.e2e.helpers import add_users, close_all, connect, wait_for_event
from tests.e2e.test_e2ee import published, texts

N = 60

_AGENT = textwrap.dedent(
    """
    import asyncio, sys
    from roost.client import Client, DecryptionFailed, Message

    async def main(role, url, token, state, start, n):
        client = Client(url, token, state_path=state)
        await client.connect(20)
        if role == "send":
            for i in range(start, n):
                await client.send(f"msg {i}", to="bob", message_id=f"m{i:04d}", wait=False)
                print(f"queued {i}", flush=True)
                await asyncio.sleep(0.01)
            await client.drain_outbox(60)
            print("done", flush=True)
        else:
            async for event in client.events():
                if isinstance(event, Message):
                    print(f"got {event.id} {event.text}", flush=True)
                elif isinstance(event, DecryptionFailed):
                    print(f"FAILED {event.message_id}", flush=True)
        await client.close()

    role, url, token, state, start, n = sys.argv[1:]
    asyncio.run(main(role, url, token, state, int(start), int(n)))
    """
)


def _start(role: str, url: str, token: str, state: Path, start: int = 0) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _AGENT, role, url, token, str(state), str(start), str(N)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _read_lines(proc: subprocess.Popen[str], count: int, timeout: float = 60.0) -> list[str]:
    """Up to ``count`` lines of ``proc`` (fewer if it ends)."""
    assert proc.stdout is not None
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        while len(lines) < count:
            line = proc.stdout.readline()
            if not line:
                return
            lines.append(line.strip())

    import threading

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return lines


def _kill9(proc: subprocess.Popen[str]) -> list[str]:
    os.kill(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    return [line.strip() for line in out.splitlines()]


@pytest.mark.embedded_only
async def test_kill_9_between_encrypt_and_ack_loses_nothing_and_does_not_desync(
    make_server, tmp_path: Path
) -> None:
    srv = make_server(start=False)
    tokens = add_users(srv, ["alice", "bob"])
    srv.start()
    alice_state, bob_state = tmp_path / "alice.state", tmp_path / "bob.state"
    # Both have keys and a session before the kills start.
    alice = await published(await connect(srv, tokens["alice"], alice_state))
    bob = await published(await connect(srv, tokens["bob"], bob_state))
    await alice.send("hello", to="bob")
    assert await texts(bob, 1) == ["hello"]
    await close_all(alice, bob)

    rng = random.Random(12)
    loop = asyncio.get_running_loop()
    shown: list[str] = []
    receiver = _start("listen", srv.url, tokens["bob"], bob_state)
    next_index = 0
    for _round in range(4):  # the sender is killed 4 times, the receiver with it
        sender = _start("send", srv.url, tokens["alice"], alice_state, next_index)
        lines = await loop.run_in_executor(None, _read_lines, sender, rng.randint(3, 12))
        lines += _kill9(sender)
        queued = [int(line.split()[1]) for line in lines if line.startswith("queued")]
        next_index = max(queued, default=next_index - 1) + 1
        shown += _kill9(receiver)
        receiver = _start("listen", srv.url, tokens["bob"], bob_state)
    sender = _start("send", srv.url, tokens["alice"], alice_state, next_index)
    lines = await loop.run_in_executor(None, _read_lines, sender, N + 1, 120)
    assert lines[-1:] == ["done"], lines
    sender.wait(30)
    await asyncio.sleep(3)
    shown += _kill9(receiver)

    assert not [line for line in shown if line.startswith("FAILED")], shown
    got_ids = {line.split()[1] for line in shown if line.startswith("got")}
    # Nothing lost: every message reached bob's state (a kill after showing
    # but before the commit shows it again after the restart, never loses it).
    state = ClientState(bob_state)
    try:
        stored = dict(
            state.db.execute("SELECT id, body FROM messages WHERE sender='alice' AND conv='d:alice:bob'")
        )
    finally:
        state.close()
    expected = {f"m{i:04d}": f"msg {i}".encode() for i in range(N)}
    assert {k: bytes(v) for k, v in stored.items() if k in expected} == expected
    assert {f"m{i:04d}" for i in range(N)} <= got_ids | set(stored)

    # Not desynchronised: both sessions still work, both ways.
    alice = await connect(srv, tokens["alice"], alice_state)
    bob = await connect(srv, tokens["bob"], bob_state)
    try:
        await alice.send("after the kills", to="bob")
        await wait_for_event(bob, lambda e: isinstance(e, Message) and e.text == "after the kills", 20)
        await bob.send("and back", to="alice")
        await wait_for_event(alice, lambda e: isinstance(e, Message) and e.text == "and back", 20)
    finally:
        await close_all(alice, bob)
