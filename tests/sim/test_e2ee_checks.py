"""The simulator's end-to-end checks: no typed text in a stored body."""

from __future__ import annotations

from roost.sim.world import _plaintext_hits


def test_a_stored_body_holding_a_typed_text_is_flagged() -> None:
    texts = [b"alice-0 to bob", b"bob-0 to alice"]
    stored = [
        ("d:alice:bob", 1, "alice", "alice-0", b"\x0a\x01sealed bytes"),
        ("d:alice:bob", 2, "bob", "bob-0", b"envelope...bob-0 to alice...trailer"),
    ]
    hits = _plaintext_hits(stored, texts)
    assert [(v.kind, v.conv, v.seq) for v in hits] == [("plaintext", "d:alice:bob", 2)]
    assert _plaintext_hits(stored[:1], texts) == []


def test_a_failed_first_key_upload_is_tried_again() -> None:
    """Seed 22: erin's first KeysCount meets a store read fault; without a
    retry erin never published keys and carol's messages to her stayed in
    the outbox for the rest of the run."""
    from roost.sim.world import run_seed

    result = run_seed(22)
    assert result.ok, result.violations
    assert result.report.acked == result.report.sent > 0


def test_a_key_fetch_answered_unavailable_is_tried_again() -> None:
    """Seed 31: alice's fetch of carol's bundle meets a store fault
    (``unavailable``); the message failed for good and stayed in the outbox."""
    from roost.sim.world import run_seed

    result = run_seed(31)
    assert result.ok, result.violations
