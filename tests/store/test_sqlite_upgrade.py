"""Databases made by older schemas (1: no account state; 2: acked receipts
deleted) open and upgrade."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from roost.store.base import ReceiptState
from roost.store.sqlite import SCHEMA, SCHEMA_VERSION, SqliteStore

from .conftest import NOW, token_hash

SCHEMA_1_USERS = """
CREATE TABLE users (
    name TEXT PRIMARY KEY,
    token_hash BLOB NOT NULL UNIQUE,
    created INTEGER NOT NULL,
    last_seen INTEGER
);
"""


async def test_a_schema_1_database_gets_account_states(tmp_path: Path) -> None:
    path = tmp_path / "roost.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_1_USERS)
    conn.execute("INSERT INTO users VALUES (?,?,?,NULL)", ("alice", token_hash("alice"), NOW))
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()

    store = SqliteStore(path)
    await store.open()
    try:
        assert await store.user_by_token(token_hash("alice")) == "alice"
        [account] = await store.list_users()
        assert (account.name, account.state) == ("alice", "active")
        await store.set_user_state("alice", "disabled")
        assert await store.user_by_token(token_hash("alice")) is None
    finally:
        await store.close()
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
    check.close()


async def test_a_schema_2_database_keeps_its_pending_receipts(tmp_path: Path) -> None:
    path = tmp_path / "roost.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA.replace("    acked INTEGER NOT NULL DEFAULT 0,\n", ""))  # as schema 2 had it
    conn.execute("INSERT INTO receipt_pending (user, conv, rv) VALUES ('alice', 'd:alice:bob', 3)")
    conn.execute("PRAGMA user_version=2")
    conn.commit()
    conn.close()

    store = SqliteStore(path)
    await store.open()
    try:
        assert await store.pending_receipts("alice") == [ReceiptState("alice", "d:alice:bob", 3, {}, 0, 0)]
    finally:
        await store.close()
    check = sqlite3.connect(path)
    assert check.execute("SELECT rv, acked FROM receipt_pending").fetchall() == [(3, 0)]
    check.close()
