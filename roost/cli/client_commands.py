"""Client sub-commands: send, listen, group, chat. Thin wrappers over the SDK."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from roost.client import Client, ConnectionLost, Message, RoostError, StateInUse, local
from roost.client.local import OwnerUnavailable, socket_path
from roost.client.state import ClientState, default_state_path

# roost send: the server did not store the message in time; it is in the
# durable outbox and the next client of the account sends it, same id.
EXIT_QUEUED = 4
# A running client of the account that is starting or stopping gets this
# long (s) to answer on its socket before the command gives up.
HANDOFF_WAIT = 5.0
_BACKLOG_ALL = 1_000_000
LISTEN_POLL = 5.0  # s: one handed-over listen request waits this long for a message


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
    return Client(args.url, args.token, state_path=_state_path(args), keep_events=keep_events)


def _state_path(args: argparse.Namespace) -> str:
    return str(args.state) if args.state else str(default_state_path(args.token))


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, ensure_ascii=False), flush=True)


async def _owned_or_handed(
    args: argparse.Namespace,
    owned: Callable[[Client], Awaitable[int]],
    handed: Callable[[str], Awaitable[int]],
) -> int:
    """Run ``owned`` with this command's own client; or, while another client
    of the account runs on the state file (``roost chat``, ``roost listen``),
    run ``handed`` through that client's local socket: a second connection
    would replace the running one (4003)."""
    path = _state_path(args)
    loop = asyncio.get_running_loop()
    unanswered_since: float | None = None
    while True:
        try:
            client = _client(args, keep_events=True)
        except StateInUse as exc:
            try:
                return await handed(path)
            except OwnerUnavailable:
                # Starting (not listening yet) or stopping: ask again, or take the state.
                unanswered_since = unanswered_since or loop.time()
                if loop.time() - unanswered_since > HANDOFF_WAIT:
                    raise StateInUse(
                        f"{exc}, which does not answer on {socket_path(path)};"
                        " run this command again once it has stopped"
                    ) from None
                await asyncio.sleep(0.1)
                continue
        return await owned(client)


def _check(response: dict[str, Any]) -> dict[str, Any]:
    if not response.get("ok"):
        raise RoostError(str(response.get("code", "error")), str(response.get("message", "")))
    return response


async def _finish(client: Client, timeout: float = 5.0) -> None:
    """Before closing: send what earlier runs left in the outbox, flush acks."""
    if client.connected:
        await client.drain_outbox(timeout)
        await client.flush()
    await client.close()


def _queued(message_id: str, why: str) -> int:
    _emit(
        {
            "message_id": message_id,
            "conversation": None,
            "seq": None,
            "ts": None,
            "status": "queued",
            "error": why,
        }
    )
    print(
        f"roost send: {why}; the message is queued in the outbox and sent, with id {message_id},"
        " by the next client of this account",
        file=sys.stderr,
    )
    return EXIT_QUEUED


async def _send(args: argparse.Namespace) -> int:
    # Chosen here, so a send handed to a running client can be retried safely.
    message_id = uuid.uuid4().hex
    return await _owned_or_handed(
        args,
        lambda client: _send_own(args, client, message_id),
        lambda path: _send_handed(args, path, message_id),
    )


async def _send_own(args: argparse.Namespace, client: Client, message_id: str) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.timeout
    try:
        # Durable first: if the server cannot be reached it is already queued.
        await client.send(args.text, to=args.to, group=args.group, message_id=message_id, wait=False)
        acked = client.wait_sent(message_id)  # before connecting: the ✓ may come during connect()
        try:
            await client.connect(timeout=args.timeout)
        except ConnectionLost:
            return _queued(message_id, "the server could not be reached")
        except RoostError:  # refused (e.g. auth_failed): not sent, so not queued either
            _discard(client.state.path, message_id)
            raise
        except TimeoutError:
            return _queued(message_id, f"the server was not reached within {args.timeout:g}s")
        try:
            result = await asyncio.wait_for(acked, max(0.0, deadline - loop.time()))
        except (TimeoutError, ConnectionLost):
            return _queued(message_id, f"the server did not store it within {args.timeout:g}s")
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
        await _finish(client, max(0.5, min(5.0, deadline - loop.time())))


def _discard(state_path: str, message_id: str) -> None:
    """Take a refused message back out of the outbox of a closed client's state."""
    try:
        state = ClientState(state_path)
    except StateInUse:  # another client took it meanwhile: it will be refused there too
        return
    try:
        state.outbox_remove(message_id)
    finally:
        state.close()


