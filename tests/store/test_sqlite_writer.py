"""The SQLite writer thread must not die with a batch.

An exception that escapes ``_run_batch`` (outside its own transaction's
``try``: before ``BEGIN``, or after ``COMMIT`` while the answers are handed to
the event loop) used to end the writer thread: the batch's callers, and every
later writer, waited forever, and the server went on accepting sends it never
answered. The writer now fails that batch's callers with ``StoreUnavailable``
(breaking their send streams, as any storage failure does) and goes on.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from roost.store import sqlite as sqlite_store
from roost.store.base import SendStream, StoreUnavailable
from roost.store.sqlite import SqliteStore

NOW = 1_700_000_000_000
ANSWER_WITHIN = 2.0  # seconds; the writer answers in milliseconds


async def _opened(path: Path) -> SqliteStore:
    store = SqliteStore(path)
    await store.open()
    for name in ("alice", "bob"):
        await store.add_user(name, name.encode(), NOW)
    return store


async def _answer(fut: asyncio.Future[Any]) -> Any:
    try:
        return await asyncio.wait_for(asyncio.shield(fut), ANSWER_WITHIN)
    except TimeoutError:
        pytest.fail("the writer never answered: its thread died with the batch")


async def test_an_error_before_the_batch_fails_it_and_the_writer_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await _opened(tmp_path / "roost.sqlite")
    merge = sqlite_store._merge_cumulative
    blown = []

    def explode_once(batch: list[Any]) -> None:
        if not blown:
            blown.append(True)
            raise RuntimeError("planted: the writer fails before BEGIN")
        merge(batch)

    monkeypatch.setattr(sqlite_store, "_merge_cumulative", explode_once)
    try:
        stream = SendStream()
        first = store.append("alice", "m0", "text/plain", b"x", NOW, to="bob", stream=stream)
        with pytest.raises(StoreUnavailable):
            await _answer(first)
        assert stream.broken  # later sends of that connection must not overtake its resend
        again = await _answer(store.append("alice", "m0", "text/plain", b"x", NOW, to="bob"))
        assert (again.seq, again.duplicate) == (1, False)  # nothing of the failed batch was kept
    finally:
        await store.close()


async def test_an_error_after_commit_is_an_unknown_outcome_and_the_retry_finds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await _opened(tmp_path / "roost.sqlite")
    lost = []
    assert store._loop is not None
    loop = store._loop
    real_call = loop.call_soon_threadsafe

    def call_soon_threadsafe(fn: Any, *args: Any) -> Any:
        if fn is sqlite_store._resolve and not lost:
            lost.append(True)
            raise OSError("planted: the answer is lost after COMMIT")
        return real_call(fn, *args)

    monkeypatch.setattr(loop, "call_soon_threadsafe", call_soon_threadsafe)
    try:
        first = store.append("alice", "m0", "text/plain", b"x", NOW, to="bob")
        with pytest.raises(StoreUnavailable):
            await _answer(first)
        retry = await _answer(store.append("alice", "m0", "text/plain", b"x", NOW, to="bob"))
        assert (retry.seq, retry.duplicate) == (1, True)  # it was committed: the retry is a duplicate
        following = await _answer(store.append("alice", "m1", "text/plain", b"y", NOW, to="bob"))
        assert following.seq == 2
    finally:
        await store.close()
