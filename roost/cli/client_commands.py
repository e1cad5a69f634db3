"""Client sub-commands: send, listen, group, chat. Thin wrappers over the SDK."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from roost.client import Client, Message, RoostError, StateInUse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, action="append", help="server base URL (repeatable)")
    p.add_argument("--token", required=True)
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


def _chat(args: argparse.Namespace) -> int:
    from roost.cli.chat import run_chat

    return run_chat(args.url, args.token, args.state)


def _run(fn: Callable[..., Awaitable[int]], args: argparse.Namespace, *extra: Any) -> int:
    try:
        return asyncio.run(fn(args, *extra))
    except RoostError as exc:
        print(f"roost: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except StateInUse as exc:
        print(f"roost: {exc}", file=sys.stderr)
        return 1
    except (OSError, TimeoutError) as exc:
        print(f"roost: cannot reach the server: {exc or 'timed out'}", file=sys.stderr)
        return 1


def _client(args: argparse.Namespace, keep_events: bool = False) -> Client:
    return Client(args.url, args.token, state_path=args.state, keep_events=keep_events)


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, ensure_ascii=False), flush=True)


async def _send(args: argparse.Namespace) -> int:
    client = _client(args)
    await client.connect(timeout=args.timeout)
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
                return 3
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
    await client.connect(timeout=args.timeout or 30.0)
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
        return 1
    return 0


async def _group_create(args: argparse.Namespace) -> int:
    client = _client(args)
    await client.connect()
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
    await client.connect()
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
