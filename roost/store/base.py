"""The store's interface: what the chat service needs from durable storage.

Every mutating call returns only after its transaction is durably committed
(group commit batches many calls into one commit). Methods raise
``ProtocolError`` for requests that are refused (nothing changed) and
``StoreUnavailable`` when the storage failed (nothing committed; retryable).

The inbox is not a separate queue table: each member of a conversation has a
``delivered`` mark, and every message past it (not sent by the member itself)
is that member's inbox. The mark only moves on the member's own ack, so an
entry "leaves the inbox" exactly when the recipient acks it, and a group
message costs one row, not one per member.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from roost.core.delivery import DrainRequest
from roost.protocol.errors import ProtocolError

# Account states (``users.state``).
ACTIVE = "active"
DISABLED = "disabled"  # cannot authenticate; messages to it still queue
REMOVED = "removed"  # gone for good; the name is never given out again


def removed_token(name: str) -> bytes:
    """The token hash a removed account keeps: no token hashes to it (a
    SHA-256 is 32 bytes), and it stays unique per name."""
    return b"removed:" + name.encode()


@dataclass(slots=True, frozen=True)
class Account:
    name: str
    created: int  # ms
    state: str  # ACTIVE | DISABLED | REMOVED
    last_seen: int | None  # unix seconds


class StoreUnavailable(Exception):
    """Storage failed; nothing of the request was committed. Retry later."""


class SendStream:
    """The ordered sends of one connection.

    Once one of them fails for a storage reason, the store fails every later
    one of the same stream too, even if storage came back meanwhile: a later
    message must never get a seq before an earlier one the client will resend.
    """

    __slots__ = ("broken",)

    def __init__(self) -> None:
        self.broken = False


@dataclass(slots=True, frozen=True)
class StoredMessage:
    conv: str
    seq: int
    client_id: str
    sender: str
    ct: str
    body: bytes
    ts: int
    duplicate: bool = False
    # Active members other than the sender when it was committed: who to push to.
    recipients: tuple[str, ...] = ()


@dataclass(slots=True, frozen=True)
class ReceiptState:
    """What a message sender should be told about its messages in ``conv``."""

    user: str  # who receives this receipt (a sender in the conversation)
    conv: str
    rv: int  # receipt version; acked by the client, then forgotten
    # member -> (delivered, read): when live, those changed since the last
    # receipt the sender acked (an earlier one may have been lost)
    marks: dict[str, tuple[int, int]]
    all_delivered: int
    all_read: int


@dataclass(slots=True, frozen=True)
class MarkResult:
    conv: str
    user: str
    delivered: int
    read: int
    receipts: list[ReceiptState] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class GroupSnapshot:
    group: str
    name: str
    members: list[str]
    admins: list[str]
    last_seq: int
    # The membership system message this change appended (None for reads).
    event: StoredMessage | None = None
    removed: tuple[str, ...] = ()
    # Receipts a removal completed: senders whose messages the remaining
    # members now all have (or have all read). Filled when the change commits.
    receipts: list[ReceiptState] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class InboxEntry:
    conv: str
    delivered: int
    upto: int  # last seq this member may see


@dataclass(slots=True, frozen=True)
class DrainPage:
    conv: str
    start: int  # the delivered cursor the page was read from
    messages: list[StoredMessage]  # other senders' messages, ascending
    scanned_to: int  # highest seq looked at (own messages included)
    last_seq: int  # end of what this member may see, as of the read


@dataclass(slots=True, frozen=True)
class KeyUpload:
    """A checked ``keys_put`` of ``user`` (the authenticated owner)."""

    user: str
    device: int
    registration: int
    identity: bytes
    signed: tuple[int, bytes, bytes]  # (id, key, sig)
    prekeys: list[tuple[int, bytes]]  # one-time EC: (id, key)
    kem_prekeys: list[tuple[int, bytes, bytes]]  # one-time KEM: (id, key, sig)
    last_resort: tuple[int, bytes, bytes] | None  # None: keep the stored one


@dataclass(slots=True, frozen=True)
class KeyStock:
    """One-time keys a device has left; ``has_identity``: it published keys."""

    ec: int
    kem: int
    has_identity: bool


NO_KEYS = KeyStock(0, 0, False)


@dataclass(slots=True, frozen=True)
class ConnectState:
    """What a device is owed when it connects, read at once: its inbox, the
    receipts waiting for it, and device 1's one-time key stock."""

    inbox: list[InboxEntry]
    receipts: list[ReceiptState]
    keys: KeyStock


def no_connect_state() -> ConnectState:
    """The state of a user the store does not know: nothing owed, no keys."""
    return ConnectState([], [], NO_KEYS)


