"""Helpers for the cluster tests: accounts in PostgreSQL, clients pinned to a gateway,
a look into Redis and PostgreSQL, and the exactly-once checks."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import redis

from roost.client import Client, Message
from roost.core.tokens import hash_token
from roost.devcluster.run import DevCluster
from roost.service.chat import now_ms
from roost.store.postgres import PostgresStore
from tests.e2e.helpers import RawWS
from tests.e2e.helpers import collect as collect_events


def token_for(name: str) -> str:
    return f"cluster-token-{name}-0123456789"


async def add_users(cluster: DevCluster, users: Iterable[str]) -> dict[str, str]:
    """Create ``users`` in the cluster's PostgreSQL (as ``roost user add --store`` does); name -> token."""
    tokens = {name: token_for(name) for name in users}
    store = PostgresStore(cluster.dsn)
    await asyncio.wait_for(store.open(), 30)
    try:
        await asyncio.wait_for(
            asyncio.gather(*(store.add_user(n, hash_token(t), now_ms()) for n, t in tokens.items())), 60
        )
    finally:
        await asyncio.wait_for(store.close(), 30)
    return tokens


@dataclass(frozen=True)
class Gw:
    """What ``RawWS.open`` needs of a server: its URL."""

    url: str


def gw(cluster: DevCluster, i: int) -> Gw:
    return Gw(cluster.urls[i])


def urls_from(cluster: DevCluster, i: int, only: bool = False) -> list[str]:
    """Gateway ``i`` first, then the others in order (where the SDK fails over to)."""
    urls = cluster.urls
    return [urls[i]] if only else urls[i:] + urls[:i]


async def connect(
    cluster: DevCluster, i: int, token: str, state: Path, only: bool = False, **kwargs: Any
) -> Client:
    """An SDK client connected to gateway ``i`` (failing over to the others unless ``only``)."""
    kwargs.setdefault("backoff_base", 0.05)
    kwargs.setdefault("backoff_cap", 0.5)
    client = Client(urls_from(cluster, i, only), token, state_path=state, **kwargs)
    await client.connect(timeout=15)
    return client


async def raw(cluster: DevCluster, i: int, token: str | None = None) -> RawWS:
    return await RawWS.open(gw(cluster, i), token)


async def close_all(*clients: Client | RawWS | None) -> None:
    for c in clients:
        if c is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.close(), 10)


def redis_client(cluster: DevCluster) -> redis.Redis:
    assert cluster.redis is not None
    return redis.Redis.from_url(cluster.redis.url, socket_timeout=5)


def route_of(cluster: DevCluster, user: str) -> str | None:
    """The gateway id Redis maps ``user`` to (None: no mapping)."""
    r = redis_client(cluster)
    try:
        value = r.get(f"roost:u:{user}")
    finally:
        r.close()
    return None if value is None else value.split(b"|", 1)[0].decode()


async def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(interval)


async def db_fetch(cluster: DevCluster, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(cluster.dsn, timeout=10)
    try:
        return await asyncio.wait_for(conn.fetch(sql, *args), 30)
    finally:
        await conn.close()


async def stored(cluster: DevCluster, conv: str) -> list[tuple[int, str, str]]:
    """(seq, sender, client id) of every message of ``conv`` in PostgreSQL, by seq."""
    rows = await db_fetch(
        cluster, "SELECT seq, sender, client_id FROM messages WHERE conv = $1 ORDER BY seq", conv
    )
    return [(r["seq"], r["sender"], r["client_id"]) for r in rows]


async def collect(client: Client, n: int, timeout: float, others: list[Any] | None = None) -> list[Message]:
    """Up to ``n`` messages within ``timeout`` (other events go to ``others``)."""
    return await collect_events(client, n, timeout, Message, others)


def assert_once_in_order(got: Sequence[Message], expected_ids: Sequence[str]) -> None:
    """Each expected id exactly once, in that order, seqs ascending."""
    ids = [m.id for m in got]
    dupes = {i for i in ids if ids.count(i) > 1}
    assert not dupes, f"shown twice: {sorted(dupes)[:10]}"
    missing = set(expected_ids) - set(ids)
    assert not missing, f"{len(missing)} missing, e.g. {sorted(missing)[:10]}"
    extra = set(ids) - set(expected_ids)
    assert not extra, f"unexpected: {sorted(extra)[:10]}"
    assert ids == list(expected_ids), "order not kept"
    seqs = [m.seq for m in got]
    assert seqs == sorted(seqs), "seqs not ascending"


def per_sender_in_order(got: Sequence[Message], sent: dict[str, list[str]]) -> None:
    """Every sender's messages exactly once and in its send order (interleaving free)."""
    ids = [m.id for m in got]
    assert len(ids) == len(set(ids)), "a message was shown twice"
    seqs = [m.seq for m in got]
    assert seqs == sorted(seqs), "seqs not ascending"
    for sender, expected in sent.items():
        mine = [m.id for m in got if m.sender == sender]
        assert mine == expected, f"{sender}: {len(mine)}/{len(expected)} or out of order"


def abort_socket(client: Client) -> None:
    """Drop the SDK client's current TCP connection without a close handshake (its
    reconnect loop then moves on to the next URL)."""
    ws = client._ws
    assert ws is not None, "not connected"
    transport = ws._writer.transport  # aiohttp keeps no public handle on it
    transport.abort()


async def publish_keys(
    cluster: DevCluster, users: dict[str, tuple[str, Path]], timeout: float = 30.0
) -> None:
    """Run each user's client (name -> (token, state file)) once, until its
    end-to-end keys are on the server: a message to a user who never ran a
    client waits in the sender's outbox until they do (as tests/e2e's helper)."""

    async def one(token: str, state: Path) -> None:
        client = await connect(cluster, 0, token, state)
        try:
            await asyncio.wait_for(client.crypto.published.wait(), timeout)
        finally:
            await client.close()

    await asyncio.gather(*(one(token, state) for token, state in users.values()))