async def _send_handed(args: argparse.Namespace, path: str, message_id: str) -> int:
    request = {
        "op": "send",
        "id": message_id,
        "to": args.to,
        "group": args.group,
        "text": args.text,
        "wait": args.wait,
        "timeout": args.timeout,
    }
    response = _check(await asyncio.wait_for(local.request(path, request), args.timeout + HANDOFF_WAIT))
    if response["status"] == "queued":
        return _queued(message_id, f"the server did not store it within {args.timeout:g}s")
    out = {k: response[k] for k in ("message_id", "conversation", "seq", "ts", "status")}
    if "error" in response:
        out["error"] = response["error"]
    _emit(out)
    return 3 if "error" in out else 0


def message_json(m: Message) -> dict[str, Any]:
    return local.message_json(m)


@dataclass
class _Listening:
    """How far one ``roost listen`` got, across its own client and handed-over turns."""

    count: int | None
    deadline: float | None
    received: int = 0

    def left(self) -> int | None:
        return None if self.count is None else self.count - self.received

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - asyncio.get_running_loop().time()

    def done(self) -> bool:
        left, remaining = self.left(), self.remaining()
        return (left is not None and left <= 0) or (remaining is not None and remaining <= 0)


async def _listen(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    progress = _Listening(args.count, None if args.timeout is None else loop.time() + args.timeout)
    code = await _owned_or_handed(
        args,
        lambda client: _listen_own(args, client, progress),
        lambda path: _listen_handed(args, path, progress),
    )
    if args.count is not None and progress.received < args.count:
        print(f"roost listen: got {progress.received} of {args.count} messages", file=sys.stderr)
        return 1
    return code


async def _listen_own(args: argparse.Namespace, client: Client, progress: _Listening) -> int:
    async def show(m: Message) -> None:
        # Printed, then marked consumed: a message is never lost between two
        # runs; only a kill between the two steps could print it again.
        _emit(message_json(m))
        client.consume([m])
        progress.received += 1
        if args.read:
            await client.mark_read(m.conv, m.seq)

    try:
        await client.connect(timeout=progress.remaining() or 30.0)
        # First what reached this device earlier but was never shown (a
        # ``roost send`` received it, or an earlier listen stopped at --count).
        left = progress.left()
        for m in client.take_unconsumed(_BACKLOG_ALL if left is None else left):
            await show(m)
        while not progress.done():
            try:
                event = await client.next_event(progress.remaining())
            except TimeoutError:
                break
            if isinstance(event, Message) and client.claim(event):
                await show(event)
    finally:
        await _finish(client)
    return 0


async def _listen_handed(args: argparse.Namespace, path: str, progress: _Listening) -> int:
    def show(messages: list[dict[str, Any]]) -> None:
        for m in messages:
            _emit(m)
        progress.received += len(messages)

    while not progress.done():
        remaining = progress.remaining()
        wait = LISTEN_POLL if remaining is None else min(LISTEN_POLL, remaining)
        request = {"op": "listen", "max": progress.left() or 100, "wait": wait, "read": args.read}
        _check(await local.request(path, request, show))
    return 0


async def _group(args: argparse.Namespace, action: str, **fields: Any) -> dict[str, Any]:
    """One group request, by this command's client or the running one's."""

    async def own(client: Client) -> dict[str, Any]:
        try:
            await client.connect()
            if action == "create":
                info = await client.create_group(fields["name"], fields["members"])
            elif action == "add":
                info = await client.add_members(fields["group"], fields["members"])
            elif action == "remove":
                info = await client.remove_members(fields["group"], fields["members"])
            elif action == "leave":
                info = await client.leave_group(fields["group"])
            else:
                info = await client.group_info(fields["group"])
            return local.group_json(info)
        finally:
            await _finish(client)

    async def handed(path: str) -> dict[str, Any]:
        response = await local.request(path, {"op": "group", "action": action, **fields})
        return dict(_check(response)["group"])

    result: dict[str, Any] = {}

    async def keep(value: Awaitable[dict[str, Any]]) -> int:
        result.update(await value)
        return 0

    await _owned_or_handed(args, lambda c: keep(own(c)), lambda p: keep(handed(p)))
    return result


def _members(args: argparse.Namespace) -> list[str]:
    return [m.strip() for m in getattr(args, "members", "").split(",") if m.strip()]


async def _group_create(args: argparse.Namespace) -> int:
    info = await _group(args, "create", name=args.name, members=_members(args))
    _emit({"group": info["group"], "name": info["name"], "members": info["members"]})
    print(info["group"])
    return 0


async def _group_change(args: argparse.Namespace, action: str) -> int:
    fields: dict[str, Any] = {"group": args.group}
    if action in ("add", "remove"):
        fields["members"] = _members(args)
    _emit(await _group(args, action, **fields))
    return 0
