"""Between the browser and the SDK: commands in, events out, all as JSON objects.

The browser holds no state the app could not rebuild: on each (re)connect it
asks for a ``snapshot`` (the chat list, from the client state) and the page of
the open chat (``history``, from the local message database), so a reload or
a restart of ``roost app`` shows the same chats, ticks and unread counts.
Live SDK events follow as they come (``event_json``). Every message carries
its id, so the page merges what it already shows with what comes again (a
page of history after a reconnect, an own message first pending then sent).

Text another user chose is passed on as data; the page puts it in the
document with ``textContent`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec

from roost.client import (
    Client,
    ConnectionLost,
    InvalidArgument,
    RoostError,
)
from roost.client.attachments import ATTACHMENT_CT, AttachmentRef, InvalidAttachment, parse_reference
from roost.client.events import (
    Connected,
    Consumed,
    DecryptionFailed,
    Disconnected,
    ErrorEvent,
    Event,
    IdentityChanged,
    LocalSend,
    Membership,
    Message,
    Pending,
    PresenceEvent,
    ReceiptEvent,
    Sent,
    TypingEvent,
)
from roost.client.state import OutboxItem, UploadItem
from roost.core.ids import direct_conv_id, direct_members, is_group_id, is_valid_user_name
from roost.protocol.frames import MEMBERSHIP_CT, SYSTEM_SENDER

log = logging.getLogger("roost.app")

HISTORY_PAGE = 50
SEARCH_LIMIT = 50
TYPING_INTERVAL = 2.0  # at most one typing frame per conversation this often
PRESENCE_SUBSCRIBE_MAX = 200  # peers of the chat list whose online dot is kept live

Broadcast = Callable[[dict[str, Any]], None]


class CommandError(Exception):
    """A browser command that cannot be done; the reply says why."""


def _text_of(ct: str, body: bytes) -> str:
    if ct.startswith("text/"):
        return body.decode("utf-8", errors="replace")
    return f"[{ct}, {len(body)} bytes]"


def membership_text(m: Membership, me: str | None) -> str:
    def who(user: str) -> str:
        return "you" if user == me else user

    users = ", ".join(who(u) for u in m.users)
    actor = who(m.actor) if m.actor else "the administrator"
    if m.action == "created":
        text = f"{actor} created the group {m.name!r}" if m.name else f"{actor} created the group"
    elif m.action == "added":
        text = f"{actor} added {users}"
    elif m.action == "removed":
        text = f"{actor} removed {users}"
    elif m.action == "left":
        text = f"{users or actor} left"
    else:
        text = "membership changed"
    return "Y" + text[1:] if text.startswith("you ") else text


def attachment_json(body: bytes, *, own_pending: bool = False) -> dict[str, Any]:
    """A file message as the page shows it: name, type, size, caption (not the key).

    ``own_pending``: the reference of a file this device is still uploading
    (its blob id is still empty, so it is not a valid reference yet)."""
    try:
        ref = msgspec.json.decode(body, type=AttachmentRef) if own_pending else parse_reference(body)
    except (InvalidAttachment, ValueError, msgspec.DecodeError):
        return {"text": "[a file that cannot be read]"}
    info = {"name": ref.name, "content_type": ref.content_type, "kind": ref.kind, "size": ref.size}
    return {"text": ref.caption or "", "attachment": info}


class AppBridge:
    """One SDK client, shown to any number of browser pages (``broadcast``)."""

    def __init__(self, client: Client, broadcast: Broadcast, *, clock: Callable[[], float] = time.time):
        self.client = client
        self.broadcast = broadcast
        self.clock = clock
        self.connection = "connecting"  # connecting | connected | reconnecting | offline
        self.connection_detail = ""
        self.presence: dict[str, dict[str, Any]] = {}
        self.left: set[str] = set()
        self._typing_sent: dict[str, float] = {}
        self._subscribed: set[str] = set()
        self._tasks: set[asyncio.Future[None]] = set()
        self._downloads: dict[str, asyncio.Lock] = {}
        self.stopped = False

    @property
    def me(self) -> str | None:
        return self.client.user

    # -- JSON shapes -------------------------------------------------------------

    def message_json(self, m: Message) -> dict[str, Any]:
        if m.sender == SYSTEM_SENDER and m.ct == MEMBERSHIP_CT:
            ms = Membership.parse(m.conv, m.seq, m.body, m.ts)
            return self.membership_json(ms)
        out: dict[str, Any] = {
            "kind": "own" if m.sender == self.me else "in",
            "conv": m.conv,
            "seq": m.seq,
            "id": m.id,
            "sender": m.sender,
            "text": _text_of(m.ct, m.body),
            "ts": m.ts,
        }
        if m.ct == ATTACHMENT_CT:
            out.update(attachment_json(m.body))
        return out

    def membership_json(self, m: Membership) -> dict[str, Any]:
        return {
            "kind": "system",
            "conv": m.conv,
            "seq": m.seq,
            "id": f"membership:{m.seq}",
            "sender": "",
            "text": membership_text(m, self.me),
            "ts": m.ts,
        }

    def _conv_of_item(self, to: str | None, conv: str | None) -> str | None:
        if conv is not None:
            return conv
        if to is None or self.me is None:
            return None
        return direct_conv_id(self.me, to)

    def pending_json(self, item: OutboxItem | LocalSend | UploadItem) -> dict[str, Any] | None:
        if isinstance(item, UploadItem):
            mid, to, conv, body, created = item.id, item.to, item.conv, item.ref, item.created
            ct = ATTACHMENT_CT
        elif isinstance(item, LocalSend):
            mid, to, conv, ct, body, created = (
                item.message_id,
                item.to,
                item.conv,
                item.ct,
                item.body,
                item.created,
            )
        else:
            mid, to, conv, ct, body, created = item.id, item.to, item.conv, item.ct, item.body, item.created
        target = self._conv_of_item(to, conv)
        if target is None:
            return None
        out: dict[str, Any] = {
            "kind": "own",
            "conv": target,
            "seq": None,
            "id": mid,
            "sender": self.me or "",
            "text": _text_of(ct, body),
            "ts": created,
        }
        if ct == ATTACHMENT_CT:
            out.update(attachment_json(body, own_pending=True))
        return out

    def _pending_items(self) -> list[OutboxItem | UploadItem]:
        """Own messages not stored by the server yet: file sends still uploading, then the outbox."""
        return [*self.client.pending_uploads(), *self.client.pending_outbox()]

    def chat_json(self, conv: str, name: str | None = None) -> dict[str, Any]:
        pair = direct_members(conv)
        delivered, read = self.client.receipt_state(conv)
        chat: dict[str, Any] = {
            "conv": conv,
            "group": is_group_id(conv),
            "name": name or conv,
            "peer": None,
            "delivered": delivered,
            "read": read,
            "unread": self.client.unread_counts().get(conv, 0),
            "left": conv in self.left,
            "last": None,
        }
        if pair is not None and self.me in pair:
            peer = pair[1] if pair[0] == self.me else pair[0]
            chat["peer"] = peer
            chat["name"] = peer
            chat.update(self._identity_json(peer))
        return chat

    def _identity_json(self, user: str) -> dict[str, Any]:
        """Whether ``user``'s key changed since first seen (unverified since) or is verified."""
        seen = self.client.state.identity(user)
        return {"key_changed": bool(seen and seen[2]), "verified": bool(seen and seen[1])}

    # -- snapshot ------------------------------------------------------------------

    def stop(self, reason: str) -> None:
        """The client gave up for good (a refused token) and closed its state."""
        self.stopped = True
        self.connection, self.connection_detail = "offline", reason

    def snapshot(self) -> dict[str, Any]:
        """Everything the chat list shows, from the client state."""
        if self.stopped:
            return {
                "type": "snapshot",
                "me": None,
                "connection": self.connection,
                "detail": self.connection_detail,
                "chats": [],
            }
        state = self.client.state
        chats: dict[str, dict[str, Any]] = {}
        for group, name in state.chat_groups().items():
            chats[group] = self.chat_json(group, name)
        unread = self.client.unread_counts()
        receipts = state.receipts()
        for s in state.chat_summaries():
            chat = chats.get(s.conv) or self.chat_json(s.conv)
            chat["unread"] = unread.get(s.conv, 0)
            chat["delivered"], chat["read"] = receipts.get(s.conv, (0, 0))
            chat["last"] = self.message_json(Message(s.conv, s.seq, "", s.sender, s.ct, s.body, s.ts))
            chats[s.conv] = chat
        for item in self._pending_items():
            pending = self.pending_json(item)
            if pending is None:
                continue
            chat = chats.get(pending["conv"]) or self.chat_json(pending["conv"])
            chat["last"] = pending
            chats[pending["conv"]] = chat
        peers = [c["peer"] for c in chats.values() if c["peer"]]
        self._subscribe(peers[:PRESENCE_SUBSCRIBE_MAX])
        for chat in chats.values():
            if chat["peer"] in self.presence:
                chat["presence"] = self.presence[chat["peer"]]
        return {
            "type": "snapshot",
            "me": self.me,
            "connection": self.connection,
            "detail": self.connection_detail,
            "chats": list(chats.values()),
        }

    def _subscribe(self, users: list[str]) -> None:
        new = [u for u in users if u not in self._subscribed]
        if not new:
            return
        self._subscribed.update(new)
        # The SDK keeps the set and subscribes again after each reconnect.
        self._spawn(self.client.subscribe_presence(new))

    def _spawn(self, aw: Awaitable[Any]) -> None:
        async def run() -> None:
            with contextlib.suppress(RoostError, ConnectionLost, TimeoutError):
                await aw

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- events from the SDK -------------------------------------------------------

    def event_json(self, event: Event) -> list[dict[str, Any]]:
        """What the pages are told of one SDK event (and what it changes here)."""
        if isinstance(event, Message):
            out: dict[str, Any] = {"type": "message", "message": self.message_json(event)}
            if event.sender == SYSTEM_SENDER:
                return [out]
            out["unread"] = self.client.unread_counts().get(event.conv, 0)
            out["chat"] = self.chat_json(event.conv, self.client.state.chat_groups().get(event.conv))
            if out["chat"]["peer"]:
                self._subscribe([out["chat"]["peer"]])
            return [out]
        if isinstance(event, Membership):
            return self._membership(event)
        if isinstance(event, LocalSend):
            pending = self.pending_json(event)
            if pending is None:
                return []
            chat = self.chat_json(pending["conv"], self.client.state.chat_groups().get(pending["conv"]))
            return [{"type": "message", "message": pending, "chat": chat}]
        if isinstance(event, Sent):
            return [
                {"type": "sent", "id": event.message_id, "conv": event.conv, "seq": event.seq, "ts": event.ts}
            ]
        if isinstance(event, ReceiptEvent):
            delivered, read = self.client.receipt_state(event.conv)
            return [{"type": "receipt", "conv": event.conv, "delivered": delivered, "read": read}]
        if isinstance(event, PresenceEvent):
            self.presence[event.user] = {"online": event.online, "last_seen": event.last_seen}
            return [{"type": "presence", "user": event.user, **self.presence[event.user]}]
        if isinstance(event, TypingEvent):
            return [{"type": "typing", "conv": event.conv, "user": event.user, "active": event.active}]
        if isinstance(event, Consumed):
            counts = self.client.unread_counts()
            return [{"type": "unread", "conv": c, "count": counts.get(c, 0)} for c in event.convs]
        if isinstance(event, Connected):
            self.connection, self.connection_detail = "connected", ""
            return [self._connection_json()]
        if isinstance(event, Disconnected):
            self.presence.clear()  # stale until the SDK subscribes again after the reconnect
            if event.final:
                self.connection, self.connection_detail = "offline", event.reason
            else:
                self.connection, self.connection_detail = "reconnecting", event.reason
            return [self._connection_json()]
        if isinstance(event, IdentityChanged):
            # Never a silent key switch: every page shows it in that user's chat.
            out = {"type": "identity", "user": event.user, "was_verified": event.was_verified}
            return [{**out, **self._identity_json(event.user)}]
        if isinstance(event, Pending):  # in the outbox for a reason other than the connection
            return [{"type": "waiting", "id": event.message_id, "reason": event.reason}]
        if isinstance(event, DecryptionFailed):
            who = event.sender
            text = f"A message from {who} could not be decrypted; {who} was asked to send it again"
            system = {
                "kind": "system",
                "conv": event.conv,
                "seq": event.seq,
                "id": f"failed:{event.message_id}",
            }
            return [
                {
                    "type": "message",
                    "message": {**system, "sender": "", "text": text, "ts": int(self.clock() * 1000)},
                }
            ]
        if isinstance(event, ErrorEvent):
            return [{"type": "error", "code": event.code, "message": event.message, "ref": event.ref}]
        return []

    def _connection_json(self) -> dict[str, Any]:
        return {
            "type": "connection",
            "state": self.connection,
            "detail": self.connection_detail,
            "me": self.me,
        }

    def _membership(self, m: Membership) -> list[dict[str, Any]]:
        state = self.client.state
        if m.name:
            state.save_chat_group(m.conv, m.name)
        if self.me in m.users:
            if m.action in ("removed", "left"):
                self.left.add(m.conv)
            elif m.action in ("created", "added"):
                self.left.discard(m.conv)
        name = state.chat_groups().get(m.conv)
        return [{"type": "message", "message": self.membership_json(m), "chat": self.chat_json(m.conv, name)}]

    async def pump(self) -> None:
        """Relay SDK events to the pages until cancelled."""
        while True:
            event = await self.client.next_event()
            try:
                for out in self.event_json(event):
                    self.broadcast(out)
            except Exception:  # a bug must not stop the relay
                log.exception("relaying %s failed", type(event).__name__)

    # -- commands from a page ------------------------------------------------------

    async def command(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run one command; its reply (``ok`` and the command's fields, or ``error``)."""
        op = request.get("op")
        handler = self.COMMANDS.get(op if isinstance(op, str) else "")
        if handler is None:
            return {"ok": False, "error": f"unknown command {op!r}"}
        if self.stopped:
            return {"ok": False, "error": f"not connected: {self.connection_detail}"}
        try:
            result: dict[str, Any] = await handler(self, request)
        except CommandError as exc:
            return {"ok": False, "error": str(exc)}
        except InvalidArgument as exc:
            return {"ok": False, "error": str(exc)}
        except ConnectionLost:
            return {"ok": False, "error": "not connected to the server"}
        except RoostError as exc:
            return {"ok": False, "error": f"{exc.code}: {exc.message}"}
        except TimeoutError:
            return {"ok": False, "error": "the server did not answer in time"}
        except Exception as exc:  # a bug, or the client closed for good: the page hears of it
            log.exception("command %s failed", op)
            return {"ok": False, "error": f"internal error: {exc!r}"}
        return {"ok": True, **result}

    async def cmd_snapshot(self, _r: dict[str, Any]) -> dict[str, Any]:
        return {"snapshot": self.snapshot()}

    async def cmd_history(self, r: dict[str, Any]) -> dict[str, Any]:
        conv = _conv(r)
        before = r.get("before")
        if before is not None and (isinstance(before, bool) or not isinstance(before, int)):
            raise CommandError("before must be a seq number")
        limit = HISTORY_PAGE
        stored = self.client.local_history(conv, limit, before)
        messages = [self.message_json(m) for m in stored]
        if before is None:
            for item in self._pending_items():
                pending = self.pending_json(item)
                if pending is not None and pending["conv"] == conv:
                    messages.append(pending)
        delivered, read = self.client.receipt_state(conv)
        return {
            "conv": conv,
            "messages": messages,
            "more": len(stored) == limit,
            "delivered": delivered,
            "read": read,
            "unread": self.client.unread_counts().get(conv, 0),
        }

    async def cmd_send(self, r: dict[str, Any]) -> dict[str, Any]:
        conv = _conv(r)
        text = r.get("text")
        if not isinstance(text, str):
            raise CommandError("text must be a string")
        if conv in self.left:
            raise CommandError("you are no longer a member of this group")
        mid = uuid.uuid4().hex
        self._typing_sent.pop(conv, None)  # the next keystroke says "typing" again
        if is_group_id(conv):
            await self.client.send(text, group=conv, message_id=mid, wait=False)
        else:
            peer = self._peer(conv)
            await self.client.send(text, to=peer, message_id=mid, wait=False)
        # In the durable outbox now; its ✓ comes as a "sent" event.
        pending = {
            "kind": "own",
            "conv": conv,
            "seq": None,
            "id": mid,
            "sender": self.me or "",
            "text": text,
            "ts": int(self.clock() * 1000),
        }
        self.broadcast({"type": "message", "message": pending, "chat": self.chat_json(conv)})
        return {"message": pending}

    async def send_file_at(self, conv_arg: object, source: Path) -> dict[str, Any]:
        """Send the file at ``source`` (the page's upload, streamed to disk by
        the server) to ``conv``: encrypted and uploaded by the SDK (durable from
        here on), its message sent once the upload is complete. The upload's
        progress goes to every page as ``progress`` events."""
        if self.stopped:
            raise CommandError(f"not connected: {self.connection_detail}")
        conv = _conv({"conv": conv_arg})
        if conv in self.left:
            raise CommandError("you are no longer a member of this group")
        mid = uuid.uuid4().hex

        def progress(done: int, total: int) -> None:
            self.broadcast({"type": "progress", "id": mid, "conv": conv, "done": done, "total": total})

        if is_group_id(conv):
            await self.client.send_file(source, group=conv, message_id=mid, wait=False, progress=progress)
        else:
            peer = self._peer(conv)
            await self.client.send_file(source, to=peer, message_id=mid, wait=False, progress=progress)
        # send_file returned with the upload committed and nothing awaited since: it is pending.
        upload = next(u for u in self.client.pending_uploads() if u.id == mid)
        pending = self.pending_json(upload)
        assert pending is not None  # its conversation is known
        self.broadcast({"type": "message", "message": pending, "chat": self.chat_json(conv)})
        return {"message": pending}

    async def file_of(self, conv: str, seq: int, cache: Path) -> tuple[Path, str]:
        """The decrypted file of the attachment at ``(conv, seq)``: downloaded
        once into ``cache``; its path and content type."""
        stored = self.client.local_history(conv, 1, seq + 1)
        if not stored or stored[0].seq != seq or stored[0].ct != ATTACHMENT_CT:
            raise CommandError("no such file")
        ref = parse_reference(stored[0].body)
        key = hashlib.sha256(f"{conv}/{seq}".encode()).hexdigest()[:24]
        folder = cache / key
        # One download per file: a player asks for ranges of it side by side,
        # and the decryption's hidden temp file must not be taken for the file.
        lock = self._downloads.setdefault(key, asyncio.Lock())
        async with lock:
            done = [p for p in folder.glob("*") if p.is_file() and not p.name.startswith(".")]
            if not done:
                folder.mkdir(parents=True, exist_ok=True)
                done = [await self.client.download(stored[0], folder)]
        return done[0], ref.content_type

    async def cmd_read(self, r: dict[str, Any]) -> dict[str, Any]:
        conv = _conv(r)
        seq = r.get("seq")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
            raise CommandError("seq must be a positive number")
        await self.client.mark_read(conv, seq)
        count = self.client.unread_counts().get(conv, 0)
        self.broadcast({"type": "unread", "conv": conv, "count": count})
        return {"unread": count}

    async def cmd_typing(self, r: dict[str, Any]) -> dict[str, Any]:
        conv = _conv(r)
        now = self.clock()
        if self.client.connected and now - self._typing_sent.get(conv, float("-inf")) >= TYPING_INTERVAL:
            self._typing_sent[conv] = now
            await self.client.typing(conv)
        return {}

    async def cmd_new_chat(self, r: dict[str, Any]) -> dict[str, Any]:
        user = r.get("user")
        if not isinstance(user, str) or not is_valid_user_name(user.strip().lower()):
            raise CommandError(f"not a user name: {user!r}")
        user = user.strip().lower()
        if self.me is None:
            raise CommandError("not connected yet: your own user name is not known")
        if user == self.me:
            raise CommandError("that is you")
        conv = direct_conv_id(self.me, user)
        self._subscribe([user])
        return {"chat": self.chat_json(conv)}

    async def cmd_new_group(self, r: dict[str, Any]) -> dict[str, Any]:
        name = r.get("name")
        members = _users(r)
        if not isinstance(name, str) or not name.strip():
            raise CommandError("the group needs a name")
        info = await self.client.create_group(name.strip(), members)
        self.client.state.save_chat_group(info.group, info.name)
        return {"chat": self.chat_json(info.group, info.name), "group": self._group_json(info)}

    async def cmd_group_info(self, r: dict[str, Any]) -> dict[str, Any]:
        group = _group(r)
        info = await self.client.group_info(group)
        self.client.state.save_chat_group(info.group, info.name)
        return {"group": self._group_json(info)}

    async def cmd_group_add(self, r: dict[str, Any]) -> dict[str, Any]:
        info = await self.client.add_members(_group(r), _users(r))
        return {"group": self._group_json(info)}

    async def cmd_group_remove(self, r: dict[str, Any]) -> dict[str, Any]:
        info = await self.client.remove_members(_group(r), _users(r))
        return {"group": self._group_json(info)}

    async def cmd_group_leave(self, r: dict[str, Any]) -> dict[str, Any]:
        group = _group(r)
        await self.client.leave_group(group)
        self.left.add(group)
        return {"chat": self.chat_json(group, self.client.state.chat_groups().get(group))}

    async def cmd_search(self, r: dict[str, Any]) -> dict[str, Any]:
        text = r.get("text")
        if not isinstance(text, str) or not text.strip():
            raise CommandError("nothing to search for")
        found = self.client.search_local(text.strip(), SEARCH_LIMIT)
        return {"results": [self.message_json(m) for m in found]}

    async def cmd_receipts(self, r: dict[str, Any]) -> dict[str, Any]:
        """Each other member's marks in ``conv``; with ``seq`` (one of your
        messages), also when each got it and read it (ms, or null)."""
        conv = _conv(r)
        seq = r.get("seq")
        if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 1):
            raise CommandError("seq must be a positive number")
        marks = self.client.receipt_marks(conv)
        out: dict[str, dict[str, int | None]] = {
            user: {"delivered": d, "read": rd} for user, (d, rd) in marks.items()
        }
        if seq is not None:
            for user, (delivered_at, read_at) in self.client.receipt_times(conv, seq).items():
                mark = out.setdefault(user, {"delivered": 0, "read": 0})
                mark.update(delivered_at=delivered_at, read_at=read_at)
        return {"marks": out}

    async def cmd_safety_number(self, r: dict[str, Any]) -> dict[str, Any]:
        peer = self._peer(_conv(r))
        number = await self.client.safety_number(peer)
        return {
            "user": peer,
            "groups": number.groups.split(" "),
            "verified": number.verified,
            "changed": number.changed,
        }

    async def cmd_verify(self, r: dict[str, Any]) -> dict[str, Any]:
        conv = _conv(r)
        verified = r.get("verified")
        if not isinstance(verified, bool):
            raise CommandError("verified must be true or false")
        peer = self._peer(conv)
        self.client.mark_verified(peer, verified)
        self.broadcast({"type": "identity", "user": peer, "was_verified": False, **self._identity_json(peer)})
        return {"chat": self.chat_json(conv)}

    def _group_json(self, info: Any) -> dict[str, Any]:
        return {"group": info.group, "name": info.name, "members": info.members, "admins": info.admins}

    def _peer(self, conv: str) -> str:
        pair = direct_members(conv)
        if pair is None or self.me not in pair:
            raise CommandError(f"not a chat of yours: {conv!r}")
        return pair[1] if pair[0] == self.me else pair[0]

    COMMANDS: dict[str, Callable[[AppBridge, dict[str, Any]], Awaitable[dict[str, Any]]]] = {
        "snapshot": cmd_snapshot,
        "history": cmd_history,
        "send": cmd_send,
        "read": cmd_read,
        "typing": cmd_typing,
        "new_chat": cmd_new_chat,
        "new_group": cmd_new_group,
        "group_info": cmd_group_info,
        "group_add": cmd_group_add,
        "group_remove": cmd_group_remove,
        "group_leave": cmd_group_leave,
        "search": cmd_search,
        "receipts": cmd_receipts,
        "safety_number": cmd_safety_number,
        "verify": cmd_verify,
    }


def _conv(r: dict[str, Any]) -> str:
    conv = r.get("conv")
    if not isinstance(conv, str) or not (is_group_id(conv) or direct_members(conv) is not None):
        raise CommandError(f"not a conversation id: {conv!r}")
    return conv


def _group(r: dict[str, Any]) -> str:
    conv = _conv(r)
    if not is_group_id(conv):
        raise CommandError("not a group")
    return conv


def _users(r: dict[str, Any]) -> list[str]:
    users = r.get("members", [])
    if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
        raise CommandError("members must be a list of user names")
    cleaned = [u.strip().lower() for u in users if u.strip()]
    bad = [u for u in cleaned if not is_valid_user_name(u)]
    if bad:
        raise CommandError(f"not user names: {', '.join(bad)}")
    return cleaned
