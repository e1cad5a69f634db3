"""Create many accounts quickly (one store transaction) for tests that need hundreds."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

from roost.service.chat import hash_token, now_ms
from roost.store.sqlite import SqliteStore, database_path


async def add_users(data_dir: Path, names: list[str]) -> dict[str, str]:
    """Create ``names`` directly in the server's database; returns name -> token."""
    tokens = {name: secrets.token_urlsafe(24) for name in names}
    store = SqliteStore(database_path(data_dir))
    await store.open()
    try:
        await asyncio.gather(*(store.add_user(n, hash_token(t), now_ms()) for n, t in tokens.items()))
    finally:
        await store.close()
    return tokens
