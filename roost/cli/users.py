"""``roost user list / token reset / disable / enable / remove``: account administration.

Embedded (``--data-dir``): through the running server's admin socket in the
data directory, so it closes the account's connection itself; with no server
running, straight on the database. Cluster (``--store postgresql://...``):
on PostgreSQL, then through Redis (``--registry``) to every gateway. The
operations themselves are in ``roost.service.admin``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from roost.protocol.errors import ErrorCode, ProtocolError
from roost.service import admin
from roost.store.base import StoreUnavailable

EXIT_REFUSED = 1  # unknown user, store or server unreachable
EXIT_USAGE = 2


def register(users: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the administration commands to ``roost user``."""
    p = users.add_parser("list", help="every account: name, created, state, last seen, online")
    _location(p, mutating=False)
    p.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    p.set_defaults(func=_list)

    token = users.add_parser("token", help="bearer tokens")
    tokens = token.add_subparsers(dest="token_cmd", required=True)
    p = tokens.add_parser(
        "reset", help="a new token (the last line printed); the old one stops working, its connection closes"
    )
    p.add_argument("name")
    _location(p)
    p.set_defaults(func=_token_reset)

    for cmd, text in (
        ("disable", "the account cannot log in and its connection closes; messages to it still queue"),
        ("enable", "undo disable"),
        ("remove", "delete the account for good: out of every group, inbox and keys gone, name never reused"),
    ):
        p = users.add_parser(cmd, help=text)
        p.add_argument("name")
        _location(p)
        p.set_defaults(func=_change, change=cmd)


def _location(p: argparse.ArgumentParser, mutating: bool = True) -> None:
    p.add_argument("--data-dir", default="roost-data", help="embedded: the server's data directory")
    p.add_argument("--store", default=None, help="cluster mode: postgresql://... instead of --data-dir")
    p.add_argument(
        "--registry",
        default=None,
        help="cluster mode: redis://... of the gateways"
        + (" (required: it closes the account's connection)" if mutating else " (for the online column)"),
    )


class Failed(Exception):
    """A one-line error for the user."""


# -- running an operation where the accounts are -----------------------------------------


Operation = Callable[[Any, Any], Awaitable[Any]]  # (store, notifier) -> result


async def _run(args: argparse.Namespace, request: dict[str, Any], operation: Operation) -> Any:
    if args.store:
        return await _run_cluster(args, operation)
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise Failed(f"no data directory {data_dir} (give the server's --data-dir)")
    try:
        return await _ask_server(admin.admin_socket_path(data_dir), request)
    except (FileNotFoundError, ConnectionRefusedError):
        pass  # no server running: change the database directly, nobody is connected
    from roost.store.sqlite import SqliteStore, database_path

    path = database_path(data_dir)
    if not path.exists():
        raise Failed(f"no database in {data_dir} (give the server's --data-dir)")
    store = SqliteStore(path)
    await store.open()
    try:
        return await operation(store, admin.Offline())
    finally:
        await store.close()


async def _run_cluster(args: argparse.Namespace, operation: Operation) -> Any:
    from roost.store.postgres import PostgresStore

    notifier: Any = admin.Offline()
    if args.registry:
        from roost.registry.redis import RedisNotifier

        notifier = RedisNotifier(args.registry)
    store = PostgresStore(args.store, pool_size=1)
    try:
        await store.open()
        try:
            return await operation(store, notifier)
        finally:
            await store.close()
    finally:
        if args.registry:
            await notifier.close()


async def _ask_server(path: Path, request: dict[str, Any]) -> Any:
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 60)
    finally:
        writer.close()
    if not line:
        raise Failed(f"the server at {path} closed the admin connection without an answer")
    answer = json.loads(line)
    if "error" in answer:
        raise ProtocolError(ErrorCode(answer["error"]), answer.get("message", ""))
    return answer["ok"]


def _execute(args: argparse.Namespace, what: str, request: dict[str, Any], operation: Operation) -> Any:
    """Run it; print a one-line error and raise SystemExit on failure."""
    try:
        return asyncio.run(_run(args, request, operation))
    except ProtocolError as exc:
        print(f"roost user {what}: {exc.code.value}: {exc.message}", file=sys.stderr)
        raise SystemExit(EXIT_REFUSED) from None
    except Failed as exc:
        print(f"roost user {what}: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_REFUSED) from None
    except (StoreUnavailable, OSError) as exc:
        print(f"roost user {what}: cannot reach the store or server: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_REFUSED) from None
    except Exception as exc:  # e.g. Redis unreachable
        print(f"roost user {what}: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_REFUSED) from None


def _needs_registry(args: argparse.Namespace, what: str) -> None:
    if args.store and not args.registry:
        print(
            f"roost user {what}: cluster mode needs --registry redis://... to close the account's connection",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_USAGE)


# -- the commands ------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    rows = _execute(args, "list", {"op": "list"}, admin.list_users)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'NAME':32}  {'CREATED':20}  {'STATE':8}  {'LAST SEEN':20}  ONLINE")
    for row in rows:
        online = {None: "?", True: "yes", False: "no"}[row["online"]]
        print(
            f"{row['name']:32}  {_when(row['created'] / 1000):20}  {row['state']:8}  "
            f"{_when(row['last_seen']):20}  {online}"
        )
    return 0


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _token_reset(args: argparse.Namespace) -> int:
    from roost.core.tokens import hash_token

    _needs_registry(args, "token reset")
    # The same form as `roost user add`: never starts with '-'.
    token = "rt_" + secrets.token_urlsafe(32)
    digest = hash_token(token)
    request = {"op": "token_reset", "name": args.name, "token_hash": digest.hex()}
    _execute(
        args,
        "token reset",
        request,
        lambda store, notifier: admin.reset_token(store, notifier, args.name, digest),
    )
    print(f"new token for {args.name} (shown once); the old one no longer works:")
    print(token)
    return 0


def _change(args: argparse.Namespace) -> int:
    from roost.service.chat import now_ms

    what = args.change
    _needs_registry(args, what)
    operation: Operation
    if what == "remove":
        operation = lambda store, notifier: admin.remove_user(store, notifier, args.name, now_ms())  # noqa: E731
    else:
        enable = what == "enable"
        operation = lambda store, notifier: admin.set_enabled(store, notifier, args.name, enable)  # noqa: E731
    result = _execute(args, what, {"op": what, "name": args.name}, operation)
    if what == "remove":
        print(f"removed {args.name}: out of {len(result)} group(s), inbox deleted; the name is not reused")
    else:
        print(f"{what}d {args.name}")
    return 0
