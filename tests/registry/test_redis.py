"""RedisRegistry: several gateways in one process on a throwaway redis-server."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

import msgspec
import pytest

from roost.core.presence import PresenceChange
from roost.devcluster.redis import RedisServer
from roost.registry.memory import deliver_frame
from roost.registry.redis import RedisRegistry
from roost.store.base import ReceiptState
from tests.registry.conftest import HEARTBEAT, TTL, FakeSession, eventually, message

pytestmark = [pytest.mark.redis, pytest.mark.timeout(30)]


def attach(reg: RedisRegistry, user: str) -> FakeSession:
    session = FakeSession(user)
    reg.attach(session)
    return session


async def publish_calls(client: Any) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_publish", {}).get("calls", 0))


def presence_frames(session: FakeSession) -> list[tuple[str, bool, int | None]]:
    out = []
    for frame in session.frames:
        decoded = msgspec.json.decode(frame)
        if decoded["type"] == "presence":
            out.append((decoded["user"], decoded["online"], decoded.get("last_seen")))
    return out


async def crash(reg: RedisRegistry) -> None:
    """Stop a gateway the way a killed process does: no cleanup in Redis."""
    for task in (reg._router_task, reg._listen_task):
        assert task is not None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    reg._running = False
    assert reg._client is not None
    await reg._client.aclose()


async def test_push_to_a_user_on_another_gateway_arrives_once(gateways: Any) -> None:
    a, b = await gateways("a", "b")
    ann, bob = attach(a, "ann"), attach(b, "bob")
    await b.flush()
    msg = message(conv="d:ann:bob", seq=1)
    a.push_message(msg, ("bob", "ann"))
    assert ann.offered == [(msg, deliver_frame(msg))]  # local: at once, no Redis
    await eventually(lambda: bob.offered)
    await asyncio.sleep(5 * HEARTBEAT)
    assert len(bob.offered) == 1
    got, frame = bob.offered[0]
    assert (got.conv, got.seq, got.client_id, got.sender, got.ct, got.body, got.ts) == (
        msg.conv,
        msg.seq,
        msg.client_id,
        msg.sender,
        msg.ct,
        msg.body,
        msg.ts,
    )
    assert frame == deliver_frame(msg)


async def test_receipts_and_ephemeral_frames_cross_gateways(gateways: Any) -> None:
    a, b = await gateways("a", "b")
    bob = attach(b, "bob")
    await b.flush()
    receipt = ReceiptState("bob", "g:1", 4, {"ann": (3, 2), "cy": (3, 3)}, 3, 2)
    a.push_receipt(receipt)
    a.push_frame(iter(["bob", "nobody"]), b'{"type":"typing","conv":"g:1","user":"ann","active":true}')
    await eventually(lambda: bob.receipts and bob.frames)
    assert bob.receipts == [receipt]
    assert bob.frames == [b'{"type":"typing","conv":"g:1","user":"ann","active":true}']


async def test_group_push_costs_one_publish_per_destination_gateway(gateways: Any, redis_client: Any) -> None:
    a, b, c = await gateways("a", "b", "c")
    members = [f"u{i}" for i in range(1024)]
    sessions = {u: attach((a, b, c)[i % 3], u) for i, u in enumerate(members)}
    for reg in (a, b, c):
        await reg.flush()
    await redis_client.config_resetstat()
    before = a.stats["publishes"]
    msgs = [message(conv="g:big", seq=s, sender="u0") for s in (1, 2, 3)]
    for msg in msgs:  # one event-loop iteration: one batch
        a.push_message(msg, members)
    await eventually(lambda: all(len(s.offered) == 3 for s in sessions.values()))
    assert a.stats["publishes"] - before == 2  # b and c, all three messages in each
    assert await publish_calls(redis_client) == 2
    assert b.stats["envelopes_in"] == c.stats["envelopes_in"] == 1
    for s in sessions.values():
        assert [m.seq for m, _ in s.offered] == [1, 2, 3]


async def test_a_user_moving_to_another_gateway_replaces_the_old_session(
    gateways: Any, redis_client: Any
) -> None:
    a, b, c = await gateways("a", "b", "c")
    old = attach(a, "ann")
    await a.flush()
    new = attach(b, "ann")
    await b.flush()
    await eventually(lambda: old.replaced_count == 1)
    assert a.session("ann") is None and b.session("ann") is new
    assert new.replaced_count == 0
    assert (await redis_client.get("roost:u:ann")).startswith(b"b|")
    # The old session's disconnect: it left this gateway (detach says so once).
    assert a.detach(old) is True
    assert a.detach(old) is False
    # Its detach did not delete the new mapping: pushes go to gateway b.
    await a.flush()
    assert (await redis_client.get("roost:u:ann")).startswith(b"b|")
    c.push_message(message(), ["ann"])
    await eventually(lambda: new.offered)
    assert old.offered == []


async def test_a_mass_reconnect_replaces_every_old_session_with_one_notice_frame(
    gateways: Any, redis_client: Any
) -> None:
    a, b = await gateways("a", "b")
    users = [f"u{i}" for i in range(300)]
    old = [attach(a, u) for u in users]
    await a.flush()
    await redis_client.config_resetstat()
    new = [attach(b, u) for u in users]  # e.g. gateway a's clients all moved to b
    b.detach(new[0])  # and one of them left again at once
    await b.flush()
    await eventually(lambda: all(s.replaced_count == 1 for s in old))
    assert await publish_calls(redis_client) == 1
    assert a.sessions() == [] and len(b.sessions()) == len(users) - 1
    assert await redis_client.get("roost:u:u0") is None
    values = await redis_client.mget([f"roost:u:{u}" for u in users[1:]])
    assert all(v.startswith(b"b|") for v in values)


async def test_a_lost_replaced_notice_is_caught_by_the_heartbeat(gateways: Any, redis_client: Any) -> None:
    (a,) = [await gateways("a")]
    old = attach(a, "ann")
    await a.flush()
    newer = b"z|elsewhere|%d" % (time.time() * 1000 + 1000)  # a later connection on gateway z
    await redis_client.set("roost:u:ann", newer, px=int(TTL * 1000))  # takeover, notice lost
    await eventually(lambda: old.replaced_count == 1)
    assert a.session("ann") is None
    assert await redis_client.get("roost:u:ann") == newer


async def test_detach_deletes_only_its_own_mapping(gateways: Any, redis_client: Any) -> None:
    (a,) = [await gateways("a")]
    ann = attach(a, "ann")
    await a.flush()
    assert (await redis_client.get("roost:u:ann")).startswith(b"a|")
    assert await redis_client.pttl("roost:u:ann") > 0
    assert a.detach(ann) is True
    await a.flush()
    assert await redis_client.get("roost:u:ann") is None
    again = attach(a, "ann")
    await a.flush()
    await redis_client.set("roost:u:ann", b"z|newer")
    a._values["ann"] = b"a|not-it"  # as if the key had been taken meanwhile
    a.detach(again)
    await a.flush()
    assert await redis_client.get("roost:u:ann") == b"z|newer"


async def test_stale_mapping_push_is_dropped_silently(gateways: Any, redis_client: Any) -> None:
    a, b = await gateways("a", "b")
    bob = attach(b, "bob")
    await b.flush()
    stale = await redis_client.get("roost:u:bob")
    b.detach(bob)
    await b.flush()
    await redis_client.set("roost:u:bob", stale, px=int(TTL * 1000))  # left behind
    a.push_message(message(seq=1), ["bob"])
    await a.flush()
    # and a mapping to a gateway that no longer exists: nobody listens there
    await redis_client.set("roost:u:cy", b"dead|1", px=int(TTL * 1000))
    a.push_message(message(seq=2), ["cy", "nobody-at-all"])
    a.push_receipt(ReceiptState("cy", "d:ann:cy", 1, {}, 0, 0))
    await a.flush()
    await asyncio.sleep(3 * HEARTBEAT)
    assert bob.offered == []
    assert a.stats["dropped_unreachable"] >= 2  # cy's message and receipt
    assert a.stats["dropped_offline"] >= 1
    # the registry still works
    bob2 = attach(b, "bob")
    await b.flush()
    a.push_message(message(seq=3), ["bob"])
    await eventually(lambda: bob2.offered)


async def test_pushes_in_order_and_exactly_once(gateways: Any) -> None:
    a, b = await gateways("a", "b")
    bob = attach(b, "bob")
    await b.flush()
    n = 3000
    for seq in range(1, n + 1):
        a.push_message(message(seq=seq), ["bob"])
        if seq % 100 == 0:
            await asyncio.sleep(0)
    await eventually(lambda: len(bob.offered) >= n)
    await asyncio.sleep(2 * HEARTBEAT)
    assert [m.seq for m, _ in bob.offered] == list(range(1, n + 1))


async def test_redis_down_then_back_nothing_crashes(
    gateways: Any, redis_server: RedisServer, redis_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = await gateways("a", "b")
    ann, bob = attach(a, "ann"), attach(b, "bob")
    await a.flush()
    await b.flush()
    caplog.set_level(logging.WARNING, logger="roost.registry.redis")
    redis_server.stop()
    # everything keeps working locally; remote pushes are just dropped
    a.push_message(message(seq=1), ["bob", "ann"])
    assert len(ann.offered) == 1
    a.push_receipt(ReceiptState("bob", "d:ann:bob", 1, {}, 0, 0))
    a.announce(PresenceChange("ann", True, None))
    cy = attach(a, "cy")
    a.subscribe(cy, ["bob"])
    a.detach(ann)
    assert a.session("cy") is cy and a.session("ann") is None
    await asyncio.wait_for(a.flush(), 3)
    await asyncio.sleep(10 * HEARTBEAT)
    assert not a.connected
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert 1 <= len(warnings) <= 8, [r.getMessage() for r in warnings]  # no spam
    assert bob.offered == []

    redis_server.start()  # same port, empty

    async def delivered() -> bool:
        a.push_message(message(seq=2), ["bob"])
        await asyncio.sleep(2 * HEARTBEAT)
        return bool(bob.offered)

    for _ in range(40):
        if await delivered():
            break
    assert bob.offered and bob.offered[0][0].seq == 2
    await eventually(lambda: a.connected and b.connected)
    assert (await redis_client.get("roost:u:cy")).startswith(b"a|")
    assert await redis_client.get("roost:u:ann") is None  # detached while down
    assert await redis_client.smembers("roost:w:bob") == {b"a"}


async def test_redis_restarted_empty_refills_mappings_and_routes_again(
    gateways: Any, redis_server: RedisServer, redis_client: Any
) -> None:
    a, b = await gateways("a", "b")
    attach(a, "ann")
    bob = attach(b, "bob")
    watcher = attach(a, "wat")
    a.subscribe(watcher, ["bob"])
    await a.flush()
    await b.flush()
    redis_server.restart()  # empty: the keys come back from the gateways' heartbeats

    async def restored() -> bool:
        keys = await redis_client.mget(["roost:u:ann", "roost:u:bob", "roost:u:wat"])
        return all(keys) and await redis_client.smembers("roost:w:bob") == {b"a"}

    for _ in range(100):
        if await restored():
            break
        await asyncio.sleep(HEARTBEAT / 2)
    assert await restored()
    seq = 0

    async def delivered() -> bool:
        nonlocal seq
        seq += 1
        a.push_message(message(seq=seq), ["bob"])
        await asyncio.sleep(HEARTBEAT)
        return bool(bob.offered)

    for _ in range(40):
        if await delivered():
            break
    assert bob.offered


async def test_presence_is_seen_by_subscribers_on_other_gateways(gateways: Any) -> None:
    a, b, c = await gateways("a", "b", "c")
    watcher = attach(b, "wat")
    far = attach(c, "far")
    b.subscribe(watcher, ["ann"])
    c.subscribe(far, ["ann", "someone"])
    await b.flush()
    await c.flush()
    assert not b.is_online("ann")

    ann = attach(a, "ann")
    a.announce(PresenceChange("ann", True, None))
    await eventually(lambda: presence_frames(watcher) and presence_frames(far))
    assert presence_frames(watcher) == presence_frames(far) == [("ann", True, None)]
    assert b.is_online("ann") and c.is_online("ann")
    assert a.stats["publishes"] >= 2

    a.detach(ann)
    a.announce(PresenceChange("ann", False, 1_700_000_123))
    await eventually(lambda: len(presence_frames(watcher)) == 2 and len(presence_frames(far)) == 2)
    assert presence_frames(watcher)[-1] == ("ann", False, 1_700_000_123)
    assert not b.is_online("ann") and not c.is_online("ann")

    # nobody watches "ann" on b any more: b leaves the watcher set
    b.unsubscribe(watcher, ["ann"])
    await b.flush()
    ann = attach(a, "ann")
    a.announce(PresenceChange("ann", True, None))
    await eventually(lambda: len(presence_frames(far)) == 3)
    assert len(presence_frames(watcher)) == 2


async def test_offline_is_not_announced_when_the_user_reconnected_elsewhere(gateways: Any) -> None:
    a, b, c = await gateways("a", "b", "c")
    watcher = attach(c, "wat")
    c.subscribe(watcher, ["ann"])
    await c.flush()
    old = attach(a, "ann")
    a.announce(PresenceChange("ann", True, None))
    await eventually(lambda: presence_frames(watcher))
    # ann moves to b within the debounce: b announces online (nothing new), a's
    # debounced offline comes later and must be dropped
    attach(b, "ann")
    b.announce(PresenceChange("ann", True, None))
    await eventually(lambda: old.replaced_count)
    assert a.detach(old) is True
    a.announce(PresenceChange("ann", False, 1_700_000_000))
    await a.flush()
    await asyncio.sleep(3 * HEARTBEAT)
    assert presence_frames(watcher) == [("ann", True, None)]
    assert c.is_online("ann")


async def test_fetch_online_and_the_view_at_subscribe(gateways: Any, redis_client: Any) -> None:
    a, b = await gateways("a", "b")
    attach(a, "ann")
    local = attach(b, "bob")
    await a.flush()
    assert await b.fetch_online(["ann", "bob", "cy"]) == {"ann", "bob"}
    b.subscribe(local, ["ann", "cy"])
    # the read is ordered after the watch registration: from here on any
    # change of ann's presence is published to b
    assert await b.fetch_online(["ann", "cy"]) == {"ann"}
    assert await redis_client.smembers("roost:w:ann") == {b"b"}
    assert b.is_online("ann")  # the view of a watched user, answered locally
    assert not b.is_online("cy")
    assert not b.is_online("dan")  # neither local nor watched: not known here


async def test_users_of_a_crashed_gateway_go_offline_and_its_watches_are_pruned(
    gateways: Any, redis_client: Any
) -> None:
    a, b, c = await gateways("a", "b", "c")
    watcher = attach(b, "wat")
    b.subscribe(watcher, ["ann"])
    gone = attach(c, "gone")
    c.subscribe(gone, ["ann"])
    await b.flush()
    await c.flush()
    attach(a, "ann")
    a.announce(PresenceChange("ann", True, None))
    await eventually(lambda: presence_frames(watcher) and presence_frames(gone))
    assert await redis_client.smembers("roost:w:ann") == {b"b", b"c"}

    await crash(c)  # c's watch of ann stays in Redis
    a.announce(PresenceChange("ann", True, None))  # reaches b only; c's watch is pruned
    await a.flush()
    assert await redis_client.smembers("roost:w:ann") == {b"b"}

    await crash(a)  # ann's key expires; no "offline" event will ever come
    await eventually(lambda: len(presence_frames(watcher)) == 2, timeout=TTL + 10 * HEARTBEAT + 2)
    user, online, last_seen = presence_frames(watcher)[-1]
    assert (user, online) == ("ann", False) and last_seen
    assert not b.is_online("ann")


async def test_stop_removes_the_gateways_keys(redis_server: RedisServer, redis_client: Any) -> None:
    reg = RedisRegistry(redis_server.url, "a", heartbeat=HEARTBEAT, ttl=TTL)
    await reg.start()
    ann = attach(reg, "ann")
    reg.subscribe(ann, ["bob"])
    await reg.flush()
    assert await redis_client.exists("roost:u:ann", "roost:w:bob", "roost:g:a") == 3
    await reg.stop()
    assert await redis_client.exists("roost:u:ann", "roost:w:bob", "roost:g:a") == 0
    # a stopped registry still answers locally and drops remote pushes
    reg.push_message(message(), ["ann", "bob"])
    assert len(ann.offered) == 1


async def test_start_without_redis_works_locally_and_catches_up(redis_server: RedisServer) -> None:
    url = redis_server.url
    redis_server.stop()
    a = RedisRegistry(url, "a", heartbeat=HEARTBEAT, ttl=TTL, socket_timeout=0.5)
    b = RedisRegistry(url, "b", heartbeat=HEARTBEAT, ttl=TTL, socket_timeout=0.5)
    await a.start(wait=0.3)
    await b.start(wait=0.3)
    try:
        bob = attach(b, "bob")
        a.push_message(message(seq=1), ["bob"])
        redis_server.start()
        await eventually(lambda: a.connected and b.connected)
        await b.flush()
        await eventually(lambda: b._confirmed.get("bob"))
        a.push_message(message(seq=2), ["bob"])
        await eventually(lambda: bob.offered)
        assert [m.seq for m, _ in bob.offered] == [2]
    finally:
        await a.stop(timeout=1.0)
        await b.stop(timeout=1.0)


async def test_route_cache_option_a_stale_entry_costs_one_dropped_push(gateways: Any) -> None:
    a, b, c = await gateways("a", "b", "c", route_cache_ttl=60.0)
    bob = attach(b, "bob")
    await b.flush()
    a.push_message(message(seq=1), ["bob"])
    await eventually(lambda: bob.offered)
    moved = attach(c, "bob")  # a still has bob -> b cached
    await c.flush()
    await eventually(lambda: bob.replaced_count)
    b.detach(bob)
    a.push_message(message(seq=2), ["bob"])  # routed to b, dropped there: the inbox has it
    await a.flush()
    await asyncio.sleep(3 * HEARTBEAT)
    assert moved.offered == [] and [m.seq for m, _ in bob.offered] == [1]
    a._route_cache.clear()
    a.push_message(message(seq=3), ["bob"])
    await eventually(lambda: moved.offered)


async def test_after_redis_loses_its_keys_sessions_resync_once_their_routes_are_back(
    gateways: Any, redis_server: RedisServer, redis_client: Any
) -> None:
    """Pushes made while the routes were gone found nobody and were left in the
    inbox: the gateway must have its sessions re-read it AFTER their routes
    are set again, or a message committed in between waits for the next one.
    FLUSHALL empties Redis without dropping a connection, so only the
    heartbeat can notice (a restart would also be noticed by the subscriber)."""
    import redis as sync_redis

    b = await gateways("b")
    attach(b, "bob")
    await b.flush()
    probe = sync_redis.Redis.from_url(redis_server.url)
    routes_at_resync: list[bool] = []
    # A blocking GET inside the callback: what Redis holds at that very moment.
    b.on_recovered = lambda users: routes_at_resync.append(probe.get("roost:u:bob") is not None)
    await redis_client.flushall()
    await eventually(lambda: routes_at_resync, timeout=5)
    assert routes_at_resync == [True]
    probe.close()


async def test_a_route_that_silently_vanished_is_set_again_and_its_gateway_resyncs(
    gateways: Any, redis_client: Any
) -> None:
    """One key gone (expired during a stall, evicted) while the gateway's own
    liveness key stayed: the refresh sets it again and, since pushes to that
    user found no route meanwhile, the gateway's sessions re-read their inbox."""
    b = await gateways("b")
    attach(b, "bob")
    await b.flush()
    attach(b, "ann")  # her route is intact: her session need not re-read anything
    await b.flush()
    resyncs: list[list[str] | None] = []
    b.on_recovered = lambda users: resyncs.append(None if users is None else list(users))
    await redis_client.delete("roost:u:bob")
    await eventually(lambda: resyncs, timeout=5)
    assert resyncs[0] == ["bob"]
    assert (await redis_client.get("roost:u:bob")).startswith(b"b|")


