"""The local history as ``roost app`` reads it: pages back by seq, and a search of stored text."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from roost.client.state import ClientState


def _state(n: int) -> ClientState:
    state = ClientState(":memory:")
    for seq in range(1, n + 1):
        state.store_message("d:alice:bob", seq, f"m{seq}", "alice", "text/plain", f"text {seq}".encode(), seq)
    state.commit()
    return state


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 60), st.integers(1, 20))
def test_paging_back_returns_every_message_once_in_order(n: int, limit: int) -> None:
    state = _state(n)
    seen: list[int] = []
    before = None
    for _ in range(n + 2):  # bounded: each page but the last is full
        page = state.local_history("d:alice:bob", limit, before)
        seqs = [row[0] for row in page]
        assert seqs == sorted(seqs)
        seen = seqs + seen
        if len(page) < limit:
            break
        before = seqs[0]
    assert seen == list(range(1, n + 1))


def test_search_finds_stored_text_newest_first_and_takes_wildcards_literally() -> None:
    state = _state(3)
    state.store_message("g:1", 1, "x", "bob", "text/plain", b"100% sure_thing", 10)
    state.store_message("g:1", 2, "y", "bob", "image/png", b"TEXT 1 in a picture", 11)
    state.commit()
    assert [row[1] for row in state.search("TEXT")] == [3, 2, 1]  # ASCII case-insensitive; not the image
    assert [row[2] for row in state.search("0% s")] == ["x"]
    assert state.search("%") == [row for row in state.search("100%")]
    assert state.search("s_r") == []  # "_" is not a wildcard (it would match "sur")
    assert [row[2] for row in state.search("e_thing")] == ["x"]
