"""Typed wire frames.

Every frame is a JSON object whose ``type`` field names it. The classes here are
the whole protocol vocabulary: the codec (``roost.protocol.codec``) turns bytes
into exactly one of them or raises a typed ``ProtocolError``. Nothing in this
module does I/O.

Limits live in the field types (``Meta``) so validation happens while decoding,
before any handler sees a frame.
"""

from __future__ import annotations

from typing import Annotated, Literal

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
# The key directory: a keys_put frame may carry 100 ML-KEM-1024 keys (~220 KiB
# as base64), so it alone may be this large; every other frame stays under
# MAX_FRAME_BYTES.
MAX_KEYS_FRAME_BYTES = 256 * 1024
MAX_KEYS_PER_FRAME = 100  # one-time keys of each kind in one keys_put
EC_KEY_BYTES = 33  # 0x05 || X25519 public key (libsignal's serialisation)
KEM_KEY_BYTES = 1569  # 0x08 || ML-KEM-1024 encapsulation key
SIGNATURE_BYTES = 64  # XEdDSA
MAX_DEVICE_ID = 1  # one device per account for now; linked devices raise this

UserName = Annotated[str, Meta(pattern=r"^[a-z0-9_.\-]{1,32}\Z")]
ConvId = Annotated[str, Meta(min_length=3, max_length=80)]
ClientMsgId = Annotated[str, Meta(min_length=1, max_length=64)]
RequestRef = Annotated[str, Meta(max_length=64)]
Seq = Annotated[int, Meta(ge=0, le=2**53)]
ContentType = Annotated[str, Meta(min_length=1, max_length=100)]
Body = Annotated[bytes, Meta(max_length=MAX_WIRE_BODY_BYTES)]
GroupName = Annotated[str, Meta(min_length=1, max_length=MAX_GROUP_NAME)]
MemberList = Annotated[list[UserName], Meta(max_length=4096)]
KeyId = Annotated[int, Meta(gt=0, lt=2**24)]
DeviceId = Annotated[int, Meta(ge=1, le=MAX_DEVICE_ID)]
RegistrationId = Annotated[int, Meta(ge=1, le=16380)]
EcPublicKey = Annotated[bytes, Meta(min_length=EC_KEY_BYTES, max_length=EC_KEY_BYTES)]
KemPublicKey = Annotated[bytes, Meta(min_length=KEM_KEY_BYTES, max_length=KEM_KEY_BYTES)]
Signature = Annotated[bytes, Meta(min_length=SIGNATURE_BYTES, max_length=SIGNATURE_BYTES)]
# Media (docs/protocol.md, "Media"): a blob id is 128 random bits in hex.
BlobId = Annotated[str, Meta(pattern=r"^[0-9a-f]{32}\Z")]
BlobKind = Literal["image", "video", "audio", "file"]
MAX_BLOB_BYTES = 2**40  # a frame's size field; the server's per-kind limits are far lower
# Parts of one blob at most (S3 allows 10,000): the server grows the part size
# of a huge blob instead, so a blob_complete listing every part stays ~45 KB.
MAX_BLOB_PARTS = 1000
MAX_URLS_PER_FRAME = 100
PartNumber = Annotated[int, Meta(ge=1, le=MAX_BLOB_PARTS)]
ETag = Annotated[str, Meta(min_length=1, max_length=128)]


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
    # This client keeps end-to-end keys: after welcome, tell it (keys_low)
    # when it has published none or few. A device that published keys is
    # told anyway; other clients never hear of keys.
    e2ee: bool = False


# The content type of every message a client sends: an end-to-end encrypted
# envelope (docs/security.md). The server refuses any other, so no plaintext
# reaches it through Roost's protocol; the field stays for what may come
# (linked devices, sealed sender) without a new frame.
E2EE_CT = "application/vnd.roost.e2ee"


class Send(Frame, tag="send"):
    """Send a message. ``id`` is the sender-generated id that makes a retry idempotent.

    Exactly one of ``to`` (a user, for a 1:1 chat) or ``conv`` (an existing
    conversation id, e.g. a group) is given. ``body`` is the sealed envelope;
    ``ct`` must be ``E2EE_CT`` (refused with ``encryption_required`` otherwise).
    """

    id: ClientMsgId
    body: Body
    ct: ContentType = E2EE_CT
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


class SignedPreKey(msgspec.Struct):
    """An EC prekey signed (XEdDSA) by the identity key: the signature is over ``key`` (33 bytes)."""

    id: KeyId
    key: EcPublicKey
    sig: Signature


class PreKey(msgspec.Struct):
    """A one-time EC prekey."""

    id: KeyId
    key: EcPublicKey


class KemPreKey(msgspec.Struct):
    """An ML-KEM-1024 prekey signed by the identity key over ``key`` (1569 bytes)."""

    id: KeyId
    key: KemPublicKey
    sig: Signature


class KeysPut(Frame, tag="keys_put"):
    """Publish this user's own keys (there is no user field: only the owner can).

    A new ``identity`` replaces every key of the device; otherwise the one-time
    keys are added and ``signed`` / ``last_resort`` replace the stored ones
    (``last_resort`` null: keep the stored one). Answered with ``keys_state``.
    """

    registration: RegistrationId
    identity: EcPublicKey
    signed: SignedPreKey
    prekeys: Annotated[list[PreKey], Meta(max_length=MAX_KEYS_PER_FRAME)] = []
    kem_prekeys: Annotated[list[KemPreKey], Meta(max_length=MAX_KEYS_PER_FRAME)] = []
    last_resort: KemPreKey | None = None
    device: DeviceId = 1
    ref: RequestRef = ""