async def test_the_admin_notifier_reaches_every_gateway(gateways: Any, redis_server: RedisServer) -> None:
    """``roost user token reset / disable / remove`` in cluster mode: the CLI
    has no sessions; it broadcasts to every live gateway, and each closes its
    own session of the user (on_revoked) or re-reads the inboxes of the
    members a removal concerns (on_recovered)."""
    from roost.registry.redis import RedisNotifier
    from roost.store.base import GroupSnapshot

    a, b = await gateways("a", "b")
    revoked: dict[str, list[tuple[str, str]]] = {"a": [], "b": []}
    resynced: dict[str, list[list[str]]] = {"a": [], "b": []}
    for reg in (a, b):
        reg.on_revoked = lambda user, reason, gw=reg.gateway_id: revoked[gw].append((user, reason))
        reg.on_recovered = lambda users, gw=reg.gateway_id: resynced[gw].append(sorted(users or ()))
    attach(a, "ann")
    attach(b, "bob")
    await a.flush()
    await b.flush()
    notifier = RedisNotifier(redis_server.url)
    try:
        assert await notifier.gateways() == ["a", "b"]
        assert await notifier.online(["ann", "bob", "cat"]) == {"ann", "bob"}
        await notifier.revoke("bob", "token reset")
        await eventually(lambda: revoked["a"] and revoked["b"])
        assert revoked == {"a": [("bob", "token reset")], "b": [("bob", "token reset")]}
        event = dataclasses.replace(
            message(conv="g:00000000000000aa", seq=3, sender=""), recipients=("ann", "bob", "cat")
        )
        receipt = ReceiptState("ann", "g:00000000000000aa", 2, {}, 2, 2)
        snapshot = GroupSnapshot(
            "g:00000000000000aa", "g", ["ann", "bob"], ["ann"], 3, event, ("cat",), [receipt]
        )
        await notifier.changed([snapshot])
        # each gateway re-reads the inboxes of its own sessions among those concerned
        await eventually(lambda: resynced["a"] and resynced["b"])
        assert resynced == {"a": [["ann"]], "b": [["bob"]]}
    finally:
        await notifier.close()


