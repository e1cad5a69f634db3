"""Fixtures for the registry tests: fake sessions, a throwaway Redis, gateways on it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from roost.devcluster.redis import RedisServer, redis_server_binary
from roost.store.base import ReceiptState, StoredMessage


class FakeSession:
    """Records what a registry hands to a session (a ``SessionHandle``)."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.client = ""
        self.offered: list[tuple[StoredMessage, bytes]] = []
        self.receipts: list[ReceiptState] = []
        self.frames: list[bytes] = []
        self.replaced_count = 0

    def offer(self, message: StoredMessage, frame: bytes) -> None:
        self.offered.append((message, frame))

    def push_receipt(self, receipt: ReceiptState) -> None:
        self.receipts.append(receipt)

    def push_frame(self, frame: bytes) -> None:
        self.frames.append(frame)

    def replaced(self, by_same_client: bool = False) -> None:
        self.replaced_count += 1

    def __repr__(self) -> str:
        return f"FakeSession({self.user!r})"


def message(conv: str = "d:ann:bob", seq: int = 1, sender: str = "ann", body: bytes = b"hi") -> StoredMessage:
    return StoredMessage(conv, seq, f"c{seq}", sender, "text/plain", body, 1_700_000_000_000 + seq)


async def eventually(check: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    if redis_server_binary() is None:
        pytest.skip("redis-server not found on PATH: the Redis registry tests need it")
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


# Short timings so tests on heartbeats and restarts stay fast.
HEARTBEAT = 0.1
TTL = 0.5


@pytest.fixture
async def gateways(
    redis_server: RedisServer,
) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """``await gateways("a", "b")`` -> started RedisRegistry instances; stopped at the end."""
    from roost.registry.redis import RedisRegistry

    started: list[RedisRegistry] = []

    async def make(*names: str, **options: Any) -> Any:
        options.setdefault("heartbeat", HEARTBEAT)
        options.setdefault("ttl", TTL)
        options.setdefault("socket_timeout", 1.0)
        made = []
        for name in names:
            reg = RedisRegistry(redis_server.url, name, **options)
            await reg.start()
            started.append(reg)
            made.append(reg)
        return made[0] if len(made) == 1 else made

    yield make
    for reg in started:
        await reg.stop(timeout=1.0)


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[Any]:
    """A plain client on the test server, to look at keys and counters."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_server.url, socket_timeout=2.0)
    yield client
    await client.aclose()
