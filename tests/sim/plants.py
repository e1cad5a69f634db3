"""Planted bugs: one small, realistic mistake per delivery invariant, made in
the real code for the length of a test.

Most are *patched copies*: the source of the real function with one piece of
text replaced (``mutate``), compiled in the function's own module. Should the
real code change so that the text is no longer there, ``mutate`` fails
loudly, and the plant must be rewritten rather than silently testing nothing.

Each plant names the invariant of docs/reliability.md it breaks; the seeds
that catch it are in tests/sim/test_planted_bugs.py and docs/simulation.md.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from roost.core import membership
from roost.service.chat import ChatService
from roost.service.session import Session
from roost.store import sqlite as sqlite_store
from roost.store.base import StoredMessage
from roost.store.sqlite import SqliteStore


def mutate(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, *edits: tuple[str, str]) -> None:
    """Replace ``owner.name`` by a copy of its source with ``edits`` applied
    (each ``(old, new)``; ``old`` must occur exactly once, indented as in its file)."""
    func = inspect.unwrap(getattr(owner, name))
    source = inspect.getsource(func)
    for old, new in edits:
        assert source.count(old) == 1, f"{owner.__name__}.{name} changed: rewrite this plant ({old!r})"
        source = source.replace(old, new)
    if source[0].isspace():  # a method: compile it as an indented block
        source = "if True:\n" + source
    namespace: dict[str, Any] = {}
    code = compile(source, f"<planted {owner.__name__}.{name}>", "exec")
    exec(code, func.__globals__, namespace)  # the test's own mutation of real code
    monkeypatch.setattr(owner, name, namespace[name])


# -- ack after commit ---------------------------------------------------------


def ack_before_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ✓ answered at the very end of the batch, just before COMMIT ("to save
    the fsync latency"): a commit that then fails has acked what it rolled back."""
    mutate(
        monkeypatch,
        SqliteStore,
        "_run_batch",
        (
            '            conn.execute("COMMIT")\n',
            "            early = []\n"
            "            for op in batch:\n"
            "                leader = op\n"
            "                while leader.merged_into is not None:\n"
            "                    leader = leader.merged_into\n"
            "                early.append(outcome[id(leader)])\n"
            "            self._loop.call_soon_threadsafe(_resolve, batch, early)\n"
            '            conn.execute("COMMIT")\n',
        ),
    )


def ack_as_each_op_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write answered as soon as its statement ran, before the batch's COMMIT."""
    mutate(
        monkeypatch,
        SqliteStore,
        "_run_batch",
        (
            "                    outcome[id(op)] = (True, op.fn(conn))\n",
            "                    outcome[id(op)] = (True, op.fn(conn))\n"
            "                    if not op.merged:\n"
            "                        self._loop.call_soon_threadsafe(_resolve, [op], [outcome[id(op)]])\n",
        ),
    )


# -- the inbox entry stays until the device acks --------------------------------


