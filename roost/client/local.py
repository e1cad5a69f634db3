"""The local socket: other commands of an account hand their work to its running client.

One device per account: a second connection of the same account replaces the
first for good (4003). So while a client runs on a state file (``roost chat``,
``roost listen``, an SDK application), it also listens on a Unix socket beside
that file (``STATE.sock``), and ``roost send`` / ``listen`` / ``group`` of the
same account, finding the state locked, send their request there instead of
connecting themselves (as signal-cli's daemon does).

The protocol is one request per connection, JSON objects one per line:

* the requester writes one request line; the running client answers with one
  response line and closes;
* ``{"op": "send", "id", "to" | "group", "text", "path", "wait": "sent"|"delivered"|"read", "timeout"}``
  -> ``{"ok": true, "message_id", "conversation", "seq", "ts", "status"}``;
  with ``path`` (absolute) the file there is sent (``Client.send_file``) and
  ``text``, optional then, is its caption;
  ``status`` is ``queued`` (``conversation``/``seq``/``ts`` null) when the
  server did not store it within ``timeout``, or (with ``reason``) when it
  waits for the recipient's encryption keys: it stays in the running client's
  outbox. The requester picks the message id, so retrying a send is safe;
* ``{"op": "listen", "max", "wait", "read", "save_dir"}`` -> ``{"ok": true, "messages": [...]}``
  with up to ``max`` received messages not yet shown to the user (fewer if
  they would not fit one ``MAX_LINE``; the rest come with the next request),
  waiting up to ``wait`` seconds for one; with ``save_dir`` the running client
  first saves their attachments there (``saved``/``save_error`` in each).
  Once it has printed them the requester writes ``{"op": "consumed"}`` and
  the running client marks them consumed (and read with ``read``), then
  answers ``{"ok": true}``; if the requester goes away first they stay unconsumed;
* ``{"op": "group", "action": "create"|"add"|"remove"|"leave"|"info", "group", "name", "members"}``
  -> ``{"ok": true, "group": {"group", "name", "members", "admins", "last_seq"}}``;
* ``{"op": "safety", "with", "verify"}`` -> ``{"ok": true, "user", "safety_number", "verified", "changed"}``
  (``verify``: mark the contact verified first);
* an error is ``{"ok": false, "code", "message"}``; ``owner_closed`` means the
  running client stopped during the request (the requester may open the state
  itself now).

The socket file is created owner-only (0600) and a peer of another uid is
refused, so only the account's own user reaches it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import socket
import struct
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from roost.client.attachments import (
    ATTACHMENT_CT,
    AttachmentRef,
    BlobTampered,
    InvalidAttachment,
    parse_reference,
)
from roost.client.events import Message

if TYPE_CHECKING:
    from roost.client.client import Client, GroupInfo, SafetyNumber, SendResult


# Seconds a requester has to send its request line once connected.
REQUEST_WAIT = 10.0


async def sent_or_pending(
    acked: Awaitable[SendResult], pending: Awaitable[str], timeout: float | None
) -> SendResult | str:
    """The ✓ (``acked``, from ``wait_sent``) or the reason the message is
    pending (``pending``, from ``wait_pending``: the recipient has no keys yet),
    whichever comes first; ``TimeoutError`` if neither comes in time."""
    ack = asyncio.ensure_future(acked)
    why = asyncio.ensure_future(pending)
    try:
        done, _ = await asyncio.wait({ack, why}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for fut in (ack, why):
            if not fut.done():
                fut.cancel()
    if ack in done:
        return ack.result()
    if why in done:
        return why.result()
    raise TimeoutError


def owner_only_socket(path: str | os.PathLike[str]) -> socket.socket:
    """A Unix socket bound at ``path`` with mode 0600, not listening yet.

    Made owner-only before ``listen()``, so no one else can ever connect
    (a connect to a socket that is not listening is refused). Not by
    ``umask``: that is process-wide, and two of these started at once in one
    event loop, or a thread creating files meanwhile, would see or keep the
    wrong mask.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
        os.chmod(path, 0o600)
    except BaseException:
        sock.close()
        raise
    return sock


