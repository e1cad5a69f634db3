"""The ``roost`` command-line contract, run as real subprocesses."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cli_subprocess import REPO, ROOST, run_roost
from tests.e2e.helpers import add_users, connect, publish_keys
from tests.e2e.server import ServerProcess, free_port

GROUP_ID = re.compile(r"^g:[0-9a-f]{16}$")


def _env(tmp_path: Path) -> dict[str, str]:
    # Any state file the CLI would default to lands in the test's directory.
    return {**os.environ, "XDG_STATE_HOME": str(tmp_path / "xdg"), "PYTHONUNBUFFERED": "1"}


def roost(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_roost(*args, env=_env(tmp_path), timeout=timeout)


def roost_bg(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*ROOST, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=_env(tmp_path),
    )


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"process did not exit: {out} {err}") from None
    return proc.returncode, out, err


def client_args(srv: ServerProcess, token: str, state: Path) -> list[str]:
    return ["--url", srv.url, "--token", token, "--state", str(state)]


def json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture
def users(server: ServerProcess, tmp_path: Path) -> dict[str, list[str]]:
    """name -> the client flags (url, token, own state file) of alice, bob, carol."""
    tokens = add_users(server, ["alice", "bob", "carol"])
    # Each has run a client once: their keys are on the server, so a message
    # to them is encrypted and sent at once (to a user without keys it waits).
    asyncio.run(publish_keys(server, {n: (t, tmp_path / f"{n}.state") for n, t in tokens.items()}))
    return {n: client_args(server, t, tmp_path / f"{n}.state") for n, t in tokens.items()}


def test_user_add_prints_token_as_last_line(server: ServerProcess, tmp_path: Path) -> None:
    # ``--data-dir DIR`` embedded, ``--store postgresql://...`` for a cluster.
    store = server.store_args
    out = roost(tmp_path, "user", "add", "alice", *store)
    assert out.returncode == 0, out.stderr
    alice_token = out.stdout.strip().splitlines()[-1]
    assert len(alice_token) >= 32 and " " not in alice_token
    bob_token = roost(tmp_path, "user", "add", "bob", *store).stdout.strip().splitlines()[-1]
    assert bob_token != alice_token

    # The printed token authenticates against the running server (bob has
    # run a client first: his keys are there, the message is sent at once).
    asyncio.run(publish_keys(server, {"bob": (bob_token, tmp_path / "b.state")}))
    sent = roost(
        tmp_path, "send", *client_args(server, alice_token, tmp_path / "a.state"), "--to", "bob", "hi"
    )
    assert sent.returncode == 0, sent.stderr
    assert json_lines(sent.stdout)[0]["conversation"] == "d:alice:bob"

    dup = roost(tmp_path, "user", "add", "alice", *store)
    assert dup.returncode != 0 and "exists" in dup.stderr
    for bad_name in ("Not A Name", "bob\n", "x" * 33, ""):
        bad = roost(tmp_path, "user", "add", bad_name, *store)
        assert bad.returncode == 2 and bad.stdout == "", repr(bad_name)
    # A wrong token is refused with a non-zero exit.
    refused = roost(
        tmp_path,
        "send",
        *client_args(server, "nope", tmp_path / "x.state"),
        "--to",
        "bob",
        "x",
        "--timeout",
        "5",
    )
    assert refused.returncode != 0
    assert "auth_failed" in refused.stderr


def test_send_prints_one_json_line(server: ServerProcess, users, tmp_path: Path) -> None:
    for expected_seq, text in enumerate(["first", "second"], start=1):
        out = roost(tmp_path, "send", *users["alice"], "--to", "bob", text)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert len(lines) == 1, out.stdout
        result = json.loads(lines[0])
        assert result["conversation"] == "d:alice:bob"
        assert result["seq"] == expected_seq
        assert isinstance(result["message_id"], str) and result["message_id"]
        assert result["status"] == "sent"
    # Sending to a non-existent user fails with a non-zero exit and a message.
    out = roost(tmp_path, "send", *users["alice"], "--to", "nobody", "hello?")
    assert out.returncode != 0
    assert "unknown_user" in out.stderr


def test_send_wait_delivered_with_concurrent_listener(server: ServerProcess, users, tmp_path: Path) -> None:
    listener = roost_bg(tmp_path, "listen", *users["bob"], "--count", "1", "--timeout", "30")
    try:
        out = roost(
            tmp_path,
            "send",
            *users["alice"],
            "--to",
            "bob",
            "--wait",
            "delivered",
            "--timeout",
            "30",
            "ping bob",
        )
    finally:
        code, lout, lerr = finish(listener)
    assert out.returncode == 0, out.stderr
    sent = json.loads(out.stdout.strip().splitlines()[-1])
    assert sent["status"] == "delivered" and sent["seq"] == 1
    assert code == 0, lerr
    got = json_lines(lout)
    assert len(got) == 1
    assert {k: got[0][k] for k in ("conversation", "seq", "sender", "message_id", "text")} == {
        "conversation": "d:alice:bob",
        "seq": 1,
        "sender": "alice",
        "message_id": sent["message_id"],
        "text": "ping bob",
    }


def test_send_wait_delivered_without_listener_times_out(server: ServerProcess, users, tmp_path: Path) -> None:
    start = time.monotonic()
    out = roost(
        tmp_path, "send", *users["alice"], "--to", "bob", "--wait", "delivered", "--timeout", "2", "x"
    )
    elapsed = time.monotonic() - start
    assert out.returncode != 0
    assert 2.0 <= elapsed < 15, elapsed
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] != "delivered"
    # It was still stored (✓): bob gets it later.
    listen = roost(tmp_path, "listen", *users["bob"], "--count", "1", "--timeout", "10")
    assert listen.returncode == 0, listen.stderr
    assert json_lines(listen.stdout)[0]["message_id"] == result["message_id"]


def test_listen_prints_messages_in_order_and_acks_them(server: ServerProcess, users, tmp_path: Path) -> None:
    sent = []
    for i in range(5):
        out = roost(tmp_path, "send", *users["alice"], "--to", "bob", f"line {i}")
        assert out.returncode == 0, out.stderr
        sent.append(json.loads(out.stdout))
    listen = roost(tmp_path, "listen", *users["bob"], "--count", "5", "--timeout", "20")
    assert listen.returncode == 0, listen.stderr
    got = json_lines(listen.stdout)
    assert [m["seq"] for m in got] == [1, 2, 3, 4, 5]
    assert [m["text"] for m in got] == [f"line {i}" for i in range(5)]
    assert [m["message_id"] for m in got] == [s["message_id"] for s in sent]
    assert {m["sender"] for m in got} == {"alice"}
    assert {m["conversation"] for m in got} == {"d:alice:bob"}
    # They were acked: listening again (same state) shows nothing, and a
    # --count that is not reached exits non-zero at --timeout.
    start = time.monotonic()
    again = roost(tmp_path, "listen", *users["bob"], "--count", "1", "--timeout", "1.5")
    assert again.returncode != 0
    assert again.stdout.strip() == ""
    assert time.monotonic() - start >= 1.5
    # Without --count, --timeout ends it cleanly.
    quiet = roost(tmp_path, "listen", *users["bob"], "--timeout", "1")
    assert quiet.returncode == 0 and quiet.stdout.strip() == ""


def test_send_wait_read_with_listen_read(server: ServerProcess, users, tmp_path: Path) -> None:
    listener = roost_bg(tmp_path, "listen", *users["bob"], "--count", "1", "--timeout", "30", "--read")
    try:
        out = roost(
            tmp_path, "send", *users["alice"], "--to", "bob", "--wait", "read", "--timeout", "30", "read me"
        )
    finally:
        code, lout, lerr = finish(listener)
    assert code == 0, lerr
    assert out.returncode == 0, out.stderr
    sent = json.loads(out.stdout.strip().splitlines()[-1])
    assert sent["status"] == "read"
    assert json_lines(lout)[0]["message_id"] == sent["message_id"]


def test_wait_read_without_read_marker_times_out(server: ServerProcess, users, tmp_path: Path) -> None:
    """A listener that does not pass --read delivers (✓✓) but never reads."""
    listener = roost_bg(tmp_path, "listen", *users["bob"], "--count", "1", "--timeout", "30")
    try:
        out = roost(
            tmp_path, "send", *users["alice"], "--to", "bob", "--wait", "read", "--timeout", "3", "unread"
        )
    finally:
        code, _, lerr = finish(listener)
    assert code == 0, lerr
    assert out.returncode != 0
    assert json.loads(out.stdout.strip().splitlines()[-1])["status"] != "read"


def test_group_create_and_send_to_group(server: ServerProcess, users, tmp_path: Path) -> None:
    out = roost(tmp_path, "group", "create", *users["alice"], "--name", "club", "--members", "bob,carol")
    assert out.returncode == 0, out.stderr
    group = out.stdout.strip().splitlines()[-1]
    assert GROUP_ID.match(group), out.stdout

    sent = roost(tmp_path, "send", *users["alice"], "--group", group, "hello club")
    assert sent.returncode == 0, sent.stderr
    result = json.loads(sent.stdout)
    assert result["conversation"] == group and result["seq"] == 2

    for name in ("bob", "carol"):
        listen = roost(tmp_path, "listen", *users[name], "--count", "1", "--timeout", "15")
        assert listen.returncode == 0, listen.stderr
        got = json_lines(listen.stdout)
        assert len(got) == 1
        assert (got[0]["conversation"], got[0]["seq"], got[0]["sender"], got[0]["text"]) == (
            group,
            2,
            "alice",
            "hello club",
        )
        assert got[0]["message_id"] == result["message_id"]

    info = roost(tmp_path, "group", "info", *users["bob"], "--group", group)
    assert info.returncode == 0, info.stderr
    state = json_lines(info.stdout)[-1]
    assert state["members"] == ["alice", "bob", "carol"] and state["admins"] == ["alice"]
    assert state["last_seq"] == 2

    # A non-member cannot send to it.
    outsider = add_users(server, ["dave"])["dave"]
    refused = roost(
        tmp_path, "send", *client_args(server, outsider, tmp_path / "d.state"), "--group", group, "let me in"
    )
    assert refused.returncode != 0 and "not_member" in refused.stderr


def test_group_membership_commands(server: ServerProcess, users, tmp_path: Path) -> None:
    out = roost(tmp_path, "group", "create", *users["alice"], "--name", "ops", "--members", "bob")
    assert out.returncode == 0, out.stderr
    group = out.stdout.strip().splitlines()[-1]

    added = roost(tmp_path, "group", "add", *users["alice"], "--group", group, "--members", "carol")
    assert added.returncode == 0, added.stderr
    assert json_lines(added.stdout)[-1]["members"] == ["alice", "bob", "carol"]

    refused = roost(tmp_path, "group", "remove", *users["bob"], "--group", group, "--members", "carol")
    assert refused.returncode != 0 and "forbidden" in refused.stderr

    removed = roost(tmp_path, "group", "remove", *users["alice"], "--group", group, "--members", "carol")
    assert removed.returncode == 0, removed.stderr
    assert json_lines(removed.stdout)[-1]["members"] == ["alice", "bob"]

    left = roost(tmp_path, "group", "leave", *users["bob"], "--group", group)
    assert left.returncode == 0, left.stderr
    assert json_lines(left.stdout)[-1]["members"] == ["alice"]

    gone = roost(tmp_path, "group", "info", *users["bob"], "--group", group)
    assert gone.returncode != 0 and "not_member" in gone.stderr


def test_listen_prints_binary_bodies_as_base64(server: ServerProcess, users, tmp_path: Path) -> None:
    payload = bytes(range(256))

    async def send_binary() -> None:
        token = users["alice"][users["alice"].index("--token") + 1]
        alice = await connect(server, token, tmp_path / "sdk-alice.state")
        try:
            await asyncio.wait_for(alice.send(body=payload, to="bob", ct="application/octet-stream"), 10)
        finally:
            await alice.close()

    asyncio.run(send_binary())
    listen = roost(tmp_path, "listen", *users["bob"], "--count", "1", "--timeout", "10")
    assert listen.returncode == 0, listen.stderr
    got = json_lines(listen.stdout)[0]
    assert got["ct"] == "application/octet-stream"
    assert base64.b64decode(got["body_b64"]) == payload


def test_send_fails_over_to_the_next_url(server: ServerProcess, users, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    flags = list(users["alice"])
    flags[flags.index("--url") + 1] = dead
    out = roost(
        tmp_path, "send", *flags, "--url", server.url, "--to", "bob", "--timeout", "20", "via failover"
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["seq"] == 1
