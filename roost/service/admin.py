"""Account administration: ``roost user list / token reset / disable / enable / remove``.

What each operation changes in the store is the same in every mode; what
differs is who closes the account's open connection and tells the other
members, the ``Notifier``:

* embedded, server running: the server itself, through its admin socket
  (``AdminServer`` below; ``roost/cli/users.py`` is the client side);
* embedded, no server: nobody needs telling (``Offline``);
* cluster: the CLI writes PostgreSQL and broadcasts through Redis to every
  gateway (``roost.registry.redis.RedisNotifier``).

The store change commits first, so a connection that authenticates after it
cannot succeed, and then the open connection is closed with 4008.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from roost.core.ids import is_valid_user_name
from roost.core.membership import ADMINISTRATOR
from roost.protocol.errors import ErrorCode, ProtocolError
from roost.store.base import ACTIVE, DISABLED, REMOVED, Account, GroupSnapshot, Store, StoreUnavailable

log = logging.getLogger("roost.admin")

ADMIN_SOCKET = "admin.sock"  # in the data directory of an embedded server
# A socket path must fit in sun_path (~107 bytes). For a data directory deeper
# than that, the socket goes to a private temporary directory and this file
# in the data directory names it.
ADMIN_SOCKET_POINTER = "admin.sock.path"
MAX_SOCKET_PATH = 100
TOKEN_HASH_BYTES = 32  # roost.core.tokens.hash_token: SHA-256


def admin_socket_path(data_dir: Path) -> Path:
    """Where the running server of ``data_dir`` listens (it may not be running)."""
    pointer = data_dir / ADMIN_SOCKET_POINTER
    if pointer.exists():
        return Path(pointer.read_text().strip())
    return data_dir / ADMIN_SOCKET


class Notifier(Protocol):
    async def revoke(self, user: str, reason: str) -> None:
        """Close ``user``'s open connection (4008), wherever it is."""

    async def changed(self, snapshots: list[GroupSnapshot]) -> None:
        """Deliver these membership changes (events, receipts) to whoever is connected."""

    async def online(self, users: list[str]) -> set[str] | None:
        """Which of ``users`` are connected (None: cannot tell)."""


class Offline:
    """No server is running: nobody is connected, nothing to tell."""

    async def revoke(self, user: str, reason: str) -> None:
        return None

    async def changed(self, snapshots: list[GroupSnapshot]) -> None:
        return None

    async def online(self, users: list[str]) -> set[str] | None:
        return None


def check_name(name: str) -> None:
    if not is_valid_user_name(name):
        raise ProtocolError(ErrorCode.UNKNOWN_USER, f"no such user: {name!r} (not a valid name)")


async def list_users(store: Store, notifier: Notifier) -> list[dict[str, Any]]:
    accounts: list[Account] = await store.list_users()
    online = await notifier.online([a.name for a in accounts if a.state == ACTIVE])
    rows = []
    for account in accounts:
        row = asdict(account)
        row["online"] = None if online is None else account.name in online
        rows.append(row)
    return rows


async def reset_token(store: Store, notifier: Notifier, name: str, token_hash: bytes) -> None:
    check_name(name)
    await store.set_token(name, token_hash)
    await notifier.revoke(name, "token reset")


async def set_enabled(store: Store, notifier: Notifier, name: str, enabled: bool) -> None:
    check_name(name)
    await store.set_user_state(name, ACTIVE if enabled else DISABLED)
    if not enabled:
        await notifier.revoke(name, "account disabled")


async def remove_user(store: Store, notifier: Notifier, name: str, now: int) -> list[str]:
    """Remove ``name`` for good; returns the groups it was removed from.

    In order, each step safe to repeat (a removal cut short is finished by
    running it again): the account is marked removed (its token stops
    working), its connection is closed, it is removed from every group (the
    usual ``removed`` event, actor ``""``: the administrator; receipts the
    removal completes go out), then its member rows (its inbox), pending
    receipts and published keys are deleted. Messages it sent stay in the others' histories.
    """
    check_name(name)
    await store.set_user_state(name, REMOVED)
    await notifier.revoke(name, "account removed")
    groups = await store.active_groups(name)
    snapshots = [await store.remove_members(ADMINISTRATOR, group, [name], now) for group in groups]
    await notifier.changed(snapshots)
    await store.purge_member(name)
    return groups


# -- the embedded server's admin socket -----------------------------------------------


Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class AdminServer:
    """A Unix socket in the data directory (mode 0600: whoever may read the
    database may administer it). One JSON request per line, one JSON answer:
    ``{"ok": result}`` or ``{"error": code, "message": text}``."""

    def __init__(self, data_dir: Path, store: Store, notifier: Notifier, now: Callable[[], int]) -> None:
        self.data_dir = data_dir
        self.path = data_dir / ADMIN_SOCKET
        self.store = store
        self.notifier = notifier
        self.now = now
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        pointer = self.data_dir / ADMIN_SOCKET_POINTER
        pointer.unlink(missing_ok=True)  # left by a server that was killed
        if len(os.fsencode(self.path.absolute())) > MAX_SOCKET_PATH:
            self.path = Path(tempfile.mkdtemp(prefix="roost-admin-")) / ADMIN_SOCKET  # mode 0700
            pointer.write_text(f"{self.path}\n")
        self.path.unlink(missing_ok=True)  # left by a server that was killed
        # Bound 0600 before it listens, as roost/client/local.py does: not by umask,
        # which is process-wide and would leak to what runs meanwhile.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
        except BaseException:
            sock.close()
            raise
        self._server = await asyncio.start_unix_server(self._client, sock=sock)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self.path.unlink(missing_ok=True)
            if self.path.parent != self.data_dir:
                self.path.parent.rmdir()
            (self.data_dir / ADMIN_SOCKET_POINTER).unlink(missing_ok=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                # A line over the reader's limit is a ValueError too.
                line = await asyncio.wait_for(reader.readline(), 10)
                answer = {"ok": await self.handle(json.loads(line))}
            except ProtocolError as exc:
                answer = {"error": exc.code.value, "message": exc.message}
            except StoreUnavailable as exc:
                answer = {"error": ErrorCode.UNAVAILABLE.value, "message": str(exc)}
            except (ValueError, KeyError, TypeError) as exc:
                answer = {"error": ErrorCode.BAD_FRAME.value, "message": f"bad request: {exc}"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except Exception:
            log.exception("admin request failed")
        finally:
            writer.close()

    async def handle(self, request: dict[str, Any]) -> Any:
        op, name = request["op"], str(request.get("name", ""))
        if op == "list":
            return await list_users(self.store, self.notifier)
        if op == "token_reset":
            token_hash = bytes.fromhex(request["token_hash"])
            if len(token_hash) != TOKEN_HASH_BYTES:  # any other would lock the account out
                raise ValueError(f"token_hash is not a SHA-256 ({TOKEN_HASH_BYTES} bytes)")
            return await reset_token(self.store, self.notifier, name, token_hash)
        if op in ("disable", "enable"):
            return await set_enabled(self.store, self.notifier, name, op == "enable")
        if op == "remove":
            return await remove_user(self.store, self.notifier, name, self.now())
        raise ProtocolError(ErrorCode.BAD_FRAME, f"unknown admin operation {op!r}")
