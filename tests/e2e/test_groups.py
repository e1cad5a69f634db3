"""Groups end to end: size cap, fan-out to online and offline members, receipts
aggregated over every member, membership changes and what each member may see."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from roost.client import Client, ErrorEvent, Membership, Message, ReceiptEvent, RoostError
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
)
from tests.e2e.server import ServerProcess

MEMBERSHIP_CT = "application/vnd.roost.membership+json"
E2EE_CT = "application/vnd.roost.e2ee"


async def gather_receipt_marks(
    client: Client, conv: str, marks: dict[str, tuple[int, int]], until: Any, timeout: float
) -> None:
    """Fold ReceiptEvents of ``conv`` into ``marks`` until ``until(marks)``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not until(marks):
        remaining = deadline - loop.time()
        assert remaining > 0, f"receipts incomplete: {len(marks)} members reported"
        try:
            event = await client.next_event(remaining)
        except TimeoutError:
            continue
        if isinstance(event, ReceiptEvent) and event.conv == conv:
            for user, (d, r) in event.marks.items():
                old = marks.get(user, (0, 0))
                marks[user] = (max(old[0], d), max(old[1], r))


async def test_group_of_1024_members(make_server, tmp_path: Path) -> None:
    srv = make_server(start=False)
    names = [f"u{i:04d}" for i in range(1025)]
    tokens = add_users(srv, names)
    srv.start()
    admin_name, others = names[0], names[1:1024]
    admin = await connect(srv, tokens[admin_name], tmp_path / "admin.state")
    online: list[Client] = []
    try:
        # 1025 members (the creator counts) is one too many.
        with pytest.raises(RoostError) as refused:
            await asyncio.wait_for(admin.create_group("too big", names[1:1025]), 30)
        assert refused.value.code == "group_full"

        info = await asyncio.wait_for(admin.create_group("big", others), 30)
        assert len(info.members) == 1024
        assert info.members == sorted(names[:1024])
        assert info.admins == [admin_name]
        assert info.last_seq == 1
        group = info.group

        # 20 members online when the message is sent, the other 1003 offline.
        online_names = others[:20]
        for name in online_names:
            online.append(await connect(srv, tokens[name], tmp_path / f"{name}.state"))
        for client in online:  # their keys are on the server: the admin's sender key reaches them
            await asyncio.wait_for(client.crypto.published.wait(), 30)
        for client in online:
            created = await next_of(client, Membership)
            assert (created.seq, created.action, created.actor) == (1, "created", admin_name)
            assert len(created.users) == 1024

        # The first send hands the admin's sender key to every member that has keys.
        sent = await asyncio.wait_for(admin.send("hello 1024", group=group), 60)
        assert (sent.conv, sent.seq) == (group, 2)
        for name, client in zip(online_names, online, strict=True):
            msg = await next_of(client, Message)
            assert (msg.conv, msg.seq, msg.sender, msg.text) == (group, 2, admin_name, "hello 1024"), name

        marks: dict[str, tuple[int, int]] = {}
        await gather_receipt_marks(
            admin, group, marks, lambda m: all(m.get(n, (0, 0))[0] >= 2 for n in online_names), 20
        )
        assert admin.receipt_state(group)[0] < 2, "✓✓ before the offline members got it"

        # The offline members connect (raw), get exactly the two frames, ack.
        holdout = others[-1]
        offline_names = others[20:-1]
        sem = asyncio.Semaphore(64)

        async def offline_member(name: str) -> None:
            async with sem:
                raw = await RawWS.open(srv, tokens[name])
                try:
                    frames: list[dict[str, Any]] = []
                    while len(frames) < 2:
                        frame = await raw.recv(20)
                        if frame["type"] == "msg":
                            frames.append(frame)
                    assert [f["seq"] for f in frames] == [1, 2], name
                    assert frames[0]["ct"] == MEMBERSHIP_CT and frames[0]["sender"] == ""
                    # One ciphertext for all, fanned out as is: a raw client sees no plaintext.
                    assert frames[1]["ct"] == E2EE_CT and b"hello 1024" not in unb64(frames[1]["body"])
                    await raw.send({"type": "dack", "conv": group, "seq": 2})
                    await raw.roundtrip()
                finally:
                    await raw.close()

        await asyncio.wait_for(asyncio.gather(*(offline_member(n) for n in offline_names)), 90)
        await gather_receipt_marks(
            admin, group, marks, lambda m: all(m.get(n, (0, 0))[0] >= 2 for n in others[:-1]), 30
        )
        assert admin.receipt_state(group)[0] < 2, "✓✓ while one member has not received it"
        assert marks.get(holdout, (0, 0))[0] < 2

        # The last member receives it: now it is delivered to all.
        last = await connect(srv, tokens[holdout], tmp_path / "last.state")
        online.append(last)
        msg = await next_of(last, Message, 10)
        assert (msg.seq, msg.text) == (2, "hello 1024")
        await asyncio.wait_for(admin.wait_receipt(group, 2, "delivered"), 15)
        assert admin.receipt_state(group) == (2, 0)
    finally:
        await close_all(admin, *online)