def inbox_entry_removed_at_push(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each online recipient's delivered mark moves when the push is queued,
    not when its device acks it."""
    pushed = ChatService._fan_out

    def mark_delivered_at_push(self: ChatService, stored: StoredMessage, users: tuple[str, ...]) -> None:
        pushed(self, stored, users)
        for user in users:
            if user != stored.sender and self.registry.is_online(user):
                self.store.advance_marks(user, stored.conv, stored.seq, None)

    monkeypatch.setattr(ChatService, "_fan_out", mark_delivered_at_push)


# -- register before drain ------------------------------------------------------

_RESYNC_AT_CONNECT = (
    "        # Then read the inbox: whatever was committed before registering is there.\n"
    "        # The same read brings the pending receipts and the key stock.\n"
    "        if not await self._resync(session, e2ee):\n"
    '            log.warning("inbox unavailable at connect of %s; retrying", user)\n'
    "            self._spawn(self._resync_until_done(session))\n"
    "            # After the inbox: a device with few or no one-time keys is told to upload.\n"
    "            self._spawn(self.keys.after_connect(session, e2ee))\n"
)


def drain_before_register(monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented order swapped: the inbox is read first, the session
    registered after: a message committed in between is neither in the read
    nor pushed."""
    mutate(
        monkeypatch,
        ChatService,
        "connect",
        (_RESYNC_AT_CONNECT, ""),
        (
            "        # Register first: from here on, new messages are offered to this session.\n",
            _RESYNC_AT_CONNECT,
        ),
    )


# -- persist before look-up -----------------------------------------------------


def lookup_before_persist(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1:1 recipient is looked up when the send arrives, before the commit;
    after the commit only a recipient that was online then is pushed to."""
    on_send, fan_out = ChatService._on_send, ChatService._fan_out
    online_at_send: dict[tuple[str, str], bool] = {}

    def look_up_first(self: ChatService, session: Session, frame: Any) -> None:
        if frame.to is not None:
            online_at_send[(session.user, frame.id)] = self.registry.is_online(frame.to)
        on_send(self, session, frame)

    def push_to_whom_was_online(self: ChatService, stored: StoredMessage, users: tuple[str, ...]) -> None:
        if online_at_send.get((stored.sender, stored.client_id)) is False:
            users = tuple(u for u in users if u == stored.sender)
        fan_out(self, stored, users)

    monkeypatch.setattr(ChatService, "_on_send", look_up_first)
    monkeypatch.setattr(ChatService, "_fan_out", push_to_whom_was_online)


# -- every online failure degrades to the inbox -----------------------------------


def unread_inbox_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """An inbox that cannot be read at connect is not read again: what waits
    there stays unseen until the device reconnects."""
    mutate(
        monkeypatch,
        ChatService,
        "connect",
        ("            self._spawn(self._resync_until_done(session))\n", "            pass\n"),
    )


def failed_drain_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A drain whose store read failed forgets its conversations instead of
    reading them again."""
    mutate(
        monkeypatch,
        Session,
        "_drain",
        (
            "                for request in requests:\n"
            "                    self.cursor.drain_failed(request.conv)\n"
            "                await asyncio.sleep(DRAIN_RETRY_SECONDS)\n"
            "                continue\n",
            "                for request in requests:\n"
            "                    self.cursor._draining.pop(request.conv, None)\n"
            "                return\n",
        ),
    )


# -- sender order ----------------------------------------------------------------


def failed_batch_keeps_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed commit does not break its connections' send streams, so a later
    send of the same connection can commit before the failed one is resent."""
    mutate(
        monkeypatch,
        SqliteStore,
        "_run_batch",
        (
            "            for op in batch:\n"
            "                if op.stream is not None:\n"
            "                    op.stream.broken = True\n"
            '            failure = StoreUnavailable(f"storage error: {exc}")\n',
            '            failure = StoreUnavailable(f"storage error: {exc}")\n',
        ),
    )


# -- contiguous seqs --------------------------------------------------------------


def rolled_back_seqs_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed batch keeps the writer cache: the seqs it allocated and rolled
    back are skipped by the next messages."""
    mutate(
        monkeypatch,
        SqliteStore,
        "_run_batch",
        (
            '                conn.execute("ROLLBACK")\n            self._convs.clear()\n',
            '                conn.execute("ROLLBACK")\n',
        ),
    )


# -- dedupe by id ------------------------------------------------------------------


def no_idempotent_append(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client id is not unique per sender and conversation: a resend after
    a lost answer stores the message a second time, at a new seq."""
    monkeypatch.setattr(
        sqlite_store,
        "SCHEMA",
        sqlite_store.SCHEMA.replace(
            "CREATE UNIQUE INDEX IF NOT EXISTS messages_idempotency",
            "CREATE INDEX IF NOT EXISTS messages_idempotency",
        ),
    )
    mutate(
        monkeypatch,
        SqliteStore,
        "_insert_message",
        ('            " ON CONFLICT (conv, sender, client_id) DO NOTHING",\n', '            "",\n'),
    )


# -- receipts only move forward ------------------------------------------------------


def marks_move_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """An ack sets the marks to what it carries instead of moving them forward."""
    mutate(
        monkeypatch,
        membership,
        "advance_marks",
        (
            "    new_read = max(member.read, read or 0)\n"
            "    new_delivered = max(member.delivered, delivered or 0, new_read)\n",
            "    new_read = member.read if read is None else read\n"
            "    new_delivered = max(member.delivered if delivered is None else delivered, new_read)\n",
        ),
    )


@dataclass(frozen=True)
class Plant:
    invariant: str
    apply: Callable[[pytest.MonkeyPatch], None]


PLANTS = {
    "ack-before-commit": Plant("ack after commit", ack_before_commit),
    "ack-as-each-op-runs": Plant("ack after commit", ack_as_each_op_runs),
    "inbox-entry-removed-at-push": Plant("inbox entry until ack", inbox_entry_removed_at_push),
    "drain-before-register": Plant("register before drain", drain_before_register),
    "lookup-before-persist": Plant("persist before look-up", lookup_before_persist),
    "unread-inbox-not-retried": Plant("every online failure degrades to the inbox", unread_inbox_not_retried),
    "failed-drain-dropped": Plant("every online failure degrades to the inbox", failed_drain_dropped),
    "failed-batch-keeps-streams": Plant("sender order", failed_batch_keeps_streams),
    "rolled-back-seqs-kept": Plant("contiguous seqs", rolled_back_seqs_kept),
    "no-idempotent-append": Plant("dedupe by id", no_idempotent_append),
    "marks-move-back": Plant("receipts only move forward", marks_move_back),
}