@dataclass(slots=True, frozen=True)
class DeviceKeys:
    """One device's part of a bundle, with what it has left after this handout."""

    device: int
    registration: int
    identity: bytes
    signed: tuple[int, bytes, bytes]
    prekey: tuple[int, bytes] | None  # None: its one-time EC keys are gone
    kem: tuple[int, bytes, bytes]  # a one-time KEM key, else the last-resort one
    kem_last_resort: bool
    ec_left: int
    kem_left: int


class Store(Protocol):
    """Writes (plain ``def`` returning a future) are enqueued when called, so
    calls made in order commit in that order: a sender's frames keep their
    order without the caller waiting for one commit before the next."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...

    # accounts
    def add_user(self, name: str, token_hash: bytes, now: int) -> asyncio.Future[None]: ...
    async def user_by_token(self, token_hash: bytes) -> str | None: ...
    def set_last_seen(self, user: str, ts: int) -> asyncio.Future[None]: ...
    async def last_seen(self, users: list[str]) -> dict[str, int | None]: ...

    # account administration (``roost.service.admin``)
    def set_token(self, name: str, token_hash: bytes) -> asyncio.Future[None]: ...
    def set_user_state(self, name: str, state: str) -> asyncio.Future[None]: ...
    def purge_member(self, name: str) -> asyncio.Future[None]: ...
    async def list_users(self) -> list[Account]: ...
    async def active_groups(self, name: str) -> list[str]: ...

    # messages and marks
    def append(
        self,
        sender: str,
        client_id: str,
        ct: str,
        body: bytes,
        now: int,
        to: str | None = None,
        conv: str | None = None,
        stream: SendStream | None = None,
    ) -> asyncio.Future[StoredMessage]: ...

    def advance_marks(
        self, user: str, conv: str, delivered: int | None, read: int | None
    ) -> asyncio.Future[MarkResult]: ...

    def ack_receipts(self, user: str, conv: str, rv: int) -> asyncio.Future[None]: ...

    # groups
    def create_group(
        self, creator: str, group: str, name: str, members: list[str], limit: int, now: int
    ) -> asyncio.Future[GroupSnapshot]: ...

    def add_members(
        self, actor: str, group: str, members: list[str], limit: int, now: int
    ) -> asyncio.Future[GroupSnapshot]: ...

    def remove_members(
        self, actor: str, group: str, members: list[str], now: int
    ) -> asyncio.Future[GroupSnapshot]: ...

    async def group_info(self, user: str, group: str) -> GroupSnapshot: ...

    # reads
    async def inbox(self, user: str) -> list[InboxEntry]: ...
    async def read_inboxes(
        self, user: str, reads: Sequence[DrainRequest], budget: int
    ) -> list[DrainPage | ProtocolError]:
        """Inbox pages of several conversations in one store read (SQLite: one
        transaction on a reader thread; PostgreSQL: one pool checkout, one
        query for the member rows, then one per conversation).

        Each read gives its conversation, the cursor to read after (None: the
        member's delivered mark) and the most messages it wants. The pages
        come back in the order asked; a conversation the user may not read
        gives its ``ProtocolError`` in its place, without failing the others.
        Reading stops once the pages hold ``budget`` messages (a session's
        free window): the answer is then a prefix of ``reads``, and what was
        not read is left for the next call.
        """

    async def history(
        self, user: str, conv: str, before: int | None, after: int | None, limit: int
    ) -> tuple[list[StoredMessage], int, int]:
        """A page of messages, the lowest and the highest seq ``user`` may see."""

    async def pending_receipts(self, user: str) -> list[ReceiptState]: ...
    async def connect_state(self, user: str) -> ConnectState:
        """``inbox``, ``pending_receipts`` and ``key_stock(user, 1)`` in one
        store read (SQLite: one reader transaction; PostgreSQL: one pool
        checkout). Devices connecting in the same loop pass share that read,
        as their token lookups (``user_by_token``) share one."""

    async def active_members(self, user: str, conv: str) -> list[str]: ...

    # the key directory (``roost.core.prekeys`` checked the upload first)
    def put_keys(self, upload: KeyUpload) -> asyncio.Future[KeyStock]:
        """Store an upload whole or not at all. A new identity replaces every
        key of the device; otherwise one-time keys are added (an id already
        stored: ``duplicate_key_id``; past ``MAX_STOCK`` of a kind:
        ``too_many_keys``) and the signed / last-resort keys replaced. The
        first upload of a device (or a new identity) must bring a last-resort
        key (``invalid``)."""

    def take_keys(self, owner: str) -> asyncio.Future[list[DeviceKeys]]:
        """A bundle of ``owner``'s devices, handing out one one-time key of
        each kind per device: each is handed out once only, also with many
        gateways taking at once, and only after the handout is committed.
        ``unknown_user`` for no such (or a removed) user, ``no_keys`` for one
        that has published none."""

    async def key_stock(self, user: str, device: int) -> KeyStock: ...
