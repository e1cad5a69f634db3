"""DeliveryCursor: the push-or-drain decision for one connected device."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from roost.core.delivery import DeliveryCursor, DrainRequest

C = "d:alice:bob"
D = "g:0123456789abcdef"


def idle_cursor(window: int = 8, convs: dict[str, int] | None = None) -> DeliveryCursor:
    """A cursor whose connect-time drains are done: every conv known and idle."""
    cursor = DeliveryCursor(window)
    for conv, delivered in (convs or {C: 0}).items():
        cursor.load(conv, delivered)
    while (req := cursor.next_drain()) is not None:
        assert req.after is not None
        assert cursor.drained(req.conv, req.after, [], req.after, req.after) == []
    assert cursor.pending_drains == 0
    return cursor


# -- unit tests ----------------------------------------------------------------


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError):
        DeliveryCursor(0)
    assert DeliveryCursor(1).window == 1


def test_load_schedules_a_drain_from_the_stored_mark() -> None:
    cursor = DeliveryCursor(5)
    cursor.load(C, 7)
    assert cursor.pending_drains == 1
    assert cursor.owes(C) == 8
    assert cursor.next_drain() == DrainRequest(C, 7, 5)
    assert cursor.next_drain() is None  # the only one is running
    assert cursor.pending_drains == 1
    assert cursor.drained(C, 7, [8, 9], 10, 10) == [8, 9]
    assert cursor.owes(C) == 11
    assert cursor.inflight == 2
    assert cursor.pending_drains == 0


def test_batched_drains_share_the_window_in_order() -> None:
    cursor = DeliveryCursor(4)
    for i, conv in enumerate([C, D, "d:alice:carol"]):
        cursor.load(conv, i)
    reqs = cursor.next_drains(2)
    assert reqs == [DrainRequest(C, 0, 4), DrainRequest(D, 1, 4)]  # each may use all the room
    assert cursor.next_drains(2) == [DrainRequest("d:alice:carol", 2, 4)]
    assert cursor.next_drains(2) == []  # all three are running
    # The first page takes three of the four slots: the second gets one, the rest waits.
    assert cursor.drained(C, 0, [1, 2, 3], 3, 3) == [1, 2, 3]
    assert cursor.drained(D, 1, [2, 3], 3, 3) == [2]
    assert cursor.owes(D) == 3 and cursor.pending_drains == 2
    cursor.drain_failed("d:alice:carol")  # not read in this batch: it stays owed
    assert cursor.next_drains(8) == []  # no room until an ack
    cursor.ack(C, 3)
    assert cursor.next_drains(8) == [DrainRequest(D, 2, 3), DrainRequest("d:alice:carol", 2, 3)]


def test_fast_path_pushes_contiguous_seqs() -> None:
    cursor = idle_cursor()
    assert [cursor.offer(C, seq) for seq in (1, 2, 3)] == [True, True, True]
    assert cursor.inflight == 3
    assert cursor.owes(C) == 4
    assert cursor.pending_drains == 0
    assert cursor.next_drain() is None


def test_offer_of_an_already_sent_seq_is_ignored() -> None:
    cursor = idle_cursor()
    assert cursor.offer(C, 1)
    assert not cursor.offer(C, 1)
    assert cursor.inflight == 1
    assert cursor.pending_drains == 0


def test_unknown_conversation_goes_to_drain_from_the_store_mark() -> None:
    cursor = idle_cursor()
    assert not cursor.offer(D, 4)
    assert cursor.inflight == 0
    assert cursor.pending_drains == 1
    req = cursor.next_drain()
    assert req == DrainRequest(D, None, 8)  # None: read the mark from the store
    # the store read from its mark 2: seqs 3 (own) and 4
    assert cursor.drained(D, 2, [4], 4, 4) == [4]
    assert cursor.owes(D) == 5
    assert cursor.offer(D, 5)  # now known: fast path


def test_gap_goes_to_drain() -> None:
    cursor = idle_cursor()
    assert not cursor.offer(C, 2)  # 1 has not been offered (yet)
    assert cursor.inflight == 0
    assert cursor.owes(C) == 1
    req = cursor.next_drain()
    assert req == DrainRequest(C, 0, 8)
    # while the drain runs, even the next contiguous seq is not pushed directly
    assert not cursor.offer(C, 1)
    assert cursor.drained(C, 0, [1, 2], 2, 2) == [1, 2]
    assert cursor.owes(C) == 3
    # the offer during the drain re-queued the conv; that extra drain finds nothing new
    req = cursor.next_drain()
    assert req == DrainRequest(C, 2, 6)
    assert cursor.drained(C, 2, [], 2, 2) == []
    assert cursor.pending_drains == 0
    assert cursor.offer(C, 3)


def test_window_full_goes_to_drain_and_drains_resume_after_ack() -> None:
    cursor = idle_cursor(window=2)
    assert cursor.offer(C, 1)
    assert cursor.offer(C, 2)
    assert not cursor.offer(C, 3)  # window full
    assert not cursor.offer(C, 4)
    assert cursor.inflight == 2
    assert cursor.pending_drains == 1
    assert cursor.next_drain() is None  # no room: the drain waits
    cursor.ack(C, 1)
    assert cursor.inflight == 1
    assert cursor.next_drain() == DrainRequest(C, 2, 1)
    assert cursor.drained(C, 2, [3], 3, 4) == [3]  # page limited to the one free slot
    assert cursor.inflight == 2
    assert cursor.pending_drains == 1  # 4 is still owed
    assert cursor.next_drain() is None
    cursor.ack(C, 3)
    assert cursor.inflight == 0
    assert cursor.next_drain() == DrainRequest(C, 3, 2)
    assert cursor.drained(C, 3, [4], 4, 4) == [4]
    assert cursor.pending_drains == 0
    assert cursor.inflight == 1


def test_window_is_shared_between_conversations() -> None:
    cursor = idle_cursor(window=2, convs={C: 0, D: 0})
    assert cursor.offer(C, 1)
    assert cursor.offer(D, 1)
    assert not cursor.offer(C, 2)
    cursor.ack(D, 1)
    assert cursor.inflight == 1
    req = cursor.next_drain()
    assert req == DrainRequest(C, 1, 1)


def test_ack_is_cumulative_and_frees_every_slot_up_to_it() -> None:
    cursor = idle_cursor(window=5)
    for seq in (1, 2, 3, 4):
        assert cursor.offer(C, seq)
    cursor.ack(C, 3)
    assert cursor.inflight == 1
    cursor.ack(C, 2)  # stale ack: no effect
    assert cursor.inflight == 1
    assert cursor.convs[C].acked == 3
    cursor.ack(C, 4)
    assert cursor.inflight == 0
    cursor.ack("unknown", 9)  # ignored
    assert "unknown" not in cursor.convs


def test_ack_beyond_sent_moves_the_cursor() -> None:
    """The device may hold more than was pushed (its own messages, history)."""
    cursor = idle_cursor()
    cursor.ack(C, 5)
    assert cursor.owes(C) == 6
    assert not cursor.offer(C, 4)
    assert cursor.offer(C, 6)


def test_own_messages_advance_the_cursor_without_push() -> None:
    cursor = idle_cursor(window=1)
    assert not cursor.offer(C, 1, own=True)
    assert cursor.inflight == 0
    assert cursor.owes(C) == 2
    assert cursor.pending_drains == 0
    assert cursor.offer(C, 2)
    # own messages move the cursor even with the window full
    assert not cursor.offer(C, 3, own=True)
    assert cursor.owes(C) == 4
    assert cursor.pending_drains == 0
    assert cursor.inflight == 1


def test_own_message_after_a_gap_goes_to_drain() -> None:
    cursor = idle_cursor()
    assert not cursor.offer(C, 2, own=True)
    assert cursor.owes(C) == 1
    assert cursor.pending_drains == 1
    req = cursor.next_drain()
    assert req is not None
    # the read finds 1 from the peer and 2 (own, skipped but scanned)
    assert cursor.drained(C, 0, [1], 2, 2) == [1]
    assert cursor.owes(C) == 3


def test_offers_during_a_drain_are_not_lost() -> None:
    cursor = idle_cursor()
    cursor.offer(C, 1)
    cursor.ack(C, 1)
    assert not cursor.offer(C, 3)  # gap: 2 still to come
    req = cursor.next_drain()
    assert req == DrainRequest(C, 1, 8)
    # The read sees 2 and 3; 4 and 5 are committed and offered after the read.
    assert not cursor.offer(C, 2)  # a late offer, already covered by the read
    assert not cursor.offer(C, 4)
    assert not cursor.offer(C, 5)
    assert cursor.drained(C, 1, [2, 3], 3, 3) == [2, 3]
    assert cursor.convs[C].known_last == 5
    # known_last (5) > sent (3): the conversation is read again
    assert cursor.pending_drains == 1
    req = cursor.next_drain()
    assert req == DrainRequest(C, 3, 6)
    assert cursor.drained(C, 3, [4, 5], 5, 5) == [4, 5]
    assert cursor.pending_drains == 0
    assert cursor.offer(C, 6)


def test_re_drain_when_the_read_saw_less_than_was_offered() -> None:
    """Only known_last tells the cursor that more is committed than the read saw."""
    cursor = idle_cursor()
    assert not cursor.offer(C, 2)
    assert cursor.convs[C].known_last == 2
    assert cursor.next_drain() == DrainRequest(C, 0, 8)
    # A read that (in this interleaving) happened before 2 was committed.
    assert cursor.drained(C, 0, [1], 1, 1) == [1]
    assert cursor.pending_drains == 1
    req = cursor.next_drain()
    assert req == DrainRequest(C, 1, 7)
    assert cursor.drained(C, 1, [2], 2, 2) == [2]
    assert cursor.pending_drains == 0


def test_page_that_stops_short_of_last_seq_is_continued() -> None:
    cursor = idle_cursor(window=10)
    cursor.load(D, 0)
    req = cursor.next_drain()
    assert req == DrainRequest(D, 0, 10)
    # the store stopped scanning at 12 of 30 (own messages, limit)
    assert cursor.drained(D, 0, [1, 5], 12, 30) == [1, 5]
    assert cursor.next_drain() == DrainRequest(D, 12, 8)


def test_drained_never_pushes_what_was_already_sent() -> None:
    cursor = idle_cursor()
    cursor.load(D, 0)
    req = cursor.next_drain()
    assert req is not None
    cursor.ack(D, 3)  # the device says it holds 1..3 (e.g. own + history)
    assert cursor.drained(D, 0, [1, 2, 3, 4], 4, 4) == [4]
    assert cursor.inflight == 1


def test_drained_does_not_move_the_cursor_back() -> None:
    """An ack past the cursor during a drain (the device paged history) wins
    over the older read: nothing the device acked is pushed again."""
    cursor = idle_cursor()
    assert not cursor.offer(C, 3)
    req = cursor.next_drain()
    assert req == DrainRequest(C, 0, 8)
    cursor.ack(C, 6)
    assert cursor.drained(C, 0, [1, 2, 3], 3, 3) == []
    assert cursor.owes(C) == 7
    assert cursor.pending_drains == 0
    assert not cursor.offer(C, 4)
    assert cursor.offer(C, 7)


def test_byte_window_one_message_always_fits() -> None:
    cursor = DeliveryCursor(4, window_bytes=100)
    cursor.load(C, 0)
    assert cursor.next_drain() is not None
    cursor.drained(C, 0, [], 0, 0)
    assert cursor.offer(C, 1, size=500)  # over the byte window, but nothing is in flight
    assert cursor.inflight_bytes == 500
    assert not cursor.offer(C, 2, size=1)
    assert cursor.next_drain() is None  # the byte window is full
    cursor.ack(C, 1)
    assert (cursor.inflight, cursor.inflight_bytes) == (0, 0)
    assert cursor.next_drain() == DrainRequest(C, 1, 4)


def test_byte_window_exact_fit() -> None:
    cursor = DeliveryCursor(4, window_bytes=300)
    cursor.load(C, 0)
    cursor.next_drain()
    cursor.drained(C, 0, [], 0, 0)
    assert cursor.offer(C, 1, size=150)
    assert cursor.offer(C, 2, size=150)  # exactly the window
    assert not cursor.offer(C, 3, size=1)
    assert (cursor.inflight, cursor.inflight_bytes) == (2, 300)


def test_drained_stops_at_the_first_message_over_the_byte_window() -> None:
    cursor = DeliveryCursor(4, window_bytes=300)
    cursor.load(C, 0)
    assert cursor.next_drain() == DrainRequest(C, 0, 4)
    assert cursor.drained(C, 0, [1, 2, 3], 3, 3, [200, 200, 50]) == [1]
    assert (cursor.inflight, cursor.inflight_bytes) == (1, 200)
    assert cursor.owes(C) == 2  # 2 and 3 are left for a later drain
    assert cursor.pending_drains == 1


def test_a_drain_cut_short_by_the_byte_window_waits_for_an_ack() -> None:
    """After a drain stopped because the next message did not fit the byte window,
    reading the store again before an ack frees room finds the same message and
    pushes nothing: ``next_drain`` must not ask for it (Session._drain would spin)."""
    cursor = DeliveryCursor(4, window_bytes=300)
    cursor.load(C, 0)
    cursor.next_drain()
    assert cursor.drained(C, 0, [1, 2, 3], 3, 3, [200, 200, 50]) == [1]
    assert cursor.next_drain() is None
    cursor.ack(C, 1)
    assert cursor.next_drain() == DrainRequest(C, 1, 4)
    assert cursor.drained(C, 1, [2, 3], 3, 3, [200, 50]) == [2, 3]


def test_drain_failed_requeues() -> None:
    cursor = idle_cursor()
    assert not cursor.offer(C, 2)
    req = cursor.next_drain()
    assert req == DrainRequest(C, 0, 8)
    assert cursor.next_drain() is None
    cursor.drain_failed(C)
    assert cursor.pending_drains == 1
    assert cursor.next_drain() == req  # same read again, nothing moved
    assert cursor.owes(C) == 1
    assert cursor.drained(C, 0, [1, 2], 2, 2) == [1, 2]


def test_drain_failed_for_an_unknown_conversation_retries_from_the_store_mark() -> None:
    cursor = DeliveryCursor(3)
    cursor.offer(D, 1)
    assert cursor.next_drain() == DrainRequest(D, None, 3)
    cursor.drain_failed(D)
    assert cursor.next_drain() == DrainRequest(D, None, 3)


def test_drains_are_served_oldest_first() -> None:
    cursor = idle_cursor(convs={"c1": 0, "c2": 0, "c3": 0})
    for conv in ("c3", "c1", "c2"):
        cursor.offer(conv, 5)
    order = []
    while (req := cursor.next_drain()) is not None:
        order.append(req.conv)
        cursor.drained(req.conv, 0, [], 5, 5)
    assert order == ["c3", "c1", "c2"]


def test_load_does_not_rewind_a_known_conversation() -> None:
    cursor = idle_cursor()
    assert cursor.offer(C, 1)
    assert cursor.offer(C, 2)
    cursor.load(C, 0)  # a stale inbox snapshot (e.g. a sync)
    assert cursor.owes(C) == 3
    req = cursor.next_drain()
    assert req == DrainRequest(C, 2, 6)
    assert cursor.drained(C, 0, [1, 2], 2, 2) == []


# -- the stateful model ------------------------------------------------------------

ME = "me"
CONVS = ("c1", "c2")
SENDERS = (ME, "ann", "ben")
# frame sizes against byte windows of 300 and 600: exact fits, overflows, one oversized
SIZES = st.sampled_from([100, 150, 300, 450])
MAX_MESSAGES = 45


@dataclass
class Page:
    conv: str
    start: int
    seqs: list[int]
    sizes: list[int]
    scanned_to: int
    last_seq: int


@dataclass
class ModelConv:
    senders: list[str] = field(default_factory=list)  # senders[i] sent seq i + 1
    sizes: list[int] = field(default_factory=list)  # frame size of seq i + 1
    mark: int = 0  # the store's delivered mark of ME
    initial_mark: int = 0
    held: set[int] = field(default_factory=set)  # what the device has (pushed, own, history)
    history: set[int] = field(default_factory=set)  # others' messages it got from history
    pushed: list[int] = field(default_factory=list)  # in push order, this session
    unacked: list[int] = field(default_factory=list)  # pushed, not yet acked in the cursor

    @property
    def last_seq(self) -> int:
        return len(self.senders)

    def others(self, above: int = 0) -> list[int]:
        return [i + 1 for i, s in enumerate(self.senders) if s != ME and i + 1 > above]

    def contiguous(self) -> int:
        """The device's cumulative point: it holds every message up to here."""
        upto = self.mark
        while upto + 1 in self.held:
            upto += 1
        return upto


