"""Typed wire frames.

Every frame is a JSON object whose ``type`` field names it. The classes here are
the whole protocol vocabulary: the codec (``roost.protocol.codec``) turns bytes
into exactly one of them or raises a typed ``ProtocolError``. Nothing in this
module does I/O.

Limits live in the field types (``Meta``) so validation happens while decoding,
before any handler sees a frame.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

PROTOCOL_VERSION = 1

MAX_BODY_BYTES = 64 * 1024  # what a user may send: the plaintext
# What a send's body may be on the wire: an end-to-end encrypted 64 KiB
# message grows by its envelope (a PreKey message carries a 1,568-byte ML-KEM
# ciphertext, keys, a MAC; a group message a 64-byte signature) and padding.
MAX_WIRE_BODY_BYTES = MAX_BODY_BYTES + 8 * 1024
MAX_FRAME_BYTES = 128 * 1024  # a 72 KiB body is ~96 KiB as base64, plus envelope
MAX_HISTORY_PAGE = 200
MAX_PRESENCE_USERS = 256
MAX_GROUP_NAME = 128

UserName = Annotated[str, Meta(pattern=r"^[a-z0-9_.\-]{1,32}\Z")]
ConvId = Annotated[str, Meta(min_length=3, max_length=80)]
ClientMsgId = Annotated[str, Meta(min_length=1, max_length=64)]
RequestRef = Annotated[str, Meta(max_length=64)]
Seq = Annotated[int, Meta(ge=0, le=2**53)]
ContentType = Annotated[str, Meta(min_length=1, max_length=100)]
Body = Annotated[bytes, Meta(max_length=MAX_WIRE_BODY_BYTES)]
GroupName = Annotated[str, Meta(min_length=1, max_length=MAX_GROUP_NAME)]
MemberList = Annotated[list[UserName], Meta(max_length=4096)]


class Frame(msgspec.Struct, tag_field="type", forbid_unknown_fields=False, omit_defaults=True):
    """Base of every frame."""


# --------------------------------------------------------------------------
# client -> server
# --------------------------------------------------------------------------


class Auth(Frame, tag="auth"):
    """First frame on every connection: a bearer token and the protocol version."""

    token: Annotated[str, Meta(min_length=1, max_length=256)]
    v: int = PROTOCOL_VERSION
    # Names this client program's run (random, not secret). A newer connection
    # from the same run supersedes an older one with 4007 (reconnect), one
    # from another run replaces it with 4003 (stop): that tells a client's own
    # stale attempt, authenticated late, from another device.
    client: Annotated[str, Meta(max_length=64)] = ""


class Send(Frame, tag="send"):
    """Send a message. ``id`` is the sender-generated id that makes a retry idempotent.

    Exactly one of ``to`` (a user, for a 1:1 chat) or ``conv`` (an existing
    conversation id, e.g. a group) is given.
    """

    id: ClientMsgId
    body: Body
    ct: ContentType = "text/plain"
    to: UserName | None = None
    conv: ConvId | None = None


class DeliveryAck(Frame, tag="dack"):
    """Cumulative: "I have every message of ``conv`` up to and including ``seq``"."""

    conv: ConvId
    seq: Seq


class ReadMarker(Frame, tag="read"):
    """Cumulative: "I have read ``conv`` up to ``seq``" (implies delivered)."""

    conv: ConvId
    seq: Seq


class ReceiptAck(Frame, tag="rack"):
    """Acknowledges receipt frames of ``conv`` up to receipt version ``rv``."""

    conv: ConvId
    rv: Seq


class PresenceSubscribe(Frame, tag="presence_sub"):
    users: Annotated[list[UserName], Meta(max_length=MAX_PRESENCE_USERS)]


class PresenceUnsubscribe(Frame, tag="presence_unsub"):
    users: Annotated[list[UserName], Meta(max_length=MAX_PRESENCE_USERS)]


class Typing(Frame, tag="typing"):
    conv: ConvId
    active: bool = True


class GroupCreate(Frame, tag="group_create"):
    name: GroupName
    members: MemberList
    ref: RequestRef = ""


class GroupAdd(Frame, tag="group_add"):
    group: ConvId
    members: MemberList
    ref: RequestRef = ""


class GroupRemove(Frame, tag="group_remove"):
    group: ConvId
    members: MemberList
    ref: RequestRef = ""


class GroupLeave(Frame, tag="group_leave"):
    group: ConvId
    ref: RequestRef = ""


class GroupInfo(Frame, tag="group_info"):
    group: ConvId
    ref: RequestRef = ""


class HistoryRequest(Frame, tag="history"):
    """A page of ``conv``: messages with ``seq < before`` (newest first kept) or ``seq > after``."""

    conv: ConvId
    before: Seq | None = None
    after: Seq | None = None
    limit: Annotated[int, Meta(ge=1, le=MAX_HISTORY_PAGE)] = 50
    ref: RequestRef = ""


class SyncRequest(Frame, tag="sync"):
    """Ask the server to re-check the inbox now (e.g. after the client saw a gap)."""


class Ping(Frame, tag="ping"):
    t: int = 0


ClientFrame = (
    Auth
    | Send
    | DeliveryAck
    | ReadMarker
    | ReceiptAck
    | PresenceSubscribe
    | PresenceUnsubscribe
    | Typing
    | GroupCreate
    | GroupAdd
    | GroupRemove
    | GroupLeave
    | GroupInfo
    | HistoryRequest
    | SyncRequest
    | Ping
)


# --------------------------------------------------------------------------
# server -> client
# --------------------------------------------------------------------------


class Welcome(Frame, tag="welcome"):
    user: str
    v: int
    heartbeat: int
    max_body: int = MAX_BODY_BYTES


class SendAck(Frame, tag="ack"):
    """✓ sent: the message is durably committed under ``seq``."""

    id: str
    conv: str
    seq: int
    ts: int
    duplicate: bool = False


class Deliver(Frame, tag="msg"):
    """A message for the recipient. Ack it with a cumulative ``dack``."""

    conv: str
    seq: int
    id: str
    sender: str
    ct: str
    body: bytes
    ts: int


class MemberMarks(msgspec.Struct, array_like=True):
    """One member's receipt high-water marks: ``[delivered, read]``."""

    delivered: int
    read: int


