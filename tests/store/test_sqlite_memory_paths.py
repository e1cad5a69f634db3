"""The SQLite writer answers some questions from its cache instead of the
database: who sent in a range of seqs (receipts), whether a client id is new
(the idempotency index decides), a conversation's last seq (written once per
batch). A reopened database, an evicted conversation and a batch that evicts
and reloads a conversation must give the answers the database would."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from roost.store.sqlite import SqliteStore

from .conftest import NOW, SqliteHarness, WriterGate

USERS = ("alice", "bob", "carol", "dave")
G = "g:00000000000000cc"


async def opened(harness: SqliteHarness, **kwargs: int) -> SqliteStore:
    store = harness.make(**kwargs)
    await store.open()
    return store


async def opened_with_users(tmp_path: Path) -> tuple[SqliteHarness, SqliteStore]:
    """A new database holding ``USERS``, opened."""
    harness = SqliteHarness(tmp_path / "roost.sqlite")
    store = await opened(harness)
    for name in USERS:
        await store.add_user(name, name.encode(), NOW)
    return harness, store


async def test_receipts_after_reopen_cover_messages_sent_before(tmp_path) -> None:
    harness, store = await opened_with_users(tmp_path)
    await store.create_group("alice", G, "g", ["bob", "carol"], 10, NOW)  # seq 1
    await store.append("alice", "a1", "text/plain", b"x", NOW, conv=G)  # seq 2
    await store.append("bob", "b1", "text/plain", b"x", NOW, conv=G)  # seq 3
    await store.close()

    store = await opened(harness)  # a cold cache: seqs 1-3 are known only to the database
    try:
        await store.append("carol", "c1", "text/plain", b"x", NOW, conv=G)  # seq 4
        result = await store.advance_marks("carol", G, 4, None)
        assert sorted(r.user for r in result.receipts) == ["alice", "bob"]
        # Only seq 4 (carol's own) lies in bob's new range after this ack.
        result = await store.advance_marks("bob", G, 2, None)
        assert [r.user for r in result.receipts] == ["alice"]
        result = await store.advance_marks("bob", G, 4, None)
        assert [r.user for r in result.receipts] == ["carol"]
        # alice's range (0, 4] holds bob's and carol's messages, not only the tracked one.
        result = await store.advance_marks("alice", G, 4, None)
        assert sorted(r.user for r in result.receipts) == ["bob", "carol"]
    finally:
        await store.close()


async def test_a_sender_with_a_later_message_is_found_in_an_earlier_range(tmp_path) -> None:
    _harness, store = await opened_with_users(tmp_path)
    try:
        await store.create_group("alice", G, "g", ["bob", "carol"], 10, NOW)  # seq 1
        await store.append("alice", "a1", "text/plain", b"x", NOW, conv=G)  # seq 2
        await store.append("bob", "b1", "text/plain", b"x", NOW, conv=G)  # seq 3
        await store.append("alice", "a2", "text/plain", b"x", NOW, conv=G)  # seq 4
        # carol acks up to 3: alice's last message (4) is past it, her seq 2 is inside.
        result = await store.advance_marks("carol", G, 3, None)
        assert sorted(r.user for r in result.receipts) == ["alice", "bob"]
        # Up to 4 from 3: only alice's seq 4.
        result = await store.advance_marks("carol", G, 4, None)
        assert [r.user for r in result.receipts] == ["alice"]
    finally:
        await store.close()


async def test_duplicate_after_reopen_and_last_seq_written_per_batch(tmp_path) -> None:
    harness, store = await opened_with_users(tmp_path)
    async with WriterGate(store):
        sends = [store.append("alice", f"m{i}", "text/plain", b"x", NOW, to="bob") for i in range(5)]
    assert [m.seq for m in await asyncio.gather(*sends)] == [1, 2, 3, 4, 5]
    assert await harness.scalar("SELECT last_seq FROM conversations WHERE id='d:alice:bob'") == 5
    await store.close()

    store = await opened(harness)
    try:
        again = await store.append("alice", "m2", "text/plain", b"other", NOW, to="bob")
        assert (again.seq, again.duplicate, again.body) == (3, True, b"x")
        fresh = await store.append("alice", "m9", "text/plain", b"x", NOW, to="bob")
        assert (fresh.seq, fresh.duplicate) == (6, False)
        assert await harness.scalar("SELECT last_seq FROM conversations WHERE id='d:alice:bob'") == 6
        [entry] = await store.inbox("bob")
        assert (entry.conv, entry.delivered, entry.upto) == ("d:alice:bob", 0, 6)
    finally:
        await store.close()


async def test_a_batch_that_evicts_and_reloads_a_conversation_keeps_its_seqs(tmp_path) -> None:
    harness, store = await opened_with_users(tmp_path)
    for other in ("bob", "carol"):
        await store.append("alice", f"first-{other}", "text/plain", b"x", NOW, to=other)
    await store.close()

    # One cached conversation at a time: alternating sends in one batch evict
    # and reload each conversation before its new last seq is in the database.
    store = await opened(harness, cache_size=1)
    try:
        async with WriterGate(store):
            sends = [
                store.append("alice", f"m{i}", "text/plain", b"x", NOW, to=other)
                for i in range(3)
                for other in ("bob", "carol")
            ]
        stored = await asyncio.gather(*sends)
        assert [(m.conv, m.seq) for m in stored] == [
            (conv, i + 2) for i in range(3) for conv in ("d:alice:bob", "d:alice:carol")
        ]
        for conv in ("d:alice:bob", "d:alice:carol"):
            assert await harness.scalar("SELECT last_seq FROM conversations WHERE id=?", conv) == 4
    finally:
        await store.close()


async def test_a_receipt_ack_rides_with_the_next_write(tmp_path) -> None:
    _harness, store = await opened_with_users(tmp_path)
    try:
        first = await store.append("alice", "a1", "text/plain", b"x", NOW, to="bob")
        [receipt] = (await store.advance_marks("bob", first.conv, 1, None)).receipts
        before = store.commits
        rack = store.ack_receipts("alice", first.conv, receipt.rv)
        await store.append("carol", "c1", "text/plain", b"x", NOW, to="dave")
        await rack
        assert store.commits == before + 1, "the receipt ack made a commit of its own"
        assert await store.pending_receipts("alice") == []
    finally:
        await store.close()


async def test_a_lone_receipt_ack_is_committed_soon_and_at_close(tmp_path) -> None:
    harness, store = await opened_with_users(tmp_path)
    for cid in ("a1", "a2"):
        await store.append("alice", cid, "text/plain", b"x", NOW, to="bob")
    [receipt] = (await store.advance_marks("bob", "d:alice:bob", 1, None)).receipts
    await asyncio.wait_for(store.ack_receipts("alice", "d:alice:bob", receipt.rv), 2)
    assert await store.pending_receipts("alice") == []
    [receipt] = (await store.advance_marks("bob", "d:alice:bob", 2, None)).receipts
    store.ack_receipts("alice", "d:alice:bob", receipt.rv)  # not awaited: close() commits it
    await store.close()
    assert await harness.scalar("SELECT count(*) FROM receipt_pending WHERE rv > acked") == 0


async def test_a_duplicate_names_its_recipients_for_the_fan_out(tmp_path) -> None:
    _harness, store = await opened_with_users(tmp_path)
    try:
        await store.create_group("alice", G, "g", ["bob", "carol"], 10, NOW)
        first = await store.append("bob", "b1", "text/plain", b"x", NOW, conv=G)
        again = await store.append("bob", "b1", "text/plain", b"x", NOW, conv=G)
        assert (again.seq, again.duplicate) == (first.seq, True)
        assert sorted(again.recipients) == sorted(first.recipients) == ["alice", "carol"]
    finally:
        await store.close()


async def test_a_dack_in_a_chat_where_both_talk_needs_no_query(tmp_path) -> None:
    """bob acks alice's message after sending one of his own: his own later
    message must not hide from memory who sent in the acked range."""
    _harness, store = await opened_with_users(tmp_path)
    try:
        first = await store.append("alice", "a1", "text/plain", b"x", NOW, to="bob")  # seq 1
        await store.append("bob", "b1", "text/plain", b"x", NOW, to="alice")  # seq 2
        statements: list[str] = []
        assert store._wconn is not None
        store._wconn.set_trace_callback(statements.append)
        result = await store.advance_marks("bob", first.conv, 1, None)
        assert [r.user for r in result.receipts] == ["alice"]
        assert not [s for s in statements if "DISTINCT sender" in s], statements
    finally:
        await store.close()


async def test_a_receipt_in_a_direct_chat_keeps_no_marks_rows(tmp_path) -> None:
    """A direct receipt carries the peer's marks, which changed in the very
    batch: no receipt_marks upsert, select or delete per message. What the
    receipts say, live and after a reconnect, is what it was with the rows."""
    harness, store = await opened_with_users(tmp_path)
    try:
        sent = [await store.append("alice", f"a{i}", "text/plain", b"x", NOW, to="bob") for i in (1, 2)]
        conv = sent[0].conv
        statements: list[str] = []
        assert store._wconn is not None
        store._wconn.set_trace_callback(statements.append)
        first = await store.advance_marks("bob", conv, 1, None)
        await store.ack_receipts("alice", conv, first.receipts[0].rv)
        # A lost receipt: alice does not ack this one, the next still carries bob.
        await store.advance_marks("bob", conv, 2, 1)
        last = await store.advance_marks("bob", conv, None, 2)
        await store.ack_receipts("alice", conv, last.receipts[0].rv)
        store._wconn.set_trace_callback(None)
        assert [(r.user, r.marks, r.all_delivered, r.all_read) for r in first.receipts] == [
            ("alice", {"bob": (1, 0)}, 1, 0)
        ]
        assert [(r.user, r.marks, r.all_delivered, r.all_read) for r in last.receipts] == [
            ("alice", {"bob": (2, 2)}, 2, 2)
        ]
        touching = [s for s in statements if "receipt_marks" in s]
        # One delete at the first ack of the cached chat (rows an older Roost left), then none.
        assert len(touching) == 1 and touching[0].startswith("DELETE"), touching
        await store.advance_marks("bob", conv, None, None)  # changes nothing
        pending = await store.append("alice", "a3", "text/plain", b"x", NOW, to="bob")
        await store.advance_marks("bob", conv, pending.seq, None)  # receipt not acked: pending
        [owed] = await store.pending_receipts("alice")
        assert (owed.marks, owed.all_delivered, owed.all_read) == ({"bob": (3, 2)}, 3, 2)
        assert await harness.scalar("SELECT COUNT(*) FROM receipt_marks") == 0
    finally:
        await store.close()


async def test_rows_an_older_roost_kept_for_a_direct_chat_go_at_the_first_ack(tmp_path) -> None:
    harness, store = await opened_with_users(tmp_path)
    sent = await store.append("alice", "a1", "text/plain", b"x", NOW, to="bob")
    await store.close()
    # What an older Roost left: an unacked mark row of the chat, past any ack to come.
    with sqlite3.connect(harness.path) as conn:
        conn.execute(
            "INSERT INTO receipt_marks (user, conv, member, rv) VALUES (?,?,?,?)",
            ("alice", sent.conv, "bob", 99),
        )
    store = await opened(harness)
    try:
        result = await store.advance_marks("bob", sent.conv, 1, None)
        assert result.receipts[0].marks == {"bob": (1, 0)}
        await store.ack_receipts("alice", sent.conv, result.receipts[0].rv)
        assert await harness.scalar("SELECT COUNT(*) FROM receipt_marks") == 0
    finally:
        await store.close()
