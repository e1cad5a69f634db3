"""The key directory in both stores: handout once, whole-or-nothing uploads,
removal, migration, and on PostgreSQL several gateways taking at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from roost.protocol.errors import ErrorCode, ProtocolError
from roost.store.base import KeyStock, KeyUpload
from tests.keys_material import Identity, ec_public, kem_public

from .conftest import NOW, USERS, token_hash


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def keys_of(
    user: str,
    ident: Identity,
    ec: range | list[int] = range(1, 6),
    kem: range | list[int] = range(1, 6),
    last: int | None = 1000,
) -> KeyUpload:
    signed = ec_public()
    return KeyUpload(
        user,
        1,
        7,
        ident.public,
        (1, signed, ident.sign(signed)),
        [(i, ec_public()) for i in ec],
        [(i, kem_public(i), ident.sign(kem_public(i))) for i in kem],
        None if last is None else (last, kem_public(last), ident.sign(kem_public(last))),
    )


async def code_of(fut: Any) -> str:
    with pytest.raises(ProtocolError) as err:
        await fut
    return str(err.value.code)


async def test_a_handout_takes_the_lowest_id_once_then_the_last_resort_key(store: Any) -> None:
    ident = Identity.generate()
    assert await store.put_keys(keys_of("alice", ident, ec=[4, 2], kem=[3])) == KeyStock(2, 1, True)
    taken = [(await store.take_keys("alice"))[0] for _ in range(3)]
    assert [t.prekey and t.prekey[0] for t in taken] == [2, 4, None]
    assert [(t.kem[0], t.kem_last_resort) for t in taken] == [(3, False), (1000, True), (1000, True)]
    assert [(t.ec_left, t.kem_left) for t in taken] == [(1, 0), (0, 0), (0, 0)]
    assert all(t.identity == ident.public and t.registration == 7 for t in taken)
    assert await store.key_stock("alice", 1) == KeyStock(0, 0, True)
    assert await store.key_stock("bob", 1) == KeyStock(0, 0, False)
    assert await code_of(store.take_keys("bob")) == ErrorCode.NO_KEYS
    assert await code_of(store.take_keys("zed")) == ErrorCode.UNKNOWN_USER


async def test_takes_in_one_batch_get_distinct_keys(store: Any, gate: Any) -> None:
    await store.put_keys(keys_of("alice", Identity.generate(), ec=range(1, 11), kem=range(1, 11)))
    async with gate():
        futures = [store.take_keys("alice") for _ in range(12)]
    taken = [(await f)[0] for f in futures]
    assert sorted(t.prekey[0] for t in taken if t.prekey) == list(range(1, 11))
    assert sorted(t.kem[0] for t in taken if not t.kem_last_resort) == list(range(1, 11))
    assert sum(t.prekey is None for t in taken) == 2


async def test_a_refused_upload_changes_nothing_even_in_a_batch_with_good_ones(
    store: Any, gate: Any, harness: Any
) -> None:
    ident = Identity.generate()
    await store.put_keys(keys_of("alice", ident, ec=[1, 2], kem=[1]))
    async with gate():
        dup_ec = store.put_keys(keys_of("alice", ident, ec=[3, 2], kem=[7]))  # 2 is stored
        dup_kem = store.put_keys(keys_of("alice", ident, ec=[8], kem=[9, 1]))  # 1 is stored
        dup_last = store.put_keys(keys_of("alice", ident, ec=[], kem=[1000], last=None))  # last resort's id
        good = store.put_keys(keys_of("bob", Identity.generate()))
    assert await code_of(dup_ec) == ErrorCode.DUPLICATE_KEY_ID
    assert await code_of(dup_kem) == ErrorCode.DUPLICATE_KEY_ID
    assert await code_of(dup_last) == ErrorCode.DUPLICATE_KEY_ID
    assert await good == KeyStock(5, 5, True)
    assert await store.key_stock("alice", 1) == KeyStock(2, 1, True)
    col = harness.user_column
    assert await harness.scalar(f"SELECT count(*) FROM key_prekeys WHERE {col} = ?", "alice") == 2
    assert await harness.scalar(f"SELECT count(*) FROM key_kem_prekeys WHERE {col} = ?", "alice") == 1
    # A first upload must bring a last-resort key; over the cap is refused whole.
    assert await code_of(store.put_keys(keys_of("carol", ident, last=None))) == ErrorCode.INVALID
    for n in range(10):
        await store.put_keys(keys_of("carol", ident, ec=range(n * 100 + 1, n * 100 + 101), kem=[]))
    assert await code_of(store.put_keys(keys_of("carol", ident, ec=[5000], kem=[5000]))) == "too_many_keys"
    assert await store.key_stock("carol", 1) == KeyStock(1000, 0, True)


async def test_a_removed_user_has_no_keys_left(store: Any, harness: Any) -> None:
    await store.put_keys(keys_of("alice", Identity.generate()))
    await store.put_keys(keys_of("bob", Identity.generate()))
    await store.set_user_state("alice", "removed")
    assert await code_of(store.take_keys("alice")) == ErrorCode.UNKNOWN_USER
    await store.purge_member("alice")
    col = harness.user_column
    for table in ("key_devices", "key_prekeys", "key_kem_prekeys"):
        assert await harness.scalar(f"SELECT count(*) FROM {table} WHERE {col} = ?", "alice") == 0
        assert await harness.scalar(f"SELECT count(*) FROM {table} WHERE {col} = ?", "bob") > 0


# -- several gateways on one PostgreSQL --------------------------------------------------

GATEWAYS = 4
TAKES = 50  # per gateway
STOCK = 300  # one-time keys of each kind: more than all the takes, so each take gets one


@pytest.fixture
async def four_gateways(pg_database: str) -> AsyncIterator[list[Any]]:
    from roost.store.postgres import PostgresStore

    stores = [PostgresStore(pg_database) for _ in range(GATEWAYS)]
    for s in stores:
        await s.open()
    for name in USERS:
        await stores[0].add_user(name, token_hash(name), NOW)
    try:
        yield stores
    finally:
        for s in stores:
            await s.close()


@pytest.mark.postgres
async def test_gateways_taking_at_once_never_hand_out_a_key_twice(four_gateways: list[Any]) -> None:
    ident = Identity.generate()
    first = four_gateways[0]
    for n in range(STOCK // 100):
        ids = range(n * 100 + 1, n * 100 + 101)
        await first.put_keys(keys_of("alice", ident, ec=ids, kem=ids, last=5000))

    async def gateway(store: Any) -> list[Any]:
        # Every take of this gateway in flight at once: each its own transaction.
        return [d[0] for d in await asyncio.gather(*(store.take_keys("alice") for _ in range(TAKES)))]

    results = await asyncio.gather(*(gateway(s) for s in four_gateways))
    taken = [t for r in results for t in r]
    ec_ids = [t.prekey[0] for t in taken if t.prekey is not None]
    kem_ids = [t.kem[0] for t in taken if not t.kem_last_resort]
    assert len(taken) == GATEWAYS * TAKES
    assert len(ec_ids) == len(set(ec_ids)) == GATEWAYS * TAKES  # each once, and none went without
    assert len(kem_ids) == len(set(kem_ids)) == GATEWAYS * TAKES
    left = STOCK - GATEWAYS * TAKES
    assert await first.key_stock("alice", 1) == KeyStock(left, left, True)
    handed = set(ec_ids)
    rows = await first._read(lambda c: c.fetch("SELECT id FROM key_prekeys WHERE user_name = 'alice'"))
    assert {r["id"] for r in rows} == set(range(1, STOCK + 1)) - handed


@pytest.mark.postgres
async def test_gateways_draining_the_stock_at_once_hand_out_each_key_once(four_gateways: list[Any]) -> None:
    """More takes than keys: every key goes out exactly once, the rest get none."""
    await four_gateways[0].put_keys(
        keys_of("alice", Identity.generate(), ec=range(1, 101), kem=range(1, 101))
    )
    results = await asyncio.gather(*(s.take_keys("alice") for s in four_gateways for _ in range(TAKES)))
    ec_ids = [d[0].prekey[0] for d in results if d[0].prekey is not None]
    kem_ids = [d[0].kem[0] for d in results if not d[0].kem_last_resort]
    assert sorted(ec_ids) == list(range(1, 101))
    assert sorted(kem_ids) == list(range(1, 101))
    assert await four_gateways[1].key_stock("alice", 1) == KeyStock(0, 0, True)


@pytest.mark.postgres
async def test_a_schema_5_database_gets_the_key_directory(pg_empty_database: str) -> None:
    import asyncpg

    from roost.store.postgres import SCHEMA_VERSION, PostgresStore, migrate

    await migrate(pg_empty_database)
    conn = await asyncpg.connect(pg_empty_database)
    try:  # as schema 5 had it
        await conn.execute("DROP TABLE key_devices, key_prekeys, key_kem_prekeys, blobs")
        await conn.execute("DROP FUNCTION roost_put_keys, roost_take_keys")
        await conn.execute("UPDATE roost_schema SET version = 5")
    finally:
        await conn.close()
    assert await migrate(pg_empty_database) == SCHEMA_VERSION == 7
    store = PostgresStore(pg_empty_database)
    await store.open()
    try:
        await store.add_user("alice", token_hash("alice"), NOW)
        await store.put_keys(keys_of("alice", Identity.generate()))
        assert (await store.take_keys("alice"))[0].prekey is not None
    finally:
        await store.close()


@pytest.mark.postgres
async def test_key_uploads_waiting_on_a_lock_leave_connections_for_logins(pg_database: str) -> None:
    """Key writes block on a user's lock and on commits; however many are in
    flight, a token lookup (a login) still gets a pooled connection."""
    import asyncpg

    from roost.store.postgres import PostgresStore
    from roost.store.postgres_keys import KEYS_LOCK_CLASS

    store = PostgresStore(pg_database, connect_timeout=2.0)
    await store.open()
    holder = await asyncpg.connect(pg_database)
    try:
        await store.add_user("alice", token_hash("alice"), NOW)
        await store.add_user("bob", token_hash("bob"), NOW)
        # What every upload for alice needs, held elsewhere: they all wait inside PostgreSQL.
        await holder.execute("SELECT pg_advisory_lock($1, hashtext('alice'))", KEYS_LOCK_CLASS)
        ident = Identity.generate()
        uploads = [
            asyncio.ensure_future(store.put_keys(keys_of("alice", ident))) for _ in range(2 * store.pool_size)
        ]
        await asyncio.sleep(0.3)
        assert not any(u.done() for u in uploads)
        assert await asyncio.wait_for(store.user_by_token(token_hash("bob")), 1.5) == "bob"
        await holder.execute("SELECT pg_advisory_unlock($1, hashtext('alice'))", KEYS_LOCK_CLASS)
        results = await asyncio.gather(*uploads, return_exceptions=True)
        # Each either stored (the same keys again are refused as a duplicate) or
        # was refused in time for want of a slot: none hangs, none is lost unanswered.
        assert any(isinstance(r, KeyStock) for r in results)
    finally:
        await holder.close()
        await store.close()
