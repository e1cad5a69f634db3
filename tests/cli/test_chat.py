"""The terminal chat: the view model without a terminal, the controller against
a fake SDK client, and one end-to-end run of ``roost chat`` inside tmux."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from roost.cli.chat import (
    HOME,
    TYPING_TTL,
    ChatController,
    ChatView,
    Tick,
    TypingThrottle,
    compute_tick,
    format_presence,
    parse_command,
)
from roost.client import (
    Client,
    Connected,
    Consumed,
    Disconnected,
    ErrorEvent,
    GroupInfo,
    LocalSend,
    Membership,
    Message,
    PresenceEvent,
    ReceiptEvent,
    RoostError,
    SendResult,
    Sent,
    TypingEvent,
)
from roost.client.attachments import ATTACHMENT_CT, BlobTampered
from roost.client.state import ChatSummary, ClientState
from tests.cli_subprocess import run_roost
from tests.e2e.helpers import publish_keys

ROOT = Path(__file__).resolve().parents[2]
DM = "d:alice:bob"
GROUP = "g:00112233445566ff"
T0 = int(datetime(2024, 3, 5, 14, 5, tzinfo=UTC).timestamp())  # a Tuesday, 14:05 UTC


def msg(seq: int, sender: str = "bob", text: str = "hi", conv: str = DM, mid: str | None = None) -> Message:
    return Message(conv, seq, mid or f"id{seq}", sender, "text/plain", text.encode(), T0 * 1000)


def member(seq: int, action: str, actor: str, users: tuple[str, ...], name: str = "") -> Membership:
    return Membership(GROUP, seq, action, actor, users, name, T0 * 1000)


def view_with_chat(key: str = "bob") -> ChatView:
    view = ChatView(me="alice", tz=UTC)
    view.open(key)
    return view


# -- ticks -------------------------------------------------------------------------


def test_compute_tick_table() -> None:
    assert compute_tick(None, 0, 0) is Tick.PENDING
    assert compute_tick(3, 2, 0) is Tick.SENT
    assert compute_tick(3, 3, 2) is Tick.DELIVERED
    assert compute_tick(3, 5, 3) is Tick.READ
    assert compute_tick(3, 5, 5, failed=True) is Tick.FAILED
    assert [t.glyph for t in (Tick.PENDING, Tick.SENT, Tick.DELIVERED)] == ["…", "✓", "✓✓"]
    assert Tick.READ.style != Tick.DELIVERED.style  # read is coloured


def test_tick_progresses_pending_sent_delivered_read_in_place() -> None:
    view = view_with_chat()
    changes = view.add_pending("bob", "m1", "hello", T0 * 1000)
    line = changes.lines[0]
    assert view.tick(line) is Tick.PENDING
    assert view.render_text() == "[14:05] me: hello …"

    changes = view.acked("m1", DM, 1, T0 * 1000)
    assert changes.lines == [line]
    assert view.tick(line) is Tick.SENT
    assert view.render_text() == "[14:05] me: hello ✓"

    # A receipt for something older does not touch it.
    assert not view.apply(ReceiptEvent(DM, {"bob": (0, 0)}, 0, 0))
    changes = view.apply(ReceiptEvent(DM, {"bob": (1, 0)}, 1, 0))
    assert changes.lines == [line]
    assert view.render_text() == "[14:05] me: hello ✓✓"

    changes = view.apply(ReceiptEvent(DM, {"bob": (1, 1)}, 1, 1))
    assert changes.lines == [line]
    assert view.tick(line) is Tick.READ
    assert view.render_text() == "[14:05] me: hello ✓✓ read"
    assert view.line_fragments(line)[-1] == (Tick.READ.style, "✓✓ read")
    assert len(view.lines()) == 1  # updated in place, never duplicated


def test_receipts_only_grow_and_cover_each_message_by_seq() -> None:
    view = view_with_chat()
    for i in (1, 2, 3):
        view.add_pending("bob", f"m{i}", f"t{i}")
        view.acked(f"m{i}", DM, i, T0 * 1000)
    view.apply(ReceiptEvent(DM, {"bob": (3, 1)}, 3, 1))
    view.apply(ReceiptEvent(DM, {"bob": (2, 0)}, 2, 0))  # stale, out of order
    assert [view.tick(ln) for ln in view.lines()] == [Tick.READ, Tick.DELIVERED, Tick.DELIVERED]


def test_late_ack_moves_the_line_to_its_seq_and_history_does_not_duplicate() -> None:
    view = view_with_chat()
    view.add_pending("bob", "m1", "mine")
    view.apply(msg(2, text="theirs"))  # arrives before our ack is processed
    assert [ln.text for ln in view.lines()] == ["theirs", "mine"]  # pending stays at the bottom
    view.acked("m1", DM, 1, T0 * 1000)
    assert [ln.text for ln in view.lines()] == ["mine", "theirs"]
    # The same messages again from local history: nothing new.
    changes = view.add_history("bob", [msg(1, sender="alice", text="mine", mid="m1"), msg(2, text="theirs")])
    assert not changes.lines
    assert len(view.lines()) == 2


def test_send_refused_by_server_shows_failed_tick_and_error_line() -> None:
    view = view_with_chat()
    view.add_pending("bob", "m1", "x")
    view.apply(ErrorEvent("not_member", "not a member", "m1"))
    assert view.render_text().splitlines() == ["me: x ✗", "! not sent: not_member: not a member"]


def test_a_send_handed_over_by_another_command_is_an_own_line_in_its_chat() -> None:
    view = view_with_chat("bob")
    changes = view.apply(LocalSend("m1", "carol", None, "text/plain", b"from a script", T0 * 1000))
    assert [ln.text for ln in changes.lines] == ["from a script"]
    assert view.lines() == []  # carol's chat, not the open one
    (line,) = view.lines("carol")
    assert line.kind == "own" and view.tick(line) is Tick.PENDING
    view.apply(Sent("m1", "d:alice:carol", 1, T0 * 1000))
    assert view.tick(line) is Tick.SENT and line.seq == 1
    view.apply(ReceiptEvent("d:alice:carol", {"carol": (1, 0)}, 1, 0))
    assert view.tick(line) is Tick.DELIVERED
    view.apply(LocalSend("m2", None, GROUP, "text/plain", b"to the group", T0 * 1000))
    assert [ln.text for ln in view.lines(GROUP)] == ["to the group"]
    assert view.unread == {}  # the user's own messages are never unread


# -- reading, unread, history ------------------------------------------------------------


def test_message_in_open_chat_is_marked_read_and_elsewhere_counts_unread() -> None:
    view = view_with_chat()
    assert view.apply(msg(1)).mark_read == (DM, 1)
    assert view.render_text() == "[14:05] bob: hi"

    changes = view.apply(msg(1, sender="carol", conv="d:alice:carol"))
    assert changes.mark_read is None and changes.status
    assert view.unread == {"carol": 1}
    assert "unread: carol 1" in view.status_text(T0)

    changes = view.open("carol")
    assert changes.mark_read == ("d:alice:carol", 1)
    assert "unread" not in view.status_text(T0)
    assert view.open("carol").mark_read is None  # already marked


def test_history_merges_older_messages_in_seq_order_with_own_ticks() -> None:
    view = view_with_chat()
    view.apply(msg(5, text="new"))
    view.apply(ReceiptEvent(DM, {"bob": (4, 3)}, 4, 3))
    page = [msg(3, sender="alice", text="old mine"), msg(4, sender="alice", text="older mine"), msg(2)]
    view.add_history("bob", page)
    assert view.render_text().splitlines() == [
        "[14:05] bob: hi",
        "[14:05] me: old mine ✓✓ read",
        "[14:05] me: older mine ✓✓",
        "[14:05] bob: new",
    ]
    assert view.oldest_seq("bob") == 2
    assert view.unread == {}  # history is not news


# -- presence and typing -------------------------------------------------------------------


def test_format_presence() -> None:
    now = T0 + 3600
    assert format_presence(True, None, now, UTC) == "online"
    assert format_presence(False, None, now, UTC) == "offline"
    assert format_presence(False, T0, now, UTC) == "last seen 14:05"
    assert format_presence(False, T0 - 86400, now, UTC) == "last seen yesterday 14:05"
    assert format_presence(False, T0 - 5 * 86400, now, UTC) == "last seen 2024-02-29"


def test_status_line_shows_connection_target_and_presence() -> None:
    view = ChatView(tz=UTC)
    assert "connecting" in view.status_text(T0)
    assert "no chat open" in view.status_text(T0)
    view.apply(Connected("alice"))
    view.open("bob")
    assert view.status_text(T0).startswith(" ● connected as alice │ bob")
    assert view.apply(PresenceEvent("bob", False, T0 - 60)).status
    assert "bob · last seen 14:04" in view.status_text(T0)
    assert not view.apply(PresenceEvent("carol", True, None)).status  # not the open chat
    view.apply(PresenceEvent("bob", True, None))
    assert "bob · online" in view.status_text(T0)

    changes = view.apply(Disconnected(1006, "connection lost", final=False))
    assert "reconnecting" in view.status_text(T0)
    assert "online" not in view.status_text(T0)  # stale presence is not shown
    assert changes.lines[0].text == "connection lost; reconnecting…"
    assert view.apply(Connected("alice")).lines[0].text == "reconnected"
    view.apply(Disconnected(4001, "auth_failed: bad token", final=True))
    assert "disconnected" in view.status_text(T0)
    assert view.lines()[-1].kind == "error"


def test_typing_indicator_expires_and_clears() -> None:
    view = view_with_chat()
    now = 1000.0
    assert view.apply(TypingEvent(DM, "bob", True), now=now).status
    assert view.typing_users("bob", now + 1) == ["bob"]
    assert "typing…" in view.status_text(now + 1)
    assert view.typing_users("bob", now + TYPING_TTL + 0.1) == []
    assert "typing" not in view.status_text(now + TYPING_TTL + 0.1)

    view.apply(TypingEvent(DM, "bob", True), now=now)
    view.apply(TypingEvent(DM, "bob", True), now=now + 4)  # refreshed
    assert view.typing_users("bob", now + TYPING_TTL + 1) == ["bob"]
    view.apply(msg(1), now=now + 5)  # the message it was typing arrived
    assert view.typing_users("bob", now + 5) == []

    view.apply(TypingEvent(DM, "bob", True), now=now)
    view.apply(TypingEvent(DM, "bob", False), now=now + 1)
    assert view.typing_users("bob", now + 1) == []


def test_typing_in_a_group_names_who() -> None:
    view = view_with_chat(GROUP)
    view.apply(TypingEvent(GROUP, "bob", True), now=10)
    assert "bob is typing…" in view.status_text(11)
    view.apply(TypingEvent(GROUP, "carol", True), now=10)
    assert "bob, carol are typing…" in view.status_text(11)


def test_typing_throttle() -> None:
    throttle = TypingThrottle(2.0)
    assert throttle.ready("c", 100.0)
    assert not throttle.ready("c", 101.9)
    assert throttle.ready("other", 101.9)
    assert throttle.ready("c", 102.0)


# -- membership ------------------------------------------------------------------------------


def test_membership_lines_and_group_state() -> None:
    view = view_with_chat(GROUP)
    view.apply(member(1, "created", "alice", ("alice", "bob", "carol"), "Team"))
    view.apply(member(2, "added", "bob", ("dave",)))
    view.apply(member(3, "removed", "alice", ("carol",)))
    view.apply(member(4, "left", "dave", ("dave",)))
    assert [ln.text for ln in view.lines()] == [
        'You created group "Team" with bob, carol',
        "bob added dave",
        "You removed carol",
        "dave left",
    ]
    assert all(ln.kind == "system" for ln in view.lines())
    assert view.group_members[GROUP] == {"alice", "bob"}
    assert "#Team · 2 members" in view.status_text(T0)

    view.apply(member(5, "removed", "bob", ("alice",)))
    assert view.lines()[-1].text == "bob removed you"
    assert "you left" in view.status_text(T0)
    assert not view.conversation_exists(GROUP)


def test_membership_in_another_group_rings_the_bell_but_unread_counts_messages() -> None:
    view = view_with_chat("bob")
    assert view.apply(member(1, "created", "carol", ("alice",), "Fun")).bell
    assert view.unread == {}  # unread = received messages not shown (the client state's notion)
    assert GROUP in view.chat_list()
    assert view.lines(GROUP)[0].text == 'carol created group "Fun" with you'


# -- commands ------------------------------------------------------------------------------


def test_parse_command() -> None:
    assert parse_command("   ") is None
    assert parse_command("hello /to") == ("say", ["hello /to"])
    assert parse_command("//to bob") == ("say", ["/to bob"])
    assert parse_command("/to bob") == ("to", ["bob"])
    assert parse_command("/newgroup My Team bob,carol") == ("newgroup", ["My Team", "bob,carol"])
    assert parse_command("/newgroup solo") == ("newgroup", ["solo"])
    assert parse_command("/add bob, carol dave") == ("add", ["bob", "carol", "dave"])
    assert parse_command("/HELP") == ("help", [])


# -- text from other users, the chat list, the bell, completion -------------------------------------

CONTROLS = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def test_text_from_others_is_made_terminal_safe() -> None:
    view = view_with_chat()
    view.apply(msg(1, text="a\tb\x1b[2J\x07\rX\u202eY\n[14:05] alice: fake"))
    assert view.render_text() == "[14:05] bob: a   b\\x1b[2J\\x07\\x0dX\\u202eY\n  [14:05] alice: fake"
    # The content type is the sender's choice too.
    view.apply(Message(DM, 2, "id2", "bob", "x/\x1b]0;pwned\x07", b"123", T0 * 1000))
    assert view.render_text().endswith("[14:05] bob: [x/\\x1b]0;pwned\\x07, 3 bytes]")
    assert "[x/\\x1b]0;pwned\\x07" in view.chat_list_text()  # cut to the list's width
    restored = ChatView(tz=UTC)  # the same chat from the client state of an earlier run
    restored.restore(ChatSummary(DM, 2, "bob", "x/\x1b]0;pwned\x07", b"123", T0 * 1000, 1))
    assert "[x/\\x1b]0;pwned\\x07" in restored.chat_list_text()
    view.apply(member(1, "created", "bob", ("alice", "bob"), "Evil\x1b]0;pwned\x07\tgroup"))
    assert view.chat_label(GROUP) == "#Evil\\x1b]0;pwned\\x07    group"  # the tab stop after what shows
    view.open(GROUP)
    for text in (view.render_text(), view.status_text(T0), view.chat_list_text()):
        assert not CONTROLS.search(text.replace("\n", "")), text


def at(seq: int, conv: str, minute: int, sender: str = "bob", text: str = "hi") -> Message:
    return Message(conv, seq, f"{conv}{seq}", sender, "text/plain", text.encode(), (T0 + 60 * minute) * 1000)


def test_chat_list_shows_every_chat_newest_first_with_unread_and_last_message() -> None:
    view = view_with_chat("bob")
    view.apply(at(1, DM, 0, text="morning"))
    view.apply(at(1, "d:alice:carol", 2, sender="carol", text="lunch?"))
    view.apply(at(2, "d:alice:carol", 3, sender="carol", text="\tnow?"))
    view.apply(member(1, "created", "dave", ("alice",), "Team"))  # T0: the oldest
    view.add_pending("bob", "m1", "sure", (T0 + 240) * 1000)
    assert view.chat_list() == ["bob", "carol", GROUP]
    assert view.chat_list_text().splitlines() == [
        " Chats · Alt-↑/↓ switch",
        "▸ bob",
        "  me: sure",
        "  carol 2",
        "      now?",
        "  #Team",  # a membership change is news (the bell), not an unread message
        '  dave created group "Team"',  # cut to the pane's width
    ]
    assert view.adjacent_chat(+1) == "carol"
    assert view.adjacent_chat(-1) == GROUP  # wraps around


def test_bell_rings_for_news_in_other_chats_only() -> None:
    view = view_with_chat("bob")
    assert not view.apply(msg(1)).bell  # the open chat
    assert view.apply(msg(1, sender="carol", conv="d:alice:carol")).bell
    assert not view.apply(msg(2, sender="alice", conv="d:alice:carol")).bell  # our own, from elsewhere
    assert view.apply(member(1, "added", "dave", ("alice",))).bell
    assert not view.add_history("carol", [msg(0, sender="carol", conv="d:alice:carol")]).bell


def test_completion_of_commands_users_and_group_names() -> None:
    view = view_with_chat("bob")
    view.apply(member(1, "created", "alice", ("alice", "carol"), "Team"))
    fun1, fun2 = "g:00000000000000a1", "g:00000000000000a2"
    view.group_names.update({fun1: "Fun", fun2: "fun"})
    assert view.completions("/gr") == (3, [("/group", "/group")])
    assert view.completions("/group t") == (1, [("Team", "Team")])
    assert view.completions("/group F") == (1, [(fun1, f"Fun ({fun1})"), (fun2, f"fun ({fun2})")])
    assert view.completions("/to c") == (1, [("carol", "carol")])
    assert view.completions("/add bob,c") == (1, [("carol", "carol")])
    assert view.completions("hello /gr") == (0, [])


# -- the controller against a fake SDK client ---------------------------------------------------


class FakeClient:
    """What ChatController uses of ``Client``; sends wait until the test acks them."""

    def __init__(self, user: str = "alice") -> None:
        self.user = user
        self.connected = True
        self.calls: list[tuple[Any, ...]] = []
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.sends: dict[str, asyncio.Future[SendResult]] = {}
        self.local: dict[str, list[Message]] = {}
        self.server_history: list[Message] = []
        self.closed = False
        self.state = ClientState(":memory:")  # the chat keeps its own marks there
        self.receipts: dict[str, tuple[int, int]] = {}
        self.groups: dict[str, GroupInfo] = {}

    def receipt_state(self, conv: str) -> tuple[int, int]:
        return self.receipts.get(conv, (0, 0))

    def pending_outbox(self) -> list[Any]:
        return []

    def pending_uploads(self) -> list[Any]:
        return []

    async def send_file(self, path: Any, **kw: Any) -> SendResult:
        self.calls.append(("send_file", str(path), kw.get("to"), kw.get("group"), kw.get("caption")))
        fut = asyncio.get_running_loop().create_future()
        self.sends[kw["message_id"]] = fut
        return await fut

    async def download(self, message: Message, dest_dir: Any, progress: Any = None) -> Path:
        self.calls.append(("download", message.seq, str(dest_dir)))
        if message.body == b"tampered":
            raise BlobTampered("the blob's digest does not match its reference")
        return Path(dest_dir) / "photo.jpg"

    async def connect(self, timeout: float | None = None) -> None:
        self.queue.put_nowait(Connected(self.user))

    async def next_event(self, timeout: float | None = None) -> Any:
        return await self.queue.get()

    async def send(self, text: str | None = None, **kw: Any) -> SendResult:
        self.calls.append(("send", text, kw.get("to"), kw.get("group")))
        fut = asyncio.get_running_loop().create_future()
        self.sends[kw["message_id"]] = fut
        return await fut

    async def subscribe_presence(self, users: list[str]) -> None:
        self.calls.append(("presence", list(users)))

    async def unsubscribe_presence(self, users: list[str]) -> None:
        self.calls.append(("unpresence", list(users)))

    async def mark_read(self, conv: str, seq: int) -> None:
        self.calls.append(("read", conv, seq))

    def mark_consumed(self, conv: str, seq: int) -> None:
        self.state.mark_consumed(conv, seq)

    def unread_counts(self) -> dict[str, int]:
        return self.state.unconsumed_counts()

    async def typing(self, conv: str, active: bool = True) -> None:
        self.calls.append(("typing", conv))

    def local_history(self, conv: str, limit: int = 50) -> list[Message]:
        return self.local.get(conv, [])

    async def history(self, conv: str, *, before: int | None = None, **kw: Any) -> tuple[list[Message], int]:
        self.calls.append(("history", conv, before))
        return self.server_history, 10

    async def group_info(self, group: str) -> GroupInfo:
        if group not in self.groups:
            raise RoostError("not_member", "you are not a member")
        return self.groups[group]

    async def create_group(self, name: str, members: list[str]) -> GroupInfo:
        self.calls.append(("create_group", name, list(members)))
        return GroupInfo(GROUP, name, ["alice", *members], ["alice"], 1)

    async def flush(self, timeout: float = 5.0) -> None:
        pass

    async def close(self) -> None:
        self.closed = True


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture
async def chat() -> Any:
    clock = [1000.0]
    client = FakeClient()
    view = ChatView(tz=UTC)
    ctrl = ChatController(client, view, clock=lambda: clock[0])  # type: ignore[arg-type]
    ctrl.clock_value = clock  # type: ignore[attr-defined]
    await ctrl.start()
    await settle()
    yield ctrl, client, view
    await ctrl.stop()
    assert client.closed


async def test_controller_open_chat_send_and_ticks(chat: Any) -> None:
    ctrl, client, view = chat
    assert view.me == "alice" and view.connection == "connected"
    client.local[DM] = [msg(1, text="earlier")]
    ctrl.handle_line("/to bob")
    await settle()
    assert ("presence", ["bob"]) in client.calls
    assert ("read", DM, 1) in client.calls  # shown while open -> read
    assert view.render_text() == "[14:05] bob: earlier"

    ctrl.handle_line("hello")
    await settle()
    assert ("send", "hello", "bob", None) in client.calls
    assert view.lines()[-1].text == "hello" and view.tick(view.lines()[-1]) is Tick.PENDING
    mid = next(iter(client.sends))
    client.sends[mid].set_result(SendResult(mid, DM, 2, T0 * 1000))
    await settle()
    assert view.render_text().splitlines()[-1] == "[14:05] me: hello ✓"
    client.queue.put_nowait(ReceiptEvent(DM, {"bob": (2, 2)}, 2, 2))
    await settle()
    assert view.render_text().splitlines()[-1] == "[14:05] me: hello ✓✓ read"

    client.queue.put_nowait(msg(3, text="live"))
    await settle()
    assert ("read", DM, 3) in client.calls


async def test_controller_send_refused_and_errors_do_not_crash(chat: Any) -> None:
    ctrl, client, view = chat
    ctrl.handle_line("orphan")
    assert "no chat open" in view.lines()[-1].text
    ctrl.handle_line("/to bob")
    ctrl.handle_line("x")
    await settle()
    mid = next(iter(client.sends))
    client.sends[mid].set_exception(RoostError("unknown_user", "no such user: bob"))
    await settle()
    last = view.render_text().splitlines()[-2:]
    assert last[0].endswith("me: x ✗") and last[1] == "! not sent: unknown_user: no such user: bob"

    ctrl.handle_line("/nope")
    ctrl.handle_line("/to")
    ctrl.handle_line("/to Not A Name")
    ctrl.handle_line("/add bob")  # not in a group
    ctrl.handle_line(f"/group {GROUP}")
    await settle()
    errors = [ln.text for ln in view.chats["bob"] if ln.kind == "error"][-4:]
    assert errors[0].startswith("unknown command /nope")
    assert errors[1].startswith("wrong arguments for /to")
    assert errors[3] == "no group open: /group NAME first"
    assert view.lines(GROUP)[-1].text == "group: not_member: you are not a member"
    client.queue.put_nowait(ErrorEvent("invalid", "bad read marker", ""))
    await settle()
    assert view.lines()[-1].text == "error invalid: bad read marker"


async def test_controller_typing_is_throttled_and_only_in_existing_chats(chat: Any) -> None:
    ctrl, client, _view = chat
    clock = ctrl.clock_value
    ctrl.handle_line("/to bob")
    ctrl.on_input_changed("h")
    await settle()
    assert not [c for c in client.calls if c[0] == "typing"]  # no 1:1 yet on the server
    client.queue.put_nowait(msg(1))
    await settle()
    for t, text in ((0.0, "h"), (0.5, "he"), (1.9, "hel"), (2.1, "hell"), (2.2, "/to")):
        clock[0] = 1000.0 + t
        ctrl.on_input_changed(text)
    await settle()
    assert [c for c in client.calls if c[0] == "typing"] == [("typing", DM), ("typing", DM)]


async def test_controller_newgroup_and_history(chat: Any) -> None:
    ctrl, client, view = chat
    ctrl.handle_line("/newgroup My Team bob,carol")
    await settle()
    assert ("create_group", "My Team", ["bob", "carol"]) in client.calls
    assert view.current == GROUP
    assert "#My Team · 3 members" in view.status_text(1000)

    client.queue.put_nowait(msg(5, conv=GROUP, text="g5"))
    await settle()
    client.server_history = [msg(3, conv=GROUP, text="g3"), msg(4, sender="alice", conv=GROUP, text="g4")]
    ctrl.handle_line("/history")
    await settle()
    assert ("history", GROUP, 5) in client.calls
    texts = [ln.text for ln in view.lines() if ln.seq]
    assert texts == ["g3", "g4", "g5"]
    assert view.lines()[-1].text == "loaded 2 older message(s)"

    quit_called = []
    ctrl.on_quit = lambda: quit_called.append(True)
    ctrl.handle_line("/quit")
    assert quit_called
    assert view.chats[HOME]  # the welcome line


# -- end to end: roost chat in tmux against a real server ------------------------------------------

TMUX = shutil.which("tmux")


class Tmux:
    def __init__(self, tmp: Path) -> None:
        # Our own tmux server on a private socket (a unix socket path must stay short).
        path = tmp / "tmux.sock"
        if len(str(path)) > 100:
            path = Path(tempfile.mkdtemp(prefix="roost-tmux-")) / "s"
        self.socket = path
        self.env = {k: v for k, v in os.environ.items() if k not in ("TMUX", "TMUX_PANE")}
        self.env.update(LANG="C.UTF-8", LC_ALL="C.UTF-8", TERM="xterm-256color")

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert TMUX is not None
        return subprocess.run(
            [TMUX, "-u", "-S", str(self.socket), *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=check,
            timeout=10,
        )

    def capture(self) -> str:
        return "\n".join(
            ln.rstrip() for ln in self.run("capture-pane", "-p", "-t", "chat").stdout.splitlines()
        )

    def start(self, command: str) -> None:
        self.run("new-session", "-d", "-s", "chat", "-x", "120", "-y", "30", command)

    def alive(self) -> bool:
        return self.run("has-session", "-t", "chat", check=False).returncode == 0

    def command_pid(self) -> int:
        """The pid of the command the pane's shell runs (``chat_command``)."""
        shell = self.run("display-message", "-p", "-t", "chat", "#{pane_pid}").stdout.strip()
        children = Path(f"/proc/{shell}/task/{shell}/children").read_text().split()
        assert len(children) == 1, children
        return int(children[0])

    def kill(self) -> None:
        self.run("kill-server", check=False)
        self.socket.unlink(missing_ok=True)


