"""The checker must pass a clean history and catch each planted violation."""

from __future__ import annotations

import pytest

from roost.verify.history import History, ReceiptSeen, Sent, Shown, StoreView, check

CONV = "d:alice:bob"


def clean(n: int = 3) -> History:
    """alice sends n messages to bob; bob sees each once; alice gets receipts."""
    h = History()
    for i in range(n):
        seq = i + 1
        h.sent.append(Sent("alice", f"m{i}", i, t=float(i), acked=True, conv=CONV, seq=seq, t_ack=i + 0.01))
        h.shown.append(Shown("bob", CONV, seq, "alice", f"m{i}", t=i + 0.05))
    h.receipts.append(ReceiptSeen("alice", CONV, {"bob": (n, 0)}, t=n + 1.0))
    return h


def kinds(h: History) -> set[str]:
    return {v.kind for v in check(h).violations}


def test_clean_history_passes() -> None:
    report = check(clean())
    assert report.ok, report.violations
    assert (report.sent, report.acked, report.delivered) == (3, 3, 3)
    assert report.percentile(50) == pytest.approx(50.0)


def test_lost_message() -> None:
    h = clean()
    del h.shown[1]
    assert "lost" in kinds(h)


def test_duplicate_shown() -> None:
    h = clean()
    h.shown.append(h.shown[0])
    assert "duplicate" in kinds(h)


def test_two_messages_with_one_seq() -> None:
    h = clean()
    h.sent.append(Sent("alice", "extra", 9, t=9.0, acked=True, conv=CONV, seq=2))
    assert "duplicate" in kinds(h)


def test_reordered_display() -> None:
    h = clean()
    h.shown[0], h.shown[1] = h.shown[1], h.shown[0]
    assert "reordered" in kinds(h)


def test_seqs_against_send_order() -> None:
    h = clean()
    first, second = h.sent[0], h.sent[1]
    h.sent[0] = Sent("alice", first.client_id, 0, 0.0, True, CONV, 2)
    h.sent[1] = Sent("alice", second.client_id, 1, 1.0, True, CONV, 1)
    h.shown[0] = Shown("bob", CONV, 1, "alice", second.client_id, 1.1)
    h.shown[1] = Shown("bob", CONV, 2, "alice", first.client_id, 1.2)
    assert "reordered" in kinds(h)


def test_gap_in_a_view() -> None:
    h = clean(4)
    # bob was shown 1, 2 and 4 but 3 was never acked to anyone (sender crashed):
    h.sent[2] = Sent("alice", "m2", 2, 2.0, acked=False)
    del h.shown[2]
    assert "gap" in kinds(h)


def test_phantom() -> None:
    h = clean()
    h.shown.append(Shown("bob", CONV, 4, "alice", "never-sent", 9.0))
    assert "phantom" in kinds(h)


def test_shown_to_non_member() -> None:
    h = clean()
    g = "g:0123456789abcdef"
    h.members[g] = {"alice": (0, None), "bob": (0, 1), "carol": (0, None)}
    h.sent.append(Sent("alice", "g1", 10, 10.0, True, g, 1))
    h.sent.append(Sent("alice", "g2", 11, 11.0, True, g, 2))
    h.shown += [
        Shown("bob", g, 1, "alice", "g1", 10.1),
        Shown("bob", g, 2, "alice", "g2", 11.1),  # bob left at 1
        Shown("carol", g, 1, "alice", "g1", 10.1),
        Shown("carol", g, 2, "alice", "g2", 11.1),
    ]
    h.receipts.append(ReceiptSeen("alice", g, {"bob": (2, 0), "carol": (2, 0)}, 12.0))
    assert kinds(h) == {"non_member"}


def test_late_joiner_needs_no_earlier_messages() -> None:
    h = History()
    g = "g:0123456789abcdef"
    h.members[g] = {"alice": (0, None), "dave": (1, None)}
    h.sent.append(Sent("alice", "before", 0, 0.0, True, g, 1))
    h.sent.append(Sent("alice", "after", 1, 1.0, True, g, 2))
    h.shown.append(Shown("dave", g, 2, "alice", "after", 1.1))
    h.receipts.append(ReceiptSeen("alice", g, {"dave": (2, 0)}, 2.0))
    assert check(h).ok


