"""How a membership event reads, for a member brought back while offline."""

from __future__ import annotations

import json

from roost.cli.chat import membership_text
from roost.client.events import Membership


def event(body: dict[str, object]) -> Membership:
    return Membership.parse("g:00000000000000aa", 5, json.dumps(body).encode(), 0)


def test_an_added_event_says_who_had_been_removed_or_had_left() -> None:
    m = event({"action": "added", "actor": "alice", "users": ["carol", "dave", "erin"],
               "returning": {"carol": "removed", "dave": "left"}})  # fmt: skip
    assert membership_text(m, "carol") == (
        "alice added you, dave, erin (you had been removed earlier, dave had left earlier)"
    )
    assert membership_text(event({"action": "added", "actor": "alice", "users": ["erin"]}), "erin") == (
        "alice added you"
    )


def test_a_malformed_returning_field_is_ignored_not_fatal() -> None:
    m = event({"action": "added", "actor": "alice", "users": ["bob"], "returning": "nonsense"})
    assert m.action in ("added", "unknown")


def test_a_removal_by_the_administrator_says_so() -> None:
    m = event({"action": "removed", "actor": "", "users": ["carol"], "name": "g"})
    assert membership_text(m, "alice") == "the administrator removed carol"
