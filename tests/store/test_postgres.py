"""PostgresStore: the whole store contract (every test of ``test_sqlite.py``,
collected again here with backend "postgres"), plus what only a shared
database has: several gateways writing at once, deadlocks, a PostgreSQL
restart in the middle of writes, schema migration.

Each test gets a fresh database on a throwaway server (``pg.py``)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from roost.devcluster.postgres import PgServer
from roost.protocol.errors import ErrorCode, ProtocolError
from roost.store.base import SendStream, StoredMessage, StoreUnavailable
from roost.store.postgres import SCHEMA_VERSION, PostgresStore, migrate

from . import test_sqlite as contract
from .conftest import NOW, USERS, token_hash

pytestmark = pytest.mark.postgres

# The contract: every behavioural test, run against PostgresStore.
globals().update({name: fn for name, fn in vars(contract).items() if name.startswith("test_")})

AB = contract.AB
G = contract.G
send = contract.send
code_of = contract.code_of


@pytest.fixture
def backend() -> str:
    return "postgres"


@pytest.fixture
async def gateways(pg_database: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two stores on one database: two gateway processes, as far as the store can tell."""
    a, b = PostgresStore(pg_database), PostgresStore(pg_database)
    await a.open()
    await b.open()
    for name in USERS:
        await a.add_user(name, token_hash(name), NOW)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def db_fetch(dsn: str, sql: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def assert_contiguous(dsn: str) -> dict[str, list[int]]:
    """Every conversation's seqs are 1..last_seq, each once; returns them."""
    rows = await db_fetch(dsn, "SELECT conv, seq FROM messages ORDER BY conv, seq")
    seqs: dict[str, list[int]] = {}
    for conv, seq in rows:
        seqs.setdefault(conv, []).append(seq)
    lasts = dict(await db_fetch(dsn, "SELECT id, last_seq FROM conversations"))
    for conv, got in seqs.items():
        assert got == list(range(1, len(got) + 1)), conv
        assert lasts[conv] == len(got), conv
    dupes = await db_fetch(
        dsn, "SELECT conv, sender, client_id FROM messages GROUP BY 1, 2, 3 HAVING COUNT(*) > 1"
    )
    assert dupes == []
    return seqs


# -- many gateways -------------------------------------------------------------------------


async def test_token_lookups_of_one_loop_pass_share_queries_and_each_gets_its_answer(
    gateways: tuple[PostgresStore, PostgresStore],
) -> None:
    """A reconnect storm: many lookups at once (known, unknown, the same token
    twice) are answered right, with far fewer queries than lookups."""
    store, _ = gateways
    names = [f"storm{i}" for i in range(1200)]
    await asyncio.gather(*(store.add_user(n, token_hash(n), NOW) for n in names))
    reads = contract.count_reads(store)
    asked = [*names, "nobody", names[0]]
    got = await asyncio.gather(*(store.user_by_token(token_hash(n)) for n in asked))
    assert got == [*names, None, names[0]]
    assert reads[0] <= 4, reads  # 1,201 distinct tokens, at most 512 per query


async def test_connect_time_reads_of_one_loop_pass_share_queries_and_each_gets_its_own(
    gateways: tuple[PostgresStore, PostgresStore],
) -> None:
    """Many devices connecting at once: their inbox and pending-receipt reads
    are answered per user, as one at a time would, with a few queries in all."""
    store, _ = gateways
    await send(store, "alice", "a1", to="bob")
    await send(store, "carol", "c1", to="bob")
    await send(store, "bob", "b1", to="dave")
    await store.advance_marks("dave", "d:bob:dave", 1, None)  # bob now has a receipt pending
    # Two senders with receipts pending in one group: aggregated per (user, group).
    await store.create_group("alice", G, "Friends", ["bob", "carol", "dave"], 50, NOW)
    await send(store, "alice", "ga", conv=G)
    await send(store, "carol", "gc", conv=G)
    await store.advance_marks("bob", G, 3, 2)
    await store.advance_marks("dave", G, 2, None)
    await store.advance_marks("carol", G, 3, None)
    await store.advance_marks("alice", G, 3, None)
    users = ["bob", "dave", "erin", "alice", "bob", "carol"]
    one_by_one = [(await store.inbox(u), await store.pending_receipts(u)) for u in users]
    reads = contract.count_reads(store)
    inboxes = await asyncio.gather(*(store.inbox(u) for u in users))
    receipts = await asyncio.gather(*(store.pending_receipts(u) for u in users))
    assert list(zip(inboxes, receipts, strict=True)) == one_by_one
    assert reads == [2]
    assert sorted(e.conv for e in inboxes[0]) == [AB, "d:bob:carol", "d:bob:dave"] and inboxes[2] == []
    assert [(r.conv, r.all_delivered) for r in receipts[0]] == [("d:bob:dave", 1)] and receipts[1] == []
    alice_g = next(r for r in receipts[3] if r.conv == G)
    carol_g = next(r for r in receipts[5] if r.conv == G)
    assert (alice_g.user, alice_g.marks["bob"], alice_g.all_delivered) == ("alice", (3, 2), 2)
    assert (carol_g.user, carol_g.marks["dave"], carol_g.all_delivered) == ("carol", (2, 0), 2)


async def test_two_gateways_append_concurrently(
    gateways: tuple[PostgresStore, PostgresStore], pg_database: str
) -> None:
    a, b = gateways
    await a.create_group("alice", G, "Friends", list(USERS), 50, NOW)
    convs: list[tuple[str | None, str | None]] = [(None, G), ("bob", None), ("carol", None), ("dave", None)]
    senders = ["alice", "erin"]  # erin is in the group; direct conversations are alice's or erin's
    n = 300  # per gateway
    rng = random.Random(7)

    def plan(gw: str) -> list[tuple[str, str, str | None, str | None]]:
        out = []
        for i in range(n):
            sender = senders[i % 2]
            to, conv = convs[rng.randrange(len(convs))]
            if to == sender:
                to = "bob"
            # every 10th message is sent by BOTH gateways with the same client id:
            # a client retrying on another gateway
            cid = f"shared-{i}" if i % 10 == 0 else f"{gw}-{i}"
            out.append((sender, cid, to, conv))
        return out

    plans = {"A": plan("A"), "B": plan("B")}
    # the shared sends must be the same message on both sides
    for i in range(0, n, 10):
        plans["B"][i] = plans["A"][i]

    async def run(store: PostgresStore, items: list[tuple[str, str, str | None, str | None]]) -> list[Any]:
        futures = []
        for i, (sender, cid, to, conv) in enumerate(items):
            futures.append(send(store, sender, cid, to=to, conv=conv))
            if i % 25 == 24:
                await asyncio.sleep(0)  # let the other gateway's batches interleave
        return await asyncio.gather(*futures)

    got_a, got_b = await asyncio.gather(run(a, plans["A"]), run(b, plans["B"]))
    assert a.commits > 1 and b.commits > 1

    seqs = await assert_contiguous(pg_database)
    stored = {
        (conv, sender, cid): seq
        for conv, seq, sender, cid in await db_fetch(
            pg_database, "SELECT conv, seq, sender, client_id FROM messages"
        )
    }
    # every acked message is stored under the seq it was acked with
    for m in [*got_a, *got_b]:
        assert stored[(m.conv, m.sender, m.client_id)] == m.seq
    # idempotency across gateways: each shared send stored once, one side saw a duplicate
    for i in range(0, n, 10):
        x, y = got_a[i], got_b[i]
        assert (x.conv, x.seq) == (y.conv, y.seq)
        assert sorted([x.duplicate, y.duplicate]) == [False, True]
    unique_sends = 2 * n - n // 10
    assert sum(len(s) for s in seqs.values()) == unique_sends + 1  # + the group's creation event
    # per gateway and conversation, seqs follow call order (socket order)
    for results in (got_a, got_b):
        last: dict[tuple[str, str], int] = {}
        for m in results:
            if m.duplicate:
                continue
            assert m.seq > last.get((m.conv, m.sender), 0)
            last[(m.conv, m.sender)] = m.seq


async def test_two_gateways_create_the_same_direct_conversation_at_once(
    gateways: tuple[PostgresStore, PostgresStore], pg_database: str
) -> None:
    a, b = gateways
    x, y = await asyncio.gather(send(a, "alice", "a1", to="bob"), send(b, "bob", "b1", to="alice"))
    assert {x.seq, y.seq} == {1, 2}
    assert x.conv == y.conv == AB
    rows = await db_fetch(pg_database, "SELECT user_name FROM members WHERE conv=$1 ORDER BY 1", AB)
    assert [r[0] for r in rows] == ["alice", "bob"]


async def test_membership_changed_by_another_gateway_is_seen_at_once(
    gateways: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = gateways
    await a.create_group("alice", G, "Friends", ["bob", "carol"], 50, NOW)
    first = await send(a, "bob", "m1", conv=G)  # a caches the recipients
    assert first.recipients == ("alice", "carol")
    await b.remove_members("alice", G, ["carol"], NOW)
    await b.add_members("alice", G, ["dave"], 50, NOW)
    second = await send(a, "bob", "m2", conv=G)
    assert second.recipients == ("alice", "dave")
    assert await code_of(send(a, "carol", "m3", conv=G)) is ErrorCode.NOT_MEMBER
    assert (await send(a, "dave", "m4", conv=G)).seq == second.seq + 1


async def test_marks_and_receipts_from_two_gateways(gateways: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = gateways
    await a.create_group("alice", G, "Friends", ["bob", "carol"], 50, NOW)
    await send(a, "alice", "m", conv=G)  # 2
    r1, r2 = await asyncio.gather(a.advance_marks("bob", G, 2, None), b.advance_marks("carol", G, 2, 2))
    rvs = sorted(r.rv for r in [*r1.receipts, *r2.receipts])
    assert rvs == [1, 2]  # one pending receipt row for alice, bumped once per commit
    [pending] = await a.pending_receipts("alice")
    assert (pending.rv, pending.marks, pending.all_delivered, pending.all_read) == (
        2,
        {"bob": (2, 0), "carol": (2, 2)},
        2,
        0,
    )


async def test_a_deadlock_rolls_the_batch_back_and_retries_it(pg_empty_database: str) -> None:
    """Another session holds conversation Y and then wants X, while the store's
    batch holds X and waits for Y: PostgreSQL aborts the store's transaction
    (its deadlock timer fires first) and the store runs the batch again."""
    pg_database = pg_empty_database
    admin = await asyncpg.connect(pg_database)
    database = await admin.fetchval("SELECT current_database()")
    await admin.execute(f"ALTER DATABASE {database} SET deadlock_timeout = '50ms'")
    store = PostgresStore(pg_database)
    await store.open()
    other = await asyncpg.connect(pg_database)
    try:
        for u in ("alice", "bob", "carol"):
            await store.add_user(u, u.encode(), NOW)
        await send(store, "alice", "x0", to="bob")
        await send(store, "alice", "y0", to="carol")
        await other.execute("SET deadlock_timeout = '10s'")
        tx = other.transaction()
        await tx.start()
        await other.execute("SELECT 1 FROM conversations WHERE id = 'd:alice:carol' FOR UPDATE")
        x = send(store, "alice", "x1", to="bob")
        y = send(store, "carol", "y1", to="alice")  # lock order: d:alice:bob, then d:alice:carol
        for _ in range(200):
            waiting = await admin.fetchval(
                "SELECT COUNT(*) FROM pg_stat_activity"
                " WHERE application_name = 'roost' AND wait_event_type = 'Lock'"
            )
            if waiting:
                break
            await asyncio.sleep(0.01)
        assert waiting, "the store's batch never waited for the lock"
        await other.execute("SELECT 1 FROM conversations WHERE id = 'd:alice:bob' FOR UPDATE")
        await tx.rollback()
        assert ((await x).seq, (await y).seq) == (2, 2)
        assert store.retries >= 1
        assert store.failed_batches == 0
    finally:
        await other.close()
        await admin.close()
        await store.close()


# -- failures ----------------------------------------------------------------------------


async def test_a_dropped_connection_fails_the_batch_and_the_next_one_reconnects(
    store: PostgresStore, gate: Any, pg_database: str
) -> None:
    await send(store, "alice", "before", to="bob")
    stream = SendStream()
    admin = await asyncpg.connect(pg_database)
    try:
        async with gate():
            futures = [send(store, "alice", f"m{i}", to="bob", stream=stream) for i in range(20)]
            # the batch will find its pooled connection gone
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'roost'"
            )
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
    finally:
        await admin.close()
    # either the pool noticed in time and reconnected, or the batch failed as a whole
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert all(isinstance(o, StoreUnavailable) for o in failed)
    assert len(failed) in (0, 20)
    assert stream.broken == bool(failed)
    after = await send(store, "alice", "after", to="bob")  # no reopen needed
    assert after.seq == 2 + (20 - len(failed))
    await assert_contiguous(pg_database)


async def test_a_restart_during_writes_fails_in_flight_writes_and_loses_no_acked_one(
    pg_server: PgServer, pg_database: str
) -> None:
    store = PostgresStore(pg_database, connect_timeout=2)
    await store.open()
    try:
        for u in USERS:
            await store.add_user(u, token_hash(u), NOW)
        await store.create_group("alice", G, "Friends", list(USERS), 50, NOW)
        acked: list[StoredMessage] = []
        failed: list[tuple[str, str, str | None, str | None]] = []
        stop = asyncio.Event()

        async def writer(sender: str, to: str | None, conv: str | None) -> None:
            stream, i = SendStream(), 0
            while not stop.is_set():
                batch = []
                for _ in range(20):
                    cid = f"{sender}-{to or conv}-{i}"
                    i += 1
                    batch.append(((sender, cid, to, conv), send(store, sender, cid, to, conv, stream=stream)))
                for item, fut in batch:
                    try:
                        acked.append(await fut)
                    except StoreUnavailable:
                        failed.append(item)
                if stream.broken:  # as a client would: reconnect (new stream), resend later
                    stream = SendStream()
                    await asyncio.sleep(0.02)

        tasks = [
            asyncio.create_task(writer("alice", "bob", None)),
            asyncio.create_task(writer("bob", None, G)),
            asyncio.create_task(writer("carol", "dave", None)),
        ]
        await asyncio.sleep(0.3)
        before_restart = len(acked)
        await asyncio.to_thread(pg_server.restart, 0.2)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)

        assert before_restart > 0
        assert failed, "no write was in flight during the restart"
        assert store.failed_batches >= 1
        # the store works again without being reopened
        again = await send(store, "erin", "after-restart", to="alice")
        assert again.seq >= 1
        # every acked message survived, under the seq it was acked with
        seqs = await assert_contiguous(pg_database)
        stored = {
            (conv, sender, cid): seq
            for conv, seq, sender, cid in await db_fetch(
                pg_database, "SELECT conv, seq, sender, client_id FROM messages"
            )
        }
        for m in acked:
            assert stored.get((m.conv, m.sender, m.client_id)) == m.seq, m
        # resending what failed (same ids) stores each exactly once, without gaps
        resent = await asyncio.gather(*(send(store, s, c, t, v) for s, c, t, v in failed))
        assert len({(m.conv, m.seq) for m in resent}) == len(failed)
        seqs = await assert_contiguous(pg_database)
        assert sum(len(s) for s in seqs.values()) == len(acked) + len(failed) + 2  # + creation, after-restart
    finally:
        await store.close()


async def test_a_store_whose_database_is_down_refuses_to_open() -> None:
    from roost.devcluster.postgres import free_port

    store = PostgresStore(f"postgresql://roost@127.0.0.1:{free_port()}/nowhere", connect_timeout=1)
    with pytest.raises(StoreUnavailable):
        await store.open()


# -- schema --------------------------------------------------------------------------------


async def test_migrate_is_idempotent_and_versioned(pg_empty_database: str) -> None:
    pg_database = pg_empty_database
    assert await migrate(pg_database) == SCHEMA_VERSION
    assert await migrate(pg_database) == SCHEMA_VERSION  # again: nothing to do, no error
    # many gateways starting at once migrate one after the other
    stores = [PostgresStore(pg_database) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    for s in stores:
        await s.close()
    rows = await db_fetch(pg_database, "SELECT version FROM roost_schema")
    assert [r[0] for r in rows] == [SCHEMA_VERSION]
    # every unique index includes the table's shard key
    indexes = await db_fetch(
        pg_database,
        "SELECT tablename, indexdef FROM pg_indexes WHERE schemaname = 'public' AND indexdef LIKE '%UNIQUE%'",
    )
    shard_key = {
        "messages": "conv",
        "members": "conv",
        "conversations": "id",
        "receipt_pending": "user_name",
        "receipt_marks": "user_name",
        "key_devices": "user_name",
        "key_prekeys": "user_name",
        "key_kem_prekeys": "user_name",
        "blobs": "id",  # media metadata (roost/store/blobmeta.py)
        "users": "",
        "roost_schema": "",
    }
    for table, indexdef in indexes:
        assert shard_key[table] in indexdef, indexdef


async def test_a_newer_schema_is_refused(pg_empty_database: str) -> None:
    pg_database = pg_empty_database
    await migrate(pg_database)
    conn = await asyncpg.connect(pg_database)
    try:
        await conn.execute("UPDATE roost_schema SET version = $1", SCHEMA_VERSION + 1)
    finally:
        await conn.close()
    store = PostgresStore(pg_database)
    with pytest.raises(RuntimeError, match="schema"):
        await store.open()


async def test_a_schema_2_database_gets_account_states(pg_empty_database: str) -> None:
    """Schema 3 adds users.state (and functions that read it): a database at
    schema 2, with accounts in it, upgrades when a gateway opens it."""
    await migrate(pg_empty_database)
    conn = await asyncpg.connect(pg_empty_database)
    try:
        await conn.execute(
            "INSERT INTO users (name, token_hash, created) VALUES ('alice', $1, $2)", token_hash("alice"), NOW
        )
        await conn.execute("ALTER TABLE users DROP COLUMN state")  # as schema 2 had it
        await conn.execute("UPDATE roost_schema SET version = 2")
    finally:
        await conn.close()
    store = PostgresStore(pg_empty_database)
    await store.open()
    try:
        assert await store.user_by_token(token_hash("alice")) == "alice"
        await store.set_user_state("alice", "disabled")
        assert [a.state for a in await store.list_users()] == ["disabled"]
        assert await migrate(pg_empty_database) == SCHEMA_VERSION == 7
    finally:
        await store.close()


async def test_a_schema_4_database_gets_receipt_marks(pg_empty_database: str) -> None:
    """Schema 5 adds receipt_marks (and the answer fields that carry them): a
    database at schema 4 upgrades, and its live receipts carry every mark
    not yet acked."""
    await migrate(pg_empty_database)
    conn = await asyncpg.connect(pg_empty_database)
    try:  # as schema 4 had it
        await conn.execute("DROP TABLE receipt_marks")
        await conn.execute("ALTER TABLE receipt_pending DROP COLUMN acked")
        await conn.execute(
            "ALTER TYPE roost_result DROP ATTRIBUTE mk_targets, DROP ATTRIBUTE mk_convs,"
            " DROP ATTRIBUTE mk_members, DROP ATTRIBUTE mk_ds, DROP ATTRIBUTE mk_rs"
        )
        await conn.execute("UPDATE roost_schema SET version = 4")
    finally:
        await conn.close()
    store = PostgresStore(pg_empty_database)
    await store.open()
    try:
        for name in ("alice", "bob", "carol"):
            await store.add_user(name, token_hash(name), NOW)
        group = contract.G
        await store.create_group("alice", group, "Friends", ["bob", "carol"], 50, NOW)
        assert (await contract.send(store, "alice", "a", conv=group)).seq == 2
        await store.advance_marks("bob", group, 2, None)  # its receipt is never acked
        [receipt] = (await store.advance_marks("carol", group, 2, None)).receipts
        assert receipt.marks == {"bob": (2, 0), "carol": (2, 0)}
        await store.ack_receipts("alice", group, receipt.rv)
        assert await store.pending_receipts("alice") == []
        assert await migrate(pg_empty_database) == SCHEMA_VERSION == 7
    finally:
        await store.close()


async def test_refusals_are_not_storage_errors(store: PostgresStore) -> None:
    """A refused op is an answer, never an SQL error that would abort its batch."""
    s = SendStream()
    futures = [
        send(store, "alice", "a", to="ghost", stream=s),
        store.add_user("alice", b"another token", NOW),
        store.add_user("zed", token_hash("bob"), NOW),  # a token already in use
        store.create_group("alice", G, "x", ["bob"], 1, NOW),
        send(store, "alice", "b", to="bob", stream=s),
    ]
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert [o.code for o in outcomes[:4] if isinstance(o, ProtocolError)] == [
        ErrorCode.UNKNOWN_USER,
        ErrorCode.INVALID,
        ErrorCode.INVALID,
        ErrorCode.GROUP_FULL,
    ]
    assert isinstance(outcomes[4], StoredMessage) and outcomes[4].seq == 1
    assert not s.broken
    await store.create_group("alice", G, "x", ["bob"], 5, NOW)
    assert await code_of(store.create_group("bob", G, "y", ["carol"], 5, NOW)) is ErrorCode.INVALID


async def test_reads_fail_with_store_unavailable_while_the_database_is_down(
    pg_server: PgServer, store: PostgresStore
) -> None:
    await send(store, "alice", "m", to="bob")
    await asyncio.to_thread(pg_server.stop, "immediate")
    try:
        with pytest.raises(StoreUnavailable):
            await store.inbox("bob")
        with pytest.raises(StoreUnavailable):
            await send(store, "alice", "n", to="bob")
    finally:
        await asyncio.to_thread(pg_server.start)
    # reads find their way back by themselves: a dead pooled connection is replaced
    assert [e.upto for e in await store.inbox("bob")] == [1]
    assert (await send(store, "alice", "n", to="bob")).seq == 2
    assert [e.upto for e in await store.inbox("bob")] == [2]
