"""A database made by the previous schema (1: no account state) opens and upgrades."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from roost.store.sqlite import SCHEMA_VERSION, SqliteStore

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
    assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    check.close()
