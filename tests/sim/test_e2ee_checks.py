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


def test_a_membership_event_waits_behind_a_held_group_message() -> None:
    """Seed 14: a group message held for its sender key was shown after a later
    membership event of its group (reordered) until membership events were
    held behind it too."""
    from roost.sim.world import run_seed

    result = run_seed(14)
    assert result.ok, result.violations


def test_held_messages_are_asked_again_on_the_run_s_clock() -> None:
    """Seed 20: a group message held for its sender key is asked for again
    after HOLD_GRACE; on a wall clock the virtual run never reached it and
    alice lost five messages."""
    from roost.sim.world import run_seed

    result = run_seed(20)
    assert result.ok, result.violations


def test_a_group_send_answered_unavailable_is_tried_again() -> None:
    """Seed 9: the group info a group send needs met a store read fault; the
    message then stayed in dave's outbox for the rest of the run."""
    from roost.sim.world import run_seed

    result = run_seed(9)
    assert result.ok, result.violations


def test_a_held_message_whose_timer_fired_offline_is_asked_for_on_reconnect() -> None:
    """Seed 348: frank's group message, sealed before carol joined, reached
    carol without its sender key; its retry timer fired while carol was
    offline, and the sweep on reconnect ran before the client counted itself
    connected, so it did nothing: the message stayed held for good."""
    from roost.sim.world import run_seed

    result = run_seed(348)
    assert result.ok, result.violations
