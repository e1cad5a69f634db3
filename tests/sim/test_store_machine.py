"""Hypothesis state machines over the store the simulator drives (the real
SQLite store operations on the virtual clock), against a plain model:

* the inbox: an entry leaves only on the recipient's ack, a read does not
  consume it (redelivery after a reconnect), own messages are never in it;
* receipts: marks only move forward, read implies delivered, each sender of a
  message in a moved range (or past a removed member's read mark) has a
  pending receipt until it acks it, and the replayed receipt carries the
  current members' marks;
* group membership: only admins add and remove, the member limit holds, the
  last admin leaving promotes the longest-standing member, a removed member
  sees nothing after its removal and can no longer send;
* crashes: a write whose batch crashed before the commit left nothing, one
  that crashed after the commit is there (and a retry of it is a duplicate).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from roost.core.ids import direct_conv_id
from roost.core.tokens import hash_token
from roost.protocol.errors import ErrorCode, ProtocolError
from roost.sim.loop import VirtualClockLoop
from roost.sim.store import SimStore
from roost.store.base import StoreUnavailable
from tests.store.pages import read_inbox

USERS = ("ann", "ben", "cat", "dan", "eve")
GROUP = "g:00000000000000aa"
DIRECT = direct_conv_id("ann", "ben")
LIMIT = 4  # members a group may hold, small so the limit is reached


@dataclass
class Span:
    joined: int
    left: int | None
    admin: bool
    delivered: int
    read: int

    def upto(self, last: int) -> int:
        return last if self.left is None else min(self.left, last)


@dataclass
class Conv:
    members: dict[str, Span]
    messages: dict[int, str] = field(default_factory=dict)  # seq -> sender ("" for membership events)
    ids: dict[tuple[str, str], int] = field(default_factory=dict)  # (sender, client id) -> seq

    @property
    def last(self) -> int:
        return max(self.messages, default=0)

    def active(self) -> list[str]:
        return [u for u, s in self.members.items() if s.left is None]


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = VirtualClockLoop()
        self.store = SimStore(random.Random(0))
        self.run(self.store.open())
        for user in USERS:
            self.run(self.store.add_user(user, hash_token(user), 0))
        self.run(self.store.create_group("ann", GROUP, "g", ["ann", "ben", "cat"], LIMIT, 0))
        group = Conv({u: Span(0, None, u == "ann", 0, 0) for u in ("ann", "ben", "cat")})
        group.messages[1] = ""
        # A 1:1 conversation exists from its first message.
        self.run(self.store.append("ann", "hello", "text/plain", b"hi", 0, to="ben"))
        direct = Conv(
            {u: Span(0, None, False, 0, 0) for u in ("ann", "ben")}, {1: "ann"}, {("ann", "hello"): 1}
        )
        self.convs = {GROUP: group, DIRECT: direct}
        self.pending: dict[tuple[str, str], int] = {}  # (sender, conv) -> rv the store holds
        self.sent = 0

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()

    def run(self, awaitable: Any) -> Any:
        return self.loop.run_until_complete(awaitable)

    def attempt(self, awaitable: Any) -> tuple[Any, ErrorCode | None]:
        try:
            return self.run(awaitable), None
        except ProtocolError as exc:
            return None, exc.code

    # -- messages ------------------------------------------------------------

    @rule(sender=st.sampled_from(USERS), to_group=st.booleans(), retry=st.booleans())
    def send(self, sender: str, to_group: bool, retry: bool) -> None:
        conv_id = GROUP if to_group else DIRECT
        conv = self.convs[conv_id]
        mine = [cid for (s, cid) in conv.ids if s == sender]
        client_id = mine[-1] if retry and mine else f"m{self.sent}"
        self.sent += 1
        stored, error = self.attempt(
            self.store.append(sender, client_id, "text/plain", b"x", 0, conv=conv_id)
        )
        span = conv.members.get(sender)
        known = conv.ids.get((sender, client_id))
        if span is None or span.left is not None:
            if known is not None:
                # A retry of a message stored while the sender was a member
                # (its answer lost) gets its original answer, not not_member.
                assert error is None and stored.duplicate and stored.seq == known
                return
            assert error in (ErrorCode.NOT_MEMBER, ErrorCode.UNKNOWN_CONVERSATION)
            return
        assert error is None
        if known is not None:
            assert stored.duplicate and stored.seq == known
            return
        assert not stored.duplicate and stored.seq == conv.last + 1
        assert set(stored.recipients) == set(conv.active()) - {sender}
        conv.messages[stored.seq] = sender
        conv.ids[(sender, client_id)] = stored.seq

    @rule(sender=st.sampled_from(("ann", "ben")), after_commit=st.booleans())
    def send_then_store_crashes(self, sender: str, after_commit: bool) -> None:
        conv = self.convs[DIRECT]
        client_id = f"m{self.sent}"
        self.sent += 1
        future = self.store.append(sender, client_id, "text/plain", b"x", 0, conv=DIRECT)
        self.store.crash(after_commit)
        self.store.restart()
        try:
            self.run(future)
            raise AssertionError("a write caught in a crash was answered")
        except StoreUnavailable:
            pass
        if after_commit:  # committed: it is there, and a retry is a duplicate
            conv.messages[conv.last + 1] = sender
            conv.ids[(sender, client_id)] = conv.last
        retry, error = self.attempt(self.store.append(sender, client_id, "text/plain", b"x", 0, conv=DIRECT))
        assert error is None and retry.duplicate == after_commit
        conv.messages[retry.seq] = sender
        conv.ids[(sender, client_id)] = retry.seq

    # -- marks and receipts ----------------------------------------------------

    @rule(
        user=st.sampled_from(USERS),
        to_group=st.booleans(),
        back=st.integers(0, 3),
        read=st.booleans(),
    )
    def ack(self, user: str, to_group: bool, back: int, read: bool) -> None:
        conv_id = GROUP if to_group else DIRECT
        conv = self.convs[conv_id]
        span = conv.members.get(user)
        seq = max(0, conv.last - back) if span is None else max(0, span.upto(conv.last) + 1 - back)
        marks = (None, seq) if read else (seq, None)
        result, error = self.attempt(self.store.advance_marks(user, conv_id, *marks))
        if span is None:
            assert error == ErrorCode.NOT_MEMBER
            return
        if seq > span.upto(conv.last):
            assert error == ErrorCode.INVALID
            return
        assert error is None
        old_d, old_r = span.delivered, span.read
        new_r = max(old_r, seq if read else 0)
        new_d = max(old_d, seq if not read else 0, new_r)
        assert (result.delivered, result.read) == (new_d, new_r)
        span.delivered, span.read = new_d, new_r
        if (new_d, new_r) == (old_d, old_r):
            assert result.receipts == []
            return
        low = min(old_d, old_r) if new_r > old_r else old_d
        senders = {s for q, s in conv.messages.items() if low < q <= new_d} - {user, ""}
        assert {r.user for r in result.receipts} == senders
        for receipt in result.receipts:
            assert receipt.marks[user] == (new_d, new_r)
            self.pending[(receipt.user, conv_id)] = receipt.rv

    @rule(data=st.data())
    def rack(self, data: st.DataObject) -> None:
        if not self.pending:
            return
        user, conv_id = data.draw(st.sampled_from(sorted(self.pending)))
        self.run(self.store.ack_receipts(user, conv_id, self.pending.pop((user, conv_id))))

    # -- membership ------------------------------------------------------------

    @rule(actor=st.sampled_from(USERS), member=st.sampled_from(USERS))
    def add(self, actor: str, member: str) -> None:
        group = self.convs[GROUP]
        snap, error = self.attempt(self.store.add_members(actor, GROUP, [member], LIMIT, 0))
        span = group.members.get(actor)
        if span is None or span.left is not None or not span.admin:
            assert error in (ErrorCode.NOT_MEMBER, ErrorCode.FORBIDDEN)
            return
        if member in group.active():
            assert error is None and snap.event is None
            return
        if len(group.active()) + 1 > LIMIT:
            assert error == ErrorCode.GROUP_FULL
            return
        assert error is None and snap.event is not None and snap.event.seq == group.last + 1
        at = group.last
        group.members[member] = Span(at, None, False, at, at)
        group.messages[snap.event.seq] = ""

    @rule(actor=st.sampled_from(USERS), member=st.sampled_from(USERS))
    def remove(self, actor: str, member: str) -> None:
        group = self.convs[GROUP]
        leaving = actor == member
        snap, error = self.attempt(self.store.remove_members(actor, GROUP, [member], 0))
        span = group.members.get(actor)
        if span is None or span.left is not None or (not leaving and not span.admin):
            assert error in (ErrorCode.NOT_MEMBER, ErrorCode.FORBIDDEN)
            return
        assert error is None
        if member not in group.active():
            assert snap.event is None
            return
        seq = group.last + 1
        assert snap.event.seq == seq and member in snap.event.recipients
        group.messages[seq] = ""
        group.members[member].left = seq
        group.members[member].admin = False
        active = [group.members[u] for u in group.active()]
        if active and not any(s.admin for s in active):
            heir = min(group.active(), key=lambda u: (group.members[u].joined, u))
            group.members[heir].admin = True
        assert snap.members == sorted(group.active())
        assert snap.admins == sorted(u for u in group.active() if group.members[u].admin)
        # The aggregates no longer wait for the removed member: every
        # remaining sender past its read mark gets a receipt.
        low = group.members[member].read
        senders = {s for q, s in group.messages.items() if q > low} & set(group.active())
        assert {r.user for r in snap.receipts} == senders
        for receipt in snap.receipts:
            self.pending[(receipt.user, GROUP)] = receipt.rv

    # -- what every read must show ---------------------------------------------

    @invariant()
    def inbox_holds_exactly_the_unacked(self) -> None:
        for user in USERS:
            entries = {e.conv: e for e in self.run(self.store.inbox(user))}
            for conv_id, conv in self.convs.items():
                span = conv.members.get(user)
                owed = span is not None and span.upto(conv.last) > span.delivered
                assert (conv_id in entries) == owed, (user, conv_id)
                if span is None:
                    continue
                page = self.run(read_inbox(self.store, user, conv_id, None, 200))
                expected = [
                    q
                    for q, s in sorted(conv.messages.items())
                    if span.delivered < q <= span.upto(conv.last) and s != user
                ]
                assert [m.seq for m in page.messages] == expected
                assert page.start == span.delivered
                assert page.last_seq == span.upto(conv.last)

    @invariant()
    def marks_and_history_respect_membership(self) -> None:
        for conv_id, conv in self.convs.items():
            for user, span in conv.members.items():
                assert span.joined <= span.read <= span.delivered <= span.upto(conv.last)
                messages, first, last = self.run(self.store.history(user, conv_id, None, 0, 200))
                assert (first, last) == (span.joined + 1, span.upto(conv.last))
                assert [m.seq for m in messages] == [
                    q for q in sorted(conv.messages) if span.joined < q <= span.upto(conv.last)
                ]

    @invariant()
    def pending_receipts_carry_current_marks(self) -> None:
        for user in USERS:
            receipts = {r.conv: r for r in self.run(self.store.pending_receipts(user))}
            assert set(receipts) == {c for (u, c) in self.pending if u == user}
            for conv_id, receipt in receipts.items():
                conv = self.convs[conv_id]
                others = {u: conv.members[u] for u in conv.active() if u != user}
                # Members who left are named while they had got something.
                named = {
                    u: s
                    for u, s in conv.members.items()
                    if u != user and (s.left is None or s.delivered > s.joined)
                }
                assert receipt.marks == {u: (s.delivered, s.read) for u, s in named.items()}
                assert receipt.all_delivered == min((s.delivered for s in others.values()), default=0)
                assert receipt.all_read == min((s.read for s in others.values()), default=0)


StoreMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStoreMachine = StoreMachine.TestCase