async def test_all_delivered_and_all_read_wait_for_every_member(
    server: ServerProcess, tmp_path: Path
) -> None:
    tokens = await users_with_keys(server, ["alice", "bob", "carol", "dave"], tmp_path)
    alice = await connect(server, tokens["alice"], tmp_path / "a.state")
    bob = await connect(server, tokens["bob"], tmp_path / "b.state")
    carol = await connect(server, tokens["carol"], tmp_path / "c.state")
    dave = None
    try:
        info = await asyncio.wait_for(alice.create_group("crew", ["bob", "carol", "dave"]), 10)
        group = info.group
        sent = await asyncio.wait_for(alice.send("all hands", group=group), 10)
        for client in (bob, carol):
            msg = await next_of(client, Message)
            assert (msg.seq, msg.text, msg.sender) == (sent.seq, "all hands", "alice")
        marks: dict[str, tuple[int, int]] = {}
        await gather_receipt_marks(
            alice, group, marks, lambda m: all(m.get(u, (0, 0))[0] >= sent.seq for u in ("bob", "carol")), 10
        )
        assert alice.receipt_state(group) == (0, 0)
        # Reads from the online members do not make it read by all either.
        await bob.mark_read(group, sent.seq)
        await carol.mark_read(group, sent.seq)
        await gather_receipt_marks(
            alice, group, marks, lambda m: all(m.get(u, (0, 0))[1] >= sent.seq for u in ("bob", "carol")), 10
        )
        assert alice.receipt_state(group) == (0, 0)

        dave = await connect(server, tokens["dave"], tmp_path / "d.state")
        msg = await next_of(dave, Message)
        assert msg.seq == sent.seq
        await asyncio.wait_for(alice.wait_receipt(group, sent.seq, "delivered"), 10)
        assert alice.receipt_state(group)[1] == 0
        await dave.mark_read(group, sent.seq)
        await asyncio.wait_for(alice.wait_receipt(group, sent.seq, "read"), 10)
        assert alice.receipt_state(group) == (sent.seq, sent.seq)
    finally:
        await close_all(alice, bob, carol, dave)


async def test_late_member_does_not_get_earlier_messages(server: ServerProcess, tmp_path: Path) -> None:
    tokens = await users_with_keys(server, ["alice", "bob", "carol"], tmp_path)
    alice = await connect(server, tokens["alice"], tmp_path / "a.state")
    carol_raw = None
    carol = None
    try:
        info = await asyncio.wait_for(alice.create_group("early birds", ["bob"]), 10)
        group = info.group
        for text in ("secret-1", "secret-2"):
            await asyncio.wait_for(alice.send(text, group=group), 10)
        info = await asyncio.wait_for(alice.add_members(group, ["carol"]), 10)
        assert info.members == ["alice", "bob", "carol"]
        assert info.last_seq == 4

        carol_raw = await RawWS.open(server, tokens["carol"])
        pushed = [fr for fr in await carol_raw.drain(1.0) if fr["type"] == "msg"]
        assert [fr["seq"] for fr in pushed] == [4], "earlier messages were pushed to a late member"
        event = json.loads(unb64(pushed[0]["body"]))
        assert (pushed[0]["ct"], event["action"], event["users"]) == (MEMBERSHIP_CT, "added", ["carol"])

        await carol_raw.send({"type": "history", "conv": group, "after": 0, "ref": "a"})
        page = await carol_raw.recv_type("history_page")
        assert [m["seq"] for m in page["messages"]] == [4]
        assert (page["first_seq"], page["last_seq"]) == (4, 4)
        await carol_raw.send({"type": "history", "conv": group, "before": 4, "ref": "b"})
        page = await carol_raw.recv_type("history_page")
        assert page["messages"] == []
        await carol_raw.send({"type": "history", "conv": group, "ref": "c", "limit": 200})
        page = await carol_raw.recv_type("history_page")
        assert [m["seq"] for m in page["messages"]] == [4]
        for m in page["messages"]:
            assert b"secret" not in unb64(m["body"])
        await carol_raw.close()
        carol_raw = None

        # New messages do reach her; the SDK shows the join and what follows only.
        after = await asyncio.wait_for(alice.send("welcome carol", group=group), 10)
        carol = await connect(server, tokens["carol"], tmp_path / "c.state")
        shown = await collect(carol, 10, 2.0, (Message, Membership))
        assert [(type(e).__name__, e.seq) for e in shown] == [("Membership", 4), ("Message", after.seq)]
        assert all("secret" not in getattr(e, "text", "") for e in shown)
        history, last = await carol.history(group, limit=200)
        assert [m.seq for m in history] == [4, 5] and last == 5
        assert carol.local_history(group)[-1].text == "welcome carol"
    finally:
        await close_all(alice, carol_raw, carol)


