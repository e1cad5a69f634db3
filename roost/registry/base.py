"""What the chat service needs from a registry/router."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Protocol

from roost.core.presence import PresenceChange
from roost.store.base import ReceiptState, StoredMessage


class SessionHandle(Protocol):
    """The registry's view of a connected session (``roost.service.session.Session``)."""

    user: str
    client: str  # the auth frame's client run id ("" if none was given)

    def offer(self, message: StoredMessage, frame: bytes) -> None: ...
    def push_receipt(self, receipt: ReceiptState) -> None: ...
    def push_frame(self, frame: bytes) -> None: ...
    def replaced(self, by_same_client: bool = False) -> None: ...
    def revoked(self, reason: str) -> None: ...


class Registry(Protocol):
    # Called when pushes may have been lost: the chat service then has the
    # local sessions of these users (None: every local session) re-read
    # their inbox.
    on_recovered: Callable[[Collection[str] | None], None] | None

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    async def flush(self) -> None:
        """Wait until registrations made so far are visible to every gateway."""

    def announce(self, change: PresenceChange) -> None:
        """Deliver a presence change to its watchers, wherever they are connected."""

    async def fetch_online(self, users: Iterable[str]) -> set[str]:
        """Which of ``users`` are connected anywhere."""

    def attach(self, session: SessionHandle) -> SessionHandle | None:
        """Make ``session`` the user's current one; returns the one it replaced."""

    def detach(self, session: SessionHandle) -> bool:
        """Forget ``session``; True if it was still the user's current one."""

    def is_online(self, user: str) -> bool: ...

    def sessions(self) -> list[SessionHandle]:
        """The sessions connected to this gateway."""

    def push_message(self, message: StoredMessage, users: Iterable[str]) -> None:
        """Offer a committed message to whichever of ``users`` are connected."""

    def push_receipt(self, receipt: ReceiptState) -> None: ...

    def push_frame(self, users: Iterable[str], frame: bytes) -> None:
        """Ephemeral frames (typing, presence): dropped for users not connected."""

    def subscribe(self, session: SessionHandle, users: Iterable[str]) -> None: ...
    def unsubscribe(self, session: SessionHandle, users: Iterable[str]) -> None: ...
    def subscribers(self, user: str) -> list[SessionHandle]: ...
