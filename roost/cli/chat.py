"""``roost chat``: the interactive terminal chat.

Three layers, so the logic can be tested without a terminal:

* ``ChatView`` - the state model: the lines of every chat (with the ticks of
  own messages computed from receipts), the chat list, presence, typing,
  unread counts and the connection state. Text other users chose goes through
  ``safe_text`` before it is shown. ``apply(event)`` folds an SDK event in and
  returns the ``Changes`` (lines added or updated, whether the status line
  changed, a read marker to send, whether to ring the bell). No I/O, no clock
  of its own: times are passed in.
* ``ChatController`` - the glue between the SDK ``Client`` and the view:
  commands, sends (pending -> ack), the event loop, typing throttling. It
  keeps in the client state what the view must show again after a restart
  (the open chat, group names) and restores it. Unread counts are the
  client state's: received messages no one has shown the user (``roost
  listen`` may have printed some); what the open chat shows it marks
  consumed. It never lets an exception out: failures become error lines.
* ``build_application`` / ``run_chat`` - prompt_toolkit, which only renders
  the view and feeds keystrokes to the controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from enum import Enum
from pathlib import Path
from typing import Any

from roost.client.attachments import (
    ATTACHMENT_CT,
    AttachmentRef,
    BlobTampered,
    InvalidAttachment,
    parse_reference,
)
from roost.client.client import Client, ConnectionLost, GroupInfo, InvalidMessage, RoostError, message_payload
from roost.client.events import (
    Connected,
    Consumed,
    DecryptionFailed,
    Disconnected,
    ErrorEvent,
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
from roost.client.state import CHAT_CURRENT_KEY, ChatSummary, StateInUse
from roost.core.ids import direct_conv_id, direct_members, is_group_id, is_valid_user_name
from roost.protocol.frames import MEMBERSHIP_CT, SYSTEM_SENDER

TYPING_TTL = 5.0  # an incoming "typing" shows for this long unless refreshed
TYPING_INTERVAL = 2.0  # send at most one typing frame per conversation this often
HISTORY_LIMIT = 50
BELL_INTERVAL = 1.0  # at most one bell a second: a reconnect can bring many messages at once
HOME = ""  # the chat key of the pane shown while no chat is open
OPENERS = ("xdg-open", "open")  # /open: the desktop's viewer (Linux, macOS)


def default_save_dir() -> Path:
    """Where /save puts files without a DIR: ~/Downloads if there is one, else the working directory."""
    downloads = Path.home() / "Downloads"
    return downloads if downloads.is_dir() else Path.cwd()


Fragments = list[tuple[str, str]]

HELP = [
    "/to USER               open a 1:1 chat with USER",
    "/group NAME            open a group chat by its name (Tab completes; or by its id, g:...)",
    "/newgroup NAME a,b,c   create a group with members a, b, c and open it",
    "/members               the members of the open group",
    "/add USER...           add members to the open group",
    "/remove USER...        remove members from the open group",
    "/leave                 leave the open group",
    "/history               load older messages of the open chat from the server",
    "/file PATH [CAPTION]   send a file to the open chat (encrypted; photos, videos, anything)",
    "/save N [DIR]          save the file of media message #N (default: ~/Downloads, else here)",
    "/open N                save media message #N to a cache and open it with the desktop's viewer",
    "/help                  this list",
    "/quit                  exit (also Ctrl-C)",
    "anything else is sent to the open chat (start with // to send a line beginning with /)",
    "keys: Alt-↑/Alt-↓ (or Ctrl-P/Ctrl-N) previous/next chat in the list, PageUp/PageDown scroll,",
    "      Tab completes commands, user and group names",
    "ticks: … pending, ✓ sent, ✓✓ delivered, ✓✓ read (blue) = read; the bell rings for news in other chats",
    "🔒 end-to-end encrypted: only the chat's members can read it; a ⚠ line says a contact's key changed",
]
COMMANDS = (
    "to",
    "group",
    "newgroup",
    "members",
    "add",
    "remove",
    "leave",
    "history",
    "file",
    "save",
    "open",
    "help",
    "quit",
)
CHAT_LIST_KEYS = "Alt-↑/↓ switch"


# -- text from other users -----------------------------------------------------

TAB_WIDTH = 4
# C0 controls (but tab and newline, handled apart), DEL, C1 controls, and the bidirectional overrides
# and isolates that can make a line read differently from what it holds.
_UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text(text: str) -> str:
    """Text another user chose, made safe to put on a terminal: tabs become
    spaces, control characters (ESC sequences, BEL, CR, ...) are shown escaped
    (``\\x1b``), and a continuation line is indented so it cannot pass for a
    line of its own (``[14:05] bob: ...``)."""
    lines = [_UNSAFE.sub(_escape, line).expandtabs(TAB_WIDTH) for line in text.split("\n")]
    return "\n  ".join(lines)


# -- ticks and presence ------------------------------------------------------


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{n} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} bytes"


def attachment_text(ref: AttachmentRef, number: int | None = None) -> str:
    """``[image #3: photo.jpg, 1.2 MiB, 640x480] caption``: what a media message shows."""
    label = ref.kind if number is None else f"{ref.kind} #{number}"
    details = [ref.name, human_size(ref.size)]
    if ref.width and ref.height:
        details.append(f"{ref.width}x{ref.height}")
    if ref.duration_ms is not None:
        details.append(f"{ref.duration_ms / 1000:.0f} s")
    text = f"[{label}: {', '.join(details)}]"
    return f"{text} {ref.caption}" if ref.caption else text


def body_text(ct: str, body: bytes, number: int | None = None) -> str:
    """A message body as the chat shows it (before ``safe_text``): text as is,
    an attachment by kind, name and size, anything else by its type and size."""
    if ct.startswith("text/"):
        return body.decode("utf-8", errors="replace")
    if ct == ATTACHMENT_CT:
        try:
            return attachment_text(parse_reference(body), number)
        except InvalidAttachment:
            return "[invalid attachment]"
    return f"[{ct}, {len(body)} bytes]"


class Tick(Enum):
    PENDING = ("…", "class:tick.pending")
    SENT = ("✓", "class:tick.sent")
    DELIVERED = ("✓✓", "class:tick.delivered")
    READ = ("✓✓ read", "class:tick.read")
    FAILED = ("✗", "class:tick.failed")

    @property
    def glyph(self) -> str:
        return self.value[0]

    @property
    def style(self) -> str:
        return self.value[1]


def compute_tick(seq: int | None, all_delivered: int, all_read: int, failed: bool = False) -> Tick:
    """The tick of an own message: pending until acked (``seq``), then from the receipt marks."""
    if failed:
        return Tick.FAILED
    if seq is None:
        return Tick.PENDING
    if all_read >= seq:
        return Tick.READ
    if all_delivered >= seq:
        return Tick.DELIVERED
    return Tick.SENT


def format_presence(online: bool, last_seen: int | None, now: float, tz: tzinfo | None = None) -> str:
    """``online``, ``last seen HH:MM`` (today), ``last seen yesterday HH:MM`` or ``last seen YYYY-MM-DD``."""
    if online:
        return "online"
    if last_seen is None:
        return "offline"
    seen = datetime.fromtimestamp(last_seen, tz)
    today = datetime.fromtimestamp(now, tz).date()
    if seen.date() == today:
        return f"last seen {seen:%H:%M}"
    if (today - seen.date()).days == 1:
        return f"last seen yesterday {seen:%H:%M}"
    return f"last seen {seen:%Y-%m-%d}"


def membership_text(m: Membership, me: str | None) -> str:
    def who(user: str) -> str:
        return "you" if me is not None and user == me else user

    users = ", ".join(who(u) for u in m.users)
    # No actor: the server's administrator (`roost user remove`).
    actor = who(m.actor) if m.actor else "the administrator"
    if m.action == "created":
        text = f'{actor} created group "{safe_text(m.name)}"' if m.name else f"{actor} created the group"
        others = [who(u) for u in m.users if u != m.actor]
        if others:
            text += " with " + ", ".join(others)
    elif m.action == "added":
        text = f"{actor} added {users}"
        # Former members brought back (one removed while offline never saw it).
        back = [
            f"{who(u)} had {'left' if how == 'left' else 'been removed'} earlier" for u, how in m.returning
        ]
        if back:
            text += " (" + ", ".join(back) + ")"
    elif m.action == "removed":
        text = f"{actor} removed {users}"
    elif m.action == "left":
        text = f"{users or actor} left"
    else:
        text = f"membership change ({m.action or 'unknown'})"
    return "Y" + text[1:] if text.startswith("you ") else text


# -- the view model ----------------------------------------------------------


@dataclass(slots=True, eq=False)
class Line:
    """One line of a chat pane.

    ``kind``: ``in`` (someone else's message), ``own``, ``system`` (membership,
    notices) or ``error``. An own line has a ``message_id`` and gets its ``seq``
    at the ack; its tick is computed from the chat's receipts (``ChatView.tick``).
    """

    chat: str
    kind: str
    text: str
    sender: str = ""
    seq: int | None = None
    ts: int | None = None  # ms
    message_id: str | None = None
    failed: str | None = None  # why the server refused an own message
    encrypted: bool = False  # a received message that came end-to-end encrypted (🔒)
    waiting: str | None = None  # why an own message waits in the outbox (no keys yet)

    @property
    def pending(self) -> bool:
        return self.kind == "own" and self.seq is None and self.failed is None


@dataclass(slots=True)
class Changes:
    """What an update changed: lines added or updated (ticks included), the
    status line, and a read marker the controller should send (the messages
    it covers were shown: consumed)."""

    lines: list[Line] = field(default_factory=list)
    status: bool = False
    mark_read: tuple[str, int] | None = None
    bell: bool = False  # news in a chat other than the open one

    def __bool__(self) -> bool:
        return bool(self.lines) or self.status or self.mark_read is not None

    def merge(self, other: Changes) -> Changes:
        self.lines.extend(other.lines)
        self.status = self.status or other.status
        self.bell = self.bell or other.bell
        if other.mark_read is not None and (self.mark_read is None or other.mark_read[1] > self.mark_read[1]):
            self.mark_read = other.mark_read
        return self


class TypingThrottle:
    """At most one typing frame per conversation every ``interval`` seconds."""

    def __init__(self, interval: float = TYPING_INTERVAL) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}

    def ready(self, conv: str, now: float) -> bool:
        last = self._last.get(conv)
        if last is not None and now - last < self.interval:
            return False
        self._last[conv] = now
        return True


