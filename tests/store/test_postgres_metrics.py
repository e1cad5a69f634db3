"""PostgreSQL pool waits: every acquire is measured, and a wait behind a busy
pool shows in ``roost_store_pool_wait_seconds`` (a throwaway PostgreSQL)."""

from __future__ import annotations

import asyncio

from roost.core.metrics import Metrics
from roost.store.base import SendStream
from roost.store.postgres import PostgresStore

NOW = 1_700_000_000_000
HOLD = 0.3  # seconds the only read connection stays busy


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_pool_waits_are_measured(pg_database: str) -> None:
    metrics = Metrics()
    store = PostgresStore(pg_database, pool_size=1, metrics=metrics)
    await store.open()
    try:
        for name in ("alice", "bob"):
            await store.add_user(name, name.encode(), NOW)
        fut = store.append("alice", "m1", "text/plain", b"x", NOW, to="bob", stream=SendStream())
        await asyncio.wait_for(fut, 10)
        assert sample(metrics, "roost_store_pool_wait_seconds_count", pool="write") >= 1

        reads = sample(metrics, "roost_store_pool_wait_seconds_count", pool="read")
        assert await store.user_by_token(b"alice") == "alice"
        assert sample(metrics, "roost_store_pool_wait_seconds_count", pool="read") == reads + 1

        # The pool's one read connection is busy for HOLD seconds: a read waits.
        waited = sample(metrics, "roost_store_pool_wait_seconds_sum", pool="read")
        pool = store._pool
        assert pool is not None
        async with pool.acquire():
            read = asyncio.ensure_future(store.user_by_token(b"bob"))
            await asyncio.sleep(HOLD)
            assert not read.done()
        assert await asyncio.wait_for(read, 10) == "bob"
        assert sample(metrics, "roost_store_pool_wait_seconds_sum", pool="read") - waited >= HOLD * 0.9
    finally:
        await store.close()