async def test_removed_member_sees_removal_and_nothing_after(server: ServerProcess, tmp_path: Path) -> None:
    tokens = await users_with_keys(server, ["alice", "bob", "carol", "dave"], tmp_path)
    alice = await connect(server, tokens["alice"], tmp_path / "a.state")
    bob = await connect(server, tokens["bob"], tmp_path / "b.state")
    carol = await connect(server, tokens["carol"], tmp_path / "c.state")
    dave_raw = None
    try:
        info = await asyncio.wait_for(alice.create_group("club", ["bob", "carol", "dave"]), 10)
        group = info.group
        m1 = await asyncio.wait_for(alice.send("m1", group=group), 10)
        assert [e.seq for e in await collect(carol, 2, 5, (Message, Membership))] == [1, m1.seq]

        info = await asyncio.wait_for(alice.remove_members(group, ["carol", "dave"]), 10)
        assert info.members == ["alice", "bob"]
        removal_seq = info.last_seq
        assert removal_seq == 3
        removed = await next_of(carol, Membership)
        assert (removed.seq, removed.action, removed.actor) == (removal_seq, "removed", "alice")
        assert set(removed.users) == {"carol", "dave"}
        seen_by_bob = await collect(bob, 3, 5, (Message, Membership))
        assert [e.seq for e in seen_by_bob] == [1, 2, 3]

        m2 = await asyncio.wait_for(alice.send("after carol left", group=group), 10)
        assert (await next_of(bob, Message)).seq == m2.seq
        assert await collect(carol, 1, 1.0, (Message, Membership)) == [], "a removed member got a message"

        with pytest.raises(RoostError) as refused:
            await asyncio.wait_for(carol.send("let me back", group=group), 10)
        assert refused.value.code == "not_member"
        with pytest.raises(RoostError) as refused:
            await carol.group_info(group)
        assert refused.value.code == "not_member"
        with pytest.raises(RoostError) as refused:
            await carol.add_members(group, ["carol"])
        assert refused.value.code == "not_member"

        history, last = await carol.history(group, limit=200)
        assert [m.seq for m in history] == [1, 2, 3]
        assert last == removal_seq
        history, _ = await carol.history(group, after=removal_seq)
        assert history == []
        assert all(m.text != "after carol left" for m in history)

        # Marks cannot move past the removal; typing is refused.
        await carol.mark_read(group, m2.seq)
        err = await next_of(carol, ErrorEvent)
        assert err.code == "invalid"
        await carol.typing(group)
        err = await next_of(carol, ErrorEvent)
        assert err.code == "not_member"

        # dave was removed while offline: he gets up to his removal and stops there.
        dave_raw = await RawWS.open(server, tokens["dave"])
        # (alice's sender key came to him in their 1:1 chat)
        frames = [fr for fr in await dave_raw.drain(1.0) if fr["type"] == "msg" and fr["conv"] == group]
        assert [fr["seq"] for fr in frames] == [1, 2, 3]
        assert json.loads(unb64(frames[-1]["body"]))["action"] == "removed"
        await dave_raw.send({"type": "dack", "conv": group, "seq": 4})
        assert (await dave_raw.recv_type("error"))["code"] == "invalid"
        await dave_raw.send({"type": "send", "id": "d1", "conv": group, "body": b64("hi?")})
        err = await dave_raw.recv_type("error")
        assert (err["code"], err.get("ref", "")) == ("not_member", "d1"), err
        await alice.send("m3", group=group)
        assert [fr for fr in await dave_raw.drain(1.0) if fr["type"] == "msg"] == []
        await dave_raw.close()
        dave_raw = None

        # Re-added later: the messages of the gap stay invisible.
        await asyncio.wait_for(alice.add_members(group, ["carol"]), 10)
        readded = await next_of(carol, Membership)
        assert readded.action == "added"
        history, _ = await carol.history(group, limit=200)
        assert m2.seq not in [m.seq for m in history]
        assert all(m.text not in ("after carol left", "m3") for m in history)
    finally:
        await close_all(alice, bob, carol, dave_raw)


