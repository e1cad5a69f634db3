"""Per-member delivered / read times of one's own messages: kept in the client
state as each member's mark advances, so they are there on demand and after a restart."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from roost.client import Client
from roost.client.state import ClientState
from roost.protocol import frames as f

DEAD_URL = "http://127.0.0.1:9"  # nothing listens: the client stays offline
GROUP = "g:0011223344556677"


def receipt(rv: int, marks: dict[str, tuple[int, int]]) -> f.Receipt:
    members = {user: f.MemberMarks(d, r) for user, (d, r) in marks.items()}
    low = (min(d for d, _ in marks.values()), min(r for _, r in marks.values()))
    return f.Receipt(conv=GROUP, rv=rv, marks=members, all_delivered=low[0], all_read=low[1])


def test_each_member_gets_the_time_its_mark_first_reached_a_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1_000_000.0]
    monkeypatch.setattr("roost.client.client.time.time", lambda: now[0])
    client = Client(DEAD_URL, "t", state_path=tmp_path / "alice.state")
    try:
        client._on_receipt(receipt(1, {"bob": (5, 0), "carol": (3, 0)}))
        now[0] += 2
        client._on_receipt(receipt(2, {"bob": (5, 5), "carol": (5, 3)}))
        now[0] += 3
        client._on_receipt(receipt(3, {"bob": (5, 5), "carol": (5, 5)}))  # bob's marks again: no change
        now[0] += 1
        client._on_receipt(receipt(4, {"bob": (2, 2), "carol": (5, 5)}))  # an old mark never lowers one
        t0 = 1_000_000_000
        assert client.receipt_times(GROUP, 5) == {
            "bob": (t0, t0 + 2000),
            "carol": (t0 + 2000, t0 + 5000),
        }
        # An earlier message: carol's first mark (3) reached it at once.
        assert client.receipt_times(GROUP, 3) == {"bob": (t0, t0 + 2000), "carol": (t0, t0 + 2000)}
        assert client.receipt_times(GROUP, 6) == {}  # no one has it yet
        assert client.receipt_marks(GROUP) == {"bob": (5, 5), "carol": (5, 5)}
    finally:
        client.state.close()
    # A restart keeps the marks and their times.
    again = Client(DEAD_URL, "t", state_path=tmp_path / "alice.state")
    try:
        assert again.receipt_marks(GROUP) == {"bob": (5, 5), "carol": (5, 5)}
        assert again.receipt_times(GROUP, 5)["carol"] == (t0 + 2000, t0 + 5000)
    finally:
        again.state.close()


def test_a_read_heard_before_its_delivery_counts_as_delivered_then(tmp_path: Path) -> None:
    state = ClientState(tmp_path / "a.state")
    try:
        state.save_member_mark(GROUP, "bob", "read", 4, 100)
        state.save_member_mark(GROUP, "bob", "delivered", 4, 300)
        state.save_member_mark(GROUP, "carol", "delivered", 4, 50)
        state.commit()
        assert state.receipt_times(GROUP, 4) == {"bob": (100, 100), "carol": (50, None)}
    finally:
        state.close()


def test_an_older_state_file_gets_the_table_on_open(tmp_path: Path) -> None:
    path = tmp_path / "old.state"
    ClientState(path).close()
    with sqlite3.connect(path) as db:  # a state file from before per-member times
        db.execute("DROP TABLE receipt_marks")
        db.execute("INSERT INTO receipts (conv, all_delivered, all_read) VALUES (?,?,?)", (GROUP, 7, 6))
    state = ClientState(path)
    try:
        assert state.receipts() == {GROUP: (7, 6)}
        assert state.member_marks() == {} and state.receipt_times(GROUP, 1) == {}
        state.save_member_mark(GROUP, "bob", "delivered", 7, 10)
        state.commit()
        assert state.member_marks() == {GROUP: {"bob": (7, 0)}}
    finally:
        state.close()