def test_missing_receipt() -> None:
    h = clean()
    h.receipts = [ReceiptSeen("alice", CONV, {"bob": (2, 0)}, 5.0)]
    assert kinds(h) == {"missing_receipt"}


def test_read_before_delivered() -> None:
    h = clean()
    h.receipts.append(ReceiptSeen("alice", CONV, {"bob": (1, 3)}, 6.0))
    assert "read_before_delivered" in kinds(h)


def test_unacked_but_delivered_is_fine() -> None:
    """The sender crashed before its ✓: the message may still arrive, once."""
    h = clean()
    h.sent.append(Sent("alice", "m3", 3, 3.0, acked=False))
    h.shown.append(Shown("bob", CONV, 4, "alice", "m3", 3.1))
    h.receipts.append(ReceiptSeen("alice", CONV, {"bob": (4, 0)}, 7.0))
    assert check(h).ok


def invariants(h: History) -> dict[str, str]:
    return {v.kind: v.invariant for v in check(h).violations}


def stored_of(h: History) -> StoreView:
    """The store after a good run: every acked message, bob's mark past them."""
    messages = {(s.conv, s.seq): (s.sender, s.client_id) for s in h.sent if s.acked}
    return StoreView(messages, {(CONV, "bob"): max(seq for _, seq in messages)})


def test_a_clean_store_passes() -> None:
    h = clean()
    h.stored = stored_of(h)
    assert check(h).ok


def test_an_acked_message_missing_from_the_store_breaks_ack_after_commit() -> None:
    h = clean()
    h.stored = stored_of(h)
    del h.stored.messages[(CONV, 3)]
    assert invariants(h) == {"not_durable": "ack after commit"}


def test_a_hole_in_the_stores_seqs_breaks_contiguous_seqs() -> None:
    h = clean()
    h.stored = stored_of(h)
    h.stored.messages[(CONV, 5)] = ("alice", "late")  # seq 4 never committed
    violations = check(h).violations
    assert [(v.kind, v.seq, v.invariant) for v in violations] == [("gap", 4, "contiguous seqs")]


def test_a_lost_message_is_blamed_on_what_the_store_holds() -> None:
    h = clean()
    del h.shown[1]
    assert invariants(h)["lost"] == "no loss"  # the checker cannot see the store
    h.stored = stored_of(h)
    assert invariants(h)["lost"] == "inbox entry until ack"  # bob's mark passed it
    h.stored.delivered[(CONV, "bob")] = 1
    assert invariants(h)["lost"] == "register before drain / persist before look-up"  # still in his inbox
    del h.stored.messages[(CONV, 2)]
    assert invariants(h)["lost"] == "ack after commit"


def test_a_seq_handed_out_twice_breaks_ack_after_commit() -> None:
    h = clean()
    h.sent.append(Sent("alice", "extra", 9, t=9.0, acked=True, conv=CONV, seq=2))
    assert invariants(h)["duplicate"] == "ack after commit"


def test_one_message_shown_at_two_seqs_breaks_dedupe_by_id() -> None:
    h = clean()
    h.shown.append(Shown("bob", CONV, 4, "alice", "m0", t=5.0))
    assert any(v.invariant == "dedupe by id" for v in check(h).violations)


def test_a_message_shown_twice_breaks_shown_once() -> None:
    h = clean()
    h.shown.append(h.shown[0])
    assert invariants(h)["duplicate"] == "shown once"


def test_protocol_slot_is_not_a_gap() -> None:
    """A seq the E2EE protocol used for itself (a sender key, a retry) is shown
    by nobody: declared, it is no gap; undeclared, it is one."""
    h = History()
    for i, seq in enumerate((1, 3)):
        h.sent.append(Sent("alice", f"m{i}", i, t=float(i), acked=True, conv=CONV, seq=seq, t_ack=i + 0.01))
        h.shown.append(Shown("bob", CONV, seq, "alice", f"m{i}", t=i + 0.05))
    h.receipts.append(ReceiptSeen("alice", CONV, {"bob": (3, 0)}, t=5.0))
    assert kinds(h) == {"gap"}
    h.protocol[("bob", CONV)].add(2)
    assert check(h).ok, check(h).violations
