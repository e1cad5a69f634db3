"""The key directory's fetch limits: per requester and target, and per requester.

A whole group's sessions (a sender key for 1,024 members) fit in the
per-requester burst; draining one user's one-time keys does not fit in the
per-target one. Small limits here so the test stays quick.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from roost.core.tokens import hash_token
from roost.protocol import frames as f
from roost.protocol.codec import encode
from roost.registry.memory import MemoryRegistry
from roost.service.chat import ChatService, ServiceConfig, now_ms
from roost.service.keys import KeyLimits
from roost.store.sqlite import SqliteStore
from tests.service.test_invariants import MemorySink, settle

USERS = ("alice", "bob", "carol", "dave", "erin")


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[ChatService]:
    store = SqliteStore(tmp_path / "db.sqlite")
    await store.open()
    for name in USERS:
        await store.add_user(name, hash_token(name), now_ms())
    limits = KeyLimits(pair_rate=0.0001, pair_burst=2, fetch_rate=0.0001, fetch_burst=3)
    svc = ChatService(store, MemoryRegistry(), ServiceConfig(rate=0, keys=limits))
    yield svc
    await svc.stop()
    await store.close()


async def answers(service: ChatService, sink: MemorySink, asks: list[tuple[str, str]]) -> dict[str, str]:
    """ref -> the error code each fetch got (no one has keys: no_keys unless limited)."""
    session = await service.connect("alice", sink)
    for ref, user in asks:
        service.handle(session, encode(f.KeysGet(user=user, ref=ref)))
    await settle(lambda: len(sink.of(f.Error)) == len(asks))
    await asyncio.sleep(0.05)
    return {e.ref: e.code for e in sink.of(f.Error)}


async def test_one_target_is_limited_apart_from_the_others(service: ChatService) -> None:
    got = await answers(service, MemorySink(), [("1", "bob"), ("2", "bob"), ("3", "bob"), ("4", "carol")])
    assert got == {"1": "no_keys", "2": "no_keys", "3": "rate_limited", "4": "no_keys"}


async def test_a_requester_is_limited_over_all_targets(service: ChatService) -> None:
    got = await answers(service, MemorySink(), [("1", "bob"), ("2", "carol"), ("3", "dave"), ("4", "erin")])
    assert got == {"1": "no_keys", "2": "no_keys", "3": "no_keys", "4": "rate_limited"}
