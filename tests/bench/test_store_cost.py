"""roost.bench.store_cost: the store-only workload of a delivered and read 1:1 message."""

from __future__ import annotations

from roost.bench.store_cost import measure


async def test_each_message_costs_an_append_a_mark_and_a_receipt_ack() -> None:
    report = await measure(pairs=5, rounds=4, warmup=1)
    assert report["messages"] == 20
    # Three kinds of operation per round, each kind waiting for the one before:
    # at least three commits a round, and 3 operations per message in all.
    assert report["commits"] >= 12
    assert report["ops_per_commit"] == round(3 * 20 / report["commits"], 1)
    assert report["cpu_us_per_message"] > 0
