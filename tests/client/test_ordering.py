"""ConversationOrder: at-least-once in, exactly-once and in order out."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from roost.client.ordering import ConversationOrder


def test_in_order_releases_at_once() -> None:
    order: ConversationOrder[str] = ConversationOrder()
    assert order.accept(1, "a").released == [(1, "a")]
    assert order.accept(2, "b").released == [(2, "b")]
    assert order.have == 2


def test_gap_buffers_and_reports() -> None:
    order: ConversationOrder[str] = ConversationOrder()
    result = order.accept(3, "c")
    assert result.released == [] and result.gap == (1, 3)
    assert order.accept(1, "a").released == [(1, "a")]
    assert order.accept(2, "b").released == [(2, "b"), (3, "c")]
    assert order.gap() is None


def test_duplicates_dropped() -> None:
    order: ConversationOrder[str] = ConversationOrder()
    order.accept(1, "a")
    assert order.accept(1, "a").released == []
    order.accept(3, "c")
    assert order.accept(3, "c").released == []


def test_own_seqs_fill_without_output() -> None:
    order: ConversationOrder[str] = ConversationOrder()
    order.accept(2, "theirs")
    assert order.accept(1, None).released == [(1, None), (2, "theirs")]


def test_skip_to_for_late_joiners() -> None:
    order: ConversationOrder[str] = ConversationOrder()
    order.accept(11, "joined-event")
    assert order.skip_to(10) == [(11, "joined-event")]
    assert order.have == 11


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=60),
    data=st.data(),
)
def test_any_arrival_order_with_duplicates_is_shown_once_in_order(n: int, data: st.DataObject) -> None:
    arrivals = data.draw(st.lists(st.integers(min_value=1, max_value=n), min_size=0, max_size=3 * n))
    arrivals = arrivals + list(range(1, n + 1))  # every seq arrives at least once
    arrivals = data.draw(st.permutations(arrivals))
    order: ConversationOrder[int] = ConversationOrder()
    shown: list[int] = []
    for seq in arrivals:
        shown += [item for _, item in order.accept(seq, seq).released if item is not None]
        assert order.have == (shown[-1] if shown else 0)
    assert shown == list(range(1, n + 1))
    assert order.buffer == {}
