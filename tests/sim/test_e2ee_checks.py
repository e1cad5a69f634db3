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
