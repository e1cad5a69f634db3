"""The store contract, against a real database: seqs, idempotency, marks,
receipts, inbox, groups, history, group commit, failures and durability.

Written against any store: ``store``/``harness``/``gate`` come from
conftest.py for the module's ``backend`` ("sqlite" here). ``test_postgres.py``
collects these very tests again with backend "postgres"."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest

from roost.core.delivery import DrainRequest
from roost.protocol.errors import ErrorCode, ProtocolError
from roost.protocol.frames import MEMBERSHIP_CT, SYSTEM_SENDER
from roost.store.base import DrainPage, InboxEntry, MarkResult, SendStream, StoredMessage, StoreUnavailable

from .conftest import NOW, Harness, token_hash
from .pages import read_inbox

if TYPE_CHECKING:
    from .conftest import AnyStore

AB = "d:alice:bob"
AC = "d:alice:carol"
G = "g:00000000000000aa"
G2 = "g:00000000000000bb"

Gate = Callable[[], Any]


async def code_of(awaitable: Awaitable[Any]) -> ErrorCode:
    with pytest.raises(ProtocolError) as info:
        await awaitable
    return info.value.code


def send(
    store: AnyStore,
    sender: str,
    cid: str,
    to: str | None = None,
    conv: str | None = None,
    body: bytes | None = None,
    stream: SendStream | None = None,
) -> asyncio.Future[StoredMessage]:
    return store.append(
        sender, cid, "text/plain", body if body is not None else cid.encode(), NOW, to, conv, stream
    )


async def seqs_of(store: AnyStore, user: str, conv: str) -> list[int]:
    messages, _, _ = await store.history(user, conv, None, 0, 200)
    return [m.seq for m in messages]


async def count_rows(harness: Harness, sql: str, *args: Any) -> int:
    """A number straight from the database (``?`` placeholders)."""
    return int(await harness.scalar(sql, *args))


async def make_group(store: AnyStore, members: list[str], group: str = G, limit: int = 50) -> None:
    snap = await store.create_group("alice", group, "Friends", members, limit, NOW)
    assert snap.group == group


# -- accounts ------------------------------------------------------------------


async def test_users_tokens_and_last_seen(store: AnyStore) -> None:
    assert await store.user_by_token(token_hash("bob")) == "bob"
    assert await store.user_by_token(b"nope") is None
    assert await code_of(store.add_user("bob", b"other", NOW)) is ErrorCode.INVALID
    await store.set_last_seen("bob", 1234)
    assert await store.last_seen(["bob", "carol", "ghost"]) == {"bob": 1234, "carol": None}


async def test_a_store_that_is_not_open_refuses_writes(harness: Harness) -> None:
    s = harness.make()
    with pytest.raises(StoreUnavailable):
        s.add_user("x", b"x", NOW)


# -- append ------------------------------------------------------------------------


async def test_append_assigns_contiguous_seqs_per_conversation(store: AnyStore) -> None:
    first = await send(store, "alice", "a1", to="bob")
    assert first.conv == AB
    assert (first.seq, first.sender, first.client_id, first.body, first.ts) == (1, "alice", "a1", b"a1", NOW)
    assert first.ct == "text/plain"
    assert not first.duplicate
    assert first.recipients == ("bob",)
    assert (await send(store, "alice", "a2", to="bob")).seq == 2
    # the other side names the same conversation, by user or by id
    reply = await send(store, "bob", "b1", to="alice")
    assert (reply.conv, reply.seq, reply.recipients) == (AB, 3, ("alice",))
    assert (await send(store, "bob", "b2", conv=AB)).seq == 4
    # another conversation has its own sequence
    other = await send(store, "alice", "a1", to="carol")
    assert (other.conv, other.seq) == (AC, 1)
    assert await seqs_of(store, "alice", AB) == [1, 2, 3, 4]
    assert await seqs_of(store, "carol", AC) == [1]


async def test_idempotent_append(store: AnyStore, harness: Harness) -> None:
    original = await send(store, "alice", "same", to="bob", body=b"first")
    await send(store, "bob", "x", to="alice")
    retry = await send(store, "alice", "same", to="bob", body=b"changed on retry")
    assert retry.duplicate
    assert (retry.seq, retry.conv, retry.body, retry.sender) == (original.seq, AB, b"first", "alice")
    assert await count_rows(harness, "SELECT COUNT(*) FROM messages WHERE conv=?", AB) == 2
    # the same client id from another sender, or in another conversation, is a new message
    theirs = await send(store, "bob", "same", to="alice")
    assert (theirs.seq, theirs.duplicate) == (3, False)
    elsewhere = await send(store, "alice", "same", to="carol")
    assert (elsewhere.conv, elsewhere.seq, elsewhere.duplicate) == (AC, 1, False)
    # and the conversation goes on without a gap
    assert (await send(store, "alice", "next", to="bob")).seq == 4


async def test_a_retry_after_the_sender_was_removed_gets_its_duplicate(store: AnyStore) -> None:
    """bob's message commits, its answer is lost, bob is removed from the group,
    then his client resends it: the resend must get the original answer (a
    duplicate), not ``not_member`` for a message everyone already has (found
    by the simulator: the client showed it as failed, and its seq as a gap)."""
    await make_group(store, ["bob", "carol"])
    original = await send(store, "bob", "hello", conv=G)
    await store.remove_members("alice", G, ["bob"], NOW)
    retry = await send(store, "bob", "hello", conv=G)
    assert (retry.seq, retry.duplicate, retry.client_id) == (original.seq, True, "hello")
    assert set(retry.recipients) == {"alice", "carol"}
    # a new message from bob is refused as before
    assert await code_of(send(store, "bob", "later", conv=G)) == ErrorCode.NOT_MEMBER


async def test_a_duplicate_names_who_should_have_it_when_it_was_sent(store: AnyStore) -> None:
    """The service fans a duplicate out again (its first answer, and so its
    push, may have been lost): to the members of the message's time, never to
    someone who joined later, and still to someone removed after it."""
    await make_group(store, ["bob", "carol"])
    first = await send(store, "alice", "m", conv=G)
    await store.add_members("alice", G, ["dave"], 50, NOW)
    await store.remove_members("alice", G, ["carol"], NOW)
    retry = await send(store, "alice", "m", conv=G)
    assert retry.duplicate and retry.seq == first.seq
    assert sorted(retry.recipients) == ["bob", "carol"]
    direct = await send(store, "alice", "d", to="bob")
    assert (await send(store, "alice", "d", to="bob")).recipients == direct.recipients == ("bob",)


async def test_pending_receipts_still_name_a_member_who_left(store: AnyStore) -> None:
    """Alice was away when carol got her message; carol then left. When alice
    comes back she must still learn that carol got it; the aggregate (all
    delivered) is over the members who remain."""
    await make_group(store, ["bob", "carol"])
    sent = await send(store, "alice", "m", conv=G)
    await store.advance_marks("carol", G, sent.seq, None)
    await store.remove_members("alice", G, ["carol"], NOW)
    [p] = await store.pending_receipts("alice")
    assert p.marks["carol"][0] >= sent.seq
    assert p.marks["bob"] == (0, 0)
    assert (p.all_delivered, p.all_read) == (0, 0)


async def test_idempotent_append_within_one_batch(store: AnyStore, gate: Gate, harness: Harness) -> None:
    async with gate():
        one = send(store, "alice", "dup", to="bob")
        two = send(store, "alice", "dup", to="bob")
    a, b = await one, await two
    assert (a.seq, a.duplicate) == (1, False)
    assert (b.seq, b.duplicate) == (1, True)
    assert await count_rows(harness, "SELECT COUNT(*) FROM messages") == 1


async def test_append_to_unknown_user(store: AnyStore, harness: Harness) -> None:
    assert await code_of(send(store, "alice", "m", to="nobody")) is ErrorCode.UNKNOWN_USER
    assert await count_rows(harness, "SELECT COUNT(*) FROM conversations") == 0
    assert await count_rows(harness, "SELECT COUNT(*) FROM messages") == 0


async def test_append_to_self_is_invalid(store: AnyStore, harness: Harness) -> None:
    assert await code_of(send(store, "alice", "m", to="alice")) is ErrorCode.INVALID
    assert await count_rows(harness, "SELECT COUNT(*) FROM conversations") == 0


async def test_append_to_unknown_conversation(store: AnyStore) -> None:
    assert await code_of(send(store, "alice", "m", conv=G)) is ErrorCode.UNKNOWN_CONVERSATION
    assert await code_of(send(store, "alice", "m", conv=AB)) is ErrorCode.UNKNOWN_CONVERSATION


async def test_non_member_cannot_send(store: AnyStore) -> None:
    await make_group(store, ["bob"])
    assert await code_of(send(store, "carol", "m", conv=G)) is ErrorCode.NOT_MEMBER
    await send(store, "alice", "m", to="bob")
    assert await code_of(send(store, "carol", "m", conv=AB)) is ErrorCode.NOT_MEMBER
    assert await seqs_of(store, "alice", G) == [1]


async def test_a_refused_op_does_not_disturb_its_batch(store: AnyStore, gate: Gate) -> None:
    stream = SendStream()
    async with gate():
        ok1 = send(store, "alice", "1", to="bob", stream=stream)
        bad = send(store, "alice", "2", to="nobody", stream=stream)
        ok2 = send(store, "alice", "3", to="bob", stream=stream)
    assert (await ok1).seq == 1
    assert await code_of(bad) is ErrorCode.UNKNOWN_USER
    assert (await ok2).seq == 2
    assert not stream.broken  # a refusal is not a storage failure


async def test_concurrent_appends_get_unique_contiguous_seqs_and_share_commits(store: AnyStore) -> None:
    senders = [("alice", "bob"), ("bob", "alice"), ("carol", "alice"), ("dave", "erin")]
    n = 400
    commits_before, ops_before = store.commits, store.committed_ops

    async def one(i: int) -> StoredMessage:
        sender, to = senders[i % len(senders)]
        return await send(store, sender, f"m{i}", to=to)

    results = await asyncio.gather(*(one(i) for i in range(n)))
    by_conv: dict[str, list[int]] = {}
    for r in results:
        by_conv.setdefault(r.conv, []).append(r.seq)
    assert set(by_conv) == {AB, AC, "d:dave:erin"}
    for conv, seqs in by_conv.items():
        assert sorted(seqs) == list(range(1, len(seqs) + 1)), conv
    assert store.committed_ops - ops_before == n
    commits = store.commits - commits_before
    assert 1 <= commits < n / 4, f"{commits} commits for {n} appends: no group commit"
    for conv, seqs in by_conv.items():
        member = "alice" if conv != "d:dave:erin" else "dave"
        assert await seqs_of(store, member, conv) == sorted(seqs)


async def test_appends_commit_in_call_order(store: AnyStore) -> None:
    futures = [send(store, "alice", f"o{i}", to="bob") for i in range(150)]
    results = await asyncio.gather(*futures)
    assert [r.seq for r in results] == list(range(1, 151))
    assert [r.client_id for r in results] == [f"o{i}" for i in range(150)]


async def test_writes_queued_during_a_commit_share_the_next_one(
    store: AnyStore, gate: Gate, harness: Harness
) -> None:
    before = store.commits
    async with gate():
        futures = [send(store, "bob", f"m{i}", to="carol") for i in range(50)]
        futures.append(store.set_last_seen("bob", 5))
    await asyncio.gather(*futures)
    # the gate's own commit (if it makes one), then all 51 writes at once
    assert store.commits - before == harness.gate(store).own_commits + 1


async def test_small_cache_reloads_conversation_state(harness: Harness) -> None:
    s = harness.make(cache_size=2)
    await s.open()
    try:
        users = ["alice", "bob", "carol", "dave", "erin"]
        for u in users:
            await s.add_user(u, u.encode(), NOW)
        for round_ in range(3):
            for other in users[1:]:
                m = await send(s, "alice", f"{other}-{round_}", to=other)
                assert m.seq == round_ + 1
        assert await seqs_of(s, "erin", "d:alice:erin") == [1, 2, 3]
    finally:
        await s.close()


# -- marks and receipts ---------------------------------------------------------------


async def test_advance_marks_only_forward_and_read_implies_delivered(store: AnyStore) -> None:
    for i in range(5):
        await send(store, "alice", f"m{i}", to="bob")
    r = await store.advance_marks("bob", AB, 3, None)
    assert isinstance(r, MarkResult)
    assert (r.conv, r.user, r.delivered, r.read) == (AB, "bob", 3, 0)
    r = await store.advance_marks("bob", AB, 2, None)
    assert (r.delivered, r.read) == (3, 0)
    assert r.receipts == []
    r = await store.advance_marks("bob", AB, None, 4)
    assert (r.delivered, r.read) == (4, 4)
    r = await store.advance_marks("bob", AB, 5, 1)
    assert (r.delivered, r.read) == (5, 4)
    assert await store.inbox("bob") == []


async def test_advance_marks_refusals(store: AnyStore) -> None:
    await send(store, "alice", "m", to="bob")
    assert await code_of(store.advance_marks("bob", AB, 2, None)) is ErrorCode.INVALID
    assert await code_of(store.advance_marks("bob", AB, None, 2)) is ErrorCode.INVALID
    assert await code_of(store.advance_marks("carol", AB, 1, None)) is ErrorCode.NOT_MEMBER
    assert await code_of(store.advance_marks("bob", AC, 1, None)) is ErrorCode.UNKNOWN_CONVERSATION
    # nothing moved
    assert await store.inbox("bob") == [InboxEntry(AB, 0, 1)]


async def test_receipts_go_to_senders_with_min_aggregates(store: AnyStore) -> None:
    await make_group(store, ["bob", "carol"])  # seq 1: the membership event
    assert (await send(store, "alice", "a", conv=G)).seq == 2
    assert (await send(store, "bob", "b", conv=G)).seq == 3

    def by_user(result: MarkResult) -> dict[str, tuple[int, dict[str, tuple[int, int]], int, int]]:
        assert all(r.conv == G for r in result.receipts)
        return {r.user: (r.rv, r.marks, r.all_delivered, r.all_read) for r in result.receipts}

    r = await store.advance_marks("carol", G, 3, None)
    assert by_user(r) == {
        "alice": (1, {"carol": (3, 0)}, 0, 0),  # bob has not got alice's message yet
        "bob": (1, {"carol": (3, 0)}, 0, 0),  # nor alice bob's
    }
    # Nothing is acked here, so each receipt also carries the marks of the
    # receipts before it (test_a_receipt_carries_every_mark_not_yet_acked).
    r = await store.advance_marks("bob", G, 2, None)  # only alice sent in (0, 2]
    assert by_user(r) == {"alice": (2, {"bob": (2, 0), "carol": (3, 0)}, 2, 0)}
    r = await store.advance_marks("bob", G, None, 3)  # bob's own 3 sends no receipt to bob
    assert by_user(r) == {"alice": (3, {"bob": (3, 3), "carol": (3, 0)}, 3, 0)}
    r = await store.advance_marks("carol", G, None, 3)
    assert by_user(r) == {
        "alice": (4, {"bob": (3, 3), "carol": (3, 3)}, 3, 3),
        "bob": (2, {"carol": (3, 3)}, 0, 0),  # alice still has not acked bob's message
    }
    r = await store.advance_marks("alice", G, 3, None)
    assert by_user(r) == {"bob": (3, {"alice": (3, 0), "carol": (3, 3)}, 3, 0)}
    # an ack that changes nothing tells nobody anything
    r = await store.advance_marks("carol", G, 1, 1)
    assert (r.delivered, r.read, r.receipts) == (3, 3, [])

    pending = {p.user: p for p in await store.pending_receipts("alice")}
    assert set(pending) == {"alice"}
    p = pending["alice"]
    assert (p.conv, p.rv, p.all_delivered, p.all_read) == (G, 4, 3, 3)
    assert p.marks == {"bob": (3, 3), "carol": (3, 3)}
    [q] = await store.pending_receipts("bob")
    assert (q.conv, q.rv, q.all_delivered, q.all_read) == (G, 3, 3, 0)
    assert q.marks == {"alice": (3, 0), "carol": (3, 3)}
    assert await store.pending_receipts("carol") == []

    await store.ack_receipts("alice", G, 3)  # an older version: still pending
    assert [p.rv for p in await store.pending_receipts("alice")] == [4]
    await store.ack_receipts("alice", G, 4)
    assert await store.pending_receipts("alice") == []
    assert [q.rv for q in await store.pending_receipts("bob")] == [3]


async def test_a_receipt_carries_every_mark_not_yet_acked(store: AnyStore) -> None:
    # A receipt push can be lost (a lost answer, a stale route) while the
    # sender stays online; its ack of a later receipt clears the pending row.
    # So a receipt carries every mark changed since the last ack it covers,
    # not only its own batch's; once acked, a mark is not carried again.
    await make_group(store, ["bob", "carol"])  # seq 1: the membership event
    assert (await send(store, "alice", "a", conv=G)).seq == 2

    [lost] = (await store.advance_marks("bob", G, 2, None)).receipts  # never reaches alice
    assert (lost.rv, lost.marks) == (1, {"bob": (2, 0)})
    [live] = (await store.advance_marks("carol", G, 2, None)).receipts
    assert (live.rv, live.marks, live.all_delivered) == (2, {"bob": (2, 0), "carol": (2, 0)}, 2)

    await store.ack_receipts("alice", G, 1)  # covers bob's mark, not carol's
    [later] = (await store.advance_marks("bob", G, None, 2)).receipts
    assert (later.rv, later.marks) == (3, {"bob": (2, 2), "carol": (2, 0)})

    await store.ack_receipts("alice", G, 3)  # covers everything: nothing is owed
    assert await store.pending_receipts("alice") == []
    [fresh] = (await store.advance_marks("carol", G, None, 2)).receipts
    assert (fresh.rv, fresh.marks, fresh.all_read) == (4, {"carol": (2, 2)}, 2)


async def test_a_late_ack_of_an_old_receipt_does_not_clear_a_new_one(store: AnyStore) -> None:
    # A resync reads alice's pending receipt (rv 1) just before her ack of it
    # commits, and pushes it after: she acks rv 1 a second time. A receipt
    # made meanwhile must not have rv 1 again, or that late ack clears it.
    await make_group(store, ["bob", "carol"])
    assert (await send(store, "alice", "a", conv=G)).seq == 2
    [first] = (await store.advance_marks("bob", G, 2, None)).receipts
    await store.ack_receipts("alice", G, first.rv)
    assert await store.pending_receipts("alice") == []

    [second] = (await store.advance_marks("carol", G, 2, None)).receipts  # say this push is lost
    assert second.rv > first.rv
    await store.ack_receipts("alice", G, first.rv)  # the late ack
    [owed] = await store.pending_receipts("alice")
    assert (owed.rv, owed.marks["carol"]) == (second.rv, (2, 0))


async def test_pending_receipts_leave_out_removed_members(store: AnyStore) -> None:
    await make_group(store, ["bob", "carol"])
    await send(store, "alice", "a", conv=G)
    await store.advance_marks("bob", G, 2, None)
    await store.remove_members("alice", G, ["carol"], NOW)
    [p] = await store.pending_receipts("alice")
    assert p.marks == {"bob": (2, 0)}
    assert (p.all_delivered, p.all_read) == (2, 0)


def count_reads(store: AnyStore) -> list[int]:
    """From now on, ``[n]``: the store's reads so far (SQLite: hops to a
    reader thread; PostgreSQL: pool checkouts)."""
    reads = [0]
    real_read = store._read

    async def counting_read(fn: Any) -> Any:
        reads[0] += 1
        return await real_read(fn)

    store._read = counting_read  # type: ignore[method-assign]
    return reads


async def test_token_lookups_of_one_loop_pass_share_one_read(store: AnyStore) -> None:
    await store.set_user_state("carol", "disabled")
    hashes = [token_hash("bob"), b"nope", token_hash("carol"), token_hash("alice"), token_hash("bob")]
    reads = count_reads(store)
    names = await asyncio.gather(*(store.user_by_token(h) for h in hashes))
    assert names == ["bob", None, None, "alice", "bob"]
    assert reads == [1]


async def test_connect_state_is_inbox_receipts_and_key_stock_in_one_read(store: AnyStore) -> None:
    """What a device is owed at connect, for devices connecting in one loop
    pass: each gets what ``inbox``, ``pending_receipts`` and ``key_stock``
    give one at a time, from one read for all of them."""
    from tests.keys_material import Identity

    from .test_keys import keys_of

    await send(store, "alice", "a1", to="bob")
    await send(store, "carol", "c1", to="bob")
    await send(store, "bob", "b1", to="dave")
    await store.advance_marks("dave", "d:bob:dave", 1, None)  # bob now has a receipt pending
    await make_group(store, ["bob", "carol", "dave"])
    await send(store, "alice", "ga", conv=G)
    await send(store, "carol", "gc", conv=G)
    await store.advance_marks("bob", G, 3, 2)
    await store.advance_marks("dave", G, 2, None)
    await store.put_keys(keys_of("alice", Identity.generate(), ec=[1, 2], kem=[5]))
    users = ["bob", "dave", "erin", "alice", "bob", "carol", "ghost"]
    one_by_one = [
        (await store.inbox(u), await store.pending_receipts(u), await store.key_stock(u, 1)) for u in users
    ]
    reads = count_reads(store)
    states = await asyncio.gather(*(store.connect_state(u) for u in users))
    assert [(s.inbox, s.receipts, s.keys) for s in states] == one_by_one
    assert reads == [1]
    bob, dave, erin, alice, _, carol, ghost = states
    assert sorted(e.conv for e in bob.inbox) == [AB, "d:bob:carol", "d:bob:dave"]  # G read up to 3
    assert [(r.conv, r.all_delivered) for r in bob.receipts] == [("d:bob:dave", 1)]
    assert dave.inbox and erin.inbox == [] and erin.receipts == []
    assert {r.conv for r in alice.receipts} == {G} and {r.conv for r in carol.receipts} == {G}
    assert (alice.keys.ec, alice.keys.kem, alice.keys.has_identity) == (2, 1, True)
    assert not bob.keys.has_identity and ghost.inbox == ghost.receipts == [] and not ghost.keys.has_identity


async def test_removing_the_member_a_message_waited_for_completes_its_receipt(store: AnyStore) -> None:
    """bob's message waits only for carol (offline); alice has read it. Once
    carol is removed, the aggregate over the members that remain says ✓✓
    read, and bob gets that receipt (pending too), as if carol had acked."""
    await make_group(store, ["bob", "carol"])  # 1
    assert (await send(store, "bob", "b", conv=G)).seq == 2
    r = await store.advance_marks("alice", G, None, 2)
    assert [(x.user, x.all_delivered, x.all_read) for x in r.receipts] == [("bob", 0, 0)]
    snap = await store.remove_members("alice", G, ["carol"], NOW)  # 3
    # Only bob sent past carol's read mark; the removal event is nobody's.
    assert [(x.user, x.conv, x.rv, x.all_delivered, x.all_read) for x in snap.receipts] == [
        ("bob", G, 2, 2, 2)
    ]
    [p] = await store.pending_receipts("bob")
    assert (p.rv, p.all_delivered, p.all_read) == (2, 2, 2)
    assert await store.pending_receipts("alice") == []
    # Leaving does the same: dave's and bob's messages wait for erin only.
    await store.add_members("alice", G, ["dave", "erin"], 50, NOW)  # 4
    assert (await send(store, "dave", "d", conv=G)).seq == 5
    assert (await send(store, "bob", "b2", conv=G)).seq == 6
    for member in ("alice", "bob", "dave"):
        await store.advance_marks(member, G, 6, None)
    snap = await store.remove_members("erin", G, ["erin"], NOW)  # 7
    assert sorted((x.user, x.all_delivered, x.all_read) for x in snap.receipts) == [
        ("bob", 6, 2),  # the read marks of alice (2) and dave (joined at 3)
        ("dave", 6, 0),  # bob has read nothing
    ]


async def test_a_member_added_again_is_told_how_it_had_gone(store: AnyStore) -> None:
    """A member removed and added again while offline never sees its removal
    event (it sees the group from the new "added" on): that event says it."""
    await make_group(store, ["bob", "carol"])
    await store.remove_members("alice", G, ["bob"], NOW)
    await store.remove_members("carol", G, ["carol"], NOW)
    snap = await store.add_members("alice", G, ["bob", "carol", "dave"], 50, NOW)
    assert snap.event is not None
    body = json.loads(snap.event.body)
    assert (body["action"], body["users"]) == ("added", ["bob", "carol", "dave"])
    assert body["returning"] == {"bob": "removed", "carol": "left"}
    page = await read_inbox(store, "bob", G, None, 50)
    assert [json.loads(m.body).get("returning") for m in page.messages] == [
        {"bob": "removed", "carol": "left"}
    ]
    snap = await store.add_members("alice", G, ["erin"], 50, NOW)
    assert snap.event is not None and "returning" not in json.loads(snap.event.body)


async def test_receipts_in_a_direct_conversation(store: AnyStore) -> None:
    await send(store, "alice", "1", to="bob")
    await send(store, "alice", "2", to="bob")
    r = await store.advance_marks("bob", AB, 2, 1)
    [receipt] = r.receipts
    assert (receipt.user, receipt.conv, receipt.marks) == ("alice", AB, {"bob": (2, 1)})
    assert (receipt.all_delivered, receipt.all_read) == (2, 1)


async def test_acks_of_one_batch_make_one_receipt_per_sender(store: AnyStore, gate: Gate) -> None:
    await make_group(store, ["bob", "carol"])
    await send(store, "alice", "a", conv=G)
    async with gate():
        from_bob = store.advance_marks("bob", G, 2, None)
        from_carol = store.advance_marks("carol", G, None, 2)
    bob_result, carol_result = await from_bob, await from_carol
    receipts = bob_result.receipts + carol_result.receipts
    assert len(receipts) == 1
    [receipt] = receipts
    assert receipt.user == "alice"
    assert receipt.marks == {"bob": (2, 0), "carol": (2, 2)}
    assert (receipt.all_delivered, receipt.all_read) == (2, 0)
    [pending] = await store.pending_receipts("alice")
    assert pending.rv == receipt.rv == 1


async def test_cumulative_acks_of_one_batch_collapse(store: AnyStore, gate: Gate) -> None:
    for i in range(4):
        await send(store, "alice", f"m{i}", to="bob")
    async with gate():
        acks = [store.advance_marks("bob", AB, seq, None) for seq in (1, 3, 2)]
        reads = [store.advance_marks("bob", AB, None, 1)]
    results = await asyncio.gather(*acks, *reads)
    assert {(r.delivered, r.read) for r in results} == {(3, 1)}
    assert await store.inbox("bob") == [InboxEntry(AB, 3, 4)]


async def test_an_invalid_ack_does_not_swallow_a_valid_one_in_the_same_batch(
    store: AnyStore, gate: Gate
) -> None:
    """Each ack must get the answer it would get alone: a bogus ``dack`` (past the
    end) queued next to a valid one must not make the valid one fail too."""
    for i in range(3):
        await send(store, "alice", f"m{i}", to="bob")
    async with gate():
        bogus = store.advance_marks("bob", AB, 999, None)
        valid = store.advance_marks("bob", AB, 2, None)
    assert await code_of(bogus) is ErrorCode.INVALID
    result = await valid
    assert result.delivered == 2
    assert await store.inbox("bob") == [InboxEntry(AB, 2, 3)]


# -- inbox -------------------------------------------------------------------------


async def test_inbox_lists_conversations_with_undelivered_messages(store: AnyStore) -> None:
    assert await store.inbox("bob") == []
    for i in range(3):
        await send(store, "alice", f"m{i}", to="bob")
    await send(store, "carol", "c", to="bob")
    inbox = sorted(await store.inbox("bob"), key=lambda e: e.conv)
    assert inbox == [InboxEntry(AB, 0, 3), InboxEntry("d:bob:carol", 0, 1)]
    await store.advance_marks("bob", AB, 3, None)
    assert await store.inbox("bob") == [InboxEntry("d:bob:carol", 0, 1)]
    await store.advance_marks("bob", "d:bob:carol", 1, None)
    assert await store.inbox("bob") == []
    assert await store.inbox("erin") == []


async def test_read_inbox_skips_own_messages(store: AnyStore) -> None:
    for i, sender in enumerate(["alice", "bob", "alice", "bob", "alice"]):
        await send(store, sender, f"m{i}", to="alice" if sender == "bob" else "bob")
    page = await read_inbox(store, "bob", AB, None, 10)
    assert (page.conv, page.start, page.scanned_to, page.last_seq) == (AB, 0, 5, 5)
    assert [m.seq for m in page.messages] == [1, 3, 5]
    assert {m.sender for m in page.messages} == {"alice"}
    assert [m.body for m in page.messages] == [b"m0", b"m2", b"m4"]


async def test_read_inbox_respects_limit_and_reports_progress(store: AnyStore) -> None:
    for i in range(6):
        await send(store, "alice", f"m{i}", to="bob")
    page = await read_inbox(store, "bob", AB, None, 2)
    assert [m.seq for m in page.messages] == [1, 2]
    assert (page.start, page.scanned_to, page.last_seq) == (0, 2, 6)
    page = await read_inbox(store, "bob", AB, page.scanned_to, 3)
    assert [m.seq for m in page.messages] == [3, 4, 5]
    assert (page.start, page.scanned_to, page.last_seq) == (2, 5, 6)
    page = await read_inbox(store, "bob", AB, 5, 3)
    assert ([m.seq for m in page.messages], page.scanned_to) == ([6], 6)
    page = await read_inbox(store, "bob", AB, 6, 3)
    assert (page.messages, page.start, page.scanned_to) == ([], 6, 6)
    # without ``after`` it reads from the durable delivered mark
    await store.advance_marks("bob", AB, 4, None)
    page = await read_inbox(store, "bob", AB, None, 10)
    assert (page.start, [m.seq for m in page.messages]) == (4, [5, 6])


async def test_read_inbox_makes_progress_over_long_runs_of_own_messages(store: AnyStore) -> None:
    for i in range(9):
        await send(store, "bob", f"own{i}", to="alice")
    await send(store, "alice", "hi", to="bob")
    after, seen = 0, []
    for _ in range(10):
        page = await read_inbox(store, "bob", AB, after, 1)
        assert page.scanned_to > after or page.scanned_to == page.last_seq
        seen += [m.seq for m in page.messages]
        after = page.scanned_to
        if after == page.last_seq:
            break
    assert seen == [10]
    assert after == 10


async def test_read_inbox_refusals(store: AnyStore) -> None:
    await send(store, "alice", "m", to="bob")
    assert await code_of(read_inbox(store, "carol", AB, None, 5)) is ErrorCode.NOT_MEMBER
    assert await code_of(read_inbox(store, "bob", G, None, 5)) is ErrorCode.UNKNOWN_CONVERSATION


async def test_read_inboxes_reads_many_conversations_within_one_budget(store: AnyStore) -> None:
    for i in range(3):
        await send(store, "alice", f"ab{i}", to="bob")
        await send(store, "carol", f"cb{i}", to="bob")
    await send(store, "alice", "ac", to="carol")
    reads = [DrainRequest(AB, None, 10), DrainRequest(AC, None, 10), DrainRequest("d:bob:carol", 1, 10)]
    pages = await store.read_inboxes("bob", reads, 10)
    # A conversation bob may not read is refused in its place; the others are read.
    assert [type(p) for p in pages] == [DrainPage, ProtocolError, DrainPage]
    assert isinstance(pages[1], ProtocolError) and pages[1].code is ErrorCode.NOT_MEMBER
    first, _, third = pages
    assert isinstance(first, DrainPage) and isinstance(third, DrainPage)
    assert (first.conv, first.start, [m.seq for m in first.messages]) == (AB, 0, [1, 2, 3])
    assert (third.conv, third.start, [m.body for m in third.messages]) == ("d:bob:carol", 1, [b"cb1", b"cb2"])
    # The budget caps the messages read in all: a prefix of the reads comes back,
    # the page that reached it is cut short, and nothing after it is read.
    reads = [DrainRequest(AB, None, 10), DrainRequest("d:bob:carol", None, 10), DrainRequest(AB, 3, 10)]
    pages = await store.read_inboxes("bob", reads, 4)
    assert len(pages) == 2
    assert [[m.seq for m in p.messages] for p in pages if isinstance(p, DrainPage)] == [[1, 2, 3], [1]]
    assert isinstance(pages[1], DrainPage) and pages[1].scanned_to == 1


# -- groups ---------------------------------------------------------------------------


async def test_create_group(store: AnyStore) -> None:
    snap = await store.create_group("alice", G, "Friends", ["carol", "bob", "bob"], 3, NOW)
    assert (snap.group, snap.name, snap.last_seq) == (G, "Friends", 1)
    assert snap.members == ["alice", "bob", "carol"]
    assert snap.admins == ["alice"]
    event = snap.event
    assert event is not None
    assert (event.conv, event.seq, event.sender, event.ct) == (G, 1, SYSTEM_SENDER, MEMBERSHIP_CT)
    assert set(event.recipients) == {"alice", "bob", "carol"}
    assert json.loads(event.body) == {
        "action": "created",
        "actor": "alice",
        "users": ["alice", "bob", "carol"],
        "name": "Friends",
    }
    info = await store.group_info("bob", G)
    assert (info.members, info.admins, info.last_seq, info.name) == (snap.members, ["alice"], 1, "Friends")
    assert sorted(await store.active_members("carol", G)) == ["alice", "bob", "carol"]
    # every member finds the creation in its inbox
    assert await store.inbox("carol") == [InboxEntry(G, 0, 1)]


async def test_create_group_refusals_create_nothing(store: AnyStore) -> None:
    # the creator counts against the cap
    full = store.create_group("alice", G, "x", ["bob", "carol"], 2, NOW)
    assert await code_of(full) is ErrorCode.GROUP_FULL
    unknown = store.create_group("alice", G, "x", ["bob", "ghost"], 10, NOW)
    assert await code_of(unknown) is ErrorCode.UNKNOWN_USER
    assert await code_of(store.group_info("alice", G)) is ErrorCode.UNKNOWN_CONVERSATION
    assert await store.inbox("bob") == []
    # the cap itself is fine
    snap = await store.create_group("alice", G, "x", ["bob", "carol"], 3, NOW)
    assert snap.members == ["alice", "bob", "carol"]


async def test_add_members(store: AnyStore) -> None:
    await make_group(store, ["bob"], limit=4)
    assert await code_of(store.add_members("bob", G, ["carol"], 4, NOW)) is ErrorCode.FORBIDDEN
    assert await code_of(store.add_members("carol", G, ["dave"], 4, NOW)) is ErrorCode.NOT_MEMBER
    assert await code_of(store.add_members("alice", G, ["ghost"], 4, NOW)) is ErrorCode.UNKNOWN_USER
    assert await code_of(store.add_members("alice", G2, ["carol"], 4, NOW)) is ErrorCode.UNKNOWN_CONVERSATION
    assert await code_of(store.add_members("alice", G, ["carol", "dave", "erin"], 4, NOW)) is (
        ErrorCode.GROUP_FULL
    )
    assert (await store.group_info("alice", G)).last_seq == 1  # refusals appended nothing
    snap = await store.add_members("alice", G, ["carol", "bob"], 4, NOW)
    assert snap.members == ["alice", "bob", "carol"]
    assert snap.event is not None and snap.event.seq == 2
    assert json.loads(snap.event.body)["users"] == ["carol"]  # bob already was a member
    assert set(snap.event.recipients) == {"alice", "bob", "carol"}
    # adding members who are all there already changes nothing
    again = await store.add_members("alice", G, ["carol"], 4, NOW)
    assert again.event is None and again.last_seq == 2


async def test_members_added_later_do_not_see_earlier_messages(store: AnyStore) -> None:
    await make_group(store, ["bob"])
    await send(store, "alice", "early-1", conv=G)
    await send(store, "bob", "early-2", conv=G)
    snap = await store.add_members("alice", G, ["carol"], 50, NOW)
    assert snap.event is not None and snap.event.seq == 4
    await send(store, "alice", "late", conv=G)
    messages, first, last = await store.history("carol", G, None, None, 50)
    assert [m.seq for m in messages] == [4, 5]
    assert (first, last) == (4, 5)
    assert await seqs_of(store, "carol", G) == [4, 5]
    assert (await store.history("carol", G, 4, None, 50))[0] == []
    assert await store.inbox("carol") == [InboxEntry(G, 3, 5)]
    page = await read_inbox(store, "carol", G, None, 50)
    assert [m.seq for m in page.messages] == [4, 5]
    page = await read_inbox(store, "carol", G, 0, 50)  # an ``after`` before joining is clamped
    assert (page.start, [m.seq for m in page.messages]) == (3, [4, 5])
    # acks below the join point change nothing
    r = await store.advance_marks("carol", G, 2, None)
    assert (r.delivered, r.read) == (3, 3)


async def test_removed_members_see_up_to_their_removal_only(store: AnyStore) -> None:
    await make_group(store, ["bob", "carol"])
    await send(store, "alice", "a", conv=G)  # 2
    await send(store, "bob", "b", conv=G)  # 3
    assert await code_of(store.remove_members("carol", G, ["bob"], NOW)) is ErrorCode.FORBIDDEN
    snap = await store.remove_members("alice", G, ["bob"], NOW)
    assert snap.removed == ("bob",)
    assert snap.members == ["alice", "carol"]
    event = snap.event
    assert event is not None and event.seq == 4
    assert json.loads(event.body)["action"] == "removed"
    assert set(event.recipients) == {"alice", "bob", "carol"}  # the removed hear of it
    await send(store, "alice", "after", conv=G)  # 5

    assert await seqs_of(store, "bob", G) == [1, 2, 3, 4]
    _, _, last = await store.history("bob", G, None, None, 50)
    assert last == 4
    assert await store.inbox("bob") == [InboxEntry(G, 0, 4)]
    page = await read_inbox(store, "bob", G, None, 50)
    assert ([m.seq for m in page.messages], page.last_seq) == ([1, 2, 4], 4)
    assert await code_of(send(store, "bob", "again", conv=G)) is ErrorCode.NOT_MEMBER
    assert await code_of(store.group_info("bob", G)) is ErrorCode.NOT_MEMBER
    assert await code_of(store.active_members("bob", G)) is ErrorCode.NOT_MEMBER
    assert await code_of(store.advance_marks("bob", G, 5, None)) is ErrorCode.INVALID
    assert (await store.advance_marks("bob", G, 4, None)).delivered == 4
    assert await store.inbox("bob") == []
    assert sorted(await store.active_members("alice", G)) == ["alice", "carol"]
    # removing someone who is not there appends nothing
    noop = await store.remove_members("alice", G, ["bob", "erin"], NOW)
    assert noop.event is None and noop.last_seq == 5


async def test_leave(store: AnyStore) -> None:
    await make_group(store, ["bob", "carol"])
    snap = await store.remove_members("carol", G, ["carol"], NOW)
    assert snap.removed == ("carol",)
    assert snap.event is not None
    assert json.loads(snap.event.body) == {
        "action": "left",
        "actor": "carol",
        "users": ["carol"],
        "name": "Friends",
    }
    assert snap.members == ["alice", "bob"]
    assert snap.admins == ["alice"]
    assert await code_of(send(store, "carol", "m", conv=G)) is ErrorCode.NOT_MEMBER
    assert await code_of(store.remove_members("carol", G, ["carol"], NOW)) is ErrorCode.NOT_MEMBER


async def test_admin_is_promoted_when_the_last_admin_leaves(store: AnyStore) -> None:
    await make_group(store, ["carol", "bob"])
    await store.add_members("alice", G, ["dave"], 50, NOW)
    snap = await store.remove_members("alice", G, ["alice"], NOW)
    # the earliest joined member, ties by name
    assert snap.admins == ["bob"]
    assert (await store.group_info("dave", G)).admins == ["bob"]
    added = await store.add_members("bob", G, ["erin"], 50, NOW)
    assert added.members == ["bob", "carol", "dave", "erin"]
    snap = await store.remove_members("bob", G, ["bob"], NOW)
    assert snap.admins == ["carol"]  # joined at creation, before dave and erin
    # while there is an admin, nobody is promoted
    snap = await store.remove_members("dave", G, ["dave"], NOW)
    assert snap.admins == ["carol"]


async def test_removed_member_can_be_added_again_and_sees_only_the_new_part(store: AnyStore) -> None:
    await make_group(store, ["bob"])
    await store.remove_members("alice", G, ["bob"], NOW)  # 2
    await send(store, "alice", "while away", conv=G)  # 3
    snap = await store.add_members("alice", G, ["bob"], 50, NOW)  # 4
    assert snap.members == ["alice", "bob"]
    await send(store, "alice", "welcome back", conv=G)  # 5
    assert await seqs_of(store, "bob", G) == [4, 5]
    assert (await send(store, "bob", "hi", conv=G)).seq == 6


# -- account administration -----------------------------------------------------------


async def test_token_reset_disable_and_enable(store: AnyStore) -> None:
    new_hash = b"\x01" * 32
    await store.set_token("alice", new_hash)
    assert await store.user_by_token(token_hash("alice")) is None
    assert await store.user_by_token(new_hash) == "alice"
    await store.set_user_state("alice", "disabled")
    assert await store.user_by_token(new_hash) is None
    # A disabled account still gets messages: they wait in its inbox.
    assert (await send(store, "bob", "b", to="alice")).seq == 1
    await store.set_user_state("alice", "active")
    assert await store.user_by_token(new_hash) == "alice"
    assert await store.inbox("alice") == [InboxEntry(AB, 0, 1)]
    accounts = {a.name: a for a in await store.list_users()}
    assert sorted(accounts) == ["alice", "bob", "carol", "dave", "erin"]
    assert (accounts["alice"].state, accounts["alice"].created) == ("active", NOW)
    for refused in (store.set_token("zed", new_hash), store.set_user_state("zed", "disabled")):
        assert await code_of(refused) is ErrorCode.UNKNOWN_USER


async def test_a_removed_account_is_gone_but_its_messages_stay(store: AnyStore) -> None:
    await make_group(store, ["bob", "carol"])  # 1
    await send(store, "carol", "c", conv=G)  # 2
    await send(store, "carol", "hi", to="alice")
    await send(store, "alice", "for carol", to="carol")
    assert await store.active_groups("carol") == [G]
    await store.set_user_state("carol", "removed")
    assert await store.user_by_token(token_hash("carol")) is None
    snap = await store.remove_members("", G, ["carol"], NOW)  # the administrator: no membership needed
    assert snap.members == ["alice", "bob"] and snap.event is not None
    assert json.loads(snap.event.body)["actor"] == ""
    await store.purge_member("carol")
    assert await store.inbox("carol") == []
    assert await store.active_groups("carol") == []
    assert await seqs_of(store, "alice", G) == [1, 2, 3]  # carol's message stays
    assert [m.sender for m in (await store.history("alice", AC, None, None, 50))[0]] == ["carol", "alice"]
    assert await code_of(send(store, "alice", "again", to="carol")) is ErrorCode.UNKNOWN_USER
    assert await code_of(send(store, "alice", "again2", conv=AC)) is ErrorCode.UNKNOWN_USER
    assert await code_of(store.add_members("alice", G, ["carol"], 50, NOW)) is ErrorCode.UNKNOWN_USER
    assert await code_of(store.add_user("carol", b"\x02" * 32, NOW)) is ErrorCode.INVALID
    assert await code_of(store.set_user_state("carol", "active")) is ErrorCode.UNKNOWN_USER
    await store.set_user_state("carol", "removed")  # repeating a removal is harmless
    assert {a.name: a.state for a in await store.list_users()}["carol"] == "removed"


# -- history ------------------------------------------------------------------------


async def test_history_paging(store: AnyStore) -> None:
    for i in range(10):
        await send(store, "alice" if i % 2 else "bob", f"m{i}", to="bob" if i % 2 else "alice")
    page, first, last = await store.history("alice", AB, None, None, 3)
    assert ([m.seq for m in page], first, last) == ([8, 9, 10], 1, 10)
    page, _, _ = await store.history("alice", AB, 8, None, 3)
    assert [m.seq for m in page] == [5, 6, 7]
    page, _, _ = await store.history("alice", AB, 2, None, 3)
    assert [m.seq for m in page] == [1]
    assert (await store.history("alice", AB, 1, None, 3))[0] == []
    page, _, _ = await store.history("bob", AB, None, 0, 4)
    assert [m.seq for m in page] == [1, 2, 3, 4]
    page, _, _ = await store.history("bob", AB, None, 8, 4)
    assert [m.seq for m in page] == [9, 10]
    assert (await store.history("bob", AB, None, 10, 4))[0] == []
    # walking back page by page yields everything exactly once, in order
    collected: list[int] = []
    before: int | None = None
    while True:
        page, _, _ = await store.history("alice", AB, before, None, 4)
        if not page:
            break
        collected = [m.seq for m in page] + collected
        before = page[0].seq
    assert collected == list(range(1, 11))
    m = (await store.history("alice", AB, 2, None, 1))[0][0]
    assert (m.seq, m.sender, m.client_id, m.body, m.ct, m.ts) == (1, "bob", "m0", b"m0", "text/plain", NOW)
    assert await code_of(store.history("carol", AB, None, None, 5)) is ErrorCode.NOT_MEMBER


async def test_history_pages_of_large_messages_stay_bounded(store: AnyStore) -> None:
    body = b"x" * (60 * 1024)
    for i in range(20):
        await send(store, "alice", f"big{i}", to="bob", body=body)
    page, _, last = await store.history("bob", AB, None, None, 50)
    seqs = [m.seq for m in page]
    assert seqs == list(range(20 - len(seqs) + 1, 21))  # the newest, contiguous
    assert 1 <= len(seqs) < 20
    assert sum(len(m.body) for m in page) <= 1024 * 1024
    assert last == 20
    # paging on collects everything exactly once, both ways
    older = seqs
    while older[0] > 1:
        more, _, _ = await store.history("bob", AB, older[0], None, 50)
        assert more
        older = [m.seq for m in more] + older
    assert older == list(range(1, 21))
    newer: list[int] = []
    while not newer or newer[-1] < 20:
        more, _, _ = await store.history("bob", AB, None, newer[-1] if newer else 0, 50)
        assert more
        newer += [m.seq for m in more]
    assert newer == list(range(1, 21))


# -- failures, shutdown and durability -----------------------------------------------------


async def test_a_failed_batch_commits_nothing_and_breaks_its_streams(
    store: AnyStore, gate: Gate, harness: Harness
) -> None:
    await send(store, "alice", "before", to="bob")  # seq 1
    s1, s2, s3 = SendStream(), SendStream(), SendStream()
    with harness.failing_appends(store, "boom"):
        async with gate():
            ok = send(store, "alice", "fine", to="bob", stream=s1)
            boom = send(store, "carol", "boom", to="dave", stream=s2)
            user = store.add_user("zed", b"zed", NOW)
            mark = store.advance_marks("bob", AB, 1, None)
        for fut in (ok, boom, user, mark):
            with pytest.raises(StoreUnavailable):
                await fut
    assert s1.broken and s2.broken
    assert not s3.broken
    # nothing of the batch happened
    assert await count_rows(harness, "SELECT COUNT(*) FROM messages") == 1
    assert await count_rows(harness, "SELECT COUNT(*) FROM users WHERE name='zed'") == 0
    assert await store.inbox("bob") == [InboxEntry(AB, 0, 1)]
    assert await count_rows(harness, "SELECT COUNT(*) FROM conversations") == 1  # d:carol:dave was not kept
    bob_delivered = f"SELECT delivered FROM members WHERE conv=? AND {harness.user_column}='bob'"
    assert await count_rows(harness, bob_delivered, AB) == 0

    # storage is back: later sends of a broken stream fail even now, so they
    # cannot overtake a resend
    with pytest.raises(StoreUnavailable):
        await send(store, "alice", "later", to="bob", stream=s1)
    assert await count_rows(harness, "SELECT COUNT(*) FROM messages") == 1
    # a new stream (a new connection) works, and the sequence has no gap
    resent = await send(store, "alice", "fine", to="bob", stream=s3)
    assert (resent.seq, resent.duplicate) == (2, False)
    assert (await send(store, "carol", "boom", to="dave")).seq == 1
    await store.add_user("zed", b"zed", NOW)
    assert await store.user_by_token(b"zed") == "zed"


async def test_close_then_reopen_keeps_everything(harness: Harness) -> None:
    s = harness.make()
    await s.open()
    for u in ("alice", "bob", "carol"):
        await s.add_user(u, token_hash(u), NOW)
    await s.set_last_seen("bob", 77)
    for i in range(3):
        await send(s, "alice", f"m{i}", to="bob")
    await s.advance_marks("bob", AB, 2, 1)
    await s.create_group("alice", G, "Friends", ["bob", "carol"], 10, NOW)
    await send(s, "carol", "g1", conv=G)
    await s.close()

    s = harness.make()
    await s.open()
    try:
        assert await s.user_by_token(token_hash("carol")) == "carol"
        assert await s.last_seen(["bob"]) == {"bob": 77}
        assert await seqs_of(s, "bob", AB) == [1, 2, 3]
        assert sorted(await s.inbox("bob"), key=lambda e: e.conv) == [
            InboxEntry(AB, 2, 3),
            InboxEntry(G, 0, 2),
        ]
        [receipt] = await s.pending_receipts("alice")
        assert (receipt.conv, receipt.marks) == (AB, {"bob": (2, 1)})
        info = await s.group_info("carol", G)
        assert (info.members, info.admins, info.last_seq) == (["alice", "bob", "carol"], ["alice"], 2)
        # idempotency and the sequence survive too
        dup = await send(s, "alice", "m1", to="bob")
        assert (dup.seq, dup.duplicate) == (2, True)
        assert (await send(s, "alice", "m3", to="bob")).seq == 4
        assert (await send(s, "bob", "g2", conv=G)).seq == 3
    finally:
        await s.close()


async def test_close_finishes_queued_writes(harness: Harness) -> None:
    s = harness.make()
    await s.open()
    await s.add_user("alice", b"a", NOW)
    await s.add_user("bob", b"b", NOW)
    futures = [send(s, "alice", f"m{i}", to="bob") for i in range(50)]
    await s.close()
    assert [f.result().seq for f in futures] == list(range(1, 51))
    assert await count_rows(harness, "SELECT COUNT(*) FROM messages") == 50


async def test_closed_store_refuses_writes_and_reads(store: AnyStore) -> None:
    await store.close()
    with pytest.raises(StoreUnavailable):
        await send(store, "alice", "m", to="bob")
    with pytest.raises(StoreUnavailable):
        await store.add_user("zed", b"z", NOW)
    with pytest.raises(StoreUnavailable):
        await store.advance_marks("bob", AB, 1, None)
    with pytest.raises(StoreUnavailable):
        await store.inbox("bob")
    with pytest.raises(StoreUnavailable):
        await store.user_by_token(token_hash("bob"))


async def test_a_write_submitted_while_closing_is_answered(store: AnyStore) -> None:
    """A write that arrives while ``close()`` waits for the writer must still get
    an answer (done or StoreUnavailable), never hang forever."""
    closing = asyncio.create_task(store.close())
    await asyncio.sleep(0)  # close() has queued its stop marker and waits for the writer
    late = store.add_user("late", b"late", NOW)
    await closing
    try:
        await asyncio.wait_for(asyncio.shield(late), 1)
    except StoreUnavailable:
        pass
    except TimeoutError:
        pytest.fail("a write submitted during close() never resolved")
