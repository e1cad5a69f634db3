"""A representative set of the embedded end-to-end scenarios (tests/e2e), rerun on a
two-gateway cluster with the two sides of every conversation on different gateways."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from roost.client import Membership, Message, ReceiptEvent, RoostError
from tests.cluster.helpers import (
    add_users,
    assert_once_in_order,
    close_all,
    collect,
    connect,
    publish_keys,
    raw,
)
from tests.e2e.helpers import b64, unb64, wait_for_event

pytestmark = [pytest.mark.redis, pytest.mark.postgres]


def direct(a: str, b: str) -> str:
    return f"d:{min(a, b)}:{max(a, b)}"


async def test_offline_drain_of_50_and_durable_receipts(pair, names, tmp_path: Path) -> None:
    a, b = names("alice", "bob")
    tokens = await add_users(pair, [a, b])
    await publish_keys(pair, {a: (tokens[a], tmp_path / "a.state"), b: (tokens[b], tmp_path / "b.state")})
    conv = direct(a, b)
    alice = await connect(pair, 0, tokens[a], tmp_path / "a.state", only=True)
    ids = [f"offline-{i:02d}" for i in range(50)]
    results = await asyncio.wait_for(
        asyncio.gather(*(alice.send(f"text {i}", to=b, message_id=m) for i, m in enumerate(ids))), 20
    )
    assert [r.seq for r in results] == list(range(1, 51))
    await alice.close()  # the sender goes offline before anything is delivered

    bob = await connect(pair, 1, tokens[b], tmp_path / "b.state", only=True)
    try:
        got = await collect(bob, 50, 20)
        assert_once_in_order(got, ids)
        assert [m.text for m in got] == [f"text {i}" for i in range(50)]
        assert await collect(bob, 1, 0.5) == [], "a message was shown twice"
        await bob.flush()
        # Committed after bob's acks (one store queue per gateway, FIFO).
        await asyncio.wait_for(bob.send("got them", to=a), 10)
    finally:
        await bob.close()

    # bob again, on the other gateway, same device state: nothing new.
    bob = await connect(pair, 0, tokens[b], tmp_path / "b.state", only=True)
    try:
        assert await collect(bob, 1, 0.8) == []
    finally:
        await bob.close()

    # alice comes back on the gateway she did not send from: ✓✓ from the stored receipt.
    alice = await connect(pair, 1, tokens[a], tmp_path / "a.state", only=True)
    try:
        await asyncio.wait_for(alice.wait_receipt(conv, 50, "delivered"), 10)
        delivered, read = alice.receipt_state(conv)
        assert delivered >= 50 and read == 0
        reply = await collect(alice, 1, 10)
        assert [(m.text, m.sender, m.seq) for m in reply] == [("got them", b, 51)]
        await alice.flush()
        await asyncio.sleep(0.3)  # her receipt ack commits
    finally:
        await alice.close()

    # An acked receipt does not come back (a fresh device, the first gateway).
    alice = await connect(pair, 0, tokens[a], tmp_path / "a2.state", only=True)
    try:
        others: list[object] = []
        await collect(alice, 5, 1.0, others)
        assert [e for e in others if isinstance(e, ReceiptEvent)] == [], "an acked receipt came back"
    finally:
        await alice.close()


async def test_500_pipelined_sends_arrive_in_send_order(pair, names, tmp_path: Path) -> None:
    a, b = names("alice", "bob")
    tokens = await add_users(pair, [a, b])
    alice = await connect(pair, 0, tokens[a], tmp_path / "a.state", only=True)
    bob = await connect(pair, 1, tokens[b], tmp_path / "b.state", only=True)
    try:
        n = 500
        ids = [f"p{i:03d}" for i in range(n)]
        results = await asyncio.wait_for(
            asyncio.gather(*(alice.send(f"n={i}", to=b, message_id=m) for i, m in enumerate(ids))), 30
        )
        assert [r.message_id for r in results] == ids
        assert [r.seq for r in results] == list(range(1, n + 1)), "seqs not contiguous in send order"
        got = await collect(bob, n, 30)
        assert_once_in_order(got, ids)
        assert [m.text for m in got] == [f"n={i}" for i in range(n)]
        assert await collect(bob, 1, 0.5) == []
        await asyncio.wait_for(alice.wait_receipt(direct(a, b), n, "delivered"), 15)
    finally:
        await close_all(alice, bob)


async def test_idempotent_send_raw_on_both_gateways(pair, names, tmp_path: Path) -> None:
    a, b = names("alice", "bob")
    tokens = await add_users(pair, [a, b])
    conv = direct(a, b)
    frame = {"type": "send", "id": "same-id", "to": b, "body": b64("only once")}
    first_gw = await raw(pair, 0, tokens[a])
    try:
        await first_gw.send(frame)
        first = await first_gw.recv_type("ack")
        assert (first["id"], first["conv"], first["seq"]) == ("same-id", conv, 1)
        assert not first.get("duplicate", False)
        await first_gw.send(frame)
        second = await first_gw.recv_type("ack")
        assert (second["seq"], second["ts"], second["duplicate"]) == (1, first["ts"], True)
    finally:
        await first_gw.close()
    # The retry reaches the other gateway (the client failed over): still the same message.
    other_gw = await raw(pair, 1, tokens[a])
    bob = None
    try:
        await other_gw.send({**frame, "body": b64("changed")})
        third = await other_gw.recv_type("ack")
        assert (third["seq"], third["ts"], third["duplicate"]) == (1, first["ts"], True)
        await other_gw.send({"type": "send", "id": "next-id", "to": b, "body": b64("second")})
        nxt = await other_gw.recv_type("ack")
        assert (nxt["seq"], nxt.get("duplicate", False)) == (2, False)

        # bob on a raw socket too (the bodies are not sealed, an SDK would
        # rightly fail to decrypt them): one copy per id, in order.
        bob = await raw(pair, 0, tokens[b])
        msgs = [fr for fr in await bob.drain(1.5) if fr["type"] == "msg"]
        assert [(m["seq"], m["id"], unb64(m["body"])) for m in msgs] == [
            (1, "same-id", b"only once"),
            (2, "next-id", b"second"),
        ]
        await bob.send({"type": "history", "conv": conv, "ref": "h"})
        page = await bob.recv_type("history_page")
        assert [(m["seq"], m["id"]) for m in page["messages"]] == [(1, "same-id"), (2, "next-id")]
        assert page["last_seq"] == 2
    finally:
        await close_all(other_gw, bob)


async def test_group_cap_1024_and_fan_out_over_both_gateways(pair, names, tmp_path: Path) -> None:
    (prefix,) = names("m")
    users = [f"{prefix}-{i:04d}" for i in range(1025)]
    tokens = await add_users(pair, users)
    admin_name = users[0]
    admin = await connect(pair, 0, tokens[admin_name], tmp_path / "admin.state", only=True)
    online = []
    try:
        with pytest.raises(RoostError) as refused:
            await asyncio.wait_for(admin.create_group("too big", users[1:1025]), 30)
        assert refused.value.code == "group_full"
        info = await asyncio.wait_for(admin.create_group("big", users[1:1024]), 30)
        assert len(info.members) == 1024 and info.admins == [admin_name] and info.last_seq == 1
        group = info.group
        with pytest.raises(RoostError) as refused:
            await asyncio.wait_for(admin.add_members(group, [users[1024]]), 30)
        assert refused.value.code == "group_full"

        # 16 members online, half on each gateway; the rest offline.
        for k, user in enumerate(users[1:17]):
            online.append(await connect(pair, k % 2, tokens[user], tmp_path / f"{user}.state", only=True))
        sent = await asyncio.wait_for(admin.send("to everyone", group=group, message_id="big-1"), 30)
        assert sent.seq == 2
        for client in online:
            got = await collect(client, 1, 15)
            assert [(m.seq, m.id, m.sender) for m in got] == [(2, "big-1", admin_name)]
        # An offline member drains it on connect (creation event first).
        late = await connect(pair, 1, tokens[users[1000]], tmp_path / "late.state", only=True)
        online.append(late)
        event, _ = await wait_for_event(late, lambda e: isinstance(e, Membership), 10)
        assert isinstance(event, Membership) and event.seq == 1
        assert [m.id for m in await collect(late, 1, 10)] == ["big-1"]
    finally:
        await close_all(admin, *online)


async def test_bad_input_gets_typed_errors(pair, names) -> None:
    a, b, c = names("alice", "bob", "carol")
    tokens = await add_users(pair, [a, b, c])
    other = direct(b, c)
    bob = await raw(pair, 0, tokens[b])
    try:
        await bob.send({"type": "send", "id": "bc-1", "to": c, "body": b64("private")})
        assert (await bob.recv_type("ack"))["conv"] == other
    finally:
        await bob.close()
    alice = await raw(pair, 1, tokens[a])
    try:
        cases = [
            ("{this is not json", "bad_frame", ""),
            ('{"type": "send", "id": "t1"', "bad_frame", ""),
            ({"type": "teleport", "to": b}, "unknown_type", None),
            ({"type": "nope", "ref": "r9"}, "unknown_type", "r9"),
            ({"type": "send", "id": "nb", "to": b}, "bad_frame", "nb"),
            ({"type": "send", "id": "nm", "conv": other, "body": b64("x")}, "not_member", "nm"),
            ({"type": "history", "conv": other, "ref": "ho"}, "not_member", "ho"),
            ({"type": "dack", "conv": other, "seq": 1}, "not_member", None),
            ({"type": "send", "id": "nou", "to": "nobody-here", "body": b64("x")}, "unknown_user", "nou"),
            ({"type": "send", "id": "self", "to": a, "body": b64("x")}, "invalid", "self"),
        ]
        for frame, code, ref in cases:
            await alice.send(frame)
            reply = await alice.recv(10)
            assert reply["type"] == "error" and reply["code"] == code, f"{frame!r:.80} -> {reply}"
            if ref is not None:
                assert reply.get("ref", "") == ref
            assert await alice.roundtrip() == [], "more than one answer"
        # Nothing was stored: the next send is seq 1, and bob and carol's conversation is untouched.
        await alice.send({"type": "send", "id": "ok-1", "to": b, "body": b64("ok")})
        ack = await alice.recv_type("ack")
        assert (ack["conv"], ack["seq"]) == (direct(a, b), 1)
        await alice.send({"type": "history", "conv": direct(a, b), "ref": "h"})
        page = await alice.recv_type("history_page")
        assert page["last_seq"] == 1
        assert [unb64(m["body"]) for m in page["messages"]] == [b"ok"]
    finally:
        await alice.close()
    carol = await raw(pair, 0, tokens[c])
    try:
        msgs = [fr for fr in await carol.drain(0.8) if fr["type"] == "msg"]
        assert [m["id"] for m in msgs] == ["bc-1"]
    finally:
        await carol.close()


async def test_history_paging(pair, names, tmp_path: Path) -> None:
    a, b = names("alice", "bob")
    tokens = await add_users(pair, [a, b])
    conv = direct(a, b)
    alice = await connect(pair, 0, tokens[a], tmp_path / "a.state", only=True)
    bob = await connect(pair, 1, tokens[b], tmp_path / "b.state", only=True)
    try:
        await asyncio.wait_for(asyncio.gather(*(alice.send(f"m{i}", to=b) for i in range(1, 31))), 20)
        for client in (alice, bob):
            page, last = await asyncio.wait_for(client.history(conv, limit=10), 10)
            assert last == 30
            assert [m.seq for m in page] == list(range(21, 31))
            assert [m.text for m in page] == [f"m{i}" for i in range(21, 31)]
            page, _ = await asyncio.wait_for(client.history(conv, before=21, limit=10), 10)
            assert [m.seq for m in page] == list(range(11, 21))
            page, _ = await asyncio.wait_for(client.history(conv, before=11, limit=50), 10)
            assert [m.seq for m in page] == list(range(1, 11))
            page, _ = await asyncio.wait_for(client.history(conv, before=1), 10)
            assert page == []
            page, _ = await asyncio.wait_for(client.history(conv, after=25, limit=10), 10)
            assert [m.seq for m in page] == list(range(26, 31))
            page, _ = await asyncio.wait_for(client.history(conv, after=30), 10)
            assert page == []
        seen: list[int] = []
        before = None
        while True:
            page, _ = await asyncio.wait_for(bob.history(conv, before=before, limit=7), 10)
            if not page:
                break
            seen = [m.seq for m in page] + seen
            before = page[0].seq
        assert seen == list(range(1, 31))
        got = await collect(bob, 30, 10)
        assert all(isinstance(m, Message) for m in got) and [m.seq for m in got] == list(range(1, 31))
    finally:
        await close_all(alice, bob)