class ChatView:
    """Everything the screen shows, as plain data. Chats are keyed by the peer's
    user name (1:1) or the group id (``g:...``); ``HOME`` is the no-chat pane."""

    def __init__(self, me: str | None = None, *, tz: tzinfo | None = None, typing_ttl: float = TYPING_TTL):
        self.me = me
        self.tz = tz
        self.typing_ttl = typing_ttl
        self.connection = "connecting"  # connecting | connected | reconnecting | disconnected
        self.connection_detail = ""
        self.current: str | None = None
        self.chats: dict[str, list[Line]] = {HOME: []}
        self.receipts: dict[str, tuple[int, int]] = {}  # chat -> (all_delivered, all_read)
        self.presence: dict[str, tuple[bool, int | None]] = {}
        self.typing: dict[str, dict[str, float]] = {}  # chat -> user -> expires at
        self.unread: dict[str, int] = {}  # chat -> received messages not shown yet
        self.read_upto: dict[str, int] = {}
        self.last: dict[str, Line] = {}  # chat -> its newest line (the chat list's preview)
        self.group_names: dict[str, str] = {}
        self.group_members: dict[str, set[str]] = {}
        self.left_groups: set[str] = set()
        self.history_loaded: set[str] = set()
        self._seqs: dict[str, set[int]] = {}
        self._own: dict[str, Line] = {}  # message id -> own line
        self.media: list[Message] = []  # media message #N is media[N - 1] (/save N, /open N)

    # keys and conversations ----------------------------------------------------

    def key_of(self, conv: str) -> str:
        """The chat key of a conversation id (the peer for ``d:a:b``)."""
        pair = direct_members(conv)
        if pair is not None and self.me in pair:
            return pair[1] if pair[0] == self.me else pair[0]
        return conv

    def conv_of(self, key: str | None) -> str | None:
        """The conversation id of a chat (None while our own name is unknown)."""
        if not key:
            return None
        if ":" in key:
            return key
        if self.me is None:
            return None
        return direct_conv_id(self.me, key)

    def conversation_exists(self, key: str) -> bool:
        """Whether the server knows the conversation (a 1:1 exists from its first message)."""
        if is_group_id(key):
            return key not in self.left_groups
        return bool(self._seqs.get(key))

    def oldest_seq(self, key: str) -> int | None:
        seqs = self._seqs.get(key)
        return min(seqs) if seqs else None

    def _chat(self, key: str) -> list[Line]:
        return self.chats.setdefault(key, [])

    def _insert(self, key: str, line: Line) -> None:
        """In seq order; own messages still pending stay at the bottom."""
        lines = self._chat(key)
        pos = len(lines)
        assert line.seq is not None
        for i, other in enumerate(lines):
            if (other.seq is not None and other.seq > line.seq) or other.pending:
                pos = i
                break
        lines.insert(pos, line)
        self._seqs.setdefault(key, set()).add(line.seq)
        last = self.last.get(key)
        if last is None or (not last.pending and (last.seq or 0) <= line.seq):
            self.last[key] = line

    def _find_seq(self, key: str, seq: int) -> Line | None:
        for line in self.chats.get(key, ()):
            if line.seq == seq:
                return line
        return None

    # local changes ---------------------------------------------------------------

    def open(self, key: str) -> Changes:
        """Make ``key`` the open chat: its unread count clears and it is marked read."""
        self.current = key
        self._chat(key)
        self.unread.pop(key, None)
        return self._shown(key).merge(Changes(status=True))

    def _shown(self, key: str) -> Changes:
        """The open chat ``key`` was shown: a read marker for what came in
        (the controller also marks it consumed, so it is no longer unread)."""
        changes = Changes()
        conv = self.conv_of(key)
        if conv is None:
            return changes
        lines = self.chats.get(key, ())
        top = max((ln.seq for ln in lines if ln.kind == "in" and ln.seq), default=0)
        if top > self.read_upto.get(key, 0):
            self.read_upto[key] = top
            changes.mark_read = conv, top
        return changes

    def set_unread(self, counts: dict[str, int]) -> Changes:
        """The unread counts from the client state (conv -> unconsumed
        received messages); the open chat has none, it shows them."""
        unread: dict[str, int] = {}
        for conv, n in counts.items():
            key = self.key_of(conv)
            if n and key != self.current:
                unread[key] = unread.get(key, 0) + n
        changed = unread != self.unread
        self.unread = unread
        return Changes(status=changed)

    def restore(self, summary: ChatSummary) -> None:
        """A chat known from the client state (a previous run): listed with its
        newest message and its unread count; its lines load when it is opened."""
        key = self.key_of(summary.conv)
        self._chat(key)
        if key not in self.last:
            own = summary.sender == self.me
            self.last[key] = Line(
                key,
                "own" if own else "in",
                self._preview_text(summary),
                summary.sender,
                summary.seq,
                summary.ts,
            )
        if summary.unread and key != self.current:
            self.unread[key] = summary.unread

    def restore_group(self, group: str, name: str) -> None:
        """A group known from the client state: listed, and openable by its name."""
        self.group_names.setdefault(group, safe_text(name))
        self._chat(group)

    @staticmethod
    def _preview_text(summary: ChatSummary) -> str:
        if summary.sender == SYSTEM_SENDER and summary.ct == MEMBERSHIP_CT:
            return "(membership change)"
        return safe_text(body_text(summary.ct, summary.body))  # the sender chose ct too

    def system(self, text: str, chat: str | None = None, kind: str = "system") -> Line:
        """A notice line in ``chat`` (default: the open chat)."""
        key = chat if chat is not None else (self.current or HOME)
        line = Line(key, kind, text)
        self._chat(key).append(line)
        return line

    def error(self, text: str, chat: str | None = None) -> Line:
        return self.system(text, chat, kind="error")

    def add_pending(self, key: str, message_id: str, text: str, ts: int | None = None) -> Changes:
        """An own message handed to the SDK (in the outbox, …)."""
        if message_id in self._own:
            return Changes()
        line = Line(key, "own", text, sender=self.me or "", ts=ts, message_id=message_id)
        self._chat(key).append(line)
        self._own[message_id] = line
        self.last[key] = line
        return Changes([line])

    def acked(self, message_id: str, conv: str, seq: int, ts: int) -> Changes:
        """The server stored an own message (✓): it moves to its place by seq."""
        line = self._own.get(message_id)
        if line is None or line.seq is not None:
            return Changes()
        key = self.key_of(conv)
        with contextlib.suppress(ValueError):
            self.chats[line.chat].remove(line)
        existing = self._find_seq(key, seq)  # already there from history
        if existing is not None:
            self.chats[key].remove(existing)
        line.chat, line.seq, line.ts = key, seq, ts
        self._insert(key, line)
        return Changes([line])

    def send_failed(self, message_id: str, reason: str) -> Changes:
        line = self._own.get(message_id)
        if line is None or line.seq is not None:
            return Changes()
        line.failed = reason
        return Changes([line, self.error(f"not sent: {reason}", line.chat)])

    def set_group(self, info: GroupInfo) -> Changes:
        self.group_names[info.group] = safe_text(info.name)
        self.group_members[info.group] = set(info.members)
        if self.me is not None and self.me in info.members:
            self.left_groups.discard(info.group)
        return Changes(status=True)

    # events ----------------------------------------------------------------------

    def apply(self, event: object, now: float | None = None) -> Changes:
        """Fold one SDK event into the view."""
        now = time.time() if now is None else now
        if isinstance(event, Message):
            return self.add_message(event)
        if isinstance(event, Membership):
            return self.add_membership(event)
        if isinstance(event, ReceiptEvent):
            return self.update_receipts(event.conv, event.all_delivered, event.all_read)
        if isinstance(event, LocalSend):  # `roost send` of this account, handed to this client
            key = self.key_of(event.conv) if event.conv else (event.to or HOME)
            return self.add_pending(key, event.message_id, body_text(event.ct, event.body), event.created)
        if isinstance(event, Sent):
            return self.acked(event.message_id, event.conv, event.seq, event.ts)
        if isinstance(event, PresenceEvent):
            self.presence[event.user] = (event.online, event.last_seen)
            return Changes(status=event.user == self.current)
        if isinstance(event, TypingEvent):
            return self.set_typing(event.conv, event.user, event.active, now)
        if isinstance(event, Connected):
            was = self.connection
            self.connection, self.connection_detail, self.me = "connected", "", event.user
            changes = Changes(status=True)
            if was == "reconnecting":
                changes.lines.append(self.system("reconnected"))
            return changes
        if isinstance(event, Disconnected):
            was = self.connection
            changes = Changes(status=True)
            self.presence.clear()  # stale until the SDK resubscribes after the reconnect
            self.typing.clear()
            if event.final:
                self.connection, self.connection_detail = "disconnected", event.reason
                if was != "disconnected":
                    changes.lines.append(self.error(f"disconnected: {event.reason}"))
            else:
                self.connection = "reconnecting"
                if was == "connected":
                    changes.lines.append(self.system("connection lost; reconnecting…"))
            return changes
        if isinstance(event, IdentityChanged):
            return Changes([self.identity_changed(event)], status=True, bell=True)
        if isinstance(event, Pending):
            line = self._own.get(event.message_id)
            if line is None or not line.pending:
                return Changes()
            line.waiting = safe_text(event.reason)
            return Changes([line])
        if isinstance(event, DecryptionFailed):
            text = (
                f"a message from {event.sender} could not be decrypted; asked {event.sender} to send it again"
            )
            return Changes([self.system(safe_text(text), self.key_of(event.conv))])
        if isinstance(event, ErrorEvent):
            if event.ref in self._own and self._own[event.ref].pending:
                return self.send_failed(event.ref, f"{event.code}: {event.message}")
            return Changes([self.error(f"error {event.code}: {event.message}")])
        return Changes()

    def identity_changed(self, event: IdentityChanged) -> Line:
        """The warning, in the chat with that user: never a silent key switch."""
        user = safe_text(event.user)
        was = " (it was verified)" if event.was_verified else ""
        return self.error(
            f"⚠ {user}'s security key changed{was}: they reinstalled, or someone is in between."
            f" Compare safety numbers: roost safety-number --with {user}",
            event.user,
        )

    def add_message(self, msg: Message, live: bool = True) -> Changes:
        """A message, live (an event) or from history (``live=False``: no unread count)."""
        if msg.sender == SYSTEM_SENDER and msg.ct == MEMBERSHIP_CT:  # from a history page
            return self.add_membership(Membership.parse(msg.conv, msg.seq, msg.body, msg.ts), live)
        key = self.key_of(msg.conv)
        own = self.me is not None and msg.sender == self.me
        if own and msg.id in self._own:
            return self.acked(msg.id, msg.conv, msg.seq, msg.ts)
        if msg.seq in self._seqs.get(key, ()):
            return Changes()
        text = safe_text(body_text(msg.ct, msg.body, self._media_number(msg)))
        line = Line(key, "own" if own else "in", text, msg.sender, msg.seq, msg.ts, msg.id if own else None)
        line.encrypted = msg.encrypted and not own
        if own:
            self._own[msg.id] = line
        self._insert(key, line)
        changes = Changes([line])
        if own:
            return changes
        if self.typing.get(key, {}).pop(msg.sender, None) is not None:
            changes.status = True
        if key == self.current:
            changes.merge(self._shown(key))
        elif live:
            self.unread[key] = self.unread.get(key, 0) + 1
            changes.status = changes.bell = True
        return changes

    def _media_number(self, msg: Message) -> int | None:
        """The number ``/save`` and ``/open`` know a valid media message by."""
        if msg.ct != ATTACHMENT_CT:
            return None
        try:
            parse_reference(msg.body)
        except InvalidAttachment:
            return None
        self.media.append(msg)
        return len(self.media)

    def media_message(self, number: str) -> Message | None:
        if not number.lstrip("#").isdigit():
            return None
        n = int(number.lstrip("#"))
        return self.media[n - 1] if 0 < n <= len(self.media) else None

    def add_membership(self, m: Membership, live: bool = True) -> Changes:
        key = self.key_of(m.conv)
        if m.seq in self._seqs.get(key, ()):
            return Changes()
        if m.name and (live or key not in self.group_names):
            self.group_names[key] = safe_text(m.name)
        if live:  # history is older than what we know: it must not undo it
            members = self.group_members.setdefault(key, set())
            if m.action in ("created", "added"):
                members.update(m.users)
                if m.actor:
                    members.add(m.actor)
                if self.me in m.users or (m.action == "created" and m.actor == self.me):
                    self.left_groups.discard(key)
            elif m.action in ("removed", "left"):
                members.difference_update(m.users)
                if self.me in m.users:
                    self.left_groups.add(key)
        line = Line(key, "system", membership_text(m, self.me), seq=m.seq, ts=m.ts)
        self._insert(key, line)
        changes = Changes([line], status=True)
        if key == self.current:
            changes.merge(self._shown(key))
        elif live:
            changes.bell = True  # news, but not a message: the unread count is of messages
        return changes

    def add_history(self, key: str, items: Iterable[Message | Membership]) -> Changes:
        """Older messages (local or server history): merged by seq, deduplicated."""
        changes = Changes()
        for item in items:
            if isinstance(item, Membership):
                changes.merge(self.add_membership(item, live=False))
            else:
                changes.merge(self.add_message(item, live=False))
        if key == self.current:
            changes.merge(self._shown(key))
        return changes

    def update_receipts(self, conv: str, all_delivered: int, all_read: int) -> Changes:
        """Receipt marks only grow; returns the own lines whose tick changed."""
        key = self.key_of(conv)
        own = [ln for ln in self.chats.get(key, ()) if ln.kind == "own"]
        before = [self.tick(ln) for ln in own]
        d, r = self.receipts.get(key, (0, 0))
        self.receipts[key] = (max(d, all_delivered), max(r, all_read))
        return Changes([ln for ln, old in zip(own, before, strict=True) if self.tick(ln) != old])

    def set_typing(self, conv: str, user: str, active: bool, now: float) -> Changes:
        key = self.key_of(conv)
        if user == self.me:
            return Changes()
        users = self.typing.setdefault(key, {})
        if active:
            users[user] = now + self.typing_ttl
        else:
            users.pop(user, None)
        return Changes(status=key == self.current)

    # queries -----------------------------------------------------------------------

    def tick(self, line: Line) -> Tick | None:
        if line.kind != "own":
            return None
        d, r = self.receipts.get(line.chat, (0, 0))
        return compute_tick(line.seq, d, r, failed=line.failed is not None)

    def typing_users(self, key: str | None, now: float) -> list[str]:
        users = self.typing.get(key or HOME, {})
        for user in [u for u, until in users.items() if until <= now]:
            del users[user]
        return sorted(users)

    def groups_named(self, name: str) -> list[str]:
        """The ids of the known groups called ``name`` (case does not matter)."""
        wanted = name.casefold()
        return sorted(g for g, n in self.group_names.items() if n.casefold() == wanted)

    def known_users(self) -> list[str]:
        """Users to complete: the peers of 1:1 chats and the members of known groups."""
        users = {key for key in self.chats if key and not is_group_id(key)}
        for members in self.group_members.values():
            users.update(members)
        users.discard(self.me or "")
        return sorted(users)

    def completions(self, text: str) -> tuple[int, list[tuple[str, str]]]:
        """What Tab offers for the input ``text``: (how many characters at its
        end are replaced, [(replacement, what the menu shows)])."""
        if not text.startswith("/") or text.startswith("//"):
            return 0, []
        command, space, arg = text[1:].partition(" ")
        if not space:
            return len(text), [(f"/{c}", f"/{c}") for c in COMMANDS if c.startswith(command.lower())]
        command = command.lower()
        if command == "group":
            return len(arg), self._group_completions(arg)
        if command in ("to", "add", "remove"):
            word = re.split(r"[,\s]", arg)[-1]
            return len(word), [(u, u) for u in self.known_users() if u.startswith(word.lower())]
        return 0, []

    def _group_completions(self, typed: str) -> list[tuple[str, str]]:
        prefix = typed.casefold()
        by_name: dict[str, list[str]] = {}  # as /group compares names: ignoring case
        for group, name in self.group_names.items():
            if group not in self.left_groups and name.casefold().startswith(prefix):
                by_name.setdefault(name.casefold(), []).append(group)
        out: list[tuple[str, str]] = []
        for folded in sorted(by_name):
            groups = sorted(by_name[folded])
            if len(groups) == 1:
                out.append((self.group_names[groups[0]], self.group_names[groups[0]]))
            else:  # two groups share the name: only the id tells them apart
                out.extend((g, f"{self.group_names[g]} ({g})") for g in groups)
        return out

    # the chat list -------------------------------------------------------------------

    def chat_list(self) -> list[str]:
        """Every chat, the one with the newest message first."""
        keys = [key for key in self.chats if key]

        def newest(key: str) -> tuple[int, str]:
            last = self.last.get(key)
            return -(last.ts or 0) if last else 0, self.chat_label(key)

        return sorted(keys, key=newest)

    def adjacent_chat(self, step: int) -> str | None:
        """The chat ``step`` places below (+) or above (-) the open one in the list."""
        keys = self.chat_list()
        if not keys:
            return None
        if self.current not in keys:
            return keys[0 if step > 0 else -1]
        return keys[(keys.index(self.current) + step) % len(keys)]

    def preview(self, key: str) -> str:
        last = self.last.get(key)
        if last is None:
            return ""
        text = last.text.replace("\n  ", " ")
        if last.kind == "own":
            return f"me: {text}"
        if is_group_id(key) and last.kind == "in":
            return f"{last.sender}: {text}"
        return text

    def chat_list_fragments(self, width: int = 28) -> Fragments:
        """The chat list pane: per chat its name and unread count, then the last message."""
        frags: Fragments = [("class:chatlist.title", f" Chats · {CHAT_LIST_KEYS}"[:width] + "\n")]
        for key in self.chat_list():
            current = key == self.current
            count = self.unread.get(key, 0) if not current else 0
            badge = f" {count}" if count else ""
            label = self.chat_label(key)[: max(1, width - 3 - len(badge))]
            style = "class:chatlist.current" if current else "class:chatlist"
            frags.append((style, ("▸ " if current else "  ") + label))
            frags.append(("class:chatlist.unread" if count else style, badge + "\n"))
            frags.append(("class:chatlist.preview", "  " + self.preview(key)[: width - 3] + "\n"))
        return frags

    def chat_list_text(self) -> str:
        return "".join(text for _, text in self.chat_list_fragments())

    def chat_label(self, key: str) -> str:
        if is_group_id(key):
            name = self.group_names.get(key)
            return f"#{name}" if name else key
        return key

    def _hhmm(self, ts_ms: int) -> str:
        return datetime.fromtimestamp(ts_ms / 1000, self.tz).strftime("%H:%M")

    def line_fragments(self, line: Line) -> Fragments:
        frags: Fragments = []
        if line.kind in ("system", "error"):
            if line.ts is not None:
                frags.append(("class:time", f"[{self._hhmm(line.ts)}] "))
            style = "class:error" if line.kind == "error" else "class:system"
            frags.append((style, ("! " if line.kind == "error" else "* ") + line.text))
            return frags
        if line.ts is not None:
            frags.append(("class:time", f"[{self._hhmm(line.ts)}] "))
        if line.encrypted:
            frags.append(("class:lock", "🔒 "))
        if line.kind == "own":
            frags.append(("class:sender.me", "me"))
        else:
            frags.append(("class:sender", line.sender))
        frags.append(("", ": " + line.text))
        tick = self.tick(line)
        if tick is not None:
            frags.append(("", " "))
            frags.append((tick.style, tick.glyph))
        if line.waiting is not None and line.pending:
            frags.append(("class:system", f" ({line.waiting})"))
        return frags

    def line_text(self, line: Line) -> str:
        return "".join(text for _, text in self.line_fragments(line))

    def lines(self, key: str | None = None) -> list[Line]:
        return self.chats.get(self.current or HOME if key is None else key, [])

    def render_fragments(self, key: str | None = None) -> Fragments:
        """The message pane of ``key`` (default: the open chat), lines joined by newlines."""
        frags: Fragments = []
        for i, line in enumerate(self.lines(key)):
            if i:
                frags.append(("", "\n"))
            frags.extend(self.line_fragments(line))
        return frags

    def render_text(self, key: str | None = None) -> str:
        return "".join(text for _, text in self.render_fragments(key))

    def status_fragments(self, now: float) -> Fragments:
        label = {
            "connecting": "connecting…",
            "connected": "connected",
            "reconnecting": "reconnecting…",
            "disconnected": "disconnected",
        }.get(self.connection, self.connection)
        frags: Fragments = [(f"class:status.{self.connection}", f" ● {label} ")]
        if self.me:
            frags.append(("class:status", f"as {self.me} "))
        frags.append(("class:status", "│ "))
        key = self.current
        if not key:
            frags.append(("class:status", "no chat open (/to USER, /group NAME, /help)"))
        else:
            frags.append(("class:status.target", self.chat_label(key)))
            if is_group_id(key):
                if key in self.left_groups:
                    frags.append(("class:status", " · you left"))
                elif self.group_members.get(key):
                    count = len(self.group_members[key])
                    frags.append(("class:status", f" · {count} member{'s' if count != 1 else ''}"))
            elif key in self.presence:
                online, seen = self.presence[key]
                frags.append(("class:status", " · " + format_presence(online, seen, now, self.tz)))
            frags.append(("class:lock", " · 🔒"))
            typing = self.typing_users(key, now)
            if typing:
                if is_group_id(key):
                    verb = "is" if len(typing) == 1 else "are"
                    text = f"{', '.join(typing)} {verb} typing…"
                else:
                    text = "typing…"
                frags.append(("class:status", " · "))
                frags.append(("class:status.typing", text))
        unread = [(k, n) for k, n in self.unread.items() if n and k != key]
        if unread:
            frags.append(("class:status", " │ unread: "))
            frags.append(("class:status.unread", ", ".join(f"{self.chat_label(k)} {n}" for k, n in unread)))
        frags.append(("class:status", " "))
        return frags

    def status_text(self, now: float) -> str:
        return "".join(text for _, text in self.status_fragments(now))


