"""The history checker: did a recorded run keep Roost's promises?

Clients record what they sent (and whether it got ✓), what the SDK showed
them and the receipts they saw; this module checks the whole history after
the run, with no I/O. It is shared by ``roost verify`` (real processes under
faults) and the simulator, and is tested on synthetic histories with each
kind of violation planted.

Promises checked:

* ``lost``: a message that got ✓ never reached one of its recipients;
* ``duplicate``: a recipient was shown the same message more than once (or
  one client id at two seqs), or two messages got ✓ with one seq;
* ``reordered``: a sender's messages got seqs out of send order, or a
  recipient was shown a conversation out of seq order;
* ``gap``: a recipient's view of a conversation skips a seq after it joined,
  or the store's seqs of a conversation skip one;
* ``phantom``: something was shown that nobody sent (or with other content);
* ``non_member``: a message was shown to someone who was not a member for it;
* ``missing_receipt``: a message was shown to a recipient but its sender
  never learnt it was delivered;
* ``read_before_delivered``: a receipt said read past delivered;
* ``not_durable``: a message that got ✓ is not in the store at its seq
  (checked when the history has a view of the store: ``roost verify``
  reads the server's database after the run).

Each violation also names the invariant of docs/reliability.md it breaks
(``Violation.invariant``). The checker sees symptoms, so where one symptom
has several possible causes it names the one the evidence points to: a lost
message that the store does not hold was acked before it was committed; one
the store holds either left the recipient's inbox without reaching it, or
stayed in the inbox and was never offered to the connected recipient.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

SYSTEM = ""  # sender of the server's own membership messages


@dataclass(frozen=True, slots=True)
class Sent:
    sender: str
    client_id: str
    index: int  # position in the sender's send order (per sender, increasing)
    t: float
    acked: bool = False
    conv: str = ""  # known once acked
    seq: int = 0
    t_ack: float = 0.0


@dataclass(frozen=True, slots=True)
class Shown:
    recipient: str
    conv: str
    seq: int
    sender: str
    client_id: str
    t: float


@dataclass(frozen=True, slots=True)
class ReceiptSeen:
    observer: str  # the sender who received the receipt
    conv: str
    marks: dict[str, tuple[int, int]]  # member -> (delivered, read)
    t: float


@dataclass(slots=True)
class History:
    sent: list[Sent] = field(default_factory=list)
    shown: list[Shown] = field(default_factory=list)
    receipts: list[ReceiptSeen] = field(default_factory=list)
    # conv -> user -> (joined_seq, left_seq or None): sees joined < seq <= left
    members: dict[str, dict[str, tuple[int, int | None]]] = field(default_factory=dict)
    # What the server's store holds after the run, when the checker can read it.
    stored: StoreView | None = None
    # (user, conv) -> seqs that user sent or received as encryption protocol
    # messages: never shown, but no gap.
    protocol: dict[tuple[str, str], set[int]] = field(default_factory=lambda: defaultdict(set))


@dataclass(slots=True)
class StoreView:
    messages: dict[tuple[str, int], tuple[str, str]]  # (conv, seq) -> (sender, client id)
    # (conv, user) -> the user's delivered mark: its inbox holds the seqs above it.
    delivered: dict[tuple[str, str], int] = field(default_factory=dict)


# The invariants of docs/reliability.md, as each violation kind breaks them
# (unless flagged with a more precise one).
ACK_AFTER_COMMIT = "ack after commit"
INBOX_UNTIL_ACK = "inbox entry until ack"
# The entry stayed, but a connected recipient was never offered it.
OFFERED_WHILE_CONNECTED = "register before drain / persist before look-up"
SENDER_ORDER = "sender order"
CONTIGUOUS_SEQS = "contiguous seqs"
DEDUPE_BY_ID = "dedupe by id"
INVARIANT_OF = {
    "lost": "no loss",
    "not_durable": ACK_AFTER_COMMIT,
    "duplicate": "shown once",
    "reordered": "shown in seq order",
    "gap": CONTIGUOUS_SEQS,
    "phantom": "nothing shown that was not sent",
    "non_member": "members only",
    "missing_receipt": "every delivery reaches its sender as a receipt",
    "read_before_delivered": "read never past delivered",
}


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str
    conv: str
    seq: int
    detail: str
    invariant: str = ""

    def __post_init__(self) -> None:
        if not self.invariant:
            object.__setattr__(self, "invariant", INVARIANT_OF.get(self.kind, self.kind))


@dataclass(slots=True)
class Report:
    sent: int
    acked: int
    delivered: int  # (message, recipient) pairs shown
    violations: list[Violation]
    latencies_ms: list[float]

    @property
    def ok(self) -> bool:
        return not self.violations

    def percentile(self, p: float) -> float | None:
        return percentile(self.latencies_ms, p)


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def _members_of(history: History, conv: str) -> dict[str, tuple[int, int | None]]:
    known = history.members.get(conv)
    if known is not None:
        return known
    parts = conv.split(":")
    if len(parts) == 3 and parts[0] == "d":
        return {parts[1]: (0, None), parts[2]: (0, None)}
    return {}


def _sees(span: tuple[int, int | None], seq: int) -> bool:
    joined, left = span
    return joined < seq and (left is None or seq <= left)


def check(history: History) -> Report:
    violations: list[Violation] = []

    def flag(kind: str, conv: str, seq: int, detail: str, invariant: str = "") -> None:
        violations.append(Violation(kind, conv, seq, detail, invariant))

    # What exists: acked messages by (conv, seq), and by (sender, client id).
    by_slot: dict[tuple[str, int], Sent] = {}
    for s in history.sent:
        if not s.acked:
            continue
        other = by_slot.get((s.conv, s.seq))
        if other is not None and (other.sender, other.client_id) != (s.sender, s.client_id):
            # The seq was handed out again: the first ✓ came before its commit.
            flag(
                "duplicate",
                s.conv,
                s.seq,
                f"two messages acked with one seq: {other.client_id}, {s.client_id}",
                ACK_AFTER_COMMIT,
            )
        by_slot[(s.conv, s.seq)] = s

    by_id = {(s.sender, s.client_id): s for s in history.sent}

    # Per sender and conversation, seqs follow send order.
    per_sender: dict[tuple[str, str], list[Sent]] = defaultdict(list)
    for s in history.sent:
        if s.acked:
            per_sender[(s.sender, s.conv)].append(s)
    for (sender, conv), items in per_sender.items():
        items.sort(key=lambda s: s.index)
        for a, b in itertools.pairwise(items):
            if b.seq <= a.seq:
                flag(
                    "reordered",
                    conv,
                    b.seq,
                    f"{sender} sent {a.client_id} before {b.client_id} but got seq {a.seq} >= {b.seq}",
                    SENDER_ORDER,
                )

    # What each recipient was shown.
    shown_by: dict[tuple[str, str], list[Shown]] = defaultdict(list)
    counts: dict[tuple[str, str, int], int] = defaultdict(int)
    latencies: list[float] = []
    delivered_pairs = 0
    seq_of_id: dict[tuple[str, str, str, str], int] = {}
    for sh in history.shown:
        shown_by[(sh.recipient, sh.conv)].append(sh)
        counts[(sh.recipient, sh.conv, sh.seq)] += 1
        if counts[(sh.recipient, sh.conv, sh.seq)] == 2:
            flag("duplicate", sh.conv, sh.seq, f"{sh.recipient} was shown {sh.client_id!r} twice")
        if sh.sender != SYSTEM:
            first = seq_of_id.setdefault((sh.recipient, sh.conv, sh.sender, sh.client_id), sh.seq)
            if first != sh.seq:
                detail = f"{sh.recipient} was shown {sh.client_id!r} as seq {first} and {sh.seq}"
                flag("duplicate", sh.conv, sh.seq, detail, DEDUPE_BY_ID)
            origin = by_slot.get((sh.conv, sh.seq))
            if origin is None:
                # Sent but the sender never saw ✓ (crash before the ack) is fine:
                # look it up by id among all sends.
                origin = by_id.get((sh.sender, sh.client_id))
            if origin is None or (origin.sender, origin.client_id) != (sh.sender, sh.client_id):
                flag(
                    "phantom", sh.conv, sh.seq, f"{sh.recipient} was shown {sh.client_id!r} from {sh.sender}"
                )
                continue
            if counts[(sh.recipient, sh.conv, sh.seq)] == 1:
                delivered_pairs += 1
                latencies.append((sh.t - origin.t) * 1000)
        span = _members_of(history, sh.conv).get(sh.recipient)
        if span is None or not _sees(span, sh.seq):
            flag("non_member", sh.conv, sh.seq, f"{sh.recipient} is not a member for seq {sh.seq}")

    # Order and contiguity of each view (own messages count as held).
    own: dict[tuple[str, str], set[int]] = defaultdict(set)
    for s in by_slot.values():
        own[(s.sender, s.conv)].add(s.seq)
    for (recipient, conv), views in shown_by.items():
        seqs = [sh.seq for sh in views]
        for earlier, later in itertools.pairwise(seqs):
            if later < earlier:
                flag("reordered", conv, later, f"{recipient} was shown seq {later} after {earlier}")
                break
        span = _members_of(history, conv).get(recipient)
        if span is None:
            continue
        held = set(seqs) | own[(recipient, conv)] | history.protocol.get((recipient, conv), set())
        start = span[0] + 1
        top = max(held)
        missing = [s for s in range(start, top + 1) if s not in held]
        if missing:
            flag("gap", conv, missing[0], f"{recipient} never saw seq {missing[:5]} below {top}")

    # Every acked message reached every member who should see it, exactly once.
    first_gap = _store_gaps(history.stored.messages) if history.stored is not None else {}
    for (conv, seq), s in by_slot.items():
        for user, span in _members_of(history, conv).items():
            if user == s.sender or not _sees(span, seq):
                continue
            if counts.get((user, conv, seq), 0) == 0:
                flag("lost", conv, seq, f"{s.client_id!r} from {s.sender} never reached {user}",
                     _why_lost(history.stored, first_gap, s, user))  # fmt: skip

    # Receipts: read never past delivered; what was shown is eventually
    # reported delivered to its sender.
    final: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    for r in history.receipts:
        for user, (d, rd) in r.marks.items():
            if rd > d:
                flag(
                    "read_before_delivered",
                    r.conv,
                    rd,
                    f"{user}: read {rd} > delivered {d} (seen by {r.observer})",
                )
            key = (r.observer, r.conv)
            final[key][user] = max(final[key].get(user, 0), d)
    for sh in history.shown:
        if sh.sender == SYSTEM:
            continue
        origin = by_slot.get((sh.conv, sh.seq))
        if origin is None:
            continue
        if final[(origin.sender, sh.conv)].get(sh.recipient, 0) < sh.seq:
            flag(
                "missing_receipt",
                sh.conv,
                sh.seq,
                f"{origin.sender} never learnt that {sh.recipient} got {origin.client_id!r}",
            )

    if history.stored is not None:
        _check_store(history.stored.messages, by_slot, flag)

    return Report(
        sent=len(history.sent),
        acked=sum(1 for s in history.sent if s.acked),
        delivered=delivered_pairs,
        violations=violations,
        latencies_ms=latencies,
    )


def _why_lost(stored: StoreView | None, first_gap: dict[str, int], s: Sent, recipient: str) -> str:
    """Not in the store: acked too early. Behind a hole in the store's seqs:
    the SDK waits for the missing seq. Past the recipient's delivered mark:
    still in its inbox, never offered although it is connected at the end.
    Otherwise its inbox entry went before it arrived."""
    if stored is None:
        return INVARIANT_OF["lost"]
    if stored.messages.get((s.conv, s.seq)) != (s.sender, s.client_id):
        return ACK_AFTER_COMMIT
    if first_gap.get(s.conv, s.seq) < s.seq:
        return CONTIGUOUS_SEQS
    delivered = stored.delivered.get((s.conv, recipient))
    return OFFERED_WHILE_CONNECTED if delivered is not None and delivered < s.seq else INBOX_UNTIL_ACK


def _store_gaps(stored: dict[tuple[str, int], tuple[str, str]]) -> dict[str, int]:
    """conv -> the first seq below its last that the store does not hold."""
    seqs: dict[str, set[int]] = defaultdict(set)
    for conv, seq in stored:
        seqs[conv].add(seq)
    gaps = {}
    for conv, held in seqs.items():
        missing = set(range(1, max(held) + 1)) - held
        if missing:
            gaps[conv] = min(missing)
    return gaps


def _check_store(
    stored: dict[tuple[str, int], tuple[str, str]],
    by_slot: dict[tuple[str, int], Sent],
    flag: Callable[[str, str, int, str, str], None],
) -> None:
    """Every ✓ names a committed message; every conversation's seqs run 1, 2, 3, ..."""
    for (conv, seq), s in by_slot.items():
        held = stored.get((conv, seq))
        if held != (s.sender, s.client_id):
            what = f"{held[1]!r} from {held[0]}" if held else "nothing"
            detail = f"{s.client_id!r} from {s.sender} got ✓ but the store holds {what}"
            flag("not_durable", conv, seq, detail, ACK_AFTER_COMMIT)
    for conv, missing in _store_gaps(stored).items():
        flag("gap", conv, missing, f"the store has no seq {missing} (and holds later ones)", CONTIGUOUS_SEQS)
