"""Client sub-commands: send, listen, group, chat, login, logout. Thin wrappers over the SDK.

Exit codes (README.md has the table): 0 ok, 1 the server refused or could not
be reached, 2 bad usage (flags, URL, token, an empty or too large message),
3 ``send --wait`` timed out, 4 ``send`` queued in the outbox, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from roost.cli.errors import EXIT_FAILED, EXIT_QUEUED, EXIT_USAGE, EXIT_WAIT_TIMED_OUT, UsageError
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
from roost.cli.progress import Progress, RetryLine, on_terminal
from roost.client import (
    CannotConnect,
    Client,
    ConnectionLost,
    InvalidArgument,
    Message,
    RoostError,
    StateInUse,
    local,
)
from roost.client.attachments import MAX_CAPTION_CHARS
from roost.client.client import authenticate, message_payload, tls_context
from roost.client.local import OwnerUnavailable, sent_or_pending, socket_path
from roost.client.state import ClientState, default_state_path

# A running client of the account that is starting or stopping gets this
# long (s) to answer on its socket before the command gives up.
HANDOFF_WAIT = 5.0
_BACKLOG_ALL = 1_000_000
LISTEN_POLL = 5.0  # s: one handed-over listen request waits this long for a message
SEND_TIMEOUT = 30.0  # s: roost send's default --timeout
FILE_SEND_TIMEOUT = 600.0  # s: with --file, the upload counts too


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
    _ca_file(p)


def _ca_file(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ca-file",
        default=None,
        help="PEM CA certificate(s) to trust for https:// and wss:// besides the system's (a private CA)",
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("send", help="send one message and wait for its tick")
    _common(p)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", help="user name (1:1 chat)")
    target.add_argument("--group", help="group id (g:...)")
    p.add_argument("--wait", choices=["sent", "delivered", "read"], default="sent")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"seconds to wait (default {SEND_TIMEOUT:g}; --file: {FILE_SEND_TIMEOUT:g}, upload included)",
    )
    p.add_argument(
        "--file",
        default=None,
        help="send this file (encrypted, uploaded to the media store); TEXT is then an optional caption",
    )
    p.add_argument("text", nargs="?", default=None)
    p.set_defaults(func=_send_command)

    p = sub.add_parser("listen", help="print received messages as JSON lines (acked)")
    _common(p)
    p.add_argument("--count", type=int, default=None, help="exit after this many messages")
    p.add_argument("--timeout", type=float, default=None, help="exit after this many seconds")
    p.add_argument("--read", action="store_true", help="also mark each message read")
    p.add_argument(
        "--save-dir",
        default=None,
        help="save received files here (never replacing a file); the JSON line says where ('saved')",
    )
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

    p = sub.add_parser(
        "safety-number",
        help="print the safety number with a contact (compare it with theirs); --verify marks them verified",
    )
    _common(p)
    p.add_argument("--with", dest="peer", required=True, metavar="USER", help="the contact")
    p.add_argument(
        "--verify", action="store_true", help="mark the contact verified (you compared the numbers)"
    )
    p.add_argument("--timeout", type=float, default=30.0)
    p.set_defaults(func=lambda a: _run(_safety_number, a))

    p = sub.add_parser("chat", help="interactive terminal chat")
    _common(p)
    p.set_defaults(func=_chat)

    p = sub.add_parser("app", help="the graphical chat in your browser, served from this machine")
    _common(p)
    p.add_argument("--no-browser", action="store_true", help="only print the URL to open")
    p.add_argument(
        "--port", type=int, default=0, help="loopback port to serve on (default: a random free one)"
    )
    p.set_defaults(func=_app)

    p = sub.add_parser("login", help="check a token and save it as the profile later commands use")
    p.add_argument("--url", action="append", help="server base URL (repeatable); default: $ROOST_URL")
    p.add_argument(
        "--token", help="'-' or left out: read it from stdin, or prompt on a terminal (not in shell history)"
    )
    p.add_argument("--no-check", action="store_true", help="save without logging in to the server first")
    _ca_file(p)
    p.set_defaults(func=_login)

    p = sub.add_parser("logout", help="remove the saved profile")
    p.set_defaults(func=_logout)


def _chat(args: argparse.Namespace) -> int:
    from roost.cli.chat import run_chat

    try:
        args.url, args.token = resolve(args.url, args.token)
        tls_context(args.ca_file)  # a bad --ca-file is a usage error before the screen opens
    except (UsageError, InvalidArgument) as exc:
        print(f"roost chat: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run_chat(args.url, args.token, args.state, args.ca_file)


def _app(args: argparse.Namespace) -> int:
    from roost.app.run import run_app

    try:
        args.url, args.token = resolve(args.url, args.token)
        tls_context(args.ca_file)
    except (UsageError, InvalidArgument) as exc:
        print(f"roost app: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return run_app(
        args.url, args.token, args.state, args.ca_file, open_browser=not args.no_browser, port=args.port
    )


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
        tls = tls_context(args.ca_file)
    except (UsageError, InvalidArgument) as exc:
        print(f"roost login: {exc}", file=sys.stderr)
        return EXIT_USAGE
    user = None
    if not args.no_check:
        try:
            user = asyncio.run(authenticate(urls, token, tls=tls))
        except RoostError as exc:
            print(f"roost login: {_failure(exc)}; nothing saved", file=sys.stderr)
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


def _failure(exc: RoostError) -> str:
    """The server-side reason a command failed, as its one error line says it."""
    if isinstance(exc, CannotConnect):
        return f"cannot reach the server: {exc.message}"
    return f"{exc.code}: {exc.message}"


def _prog(args: argparse.Namespace) -> str:
    sub = getattr(args, "group_cmd", None)
    return f"roost {args.command}" + (f" {sub}" if sub else "")


def _run(fn: Callable[..., Coroutine[Any, Any, int]], args: argparse.Namespace, *extra: Any) -> int:
    prog = _prog(args)
    try:
        args.url, args.token = resolve(args.url, args.token)
        return asyncio.run(fn(args, *extra))
    except (UsageError, InvalidArgument) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RoostError as exc:
        print(f"{prog}: {_failure(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except StateInUse as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, TimeoutError) as exc:
        print(f"{prog}: cannot reach the server: {exc or type(exc).__name__}", file=sys.stderr)
        return EXIT_FAILED


def _client(args: argparse.Namespace, keep_events: bool = False) -> Client:
    return Client(
        args.url,
        args.token,
        state_path=_state_path(args),
        keep_events=keep_events,
        on_retry=RetryLine(_prog(args)),
        ca_file=args.ca_file,
    )


async def _connect(client: Client, timeout: float | None) -> None:
    """Connect, with the retry line (on a terminal) removed whatever the outcome."""
    try:
        await client.connect(timeout=timeout)
    finally:
        if isinstance(client.on_retry, RetryLine):
            client.on_retry.clear()


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


def _check_send_args(args: argparse.Namespace) -> None:
    """Refuse what cannot be sent before anything is queued (exit 2)."""
    if args.timeout is None:
        args.timeout = FILE_SEND_TIMEOUT if args.file else SEND_TIMEOUT
    if args.file is None:
        if args.text is None:
            raise UsageError("give the message TEXT, or --file PATH")
        message_payload(args.text, None)  # an empty or too large text
        return
    path = Path(args.file).expanduser()
    if not path.is_file():
        raise UsageError(f"--file {args.file}: no such file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"--file {args.file}: not readable")
    args.file = str(path.resolve())  # absolute: a running client may send it from another directory
    if args.text is not None and len(args.text) > MAX_CAPTION_CHARS:
        raise UsageError(f"the caption is over {MAX_CAPTION_CHARS} characters")


def _send_command(args: argparse.Namespace) -> int:
    try:  # what the command line itself gets wrong is said before the profile is looked up
        _check_send_args(args)
    except (UsageError, InvalidArgument) as exc:
        print(f"roost send: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return _run(_send, args)


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
        if args.file is not None:
            bar = Progress("roost send", on_terminal())
            await client.send_file(
                args.file,
                to=args.to,
                group=args.group,
                caption=args.text,
                message_id=message_id,
                wait=False,
                progress=_byte_progress(bar, Path(args.file).name),
            )
        else:
            await client.send(args.text, to=args.to, group=args.group, message_id=message_id, wait=False)
        acked = client.wait_sent(message_id)  # before connecting: the ✓ may come during connect()
        pending = client.wait_pending(message_id)  # or: it waits for the recipient's keys
        try:
            await _connect(client, args.timeout)
        except CannotConnect as exc:
            if exc.final:  # TLS, unknown host, not a Roost server: resending would fail the same way
                _discard(client.state.path, message_id)
                raise
            return _queued(message_id, f"cannot reach the server: {exc.message}")
        except ConnectionLost:
            return _queued(message_id, "the server could not be reached")
        except RoostError:  # refused (e.g. auth_failed): not sent, so not queued either
            _discard(client.state.path, message_id)
            raise
        except TimeoutError:
            return _queued(message_id, f"the server was not reached within {args.timeout:g}s")
        try:
            result = await sent_or_pending(acked, pending, max(0.0, deadline - loop.time()))
        except (TimeoutError, ConnectionLost):
            return _queued(message_id, f"the server did not store it within {args.timeout:g}s")
        if isinstance(result, str):
            return _queued(message_id, result)
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
        await _finish(client, max(0.5, min(5.0, deadline - loop.time())))


def _byte_progress(bar: Progress, name: str) -> Callable[[int, int], None]:
    """An upload's ``progress(done, total)`` moving one byte bar (a terminal only)."""
    shown = 0

    def report(done: int, total: int) -> None:
        nonlocal shown
        if bar.enabled and not bar.showing and done < total:
            bar.phase(f"uploading {name}", total=total, unit="B", scale=True)
        bar.advance(max(0, done - shown))
        shown = done
        if done >= total:
            bar.close()

    return report