# -- commands ------------------------------------------------------------------


def parse_command(line: str) -> tuple[str, list[str]] | None:
    """``("say", [text])`` for a message, ``(name, args)`` for ``/name args``, None for blank."""
    line = line.rstrip("\r\n")
    if not line.strip():
        return None
    if line.startswith("//"):
        return "say", [line[1:]]
    if not line.startswith("/"):
        return "say", [line]
    name, _, rest = line[1:].partition(" ")
    name = name.lower()
    tokens = rest.split()
    if name == "newgroup":  # /newgroup NAME WITH SPACES a,b,c
        if len(tokens) <= 1:
            return name, tokens
        return name, [" ".join(tokens[:-1]), tokens[-1]]
    if name in ("add", "remove"):
        return name, [u for u in re.split(r"[,\s]+", rest) if u]
    if name == "group":  # /group NAME WITH SPACES
        return name, [" ".join(tokens)] if tokens else []
    if name in ("file", "save") and len(tokens) > 1:  # /file PATH CAPTION WITH SPACES, /save N DIR
        first, _, more = rest.strip().partition(" ")
        return name, [first, more.strip()]
    return name, tokens


def split_users(text: str) -> list[str]:
    return [u.lower() for u in re.split(r"[,\s]+", text) if u]


# -- the controller --------------------------------------------------------------