class KeysCount(Frame, tag="keys_count"):
    """How many one-time keys of this user's device are left: answered with ``keys_state``."""

    device: DeviceId = 1
    ref: RequestRef = ""


class KeysGet(Frame, tag="keys_get"):
    """Fetch ``user``'s prekey bundle (hands out one one-time key of each kind)."""

    user: UserName
    ref: RequestRef = ""


class BlobNew(Frame, tag="blob_new"):
    """Ask for an upload slot of ``size`` bytes (already encrypted by the client).

    ``plain_size``: for an attachment (roost/core/blobsize.py), the file's
    size; the server then checks the per-kind limit against it, exactly,
    and that ``size`` is its blob size. Without it only the blob is bounded
    (by the blob size of a file at the limit)."""

    size: Annotated[int, Meta(ge=1, le=MAX_BLOB_BYTES)]
    kind: BlobKind
    ref: RequestRef = ""
    plain_size: Annotated[int, Meta(ge=0, le=MAX_BLOB_BYTES)] | None = None


class BlobPutUrls(Frame, tag="blob_put_urls"):
    """Signed upload URLs for these parts (1-based) of one's own pending blob."""

    blob: BlobId
    parts: Annotated[list[PartNumber], Meta(min_length=1, max_length=MAX_URLS_PER_FRAME)]
    ref: RequestRef = ""


class BlobStatus(Frame, tag="blob_status"):
    """Which parts of one's own blob the store holds (to resume an upload)."""

    blob: BlobId
    ref: RequestRef = ""


class BlobComplete(Frame, tag="blob_complete"):
    """Every part is uploaded: ``parts`` is ``[[part, etag], ...]`` as the uploads answered."""

    blob: BlobId
    parts: Annotated[list[tuple[PartNumber, ETag]], Meta(min_length=1, max_length=MAX_BLOB_PARTS)]
    ref: RequestRef = ""


class BlobGet(Frame, tag="blob_get"):
    """A signed download URL of a complete blob."""

    blob: BlobId
    ref: RequestRef = ""


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
    | KeysPut
    | KeysCount
    | KeysGet
    | BlobNew
    | BlobPutUrls
    | BlobStatus
    | BlobComplete
    | BlobGet
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


class BlobSlot(Frame, tag="blob_slot"):
    """Answer to ``blob_new``: upload ``parts`` parts of ``part_size`` bytes (the last one the rest)."""

    ref: str
    blob: str
    part_size: int
    parts: int
    expires: int  # unix seconds: an upload not completed by then may be deleted


class BlobUrls(Frame, tag="blob_urls"):
    """Answer to ``blob_put_urls``: ``[[part, url, headers], ...]``; PUT each part's
    exact bytes to its URL with those headers before ``expires`` (unix seconds)."""

    ref: str
    blob: str
    urls: list[tuple[int, str, dict[str, str]]]
    expires: int


class BlobState(Frame, tag="blob_state"):
    """Answer to ``blob_status`` and ``blob_complete``. ``etags`` (aligned with
    ``parts_done``) and ``part_size`` let a client resume an upload it lost
    track of: it uploads the missing parts and completes with every etag."""

    ref: str
    blob: str
    size: int
    parts_done: list[int]
    complete: bool
    part_size: int = 0
    etags: list[str] = []


class BlobUrl(Frame, tag="blob_url"):
    """Answer to ``blob_get``: GET ``url`` (Range requests welcome) before ``expires``.
    A relative URL is relative to the server's own http(s) address."""

    ref: str
    blob: str
    url: str
    size: int
    expires: int


class Error(Frame, tag="error"):
    """A typed error. ``ref`` echoes the offending frame's ``id``/``ref`` when it had one."""

    code: str
    message: str
    ref: str = ""


class KeysState(Frame, tag="keys_state"):
    """The one-time keys a device has left; ``has_identity``: it published keys."""

    ec: int
    kem: int
    has_identity: bool
    ref: str = ""


class DeviceKeys(msgspec.Struct):
    """One device's part of a bundle. ``prekey`` is null once its one-time EC
    keys are gone; ``kem`` is the last-resort key (``kem_last_resort``) once
    its one-time KEM keys are."""

    device: Annotated[int, Meta(ge=1)]  # not DeviceId: a client must read later devices too
    registration: RegistrationId
    signed: SignedPreKey
    prekey: PreKey | None
    kem: KemPreKey
    kem_last_resort: bool


class KeysBundle(Frame, tag="keys_bundle"):
    user: str
    identity: EcPublicKey
    devices: list[DeviceKeys]
    ref: str = ""


class KeysLow(Frame, tag="keys_low"):
    """Pushed to the owner: a device's one-time keys are running out (or it has none)."""

    device: int
    ec: int
    kem: int


ServerFrame = (
    Welcome
    | SendAck
    | Deliver
    | Receipt
    | Presence
    | TypingEvent
    | GroupState
    | HistoryPage
    | Pong
    | Error
    | KeysState
    | KeysBundle
    | KeysLow
    | BlobSlot
    | BlobUrls
    | BlobState
    | BlobUrl
)

# Content type of the system messages the server itself appends to a group
# (membership changes); they travel through the same sequence as user messages.
MEMBERSHIP_CT = "application/vnd.roost.membership+json"
SYSTEM_SENDER = ""