def _discard(state_path: str, message_id: str) -> None:
    """Take a refused message back out of the outbox of a closed client's state."""
    try:
        state = ClientState(state_path)
    except StateInUse:  # another client took it meanwhile: it will be refused there too
        return
    try:
        state.outbox_remove(message_id)
        state.upload_remove(message_id)
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
    if args.file is not None:
        request["path"] = args.file
    response = _check(await asyncio.wait_for(local.request(path, request), args.timeout + HANDOFF_WAIT))
    if response["status"] == "queued":
        why = response.get("reason") or f"the server did not store it within {args.timeout:g}s"
        return _queued(message_id, str(why))
    out = {k: response[k] for k in ("message_id", "conversation", "seq", "ts", "status")}
    if "error" in response:
        out["error"] = response["error"]
    _emit(out)
    return EXIT_WAIT_TIMED_OUT if "error" in out else 0


async def _safety_number(args: argparse.Namespace) -> int:
    async def own(client: Client) -> int:
        try:
            await _connect(client, args.timeout)
            if args.verify:
                await client.safety_number(args.peer)  # their key must be known first
                client.mark_verified(args.peer)
            return _print_safety(local.safety_json(await client.safety_number(args.peer)))
        finally:
            await _finish(client)

    async def handed(path: str) -> int:
        request = {"op": "safety", "with": args.peer, "verify": args.verify}
        return _print_safety(_check(await asyncio.wait_for(local.request(path, request), args.timeout)))

    return await _owned_or_handed(args, own, handed)