async def test_an_attach_in_the_round_a_redis_restart_fails_is_retried_at_once(
    gateways: Any, redis_server: RedisServer, redis_client: Any
) -> None:
    """Redis restarts: the gateway's pooled connection is dead, so its next round
    fails. An attach in that round must reach Redis as soon as Redis answers,
    not a heartbeat later (pushes from other gateways find no route until then).
    The heartbeat here is far longer than the wait, so only the retry can do it."""
    b = await gateways("b", heartbeat=30.0, ttl=90.0)
    attach(b, "ann")
    await b.flush()
    redis_server.restart()
    bob = attach(b, "bob")
    await b.flush()  # this round fails on the dead connection

    async def route() -> bytes | None:
        return await redis_client.get("roost:u:bob")

    deadline = time.monotonic() + 3.0
    while (value := await route()) is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert value is not None and value.startswith(b"b|"), "the attach waited for the heartbeat"
    assert bob.replaced_count == 0


async def test_router_rounds_are_measured(gateways: Any) -> None:
    from roost.core.metrics import Metrics

    metrics = Metrics()
    a = await gateways("a", metrics=metrics)
    b = await gateways("b")
    bob = attach(b, "bob")
    await b.flush()

    def sample(name: str) -> float:
        return metrics.registry.get_sample_value(name) or 0.0

    rounds = sample("roost_registry_round_seconds_count")
    items = sample("roost_registry_round_batch_size_sum")
    # Five pushes queued in one pass and a flush: one round carries all five.
    for seq in range(1, 6):
        a.push_message(message(conv="d:ann:bob", seq=seq), ("bob",))
    await a.flush()
    await eventually(lambda: len(bob.offered) == 5)
    assert sample("roost_registry_round_seconds_count") > rounds
    assert sample("roost_registry_round_seconds_sum") > 0
    assert sample("roost_registry_round_batch_size_sum") - items >= 5
    # The largest batch went into a bucket above 4 items.
    above_4 = sample("roost_registry_round_batch_size_count") - (
        metrics.registry.get_sample_value("roost_registry_round_batch_size_bucket", {"le": "4.0"}) or 0.0
    )
    assert above_4 >= 1