MAX_LINE = 1 << 20  # a 64 KiB body, JSON-escaped, fits
SUN_PATH_MAX = 103  # bytes: Linux allows 107, macOS 103
OWNER_CLOSED = b'{"ok": false, "code": "owner_closed", "message": "the running client stopped"}\n'


class OwnerUnavailable(ConnectionError):
    """No running client answers on the state's socket (gone, starting or closing)."""


def socket_path(state_path: str | Path) -> str:
    """``STATE.sock``; when that is too long for a Unix socket address, a
    per-user directory under the temp dir, named by the state's hash."""
    path = os.path.abspath(str(state_path)) + ".sock"
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        return path
    digest = hashlib.sha256(path.encode()).hexdigest()[:24]
    folder = Path(tempfile.gettempdir()) / f"roost-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return str(folder / f"{digest}.sock")


def message_json(m: Message) -> dict[str, Any]:
    """A received message as ``roost listen`` prints it (and the socket carries it)."""
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
    if m.ct == ATTACHMENT_CT:
        try:
            ref = parse_reference(m.body)
        except InvalidAttachment as exc:
            out["text"] = ""
            out["attachment"] = {"invalid": str(exc)}
        else:
            out["text"] = ref.caption or ""
            out["attachment"] = attachment_json(ref)
    return out


def attachment_json(ref: AttachmentRef) -> dict[str, Any]:
    """What ``roost listen`` says of an attachment (not its key)."""
    fields = ("name", "size", "content_type", "kind", "width", "height", "duration_ms", "caption")
    out = {k: getattr(ref, k) for k in fields if getattr(ref, k) is not None}
    out["blob"] = ref.blob
    return out


async def save_attachment(client: Client, m: Message, save_dir: str) -> dict[str, Any]:
    """``{"saved": path}`` once ``m``'s attachment is in ``save_dir``, ``{"save_error": why}``
    if it could not be; nothing for a message that is no attachment."""
    if m.ct != ATTACHMENT_CT:
        return {}
    try:
        return {"saved": str(await client.download(m, save_dir))}
    except (InvalidAttachment, BlobTampered) as exc:
        return {"save_error": str(exc)}
    except Exception as exc:  # RoostError (unknown_blob...), OSError: the message is still shown
        return {"save_error": getattr(exc, "message", None) or str(exc) or type(exc).__name__}


def safety_json(number: SafetyNumber) -> dict[str, Any]:
    return {
        "user": number.user,
        "safety_number": number.groups,
        "verified": number.verified,
        "changed": number.changed,
    }


def group_json(info: GroupInfo) -> dict[str, Any]:
    return {
        "group": info.group,
        "name": info.name,
        "members": info.members,
        "admins": info.admins,
        "last_seq": info.last_seq,
    }


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None  # not Linux: the 0600 file mode is the guard
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    uid: int = struct.unpack("3i", creds)[1]  # struct ucred: pid, uid, gid
    return uid


