"""Per-session delivery state: what to push now, what to read from the inbox.

The inbox of a user is durable and lives in the store as one cursor per
conversation: the user's *delivered* mark. Every message past that mark is
"in the inbox", and it leaves only when the device acks it (the mark moves).
A connected session reads the inbox through this state machine:

* a freshly committed message is *offered*; it is pushed straight from memory
  when it is the very next seq the session owes the device and the in-flight
  window has room (the fast, online path);
* anything else (unknown conversation, a gap, a full window, a drain already
  running) marks the conversation for *drain*, which reads the store from the
  session's cursor (the offline path, also used on connect);
* a cumulative ack from the device frees window room, which lets drains go on.

Because the store commits before anything is offered and the session is
registered before its first drain, every message is either offered to a
registered session or already committed when the session's drain reads: no
message can fall between the two paths. Anything this object decides not to
push stays in the store and is read by a later drain or the next connection.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class ConvCursor:
    sent: int  # highest seq pushed to (or known to be held by) the device
    acked: int  # the device's cumulative delivered ack
    known_last: int = 0  # highest seq offered to this session so far
    pushed: deque[tuple[int, int]] = field(default_factory=deque)  # (seq, bytes) not yet acked


@dataclass(slots=True, frozen=True)
class DrainRequest:
    conv: str
    after: int | None  # None: the cursor is unknown, read the store's mark first
    limit: int


class _OrderedSet:
    """Conversations in first-added order, with O(1) add, test and pop-first.

    (Popping a dict's first key again and again is quadratic: the deleted
    slots stay in front until the dict is resized.) The containers are made
    on first use: most connected devices owe nothing, and an empty deque
    alone is 760 bytes.
    """

    __slots__ = ("_members", "_order")

    def __init__(self) -> None:
        self._order: deque[str] | None = None
        self._members: set[str] | None = None

    def add(self, conv: str) -> None:
        if self._members is None or self._order is None:
            self._members, self._order = set(), deque()
        if conv not in self._members:
            self._members.add(conv)
            self._order.append(conv)

    def pop_first(self) -> str:
        if not self._order or self._members is None:
            raise KeyError("pop from an empty set")
        conv = self._order.popleft()
        self._members.discard(conv)
        if not self._order:
            self._members = self._order = None
        return conv

    def __contains__(self, conv: object) -> bool:
        return self._members is not None and conv in self._members

    def __len__(self) -> int:
        return 0 if self._members is None else len(self._members)


class DeliveryCursor:
    """Decides, for one connected device, between push and drain."""

    # One per connected device: slots, and containers that cost little while
    # empty (an empty set is 216 bytes, an empty dict 64).
    __slots__ = (
        "_draining",
        "_to_drain",
        "_waiting_for_room",
        "convs",
        "inflight",
        "inflight_bytes",
        "window",
        "window_bytes",
    )

    def __init__(self, window: int, window_bytes: int = 4 * 1024 * 1024) -> None:
        if window < 1 or window_bytes < 1:
            raise ValueError("window must be >= 1")
        self.window = window
        self.window_bytes = window_bytes
        self.inflight = 0
        self.inflight_bytes = 0
        # A drain stopped because the next message did not fit the byte
        # window: no point reading again before an ack frees room.
        self._waiting_for_room = False
        self.convs: dict[str, ConvCursor] = {}
        # Conversations whose inbox must be read from the store, oldest first.
        self._to_drain = _OrderedSet()
        self._draining: dict[str, None] = {}  # reads running (a set, in the dict's keys)

    # -- inputs ------------------------------------------------------------

    def load(self, conv: str, delivered: int) -> None:
        """On connect: the store says the device holds ``conv`` up to ``delivered``."""
        cur = self.convs.get(conv)
        if cur is None:
            self.convs[conv] = ConvCursor(sent=delivered, acked=delivered)
        self._to_drain.add(conv)

    def _has_room(self, size: int) -> bool:
        # One message always fits, however large, so the device can progress.
        if self.inflight == 0:
            return True
        return self.inflight < self.window and self.inflight_bytes + size <= self.window_bytes

    def _push(self, cur: ConvCursor, seq: int, size: int) -> None:
        cur.sent = seq
        cur.pushed.append((seq, size))
        self.inflight += 1
        self.inflight_bytes += size

    def offer(self, conv: str, seq: int, own: bool = False, size: int = 0) -> bool:
        """A message ``seq`` of ``conv`` was committed. True: push it now.

        ``own`` messages were sent by this very user: they are never pushed
        back, but they move the cursor so later seqs stay contiguous.
        """
        cur = self.convs.get(conv)
        if cur is None:
            # Where the device stands in this conversation is unknown here:
            # let a drain read the mark from the store.
            self._to_drain.add(conv)
            return False
        if seq > cur.known_last:
            cur.known_last = seq
        if seq <= cur.sent:
            return False  # a drain already pushed it
        if conv in self._to_drain or conv in self._draining or seq != cur.sent + 1:
            self._to_drain.add(conv)
            return False
        if own:
            cur.sent = seq
            return False
        if not self._has_room(size):
            self._to_drain.add(conv)
            return False
        self._push(cur, seq, size)
        return True

    def ack(self, conv: str, seq: int) -> None:
        """The device acked ``conv`` cumulatively up to ``seq``."""
        cur = self.convs.get(conv)
        if cur is None:
            return
        if seq > cur.acked:
            cur.acked = seq
        if seq > cur.sent:
            # The device holds more than we pushed (its own messages, history).
            cur.sent = seq
        pushed = cur.pushed
        while pushed and pushed[0][0] <= seq:
            _, size = pushed.popleft()
            self.inflight -= 1
            self.inflight_bytes -= size
            self._waiting_for_room = False

    # -- drains ------------------------------------------------------------

    def next_drain(self) -> DrainRequest | None:
        """The next inbox read to run, or None (nothing to read / no window room)."""
        room = self.window - self.inflight
        if (
            room <= 0
            or self._waiting_for_room
            or (self.inflight and self.inflight_bytes >= self.window_bytes)
        ):
            return None
        if not self._to_drain:
            return None
        conv = self._to_drain.pop_first()
        self._draining[conv] = None
        cur = self.convs.get(conv)
        return DrainRequest(conv, None if cur is None else cur.sent, room)

    def next_drains(self, most: int) -> list[DrainRequest]:
        """Up to ``most`` inbox reads to run together, each as ``next_drain`` would give.

        They share one window: each may use all of its free room, and
        ``drained`` pushes only what still fits, in the order given.
        """
        requests: list[DrainRequest] = []
        while len(requests) < most and (request := self.next_drain()) is not None:
            requests.append(request)
        return requests

    def drained(
        self,
        conv: str,
        start: int,
        seqs: list[int],
        scanned_to: int,
        last_seq: int,
        sizes: list[int] | None = None,
    ) -> list[int]:
        """A drain read finished; returns the seqs to push, in order.

        ``start`` is the cursor it read from, ``seqs`` the other senders'
        messages it found (ascending) and ``sizes`` their frame sizes,
        ``scanned_to`` the highest seq it looked at (own messages included)
        and ``last_seq`` the conversation's end as the read saw it. What does
        not fit the window is left for the next drain.
        """
        self._draining.pop(conv, None)
        cur = self.convs.get(conv)
        if cur is None:
            cur = self.convs[conv] = ConvCursor(sent=start, acked=start)
        to_push: list[int] = []
        reached = scanned_to
        for i, seq in enumerate(seqs):
            if seq <= cur.sent:
                continue
            size = 0 if sizes is None else sizes[i]
            if not self._has_room(size):
                reached = seq - 1  # everything before it was pushed or is own
                self._waiting_for_room = True
                break
            self._push(cur, seq, size)
            to_push.append(seq)
        if reached > cur.sent:
            cur.sent = reached
        if last_seq > cur.known_last:
            cur.known_last = last_seq
        if cur.sent < cur.known_last:
            self._to_drain.add(conv)
        return to_push

    def drain_failed(self, conv: str) -> None:
        """The read failed: try again later (the messages are still in the store)."""
        self._draining.pop(conv, None)
        self._to_drain.add(conv)

    def owes(self, conv: str) -> int:
        """The seq the device is waiting for next in ``conv`` (for tests and metrics)."""
        cur = self.convs.get(conv)
        return 0 if cur is None else cur.sent + 1

    @property
    def pending_drains(self) -> int:
        return len(self._to_drain) + len(self._draining)
