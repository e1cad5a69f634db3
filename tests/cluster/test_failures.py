"""The design's failure modes, on a real cluster (3 gateways, PostgreSQL, Redis).

What every test checks in the end is the design's promise: nothing that got
✓ is lost, nothing is shown twice, a sender's messages appear in its order,
and the inbox covers every push the online path lost.

Timings the tests rely on (RedisRegistry defaults in ``roost serve``):
heartbeat 5 s (mapping refresh, liveness key ``roost:g:<gw>``), mapping TTL 15 s.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from roost.client import Client, Disconnected, Message, PresenceEvent, SendResult
from roost.devcluster.run import DevCluster
from tests.cluster.helpers import (
    abort_socket,
    add_users,
    assert_once_in_order,
    close_all,
    collect,
    connect,
    per_sender_in_order,
    publish_keys,
    raw,
    redis_client,
    route_of,
    stored,
    wait_until,
)
from tests.e2e.helpers import Closed, RawWS, b64, wait_for_event

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

HEARTBEAT = 5.0  # RedisRegistry's default heartbeat, as ``roost serve`` runs it


def direct(a: str, b: str) -> str:
    return f"d:{min(a, b)}:{max(a, b)}"


def by_conv(got: list[Message], conv: str) -> list[Message]:
    return [m for m in got if m.conv == conv]


async def pipelined(client: Client, to: str, ids: list[str]) -> list[asyncio.Future[SendResult]]:
    futures = [asyncio.ensure_future(client.send(mid, to=to, message_id=mid)) for mid in ids]
    await asyncio.sleep(0)
    return futures


async def fresh_heartbeat(cluster: DevCluster, gateway: str, timeout: float = 2 * HEARTBEAT) -> None:
    """Return right after ``gateway``'s router ran a heartbeat round (its liveness key was set
    again): the next one, which refreshes every mapping it owns, is a heartbeat away."""
    r = redis_client(cluster)
    key = f"roost:g:{gateway}"
    try:
        deadline = time.monotonic() + timeout
        last = r.pttl(key)
        while time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            now = r.pttl(key)
            if now > last + 50:
                return
            last = now
    finally:
        r.close()
    raise AssertionError(f"no heartbeat of {gateway} within {timeout} s")


# -- a. kill -9 of a gateway --------------------------------------------------------------


async def test_kill9_of_a_gateway_clients_fail_over_and_lose_nothing(
    cluster: DevCluster, names, tmp_path: Path
) -> None:
    a, b, c = names("alice", "bob", "carol")
    tokens = await add_users(cluster, [a, b, c])
    # alice (sender) and bob (recipient) on gw1, the victim; both know every gateway.
    alice = await connect(cluster, 1, tokens[a], tmp_path / "a.state")
    bob = await connect(cluster, 1, tokens[b], tmp_path / "b.state")
    carol = await connect(cluster, 0, tokens[c], tmp_path / "c.state", only=True)
    try:
        assert route_of(cluster, a) == route_of(cluster, b) == "gw1"
        n = 500
        ids = [f"k-{i:03d}" for i in range(n)]
        sends: list[asyncio.Future[SendResult]] = []

        async def produce() -> None:  # pipelined (never waits for an ack), over ~1.5 s
            for k in range(0, n, 5):
                sends.extend(await pipelined(alice, b, ids[k : k + 5]))
                await asyncio.sleep(0.015)

        producer = asyncio.ensure_future(produce())
        await wait_until(lambda: sum(s.done() for s in sends) >= n // 4, 30, "a quarter acked")
        acked_before = {s.result().message_id: s.result().seq for s in sends if s.done()}
        assert not producer.done(), "the stream ended before the kill"
        cluster.kill_gateway(1)
        assert cluster.gateways[1][1].poll() == -signal.SIGKILL

        # While bob reconnects somewhere else, carol (gw0) writes to him.
        from_carol = [f"c-{i:02d}" for i in range(20)]
        carol_results = await asyncio.wait_for(
            asyncio.gather(*(carol.send(m, to=b, message_id=m) for m in from_carol)), 20
        )
        assert [r.seq for r in carol_results] == list(range(1, 21))

        await asyncio.wait_for(producer, 30)
        results = await asyncio.wait_for(asyncio.gather(*sends), 60)
        assert [r.message_id for r in results] == ids
        assert [r.seq for r in results] == list(range(1, n + 1)), "seqs not contiguous in send order"
        for mid, seq in acked_before.items():
            assert results[ids.index(mid)].seq == seq, "an acked message changed its seq"
        await wait_until(lambda: bob.connections >= 2 and bob.connected, 15, "bob reconnected")
        assert alice.connections >= 2
        await wait_until(lambda: route_of(cluster, b) in ("gw0", "gw2"), 5, "bob mapped elsewhere")
        assert route_of(cluster, a) in ("gw0", "gw2")

        # Everything acked is in PostgreSQL, once, in send order.
        assert await stored(cluster, direct(a, b)) == [(i + 1, a, mid) for i, mid in enumerate(ids)]

        got = await collect(bob, n + 20, 60)
        assert_once_in_order(by_conv(got, direct(a, b)), ids)
        assert_once_in_order(by_conv(got, direct(b, c)), from_carol)
        assert await collect(bob, 1, 0.5) == [], "shown twice"
        await asyncio.wait_for(alice.wait_receipt(direct(a, b), n, "delivered"), 20)
        await asyncio.wait_for(carol.wait_receipt(direct(b, c), 20, "delivered"), 20)
    finally:
        await close_all(alice, bob, carol)


# -- b. registry staleness ----------------------------------------------------------------


async def test_recipient_hopping_gateways_mid_stream_gets_everything_once(
    cluster: DevCluster, names, tmp_path: Path
) -> None:
    """bob's socket dies (TCP abort, no close handshake) again and again while alice
    streams; each time he reconnects to the next gateway, so pushes are routed by
    mappings that are about to go stale. The inbox covers every lost push."""
    a, b = names("alice", "bob")
    tokens = await add_users(cluster, [a, b])
    alice = await connect(cluster, 0, tokens[a], tmp_path / "a.state", only=True)
    bob = await connect(cluster, 1, tokens[b], tmp_path / "b.state")
    try:
        n = 400
        ids = [f"h-{i:03d}" for i in range(n)]
        got: list[Message] = []

        async def stream() -> list[SendResult]:
            results: list[SendResult] = []
            for k in range(0, n, 10):
                chunk = ids[k : k + 10]
                results += await asyncio.gather(*(alice.send(m, to=b, message_id=m) for m in chunk))
                await asyncio.sleep(0.01)
            return results

        sender = asyncio.ensure_future(stream())
        routes = set()
        for _ in range(5):
            await asyncio.sleep(0.25)
            await asyncio.wait_for(bob.wait_connected(), 10)
            routes.add(route_of(cluster, b))
            got += await collect(bob, n, 0.01)
            abort_socket(bob)
        results = await asyncio.wait_for(sender, 60)
        assert [r.seq for r in results] == list(range(1, n + 1))
        got += await collect(bob, n - len(got), 30)
        assert_once_in_order(got, ids)
        assert await collect(bob, 1, 0.5) == []
        assert bob.connections >= 6
        assert len(routes - {None}) >= 2, f"bob did not move between gateways: {routes}"
    finally:
        await close_all(alice, bob)


async def test_silent_old_connection_replaced_from_another_gateway_mid_stream(
    cluster: DevCluster, names, tmp_path: Path
) -> None:
    """bob's old device on gw1 stops reading (a half-open socket the gateway still
    believes in) and he connects again on gw2 while alice streams from gw0: pushes
    routed to gw1 land in a socket nobody reads; nothing is lost or shown twice."""
    a, b = names("alice", "bob")
    tokens = await add_users(cluster, [a, b])
    alice = await connect(cluster, 0, tokens[a], tmp_path / "a.state", only=True)
    old = await raw(cluster, 1, tokens[b])
    bob = None
    try:
        n = 300
        ids = [f"s-{i:03d}" for i in range(n)]

        async def stream() -> list[SendResult]:
            results: list[SendResult] = []
            for k in range(0, n, 10):
                results += await asyncio.gather(*(alice.send(m, to=b, message_id=m) for m in ids[k : k + 10]))
                await asyncio.sleep(0.01)
            return results

        sender = asyncio.ensure_future(stream())
        await asyncio.sleep(0.3)
        bob = await connect(cluster, 2, tokens[b], tmp_path / "b.state", only=True)
        results = await asyncio.wait_for(sender, 60)
        assert [r.seq for r in results] == list(range(1, n + 1))
        got = await collect(bob, n, 30)
        assert_once_in_order(got, ids)
        assert await collect(bob, 1, 0.5) == []
        assert await old.wait_closed(10) == 4003
        assert route_of(cluster, b) == "gw2"
        assert bob.connected
    finally:
        await close_all(alice, old, bob)


async def test_stale_route_push_is_lost_but_sync_delivers(cluster: DevCluster, names) -> None:
    """Redis names a gateway that does not exist as bob's: the push goes nowhere
    (the message waits in his inbox) and a ``sync`` frame brings it at once."""
    a, b = names("alice", "bob")
    tokens = await add_users(cluster, [a, b])
    alice = await raw(cluster, 0, tokens[a])
    bob = await raw(cluster, 2, tokens[b])
    r = redis_client(cluster)
    key = f"roost:u:{b}"
    try:
        await wait_until(lambda: route_of(cluster, b) == "gw2", 5, "bob mapped to gw2")
        real = r.get(key)
        # gw2 would take a foreign mapping for a newer connection at its next heartbeat
        # (see test_stale_route_to_a_missing_gateway_keeps_the_user_connected): stay
        # inside one heartbeat interval.
        await fresh_heartbeat(cluster, "gw2")
        started = time.monotonic()
        r.set(key, b"gw9|forged", px=15_000)
        await alice.send({"type": "send", "id": "lost-push", "to": b, "body": b64("where am I")})
        ack = await alice.recv_type("ack")
        assert ack["seq"] == 1
        pushed = [fr for fr in await bob.drain(0.7) if fr["type"] == "msg"]
        # Today the push is lost (published to a channel nobody listens on); the message
        # waits in bob's inbox until a sync, a reconnect or a later message reveals the gap.
        if not pushed:
            await bob.send({"type": "sync"})
            pushed = [await bob.recv_type("msg", 3)]
        assert [(m["id"], m["seq"], m["sender"]) for m in pushed] == [("lost-push", 1, a)]
        assert [fr for fr in await bob.drain(0.3) if fr["type"] == "msg"] == [], "delivered twice"
        assert time.monotonic() - started < HEARTBEAT - 0.5, "too slow to stay within a heartbeat"
        await bob.send({"type": "dack", "conv": direct(a, b), "seq": 1})
        receipt = await alice.recv_type("receipt", 5)
        assert receipt["all_delivered"] == 1
        r.set(key, real, px=15_000)
    finally:
        r.close()
        await close_all(alice, bob)


async def test_stale_route_to_a_missing_gateway_keeps_the_user_connected(
    cluster: DevCluster, names, tmp_path: Path
) -> None:
    """A mapping naming a gateway that is not alive (no ``roost:g:<gw>`` key) is
    stale, not a newer connection: bob's live session must not be closed as
    "replaced" (4003 makes the SDK stop for good), and he must get new messages.

    What decides it: mapping values end in ``|<connect ms>`` and the heartbeat
    refresh (``_REFRESH``) lets only a later connection keep the key; the forged
    value has no time, so gw2 sets bob's mapping again and has him re-read his
    inbox, and the checks below see no final ``Disconnected`` within two
    heartbeats and every message delivered."""
    a, b = names("alice", "bob")
    tokens = await add_users(cluster, [a, b])
    alice = await connect(cluster, 0, tokens[a], tmp_path / "a.state", only=True)
    bob = await connect(cluster, 2, tokens[b], tmp_path / "b.state")
    r = redis_client(cluster)
    try:
        await wait_until(lambda: route_of(cluster, b) == "gw2", 5, "bob mapped to gw2")
        assert not r.exists("roost:g:gw9")
        r.set(f"roost:u:{b}", b"gw9|forged", px=60_000)
        await asyncio.wait_for(alice.send("one", to=b, message_id="one"), 10)
        others: list[object] = []
        # Two heartbeats: every refresh of gw2 has looked at the forged mapping.
        await collect(bob, 10, 2 * HEARTBEAT + 1, others)
        finals = [e for e in others if isinstance(e, Disconnected) and e.final]
        assert finals == [], f"bob was disconnected for good by a stale route: {finals}"
        assert bob.connected
        await asyncio.wait_for(alice.send("two", to=b, message_id="two"), 10)
        got = await collect(bob, 2, 10)
        assert "two" in [m.id for m in got]
    finally:
        r.delete(f"roost:u:{b}")
        r.close()
        await close_all(alice, bob)


# -- c. Redis restarts empty ----------------------------------------------------------------


async def test_redis_restart_delivery_and_presence_recover(
    cluster: DevCluster, names, tmp_path: Path
) -> None:
    a, b, c, w, e = names("alice", "bob", "carol", "watcher", "erin")
    tokens = await add_users(cluster, [a, b, c, w, e])
    states = dict(zip((a, b, c, w, e), "abcwe", strict=True))
    await publish_keys(cluster, {u: (tokens[u], tmp_path / f"{s}.state") for u, s in states.items()})
    alice = await connect(cluster, 0, tokens[a], tmp_path / "a.state", only=True)
    bob = await connect(cluster, 1, tokens[b], tmp_path / "b.state", only=True)
    watcher = await connect(cluster, 0, tokens[w], tmp_path / "w.state", only=True)
    erin = await connect(cluster, 1, tokens[e], tmp_path / "e.state", only=True)
    carol = None

    def erin_is(online: bool):
        return lambda ev: isinstance(ev, PresenceEvent) and ev.user == e and ev.online is online

    try:
        await watcher.subscribe_presence([e])
        await wait_for_event(watcher, erin_is(True), 5)
        await asyncio.wait_for(alice.send("before", to=b, message_id="before"), 10)
        assert [m.id for m in await collect(bob, 1, 10)] == ["before"]

        assert cluster.redis is not None
        cluster.redis.restart()  # no persistence: it comes back empty
        r = redis_client(cluster)

        # ✓ does not depend on Redis: the messages are committed, pushes may be lost.
        during = [f"during-{i}" for i in range(10)]
        for_carol = [f"carol-{i}" for i in range(5)]
        await asyncio.wait_for(
            asyncio.gather(
                *(alice.send(m, to=b, message_id=m) for m in during),
                *(alice.send(m, to=c, message_id=m) for m in for_carol),
            ),
            15,
        )
        # Offline recipients: the inbox, on reconnect (any gateway).
        carol = await connect(cluster, 2, tokens[c], tmp_path / "c.state", only=True)
        assert_once_in_order(await collect(carol, 5, 15), for_carol)

        # The heartbeat writes the mappings again; then cross-gateway pushes work, and
        # the first one shows bob's gateway the gap, which it drains from the inbox.
        await wait_until(lambda: route_of(cluster, b) == "gw1", 3 * HEARTBEAT, "bob's mapping restored")
        await wait_until(lambda: route_of(cluster, a) == "gw0", 3 * HEARTBEAT, "alice's mapping restored")
        await asyncio.wait_for(alice.send("after", to=b, message_id="after"), 10)
        got = await collect(bob, 11, 15)
        assert_once_in_order(got, [*during, "after"])
        await asyncio.wait_for(alice.wait_receipt(direct(a, b), 12, "delivered"), 10)
        pushed = await asyncio.wait_for(alice.send("pushed", to=b, message_id="pushed"), 10)
        assert [m.id for m in await collect(bob, 1, 3)] == ["pushed"]
        assert pushed.seq == 13

        # Presence: the watch is registered again, then changes cross gateways again.
        await wait_until(
            lambda: b"gw0" in r.smembers(f"roost:w:{e}"), 3 * HEARTBEAT, "watcher's watch restored"
        )
        r.close()
        [ev async for ev in watcher.events(timeout=0.3)]  # whatever the outage produced
        await erin.close()
        erin = None
        await wait_for_event(watcher, erin_is(False), 5)
        erin = await connect(cluster, 2, tokens[e], tmp_path / "e.state", only=True)
        await wait_for_event(watcher, erin_is(True), 5)
    finally:
        await close_all(alice, bob, watcher, erin, carol)


async def test_connection_made_while_redis_was_down_does_not_evict_a_newer_one(
    cluster: DevCluster, names, tmp_path: Path
) -> None:
    """bob connects on gw1 while Redis is down (the mapping cannot be written), his
    phone then moves networks and he connects again on gw2 once Redis is back. The
    newer connection must win; the old one is the one to close.

    Checked: gw2's mapping is in Redis within a second of the welcome (the
    welcome precedes the attach, and the first round after the Redis restart
    fails on a dead pooled connection: the router retries the attach at once
    instead of leaving the route missing until gw2's next heartbeat); over two
    heartbeats gw1 (whose attach or refresh carries the older connect time)
    never takes the mapping back, the newer connection sees no final
    ``Disconnected``, the old socket is closed with 4003, and a message to bob
    reaches the newer connection."""
    a, b = names("alice", "bob")
    tokens = await add_users(cluster, [a, b])
    assert cluster.redis is not None
    cluster.redis.stop()
    old = new = alice = None
    try:
        old = await raw(cluster, 1, tokens[b])
    finally:
        cluster.redis.start()
    try:
        new = await connect(cluster, 2, tokens[b], tmp_path / "b.state", only=True)
        # Far less than a heartbeat: a lost attach must not wait for the refresh.
        await wait_until(lambda: route_of(cluster, b) == "gw2", 1.0, "bob mapped to gw2 after the welcome")
        alice = await connect(cluster, 0, tokens[a], tmp_path / "a.state", only=True)
        others: list[object] = []
        await collect(new, 1, 2 * HEARTBEAT + 1, others)
        finals = [ev for ev in others if isinstance(ev, Disconnected)]
        assert finals == [], f"the newer connection was closed: {finals}"
        assert route_of(cluster, b) == "gw2"
        assert await old.wait_closed(5) == 4003
        await asyncio.wait_for(alice.send("to the newest", to=b), 10)
        assert [m.text for m in await collect(new, 1, 10)] == ["to the newest"]
    finally:
        await close_all(old, new, alice)


# -- d. PostgreSQL restarts -------------------------------------------------------------------


def gateway_pids(cluster: DevCluster) -> list[int]:
    return [proc.pid for _, proc in cluster.gateways]


async def test_postgres_restart_sdk_resends_and_nothing_acked_is_lost(
    cluster: DevCluster, names, tmp_path: Path
) -> None:
    """PostgreSQL crash-restarts (``-m immediate``) under a 300-message pipelined stream:
    the SDK gets ``unavailable`` / 4006, reconnects and resends its outbox; every
    message ends up acked once, contiguous, in send order, and in the database.
    (The recipient connects afterwards; an online one is the next test.)"""
    a, b = names("alice", "bob")
    tokens = await add_users(cluster, [a, b])
    await publish_keys(cluster, {a: (tokens[a], tmp_path / "a.state"), b: (tokens[b], tmp_path / "b.state")})
    pids = gateway_pids(cluster)
    alice = await connect(cluster, 0, tokens[a], tmp_path / "a.state", only=True)
    bob = None
    try:
        n = 300
        ids = [f"p-{i:03d}" for i in range(n)]
        sends: list[asyncio.Future[SendResult]] = []

        async def produce() -> None:  # ~1.5 s of sends, not waiting for acks
            for mid in ids:
                sends.append(asyncio.ensure_future(alice.send(mid, to=b, message_id=mid)))
                await asyncio.sleep(0.005)

        producer = asyncio.ensure_future(produce())
        await wait_until(lambda: sum(s.done() for s in sends) >= 100, 30, "100 acked")
        acked_before = {s.result().message_id: s.result().seq for s in sends if s.done()}
        assert cluster.pg is not None
        assert not producer.done()
        await asyncio.to_thread(cluster.pg.restart)
        await asyncio.wait_for(producer, 30)

        results = await asyncio.wait_for(asyncio.gather(*sends), 60)
        assert [r.seq for r in results] == list(range(1, n + 1)), "seqs not contiguous in send order"
        for mid, seq in acked_before.items():
            assert results[ids.index(mid)].seq == seq
        assert alice.connections >= 2, "the restart did not touch the stream"
        # No ✓ without a commit: every ack is in PostgreSQL under its seq.
        assert await stored(cluster, direct(a, b)) == [(i + 1, a, mid) for i, mid in enumerate(ids)]
        bob = await connect(cluster, 1, tokens[b], tmp_path / "b.state", only=True)
        got = await collect(bob, n, 30)
        assert_once_in_order(got, ids)
        await asyncio.wait_for(alice.wait_receipt(direct(a, b), n, "delivered"), 20)
        # The gateways recovered on their own: same processes, new connections work.
        assert gateway_pids(cluster) == pids
        assert all(proc.poll() is None for _, proc in cluster.gateways)
        for i in range(len(cluster.gateways)):
            probe = await raw(cluster, i, tokens[a])
            await probe.send({"type": "ping", "t": i + 1})
            assert (await probe.recv_type("pong"))["t"] == i + 1
            await probe.close()
    finally:
        await close_all(alice, bob)


async def test_online_recipient_keeps_receiving_after_postgres_restart(
    cluster: DevCluster, names, tmp_path: Path
) -> None:
    """bob is online with a full window of pushes in flight when PostgreSQL goes down,
    so his (cumulative) ``dack`` fails with ``unavailable``. Once PostgreSQL is back
    the rest must reach him without a reconnect.

    What makes it pass: when a mark fails with ``unavailable``,
    ``ChatService._marked`` frees the session's window anyway (the device holds
    those messages) and retries the cumulative mark until the store takes it, so
    the ``DeliveryCursor`` does not keep a full window in flight forever. The
    test forces the failure (bob's socket paused until PostgreSQL is down) and
    checks all 201 messages arrive once, in order, on the one connection."""
    a, b = names("alice", "bob")
    tokens = await add_users(cluster, [a, b])
    await publish_keys(cluster, {a: (tokens[a], tmp_path / "a.state"), b: (tokens[b], tmp_path / "b.state")})
    alice = await connect(cluster, 0, tokens[a], tmp_path / "a.state", only=True)
    bob = await connect(cluster, 1, tokens[b], tmp_path / "b.state", only=True)
    assert cluster.pg is not None
    try:
        n = 200  # more than the gateway's window (128)
        ids = [f"o-{i:03d}" for i in range(n)]
        assert bob._ws is not None
        transport = bob._ws._writer.transport
        transport.pause_reading()  # bob's device is busy: pushes wait in the socket
        await asyncio.wait_for(asyncio.gather(*(alice.send(m, to=b, message_id=m) for m in ids)), 30)
        await asyncio.sleep(0.5)  # the gateway pushed its window to bob's socket
        await asyncio.to_thread(cluster.pg.stop, "immediate")
        try:
            transport.resume_reading()
            others: list[object] = []
            got = await collect(bob, n, 3, others)
            # One window arrives; its acks cannot be stored while PostgreSQL is down
            # (the gateway frees the window anyway and retries the marks).
            assert len(got) >= 128, f"expected at least one window, got {len(got)}"
        finally:
            await asyncio.to_thread(cluster.pg.start)
        # PostgreSQL is back; the gateways were not restarted and bob did not reconnect.
        await asyncio.wait_for(alice.send("after", to=b, message_id="after"), 20)
        got += await collect(bob, n + 1 - len(got), 15)
        assert bob.connections == 1
        assert len(got) == n + 1, f"bob stalled at {len(got)} of {n + 1} messages after the restart"
        assert_once_in_order(got, [*ids, "after"])
    finally:
        await close_all(alice, bob)


async def test_postgres_restart_raw_acks_only_what_committed(cluster: DevCluster, names) -> None:
    """On the wire: during a PostgreSQL crash-restart a send gets an ack (and then it
    is in the database under that seq), a retryable ``unavailable`` error, or nothing
    (the socket is closed with 4006); a resend of the unacked ones completes the
    stream, contiguous and in order."""
    a, b = names("alice", "bob")
    tokens = await add_users(cluster, [a, b])
    conn = await raw(cluster, 2, tokens[a])
    ids = [f"w-{i:03d}" for i in range(200)]
    acks: dict[str, int] = {}
    errors: list[dict] = []
    close_code: int | None = None

    async def reader(ws: RawWS) -> None:
        nonlocal close_code
        while True:
            try:
                frame = await ws.recv(20)
            except Closed as exc:
                close_code = exc.code
                return
            except TimeoutError:
                return
            if frame["type"] == "ack":
                acks[frame["id"]] = frame["seq"]
            elif frame["type"] == "error":
                errors.append(frame)

    reading = asyncio.ensure_future(reader(conn))
    restart = None
    try:
        for i, mid in enumerate(ids):
            if i == 60:
                assert cluster.pg is not None
                restart = asyncio.ensure_future(asyncio.to_thread(cluster.pg.restart))
            if reading.done():
                break
            try:
                await conn.send({"type": "send", "id": mid, "to": b, "body": b64(mid)})
            except Exception:
                break
            await asyncio.sleep(0.005)
        if restart is not None:
            await asyncio.wait_for(restart, 60)
        # Answers still on their way (or the 4006 close after a refused send).
        await asyncio.wait({reading}, timeout=5)
    finally:
        reading.cancel()
        await conn.close()

    rows = await stored(cluster, direct(a, b))
    in_db = {cid: seq for seq, _, cid in rows}
    for mid, seq in acks.items():
        assert in_db.get(mid) == seq, f"{mid} acked as {seq} but stored as {in_db.get(mid)}"
    assert {fr["code"] for fr in errors} <= {"unavailable"}, errors
    assert all(fr.get("ref") in ids for fr in errors)
    if errors:
        assert close_code == 4006
    assert len(acks) < len(ids), "PostgreSQL restarted without touching the stream"

    # Resend everything not acked, in order, like the SDK does (same ids).
    again = await raw(cluster, 0, tokens[a])
    try:
        for mid in ids:
            if mid not in acks:
                await again.send({"type": "send", "id": mid, "to": b, "body": b64(mid)})
        while len(acks) < len(ids):
            frame = await again.recv(30)
            assert frame["type"] == "ack", frame
            if frame["id"] in acks:
                pytest.fail(f"{frame['id']} acked twice")
            acks[frame["id"]] = frame["seq"]
    finally:
        await again.close()
    assert [acks[mid] for mid in ids] == list(range(1, len(ids) + 1))
    assert await stored(cluster, direct(a, b)) == [(i + 1, a, mid) for i, mid in enumerate(ids)]


# -- e. two gateways append to one conversation --------------------------------------------


async def test_two_gateways_race_on_one_direct_conversation(
    cluster: DevCluster, names, tmp_path: Path
) -> None:
    a, b = names("alice", "bob")
    tokens = await add_users(cluster, [a, b])
    alice = await connect(cluster, 0, tokens[a], tmp_path / "a.state", only=True)
    bob = await connect(cluster, 1, tokens[b], tmp_path / "b.state", only=True)
    try:
        n = 300
        a_ids = [f"a-{i:03d}" for i in range(n)]
        b_ids = [f"b-{i:03d}" for i in range(n)]
        a_res, b_res = await asyncio.wait_for(
            asyncio.gather(
                asyncio.gather(*(alice.send(m, to=b, message_id=m) for m in a_ids)),
                asyncio.gather(*(bob.send(m, to=a, message_id=m) for m in b_ids)),
            ),
            60,
        )
        a_seqs, b_seqs = [r.seq for r in a_res], [r.seq for r in b_res]
        assert sorted(a_seqs + b_seqs) == list(range(1, 2 * n + 1)), "seqs not contiguous and unique"
        assert a_seqs == sorted(a_seqs) and b_seqs == sorted(b_seqs), "a sender's order not kept"
        rows = await stored(cluster, direct(a, b))
        assert [seq for seq, _, _ in rows] == list(range(1, 2 * n + 1))
        assert [cid for _, s, cid in rows if s == a] == a_ids
        assert [cid for _, s, cid in rows if s == b] == b_ids
        assert_once_in_order(await collect(bob, n, 30), a_ids)
        assert_once_in_order(await collect(alice, n, 30), b_ids)
    finally:
        await close_all(alice, bob)


async def test_group_senders_on_three_gateways_race(cluster: DevCluster, names, tmp_path: Path) -> None:
    users = names("s0", "s1", "s2")
    tokens = await add_users(cluster, users)
    clients = [
        await connect(cluster, i, tokens[u], tmp_path / f"{u}.state", only=True) for i, u in enumerate(users)
    ]
    try:
        info = await asyncio.wait_for(clients[0].create_group("race", users[1:]), 10)
        n = 200
        sent = {u: [f"{u}-{k:03d}" for k in range(n)] for u in users}
        results = await asyncio.wait_for(
            asyncio.gather(
                *(
                    asyncio.gather(*(c.send(m, group=info.group, message_id=m) for m in sent[u]))
                    for u, c in zip(users, clients, strict=True)
                )
            ),
            60,
        )
        seqs = [r.seq for rs in results for r in rs]
        assert sorted(seqs) == list(range(2, 2 + 3 * n)), "seqs not contiguous and unique"
        for rs in results:
            assert [r.seq for r in rs] == sorted(r.seq for r in rs), "a sender's order not kept"
        rows = await stored(cluster, info.group)
        assert [seq for seq, _, _ in rows] == list(range(1, 2 + 3 * n))
        for u in users:
            assert [cid for _, s, cid in rows if s == u] == sent[u]
        for u, c in zip(users, clients, strict=True):
            got = await collect(c, 2 * n, 30)
            per_sender_in_order(got, {o: ids for o, ids in sent.items() if o != u})
    finally:
        await close_all(*clients)