async def _write(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(json.dumps(obj, ensure_ascii=False).encode() + b"\n")
    await writer.drain()


def _fitting(messages: list[Message]) -> list[dict[str, Any]]:
    """The first of ``messages``, as JSON, that fit one response line of at
    most MAX_LINE; always the first (a 64 KiB body fits on its own)."""
    out: list[dict[str, Any]] = []
    size = 64  # the response's own keys
    for m in messages:
        item = message_json(m)
        size += len(json.dumps(item, ensure_ascii=False).encode()) + 2
        if out and size > MAX_LINE:
            break
        out.append(item)
    return out


class LocalEndpoint:
    """The running client's side of the socket."""

    def __init__(self, client: Client, state_path: str) -> None:
        self.client = client
        self.path = socket_path(state_path)
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        # The caller holds the state's lock, so a file left here is stale
        # (a client killed with -9).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server = await asyncio.start_unix_server(
            self._accept, sock=owner_only_socket(self.path), limit=MAX_LINE
        )

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            uid = _peer_uid(writer)
            if uid is not None and uid != os.getuid():
                await _write(writer, {"ok": False, "code": "forbidden", "message": "another user"})
                return
            try:
                line = await asyncio.wait_for(reader.readline(), REQUEST_WAIT)
            except TimeoutError:
                return  # a requester that never sent its request is closed, not held
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
            await self._dispatch(request, reader, writer)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                writer.write(OWNER_CLOSED)
            raise
        except TimeoutError:
            with contextlib.suppress(Exception):
                message = "the running client did not get an answer from the server in time"
                await _write(writer, {"ok": False, "code": "timeout", "message": message})
        except (ValueError, KeyError, TypeError, OverflowError) as exc:
            with contextlib.suppress(Exception):
                await _write(writer, {"ok": False, "code": "bad_request", "message": str(exc)})
        except Exception as exc:  # RoostError and the like: the requester reports it
            code = getattr(exc, "code", "error")
            message = getattr(exc, "message", str(exc) or type(exc).__name__)
            with contextlib.suppress(Exception):
                await _write(writer, {"ok": False, "code": code, "message": message})
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _dispatch(
        self, request: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        op = request.get("op")
        if op == "send":
            await _write(writer, await self._send(request))
        elif op == "listen":
            await self._listen(request, reader, writer)
        elif op == "group":
            info = await self._group(request)
            await _write(writer, {"ok": True, "group": group_json(info)})
        elif op == "safety":
            await _write(writer, await self._safety(request))
        else:
            raise ValueError(f"unknown op {op!r}")

    async def _safety(self, request: dict[str, Any]) -> dict[str, Any]:
        user = _text(request, "with")
        if request.get("verify"):
            await self.client.safety_number(user)  # the key must be known first
            self.client.mark_verified(user)
        number = await self.client.safety_number(user)
        return {"ok": True, **safety_json(number)}

    async def _send(self, request: dict[str, Any]) -> dict[str, Any]:
        client = self.client
        loop = asyncio.get_running_loop()
        timeout = _seconds(request, "timeout", 30.0)
        deadline = loop.time() + timeout
        wait = request.get("wait", "sent")
        message_id = _text(request, "id")
        # Both before any await, so the ✓ cannot come before its waiter exists.
        path = _optional_text(request, "path")
        if path is not None:
            await client.send_file(
                path,
                to=_optional_text(request, "to"),
                group=_optional_text(request, "group"),
                caption=_optional_text(request, "text"),
                message_id=message_id,
                wait=False,
                announce=True,
            )
        else:
            await client.send(
                _text(request, "text"),
                to=_optional_text(request, "to"),
                group=_optional_text(request, "group"),
                message_id=message_id,
                wait=False,
                announce=True,
            )
        acked = client.wait_sent(message_id)
        pending = client.wait_pending(message_id)
        out: dict[str, Any] = {"ok": True, "message_id": message_id}
        try:
            result = await sent_or_pending(acked, pending, timeout)
        except TimeoutError:
            out.update(conversation=None, seq=None, ts=None, status="queued")
            return out
        if isinstance(result, str):  # waits for the recipient's keys: goes out by itself
            out.update(conversation=None, seq=None, ts=None, status="queued", reason=result)
            return out
        out.update(conversation=result.conv, seq=result.seq, ts=result.ts, status="sent")
        if wait in ("delivered", "read"):
            try:
                await asyncio.wait_for(
                    client.wait_receipt(result.conv, result.seq, wait), max(0.0, deadline - loop.time())
                )
                out["status"] = wait
            except TimeoutError:
                out["error"] = f"timed out waiting for {wait}"
        return out

    async def _listen(
        self, request: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        client = self.client
        limit = max(1, int(request.get("max", 100)))
        messages = client.take_unconsumed(limit)
        if not messages:
            await client.wait_unconsumed(_seconds(request, "wait", 0.0))
            messages = client.take_unconsumed(limit)
        shown = _fitting(messages)
        client.release(messages[len(shown) :])  # for the requester's next request
        messages = messages[: len(shown)]
        save_dir = _optional_text(request, "save_dir")
        if save_dir is not None:
            for m, item in zip(messages, shown, strict=True):
                item.update(await save_attachment(client, m, save_dir))
        try:
            await _write(writer, {"ok": True, "messages": shown})
            if not messages:
                return
            done = json.loads(await reader.readline() or b"null")
            if not isinstance(done, dict) or done.get("op") != "consumed":
                return
            client.consume(messages)
            if request.get("read"):
                for m in messages:
                    await client.mark_read(m.conv, m.seq)
            await _write(writer, {"ok": True})
        finally:
            client.release(messages)

    async def _group(self, request: dict[str, Any]) -> GroupInfo:
        client = self.client
        action = request.get("action")
        members = request.get("members", [])
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise TypeError("members must be a list of strings")
        group = _optional_text(request, "group") or ""
        if action == "create":
            return await client.create_group(_text(request, "name"), members)
        if action == "add":
            return await client.add_members(group, members)
        if action == "remove":
            return await client.remove_members(group, members)
        if action == "leave":
            return await client.leave_group(group)
        if action == "info":
            return await client.group_info(group)
        raise ValueError(f"unknown group action {action!r}")


def _optional_text(request: dict[str, Any], key: str) -> str | None:
    """A string field of a request, or None where it is absent; any other type
    is refused before anything is queued (a number as ``to`` would sit in the
    durable outbox and be sent again on every connect)."""
    value = request.get(key)
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{key} must be a string")
    return value


def _seconds(request: dict[str, Any], key: str, default: float) -> float:
    """A duration field: a number, 0 or more (infinity allowed). A NaN would
    reach the event loop's timer heap, where it compares false with every
    other deadline and can stall the running client's timers."""
    value = request.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{key} must be a number of seconds")
    if not value >= 0:  # NaN too
        raise ValueError(f"{key} must be 0 or more seconds")
    return float(value)


def _text(request: dict[str, Any], key: str) -> str:
    value = _optional_text(request, key)
    if value is None:
        raise TypeError(f"{key} is required")
    return value


async def request(
    state_path: str | Path,
    req: dict[str, Any],
    on_messages: Callable[[list[dict[str, Any]]], Awaitable[None] | None] | None = None,
) -> dict[str, Any]:
    """Send one request to the client running on ``state_path``; its response.

    For ``listen``, ``on_messages`` is called with the messages before they
    are confirmed as consumed. Raises ``OwnerUnavailable`` when no running
    client answers (or it stopped during the request).
    """
    try:
        reader, writer = await asyncio.open_unix_connection(socket_path(state_path), limit=MAX_LINE)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise OwnerUnavailable(str(exc)) from None
    try:
        await _write(writer, req)
        response = await _read_response(reader)
        messages = response.get("messages")
        if response.get("ok") and messages and on_messages is not None:
            shown = on_messages(messages)
            if shown is not None:
                await shown
            await _write(writer, {"op": "consumed"})
            response = {**response, **await _read_response(reader)}
        return response
    except (ConnectionResetError, BrokenPipeError) as exc:
        raise OwnerUnavailable(str(exc)) from None
    finally:
        writer.close()


async def _read_response(reader: asyncio.StreamReader) -> dict[str, Any]:
    line = await reader.readline()
    if not line:
        raise OwnerUnavailable("the running client closed the connection")
    response = json.loads(line)
    if not isinstance(response, dict):
        raise OwnerUnavailable("not a response")
    if response.get("code") == "owner_closed":
        raise OwnerUnavailable(str(response.get("message", "")))
    return response
