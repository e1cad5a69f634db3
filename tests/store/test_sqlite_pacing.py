"""Commit pacing of the SQLite writer: under concurrent load (operations
queued while a batch ran, or a batch of several) the next commit starts no
sooner than ``commit_interval`` after the previous one began, so that each
commit carries more operations; a lone client's requests are committed at once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from roost.store.sqlite import SqliteStore

from .conftest import NOW, USERS, WriterGate, token_hash


async def opened(path: Path, interval: float) -> SqliteStore:
    store = SqliteStore(path, commit_interval=interval)
    await store.open()
    for name in USERS:
        await store.add_user(name, token_hash(name), NOW)
    return store


async def test_an_operation_that_finds_the_writer_idle_is_committed_at_once(tmp_path) -> None:
    store = await opened(tmp_path / "roost.sqlite", interval=2.0)
    try:
        await store.append("alice", "a1", "text/plain", b"x", NOW, to="bob")
        started = time.monotonic()  # the last commit began just now
        await store.append("alice", "a2", "text/plain", b"x", NOW, to="bob")
        assert time.monotonic() - started < 1.0, "an idle writer waited out the interval"
    finally:
        await store.close()


async def test_operations_queued_behind_a_commit_wait_for_the_interval(tmp_path) -> None:
    store = await opened(tmp_path / "roost.sqlite", interval=0.5)
    try:
        commits = store.commits
        async with WriterGate(store):  # the gate's own commit begins here
            began = time.monotonic()
            queued = [store.append("alice", f"a{i}", "text/plain", b"x", NOW, to="bob") for i in range(20)]
        stored = await asyncio.gather(*queued)
        assert time.monotonic() - began >= 0.4, "the queued batch did not wait for the interval"
        assert [m.seq for m in stored] == list(range(1, 21))
        assert store.commits - commits == 2, "the queued operations did not share one commit"
    finally:
        await store.close()


async def test_after_a_batch_of_several_the_next_operation_is_paced(tmp_path) -> None:
    """Concurrent clients whose requests share a batch come back with their
    next ones after the answers: the writer still counts as under load."""
    store = await opened(tmp_path / "roost.sqlite", interval=0.5)
    try:
        first = [store.append("alice", f"a{i}", "text/plain", b"x", NOW, to="bob") for i in range(5)]
        await asyncio.gather(*first)  # one batch (the writer was idle), begun just now
        answered = time.monotonic()
        await store.append("alice", "next", "text/plain", b"x", NOW, to="bob")
        assert time.monotonic() - answered >= 0.3, "the operation after a batch of five was not paced"
    finally:
        await store.close()


async def test_close_does_not_wait_for_the_interval(tmp_path) -> None:
    store = await opened(tmp_path / "roost.sqlite", interval=30.0)
    async with WriterGate(store):
        pending = store.append("alice", "a1", "text/plain", b"x", NOW, to="bob")
        closing = asyncio.ensure_future(store.close())
        await asyncio.sleep(0.05)
    await asyncio.wait_for(asyncio.gather(pending, closing), 5)
