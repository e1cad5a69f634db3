"""Blob metadata in both stores (SQLite, and a throwaway PostgreSQL): the quota
check is atomic, a sweeper's claim and a download URL exclude each other,
and a cluster-shaped gateway (PostgreSQL + S3) carries a whole upload."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from roost.protocol.errors import ProtocolError
from roost.store.blobmeta import BlobRecord
from roost.store.sqlite import SqliteStore
from tests.media.conftest import start_gateway, stop_harness

NOW = 1_700_000_000_000


@pytest.fixture(params=["sqlite", "postgres"])
def meta_dsn(request: pytest.FixtureRequest) -> str | None:
    """None: SQLite; else a migrated PostgreSQL database's DSN."""
    return None if request.param == "sqlite" else str(request.getfixturevalue("pg_database"))


@pytest.fixture
async def meta(meta_dsn: str | None, tmp_path: Path) -> AsyncIterator[Any]:
    if meta_dsn is None:
        store: Any = SqliteStore(tmp_path / "roost.sqlite")
    else:
        from roost.store.postgres import PostgresStore

        store = PostgresStore(meta_dsn)
    await store.open()
    yield store
    await store.close()


def rec(blob: str, owner: str = "alice", size: int = 1000) -> BlobRecord:
    return BlobRecord(blob, owner, "file", size, 512, "pending", NOW)


async def test_concurrent_uploads_never_pass_the_quota(meta: Any) -> None:
    results = await asyncio.gather(
        *(meta.blob_create(rec(f"{i:032x}"), 5000) for i in range(12)), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, ProtocolError)]
    assert len(refused) == 7 and {r.code for r in refused} == {"quota_exceeded"}
    await meta.blob_create(rec("f" * 32, owner="bob"), 5000)  # bob has his own


async def test_a_claim_and_a_download_url_exclude_each_other(meta: Any) -> None:
    blob = "a" * 32
    await meta.blob_create(rec(blob), 0)
    assert not await meta.blob_fetching(blob, NOW + 10_000)  # pending: no download URL
    await meta.blob_complete(blob, NOW)
    assert await meta.blob_fetching(blob, NOW + 10_000)
    assert await meta.blob_claim(blob, NOW + 5_000) is None  # the URL is valid then
    assert [r.blob for r in await meta.blobs_due(NOW + 20_000, NOW, NOW + 1, 10)] == [blob]
    assert await meta.blob_claim(blob, NOW + 20_000) == "complete"
    assert not await meta.blob_fetching(blob, NOW + 30_000)  # claimed: no new URL
    await meta.blob_unclaim(blob, "complete")  # (a download was running)
    assert (await meta.blob_get(blob)).state == "complete"
    assert await meta.blob_claim(blob, NOW + 20_000) == "complete"
    # A claimed row stays due (a sweeper that died after its claim is finished by the next).
    assert [r.blob for r in await meta.blobs_due(NOW + 20_000, 0, 0, 10)] == [blob]
    await meta.blob_delete(blob)
    assert await meta.blob_get(blob) is None


async def test_a_postgres_and_s3_gateway_carries_an_upload(
    tmp_path: Path, pg_database: str, seaweed: Any
) -> None:
    media = await start_gateway(tmp_path, "s3", seaweed, store_url=pg_database)
    try:
        alice, bob = await media.client("alice"), await media.client("bob")
        data = os.urandom(media.part_size + 1234)
        source = tmp_path / "up.bin"
        source.write_bytes(data)
        blob = await alice.upload_blob(source, kind="video")
        rec_ = await media.record(blob)
        assert (rec_.state, rec_.parts) == ("complete", 2)
        assert await media.gateway.blobs.raw(rec_) == data
        dest = tmp_path / "down.bin"
        await bob.download_blob(blob, dest)
        assert dest.read_bytes() == data
    finally:
        await stop_harness(media)


async def test_a_sqlite_database_from_before_media_gets_the_blobs_table(tmp_path: Path) -> None:
    import sqlite3

    from roost.store.sqlite import SCHEMA

    path = tmp_path / "roost.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA)  # every table but blobs
    conn.execute("PRAGMA user_version=3")
    conn.commit()
    conn.close()
    store = SqliteStore(path)
    await store.open()
    try:
        await store.blob_create(rec("b" * 32), 0)
        assert (await store.blob_get("b" * 32)).size == 1000
    finally:
        await store.close()


async def test_a_postgres_database_from_before_media_gets_the_blobs_table(pg_empty_database: str) -> None:
    import asyncpg

    from roost.store.blobmeta import POSTGRES_STEP
    from roost.store.postgres import PostgresStore, migrate

    await migrate(pg_empty_database)
    conn = await asyncpg.connect(pg_empty_database)
    try:  # as the schema before the media step had it
        await conn.execute("DROP TABLE blobs")
        await conn.execute("UPDATE roost_schema SET version = $1", POSTGRES_STEP - 1)
    finally:
        await conn.close()
    store = PostgresStore(pg_empty_database)
    await store.open()
    try:
        await store.blob_create(rec("b" * 32), 0)
        assert (await store.blob_get("b" * 32)).size == 1000
    finally:
        await store.close()
