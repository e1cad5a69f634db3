"""What ``Client.events()`` yields."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class Message:
    conv: str
    seq: int
    id: str  # the sender-generated message id
    sender: str
    ct: str
    body: bytes
    ts: int  # server time (ms); for display only, order is by seq
    # True: it came end-to-end encrypted and was decrypted on this device
    # (``ct``/``body`` are the sender's own); False: the server saw it as is.
    encrypted: bool = False

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


@dataclass(slots=True, frozen=True)
class IdentityChanged:
    """``user``'s identity key is not the one seen before (they reinstalled,
    or someone is in the middle): the safety number changed and any
    verification is void. The application must show it; messages keep
    flowing with the new key, as Signal does."""

    user: str
    old_identity: bytes
    new_identity: bytes
    was_verified: bool


@dataclass(slots=True, frozen=True)
class Pending:
    """One of this client's messages waits in the outbox for a reason other
    than the connection (the recipient has no keys yet): it goes out by itself."""

    message_id: str
    to: str | None
    conv: str | None
    reason: str


@dataclass(slots=True, frozen=True)
class ProtocolMessage:
    """A seq of a 1:1 conversation taken by an encryption protocol message
    (a sender key hand-out, a retry request, a resend), sent (``outgoing``,
    at its ✓) or received: never shown, but the seq is accounted for."""

    conv: str
    seq: int
    sender: str
    outgoing: bool


@dataclass(slots=True, frozen=True)
class DecryptionFailed:
    """A received ciphertext could not be decrypted; a retry request went to
    its sender, whose answer, if it comes, is shown as the message itself."""

    conv: str
    seq: int
    message_id: str
    sender: str
    reason: str


@dataclass(slots=True, frozen=True)
class Membership:
    """A group membership change; it has its own seq in the conversation."""

    conv: str
    seq: int
    action: str  # created | added | removed | left
    actor: str
    users: tuple[str, ...]
    name: str
    ts: int
    # "added" only: former members brought back -> how they had gone ("removed" | "left").
    returning: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, conv: str, seq: int, body: bytes, ts: int) -> Membership:
        try:
            data = json.loads(body)
            return cls(
                conv,
                seq,
                str(data.get("action", "")),
                str(data.get("actor", "")),
                tuple(str(u) for u in data.get("users", [])),
                str(data.get("name", "")),
                ts,
                tuple((str(u), str(how)) for u, how in dict(data.get("returning") or {}).items()),
            )
        except (ValueError, AttributeError, TypeError):
            return cls(conv, seq, "unknown", "", (), "", ts)

    def to_body(self) -> bytes:
        """The system message body ``parse`` reads (to keep an event held in the state)."""
        data: dict[str, object] = {
            "action": self.action,
            "actor": self.actor,
            "users": list(self.users),
            "name": self.name,
        }
        if self.returning:
            data["returning"] = dict(self.returning)
        return json.dumps(data).encode()


@dataclass(slots=True, frozen=True)
class Sent:
    """✓ for one of this client's messages (also for ones resent after a restart)."""

    message_id: str
    conv: str
    seq: int
    ts: int


@dataclass(slots=True, frozen=True)
class LocalSend:
    """A message another local command of this account (``roost send`` while
    this client runs) handed to this client to send: the user's own message,
    to show as such. Its ✓ follows as a ``Sent`` event with the same id."""

    message_id: str
    to: str | None  # the user, for a 1:1 chat
    conv: str | None  # the group, otherwise
    ct: str
    body: bytes
    created: int  # client time (ms)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


@dataclass(slots=True, frozen=True)
class Consumed:
    """Another reader of this client (a ``roost listen`` handed to it through
    the local socket) showed the user received messages of ``convs``: they
    are no longer unread (``Client.unread_counts``)."""

    convs: tuple[str, ...]


@dataclass(slots=True, frozen=True)
class ReceiptEvent:
    """Receipt marks for messages this user sent in ``conv``.

    ``marks`` maps a member to ``(delivered, read)``; a message with
    ``seq <= all_delivered`` has reached everyone (✓✓), ``seq <= all_read``
    has been read by everyone.
    """

    conv: str
    marks: dict[str, tuple[int, int]]
    all_delivered: int
    all_read: int


@dataclass(slots=True, frozen=True)
class PresenceEvent:
    user: str
    online: bool
    last_seen: int | None  # unix seconds, when offline


@dataclass(slots=True, frozen=True)
class TypingEvent:
    conv: str
    user: str
    active: bool


@dataclass(slots=True, frozen=True)
class KeysLow:
    """The server holds few (or none) of this device's one-time keys: upload more
    (``Client.put_keys``). ``ec``/``kem``: how many of each kind are left."""

    ec: int
    kem: int


@dataclass(slots=True, frozen=True)
class Connected:
    user: str


@dataclass(slots=True, frozen=True)
class Disconnected:
    code: int
    reason: str
    final: bool  # True: the client will not reconnect (closed, replaced, auth failed)


@dataclass(slots=True, frozen=True)
class ErrorEvent:
    code: str
    message: str
    ref: str


Event = (
    Message
    | Membership
    | LocalSend
    | Sent
    | Consumed
    | ReceiptEvent
    | PresenceEvent
    | TypingEvent
    | KeysLow
    | Connected
    | Disconnected
    | ErrorEvent
    | IdentityChanged
    | Pending
    | DecryptionFailed
    | ProtocolMessage
)
