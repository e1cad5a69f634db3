"""The client's record of what the user was shown, and its local socket, without a server."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from roost.client import Client, LocalSend, RoostError
from roost.client import local as local_socket
from roost.client.state import ClientState
from tests.cli_subprocess import run_roost

DEAD_URL = "http://127.0.0.1:9"  # nothing listens: the client stays offline


def _received(state: ClientState, conv: str, seq: int, text: str = "x") -> None:
    state.store_message(conv, seq, f"id-{conv}-{seq}", "alice", "text/plain", text.encode(), seq)
    state.commit()


def test_received_messages_stay_unconsumed_until_marked(tmp_path: Path) -> None:
    state = ClientState(tmp_path / "bob.state")
    try:
        for seq in (1, 2, 3):
            _received(state, "d:alice:bob", seq)
        _received(state, "g:1", 5)
        state.store_message("d:alice:bob", 4, "mine", "bob", "text/plain", b"own", 4, consumed=True)
        state.commit()
        assert [(c, s) for c, s, *_ in state.unconsumed()] == [
            ("d:alice:bob", 1),
            ("d:alice:bob", 2),
            ("d:alice:bob", 3),
            ("g:1", 5),
        ]
        assert state.unconsumed_counts() == {"d:alice:bob": 3, "g:1": 1}
        state.mark_consumed("d:alice:bob", 2)
        state.consume_one("g:1", 5)
        assert [(c, s) for c, s, *_ in state.unconsumed()] == [("d:alice:bob", 3)]
        assert state.is_consumed("d:alice:bob", 2) and not state.is_consumed("d:alice:bob", 3)
    finally:
        state.close()
    reopened = ClientState(tmp_path / "bob.state")  # durable across a restart
    try:
        assert reopened.unconsumed_counts() == {"d:alice:bob": 1}
    finally:
        reopened.close()


def test_a_state_from_before_the_consumed_column_opens_with_its_history_consumed(tmp_path: Path) -> None:
    path = tmp_path / "old.state"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE messages (conv TEXT NOT NULL, seq INTEGER NOT NULL, id TEXT NOT NULL,"
        " sender TEXT NOT NULL, ct TEXT NOT NULL, body BLOB NOT NULL, ts INTEGER NOT NULL,"
        " PRIMARY KEY (conv, seq));"
        "INSERT INTO messages VALUES ('d:a:b', 1, 'old', 'a', 'text/plain', x'6869', 1);"
    )
    db.close()
    state = ClientState(path)
    try:
        assert state.unconsumed() == []
        _received(state, "d:a:b", 2)
        assert [s for _c, s, *_ in state.unconsumed()] == [2]
    finally:
        state.close()


def test_two_readers_never_take_the_same_message(tmp_path: Path) -> None:
    async def scenario() -> None:
        client = Client(DEAD_URL, "t", state_path=tmp_path / "bob.state")
        try:
            for seq in (1, 2, 3):
                _received(client.state, "d:alice:bob", seq)
            first = client.take_unconsumed(2)
            second = client.take_unconsumed(2)
            assert [m.seq for m in first] == [1, 2] and [m.seq for m in second] == [3]
            client.release(first)  # not shown: back for the next reader
            client.consume(second)
            assert [m.seq for m in client.take_unconsumed(5)] == [1, 2]
            assert [m.seq for m in client.unconsumed()] == [1, 2]
            # Read implies shown (roost chat marks what it displays read).
            await client.mark_read("d:alice:bob", 1)
            assert [m.seq for m in client.unconsumed()] == [2]
            assert client.unread_counts() == {"d:alice:bob": 1}
        finally:
            await client.close()

    asyncio.run(scenario())


async def _served_client(tmp_path: Path) -> Client:
    client = Client(DEAD_URL, "t", state_path=tmp_path / "alice.state")
    assert client._local is not None
    await client._local.start()
    return client


def test_the_socket_is_owner_only_and_a_stale_one_is_replaced(tmp_path: Path) -> None:
    stale = Path(local_socket.socket_path(tmp_path / "alice.state"))
    stale.write_text("left by a client killed with -9")

    async def scenario() -> None:
        client = await _served_client(tmp_path)
        try:
            assert stat.S_IMODE(os.stat(stale).st_mode) == 0o600
            assert stat.S_ISSOCK(os.stat(stale).st_mode)
            bad = await local_socket.request(tmp_path / "alice.state", {"op": "fly"})
            assert (bad["ok"], bad["code"]) == (False, "bad_request")
        finally:
            await client.close()
        assert not stale.exists()
        with pytest.raises(local_socket.OwnerUnavailable):
            await local_socket.request(tmp_path / "alice.state", {"op": "send"})

    asyncio.run(scenario())


def test_clients_starting_at_once_leave_the_process_umask_alone(tmp_path: Path) -> None:
    """The umask is process-wide: two sockets made owner-only through it, their
    starts interleaved in one event loop, left it at 0o177 for good, and later
    directories came out without their x bit (PostgreSQL's initdb could not
    enter its own temporary directory)."""
    os.umask(before := os.umask(0o022))

    async def scenario() -> None:
        clients = [Client(DEAD_URL, "t", state_path=tmp_path / f"u{i}.state") for i in range(4)]
        try:
            await asyncio.gather(*(c._local.start() for c in clients if c._local is not None))
            for i in range(4):
                mode = os.stat(local_socket.socket_path(tmp_path / f"u{i}.state")).st_mode
                assert stat.S_IMODE(mode) == 0o600
        finally:
            for c in clients:
                await c.close()

    try:
        asyncio.run(scenario())
        assert os.umask(before) == before
    finally:
        os.umask(before)


def test_a_requester_that_sends_nothing_is_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_socket, "REQUEST_WAIT", 0.2)

    async def scenario() -> None:
        client = await _served_client(tmp_path)
        try:
            path = local_socket.socket_path(tmp_path / "alice.state")
            reader, writer = await asyncio.open_unix_connection(path)
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the client
            writer.close()
        finally:
            await client.close()

    asyncio.run(scenario())


def test_a_send_handed_to_an_offline_client_is_queued_in_its_outbox(tmp_path: Path) -> None:
    async def scenario() -> None:
        client = await _served_client(tmp_path)
        try:
            request = {"op": "send", "id": "m-1", "to": "bob", "text": "later", "timeout": 0.3}
            response = await local_socket.request(tmp_path / "alice.state", request)
            assert (response["ok"], response["status"], response["message_id"]) == (True, "queued", "m-1")
            assert [item.id for item in client.pending_outbox()] == ["m-1"]
            event = await client.next_event(1)
            assert isinstance(event, LocalSend) and (event.message_id, event.to, event.text) == (
                "m-1",
                "bob",
                "later",
            )
            # The same id again (a retry) is not a second message.
            await local_socket.request(tmp_path / "alice.state", request)
            assert [item.id for item in client.pending_outbox()] == ["m-1"]
        finally:
            await client.close()
        reopened = ClientState(tmp_path / "alice.state")
        try:
            assert [item.id for item in reopened.outbox()] == ["m-1"]  # durable
        finally:
            reopened.close()

    asyncio.run(scenario())


def test_requests_of_the_wrong_shape_are_refused_and_queue_nothing(tmp_path: Path) -> None:
    bad = [
        {"op": "send", "id": "m-1", "to": 42, "text": "x"},  # would sit in the outbox for good
        {"op": "send", "id": "m-2", "group": ["g:1"], "text": "x"},
        {"op": "send", "id": "m-3", "to": "bob", "text": None},  # not the text "None"
        {"op": "send", "id": "m-4", "to": "bob"},
        {"op": "send", "id": {"m": 5}, "to": "bob", "text": "x"},
        {"op": "send", "id": "m-6", "to": "bob", "text": "x", "timeout": "soon"},
        {"op": "group", "action": "add", "group": "g:1", "members": "bob"},  # not b, o, b
        {"op": "group", "action": "create", "name": 7, "members": []},
        {"op": "listen", "max": float("inf")},
        {"op": "listen", "wait": float("nan")},  # would sit in the event loop's timer heap
        {"op": "listen", "wait": -1},
        {"op": "send", "id": "m-8", "to": "bob", "text": "x", "timeout": float("nan")},
        ["op", "send"],
    ]

    async def scenario() -> None:
        client = await _served_client(tmp_path)
        try:
            for request in bad:
                response = await asyncio.wait_for(local_socket.request(tmp_path / "alice.state", request), 5)  # type: ignore[arg-type]
                assert (response["ok"], response["code"]) == (False, "bad_request"), (request, response)
            assert client.pending_outbox() == []
            good = {"op": "send", "id": "m-7", "to": "bob", "text": "fine", "timeout": 0.1}
            assert (await local_socket.request(tmp_path / "alice.state", good))["status"] == "queued"
            assert [item.id for item in client.pending_outbox()] == ["m-7"]
        finally:
            await client.close()

    asyncio.run(scenario())


def test_roost_send_through_an_offline_running_client_exits_4_queued(tmp_path: Path) -> None:
    async def scenario() -> None:
        client = await _served_client(tmp_path)
        try:
            argv = ["--url", DEAD_URL, "--token", "t", "--state", str(tmp_path / "alice.state")]
            command = ["send", *argv, "--to", "bob", "--timeout", "0.5", "hi"]
            out = await asyncio.to_thread(run_roost, *command, timeout=30)
            assert out.returncode == 4, out.stderr
            result = json.loads(out.stdout)
            assert result["status"] == "queued"
            assert [item.id for item in client.pending_outbox()] == [result["message_id"]]
        finally:
            await client.close()

    asyncio.run(scenario())


def test_a_handed_over_listen_marks_consumed_only_after_the_requester_confirms(tmp_path: Path) -> None:
    async def scenario() -> None:
        client = await _served_client(tmp_path)
        path = tmp_path / "alice.state"
        try:
            _received(client.state, "d:alice:bob", 1, "one")

            def crash(_messages: list[dict[str, object]]) -> None:
                raise RuntimeError("the requester died before printing")

            with pytest.raises(RuntimeError):
                await local_socket.request(path, {"op": "listen", "max": 5, "wait": 0}, crash)
            await asyncio.sleep(0)  # let the running client see the connection close
            for _ in range(100):
                if not client._claimed:
                    break
                await asyncio.sleep(0.01)
            assert [m.seq for m in client.unconsumed()] == [1]

            shown: list[dict[str, object]] = []
            response = await local_socket.request(path, {"op": "listen", "max": 5, "wait": 0}, shown.extend)
            assert response["ok"] and [m["text"] for m in shown] == ["one"]
            assert client.unconsumed() == []
            empty = await local_socket.request(path, {"op": "listen", "max": 5, "wait": 0.05}, shown.extend)
            assert empty == {"ok": True, "messages": []}
        finally:
            await client.close()

    asyncio.run(scenario())


def test_a_handed_over_listen_of_many_large_messages_comes_in_lines_that_fit(tmp_path: Path) -> None:
    # 40 messages of 60 KB: one response with all of them would be ~2.4 MB,
    # over the socket's line limit (MAX_LINE): the requester could not read it.
    texts = [f"{n:02}" + "é" * 30_000 for n in range(40)]

    async def scenario() -> None:
        client = await _served_client(tmp_path)
        path = tmp_path / "alice.state"
        try:
            for seq, text in enumerate(texts, 1):
                _received(client.state, "d:alice:bob", seq, text)
            shown: list[dict[str, object]] = []
            for _ in range(len(texts)):  # bounded: at least one message a response
                response = await local_socket.request(
                    path, {"op": "listen", "max": 100, "wait": 0}, shown.extend
                )
                assert response["ok"], response
                if len(shown) == len(texts):
                    break
            assert [m["text"] for m in shown] == texts
            assert client.unconsumed() == []
        finally:
            await client.close()

    asyncio.run(scenario())


def test_message_json_carries_binary_bodies_as_base64() -> None:
    from roost.client import Message

    out = local_socket.message_json(Message("c", 1, "i", "a", "application/octet-stream", b"\x00\xff", 1))
    assert json.loads(json.dumps(out))["body_b64"] == "AP8="


def test_a_tick_that_comes_before_anyone_awaits_it_is_not_missed(tmp_path: Path) -> None:
    """``roost send`` queues, then connects: the ✓ (or a refusal) can arrive
    inside ``connect()``, before the command awaits it."""
    from roost.protocol import frames as f
    from roost.protocol.codec import encode

    async def scenario() -> None:
        client = Client(DEAD_URL, "t", state_path=tmp_path / "alice.state")
        try:
            await client.send("hi", to="bob", message_id="m-1", wait=False)
            await client.send("no", group="g:1", message_id="m-2", wait=False)
            acked, refused = client.wait_sent("m-1"), client.wait_sent("m-2")
            client._on_frame(encode(f.SendAck(id="m-1", conv="d:alice:bob", seq=7, ts=1)))
            client._on_frame(encode(f.Error(code="not_member", message="no", ref="m-2")))
            assert (await asyncio.wait_for(acked, 1)).seq == 7
            with pytest.raises(RoostError, match="not_member"):
                await asyncio.wait_for(refused, 1)
            assert client.pending_outbox() == []
        finally:
            await client.close()

    asyncio.run(scenario())
