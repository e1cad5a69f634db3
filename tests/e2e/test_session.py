"""Connections and sessions: replacement by a newer connection, graceful
shutdown, slow consumers and memory, per-connection rate limits."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from roost.client import Client, Connected, Disconnected, Message
from tests.e2e.helpers import (
    Closed,
    RawWS,
    add_users,
    assert_taken_over,
    b64,
    close_all,
    collect,
    connect,
    healthz,
    publish_keys,
    server_rss_kib,
    unb64,
    users_with_keys,
    wait_for_event,
)
from tests.e2e.server import ServerProcess

CONV = "d:alice:bob"


async def test_a_stale_attempt_of_the_same_client_does_not_stop_it(
    server: ServerProcess, tmp_path: Path
) -> None:
    """A client gave up on an attempt and connected again; the dead attempt's
    auth, handled late, takes the user over. Because it names the same client
    run, the live connection is superseded (4007), not replaced (4003): the
    SDK reconnects instead of stopping for good."""
    tokens = await users_with_keys(server, ["alice", "bob"], tmp_path)
    # Raw: same client run -> 4007; the newer socket works.
    first = await RawWS.open(server, tokens["bob"], client="run-1")
    second = await RawWS.open(server, tokens["bob"], client="run-1")
    await assert_taken_over(first, second, 4007, timeout=5)
    # SDK: stale attempts in its name, whose sockets die at once.
    bob = await connect(server, tokens["bob"], tmp_path / "b.state")
    alice = await connect(server, tokens["alice"], tmp_path / "a.state")
    try:
        for _ in range(5):
            dead = await RawWS.open(server)
            await dead.send({"type": "auth", "token": tokens["bob"], "client": bob.instance})
            await asyncio.sleep(0.05)
            transport = dead.ws._response.connection.transport  # type: ignore[union-attr]
            if transport is not None:
                transport.abort()
            await dead.http.close()
        await bob.wait_connected(10)
        await asyncio.wait_for(alice.send("still here?", to="bob"), 10)
        got = await collect(bob, 1, 10)
        assert [m.text for m in got] == ["still here?"]
        assert bob._fatal is None
    finally:
        await close_all(alice, bob)


async def test_second_connection_replaces_the_first(server: ServerProcess, tmp_path: Path) -> None:
    tokens = await users_with_keys(server, ["alice", "bob"], tmp_path)
    # Raw: the superseded socket is closed with 4003.
    first = await RawWS.open(server, tokens["bob"])
    second = await RawWS.open(server, tokens["bob"])
    await assert_taken_over(first, second, 4003, timeout=5)

    # SDK: the replaced client reports a final Disconnected and does not come back.
    bob1 = await connect(server, tokens["bob"], tmp_path / "b1.state")
    bob2 = None
    alice = await connect(server, tokens["alice"], tmp_path / "a.state")
    try:
        assert isinstance(await bob1.next_event(5), Connected)
        bob2 = await connect(server, tokens["bob"], tmp_path / "b2.state")
        event, _ = await wait_for_event(bob1, lambda e: isinstance(e, Disconnected), 5)
        assert isinstance(event, Disconnected)
        assert (event.code, event.final) == (4003, True)
        await asyncio.sleep(1.0)
        assert not bob1.connected, "a replaced client reconnected (and would fight the new one)"
        assert bob2.connected
        # New messages go to the new connection only.
        await asyncio.wait_for(alice.send("to the new one", to="bob"), 10)
        got = await collect(bob2, 1, 5)
        assert [m.text for m in got] == ["to the new one"]
        assert await collect(bob1, 1, 0.5) == []
        assert healthz(server)["connections"] == 2
    finally:
        await close_all(alice, bob1, bob2)


async def test_messages_in_flight_to_a_replaced_connection_are_not_lost(
    server: ServerProcess, tmp_path: Path
) -> None:
    tokens = add_users(server, ["alice", "bob"])
    await publish_keys(
        server,
        {"alice": (tokens["alice"], tmp_path / "a.state"), "bob": (tokens["bob"], tmp_path / "b1.state")},
    )
    alice = await connect(server, tokens["alice"], tmp_path / "a.state")
    bob1 = await connect(server, tokens["bob"], tmp_path / "b1.state")
    bob2 = None
    n = 100
    ids = [f"f{i:03d}" for i in range(n)]
    try:
        seen1: list[Message] = []

        async def read_bob1() -> None:
            async for event in bob1.events(timeout=15):
                if isinstance(event, Message):
                    seen1.append(event)
                elif isinstance(event, Disconnected):
                    return

        reader = asyncio.ensure_future(read_bob1())
        sends = []
        for i, mid in enumerate(ids):
            sends.append(asyncio.ensure_future(alice.send(f"f{i}", to="bob", message_id=mid)))
            if i == 40:
                # bob's second device takes over mid-stream.
                bob2 = await connect(server, tokens["bob"], tmp_path / "b2.state")
            await asyncio.sleep(0.005)
        results = await asyncio.wait_for(asyncio.gather(*sends), 20)
        # In send order (the seqs between are encryption protocol messages:
        # the new device, a new identity key, asks alice again for what it cannot read).
        assert [r.seq for r in results] == sorted({r.seq for r in results})
        await asyncio.wait_for(reader, 20)
        assert bob2 is not None

        seen2 = await collect(bob2, n, 60)
        # The union of what bob's devices showed covers everything ...
        shown = {m.id for m in seen1} | {m.id for m in seen2}
        assert shown == set(ids), f"lost: {sorted(set(ids) - shown)[:10]}"
        # ... each device showed messages once and in order ...
        for seen in (seen1, seen2):
            seqs = [m.seq for m in seen]
            assert seqs == sorted(set(seqs))
        # ... and the new device ends up with every message, each in its place.
        assert [m.seq for m in seen2] == [r.seq for r in results]
        local = [m for m in bob2.local_history(CONV, limit=1000) if m.sender == "alice"]
        assert [m.seq for m in local] == [r.seq for r in results]
        assert [m.id for m in local] == ids
        await asyncio.wait_for(alice.wait_receipt(CONV, results[-1].seq, "delivered"), 15)
    finally:
        await close_all(alice, bob1, bob2)


async def test_new_device_catches_up_on_large_messages(server: ServerProcess, tmp_path: Path) -> None:
    """A second device of bob (fresh state) is pushed a new message and fills the
    gap before it from history; with large messages that fill must still work."""
    tokens = add_users(server, ["alice", "bob"])
    await publish_keys(
        server,
        {"alice": (tokens["alice"], tmp_path / "a.state"), "bob": (tokens["bob"], tmp_path / "b1.state")},
    )
    alice = await connect(server, tokens["alice"], tmp_path / "a.state")
    bob1 = await connect(server, tokens["bob"], tmp_path / "b1.state")
    bob2 = None
    try:
        bodies = [bytes([i]) * (60 * 1024) for i in range(20)]
        for body in bodies:
            await asyncio.wait_for(alice.send(body=body, to="bob"), 10)
        assert len(await collect(bob1, 20, 15)) == 20
        await bob1.flush()
        await asyncio.wait_for(alice.wait_receipt(CONV, 20, "delivered"), 10)
        await bob1.close()
        bob2 = await connect(server, tokens["bob"], tmp_path / "b2.state")
        last = await asyncio.wait_for(alice.send("small and new", to="bob"), 10)
        assert last.seq == 21
        # The new device (a new identity key: end-to-end encryption sees a
        # reinstall) cannot read what was sealed for the old one: it asks alice
        # again and each message comes, re-encrypted, in its place.
        got = await collect_messages(bob2, 21, 90, stall=30)
        assert [m.seq for m in got] == list(range(1, 22)), (
            f"the new device showed {[m.seq for m in got]}; server log: {server.log()[-500:]}"
        )
        assert [m.body for m in got[:20]] == bodies
        assert got[-1].text == "small and new"
    finally:
        await close_all(alice, bob1, bob2)


async def test_graceful_shutdown(server: ServerProcess, tmp_path: Path) -> None:
    tokens = await users_with_keys(server, ["alice", "bob"], tmp_path)
    alice = await connect(server, tokens["alice"], tmp_path / "a.state", backoff_cap=0.5)
    raw = await RawWS.open(server, tokens["bob"])
    try:
        acked = await asyncio.wait_for(
            asyncio.gather(*(alice.send(f"s{i}", to="bob") for i in range(20))), 10
        )
        assert healthz(server)["connections"] == 2
        start = time.monotonic()
        code = await asyncio.to_thread(server.terminate, 10)
        elapsed = time.monotonic() - start
        assert code == 0, server.log()
        assert elapsed < 6, f"shutdown took {elapsed:.1f}s"
        assert await raw.wait_closed(5) == 1001
        event, _ = await wait_for_event(alice, lambda e: isinstance(e, Disconnected), 5)
        assert isinstance(event, Disconnected)
        assert (event.code, event.final) == (1001, False)
        assert "Traceback" not in server.log()
    finally:
        await raw.close()
    try:
        # Everything acked before the shutdown is there after a restart, and
        # the client reconnects by itself.
        server.start()
        await asyncio.wait_for(alice.wait_connected(), 15)
        bob = await connect(server, tokens["bob"], tmp_path / "b.state")
        try:
            got = await collect(bob, 20, 15)
            assert [(m.seq, m.id) for m in got] == [(r.seq, r.message_id) for r in acked]
        finally:
            await bob.close()
    finally:
        await alice.close()


async def _flood_slow_consumer(
    srv: ServerProcess, tokens: dict[str, str], n: int, body_size: int
) -> tuple[RawWS, float]:
    """bob authenticates and never reads while alice sends him ``n`` messages.

    Returns bob's (never read) socket and the server's RSS growth in MB."""
    body = b64(b"\xab" * body_size)
    slow = await RawWS.open(srv, tokens["bob"])
    sender = await RawWS.open(srv, tokens["alice"])
    rss_before = server_rss_kib(srv)
    peak = rss_before
    acks: list[int] = []

    async def read_acks() -> None:
        while len(acks) < n:
            frame = await sender.recv(60)
            if frame["type"] == "ack":
                acks.append(frame["seq"])

    async def watch_rss() -> None:
        nonlocal peak
        while True:
            peak = max(peak, server_rss_kib(srv))
            await asyncio.sleep(0.1)

    reader = asyncio.ensure_future(read_acks())
    watcher = asyncio.ensure_future(watch_rss())
    try:
        for i in range(n):
            await sender.send(f'{{"type":"send","id":"big-{i}","to":"bob","body":"{body}"}}')
        await asyncio.wait_for(reader, 90)
    finally:
        watcher.cancel()
        reader.cancel()
        await sender.close()
    assert acks == list(range(1, n + 1)), "a send was not acked in order"
    peak = max(peak, server_rss_kib(srv))
    return slow, (peak - rss_before) / 1024


async def _slow_socket_gone(srv: ServerProcess, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if healthz(srv)["connections"] == 0:
            return True
        await asyncio.sleep(0.2)
    return False


async def collect_messages(client: Client, n: int, timeout: float, stall: float = 10.0) -> list[Message]:
    """Up to ``n`` messages; gives up after ``timeout`` or ``stall`` seconds without a new one."""
    got: list[Message] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_progress = loop.time()
    while len(got) < n:
        now = loop.time()
        if now >= deadline or now - last_progress >= stall:
            break
        try:
            event = await client.next_event(min(deadline - now, 0.5))
        except TimeoutError:
            continue
        if isinstance(event, Message):
            got.append(event)
            last_progress = loop.time()
    return got


async def _bob_reads_everything_raw(srv: ServerProcess, token: str, n: int, size: int) -> None:
    """The flood's bodies are not sealed (a raw sender), so bob reads them on a
    raw socket, acking as he goes: every one, once, in order."""
    bob = await RawWS.open(srv, token)
    try:
        got: list[dict[str, Any]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while len(got) < n and loop.time() < deadline:
            frame = await bob.recv(max(0.1, deadline - loop.time()))
            if frame["type"] == "msg":
                got.append(frame)
                await bob.send({"type": "dack", "conv": frame["conv"], "seq": frame["seq"]})
        assert [m["id"] for m in got] == [f"big-{i}" for i in range(n)], f"bob got {len(got)} of {n}"
        assert [m["seq"] for m in got] == list(range(1, n + 1))
        assert all(len(unb64(m["body"])) == size for m in got)
        assert [f for f in await bob.drain(0.5) if f["type"] == "msg"] == []
    finally:
        await bob.close()


async def _bob_gets_everything(srv: ServerProcess, token: str, state: Path, n: int, size: int) -> None:
    bob = await connect(srv, token, state)
    try:
        got = await collect_messages(bob, n, 60)
        assert len(got) == n, f"bob got {len(got)} of {n} after reconnecting; server log: {srv.log()[-600:]}"
        assert [m.id for m in got] == [f"big-{i}" for i in range(n)]
        assert [m.seq for m in got] == list(range(1, n + 1))
        assert all(len(m.body) == size for m in got)
        assert await collect(bob, 1, 0.5) == []
    finally:
        await bob.close()


async def test_reconnect_to_a_backlog_of_large_messages(server: ServerProcess, tmp_path: Path) -> None:
    """An offline user with 200 messages of 60 KiB waiting gets them when it connects.

    (The first inbox drain of a fresh connection pushes up to ``window`` = 128
    messages at once; that burst must not trip the slow-consumer limit of the
    connection's own outgoing queue.)"""
    tokens = await users_with_keys(server, ["alice", "bob"], tmp_path)
    n, size = 200, 60 * 1024
    alice = await connect(server, tokens["alice"], tmp_path / "a.state")
    try:
        payload = b"\xab" * size
        results = await asyncio.wait_for(
            asyncio.gather(*(alice.send(body=payload, to="bob", message_id=f"big-{i}") for i in range(n))), 60
        )
        assert [r.seq for r in results] == list(range(1, n + 1))
    finally:
        await alice.close()
    await _bob_gets_everything(server, tokens["bob"], tmp_path / "b.state", n, size)


async def test_slow_consumer_is_cut_off_and_memory_stays_bounded(make_server, tmp_path: Path) -> None:
    # A peer that does not answer pings is dropped after ~1.5x the heartbeat.
    srv = make_server("--heartbeat", "3")
    tokens = await users_with_keys(srv, ["alice", "bob"], tmp_path)
    n, size = 3000, 60 * 1024
    slow, growth_mb = await _flood_slow_consumer(srv, tokens, n, size)
    try:
        assert growth_mb < 300, f"server RSS grew by {growth_mb:.0f} MB"
        # The slow socket was dropped: 4004 (slow consumer) or a lost connection.
        assert await _slow_socket_gone(srv, 15), "the never-reading socket is still open on the server"
        try:
            code = await slow.wait_closed(20)
        except Closed as exc:
            code = exc.code
        assert code in (4004, 1006), code
    finally:
        await slow.close()
    await _bob_reads_everything_raw(srv, tokens["bob"], n, size)


async def test_overflowing_queue_closes_a_socket_that_does_not_read(
    server: ServerProcess, tmp_path: Path
) -> None:
    """Replies pile up for a peer that asks for history pages and never reads them.

    Past the connection's queue limit the server must really close that socket
    (4004, or drop it), although the peer reads nothing (default heartbeat, so
    not the ping timeout); memory stays bounded and nothing is lost."""
    tokens = await users_with_keys(server, ["alice", "bob"], tmp_path)
    n, size = 20, 60 * 1024
    alice = await connect(server, tokens["alice"], tmp_path / "a.state")
    try:
        for i in range(n):
            await asyncio.wait_for(alice.send(body=b"\xab" * size, to="bob", message_id=f"big-{i}"), 10)
    finally:
        await alice.close()
    slow = await RawWS.open(server, tokens["bob"])
    try:
        rss_before = server_rss_kib(server)
        # 40 pages of ~1.2 MB of bodies each: far more than the queue may hold.
        # The first few fill the socket buffers until the server's writer is
        # stuck on the full socket (our kernel receive queue stops growing);
        # the rest, in a burst, overflow the queue behind it.
        for i in range(6):
            await slow.send({"type": "history", "conv": CONV, "limit": 200, "ref": f"h{i}"})
            await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        last, stable_since = -1, loop.time()
        while loop.time() < deadline:
            unread = slow.kernel_unread()
            if unread != last:
                last, stable_since = unread, loop.time()
            elif unread > 0 and loop.time() - stable_since >= 0.5:
                break
            await asyncio.sleep(0.05)
        assert last > 0, "the server sent nothing"
        for i in range(6, 40):
            await slow.send({"type": "history", "conv": CONV, "limit": 200, "ref": f"h{i}"})
        gone = await _slow_socket_gone(server, 10)
        growth_mb = (server_rss_kib(server) - rss_before) / 1024
        assert growth_mb < 150, f"server RSS grew by {growth_mb:.0f} MB"
        assert gone, (
            "the socket is still open 10 s after its outgoing queue overflowed; "
            f"server log: {server.log()[-400:]}"
        )
        # 4004 if the close frame got out, 1006 if the server had to abort.
        try:
            code = await slow.wait_closed(20)
        except Closed as exc:
            code = exc.code
        assert code in (4004, 1006), code
    finally:
        await slow.close()
    await _bob_gets_everything(server, tokens["bob"], tmp_path / "b.state", n, size)


async def test_rate_limit_slows_down_but_drops_nothing(make_server, tmp_path: Path) -> None:
    srv = make_server("--rate-limit", "20")
    tokens = await users_with_keys(srv, ["alice", "bob"], tmp_path)
    alice = await connect(srv, tokens["alice"], tmp_path / "a.state")
    bob = await connect(srv, tokens["bob"], tmp_path / "b.state")
    try:
        n = 100
        ids = [f"r{i:03d}" for i in range(n)]
        start = time.monotonic()
        results = await asyncio.wait_for(
            asyncio.gather(*(alice.send(f"r{i}", to="bob", message_id=mid) for i, mid in enumerate(ids))),
            30,
        )
        elapsed = time.monotonic() - start
        # 20 frames/s with a burst of 40: the last 60 sends need >= 3 s.
        assert elapsed >= 2.7, f"100 sends took only {elapsed:.2f}s at --rate-limit 20"
        assert elapsed < 15
        assert [r.message_id for r in results] == ids
        assert [r.seq for r in results] == list(range(1, n + 1))
        got = await collect(bob, n, 20)
        assert [m.id for m in got] == ids
        # The limited client is still served normally afterwards.
        await asyncio.wait_for(alice.send("after", to="bob"), 10)
    finally:
        await close_all(alice, bob)