def chat_command(url: str, token: str, state: Path, err: Path) -> str:
    """``roost chat`` as a shell command; its exit status goes to ``err`` + ``.rc``."""
    rc = shlex.quote(f"{err}.rc")
    return " ".join(
        [
            f"cd {shlex.quote(str(ROOT))} &&",
            shlex.quote(sys.executable),
            "-m roost.cli.main chat",
            f"--url {url} --token {shlex.quote(token)}",
            f"--state {shlex.quote(str(state))}",
            f"2> {shlex.quote(str(err))};",
            f"echo $? > {rc}.tmp && mv {rc}.tmp {rc}",
        ]
    )


async def exit_status(err: Path, timeout: float = 8.0) -> int:
    """The exit status of the ``chat_command`` that writes to ``err``."""
    rc = Path(f"{err}.rc")
    deadline = time.monotonic() + timeout
    while not rc.exists():
        if time.monotonic() > deadline:
            raise AssertionError("roost chat did not exit")
        await asyncio.sleep(0.1)
    return int(rc.read_text())


async def wait_pane(
    tmux: Tmux, cond: Callable[[str], Any], what: str, err: Path, timeout: float = 8.0
) -> str:
    deadline = time.monotonic() + timeout
    while True:
        pane = tmux.capture()
        if cond(pane):
            return pane
        if time.monotonic() > deadline:
            stderr = err.read_text() if err.exists() else ""
            raise AssertionError(f"timed out waiting for {what}; pane:\n{pane}\nstderr:\n{stderr}")
        await asyncio.sleep(0.1)