def _print_safety(number: dict[str, Any]) -> int:
    """The number (12 groups of 5 digits) on its own line, then what it means."""
    user = number["user"]
    print(number["safety_number"])
    if number["verified"]:
        state = "verified"
    elif number["changed"]:
        state = f"NOT verified: {user}'s key changed since it was first seen"
    else:
        state = "not verified"
    print(
        f"safety number with {user}: {state}. Compare it with the one {user} sees (in person or over"
        f" a channel you trust); if they match, run with --verify.",
        file=sys.stderr,
    )
    return 0


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
        return EXIT_FAILED
    return code


async def _listen_own(args: argparse.Namespace, client: Client, progress: _Listening) -> int:
    async def show(m: Message) -> None:
        # Printed, then marked consumed: a message is never lost between two
        # runs; only a kill between the two steps could print it again.
        out = message_json(m)
        if args.save_dir is not None:
            out.update(await local.save_attachment(client, m, args.save_dir))
        _emit(out)
        client.consume([m])
        progress.received += 1
        if args.read:
            await client.mark_read(m.conv, m.seq)

    try:
        await _connect(client, progress.remaining() or 30.0)
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
        if args.save_dir is not None:
            request["save_dir"] = str(Path(args.save_dir).resolve())
        _check(await local.request(path, request, show))
    return 0


async def _group(args: argparse.Namespace, action: str, **fields: Any) -> dict[str, Any]:
    """One group request, by this command's client or the running one's."""

    async def own(client: Client) -> dict[str, Any]:
        try:
            await _connect(client, 10.0)
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
