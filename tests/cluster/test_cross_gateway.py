"""Chat between users on different gateways of one cluster (real processes, real sockets).

Three ``roost serve`` gateways share one PostgreSQL and one Redis; every test
puts its users on different gateways, so each push crosses Redis.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from roost.client import Connected, Disconnected, Membership, PresenceEvent, SendResult
from tests.cluster.helpers import (
    add_users,
    assert_once_in_order,
    close_all,
    collect,
    connect,
    per_sender_in_order,
    publish_keys,
    raw,
    route_of,
    wait_until,
)
from tests.e2e.helpers import assert_taken_over, b64, wait_for_event

pytestmark = [pytest.mark.redis, pytest.mark.postgres]


def direct(a: str, b: str) -> str:
    return f"d:{min(a, b)}:{max(a, b)}"


async def test_three_ticks_across_gateways(cluster, names, tmp_path: Path) -> None:
    a, b = names("alice", "bob")
    tokens = await add_users(cluster, [a, b])
    alice = await connect(cluster, 0, tokens[a], tmp_path / "a.state", only=True)
    bob = await connect(cluster, 1, tokens[b], tmp_path / "b.state", only=True)
    conv = direct(a, b)
    try:
        assert (route_of(cluster, a), route_of(cluster, b)) == ("gw0", "gw1")
        # ✓: durably stored, numbered.
        sent = await asyncio.wait_for(alice.send("hello across", to=b), 10)
        assert isinstance(sent, SendResult)
        assert (sent.conv, sent.seq, sent.duplicate) == (conv, 1, False)
        # The push crosses from gw0 to gw1.
        got = await collect(bob, 1, 10)
        assert [(m.conv, m.seq, m.id, m.sender, m.text) for m in got] == [
            (conv, 1, sent.message_id, a, "hello across")
        ]
        # ✓✓: bob's dack on gw1 becomes a receipt pushed to alice on gw0.
        await asyncio.wait_for(alice.wait_receipt(conv, 1, "delivered"), 10)
        read = asyncio.ensure_future(alice.wait_receipt(conv, 1, "read"))
        await asyncio.sleep(0.3)
        assert not read.done(), "read before bob marked it read"
        assert alice.receipt_state(conv) == (1, 0)
        # Read.
        await bob.mark_read(conv, 1)
        await asyncio.wait_for(read, 10)
        assert alice.receipt_state(conv) == (1, 1)
        # And back the other way.
        reply = await asyncio.wait_for(bob.send("hi back", to=a), 10)
        assert reply.seq == 2
        got = await collect(alice, 1, 10)
        assert [(m.seq, m.sender, m.text) for m in got] == [(2, b, "hi back")]
        await asyncio.wait_for(bob.wait_receipt(conv, 2, "delivered"), 10)
    finally:
        await close_all(alice, bob)


async def test_group_over_three_gateways_exactly_once_in_order(cluster, names, tmp_path: Path) -> None:
    users = names("g0", "g1", "g2", "g3", "g4", "g5")
    tokens = await add_users(cluster, users)
    # Two members per gateway.
    clients = [
        await connect(cluster, i % 3, tokens[u], tmp_path / f"{u}.state", only=True)
        for i, u in enumerate(users)
    ]
    try:
        info = await asyncio.wait_for(clients[0].create_group("spread", users[1:]), 10)
        group = info.group
        assert info.members == sorted(users) and info.last_seq == 1
        # Every member, wherever connected, sees the creation first.
        for c in clients[1:]:
            event, _ = await wait_for_event(c, lambda e: isinstance(e, Membership), 10)
            assert isinstance(event, Membership)
            assert (event.conv, event.seq, event.action) == (group, 1, "created")

        # Three senders, one per gateway, pipeline concurrently.
        senders = {users[0]: clients[0], users[1]: clients[1], users[2]: clients[2]}
        n = 60
        sent = {u: [f"{u}-{k:03d}" for k in range(n)] for u in senders}
        results = await asyncio.wait_for(
            asyncio.gather(
                *(
                    asyncio.gather(*(c.send(mid, group=group, message_id=mid) for mid in sent[u]))
                    for u, c in senders.items()
                )
            ),
            60,
        )
        all_seqs = sorted(r.seq for rs in results for r in rs)
        assert all_seqs == list(range(2, 2 + 3 * n)), "seqs not contiguous and unique"
        for rs in results:
            seqs = [r.seq for r in rs]
            assert seqs == sorted(seqs), "a sender's order not kept"

        # Each member: every other member's message exactly once, in seq order.
        for user, c in zip(users, clients, strict=True):
            expected = {u: ids for u, ids in sent.items() if u != user}
            got = await collect(c, sum(len(v) for v in expected.values()), 30)
            per_sender_in_order(got, expected)
            assert len(got) == sum(len(v) for v in expected.values())
            assert await collect(c, 1, 0.2) == [], f"{user}: more than expected"

        # ✓✓ for everyone: all_delivered reaches each sender's last seq.
        for u, c in senders.items():
            mine = max(r.seq for rs in results for r in rs if r.message_id.startswith(u + "-"))
            await asyncio.wait_for(c.wait_receipt(group, mine, "delivered"), 20)
            assert c.receipt_state(group)[0] >= mine
    finally:
        await close_all(*clients)


async def test_presence_across_gateways(cluster, names, tmp_path: Path) -> None:
    w, u = names("watcher", "user")
    tokens = await add_users(cluster, [w, u])
    watcher = await connect(cluster, 0, tokens[w], tmp_path / "w.state", only=True)
    user = None
    try:

        def about(online: bool):
            return lambda e: isinstance(e, PresenceEvent) and e.user == u and e.online is online

        await watcher.subscribe_presence([u])
        await asyncio.sleep(0.3)  # the watch is registered in Redis
        user = await connect(cluster, 1, tokens[u], tmp_path / "u.state", only=True)
        await wait_for_event(watcher, about(True), 5)
        await user.close()
        user = None
        loop = asyncio.get_running_loop()
        gone = loop.time()
        event, skipped = await wait_for_event(watcher, about(False), 5)
        assert isinstance(event, PresenceEvent)
        assert event.last_seen is not None and event.last_seen > 0
        assert loop.time() - gone >= 0.4, "offline announced before the debounce"
        assert not [e for e in skipped if isinstance(e, PresenceEvent) and e.user == u]

        # A flap: offline on gw1, online again on gw2 within the debounce -> no offline at all.
        user = await connect(cluster, 1, tokens[u], tmp_path / "u.state", only=True)
        await wait_for_event(watcher, about(True), 5)
        await user.close()
        user = await connect(cluster, 2, tokens[u], tmp_path / "u.state", only=True)
        await asyncio.sleep(2.0)  # well past the debounce
        events = [e async for e in watcher.events(timeout=0.2)]
        flaps = [e for e in events if isinstance(e, PresenceEvent) and e.user == u and not e.online]
        assert flaps == [], "a reconnect on another gateway within the debounce showed as offline"
        # ...and the final disconnect does show.
        await user.close()
        user = None
        await wait_for_event(watcher, about(False), 5)
    finally:
        await close_all(watcher, user)


async def test_second_connection_on_another_gateway_replaces_the_first(
    cluster, names, tmp_path: Path
) -> None:
    a, b = names("alice", "bob")
    tokens = await add_users(cluster, [a, b])
    # Raw: the superseded socket on gw1 is closed with 4003 when bob connects on gw2.
    first = await raw(cluster, 1, tokens[b])
    second = await raw(cluster, 2, tokens[b])
    await assert_taken_over(first, second, 4003, timeout=10)

    # SDK: a final Disconnected(4003) and no reconnect; new messages reach the new one only.
    alice = await connect(cluster, 0, tokens[a], tmp_path / "a.state", only=True)
    bob1 = await connect(cluster, 1, tokens[b], tmp_path / "b1.state")
    bob2 = None
    try:
        assert isinstance(await bob1.next_event(5), Connected)
        bob2 = await connect(cluster, 2, tokens[b], tmp_path / "b2.state", only=True)
        event, _ = await wait_for_event(bob1, lambda e: isinstance(e, Disconnected), 10)
        assert isinstance(event, Disconnected)
        assert (event.code, event.final) == (4003, True)
        await asyncio.sleep(1.0)
        assert not bob1.connected, "a replaced client reconnected"
        assert bob2.connected
        assert route_of(cluster, b) == "gw2"
        await asyncio.wait_for(alice.send("to the new one", to=b), 10)
        got = await collect(bob2, 1, 10)
        assert [m.text for m in got] == ["to the new one"]
        assert await collect(bob1, 1, 0.5) == []
    finally:
        await close_all(alice, bob1, bob2)


async def test_offline_inbox_drains_on_any_gateway(cluster, names, tmp_path: Path) -> None:
    a, b = names("alice", "bob")
    tokens = await add_users(cluster, [a, b])
    await publish_keys(cluster, {a: (tokens[a], tmp_path / "a.state"), b: (tokens[b], tmp_path / "b.state")})
    alice = await connect(cluster, 0, tokens[a], tmp_path / "a.state", only=True)
    bob = None
    try:
        first = [f"first-{i:02d}" for i in range(20)]
        results = await asyncio.wait_for(
            asyncio.gather(*(alice.send(m, to=b, message_id=m) for m in first)), 20
        )
        assert [r.seq for r in results] == list(range(1, 21))
        bob = await connect(cluster, 2, tokens[b], tmp_path / "b.state", only=True)
        got = await collect(bob, 20, 15)
        assert_once_in_order(got, first)
        await asyncio.wait_for(alice.wait_receipt(direct(a, b), 20, "delivered"), 10)
        await bob.close()
        await wait_until(lambda: route_of(cluster, b) is None, 5, "bob's route removed")

        # Offline again; the next connection (same device, another gateway) gets only the new ones.
        second = [f"second-{i:02d}" for i in range(10)]
        await asyncio.wait_for(asyncio.gather(*(alice.send(m, to=b, message_id=m) for m in second)), 20)
        bob = await connect(cluster, 1, tokens[b], tmp_path / "b.state", only=True)
        got = await collect(bob, 10, 10)
        assert_once_in_order(got, second)
        assert await collect(bob, 1, 0.5) == [], "shown twice"
        await asyncio.wait_for(alice.wait_receipt(direct(a, b), 30, "delivered"), 10)
    finally:
        await close_all(alice, bob)


async def test_raw_cross_gateway_push_and_dack(cluster, names) -> None:
    """The wire view: a send on gw0 becomes a ``msg`` on gw2 and the ``dack`` a ``receipt`` on gw0."""
    a, b = names("alice", "bob")
    tokens = await add_users(cluster, [a, b])
    alice = await raw(cluster, 0, tokens[a])
    bob = await raw(cluster, 2, tokens[b])
    conv = direct(a, b)
    try:
        await alice.send({"type": "send", "id": "r1", "to": b, "body": b64("wire")})
        ack = await alice.recv_type("ack")
        assert (ack["conv"], ack["seq"]) == (conv, 1)
        msg = await bob.recv_type("msg", 10)
        assert (msg["conv"], msg["seq"], msg["id"], msg["sender"]) == (conv, 1, "r1", a)
        await bob.send({"type": "dack", "conv": conv, "seq": 1})
        receipt = await alice.recv_type("receipt", 10)
        assert receipt["conv"] == conv and receipt["all_delivered"] == 1
        assert receipt["marks"] == {b: [1, 0]}
    finally:
        await close_all(alice, bob)


async def test_user_added_with_the_cli_chats_across_gateways(cluster, names, tmp_path: Path) -> None:
    """``roost user add NAME --store DSN`` prints the token last; it works on every gateway."""
    a, b = names("alice", "bob")
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "roost.cli.main", "user", "add", b, "--store", cluster.dsn],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    b_token = out.stdout.strip().splitlines()[-1]
    tokens = await add_users(cluster, [a])
    alice = await connect(cluster, 0, tokens[a], tmp_path / "a.state", only=True)
    bob = await connect(cluster, 2, b_token, tmp_path / "b.state", only=True)
    try:
        assert bob.user == b
        await asyncio.wait_for(alice.send("cli-made", to=b), 10)
        assert [m.text for m in await collect(bob, 1, 10)] == ["cli-made"]
    finally:
        await close_all(alice, bob)