@pytest.mark.timeout(30)
async def test_chat_in_tmux_shows_sent_then_read_tick(tmp_path: Path) -> None:
    if TMUX is None:
        pytest.skip("tmux is not installed (apt-get install -y tmux); the terminal UI test needs it")
    from tests.e2e.server import ServerProcess

    srv = ServerProcess(tmp_path / "data")
    srv.data_dir.mkdir()
    alice_token = srv.add_user("alice")
    bob_token = srv.add_user("bob")
    srv.start()
    # bob has run a client (his keys are on the server): alice's message goes out at once.
    await publish_keys(srv, {"bob": (bob_token, tmp_path / "bob.sqlite")})
    tmux = Tmux(tmp_path)
    err = tmp_path / "chat.stderr"
    try:
        tmux.start(chat_command(srv.url, alice_token, tmp_path / "alice.sqlite", err))
        await wait_pane(tmux, lambda p: "connected as alice" in p, "the chat to connect", err)

        tmux.run("send-keys", "-t", "chat", "/to bob", "Enter")
        await wait_pane(tmux, lambda p: "│ bob" in p, "the status line to show bob", err)
        tmux.run("send-keys", "-t", "chat", "hello", "Enter")
        await wait_pane(
            tmux, lambda p: re.search(r"me: hello ✓$", p, re.M), "the sent tick (✓) on the line", err
        )

        async with Client(srv.url, bob_token, state_path=tmp_path / "bob.sqlite") as bob:
            deadline = time.monotonic() + 8
            while True:
                event = await bob.next_event(max(0.1, deadline - time.monotonic()))
                if isinstance(event, Message) and event.text == "hello":
                    break
            assert event.sender == "alice"
            await bob.mark_read(event.conv, event.seq)
            await bob.flush()
            pane = await wait_pane(
                tmux, lambda p: re.search(r"me: hello ✓✓ read$", p, re.M), "the read tick", err
            )
            await wait_pane(tmux, lambda p: "bob · online" in p, "bob's presence", err)
        assert pane.count("hello ✓") == 1  # the tick changed in place
        assert "▸ bob" in pane and "me: hello " in pane  # the chat list: bob, open, and the last message

        tmux.run("send-keys", "-t", "chat", "/quit", "Enter")
        assert await exit_status(err) == 0
        assert "Traceback" not in err.read_text()

        # Restarted (the server down, so all comes from the state file): bob open, the tick still read.
        srv.stop()
        tmux.kill()
        tmux = Tmux(tmp_path)
        err.unlink()
        tmux.start(chat_command(srv.url, alice_token, tmp_path / "alice.sqlite", err))
        restored = re.compile(r"me: hello ✓✓ read$", re.M)
        await wait_pane(tmux, lambda p: "│ bob" in p and restored.search(p), "the restored chat", err)
    finally:
        tmux.kill()
        srv.stop()


