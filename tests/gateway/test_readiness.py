"""The readiness check's cache: a load balancer polling /readyz costs one
store round trip per ``ttl``, however many polls arrive (real SQLite store)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from roost.cli.main import build_parser
from roost.gateway.readiness import Readiness
from roost.registry.memory import MemoryRegistry
from roost.store.sqlite import SqliteStore, database_path


class CountingStore(SqliteStore):
    reads = 0

    async def user_by_token(self, token_hash: bytes) -> str | None:
        self.reads += 1
        return await super().user_by_token(token_hash)


async def test_concurrent_and_repeated_polls_share_one_check(tmp_path: Path) -> None:
    store = CountingStore(database_path(tmp_path))
    await store.open()
    try:
        readiness = Readiness(store, MemoryRegistry(), cluster=False, ttl=60.0)
        assert await asyncio.gather(*(readiness.reason() for _ in range(50))) == [None] * 50
        assert [await readiness.reason() for _ in range(50)] == [None] * 50
        assert store.reads == 1
    finally:
        await store.close()


async def test_checks_again_after_ttl_and_reports_a_closed_store(tmp_path: Path) -> None:
    store = CountingStore(database_path(tmp_path))
    await store.open()
    readiness = Readiness(store, MemoryRegistry(), cluster=False, ttl=0.0)
    assert await readiness.reason() is None
    await store.close()
    reason = await readiness.reason()
    assert reason is not None and reason.startswith("store unavailable"), reason
    assert store.reads == 2


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
def test_drain_seconds_refuses_bad_values(value: str) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--drain-seconds", value])
    assert exited.value.code == 2


def test_drain_seconds_accepts_zero() -> None:
    assert build_parser().parse_args(["serve", "--drain-seconds", "0"]).drain_seconds == 0.0
