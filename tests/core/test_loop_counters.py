"""LoopCounter: hot-path counters kept as plain ints and moved into their
Prometheus counters whenever the registry is collected."""

from __future__ import annotations

from prometheus_client import generate_latest

from roost.core.metrics import Metrics


def test_every_collection_shows_exactly_what_was_counted() -> None:
    metrics = Metrics()
    sample = metrics.registry.get_sample_value
    for _ in range(3):
        metrics.messages_committed.inc()
    metrics.delivered_inbox.inc(5)
    assert sample("roost_messages_committed_total") == 3
    assert sample("roost_messages_committed_total") == 3  # a second collection adds nothing
    assert sample("roost_deliveries_total", {"path": "inbox"}) == 5
    metrics.messages_committed.inc()
    text = generate_latest(metrics.registry).decode()
    assert "roost_messages_committed_total 4.0" in text
    assert sample("roost_messages_committed_total") == 4


def test_frames_pushed_move_their_type_and_the_receipt_counter() -> None:
    metrics = Metrics()
    for frame in (
        b'{"type":"receipt","conv":"d:a:b"}',
        b'{"type":"receipt"}',
        b'{"type":"ack"}',
        b'{"type":"?"}',
    ):
        metrics.frame_pushed(frame)
    sample = metrics.registry.get_sample_value
    assert sample("roost_frames_out_total", {"type": "receipt"}) == 2
    assert sample("roost_frames_out_total", {"type": "ack"}) == 1
    assert sample("roost_frames_out_total", {"type": "other"}) == 1
    assert sample("roost_receipts_total") == 2
