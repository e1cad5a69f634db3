from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from roost.store.sqlite import SqliteStore

USERS = ("alice", "bob", "carol", "dave", "erin")
NOW = 1_700_000_000_000


def token_hash(name: str) -> bytes:
    return hashlib.sha256(f"token-of-{name}".encode()).digest()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "roost.sqlite"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(db_path)
    await s.open()
    for name in USERS:
        await s.add_user(name, token_hash(name), NOW)
    yield s
    await s.close()


class WriterGate:
    """Holds the writer thread inside a commit, so every write submitted while
    the gate is closed lands in one and the same next batch."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self.started = threading.Event()
        self.release = threading.Event()
        self.future: asyncio.Future[Any] | None = None

    async def __aenter__(self) -> WriterGate:
        def hold(_conn: Any) -> None:
            self.started.set()
            self.release.wait(10)

        self.future = self.store._submit(hold)
        assert await asyncio.to_thread(self.started.wait, 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self.future is not None
        await self.future


@pytest.fixture
def gate(store: SqliteStore) -> Callable[[], WriterGate]:
    """``async with gate(): ...`` -- writes submitted in the body commit as one batch."""
    return lambda: WriterGate(store)
