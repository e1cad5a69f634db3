"""Presence with debounce, driven by explicit timestamps.

Going offline is announced only after ``debounce`` seconds without a new
connection, so a flapping mobile link produces no events at all; coming back
inside that window cancels the pending "offline". Coming online is announced
at once. Times are seconds (float); last-seen values are whole seconds.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PresenceChange:
    user: str
    online: bool
    last_seen: int | None


class PresenceTracker:
    def __init__(self, debounce: float = 3.0) -> None:
        self.debounce = debounce
        self._online: set[str] = set()
        self._going_offline: dict[str, float] = {}  # user -> time of disconnect

    def is_online(self, user: str) -> bool:
        return user in self._online or user in self._going_offline

    def connected(self, user: str) -> PresenceChange | None:
        if self._going_offline.pop(user, None) is not None:
            self._online.add(user)
            return None  # the flap is invisible
        if user in self._online:
            return None
        self._online.add(user)
        return PresenceChange(user, True, None)

    def disconnected(self, user: str, now: float) -> None:
        if user in self._online:
            self._online.discard(user)
            self._going_offline[user] = now

    def due(self, now: float) -> list[PresenceChange]:
        """Offline announcements whose debounce has run out."""
        changes = []
        for user, since in list(self._going_offline.items()):
            if now - since >= self.debounce:
                del self._going_offline[user]
                changes.append(PresenceChange(user, False, int(since)))
        return changes
