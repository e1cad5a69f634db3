"""Create many accounts quickly (one store transaction) for tests that need hundreds."""

from __future__ import annotations

import asyncio
import secrets

from roost.core.tokens import hash_token
from roost.service.chat import now_ms
from roost.store.sqlite import SqliteStore, database_path
from tests.e2e.cluster import ClusterServer
from tests.e2e.helpers import AnyServer, add_users_pg


async def add_users(srv: AnyServer, names: list[str]) -> dict[str, str]:
    """Create ``names`` directly in the server's database; returns name -> token."""
    tokens = {name: "rt_" + secrets.token_urlsafe(24) for name in names}
    if isinstance(srv, ClusterServer):
        await add_users_pg(srv.dsn, tokens)
        return tokens
    store = SqliteStore(database_path(srv.data_dir))
    await store.open()
    try:
        await asyncio.gather(*(store.add_user(n, hash_token(t), now_ms()) for n, t in tokens.items()))
    finally:
        await store.close()
    return tokens