async def test_only_admins_change_membership(server: ServerProcess, tmp_path: Path) -> None:
    tokens = await users_with_keys(server, ["alice", "bob", "carol", "dave"], tmp_path)
    alice = await connect(server, tokens["alice"], tmp_path / "a.state")
    bob = await connect(server, tokens["bob"], tmp_path / "b.state")
    dave = await connect(server, tokens["dave"], tmp_path / "d.state")
    try:
        info = await asyncio.wait_for(alice.create_group("admins only", ["bob", "carol"]), 10)
        group = info.group
        for call in (bob.add_members(group, ["dave"]), bob.remove_members(group, ["carol"])):
            with pytest.raises(RoostError) as refused:
                await asyncio.wait_for(call, 10)
            assert refused.value.code == "forbidden"
        # An outsider is not even a member.
        for call in (dave.add_members(group, ["dave"]), dave.group_info(group)):
            with pytest.raises(RoostError) as refused:
                await asyncio.wait_for(call, 10)
            assert refused.value.code == "not_member"
        with pytest.raises(RoostError) as refused:
            await asyncio.wait_for(dave.send("hi", group=group), 10)
        assert refused.value.code == "not_member"
        after = await asyncio.wait_for(alice.group_info(group), 10)
        assert (after.members, after.admins, after.last_seq) == (["alice", "bob", "carol"], ["alice"], 1)
        # Adding someone already in is a no-op (no event).
        same = await asyncio.wait_for(alice.add_members(group, ["bob"]), 10)
        assert (same.members, same.last_seq) == (["alice", "bob", "carol"], 1)
        # Adding an unknown user is refused, nothing changes.
        with pytest.raises(RoostError) as refused:
            await asyncio.wait_for(alice.add_members(group, ["nobody"]), 10)
        assert refused.value.code == "unknown_user"
        assert (await alice.group_info(group)).last_seq == 1
        assert await collect(dave, 1, 0.5, (Message, Membership)) == []
    finally:
        await close_all(alice, bob, dave)


async def test_leave_and_admin_handover(server: ServerProcess, tmp_path: Path) -> None:
    tokens = await users_with_keys(server, ["alice", "bob", "carol"], tmp_path)
    alice = await connect(server, tokens["alice"], tmp_path / "a.state")
    bob = await connect(server, tokens["bob"], tmp_path / "b.state")
    carol = await connect(server, tokens["carol"], tmp_path / "c.state")
    try:
        group = (await asyncio.wait_for(alice.create_group("leavers", ["bob", "carol"]), 10)).group
        info = await asyncio.wait_for(bob.leave_group(group), 10)
        assert "bob" not in info.members and info.members == ["alice", "carol"]
        for client in (alice, carol, bob):
            event, _ = await _next_membership(client, "left")
            assert (event.actor, event.users, event.seq) == ("bob", ("bob",), 2)
        with pytest.raises(RoostError) as refused:
            await asyncio.wait_for(bob.send("still here?", group=group), 10)
        assert refused.value.code == "not_member"
        with pytest.raises(RoostError) as refused:
            await asyncio.wait_for(bob.leave_group(group), 10)
        assert refused.value.code == "not_member"

        # The only admin leaves: the remaining member becomes admin.
        info = await asyncio.wait_for(alice.leave_group(group), 10)
        assert info.members == ["carol"] and info.admins == ["carol"]
        event, _ = await _next_membership(carol, "left")
        assert event.users == ("alice",)
        info = await asyncio.wait_for(carol.add_members(group, ["bob"]), 10)
        assert info.members == ["bob", "carol"]
    finally:
        await close_all(alice, bob, carol)


async def _next_membership(client: Client, action: str) -> tuple[Membership, list[Any]]:
    others: list[Any] = []
    while True:
        event = await next_of(client, (Membership, Message), 10)
        if isinstance(event, Membership) and event.action == action:
            return event, others
        others.append(event)


