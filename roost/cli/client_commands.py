"""Client sub-commands: send, listen, group, chat, login, logout. Thin wrappers over the SDK.

Exit codes (README.md has the table): 0 ok, 1 the server refused or could not
be reached, 2 bad usage (flags, URL, token, an empty or too large message),
3 ``send --wait`` timed out, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import getpass
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from roost.cli.errors import EXIT_FAILED, EXIT_USAGE, EXIT_WAIT_TIMED_OUT, UsageError
from roost.cli.profiles import (
    Profile,
    checked_token,
    checked_urls,
    profile_path,
    remove_profile,
    resolve,
    save_profile,
    split_urls,
)
from roost.cli.progress import RetryLine
from roost.client import CannotConnect, Client, InvalidArgument, Message, RoostError, StateInUse
from roost.client.client import authenticate, message_payload


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        action="append",
        help="server base URL (repeatable); default: $ROOST_URL or the login profile",
    )
    p.add_argument("--token", help="bearer token; default: $ROOST_TOKEN or the login profile")
    p.add_argument(
        "--state",
        default=None,
        help="client state file (durable outbox); default: one per token under ~/.local/state/roost",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("send", help="send one message and wait for its tick")
    _common(p)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", help="user name (1:1 chat)")
    target.add_argument("--group", help="group id (g:...)")
    p.add_argument("--wait", choices=["sent", "delivered", "read"], default="sent")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("text")
    p.set_defaults(func=lambda a: _run(_send, a))

    p = sub.add_parser("listen", help="print received messages as JSON lines (acked)")
    _common(p)
    p.add_argument("--count", type=int, default=None, help="exit after this many messages")
    p.add_argument("--timeout", type=float, default=None, help="exit after this many seconds")
    p.add_argument("--read", action="store_true", help="also mark each message read")
    p.set_defaults(func=lambda a: _run(_listen, a))

    p = sub.add_parser("group", help="create and manage groups")
    groups = p.add_subparsers(dest="group_cmd", required=True)
    g = groups.add_parser("create", help="create a group; prints its id as the last line")
    _common(g)
    g.add_argument("--name", required=True)
    g.add_argument("--members", default="", help="comma-separated user names")
    g.set_defaults(func=lambda a: _run(_group_create, a))
    for name, helptext in (("add", "add members"), ("remove", "remove members")):
        g = groups.add_parser(name, help=helptext)
        _common(g)
        g.add_argument("--group", required=True)
        g.add_argument("--members", required=True, help="comma-separated user names")
        g.set_defaults(func=lambda a, n=name: _run(_group_change, a, n))
    for name, helptext in (("leave", "leave a group"), ("info", "show a group")):
        g = groups.add_parser(name, help=helptext)
        _common(g)
        g.add_argument("--group", required=True)
        g.set_defaults(func=lambda a, n=name: _run(_group_change, a, n))

    p = sub.add_parser("chat", help="interactive terminal chat")
    _common(p)
    p.set_defaults(func=_chat)

    p = sub.add_parser("login", help="check a token and save it as the profile later commands use")
    p.add_argument("--url", action="append", help="server base URL (repeatable); default: $ROOST_URL")
    p.add_argument(
        "--token", help="'-' or left out: read it from stdin, or prompt on a terminal (not in shell history)"
    )
    p.add_argument("--no-check", action="store_true", help="save without logging in to the server first")
    p.set_defaults(func=_login)

    p = sub.add_parser("logout", help="remove the saved profile")
    p.set_defaults(func=_logout)


def _chat(args: argparse.Namespace) -> int:
    from roost.cli.chat import run_chat

    try:
        args.url, args.token = resolve(args.url, args.token)
    except UsageError as exc:
        print(f"roost chat: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run_chat(args.url, args.token, args.state)


def _read_token(given: str | None) -> str:
    if given is not None and given != "-":
        return given
    if given is None and os.environ.get("ROOST_TOKEN"):
        return os.environ["ROOST_TOKEN"]
    if sys.stdin.isatty():
        return getpass.getpass("token: ")
    return sys.stdin.readline().strip()


def _login(args: argparse.Namespace) -> int:
    path = profile_path()
    try:
        urls = checked_urls(args.url or split_urls(os.environ.get("ROOST_URL", "")))
        if not urls:
            raise UsageError("no server URL: give --url or set ROOST_URL")
        token = checked_token(_read_token(args.token))
    except UsageError as exc:
        print(f"roost login: {exc}", file=sys.stderr)
        return EXIT_USAGE
    user = None
    if not args.no_check:
        try:
            user = asyncio.run(authenticate(urls, token))
        except CannotConnect as exc:
            print(f"roost login: cannot reach the server: {exc.message}; nothing saved", file=sys.stderr)
            return EXIT_FAILED
        except RoostError as exc:
            print(f"roost login: {exc.code}: {exc.message}; nothing saved", file=sys.stderr)
            return EXIT_FAILED
    save_profile(Profile(urls, token), path)
    who = f"logged in as {user}" if user else "saved without checking"
    print(f"{who} at {', '.join(urls)}; profile {path}")
    return 0


def _logout(args: argparse.Namespace) -> int:
    path = profile_path()
    if remove_profile(path):
        print(f"logged out: removed {path}")
    else:
        print(f"not logged in: no profile at {path}")
    return 0


def _prog(args: argparse.Namespace) -> str:
    sub = getattr(args, "group_cmd", None)
    return f"roost {args.command}" + (f" {sub}" if sub else "")


def _run(fn: Callable[..., Awaitable[int]], args: argparse.Namespace, *extra: Any) -> int:
    prog = _prog(args)
    try:
        args.url, args.token = resolve(args.url, args.token)
        return asyncio.run(fn(args, *extra))
    except (UsageError, InvalidArgument) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CannotConnect as exc:
        print(f"{prog}: cannot reach the server: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except RoostError as exc:
        print(f"{prog}: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
    except StateInUse as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, TimeoutError) as exc:
        print(f"{prog}: cannot reach the server: {exc or type(exc).__name__}", file=sys.stderr)
        return EXIT_FAILED


def _client(args: argparse.Namespace, keep_events: bool = False) -> Client:
    return Client(
        args.url, args.token, state_path=args.state, keep_events=keep_events, on_retry=RetryLine(_prog(args))
    )


async def _connect(client: Client, timeout: float | None) -> None:
    """Connect, with the retry line (on a terminal) removed whatever the outcome."""
    try:
        await client.connect(timeout=timeout)
    finally:
        if isinstance(client.on_retry, RetryLine):
            client.on_retry.clear()


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, ensure_ascii=False), flush=True)


async def _send(args: argparse.Namespace) -> int:
    message_payload(args.text, None)  # an empty or too large text is refused before connecting
    client = _client(args)
    await _connect(client, args.timeout)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + args.timeout
        result = await asyncio.wait_for(client.send(args.text, to=args.to, group=args.group), args.timeout)
        out = {
            "message_id": result.message_id,
            "conversation": result.conv,
            "seq": result.seq,
            "ts": result.ts,
            "status": "sent",
        }
        if args.wait != "sent":
            try:
                await asyncio.wait_for(
                    client.wait_receipt(result.conv, result.seq, args.wait),
                    max(0.0, deadline - loop.time()),
                )
            except TimeoutError:
                out["error"] = f"timed out waiting for {args.wait}"
                _emit(out)
                return EXIT_WAIT_TIMED_OUT
            out["status"] = args.wait
        _emit(out)
        return 0
    finally:
        await client.flush()
        await client.close()


def message_json(m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {
        "conversation": m.conv,
        "seq": m.seq,
        "sender": m.sender,
        "message_id": m.id,
        "ct": m.ct,
        "ts": m.ts,
        "text": m.text,
    }
    if not m.ct.startswith("text/"):
        out["body_b64"] = base64.b64encode(m.body).decode()
    return out


async def _listen(args: argparse.Namespace) -> int:
    client = _client(args, keep_events=True)
    await _connect(client, args.timeout or 30.0)
    received = 0
    loop = asyncio.get_running_loop()
    deadline = None if args.timeout is None else loop.time() + args.timeout
    try:
        while args.count is None or received < args.count:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                break
            try:
                event = await client.next_event(remaining)
            except TimeoutError:
                break
            if not isinstance(event, Message):
                continue
            _emit(message_json(event))
            received += 1
            if args.read:
                await client.mark_read(event.conv, event.seq)
    finally:
        await client.flush()
        await client.close()
    if args.count is not None and received < args.count:
        print(f"roost listen: got {received} of {args.count} messages", file=sys.stderr)
        return EXIT_FAILED
    return 0


async def _group_create(args: argparse.Namespace) -> int:
    client = _client(args)
    await _connect(client, 10.0)
    try:
        members = [m.strip() for m in args.members.split(",") if m.strip()]
        info = await client.create_group(args.name, members)
        _emit({"group": info.group, "name": info.name, "members": info.members})
        print(info.group)
        return 0
    finally:
        await client.close()


async def _group_change(args: argparse.Namespace, action: str) -> int:
    client = _client(args)
    await _connect(client, 10.0)
    try:
        members = [m.strip() for m in getattr(args, "members", "").split(",") if m.strip()]
        if action == "add":
            info = await client.add_members(args.group, members)
        elif action == "remove":
            info = await client.remove_members(args.group, members)
        elif action == "leave":
            info = await client.leave_group(args.group)
        else:
            info = await client.group_info(args.group)
        _emit(
            {
                "group": info.group,
                "name": info.name,
                "members": info.members,
                "admins": info.admins,
                "last_seq": info.last_seq,
            }
        )
        return 0
    finally:
        await client.close()