# -- restart: ticks, unread counts and the open chat come back from the client state ------------


class RealChat:
    """A ``ChatController`` on a real ``Client``, headless: ``until`` waits for a
    redraw request (every event and send ends with one) that makes ``cond`` true."""

    def __init__(self, url: str, token: str, state: Path) -> None:
        self.view = ChatView(tz=UTC)
        self.changed = asyncio.Event()
        self.ctrl = ChatController(
            Client(url, token, state_path=state), self.view, invalidate=self.changed.set
        )

    async def until(self, cond: Callable[[], Any], what: str, timeout: float = 8.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise AssertionError(
                    f"timed out waiting for {what}; pane:\n{self.view.render_text()}"
                ) from None

    def own_tick(self, text: str) -> Tick | None:
        return next(
            (self.view.tick(ln) for ln in self.view.lines() if ln.kind == "own" and ln.text == text), None
        )


async def receive_text(client: Client, text: str) -> Message:
    deadline = time.monotonic() + 8
    while True:
        event = await client.next_event(max(0.1, deadline - time.monotonic()))
        if isinstance(event, Message) and event.text == text:
            return event


@pytest.mark.timeout(40)
async def test_ticks_unread_and_open_chat_survive_a_restart(tmp_path: Path) -> None:
    from tests.e2e.server import ServerProcess

    srv = ServerProcess(tmp_path / "data")
    srv.data_dir.mkdir()
    tokens = {name: srv.add_user(name) for name in ("alice", "bob", "carol")}
    srv.start()
    await publish_keys(srv, {n: (tokens[n], tmp_path / f"{n}.sqlite") for n in ("bob", "carol")})
    state = tmp_path / "alice.sqlite"
    try:
        chat = RealChat(srv.url, tokens["alice"], state)
        await chat.ctrl.start()
        try:
            await chat.until(lambda: chat.view.connection == "connected", "the connection")
            chat.ctrl.handle_line("/to bob")
            chat.ctrl.handle_line("hello")
            await chat.until(lambda: chat.own_tick("hello") is Tick.SENT, "the sent tick")
            async with Client(srv.url, tokens["bob"], state_path=tmp_path / "bob.sqlite") as bob:
                event = await receive_text(bob, "hello")
                await bob.mark_read(event.conv, event.seq)
                await bob.flush()
                await chat.until(lambda: chat.own_tick("hello") is Tick.READ, "the read tick")
            async with Client(srv.url, tokens["carol"], state_path=tmp_path / "carol.sqlite") as carol:
                await carol.send("yo", to="alice")
                await carol.send("still there?", to="alice")
            await chat.until(lambda: chat.view.unread == {"carol": 2}, "carol's messages as unread")
        finally:
            await chat.ctrl.stop()
    finally:
        srv.stop()  # from here on nothing can come from the server: all is from the state file

    again = RealChat(srv.url, tokens["alice"], state)
    await again.ctrl.start()
    try:
        assert again.view.current == "bob"
        assert again.view.render_text().endswith("me: hello ✓✓ read")
        assert again.view.unread == {"carol": 2}
        assert "unread: carol 2" in again.view.status_text(time.time())
        listed = again.view.chat_list_text().splitlines()[1:]  # the chat list, from the state alone
        assert listed == ["  carol 2", "  still there?", "▸ bob", "  me: hello"]
        again.ctrl.handle_line("/to carol")  # read now: no longer unread after the next restart
        assert [ln.text for ln in again.view.lines() if ln.kind == "in"] == ["yo", "still there?"]
        again.ctrl.handle_line("/to bob")
    finally:
        await again.ctrl.stop()
    third = RealChat(srv.url, tokens["alice"], state)
    await third.ctrl.start()
    try:
        assert third.view.current == "bob"
        assert third.view.unread == {}
    finally:
        await third.ctrl.stop()


# -- no terminal, Ctrl-C, SIGINT -----------------------------------------------------------------


def test_chat_without_a_terminal_says_so_in_one_line_and_exits_2(tmp_path: Path) -> None:
    state = str(tmp_path / "s.sqlite")
    url = "http://127.0.0.1:9"
    out = run_roost(
        "chat", "--url", url, "--token", "t", "--state", state, stdin="", timeout=20
    )  # a pipe, no tty
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1 and "needs a terminal" in out.stderr


@pytest.mark.timeout(40)
async def test_chat_exits_cleanly_on_ctrl_c_and_on_sigint(tmp_path: Path) -> None:
    if TMUX is None:
        pytest.skip("tmux is not installed (apt-get install -y tmux); the terminal UI test needs it")
    from tests.e2e.server import ServerProcess, free_port

    srv = ServerProcess(tmp_path / "data")
    srv.data_dir.mkdir()
    token = srv.add_user("alice")
    srv.start()
    cases = [("ctrl-c", srv.url), ("sigint", srv.url), ("sigint", f"http://127.0.0.1:{free_port()}")]
    try:
        for n, (how, url) in enumerate(cases):
            tmux = Tmux(tmp_path)
            try:
                err = tmp_path / f"chat{n}.stderr"
                tmux.start(chat_command(url, token, tmp_path / "alice.sqlite", err))
                await wait_pane(tmux, lambda p: "as alice" in p, "the chat to start", err)
                if how == "ctrl-c":
                    tmux.run("send-keys", "-t", "chat", "C-c")
                else:  # kill -INT from outside; the terminal is in raw mode, so not from the keyboard
                    os.kill(tmux.command_pid(), signal.SIGINT)
                assert await exit_status(err) == 0, f"{how} against {url}"
                assert err.read_text() == "", f"{how} against {url}: stderr not empty"
            finally:
                tmux.kill()
    finally:
        srv.stop()


async def test_controller_group_by_name_members_and_switching(chat: Any) -> None:
    ctrl, client, view = chat
    bells: list[bool] = []
    ctrl.on_bell = lambda: bells.append(True)
    fun1, fun2 = "g:00000000000000a1", "g:00000000000000a2"
    client.groups[GROUP] = GroupInfo(GROUP, "My Team", ["alice", "bob", "carol"], ["alice"], 3)
    for group, name in ((GROUP, "My Team"), (fun1, "Fun"), (fun2, "Fun")):
        client.queue.put_nowait(Membership(group, 1, "created", "bob", ("alice", "bob"), name, T0 * 1000))
    await settle()
    assert len(bells) == 1  # news in chats other than the open one (none), at most one bell a second
    ctrl.clock_value[0] += 1.0
    client.queue.put_nowait(msg(1, sender="carol", conv="d:alice:carol"))
    await settle()
    assert len(bells) == 2

    ctrl.handle_line("/group my team")
    await settle()
    assert view.current == GROUP
    ctrl.handle_line("/members")
    await settle()
    assert view.lines()[-1].text == "3 members: alice (admin), bob, carol"

    ctrl.handle_line("/group Fun")
    assert view.current == GROUP
    assert view.lines()[-1].text == f"2 groups are named 'Fun': {fun1}, {fun2}; /group ID opens one"
    ctrl.handle_line(f"/group {fun2}")
    assert view.current == fun2
    ctrl.handle_line("/group Nope")
    assert view.lines()[-1].text.startswith("no group named 'Nope' (known: Fun, My Team)")

    order = view.chat_list()
    ctrl.switch_chat(+1)
    assert view.current == order[(order.index(fun2) + 1) % len(order)]
    ctrl.switch_chat(-1)
    assert view.current == fun2

    # The group names outlive the run: a restarted chat opens them by name.
    assert client.state.chat_groups() == {GROUP: "My Team", fun1: "Fun", fun2: "Fun"}


@pytest.mark.timeout(40)
async def test_chat_in_tmux_list_keys_group_names_bell_and_escaped_text(tmp_path: Path) -> None:
    if TMUX is None:
        pytest.skip("tmux is not installed (apt-get install -y tmux); the terminal UI test needs it")
    from tests.e2e.server import ServerProcess

    srv = ServerProcess(tmp_path / "data")
    srv.data_dir.mkdir()
    tokens = {name: srv.add_user(name) for name in ("alice", "bob", "carol")}
    srv.start()
    await publish_keys(srv, {n: (tokens[n], tmp_path / f"{n}.sqlite") for n in ("bob", "carol")})
    tmux = Tmux(tmp_path)
    err = tmp_path / "chat.stderr"

    def keys(*typed: str) -> None:
        tmux.run("send-keys", "-t", "chat", *typed)

    def flag(fmt: str) -> str:
        return tmux.run("display-message", "-p", "-t", "chat", fmt).stdout.strip()

    try:
        tmux.start(chat_command(srv.url, tokens["alice"], tmp_path / "alice.sqlite", err))
        tmux.run("set-option", "-t", "chat", "monitor-bell", "on")
        await wait_pane(tmux, lambda p: "connected as alice" in p, "the chat to connect", err)
        keys("/to bob", "Enter")
        await wait_pane(tmux, lambda p: "│ bob" in p, "bob's chat to open", err)

        async with (
            Client(srv.url, tokens["bob"], state_path=tmp_path / "bob.sqlite") as bob,
            Client(srv.url, tokens["carol"], state_path=tmp_path / "carol.sqlite") as carol,
        ):
            await bob.send("a\tb \x1b[2J\x1b]2;pwned\x07 end", to="alice")
            await wait_pane(
                tmux, lambda p: r"bob: a   b \x1b[2J\x1b]2;pwned\x07 end" in p, "the escaped text", err
            )
            assert flag("#{pane_title}") != "pwned"
            assert flag("#{window_bell_flag}") == "0"  # news in the open chat: no bell

            await carol.send("psst", to="alice")
            await wait_pane(tmux, lambda p: "  carol 1" in p and "  psst" in p, "carol in the chat list", err)
            assert flag("#{window_bell_flag}") == "1"

            keys("M-Up")  # carol is above bob: the newest first
            await wait_pane(tmux, lambda p: "▸ carol" in p and "│ carol" in p, "Alt-Up to open carol", err)
            keys("M-Down")
            await wait_pane(tmux, lambda p: "▸ bob" in p and "│ bob" in p, "Alt-Down back to bob", err)

            info = await bob.create_group("Weekend Plans", ["alice", "carol"])
            pane = await wait_pane(tmux, lambda p: "  #Weekend Plans" in p, "the new group in the list", err)
            assert "#Weekend Plans 1" not in pane  # being added is news (the bell), not an unread message
            keys("/group wee", "Tab")
            await wait_pane(tmux, lambda p: "> /group Weekend Plans" in p, "Tab to complete the name", err)
            keys("Enter")
            await wait_pane(tmux, lambda p: "│ #Weekend Plans" in p, "the group opened by name", err)
            keys("/members", "Enter")
            await wait_pane(tmux, lambda p: "3 members: alice, bob (admin), carol" in p, "/members", err)
            assert info.group not in tmux.capture()  # opened by name, the id never typed

        keys("/quit", "Enter")
        assert await exit_status(err) == 0
        assert err.read_text() == ""
    finally:
        tmux.kill()
        srv.stop()


async def test_groups_known_from_an_earlier_run_are_listed_and_open_by_name() -> None:
    first = FakeClient()
    ctrl = ChatController(first, ChatView(tz=UTC))  # type: ignore[arg-type]
    await ctrl.start()
    first.queue.put_nowait(member(1, "created", "bob", ("alice", "bob"), "Team"))
    await settle()
    await ctrl.stop()

    again = FakeClient()
    again.state = first.state  # the same state file, a new run: no event about the group this time
    view = ChatView(tz=UTC)
    ctrl = ChatController(again, view)  # type: ignore[arg-type]
    await ctrl.start()
    try:
        assert GROUP in view.chat_list()
        ctrl.handle_line("/group team")
        assert view.current == GROUP
    finally:
        await ctrl.stop()


async def test_a_state_from_when_the_chat_kept_its_own_seen_marks_still_opens(tmp_path: Path) -> None:
    """``chat_seen`` (the chat's own unread marks, before unread became the
    unconsumed count) is dropped; the chat list and open chat come back."""
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE messages (conv TEXT NOT NULL, seq INTEGER NOT NULL, id TEXT NOT NULL,"
        " sender TEXT NOT NULL, ct TEXT NOT NULL, body BLOB NOT NULL, ts INTEGER NOT NULL,"
        " PRIMARY KEY (conv, seq));"
        "CREATE TABLE chat_seen (conv TEXT PRIMARY KEY, seen INTEGER NOT NULL);"
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO messages VALUES ('d:alice:bob', 1, 'b1', 'bob', 'text/plain', x'6869', 1);"
        "INSERT INTO messages VALUES ('d:alice:carol', 1, 'c1', 'carol', 'text/plain', x'796f', 2);"
        "INSERT INTO chat_seen VALUES ('d:alice:bob', 1);"
        "INSERT INTO meta VALUES ('user', 'alice'), ('chat_current', 'bob');"
    )
    db.close()
    client = FakeClient()
    client.state = ClientState(path)
    view = ChatView(tz=UTC)
    ctrl = ChatController(client, view)  # type: ignore[arg-type]
    await ctrl.start()
    try:
        assert view.current == "bob" and view.chat_list() == ["carol", "bob"]
        assert view.unread == {}  # an old state's history counts as shown
        tables = {r[0] for r in client.state.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "chat_seen" not in tables
    finally:
        await ctrl.stop()
        client.state.close()


async def test_the_unread_counts_follow_a_listen_handed_to_the_running_chat(chat: Any) -> None:
    ctrl, client, view = chat
    ctrl.handle_line("/to bob")
    carol = "d:alice:carol"
    for seq in (1, 2):  # as the SDK does: stored unconsumed, then the event
        client.state.store_message(carol, seq, f"c{seq}", "carol", "text/plain", b"hi", T0 * 1000)
        client.state.commit()
        client.queue.put_nowait(msg(seq, sender="carol", conv=carol))
    await settle()
    assert view.unread == {"carol": 2}
    client.state.consume_one(carol, 1)  # a `roost listen` handed to the chat printed one
    client.queue.put_nowait(Consumed((carol,)))
    await settle()
    assert view.unread == {"carol": 1}
    assert "unread: carol 1" in view.status_text(T0)


# -- media messages -----------------------------------------------------------------------


def _attachment(**over: Any) -> bytes:
    fields: dict[str, Any] = {
        "blob": "b" * 32,
        "key": base64.b64encode(bytes(64)).decode(),
        "digest": base64.b64encode(bytes(32)).decode(),
        "size": 1_300_000,
        "content_type": "image/jpeg",
        "name": "photo.jpg",
        "kind": "image",
        "width": 640,
        "height": 480,
        "caption": "sunset",
    }
    fields.update(over)
    return json.dumps(fields).encode()


def media(seq: int, body: bytes) -> Message:
    return Message(DM, seq, f"m{seq}", "bob", ATTACHMENT_CT, body, T0 * 1000)


async def test_media_messages_show_kind_name_size_and_save(chat: Any, tmp_path: Path) -> None:
    ctrl, client, view = chat
    ctrl.handle_line("/to bob")
    client.queue.put_nowait(media(1, _attachment()))
    client.queue.put_nowait(media(2, _attachment(name="evil\u202egpj.exe", kind="file", size=10)))
    client.queue.put_nowait(media(3, b'{"blob": "../etc"}'))
    await settle()
    lines = view.render_text().splitlines()[-3:]
    assert lines[0] == "[14:05] bob: [image #1: photo.jpg, 1.2 MiB, 640x480] sunset"
    assert "\u202e" not in lines[1] and lines[1].startswith("[14:05] bob: [file #2: evil")
    assert lines[2] == "[14:05] bob: [invalid attachment]"
    ctrl.handle_line(f"/save 1 {tmp_path}")
    await settle()
    assert ("download", 1, str(tmp_path)) in client.calls
    assert view.lines()[-1].text == f"saved to {tmp_path / 'photo.jpg'}"
    ctrl.handle_line("/save 3")
    assert view.lines()[-1].text == "no media message #3"
    ctrl.handle_line("/open 9")
    assert view.lines()[-1].text == "no media message #9"


async def test_a_tampered_download_is_an_error_line(chat: Any, tmp_path: Path) -> None:
    ctrl, client, view = chat
    ctrl.handle_line("/to bob")
    body = _attachment()
    client.queue.put_nowait(media(1, body))
    await settle()
    view.media[0] = media(1, b"tampered")  # the fake refuses this one as the SDK would
    ctrl.handle_line(f"/save 1 {tmp_path}")
    await settle()
    assert view.lines()[-1].text.startswith("not saved: the blob's digest does not match")


def test_chat_list_preview_of_a_media_message() -> None:
    view = ChatView(me="alice", tz=UTC)
    view.restore(ChatSummary(DM, 4, "bob", ATTACHMENT_CT, _attachment(caption=None), T0 * 1000, 1))
    assert view.preview("bob").endswith("[image: photo.jpg, 1.2 MiB, 640x480]")


def test_parse_file_and_save_commands() -> None:
    assert parse_command("/file ~/a.png a caption here") == ("file", ["~/a.png", "a caption here"])
    assert parse_command("/file ~/a.png") == ("file", ["~/a.png"])
    assert parse_command("/save 3 ~/My Pictures") == ("save", ["3", "~/My Pictures"])


async def test_file_command_sends_a_file_to_the_open_chat(chat: Any, tmp_path: Path) -> None:
    ctrl, client, view = chat
    ctrl.handle_line(f"/file {tmp_path / 'nope.png'}")
    assert view.lines()[-1].text.startswith("no chat open")
    ctrl.handle_line("/to bob")
    ctrl.handle_line(f"/file {tmp_path / 'nope.png'}")
    assert view.lines()[-1].text.endswith("is not a file")
    photo = tmp_path / "cat.png"
    photo.write_bytes(b"x" * 2048)
    ctrl.handle_line(f"/file {photo} look at him")
    await settle()
    assert ("send_file", str(photo), "bob", None, "look at him") in client.calls
    assert view.lines()[-1].text == "[file: cat.png, 2.0 KiB] look at him"
    mid = next(iter(client.sends))
    client.sends[mid].set_result(SendResult(mid, DM, 5, T0 * 1000))
    await settle()
    assert view.render_text().splitlines()[-1] == "[14:05] me: [file: cat.png, 2.0 KiB] look at him ✓"