class ChatController:
    """Runs commands and sends against the SDK and feeds its events to the view.

    Nothing here raises into the UI: every failure becomes an error line.
    """

    def __init__(
        self,
        client: Client,
        view: ChatView,
        *,
        invalidate: Callable[[], None] | None = None,
        on_quit: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
        history_limit: int = HISTORY_LIMIT,
    ) -> None:
        self.client = client
        self.view = view
        self.invalidate: Callable[[], None] = invalidate or (lambda: None)
        self.on_quit: Callable[[], None] = on_quit or (lambda: None)
        self.on_bell: Callable[[], None] = lambda: None  # the terminal's bell, set by the UI
        self._last_bell = float("-inf")
        self.clock = clock
        self.history_limit = history_limit
        self.throttle = TypingThrottle()
        self.exit_code = 0
        self.closed = False  # the client gave up (e.g. auth failed)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._events_task: asyncio.Task[None] | None = None

    # tasks -------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(self._guard(coro, what))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # A task cancelled before it ran (a quick quit) never awaited ``coro``:
        # close it, or Python warns "coroutine ... was never awaited" on exit.
        task.add_done_callback(lambda _task: coro.close())
        return task

    async def _guard(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except ConnectionLost:
            self.view.error(f"{what}: not connected")
        except RoostError as exc:
            self.view.error(f"{what}: {exc.code}: {exc.message}")
        except TimeoutError:
            self.view.error(f"{what}: timed out")
        except Exception as exc:
            self.view.error(f"{what}: {exc!r}")
        finally:
            self.invalidate()

    async def start(self) -> None:
        """Show the outbox left from an earlier run, start connecting and reading events."""
        self.view.system("Roost chat. /to USER opens a 1:1 chat, /group NAME a group, /help lists commands.")
        self._restore()
        restored = self.client.pending_outbox()
        for item in restored:
            key = item.to or item.conv or HOME
            self.view.add_pending(key, item.id, body_text(item.ct, item.body), item.created)
            # The SDK resends it on connect; this only waits for its ack (same id).
            self.spawn(
                self._deliver(item.id, body=item.body, ct=item.ct, to=item.to, group=item.conv), "send"
            )
        uploads = self.client.pending_uploads()
        for upload in uploads:
            key = upload.to or upload.conv or HOME
            self.view.add_pending(key, upload.id, body_text(ATTACHMENT_CT, upload.ref), upload.created)
            self.spawn(self._await_sent(upload.id), "send")
        if restored or uploads:
            count = len(restored) + len(uploads)
            self.view.system(f"{count} unsent message(s) from the last session will be sent.")
        self.spawn(self._connect(), "connect")
        self._events_task = asyncio.ensure_future(self._event_loop())

    def _restore(self) -> None:
        """The chats, unread counts and open chat of the previous run, from the
        client state (own messages and receipt marks are there too: ticks)."""
        me = self.client.user
        if me is None:
            return  # this state never connected: nothing to restore
        self.view.me = me
        state = self.client.state
        for group, name in state.chat_groups().items():
            self.view.restore_group(group, name)
        for summary in state.chat_summaries():
            self.view.restore(summary)
        current = state.get_meta(CHAT_CURRENT_KEY)
        if current:
            self.handle_line(f"/group {current}" if is_group_id(current) else f"/to {current}")

    async def stop(self) -> None:
        tasks = [*self._tasks, *([self._events_task] if self._events_task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if not self.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.client.flush(), 2.0)
        with contextlib.suppress(Exception):
            await self.client.close()

    async def _connect(self) -> None:
        try:
            await self.client.connect(timeout=None)  # retry until connected
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.closed = True
            self.exit_code = 1
            reason = f"{exc.code}: {exc.message}" if isinstance(exc, RoostError) else repr(exc)
            self.view.connection, self.view.connection_detail = "disconnected", reason
            self.view.error(f"cannot connect: {reason} (/quit to exit)")

    async def _event_loop(self) -> None:
        while True:
            event = await self.client.next_event()
            try:
                changes = self.view.apply(event, now=self.clock())
                if isinstance(event, Connected):
                    self._after_connect()
                if isinstance(event, Membership) and event.name:
                    self._save_group_name(event.conv)
                if isinstance(event, Consumed):  # a `roost listen` handed to us printed them
                    changes.merge(self.view.set_unread(self.client.unread_counts()))
                self._keep(changes)
                await self._effects(changes)
            except Exception as exc:  # a bug must not kill the loop
                self.view.error(f"internal error on {type(event).__name__}: {exc!r}")
            self.invalidate()

    def _after_connect(self) -> None:
        key = self.view.current
        if key and key not in self.view.history_loaded:
            self._load_local(key)

    async def _effects(self, changes: Changes) -> None:
        if changes.mark_read is not None and not self.closed:
            conv, seq = changes.mark_read
            await self.client.mark_read(conv, seq)

    def _apply_effects(self, changes: Changes) -> None:
        self._keep(changes)
        if changes.mark_read is not None:
            self.spawn(self._effects(changes), "read marker")

    def _keep(self, changes: Changes) -> None:
        """Into the client state what must outlive this run; and the bell."""
        if changes.mark_read is not None:
            # Shown in the open chat: consumed at once (committed), so neither
            # a restarted chat nor `roost listen` takes it for unread; the read
            # marker to the server may follow later.
            self.client.mark_consumed(*changes.mark_read)
        if changes.bell and self.clock() - self._last_bell >= BELL_INTERVAL:
            self._last_bell = self.clock()
            self.on_bell()

    def _save_group_name(self, group: str) -> None:
        name = self.view.group_names.get(group)
        if name:
            self.client.state.save_chat_group(group, name)

    def _set_group(self, info: GroupInfo) -> None:
        self.view.set_group(info)
        self.client.state.save_chat_group(info.group, info.name)

    # input ---------------------------------------------------------------------------

    def handle_line(self, line: str) -> None:
        try:
            parsed = parse_command(line)
            if parsed is None:
                return
            name, args = parsed
            if name == "say":
                self.say(args[0])
                return
            handler = getattr(self, f"cmd_{name}", None)
            if handler is None:
                self.view.error(f"unknown command /{name}; /help lists the commands")
                return
            try:
                inspect.signature(handler).bind(*args)
            except TypeError:
                self.view.error(f"wrong arguments for /{name}; see /help")
                return
            handler(*args)
        except Exception as exc:
            self.view.error(f"{exc!r}")
        finally:
            self.invalidate()

    def on_input_changed(self, text: str) -> None:
        """Called on every edit of the input line: tells the chat we are typing (throttled)."""
        if not text.strip() or text.startswith("/") or self.closed:
            return
        key = self.view.current
        conv = self.view.conv_of(key)
        if not key or conv is None or not self.view.conversation_exists(key):
            return  # a 1:1 exists on the server only from its first message
        if not self.client.connected:
            return
        if self.throttle.ready(conv, self.clock()):
            self.spawn(self.client.typing(conv), "typing")

    def say(self, text: str) -> None:
        key = self.view.current
        if not key:
            self.view.error("no chat open: /to USER or /group NAME first")
            return
        try:  # refused at once, before a line for it is drawn
            message_payload(text, None)
        except InvalidMessage as exc:
            self.view.error(f"not sent: {exc}", key)
            return
        mid = uuid.uuid4().hex
        self.view.add_pending(key, mid, text, int(self.clock() * 1000))
        if is_group_id(key):
            self.spawn(self._deliver(mid, text=text, group=key), "send")
        else:
            self.spawn(self._deliver(mid, text=text, to=key), "send")

    async def _deliver(
        self,
        mid: str,
        *,
        text: str | None = None,
        body: bytes | None = None,
        ct: str = "text/plain",
        to: str | None = None,
        group: str | None = None,
    ) -> None:
        try:
            result = await self.client.send(text, body=body, ct=ct, to=to, group=group, message_id=mid)
        except ConnectionLost:
            return  # the client closed; the message stays in the durable outbox
        except RoostError as exc:
            self.view.send_failed(mid, f"{exc.code}: {exc.message}")
        except (ValueError, OSError, RuntimeError) as exc:
            self.view.send_failed(mid, str(exc) or type(exc).__name__)
        except Exception as exc:  # e.g. the state file was closed after a fatal error
            self.view.send_failed(mid, repr(exc))
        else:
            if self.view.me is None:  # the ack can overtake the Connected event
                self.view.me = self.client.user
            self.view.acked(result.message_id, result.conv, result.seq, result.ts)
        self.invalidate()

    async def _await_sent(self, mid: str) -> None:
        """The ✓ of a file send left from an earlier run (the SDK resumes its upload)."""
        try:
            result = await self.client.wait_sent(mid)
        except ConnectionLost:
            return
        except RoostError as exc:
            self.view.send_failed(mid, f"{exc.code}: {exc.message}")
        else:
            self.view.acked(result.message_id, result.conv, result.seq, result.ts)
        self.invalidate()

    async def _deliver_file(self, mid: str, path: Path, caption: str, key: str) -> None:
        group, to = (key, None) if is_group_id(key) else (None, key)
        try:
            result = await self.client.send_file(
                path, to=to, group=group, caption=caption or None, message_id=mid
            )
        except ConnectionLost:
            return
        except RoostError as exc:
            self.view.send_failed(mid, f"{exc.code}: {exc.message}")
        except (ValueError, OSError) as exc:
            self.view.send_failed(mid, str(exc) or type(exc).__name__)
        else:
            assert not isinstance(result, str)
            if self.view.me is None:
                self.view.me = self.client.user
            self.view.acked(result.message_id, result.conv, result.seq, result.ts)
        self.invalidate()

    # commands ------------------------------------------------------------------------

    def cmd_file(self, path: str, caption: str = "") -> None:
        key = self.view.current
        if not key:
            self.view.error("no chat open: /to USER or /group NAME first")
            return
        source = Path(path).expanduser()
        if not source.is_file():
            self.view.error(f"not sent: {path} is not a file", key)
            return
        mid = uuid.uuid4().hex
        text = f"[file: {source.name}, {human_size(source.stat().st_size)}] {caption}".rstrip()
        self.view.add_pending(key, mid, safe_text(text), int(self.clock() * 1000))
        self.spawn(self._deliver_file(mid, source, caption, key), "send file")

    def cmd_save(self, number: str, directory: str = "") -> None:
        msg = self.view.media_message(number)
        if msg is None:
            self.view.error(f"no media message #{number.lstrip('#')}")
            return
        folder = Path(directory).expanduser() if directory else default_save_dir()
        self.spawn(self._save(msg, folder, open_it=False), "save")

    def cmd_open(self, number: str) -> None:
        msg = self.view.media_message(number)
        if msg is None:
            self.view.error(f"no media message #{number.lstrip('#')}")
            return
        self.spawn(self._save(msg, self.client.media_folder() / "opened", open_it=True), "open")

    async def _save(self, msg: Message, folder: Path, open_it: bool) -> None:
        key = self.view.key_of(msg.conv)
        self.view.system("downloading…", key)
        self.invalidate()
        try:
            path = await self.client.download(msg, folder)
        except (InvalidAttachment, BlobTampered) as exc:
            self.view.error(f"not saved: {exc}", key)
            return
        self.view.system(f"saved to {safe_text(str(path))}", key)
        if open_it:
            opener = next((o for o in OPENERS if shutil.which(o)), None)
            if opener is None:
                self.view.error(f"no viewer found ({', '.join(OPENERS)}); the file is at {path}", key)
                return
            await asyncio.create_subprocess_exec(
                opener,
                str(path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # the viewer outlives the chat; its output stays off the screen
            )

    def _open(self, key: str) -> None:
        prev = self.view.current
        if prev and prev != key and not is_group_id(prev):
            self.spawn(self.client.unsubscribe_presence([prev]), "presence")
        self._apply_effects(self.view.open(key))
        self._load_local(key)
        self.client.state.set_meta(CHAT_CURRENT_KEY, key)

    def _load_local(self, key: str) -> None:
        conv = self.view.conv_of(key)
        if conv is None:
            return  # our own name is known once connected; loaded then
        self.view.history_loaded.add(key)
        try:
            messages = self.client.local_history(conv, self.history_limit)
        except Exception as exc:
            self.view.error(f"local history: {exc!r}")
            return
        self._apply_effects(self.view.add_history(key, messages))
        self.view.update_receipts(conv, *self.client.receipt_state(conv))  # ticks of a previous run

    def _current_group(self) -> str | None:
        key = self.view.current
        if key and is_group_id(key):
            return key
        self.view.error("no group open: /group NAME first")
        return None

    def cmd_to(self, user: str) -> None:
        user = user.lower()
        if not is_valid_user_name(user):
            self.view.error(f"not a user name: {user!r}")
            return
        if user == self.view.me:
            self.view.error("that is you")
            return
        self._open(user)
        self.spawn(self.client.subscribe_presence([user]), "presence")

    def cmd_group(self, name: str) -> None:
        """``/group NAME``: a known group by its name; by its id (``g:...``) when
        two share the name, or for a group this client has not seen yet."""
        if is_group_id(name):
            group = name
        else:
            groups = self.view.groups_named(name)
            if not groups:
                known = ", ".join(sorted({n for n in self.view.group_names.values()}, key=str.casefold))
                self.view.error(f"no group named {name!r}" + (f" (known: {known})" if known else ""))
                return
            if len(groups) > 1:
                self.view.error(
                    f"{len(groups)} groups are named {name!r}: {', '.join(groups)}; /group ID opens one"
                )
                return
            group = groups[0]
        self._open(group)
        self.spawn(self._group_info(group), "group")

    def cmd_members(self) -> None:
        group = self._current_group()
        if group is not None:
            self.spawn(self._show_members(group), "members")

    async def _show_members(self, group: str) -> None:
        info = await self.client.group_info(group)
        self._set_group(info)
        admins = set(info.admins)
        names = [f"{m} (admin)" if m in admins else m for m in sorted(info.members)]
        self.view.system(f"{len(names)} member{'s' if len(names) != 1 else ''}: {', '.join(names)}", group)

    def switch_chat(self, step: int) -> None:
        """Open the next (+1) or previous (-1) chat of the chat list."""
        key = self.view.adjacent_chat(step)
        if key is None or key == self.view.current:
            return
        if is_group_id(key):
            self.cmd_group(key)
        else:
            self.cmd_to(key)
        self.invalidate()

    async def _group_info(self, group: str) -> None:
        with contextlib.suppress(ConnectionLost, TimeoutError):
            self._set_group(await self.client.group_info(group))

    def cmd_newgroup(self, name: str = "", members: str = "") -> None:
        if not name:
            self.view.error("usage: /newgroup NAME a,b,c")
            return
        self.spawn(self._newgroup(name, split_users(members)), "new group")

    async def _newgroup(self, name: str, members: list[str]) -> None:
        info = await self.client.create_group(name, members)
        self._set_group(info)
        self._open(info.group)
        self.view.system(f"group id {info.group} (others open it with /group {info.group})")

    def cmd_add(self, *users: str) -> None:
        group = self._current_group()
        if group is None:
            return
        if not users:
            self.view.error("usage: /add USER...")
            return
        self.spawn(self._members(group, "add", [u.lower() for u in users]), "add")

    def cmd_remove(self, *users: str) -> None:
        group = self._current_group()
        if group is None:
            return
        if not users:
            self.view.error("usage: /remove USER...")
            return
        self.spawn(self._members(group, "remove", [u.lower() for u in users]), "remove")

    def cmd_leave(self) -> None:
        group = self._current_group()
        if group is not None:
            self.spawn(self._members(group, "leave", []), "leave")

    async def _members(self, group: str, action: str, users: Sequence[str]) -> None:
        if action == "add":
            info = await self.client.add_members(group, users)
        elif action == "remove":
            info = await self.client.remove_members(group, users)
        else:
            await self.client.leave_group(group)
            self.view.left_groups.add(group)
            return
        self._set_group(info)

    def cmd_history(self) -> None:
        key = self.view.current
        conv = self.view.conv_of(key)
        if not key or conv is None:
            self.view.error("no chat open" if not key else "not connected yet")
            return
        self.spawn(self._history(key, conv, self.view.oldest_seq(key)), "history")

    async def _history(self, key: str, conv: str, before: int | None) -> None:
        messages, _last = await self.client.history(conv, before=before, limit=self.history_limit)
        if not messages:
            self.view.system("no older messages", key)
            return
        changes = self.view.add_history(key, messages)
        self.view.system(f"loaded {len(messages)} older message(s)", key)
        await self._effects(changes)

    def cmd_help(self) -> None:
        for text in HELP:
            self.view.system(text)

    def cmd_quit(self) -> None:
        self.on_quit()

    cmd_exit = cmd_quit


# -- prompt_toolkit --------------------------------------------------------------------

STYLE = {
    "time": "#888888",
    "sender": "bold",
    "sender.me": "bold ansigreen",
    "system": "italic #999999",
    "lock": "#5fafaf",
    "error": "ansired",
    "tick.pending": "#888888",
    "tick.sent": "#aaaaaa",
    "tick.delivered": "#dddddd",
    "tick.read": "bold ansibrightblue",
    "tick.failed": "bold ansired",
    "status": "bg:#303030 #eeeeee",
    "status.connecting": "bg:#303030 ansiyellow bold",
    "status.connected": "bg:#303030 ansigreen bold",
    "status.reconnecting": "bg:#303030 ansiyellow bold",
    "status.disconnected": "bg:#303030 ansired bold",
    "status.target": "bg:#303030 #ffffff bold",
    "status.typing": "bg:#303030 ansigreen italic",
    "status.unread": "bg:#303030 ansiyellow bold",
    "chatlist.title": "bold #aaaaaa",
    "chatlist": "",
    "chatlist.current": "reverse bold",
    "chatlist.unread": "bold ansiyellow",
    "chatlist.preview": "#888888",
    "chatlist.border": "#555555",
}
CHAT_LIST_WIDTH = 28
CHAT_LIST_MIN_COLUMNS = 64  # narrower terminals hide the chat list


def _completer(view: ChatView) -> Any:
    """prompt_toolkit's side of ``ChatView.completions`` (Tab in the input line)."""
    from prompt_toolkit.completion import Completer, Completion

    class ViewCompleter(Completer):
        def get_completions(self, document: Any, complete_event: Any) -> Any:
            replaced, options = view.completions(document.text_before_cursor)
            for text, display in options:
                yield Completion(text, start_position=-replaced, display=display)

    return ViewCompleter()


def build_application(controller: ChatController) -> Any:
    """The prompt_toolkit application: chat list and message pane side by side,
    status line, input line (with Tab completion)."""
    from prompt_toolkit.application import Application
    from prompt_toolkit.application.current import get_app
    from prompt_toolkit.data_structures import Point
    from prompt_toolkit.filters import Condition, has_completions
    from prompt_toolkit.formatted_text import FormattedText
    from prompt_toolkit.key_binding import KeyBindings
    from prompt_toolkit.layout import (
        ConditionalContainer,
        Float,
        FloatContainer,
        HSplit,
        Layout,
        VSplit,
        Window,
    )
    from prompt_toolkit.layout.controls import FormattedTextControl
    from prompt_toolkit.layout.menus import CompletionsMenu
    from prompt_toolkit.styles import Style
    from prompt_toolkit.widgets import TextArea

    view = controller.view
    scroll = {"back": 0}

    # FormattedText: prompt_toolkit's own fragment list type (a plain list of
    # pairs is not one to a type checker: lists are invariant).
    def pane() -> FormattedText:
        return FormattedText(view.render_fragments())

    def cursor() -> Point:
        count = sum(text.count("\n") for _, text in view.render_fragments()) + 1
        scroll["back"] = min(scroll["back"], count - 1)
        return Point(0, max(0, count - 1 - scroll["back"]))

    messages = Window(
        FormattedTextControl(pane, get_cursor_position=cursor, focusable=False, show_cursor=False),
        wrap_lines=True,
    )
    status = Window(
        FormattedTextControl(lambda: FormattedText(view.status_fragments(controller.clock()))),
        height=1,
        style="class:status",
    )

    def accept(buffer: Any) -> bool:
        scroll["back"] = 0
        controller.handle_line(buffer.text)
        return False  # clear the input line

    entry = TextArea(
        height=1,
        prompt="> ",
        multiline=False,
        wrap_lines=False,
        accept_handler=accept,
        completer=_completer(view),
        complete_while_typing=False,  # Tab asks
    )
    chat_list = ConditionalContainer(
        VSplit(
            [
                Window(
                    FormattedTextControl(
                        lambda: FormattedText(view.chat_list_fragments(CHAT_LIST_WIDTH)), focusable=False
                    ),
                    width=CHAT_LIST_WIDTH,
                    wrap_lines=False,
                ),
                Window(width=1, char="│", style="class:chatlist.border"),
            ]
        ),
        # On a narrow terminal the messages need the room; the keys still switch chats.
        filter=Condition(lambda: get_app().output.get_size().columns >= CHAT_LIST_MIN_COLUMNS),
    )
    entry.buffer.on_text_changed += lambda buffer: controller.on_input_changed(buffer.text)

    kb = KeyBindings()

    @kb.add("c-c")
    @kb.add("c-q")
    @kb.add("<sigint>")  # SIGINT from outside (kill -INT): prompt_toolkit turns it into this key
    def _quit(event: Any) -> None:
        controller.on_quit()

    @kb.add("c-d", filter=Condition(lambda: not entry.text))
    def _eof(event: Any) -> None:
        controller.on_quit()

    @kb.add("escape", "up")  # Alt-↑ (also the xterm form, ESC [1;3A)
    @kb.add("c-p", filter=~has_completions)
    def _previous_chat(event: Any) -> None:
        controller.switch_chat(-1)

    @kb.add("escape", "down")
    @kb.add("c-n", filter=~has_completions)
    def _next_chat(event: Any) -> None:
        controller.switch_chat(+1)

    @kb.add("pageup")
    def _up(event: Any) -> None:
        height = messages.render_info.window_height if messages.render_info else 10
        scroll["back"] += max(1, height - 1)

    @kb.add("pagedown")
    def _down(event: Any) -> None:
        height = messages.render_info.window_height if messages.render_info else 10
        scroll["back"] = max(0, scroll["back"] - max(1, height - 1))

    app: Application[int] = Application(
        layout=Layout(
            FloatContainer(
                HSplit([VSplit([chat_list, messages]), status, entry]),
                floats=[Float(xcursor=True, ycursor=True, content=CompletionsMenu(max_height=8))],
            ),
            focused_element=entry,
        ),
        key_bindings=kb,
        style=Style.from_dict(STYLE),
        full_screen=True,
        refresh_interval=1.0,  # typing indicators expire, "last seen" ages
    )

    def quit_app() -> None:
        with contextlib.suppress(Exception):
            if app.is_running and not app.future.done():  # type: ignore[union-attr]
                app.exit(result=controller.exit_code)

    controller.invalidate = app.invalidate
    controller.on_quit = quit_app
    controller.on_bell = app.output.bell
    return app


class _ViewLogHandler(logging.Handler):
    """SDK warnings go to the pane instead of scribbling over the screen."""

    def __init__(self, controller: ChatController) -> None:
        super().__init__(logging.WARNING)
        self.controller = controller

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.controller.view.error(f"{record.name}: {record.getMessage()}")
            self.controller.invalidate()


async def chat_main(urls: list[str], token: str, state: str | None, ca_file: str | None = None) -> int:
    client = Client(urls, token, state_path=state, ca_file=ca_file)
    view = ChatView()
    controller = ChatController(client, view)
    app = build_application(controller)

    loop = asyncio.get_running_loop()

    def on_loop_error(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        view.error(f"{context.get('message', 'error')}{f': {exc!r}' if exc else ''}")
        controller.invalidate()

    loop.set_exception_handler(on_loop_error)
    logger = logging.getLogger("roost")
    handler = _ViewLogHandler(controller)
    old_propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        await controller.start()
        try:
            result = await app.run_async(set_exception_handler=False)
        finally:
            await controller.stop()
    finally:
        logger.removeHandler(handler)
        logger.propagate = old_propagate
    return int(result or controller.exit_code)


def run_chat(urls: list[str], token: str, state: str | None, ca_file: str | None = None) -> int:
    """``roost chat``: the interactive chat until /quit or Ctrl-C."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print(
            "roost: roost chat needs a terminal (stdin and stdout);"
            " in scripts use roost send and roost listen",
            file=sys.stderr,
        )
        return 2
    try:
        return asyncio.run(chat_main(list(urls), token, state, ca_file))
    except KeyboardInterrupt:
        return 130
    except StateInUse as exc:
        print(f"roost: {exc}", file=sys.stderr)
        return 1