class Receipt(Frame, tag="receipt"):
    """Receipt state of ``conv`` for the messages this user sent there.

    ``marks`` maps each other member to its ``[delivered, read]`` seqs;
    ``all_delivered`` / ``all_read`` are the minimum over the other members, so
    a message with ``seq <= all_delivered`` shows ✓✓ and ``seq <= all_read``
    shows read. Ack with ``rack`` and ``rv``.
    """

    conv: str
    rv: int
    marks: dict[str, MemberMarks]
    all_delivered: int
    all_read: int


class Presence(Frame, tag="presence"):
    user: str
    online: bool
    last_seen: int | None = None


class TypingEvent(Frame, tag="typing_event"):
    conv: str
    user: str
    active: bool


class GroupState(Frame, tag="group"):
    """Answer to a group request: the group as it is now."""

    group: str
    name: str
    members: list[str]
    admins: list[str]
    last_seq: int
    ref: str = ""


class HistoryMessage(msgspec.Struct):
    seq: int
    id: str
    sender: str
    ct: str
    body: bytes
    ts: int


class HistoryPage(Frame, tag="history_page"):
    """``first_seq`` is the lowest seq this user may ever see in ``conv`` (it
    joined after the one before); ``last_seq`` the highest, as of now."""

    conv: str
    messages: list[HistoryMessage]
    last_seq: int
    first_seq: int = 1
    ref: str = ""


class Pong(Frame, tag="pong"):
    t: int = 0


class Error(Frame, tag="error"):
    """A typed error. ``ref`` echoes the offending frame's ``id``/``ref`` when it had one."""

    code: str
    message: str
    ref: str = ""


ServerFrame = (
    Welcome | SendAck | Deliver | Receipt | Presence | TypingEvent | GroupState | HistoryPage | Pong | Error
)

# Content type of the system messages the server itself appends to a group
# (membership changes); they travel through the same sequence as user messages.
MEMBERSHIP_CT = "application/vnd.roost.membership+json"
SYSTEM_SENDER = ""
