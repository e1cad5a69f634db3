"""Presence with debounce: flaps are invisible, offline is announced late."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from roost.core.presence import PresenceChange, PresenceTracker


def test_first_connect_is_announced_at_once() -> None:
    p = PresenceTracker(debounce=3.0)
    assert not p.is_online("ann")
    assert p.connected("ann") == PresenceChange("ann", True, None)
    assert p.is_online("ann")
    # a second connection (e.g. a replaced session) is no news
    assert p.connected("ann") is None


def test_offline_is_announced_after_the_debounce_with_last_seen() -> None:
    p = PresenceTracker(debounce=3.0)
    p.connected("ann")
    p.disconnected("ann", 100.7)
    assert p.is_online("ann")  # still shown online during the debounce
    assert p.due(101.0) == []
    assert p.due(103.69) == []
    assert p.due(103.7) == [PresenceChange("ann", False, 100)]  # whole seconds
    assert not p.is_online("ann")
    assert p.due(200.0) == []  # announced once


def test_flap_within_the_debounce_gives_no_events() -> None:
    p = PresenceTracker(debounce=3.0)
    assert p.connected("ann") is not None
    p.disconnected("ann", 10.0)
    assert p.due(12.0) == []
    assert p.connected("ann") is None  # back inside the window: nothing to say
    assert p.is_online("ann")
    assert p.due(20.0) == []
    assert p.due(1000.0) == []


def test_a_flap_restarts_the_debounce() -> None:
    p = PresenceTracker(debounce=3.0)
    p.connected("ann")
    p.disconnected("ann", 10.0)
    p.connected("ann")
    p.disconnected("ann", 12.0)
    assert p.due(14.0) == []  # 3 s after the first disconnect, but not the second
    assert p.due(15.0) == [PresenceChange("ann", False, 12)]


def test_disconnect_of_an_unknown_user_does_nothing() -> None:
    p = PresenceTracker(debounce=1.0)
    p.disconnected("ghost", 1.0)
    assert not p.is_online("ghost")
    assert p.due(100.0) == []


def test_reconnect_after_announced_offline_is_announced_online() -> None:
    p = PresenceTracker(debounce=1.0)
    p.connected("ann")
    p.disconnected("ann", 5.0)
    assert p.due(6.0) == [PresenceChange("ann", False, 5)]
    assert p.connected("ann") == PresenceChange("ann", True, None)


def test_users_are_independent() -> None:
    p = PresenceTracker(debounce=2.0)
    p.connected("ann")
    p.connected("ben")
    p.disconnected("ann", 1.0)
    p.disconnected("ben", 2.0)
    assert p.due(3.0) == [PresenceChange("ann", False, 1)]
    assert p.is_online("ben")
    assert p.due(4.0) == [PresenceChange("ben", False, 2)]


def test_zero_debounce_announces_at_the_next_check() -> None:
    p = PresenceTracker(debounce=0.0)
    p.connected("ann")
    p.disconnected("ann", 7.0)
    assert p.due(7.0) == [PresenceChange("ann", False, 7)]


events = st.lists(
    st.tuples(st.sampled_from(["connect", "disconnect", "tick"]), st.floats(0, 5)),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(events)
def test_announcements_alternate_and_match_the_final_state(steps: list[tuple[str, float]]) -> None:
    """Observers see online/offline strictly alternating, starting with online, and
    after everything settles what they saw last is the truth."""
    debounce = 3.0
    p = PresenceTracker(debounce)
    now = 0.0
    seen: list[PresenceChange] = []
    connected = False
    for action, dt in steps:
        now += dt
        if action == "connect":
            change = p.connected("ann")
            if change is not None:
                seen.append(change)
            connected = True
        elif action == "disconnect":
            p.disconnected("ann", now)
            connected = False
        else:
            seen.extend(p.due(now))
    seen.extend(p.due(now + debounce + 1.0))
    for i, change in enumerate(seen):
        assert change.user == "ann"
        assert change.online == (i % 2 == 0)
        if change.online:
            assert change.last_seen is None
        else:
            assert change.last_seen is not None and change.last_seen <= now
    assert p.is_online("ann") == connected
    assert (bool(seen) and seen[-1].online) == connected