async def test_group_info(server: ServerProcess, tmp_path: Path) -> None:
    tokens = await users_with_keys(server, ["alice", "bob", "carol"], tmp_path)
    alice = await connect(server, tokens["alice"], tmp_path / "a.state")
    bob = await connect(server, tokens["bob"], tmp_path / "b.state")
    try:
        created = await asyncio.wait_for(alice.create_group("Book Club 📚", ["carol", "bob", "bob"]), 10)
        assert created.group.startswith("g:") and len(created.group) == 18
        assert created.name == "Book Club 📚"
        assert created.members == ["alice", "bob", "carol"]
        assert created.admins == ["alice"]
        assert created.last_seq == 1
        for i in range(3):
            await asyncio.wait_for(alice.send(f"m{i}", group=created.group), 10)
        for client in (alice, bob):
            info = await asyncio.wait_for(client.group_info(created.group), 10)
            assert (info.group, info.name, info.members, info.admins, info.last_seq) == (
                created.group,
                "Book Club 📚",
                ["alice", "bob", "carol"],
                ["alice"],
                4,
            )
        # A group with just its creator is fine too.
        solo = await asyncio.wait_for(bob.create_group("solo", []), 10)
        assert solo.members == ["bob"] and solo.admins == ["bob"]
        assert solo.group != created.group
    finally:
        await close_all(alice, bob)


async def test_configurable_group_cap(make_server, tmp_path: Path) -> None:
    srv = make_server("--max-group-members", "5")
    names = ["a0", "a1", "a2", "a3", "a4", "a5", "a6"]
    tokens = add_users(srv, names)
    admin = await connect(srv, tokens["a0"], tmp_path / "a.state")
    try:
        with pytest.raises(RoostError) as refused:
            await asyncio.wait_for(admin.create_group("six", names[1:6]), 10)
        assert refused.value.code == "group_full"
        info = await asyncio.wait_for(admin.create_group("five", names[1:5]), 10)
        assert len(info.members) == 5
        with pytest.raises(RoostError) as refused:
            await asyncio.wait_for(admin.add_members(info.group, ["a5"]), 10)
        assert refused.value.code == "group_full"
        with pytest.raises(RoostError) as refused:
            await asyncio.wait_for(admin.add_members(info.group, ["a5", "a6"]), 10)
        assert refused.value.code == "group_full"
        unchanged = await asyncio.wait_for(admin.group_info(info.group), 10)
        assert (unchanged.members, unchanged.last_seq) == (sorted(names[:5]), 1)
        await asyncio.wait_for(admin.remove_members(info.group, ["a4"]), 10)
        info = await asyncio.wait_for(admin.add_members(info.group, ["a5"]), 10)
        assert info.members == ["a0", "a1", "a2", "a3", "a5"]
    finally:
        await admin.close()


async def test_removing_the_member_a_message_waited_for_shows_it_read(server: Any) -> None:
    """bob's group message waits only for carol (offline); alice has read it.
    When carol is removed, bob is told at once: everyone who remains has read
    it. carol, added back while still offline, learns she had been removed."""
    tokens = add_users(server, ["alice", "bob", "carol"])
    alice = await RawWS.open(server, tokens["alice"])
    bob = await RawWS.open(server, tokens["bob"])
    carol: RawWS | None = None
    try:
        await alice.send({"type": "group_create", "name": "g", "members": ["bob", "carol"], "ref": "c"})
        group = (await alice.recv_type("group"))["group"]
        await bob.send({"type": "send", "id": "b1", "conv": group, "body": b64("hi")})
        seq = (await bob.recv_type("ack"))["seq"]
        await alice.recv_until(lambda fr: fr["type"] == "msg" and fr["seq"] == seq)
        await alice.send({"type": "read", "conv": group, "seq": seq})
        read_by_alice = await bob.recv_until(
            lambda fr: fr["type"] == "receipt" and fr["marks"].get("alice", [0, 0])[1] >= seq
        )
        assert read_by_alice[0]["all_read"] < seq  # carol has not even got it

        await alice.send({"type": "group_remove", "group": group, "members": ["carol"], "ref": "r"})
        receipt, _ = await bob.recv_until(lambda fr: fr["type"] == "receipt" and fr["all_read"] >= seq)
        assert receipt["all_delivered"] >= seq

        await alice.send({"type": "group_add", "group": group, "members": ["carol"], "ref": "a"})
        await alice.recv_until(lambda fr: fr.get("ref") == "a")
        carol = await RawWS.open(server, tokens["carol"])
        first, _ = await carol.recv_until(lambda fr: fr["type"] == "msg" and fr["conv"] == group)
        body = json.loads(unb64(first["body"]))
        assert (body["action"], body["users"]) == ("added", ["carol"])
        assert body["returning"] == {"carol": "removed"}
    finally:
        await close_all(alice, bob, carol)
