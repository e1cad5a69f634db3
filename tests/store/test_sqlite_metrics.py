"""The SQLite writer's metrics: commit batch size and duration, store errors by kind."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from roost.core.metrics import Metrics
from roost.store import sqlite as sqlite_store
from roost.store.base import SendStream, StoreUnavailable
from roost.store.sqlite import SqliteStore

NOW = 1_700_000_000_000


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def _opened(path: Path) -> tuple[SqliteStore, Metrics]:
    metrics = Metrics()
    store = SqliteStore(path, metrics=metrics)
    await store.open()
    for name in ("alice", "bob"):
        await store.add_user(name, name.encode(), NOW)
    return store, metrics


async def _send(store: SqliteStore, msg_id: str) -> Any:
    fut = store.append("alice", msg_id, "text/plain", b"x", NOW, to="bob", stream=SendStream())
    return await asyncio.wait_for(fut, 5)


async def test_a_commit_is_measured(tmp_path: Path) -> None:
    store, metrics = await _opened(tmp_path / "roost.sqlite")
    try:
        batches = sample(metrics, "roost_store_commit_batch_size_count")
        ops = sample(metrics, "roost_store_commit_batch_size_sum")
        commits = sample(metrics, "roost_store_commit_seconds_count")
        await _send(store, "m1")
        assert sample(metrics, "roost_store_commit_batch_size_count") == batches + 1
        assert sample(metrics, "roost_store_commit_batch_size_sum") == ops + 1
        assert sample(metrics, "roost_store_commit_seconds_count") == commits + 1
        assert sample(metrics, "roost_store_commit_seconds_sum") > 0
    finally:
        await store.close()


async def test_a_rolled_back_batch_counts_as_commit_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, metrics = await _opened(tmp_path / "roost.sqlite")
    finish = store._finish_seqs
    blown: list[bool] = []

    def fail_once(conn: sqlite3.Connection) -> None:
        if not blown:
            blown.append(True)
            raise sqlite3.OperationalError("planted: disk I/O error")
        finish(conn)

    monkeypatch.setattr(store, "_finish_seqs", fail_once)
    try:
        with pytest.raises(StoreUnavailable):
            await _send(store, "m1")
        assert sample(metrics, "roost_store_errors_total", kind="commit_failed") == 1
        assert sample(metrics, "roost_store_errors_total", kind="writer_failed") == 0
        await _send(store, "m2")  # the writer goes on; nothing more counted
        assert sample(metrics, "roost_store_errors_total", kind="commit_failed") == 1
    finally:
        await store.close()


async def test_a_writer_failure_counts_as_writer_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, metrics = await _opened(tmp_path / "roost.sqlite")
    merge = sqlite_store._merge_cumulative
    blown: list[bool] = []

    def explode_once(batch: list[Any]) -> None:
        if not blown:
            blown.append(True)
            raise RuntimeError("planted: the writer fails before BEGIN")
        merge(batch)

    monkeypatch.setattr(sqlite_store, "_merge_cumulative", explode_once)
    try:
        with pytest.raises(StoreUnavailable):
            await _send(store, "m1")
        assert sample(metrics, "roost_store_errors_total", kind="writer_failed") == 1
        assert sample(metrics, "roost_store_errors_total", kind="commit_failed") == 0
    finally:
        await store.close()


@pytest.mark.postgres
async def test_postgres_commits_and_failed_batches_are_measured(
    pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from roost.store.postgres import PostgresStore

    metrics = Metrics()
    store = PostgresStore(pg_database, metrics=metrics)
    await store.open()
    try:
        for name in ("alice", "bob"):
            await store.add_user(name, name.encode(), NOW)
        commits = sample(metrics, "roost_store_commit_seconds_count")
        await asyncio.wait_for(
            store.append("alice", "m1", "text/plain", b"x", NOW, to="bob", stream=SendStream()), 10
        )
        assert sample(metrics, "roost_store_commit_seconds_count") == commits + 1
        assert sample(metrics, "roost_store_commit_batch_size_sum") >= 1

        execute = store._execute
        blown: list[bool] = []

        async def fail_once(args: Any) -> Any:
            if not blown:
                blown.append(True)
                raise ConnectionResetError("planted: the connection dropped")
            return await execute(args)

        monkeypatch.setattr(store, "_execute", fail_once)
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(
                store.append("alice", "m2", "text/plain", b"x", NOW, to="bob", stream=SendStream()), 10
            )
        assert sample(metrics, "roost_store_errors_total", kind="commit_failed") == 1
    finally:
        await store.close()
