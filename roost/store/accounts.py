"""Open a store from its location, and create accounts in bulk (tools and tests).

A location is a ``postgresql://`` DSN (cluster mode) or an embedded data
directory. ``roost verify`` and ``roost bench`` create their users this way,
straight through the store: one group commit for all of them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from roost.core.tokens import hash_token, new_token


def open_store(location: str | Path) -> Any:
    """A (not yet opened) store for a DSN or a data directory."""
    spec = str(location)
    if spec.startswith(("postgresql://", "postgres://")):
        from roost.store.postgres import PostgresStore

        return PostgresStore(spec)
    from roost.store.sqlite import SqliteStore, database_path

    return SqliteStore(database_path(Path(spec)))


async def add_users(location: str | Path, names: list[str]) -> dict[str, str]:
    """Create ``names`` and return name -> bearer token."""
    store = open_store(location)
    tokens = {name: new_token() for name in names}
    await store.open()
    try:
        now = int(time.time() * 1000)  # creation time, milliseconds (as the service stamps it)
        futures = [store.add_user(name, hash_token(token), now) for name, token in tokens.items()]
        for future in futures:
            await future
    finally:
        await store.close()
    return tokens


__all__ = ["add_users", "new_token", "open_store"]
