"""In-process registry for embedded mode: plain dicts, no I/O."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable

from roost.core.presence import PresenceChange
from roost.protocol.codec import encode
from roost.protocol.frames import Deliver, Presence
from roost.registry.base import SessionHandle
from roost.store.base import ReceiptState, StoredMessage


def deliver_frame(message: StoredMessage) -> bytes:
    return encode(
        Deliver(
            conv=message.conv,
            seq=message.seq,
            id=message.client_id,
            sender=message.sender,
            ct=message.ct,
            body=message.body,
            ts=message.ts,
        )
    )


class MemoryRegistry:
    def __init__(self) -> None:
        self._sessions: dict[str, SessionHandle] = {}
        self._watchers: dict[str, set[SessionHandle]] = {}  # watched user -> sessions
        self._watching: dict[int, set[str]] = {}  # id(session) -> watched users
        # Part of the interface; one process never loses a push to recover from.
        self.on_recovered: Callable[[Collection[str] | None], None] | None = None

    async def start(self) -> None:
        """Nothing to connect to in one process."""

    async def stop(self) -> None:
        """Nothing to release in one process."""

    async def flush(self) -> None:
        """Registrations take effect at once in one process."""

    def announce(self, change: PresenceChange) -> None:
        """Tell the sessions watching ``change.user`` (all of them are here)."""
        watchers = self._watchers.get(change.user)
        if not watchers:
            return
        frame = encode(Presence(user=change.user, online=change.online, last_seen=change.last_seen))
        for watcher in list(watchers):
            watcher.push_frame(frame)

    async def fetch_online(self, users: Iterable[str]) -> set[str]:
        return {u for u in users if u in self._sessions}

    def attach(self, session: SessionHandle) -> SessionHandle | None:
        previous = self._sessions.get(session.user)
        self._sessions[session.user] = session
        return previous

    def detach(self, session: SessionHandle) -> bool:
        for user in self._watching.pop(id(session), ()):
            watchers = self._watchers.get(user)
            if watchers is not None:
                watchers.discard(session)
                if not watchers:
                    del self._watchers[user]
        if self._sessions.get(session.user) is session:
            del self._sessions[session.user]
            return True
        return False

    def is_online(self, user: str) -> bool:
        return user in self._sessions

    def session(self, user: str) -> SessionHandle | None:
        return self._sessions.get(user)

    def sessions(self) -> list[SessionHandle]:
        return list(self._sessions.values())

    def push_message(self, message: StoredMessage, users: Iterable[str]) -> None:
        frame: bytes | None = None  # encoded once, shared by every recipient
        for user in users:
            session = self._sessions.get(user)
            if session is not None:
                if frame is None:
                    frame = deliver_frame(message)
                session.offer(message, frame)

    def push_receipt(self, receipt: ReceiptState) -> None:
        session = self._sessions.get(receipt.user)
        if session is not None:
            session.push_receipt(receipt)

    def push_frame(self, users: Iterable[str], frame: bytes) -> None:
        for user in users:
            session = self._sessions.get(user)
            if session is not None:
                session.push_frame(frame)

    def subscribe(self, session: SessionHandle, users: Iterable[str]) -> None:
        watching = self._watching.setdefault(id(session), set())
        for user in users:
            watching.add(user)
            self._watchers.setdefault(user, set()).add(session)

    def unsubscribe(self, session: SessionHandle, users: Iterable[str]) -> None:
        watching = self._watching.get(id(session), set())
        for user in users:
            watching.discard(user)
            watchers = self._watchers.get(user)
            if watchers is not None:
                watchers.discard(session)
                if not watchers:
                    del self._watchers[user]

    def subscribers(self, user: str) -> list[SessionHandle]:
        return list(self._watchers.get(user, ()))
