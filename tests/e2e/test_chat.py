"""1:1 chat end to end: ticks, offline delivery, durable receipts, idempotency,
history, ordering, presence, typing, ping and health."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp

from roost.client import (
    Disconnected,
    Message,
    PresenceEvent,
    ReceiptEvent,
    SendResult,
    TypingEvent,
)
from roost.client.events import ErrorEvent
from tests.e2e.helpers import (
    RawWS,
    add_users,
    b64,
    close_all,
    collect,
    connect,
    next_of,
    unb64,
    users_with_keys,
    wait_for_event,
)
from tests.e2e.server import ServerProcess

CONV = "d:alice:bob"


async def test_three_ticks(server: ServerProcess, tmp_path: Path) -> None:
    tokens = await users_with_keys(server, ["alice", "bob"], tmp_path)
    alice = await connect(server, tokens["alice"], tmp_path / "a.state")
    bob = None
    try:
        # ✓: durably stored, numbered.
        sent = await asyncio.wait_for(alice.send("hello bob", to="bob"), 10)
        assert isinstance(sent, SendResult)
        assert (sent.conv, sent.seq, sent.duplicate) == (CONV, 1, False)
        assert sent.message_id and sent.ts > 0

        # Not ✓✓ while bob has not received it.
        waiter = asyncio.ensure_future(alice.wait_receipt(CONV, 1, "delivered"))
        await asyncio.sleep(0.5)
        assert not waiter.done()
        assert alice.receipt_state(CONV) == (0, 0)

        bob = await connect(server, tokens["bob"], tmp_path / "b.state")
        msg = await next_of(bob, Message)
        assert (msg.conv, msg.seq, msg.id, msg.sender, msg.text) == (
            CONV,
            1,
            sent.message_id,
            "alice",
            "hello bob",
        )

        # ✓✓ once bob's device acked it.
        await asyncio.wait_for(waiter, 10)
        receipt, _ = await wait_for_event(alice, lambda e: isinstance(e, ReceiptEvent))
        assert isinstance(receipt, ReceiptEvent)
        assert receipt.conv == CONV
        assert receipt.marks == {"bob": (1, 0)}
        assert (receipt.all_delivered, receipt.all_read) == (1, 0)
        read_waiter = asyncio.ensure_future(alice.wait_receipt(CONV, 1, "read"))
        await asyncio.sleep(0.3)
        assert not read_waiter.done(), "read before bob marked it read"

        # Read ticks after bob marks it read.
        await bob.mark_read(CONV, msg.seq)
        await asyncio.wait_for(read_waiter, 10)
        receipt, _ = await wait_for_event(alice, lambda e: isinstance(e, ReceiptEvent) and e.all_read == 1)
        assert isinstance(receipt, ReceiptEvent)
        assert receipt.marks == {"bob": (1, 1)}
        assert alice.receipt_state(CONV) == (1, 1)
        # bob gets no receipts for alice's messages (he sent nothing).
        extra = await collect(bob, 1, 0.5, ReceiptEvent)
        assert extra == []
    finally:
        await close_all(alice, bob)


async def test_offline_recipient_gets_all_once_in_order_and_receipts_are_durable(
    server: ServerProcess, tmp_path: Path
) -> None:
    tokens = await users_with_keys(server, ["alice", "bob"], tmp_path)
    alice = await connect(server, tokens["alice"], tmp_path / "a.state")
    ids = [f"offline-{i:02d}" for i in range(50)]
    results = await asyncio.wait_for(
        asyncio.gather(*(alice.send(f"text {i}", to="bob", message_id=mid) for i, mid in enumerate(ids))),
        20,
    )
    assert [r.seq for r in results] == list(range(1, 51))
    assert [r.message_id for r in results] == ids
    # The sender goes offline before anything is delivered.
    await alice.close()

    bob = await connect(server, tokens["bob"], tmp_path / "b.state")
    try:
        got = await collect(bob, 50, 20)
        assert [m.id for m in got] == ids
        assert [m.seq for m in got] == list(range(1, 51))
        assert [m.text for m in got] == [f"text {i}" for i in range(50)]
        assert {m.sender for m in got} == {"alice"}
        assert await collect(bob, 1, 1.0) == [], "a message was shown twice"
        # A send of bob's commits after his acks (the store is FIFO), so once
        # it is ✓ the delivered mark is on disk while alice is offline.
        await bob.flush()
        await asyncio.wait_for(bob.send("got them", to="alice"), 10)
    finally:
        await bob.close()

    # Reconnecting bob (same state) is shown nothing again.
    bob = await connect(server, tokens["bob"], tmp_path / "b.state")
    try:
        assert await collect(bob, 1, 1.0) == []
    finally:
        await bob.close()

    # alice comes back (bob is offline now) and gets ✓✓ from the stored receipt.
    alice = await connect(server, tokens["alice"], tmp_path / "a.state")
    try:
        await asyncio.wait_for(alice.wait_receipt(CONV, 50, "delivered"), 10)
        delivered, read = alice.receipt_state(CONV)
        # bob's mark may cover his own reply (51) too; nothing is read yet.
        assert delivered >= 50 and read == 0
        reply = await next_of(alice, Message)
        assert (reply.text, reply.sender, reply.seq) == ("got them", "bob", 51)
    finally:
        await alice.close()

    # Acked receipts are not delivered again.
    alice = await connect(server, tokens["alice"], tmp_path / "a2.state")
    try:
        await asyncio.sleep(0.3)
        events = await collect(alice, 1, 1.0, ReceiptEvent)
        assert events == [], "a receipt alice acked came back"
    finally:
        await alice.close()


async def test_idempotent_send_raw(server: ServerProcess, tmp_path: Path) -> None:
    tokens = await users_with_keys(server, ["alice", "bob"], tmp_path)
    raw = await RawWS.open(server, tokens["alice"])
    bob: RawWS | None = None
    try:
        frame = {"type": "send", "id": "same-id", "to": "bob", "body": b64("only once")}
        await raw.send(frame)
        first = await raw.recv_type("ack")
        assert (first["id"], first["conv"], first["seq"]) == ("same-id", CONV, 1)
        assert not first.get("duplicate", False)
        await raw.send(frame)
        second = await raw.recv_type("ack")
        assert (second["id"], second["seq"], second["ts"]) == ("same-id", 1, first["ts"])
        assert second["duplicate"] is True
        # A retry with a different body is still the first message.
        await raw.send({**frame, "body": b64("changed")})
        third = await raw.recv_type("ack")
        assert (third["seq"], third["duplicate"]) == (1, True)
        await raw.send({"type": "send", "id": "next-id", "to": "bob", "body": b64("second")})
        nxt = await raw.recv_type("ack")
        assert (nxt["seq"], nxt.get("duplicate", False)) == (2, False)

        # bob on a raw socket too: these bodies are not sealed, so an SDK would
        # (rightly) fail to decrypt them; what counts here is once, in order.
        bob = await RawWS.open(server, tokens["bob"])
        msgs = [f for f in await bob.drain(1.5) if f["type"] == "msg"]
        assert [(m["seq"], m["id"], unb64(m["body"])) for m in msgs] == [
            (1, "same-id", b"only once"),
            (2, "next-id", b"second"),
        ]
        await bob.send({"type": "history", "conv": CONV, "ref": "h"})
        page = await bob.recv_type("history_page")
        assert [(m["seq"], m["id"]) for m in page["messages"]] == [(1, "same-id"), (2, "next-id")]
        assert page["last_seq"] == 2

        # The SDK keeps the id across a resend, too.
        alice = await connect(server, tokens["alice"], tmp_path / "a.state")
        try:
            r1 = await asyncio.wait_for(alice.send("x", to="bob", message_id="sdk-id"), 10)
            r2 = await asyncio.wait_for(alice.send("x", to="bob", message_id="sdk-id"), 10)
            assert (r1.seq, r1.duplicate) == (3, False)
            assert (r2.seq, r2.duplicate) == (3, True)
        finally:
            await alice.close()
        msgs = [f for f in await bob.drain(1.5) if f["type"] == "msg"]
        assert [(m["seq"], m["id"]) for m in msgs] == [(3, "sdk-id")]
    finally:
        await close_all(raw, bob)


async def test_history_paging(server: ServerProcess, tmp_path: Path) -> None:
    tokens = await users_with_keys(server, ["alice", "bob"], tmp_path)
    alice = await connect(server, tokens["alice"], tmp_path / "a.state")
    bob = await connect(server, tokens["bob"], tmp_path / "b.state")
    try:
        await asyncio.wait_for(asyncio.gather(*(alice.send(f"m{i}", to="bob") for i in range(1, 31))), 20)
        for client in (alice, bob):
            page, last = await client.history(CONV, limit=10)
            assert last == 30
            assert [m.seq for m in page] == list(range(21, 31))
            assert [m.text for m in page] == [f"m{i}" for i in range(21, 31)]
            assert {m.sender for m in page} == {"alice"}
            page, _ = await client.history(CONV, before=21, limit=10)
            assert [m.seq for m in page] == list(range(11, 21))
            page, _ = await client.history(CONV, before=11, limit=50)
            assert [m.seq for m in page] == list(range(1, 11))
            page, _ = await client.history(CONV, before=1)
            assert page == []
            page, _ = await client.history(CONV, after=25, limit=10)
            assert [m.seq for m in page] == list(range(26, 31))
            page, _ = await client.history(CONV, after=4, limit=3)
            assert [m.seq for m in page] == [5, 6, 7]
            page, _ = await client.history(CONV, after=30)
            assert page == []
        # Walking backwards page by page yields every message once.
        seen: list[int] = []
        before = None
        while True:
            page, _ = await bob.history(CONV, before=before, limit=7)
            if not page:
                break
            seen = [m.seq for m in page] + seen
            before = page[0].seq
        assert seen == list(range(1, 31))
    finally:
        await close_all(alice, bob)


async def test_history_of_large_messages(server: ServerProcess, tmp_path: Path) -> None:
    """A history page of a few maximum-size messages reaches the SDK (it must not
    be one frame bigger than what the client accepts, which drops the socket)."""
    tokens = await users_with_keys(server, ["alice", "bob"], tmp_path)
    alice = await connect(server, tokens["alice"], tmp_path / "a.state")
    bob = await connect(server, tokens["bob"], tmp_path / "b.state")
    try:
        bodies = [bytes([i]) * (60 * 1024) for i in range(6)]
        for body in bodies:
            await asyncio.wait_for(alice.send(body=body, to="bob", ct="application/octet-stream"), 10)
        assert [m.body for m in await collect(bob, 6, 10)] == bodies
        # Page through everything with the SDK, newest first, whatever page size the server picks.
        seen: list[int] = []
        before = None
        for _ in range(10):
            page, last = await asyncio.wait_for(bob.history(CONV, before=before, limit=50), 10)
            assert last == 6
            if not page:
                break
            seen = [m.seq for m in page] + seen
            assert [m.body for m in page] == [bodies[m.seq - 1] for m in page]
            before = page[0].seq
        assert seen == [1, 2, 3, 4, 5, 6]
        disconnects = await collect(bob, 1, 0.3, Disconnected)
        assert disconnects == [], f"the history request dropped the connection: {disconnects}"
    finally:
        await close_all(alice, bob)


async def test_pipelined_sends_arrive_in_send_order(server: ServerProcess, tmp_path: Path) -> None:
    tokens = await users_with_keys(server, ["alice", "bob"], tmp_path)
    alice = await connect(server, tokens["alice"], tmp_path / "a.state")
    bob = await connect(server, tokens["bob"], tmp_path / "b.state")
    try:
        n = 500
        ids = [f"p{i:03d}" for i in range(n)]
        results = await asyncio.wait_for(
            asyncio.gather(*(alice.send(f"n={i}", to="bob", message_id=mid) for i, mid in enumerate(ids))),
            30,
        )
        assert [r.message_id for r in results] == ids
        assert [r.seq for r in results] == list(range(1, n + 1)), "seqs not contiguous in send order"
        got = await collect(bob, n, 30)
        assert [m.id for m in got] == ids
        assert [m.seq for m in got] == list(range(1, n + 1))
        assert [m.text for m in got] == [f"n={i}" for i in range(n)]
        assert await collect(bob, 1, 0.5) == []
        await asyncio.wait_for(alice.wait_receipt(CONV, n, "delivered"), 15)
    finally:
        await close_all(alice, bob)


def _presence_of(user: str, online: bool | None = None):
    def pred(e: object) -> bool:
        return isinstance(e, PresenceEvent) and e.user == user and (online is None or e.online is online)

    return pred


async def test_presence_online_offline_and_flap(make_server, tmp_path: Path) -> None:
    srv = make_server("--presence-debounce", "0.5")
    tokens = add_users(srv, ["alice", "bob"])
    alice = await connect(srv, tokens["alice"], tmp_path / "a.state")
    await asyncio.wait_for(
        alice.crypto.published.wait(), 20
    )  # key generation done: timings below are presence's
    bob = None
    try:
        await alice.subscribe_presence(["bob"])
        # bob was never seen: the initial state, if any, is offline.
        initial = await collect(alice, 1, 0.5, PresenceEvent)
        assert all(not e.online for e in initial), initial

        bob = await connect(srv, tokens["bob"], tmp_path / "b.state")
        online, skipped = await wait_for_event(alice, _presence_of("bob", True), 5)
        assert isinstance(online, PresenceEvent) and online.last_seen is None
        assert not [e for e in skipped if isinstance(e, PresenceEvent) and e.online is False]

        before = time.time()
        await bob.close()
        bob = None
        offline, skipped = await wait_for_event(alice, _presence_of("bob", False), 5)
        waited = time.time() - before
        assert isinstance(offline, PresenceEvent)
        assert not [e for e in skipped if isinstance(e, PresenceEvent)]
        assert waited >= 0.4, f"offline announced after {waited:.2f}s, inside the 0.5 s debounce"
        assert offline.last_seen is not None
        assert int(before) - 1 <= offline.last_seen <= int(time.time())

        # A late subscriber sees the stored last-seen.
        carol_tokens = add_users(srv, ["carol"])
        carol = await connect(srv, carol_tokens["carol"], tmp_path / "c.state")
        try:
            await carol.subscribe_presence(["bob"])
            state, _ = await wait_for_event(carol, _presence_of("bob"), 5)
            assert isinstance(state, PresenceEvent)
            assert state.online is False and state.last_seen is not None
            assert abs(state.last_seen - offline.last_seen) <= 1
        finally:
            await carol.close()

        bob = await connect(srv, tokens["bob"], tmp_path / "b.state")
        online, skipped = await wait_for_event(alice, _presence_of("bob", True), 5)
        assert not [e for e in skipped if isinstance(e, PresenceEvent)]

        # Flap: disconnect and come back well within the debounce (a bare
        # socket, so reconnecting takes milliseconds).
        await bob.close()
        bob = None
        raw = await RawWS.open(srv, tokens["bob"])
        try:
            flap = await collect(alice, 1, 1.5, PresenceEvent)
            assert flap == [], f"a flap produced presence events: {flap}"
            # A second flap, socket to socket.
            await raw.close()
            raw = await RawWS.open(srv, tokens["bob"])
            flap = await collect(alice, 1, 1.5, PresenceEvent)
            assert flap == [], f"a flap produced presence events: {flap}"
        finally:
            await raw.close()
        offline, _ = await wait_for_event(alice, _presence_of("bob", False), 5)
        assert isinstance(offline, PresenceEvent) and offline.last_seen is not None
        bob = await connect(srv, tokens["bob"], tmp_path / "b.state")
        await wait_for_event(alice, _presence_of("bob", True), 5)

        # Unsubscribed: nothing more.
        await alice.unsubscribe_presence(["bob"])
        await alice.flush()
        await asyncio.sleep(0.2)
        await bob.close()
        bob = None
        assert await collect(alice, 1, 1.5, PresenceEvent) == []
    finally:
        await close_all(alice, bob)


async def test_typing_reaches_the_other_member_only(server: ServerProcess, tmp_path: Path) -> None:
    tokens = await users_with_keys(server, ["alice", "bob", "carol"], tmp_path)
    alice = await connect(server, tokens["alice"], tmp_path / "a.state")
    bob = await connect(server, tokens["bob"], tmp_path / "b.state")
    carol = await connect(server, tokens["carol"], tmp_path / "c.state")
    try:
        await asyncio.wait_for(alice.send("hi", to="bob"), 10)
        await next_of(bob, Message)
        await alice.typing(CONV, True)
        event = await next_of(bob, TypingEvent, 5)
        assert (event.conv, event.user, event.active) == (CONV, "alice", True)
        await alice.typing(CONV, False)
        event = await next_of(bob, TypingEvent, 5)
        assert (event.conv, event.user, event.active) == (CONV, "alice", False)
        assert await collect(carol, 1, 1.0, TypingEvent) == []
        assert await collect(alice, 1, 0.3, TypingEvent) == []
        # carol cannot type into a conversation she is not in.
        await carol.typing(CONV, True)
        err = await next_of(carol, ErrorEvent, 5)
        assert err.code == "not_member"
        assert await collect(bob, 1, 0.5, TypingEvent) == []
    finally:
        await close_all(alice, bob, carol)


async def test_ping_pong_raw(server: ServerProcess) -> None:
    tokens = add_users(server, ["alice"])
    raw = await RawWS.open(server, tokens["alice"])
    try:
        await raw.send({"type": "ping", "t": 12345})
        assert await raw.recv(5) == {"type": "pong", "t": 12345}
        await raw.send({"type": "ping"})
        assert (await raw.recv(5))["type"] == "pong"
    finally:
        await raw.close()


async def test_healthz(server: ServerProcess) -> None:
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.get(server.url + "/healthz") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        body = json.loads(await resp.text())
    assert body["status"] == "ok"
    assert isinstance(body["connections"], int)


async def test_sdk_message_bodies_and_content_types(server: ServerProcess, tmp_path: Path) -> None:
    tokens = await users_with_keys(server, ["alice", "bob"], tmp_path)
    alice = await connect(server, tokens["alice"], tmp_path / "a.state")
    bob = await connect(server, tokens["bob"], tmp_path / "b.state")
    try:
        payload = bytes(range(256)) * 256  # 64 KiB exactly: the limit is inclusive
        r = await asyncio.wait_for(alice.send(body=payload, to="bob", ct="application/octet-stream"), 10)
        unicode = await asyncio.wait_for(alice.send("héllo 🐦", to="bob"), 10)
        got = await collect(bob, 2, 10)
        assert [(m.seq, m.ct, m.body) for m in got] == [
            (r.seq, "application/octet-stream", payload),
            (unicode.seq, "text/plain", "héllo 🐦".encode()),
        ]
        assert got[1].text == "héllo 🐦"
        # bob's local state holds what he was shown.
        local = bob.local_history(CONV)
        assert [(m.seq, m.body) for m in local] == [(1, payload), (2, "héllo 🐦".encode())]
    finally:
        await close_all(alice, bob)


async def test_client_close_emits_no_spurious_disconnect_for_peer(
    server: ServerProcess, tmp_path: Path
) -> None:
    """One user's disconnect affects nobody else's connection."""
    tokens = await users_with_keys(server, ["alice", "bob"], tmp_path)
    alice = await connect(server, tokens["alice"], tmp_path / "a.state")
    bob = await connect(server, tokens["bob"], tmp_path / "b.state")
    try:
        await bob.close()
        others = await collect(alice, 1, 0.5, Disconnected)
        assert others == []
        r = await asyncio.wait_for(alice.send("still here", to="bob"), 10)
        assert r.seq == 1
        bob = await connect(server, tokens["bob"], tmp_path / "b.state")
        m = await next_of(bob, Message)
        assert m.text == "still here"
    finally:
        await close_all(alice, bob)
