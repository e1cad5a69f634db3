"""The in-memory outbox's count of unsealed items per chat always equals a
scan of the outbox, whatever sequence of adds, seals, replacements and
removals it sees (it decides whether a new message waits behind an older one)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from roost.client.state import Outbox, OutboxItem

CHATS = [("bob", None), ("carol", None), (None, "g:1"), (None, "g:2")]


def item(mid: str, chat: int, sealed: bool) -> OutboxItem:
    to, conv = CHATS[chat]
    wire = (b"sealed", "application/vnd.roost.e2ee") if sealed else (None, None)
    return OutboxItem(mid, to, conv, "text/plain", b"x", 0, wire[1], wire[0])


def scan(outbox: Outbox, to: str | None, conv: str | None) -> bool:
    return any(not i.ready and (i.to, i.conv) == (to, conv) for i in outbox.values())


ops = st.lists(
    st.tuples(
        st.sampled_from(["set", "pop", "pop_default", "del", "clear"]),
        st.integers(0, 7),  # message id
        st.integers(0, len(CHATS) - 1),
        st.booleans(),  # sealed
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 3), st.booleans()), max_size=8), ops)
def test_waiting_equals_a_scan(
    initial: list[tuple[int, int, bool]], steps: list[tuple[str, int, int, bool]]
) -> None:
    outbox = Outbox(item(f"m{n}", chat, sealed) for n, chat, sealed in initial)
    for op, n, chat, sealed in steps:
        key = f"m{n}"
        if op == "set":
            # The same id again: a chat's item sealed (or marked pending) in place.
            old = outbox.get(key)
            outbox[key] = item(key, chat if old is None else CHATS.index((old.to, old.conv)), sealed)
        elif op == "pop" and key in outbox:
            assert outbox.pop(key).id == key
        elif op == "pop_default":
            outbox.pop(key, None)
        elif op == "del" and key in outbox:
            del outbox[key]
        elif op == "clear":
            outbox.clear()
        for to, conv in CHATS:
            assert outbox.waiting(to, conv) == scan(outbox, to, conv)


def test_bulk_methods_that_would_bypass_the_count_are_refused() -> None:
    outbox = Outbox([item("m0", 0, False)])
    for call in (
        lambda: outbox.update({"m1": item("m1", 0, False)}),
        lambda: outbox.setdefault("m1", item("m1", 0, False)),
        lambda: outbox.popitem(),
    ):
        try:
            call()
        except TypeError:
            pass
        else:
            raise AssertionError("a bulk method changed the outbox behind its count")
    assert list(outbox) == ["m0"] and outbox.waiting("bob", None)
