"""Account administration end to end, embedded and cluster: ``roost user list /
token reset / disable / enable / remove`` run as the real CLI against a running
server (embedded: through its admin socket; cluster: PostgreSQL + Redis, the
account's connection may be on either gateway)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.cli_subprocess import run_roost
from tests.e2e.helpers import RawWS, add_users, b64, close_all, unb64

REVOKED = 4008


async def roost_user(srv: Any, *args: str, admin: bool = True) -> subprocess.CompletedProcess[str]:
    location = srv.admin_args if admin else srv.store_args
    return await asyncio.to_thread(run_roost, "user", *args, *location)


async def assert_refused(srv: Any, token: str) -> None:
    raw = await RawWS.open(srv)
    try:
        await raw.send({"type": "auth", "token": token})
        frame = await raw.recv()
        assert (frame["type"], frame["code"]) == ("error", "auth_failed")
        assert await raw.wait_closed() == 4001
    finally:
        await raw.close()


async def test_a_token_reset_closes_the_connection_and_only_the_new_token_works(server: Any) -> None:
    tokens = add_users(server, ["alice", "bob"])
    alice = await RawWS.open(server, tokens["alice"])
    bob = await RawWS.open(server, tokens["bob"])
    fresh: RawWS | None = None
    try:
        out = await roost_user(server, "token", "reset", "alice")
        assert out.returncode == 0, out.stderr
        new_token = out.stdout.strip().splitlines()[-1]
        assert new_token.startswith("rt_") and new_token != tokens["alice"]
        assert await alice.wait_closed(10) == REVOKED
        await assert_refused(server, tokens["alice"])
        fresh = await RawWS.open(server, new_token)  # checks the welcome
        await bob.send({"type": "send", "id": "m1", "to": "alice", "body": b64("still here")})
        assert (await bob.recv_type("ack"))["seq"] == 1
        msg = await fresh.recv_type("msg")
        assert unb64(msg["body"]) == b"still here"
    finally:
        await close_all(alice, bob, fresh)


async def test_a_disabled_account_cannot_log_in_and_gets_its_messages_once_enabled(server: Any) -> None:
    tokens = add_users(server, ["alice", "bob"])
    alice = await RawWS.open(server, tokens["alice"])
    bob = await RawWS.open(server, tokens["bob"])
    again: RawWS | None = None
    try:
        out = await roost_user(server, "disable", "bob")
        assert out.returncode == 0, out.stderr
        assert await bob.wait_closed(10) == REVOKED
        await assert_refused(server, tokens["bob"])
        # Messages to a disabled account are accepted and wait in its inbox.
        await alice.send({"type": "send", "id": "m1", "to": "bob", "body": b64("for later")})
        assert (await alice.recv_type("ack"))["seq"] == 1
        listed = await roost_user(server, "list", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = {row["name"]: (row["state"], row["online"]) for row in json.loads(listed.stdout)}
        assert rows == {"alice": ("active", True), "bob": ("disabled", False)}

        out = await roost_user(server, "enable", "bob")
        assert out.returncode == 0, out.stderr
        again = await RawWS.open(server, tokens["bob"])
        msg = await again.recv_type("msg")
        assert (msg["sender"], unb64(msg["body"])) == ("alice", b"for later")
    finally:
        await close_all(alice, bob, again)


async def test_a_removed_account_leaves_its_groups_and_its_name_is_not_reused(server: Any) -> None:
    tokens = add_users(server, ["alice", "bob", "carol"])
    alice = await RawWS.open(server, tokens["alice"])
    carol = await RawWS.open(server, tokens["carol"])
    try:
        await alice.send({"type": "group_create", "name": "g", "members": ["bob", "carol"], "ref": "c"})
        group = (await alice.recv_type("group"))["group"]
        await carol.send({"type": "send", "id": "hi", "to": "alice", "body": b64("hi alice")})
        await carol.recv_type("ack")
        await alice.recv_until(lambda fr: fr["type"] == "msg" and fr["sender"] == "carol")

        out = await roost_user(server, "remove", "carol")
        assert out.returncode == 0, out.stderr
        assert await carol.wait_closed(10) == REVOKED
        await assert_refused(server, tokens["carol"])
        # alice, online, gets the usual removal event (actor "": the administrator).
        event, _ = await alice.recv_until(
            lambda fr: fr["type"] == "msg" and fr["conv"] == group and fr["seq"] == 2
        )
        assert json.loads(unb64(event["body"])) == {
            "action": "removed",
            "actor": "",
            "users": ["carol"],
            "name": "g",
        }
        await alice.send({"type": "group_info", "group": group, "ref": "i"})
        info = await alice.recv_type("group")
        assert info["members"] == ["alice", "bob"]
        # carol's messages stay in alice's history; new ones to her are refused.
        await alice.send({"type": "history", "conv": "d:alice:carol", "ref": "h"})
        page = await alice.recv_type("history_page")
        assert [(m["sender"], unb64(m["body"])) for m in page["messages"]] == [("carol", b"hi alice")]
        await alice.send({"type": "send", "id": "m2", "to": "carol", "body": b64("are you there?")})
        refused = await alice.recv_type("error")
        assert (refused["code"], refused["ref"]) == ("unknown_user", "m2")
        await alice.send({"type": "group_add", "group": group, "members": ["carol"], "ref": "a"})
        assert (await alice.recv_type("error"))["code"] == "unknown_user"

        listed = json.loads((await roost_user(server, "list", "--json")).stdout)
        assert {row["name"]: row["state"] for row in listed}["carol"] == "removed"
        again = await roost_user(server, "add", "carol", admin=False)
        assert again.returncode == 1 and "not reused" in again.stderr
    finally:
        await close_all(alice, carol)


async def test_unknown_names_get_a_typed_error_and_change_nothing(server: Any) -> None:
    add_users(server, ["alice"])
    for args in (
        ("token", "reset", "nobody"),
        ("disable", "nobody"),
        ("enable", "nobody"),
        ("remove", "nobody"),
    ):
        out = await roost_user(server, *args)
        assert out.returncode == 1, (args, out.stdout)
        assert "unknown_user: no such user: nobody" in out.stderr, out.stderr
        assert "rt_" not in out.stdout
    listed = json.loads((await roost_user(server, "list", "--json")).stdout)
    assert [(row["name"], row["state"]) for row in listed] == [("alice", "active")]


@pytest.mark.embedded_only
async def test_with_no_server_running_the_database_is_changed_directly(make_server: Any) -> None:
    srv = make_server()
    tokens = add_users(srv, ["alice"])
    srv.stop()
    out = await roost_user(srv, "token", "reset", "alice")
    assert out.returncode == 0, out.stderr
    new_token = out.stdout.strip().splitlines()[-1]
    listed = await roost_user(srv, "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[1].split()[0] == "alice"
    srv.start()
    await assert_refused(srv, tokens["alice"])
    raw = await RawWS.open(srv, new_token)
    await raw.close()


@pytest.mark.embedded_only
async def test_a_data_directory_too_deep_for_a_socket_path_still_works(mode: str, tmp_path: Any) -> None:
    """A Unix socket path holds ~107 bytes: for a deeper data directory the
    server listens in a private temporary directory the data directory names."""
    from tests.e2e.server import ServerProcess

    deep = tmp_path / ("d" * 60) / ("e" * 60) / "data"
    deep.mkdir(parents=True)
    srv = ServerProcess(deep)
    srv.start()
    try:
        tokens = add_users(srv, ["alice"])
        alice = await RawWS.open(srv, tokens["alice"])
        try:
            out = await roost_user(srv, "disable", "alice")
            assert out.returncode == 0, out.stderr
            assert await alice.wait_closed(10) == REVOKED
        finally:
            await alice.close()
        pointer = deep / "admin.sock.path"
        socket_dir = Path(pointer.read_text().strip()).parent
        assert srv.terminate() == 0  # a clean stop removes the socket, its directory and the pointer
        assert not pointer.exists() and not socket_dir.exists()
    finally:
        srv.stop()


@pytest.mark.embedded_only
async def test_bad_admin_requests_get_a_typed_error_and_change_nothing(server: Any) -> None:
    from roost.service.admin import admin_socket_path

    tokens = add_users(server, ["alice"])
    path = str(admin_socket_path(server.data_dir))
    bad = [
        b"not json",
        b"[1]",
        b'"op"',
        b'{"op": 5}',
        b'{"op": "token_reset", "name": "alice", "token_hash": "zz"}',
        b'{"op": "token_reset", "name": "alice", "token_hash": "ab"}',  # not a SHA-256: alice locked out
        b'{"op": "token_reset", "name": "alice", "token_hash": 7}',
        b'{"op": "disable", "name": "' + b"a" * 70_000 + b'"}',  # over the socket's line limit
    ]
    for line in bad:
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            writer.write(line + b"\n")
            await writer.drain()
            answer = json.loads(await asyncio.wait_for(reader.readline(), 10) or b"null")
        finally:
            writer.close()
        assert isinstance(answer, dict) and answer.get("error") == "bad_frame", (line[:80], answer)
    alice = await RawWS.open(server, tokens["alice"])  # her token still works
    await alice.close()
    assert "Traceback" not in server.log()