def pushed_seqs(cursor: DeliveryCursor, conv: str) -> list[int]:
    """The cursor's pushed-not-acked seqs (entries are seqs or ``(seq, size)``)."""
    return [p if isinstance(p, int) else p[0] for p in cursor.convs[conv].pushed]


class DeliveryMachine(RuleBasedStateMachine):
    """A store, a registered session's cursor and a device, interleaved at random.

    The store is a list of committed messages per conversation plus ME's durable
    delivered mark. Each commit is offered to the session later, in commit order
    (as the chat service does). A drain is three steps -- ``next_drain``, the
    store read (taken from the committed list at that moment), ``drained`` --
    and commits, offers and acks may land between any of them. Acks go to the
    store first and reach the cursor later, as ``session.acked`` does. One drain
    runs at a time, as in ``Session._drain``.

    With ``HISTORY`` the device also pages history, so it may hold (and ack)
    messages the cursor never pushed; without it, every message of another
    sender must be pushed exactly once.
    """

    HISTORY = True

    def __init__(self) -> None:
        super().__init__()
        self.convs: dict[str, ModelConv] = {}
        self.cursor = DeliveryCursor(1)
        self.offers: list[tuple[str, int, bool, int]] = []
        self.cursor_acks: list[tuple[str, int]] = []
        self.request: DrainRequest | None = None
        self.page: Page | None = None
        self.snapshot: list[tuple[str, int]] | None = None
        self.last_limit = 0

    # -- setup: what happened before this session ----------------------------

    @initialize(
        window=st.integers(1, 4),
        window_bytes=st.sampled_from([300, 600, 4 * 1024 * 1024]),
        history=st.fixed_dictionaries(
            {
                conv: st.tuples(
                    st.lists(st.tuples(st.sampled_from(SENDERS), SIZES), max_size=6), st.integers(0, 6)
                )
                for conv in CONVS
            }
        ),
    )
    def connect(
        self, window: int, window_bytes: int, history: dict[str, tuple[list[tuple[str, int]], int]]
    ) -> None:
        self.cursor = DeliveryCursor(window, window_bytes)
        for conv, (messages, mark) in history.items():
            mc = ModelConv(senders=[s for s, _ in messages], sizes=[n for _, n in messages])
            mc.mark = mc.initial_mark = min(mark, mc.last_seq)
            # a previous session got everything up to the mark, and its own messages
            mc.held = set(range(1, mc.mark + 1)) | {i + 1 for i, s in enumerate(mc.senders) if s == ME}
            self.convs[conv] = mc
        # The session is registered (offers reach it from now on); the inbox
        # read of ``connect`` happens now, its load later (``load_snapshot``).
        self.snapshot = self.inbox()

    def inbox(self) -> list[tuple[str, int]]:
        return [(c, m.mark) for c, m in self.convs.items() if m.last_seq > m.mark]

    # -- the world -------------------------------------------------------------

    @precondition(lambda self: sum(m.last_seq for m in self.convs.values()) < MAX_MESSAGES)
    @rule(conv=st.sampled_from(CONVS), sender=st.sampled_from(SENDERS), size=SIZES)
    def commit(self, conv: str, sender: str, size: int) -> None:
        mc = self.convs[conv]
        mc.senders.append(sender)
        mc.sizes.append(size)
        self.offers.append((conv, mc.last_seq, sender == ME, size))

    @precondition(lambda self: self.offers)
    @rule()
    def deliver_offer(self) -> None:
        conv, seq, own, size = self.offers.pop(0)
        mc = self.convs[conv]
        if own:
            mc.held.add(seq)  # the ✓ reaches the device in the same callback
        if self.cursor.offer(conv, seq, own, size):
            assert not own
            self.record_push(conv, seq)

    @precondition(lambda self: self.snapshot is None)
    @rule()
    def sync(self) -> None:
        """The device sends ``sync``: another inbox read, loaded later."""
        self.snapshot = self.inbox()

    @precondition(lambda self: self.snapshot is not None)
    @rule()
    def load_snapshot(self) -> None:
        assert self.snapshot is not None
        for conv, delivered in self.snapshot:
            self.cursor.load(conv, delivered)
        self.snapshot = None

    # -- drains (one at a time, like Session._drain) ------------------------------

    @precondition(lambda self: self.request is None)
    @rule()
    def start_drain(self) -> None:
        room = self.cursor.window - self.cursor.inflight
        req = self.cursor.next_drain()
        if req is None:
            return
        assert room > 0
        assert req.limit == room
        mc = self.convs[req.conv]
        if req.after is not None:
            assert req.after <= mc.last_seq
        self.request = req
        self.page = None
        self.last_limit = req.limit

    def read(self, req: DrainRequest) -> Page:
        """SqliteStore.read_inbox on the model, as committed right now."""
        mc = self.convs[req.conv]
        start = mc.mark if req.after is None else req.after
        rows = [(s, mc.senders[s - 1]) for s in range(start + 1, mc.last_seq + 1)]
        rows = rows[: req.limit * 4]
        seqs: list[int] = []
        scanned = start
        for seq, sender in rows:
            if len(seqs) >= req.limit:
                break
            scanned = seq
            if sender != ME:
                seqs.append(seq)
        return Page(req.conv, start, seqs, [mc.sizes[s - 1] for s in seqs], scanned, mc.last_seq)

    @precondition(lambda self: self.request is not None and self.page is None)
    @rule()
    def read_store(self) -> None:
        assert self.request is not None
        self.page = self.read(self.request)

    @precondition(lambda self: self.page is not None)
    @rule()
    def finish_drain(self) -> None:
        page = self.page
        assert page is not None
        before = self.cursor.inflight
        to_push = self.cursor.drained(
            page.conv, page.start, page.seqs, page.scanned_to, page.last_seq, page.sizes
        )
        assert to_push == sorted(to_push)
        assert set(to_push) <= set(page.seqs)
        assert len(to_push) <= self.last_limit
        for seq in to_push:
            self.record_push(page.conv, seq)
        assert self.cursor.inflight == before + len(to_push)
        self.request = None
        self.page = None

    @precondition(lambda self: self.request is not None)
    @rule()
    def fail_drain(self) -> None:
        assert self.request is not None
        self.cursor.drain_failed(self.request.conv)
        self.request = None
        self.page = None

    # -- the device --------------------------------------------------------------

    @rule(conv=st.sampled_from(CONVS), data=st.data())
    def device_acks(self, conv: str, data: st.DataObject) -> None:
        mc = self.convs[conv]
        upto = mc.contiguous()
        # usually everything it holds; sometimes less (acks may lag)
        seq = data.draw(st.just(upto) | st.integers(0, upto), label="ack")
        # store.advance_marks: only forward; session.acked gets the result
        mc.mark = max(mc.mark, seq)
        self.cursor_acks.append((conv, mc.mark))

    @precondition(lambda self: self.HISTORY)
    @rule(conv=st.sampled_from(CONVS), data=st.data())
    def fetch_history(self, conv: str, data: st.DataObject) -> None:
        """The device pages history up to some seq: it then holds those messages
        (and may ack past what was pushed), though the cursor does not know yet."""
        mc = self.convs[conv]
        upto = data.draw(st.just(mc.last_seq) | st.integers(0, mc.last_seq), label="history upto")
        got = set(mc.others()) & set(range(1, upto + 1))
        mc.history |= got - mc.held
        mc.held |= got

    @precondition(lambda self: self.HISTORY)
    @rule(conv=st.sampled_from(CONVS))
    def device_catches_up(self, conv: str) -> None:
        """History to the end, a full ack, and the cursor hears of it: in one step."""
        mc = self.convs[conv]
        got = set(mc.others())
        mc.history |= got - mc.held
        mc.held |= got
        mc.mark = max(mc.mark, mc.contiguous())
        self.cursor_acks.append((conv, mc.mark))
        while self.cursor_acks:
            self.deliver_ack()

    @precondition(lambda self: self.cursor_acks)
    @rule()
    def deliver_ack(self) -> None:
        conv, seq = self.cursor_acks.pop(0)
        self.apply_ack(conv, seq)

    def apply_ack(self, conv: str, seq: int) -> None:
        mc = self.convs[conv]
        self.cursor.ack(conv, seq)
        if conv in self.cursor.convs:
            mc.unacked = [s for s in mc.unacked if s > seq]

    def ack_everything(self) -> None:
        for conv, mc in self.convs.items():
            mc.mark = max(mc.mark, mc.contiguous())
            self.apply_ack(conv, mc.mark)

    # -- bookkeeping and invariants --------------------------------------------------

    def record_push(self, conv: str, seq: int) -> None:
        mc = self.convs[conv]
        assert 1 <= seq <= mc.last_seq, f"pushed {conv}#{seq} that is not committed"
        assert mc.senders[seq - 1] != ME, f"pushed own message {conv}#{seq} back"
        assert seq not in mc.pushed, f"{conv}#{seq} pushed twice"
        if mc.pushed:
            assert seq > mc.pushed[-1], f"{conv}#{seq} pushed after {mc.pushed[-1]}"
        assert seq > mc.initial_mark, f"{conv}#{seq} was delivered in an earlier session"
        cur = self.cursor.convs[conv]
        assert seq > cur.acked, f"{conv}#{seq} pushed though the device acked {cur.acked}"
        assert seq in mc.history or seq not in mc.held, f"{conv}#{seq} already held"
        mc.pushed.append(seq)
        mc.unacked.append(seq)
        mc.held.add(seq)

    @invariant()
    def inflight_is_consistent_and_bounded(self) -> None:
        unacked = [(c, s) for c, m in self.convs.items() for s in m.unacked]
        assert self.cursor.inflight == len(unacked)
        # the count window holds (drains never overfill it)
        assert 0 <= self.cursor.inflight <= self.cursor.window
        # and so does the byte window, but for a single (possibly huge) message
        size = sum(self.convs[c].sizes[s - 1] for c, s in unacked)
        assert self.cursor.inflight_bytes == size
        assert size <= self.cursor.window_bytes or self.cursor.inflight == 1

    @invariant()
    def cursor_never_runs_ahead_of_the_store(self) -> None:
        for conv, mc in self.convs.items():
            cur = self.cursor.convs.get(conv)
            if cur is not None:
                assert cur.sent <= mc.last_seq
                assert cur.acked <= cur.sent
                assert pushed_seqs(self.cursor, conv) == mc.unacked

    def assert_model_invariants(self) -> None:
        self.inflight_is_consistent_and_bounded()
        self.cursor_never_runs_ahead_of_the_store()

    def quiesce(self) -> None:
        """Let everything settle: offers, acks and drains, the device acking what it
        gets, until nothing is pending."""
        if self.snapshot is not None:
            self.load_snapshot()
        for _ in range(1_000):
            while self.offers:
                self.deliver_offer()
            while self.cursor_acks:
                self.deliver_ack()
            if self.request is None:
                self.start_drain()
            if self.request is not None:
                if self.page is None:
                    self.read_store()
                self.finish_drain()
            self.assert_model_invariants()
            self.ack_everything()
            if self.request is None and self.cursor.pending_drains == 0 and not self.offers:
                break
        else:
            raise AssertionError("delivery never settled")

    def check_exactly_once(self) -> None:
        for conv, mc in self.convs.items():
            expected = mc.others(above=mc.initial_mark)
            # everything the device did not get from history was pushed, exactly once
            must = [s for s in expected if s not in mc.history]
            assert [s for s in mc.pushed if s not in mc.history] == must, (
                f"{conv}: committed by others {expected}, pushed {mc.pushed}"
            )
            assert set(mc.pushed) <= set(expected)
            assert set(expected) <= mc.held
            if not self.HISTORY:
                assert mc.pushed == expected
            if mc.last_seq > mc.initial_mark:
                assert self.cursor.owes(conv) == mc.last_seq + 1
        assert self.cursor.pending_drains == 0
        assert self.cursor.inflight == 0

    @rule()
    def settle_and_check(self) -> None:
        self.quiesce()
        self.check_exactly_once()

    def teardown(self) -> None:
        if self.convs:
            self.quiesce()
            self.check_exactly_once()


class PushOnlyDeliveryMachine(DeliveryMachine):
    HISTORY = False


MACHINE_SETTINGS = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
DeliveryMachine.TestCase.settings = MACHINE_SETTINGS
PushOnlyDeliveryMachine.TestCase.settings = MACHINE_SETTINGS
TestDeliveryMachine = DeliveryMachine.TestCase
TestPushOnlyDeliveryMachine = PushOnlyDeliveryMachine.TestCase
