"""End-to-end encryption in the SDK: the Signal protocol (``roost.e2ee``)
wired to the client's durable state and its connection.

What the server sees of a message is an envelope (content type
``E2EE_CT``): a pairwise Signal message (PreKey or normal) for a 1:1 chat and
for the protocol's own control messages, or one SenderKeyMessage for a group
message, fanned out by the server as any body. Inside, the plaintext carries
the real content type and body (``Content``).

Durability: every change of key, session or sender-key state is written in
the SAME SQLite transaction as the message it encrypted (the outbox row gets
its ciphertext) or decrypted (the stored message and the conversation's
cursor). A client killed at any instant either committed both or neither;
the server redelivers what was not acked and the ratchet is where it was.

A message is encrypted once, when it leaves the waiting state (a session
exists or a group's sender key was handed out), and the ciphertext is kept in
the outbox, so a resend after a reconnect sends the same bytes with the same
id. A 1:1 message to a user without published keys waits in the outbox,
pending with the reason, and a background pump polls for their keys (with
backoff, capped) and sends it once they appear.

Control messages (pairwise, never shown): ``skdm`` hands a member our group
sender key; ``retry`` asks the sender of a message we could not decrypt to
send it again; ``resend`` is that message, re-encrypted from the sender's
local copy in the fresh session the retry request started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec

from roost.client.events import DecryptionFailed, IdentityChanged, Membership, Message, ProtocolMessage
from roost.client.keys import KeyUpload
from roost.client.state import OutboxItem
from roost.e2ee import (
    DuplicateMessage,
    E2eeError,
    LocalKeys,
    SenderKeyRecord,
    Session,
    safety_number,
)
from roost.protocol import frames as f

if TYPE_CHECKING:
    from roost.client.client import Client

log = logging.getLogger("roost.client.crypto")

E2EE_CT = f.E2EE_CT
DEVICE = 1  # this device (multi-device later: the ids are already on the wire and in the state)

# Key stock: uploaded in full on a new identity, refilled below a third.
PREKEY_BATCH = 100
# A failed key upload is tried again after 0.5, 1, 2, ... s (at most 30 s apart), 8 times.
PUBLISH_ATTEMPTS = 8
PUBLISH_RETRY_BASE = 0.5
PUBLISH_RETRY_CAP = 30.0
SIGNED_PREKEY_MAX_AGE = 7 * 24 * 3600.0  # s: rotated weekly, as Signal clients do

# Polling for the keys of a user who has none yet: 1 s, 2 s, ... capped.
KEYS_POLL_FIRST = 1.0
KEYS_POLL_CAP = 15.0
UNAVAILABLE_WAIT = 1.0  # s: a key fetch the server answered `unavailable` (a store fault) is tried again
RATE_LIMITED_WAIT = 5.0
KEYGEN_BATCH = 10
CLOSE_PUBLISH_WAIT = 5.0  # s a closing client waits for its keys' upload

# A group message whose sender key has not come within this long gets a retry request.
HOLD_GRACE = 2.0
# A conversation held up by a message no one resends moves on after this long (s).
GIVE_UP = 120.0
HELD_NO_KEY = "no_sender_key"  # a group message before its sender key
HELD_FAILED = "failed"  # could not be decrypted; a retry request asks for it again
HELD_BEHIND = "behind"  # decrypted, waits behind an earlier held message of its conversation
HELD_GAVE_UP = "gave_up"  # failed for good; a late resend is still shown
# Retry requests per sender per minute (a peer sending garbage must not make us flood it).
RETRIES_PER_MINUTE = 120
FETCH_CONCURRENCY = 16  # bundle fetches in flight when handing a sender key to a group
MAX_SESSIONS = 5  # per peer device: the current one and four previous ones

_META_UPLOADED = "e2ee_uploaded_identity"
_META_SIGNED = "e2ee_signed_prekey"


class Envelope(msgspec.Struct, array_like=True):
    """The wire body under ``E2EE_CT``."""

    v: int
    kind: str  # "s": pairwise Signal message; "g": group SenderKeyMessage
    device: int  # the sender's device
    data: bytes
    dist: str = ""  # "g": the sender key's distribution id


class Content(msgspec.Struct, array_like=True):
    """The plaintext inside an envelope."""

    kind: str  # msg | skdm | retry | resend
    ct: str = ""
    body: bytes = b""
    conv: str = ""  # skdm/retry/resend: the conversation concerned
    id: str = ""  # retry/resend: the message concerned


_encode = msgspec.msgpack.Encoder().encode
_decode_sessions = msgspec.msgpack.Decoder(list[bytes]).decode
_decode_envelope = msgspec.msgpack.Decoder(Envelope).decode
_decode_content = msgspec.msgpack.Decoder(Content).decode


def is_group(conv: str | None) -> bool:
    return conv is not None and conv.startswith("g:")


class E2ee:
    """The client's encryption engine (one per ``Client``)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.state = client.state
        # One-time keys of each kind kept on the server. Each is an ML-KEM
        # key generation and a signature: a test world of many short-lived
        # clients (roost simulate) keeps fewer; spent, a bundle falls back to
        # the last-resort KEM key, as on any device that ran out.
        self.prekey_batch = PREKEY_BATCH
        # Wall clock (s) of the held-message timers (retry after HOLD_GRACE,
        # give up after GIVE_UP), compared with server timestamps; the
        # simulator, whose loop runs on virtual time, replaces it.
        self.wall_clock: Callable[[], float] = time.time
        # Ids of control messages and sender-key distributions: random; the
        # simulator draws them from its seed so a run replays exactly.
        self.new_uuid: Callable[[], uuid.UUID] = uuid.uuid4
        raw = self.state.e2ee_local_keys()
        if raw is None:
            self.keys = LocalKeys.generate(DEVICE)
            self.state.save_e2ee_local_keys(self.keys.to_bytes())
            self.state.commit()
        else:
            self.keys = LocalKeys.from_bytes(raw)
        self._sessions: dict[str, list[Session]] = {}  # user -> [current, previous...]
        self._renew: set[str] = set()  # users whose next message starts a fresh session
        self._sender_keys: dict[tuple[str, str, str], SenderKeyRecord] = {}
        self._members: dict[str, set[str]] = {}  # group -> members, as last learnt
        self._blocked: dict[str, float] = {}  # user -> loop time before which no bundle fetch
        self._poll_delay: dict[str, float] = {}
        self._fetching: dict[str, asyncio.Future[None]] = {}
        self._retry_times: dict[str, deque[float]] = {}
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._pump_task: asyncio.Task[None] | None = None
        self._refilling: asyncio.Task[None] | None = None
        self._publishing: asyncio.Task[None] | None = None
        self._why_blocked: dict[str, str] = {}  # user -> why messages to them wait
        self.decryption_failures = 0
        # Set once this connection confirmed our keys are on the server.
        self.published = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------

    def on_connected(self) -> None:
        self._publishing = asyncio.create_task(self._publish_keys())
        self._publishing.add_done_callback(self._task_done)
        if self._pump_task is None or self._pump_task.done():
            self._pump_task = asyncio.create_task(self._pump())
        # Soon, not now: the client marks itself connected only after this
        # returns, and a sweep that finds it disconnected does nothing (a held
        # message whose timer fired while offline then waited for good).
        asyncio.get_running_loop().call_soon(self._sweep_held)
        self.wake()

    async def close(self) -> None:
        # A short-lived client (``roost listen --timeout 1``) is many a user's
        # first: let its keys reach the server before it goes.
        publishing = self._publishing
        if publishing is not None and not publishing.done() and self.client.connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(publishing), CLOSE_PUBLISH_WAIT)
        if publishing is not None:
            publishing.cancel()
        tasks = [*self._tasks, *([self._pump_task] if self._pump_task else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._pump_task = None

    def wake(self) -> None:
        self._wake.set()

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not _is_connection_error(exc):
                log.warning("e2ee task failed: %r", exc)

    # -- our keys on the server ----------------------------------------------

    async def _publish_keys(self) -> None:
        self.published.clear()
        # A transient server error (a store fault answered `unavailable`) must
        # not leave this device without keys until its next reconnect: every
        # message to it would wait in its senders' outboxes (roost simulate
        # seed 22). A lost connection ends the attempts; the next connect
        # starts over.
        for attempt in range(PUBLISH_ATTEMPTS):
            try:
                await self._ensure_published()
            except Exception as exc:
                if _is_connection_error(exc) or attempt == PUBLISH_ATTEMPTS - 1:
                    raise
                log.info("key upload failed (%r); trying again", exc)
                await asyncio.sleep(min(PUBLISH_RETRY_BASE * 2**attempt, PUBLISH_RETRY_CAP))
                continue
            self.published.set()
            return

    async def _ensure_published(self) -> None:
        counts = await self.client.key_counts()
        uploaded = self.state.get_meta(_META_UPLOADED) == self.keys.identity_public.hex()
        if not counts.has_identity or not uploaded:
            await self._upload(self.prekey_batch, self.prekey_batch, full=True)
            self.state.set_meta(_META_UPLOADED, self.keys.identity_public.hex())
            return
        rotate = self.keys.signed_prekey_age(time.time()) > SIGNED_PREKEY_MAX_AGE
        batch, below = self.prekey_batch, self.prekey_batch // 3
        ec = batch - counts.ec if counts.ec < below else 0
        kem = batch - counts.kem if counts.kem < below else 0
        if rotate or ec or kem:
            await self._upload(ec, kem, rotate=rotate)

    def keys_low(self) -> None:
        """The server says our one-time keys run out: refill (once at a time;
        right after the welcome the connect-time upload does it)."""
        if not self.published.is_set():
            return
        if self._refilling is None or self._refilling.done():
            self._refilling = asyncio.create_task(self.refill())
            self._refilling.add_done_callback(self._task_done)

    async def refill(self) -> None:
        """On ``keys_low``: top the stock up to a full batch."""
        counts = await self.client.key_counts()
        batch, below = self.prekey_batch, self.prekey_batch // 3
        ec = max(0, batch - counts.ec) if counts.ec < below * 2 else 0
        kem = max(0, batch - counts.kem) if counts.kem < below * 2 else 0
        if ec or kem or not counts.has_identity:
            await self._upload(ec, kem, full=not counts.has_identity)

    async def _upload(self, ec: int, kem: int, *, full: bool = False, rotate: bool = False) -> None:
        del full  # a full upload is a full batch; every upload carries the whole identity
        signed = self._signed_prekey(rotate=rotate)
        # In small batches, yielding between them: generating 200 keys takes
        # a while, and the connection (and other clients in this process) go on.
        prekeys: list[tuple[int, bytes]] = []
        kem_prekeys: list[tuple[int, bytes, bytes]] = []
        for start in range(0, max(ec, kem), KEYGEN_BATCH):
            prekeys += self.keys.new_prekeys(min(KEYGEN_BATCH, max(0, ec - start)))
            kem_prekeys += self.keys.new_kem_prekeys(min(KEYGEN_BATCH, max(0, kem - start)))
            await asyncio.sleep(0)
        # Always sent (the same key again): if another install of the account
        # replaced the identity meanwhile, this upload replaces it back whole.
        last_resort = self.keys.last_resort_kem()
        # The private halves are committed before the public ones leave: a key
        # handed out by the server must never be one this device forgot.
        self.state.save_e2ee_local_keys(self.keys.to_bytes())
        self.state.commit()
        upload = KeyUpload(
            DEVICE,
            self.keys.registration,
            self.keys.identity_public,
            signed[0],
            signed[1],
            signed[2],
            prekeys,
            kem_prekeys,
            last_resort,
        )
        await self.client.put_keys(upload)

    def _signed_prekey(self, *, rotate: bool) -> tuple[int, bytes, bytes]:
        saved = self.state.get_meta(_META_SIGNED)
        if saved is not None and not rotate:
            data = json.loads(saved)
            return int(data[0]), bytes.fromhex(data[1]), bytes.fromhex(data[2])
        signed = self.keys.new_signed_prekey(time.time())
        self.state.save_e2ee_local_keys(self.keys.to_bytes())
        self.state.set_meta(_META_SIGNED, json.dumps([signed[0], signed[1].hex(), signed[2].hex()]))
        return signed

    # -- sessions ------------------------------------------------------------

    # As libsignal's SessionRecord: the current session with a peer plus a few
    # previous ones, so a message still in flight in the session a retry or a
    # reinstall replaced can be read; the one that reads it becomes current.

    def _sessions_with(self, user: str) -> list[Session]:
        sessions = self._sessions.get(user)
        if sessions is None:
            raw = self.state.session(user, DEVICE)
            blobs = [] if raw is None else _decode_sessions(raw)
            sessions = self._sessions[user] = [Session.from_bytes(b) for b in blobs]
        return sessions

    def _session(self, user: str) -> Session | None:
        sessions = self._sessions_with(user)
        return sessions[0] if sessions else None

    def _save_sessions(self, user: str, sessions: list[Session]) -> None:
        sessions = sessions[:MAX_SESSIONS]
        self._sessions[user] = sessions
        self.state.save_session(user, DEVICE, _encode([s.to_bytes() for s in sessions]))

    def _save_session(self, user: str, session: Session) -> None:
        """``session`` (new or advanced) becomes the current one."""
        others = [s for s in self._sessions_with(user) if s is not session]
        self._save_sessions(user, [session, *others])

    async def ensure_session(self, user: str, *, fresh: bool = False) -> None:
        """A session with ``user``: from the state, or PQXDH from a fetched bundle
        (always, with ``fresh``: the old one is kept as a previous session).
        Raises ``RoostError`` (no_keys, unknown_user, rate_limited) from the fetch."""
        if not fresh and self._session(user) is not None:
            return
        running = self._fetching.get(user)
        if running is not None:
            await asyncio.shield(running)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._fetching[user] = fut
        try:
            bundle = await self.client.fetch_bundle(user)
            device = next((d for d in bundle.devices if d.device == DEVICE), None)
            if device is None:
                from roost.client.client import RoostError

                raise RoostError("no_keys", f"{user} has no keys for device {DEVICE}")
            session = Session.initiate(self.keys, user, bundle.identity, device)
            self._see_identity(user, bundle.identity)
            self._save_session(user, session)
            self.state.commit()
            fut.set_result(None)
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        finally:
            self._fetching.pop(user, None)

    def _see_identity(self, user: str, identity: bytes) -> None:
        """Trust on first use; a different key later is a visible event, never silent."""
        seen = self.state.identity(user)
        now = int(time.time() * 1000)
        if seen is None:
            self.state.save_identity(user, identity, changed=False, now=now)
            return
        if seen[0] == identity:
            return
        self.state.save_identity(user, identity, changed=True, now=now)
        # Their new install has none of our sender keys: hand them out again.
        self._forget_distribution(user)
        self.client._emit(IdentityChanged(user, seen[0], identity, was_verified=seen[1]))

    def _forget_distribution(self, user: str) -> None:
        for conv in list(self._members):
            own = self.state.own_sender_key(conv)
            if own is not None and user in own[2]:
                self.state.save_own_sender_key(conv, own[0], own[1], [m for m in own[2] if m != user])

    def safety_number(self, user: str) -> str | None:
        seen = self.state.identity(user)
        if seen is None or self.client.user is None:
            return None
        return safety_number(self.client.user, self.keys.identity_public, user, seen[0])

    # -- sending -------------------------------------------------------------

    def seal_now(self, item: OutboxItem) -> OutboxItem:
        """``item`` encrypted if that needs no network (a session or a handed-out
        sender key exists, and nothing older to the same chat waits), else as is.
        The state writes join the open transaction; the caller commits them
        with the outbox row."""
        if self.client._outbox.waiting(item.to, item.conv):
            return item
        if item.to is not None and self._session(item.to) is not None:
            return self._seal_direct(item)
        if item.conv is not None and self._group_ready(item.conv):
            return self._seal_group(item)
        return item

    def _plaintext_of(self, item: OutboxItem) -> bytes:
        if item.control:
            return item.body  # an encoded ``Content`` already
        return _encode(Content("msg", item.ct, item.body))

    def _seal_direct(self, item: OutboxItem) -> OutboxItem:
        assert item.to is not None
        session = self._session(item.to)
        assert session is not None
        data = session.encrypt(self._plaintext_of(item))
        self._save_session(item.to, session)
        return self._sealed(item, _encode(Envelope(1, "s", DEVICE, data)))

    def _seal_group(self, item: OutboxItem) -> OutboxItem:
        assert item.conv is not None
        own = self.state.own_sender_key(item.conv)
        assert own is not None
        record = SenderKeyRecord.from_bytes(own[0])
        data = record.encrypt(self._plaintext_of(item))
        self.state.save_own_sender_key(item.conv, record.to_bytes(), own[1], own[2])
        return self._sealed(item, _encode(Envelope(1, "g", DEVICE, data, record.distribution_id.hex)))

    def _sealed(self, item: OutboxItem, wire: bytes) -> OutboxItem:
        sealed = OutboxItem(
            item.id, item.to, item.conv, item.ct, item.body, item.created, E2EE_CT, wire, None, item.control
        )
        self.state.outbox_set_wire(item.id, E2EE_CT, wire)
        return sealed

    def queue_control(self, to: str, content: Content) -> None:
        """A protocol message to ``to``, through the durable outbox (joins the open transaction)."""
        item = OutboxItem(
            self.new_uuid().hex, to, None, E2EE_CT, _encode(content), int(time.time() * 1000), control=True
        )
        self.client._queue(item, commit=False)
        self.wake()

    # -- the pump: waiting items -> encrypted and sent -------------------------

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            await self.client._connected.wait()
            try:
                await self._pump_once()
            except Exception as exc:
                if not _is_connection_error(exc):
                    log.exception("e2ee pump failed")
                await asyncio.sleep(0.5)
            blocked = [t for t in self._blocked.values() if t > loop.time()]
            timeout = max(0.05, min(blocked) - loop.time()) if blocked else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _pump_once(self) -> None:
        loop = asyncio.get_running_loop()
        waiting = [item for item in self.client._outbox.values() if not item.ready]
        # Chats with an older item this pass left unsealed (-> why it waits):
        # a newer item to the same chat must not go first, e.g. when a key
        # fetch for a group opens, mid-pass, the session an older direct
        # item was blocked on. It waits for the same reason.
        held: dict[tuple[str | None, str | None], str | None] = {}
        for item in waiting:
            if item.id not in self.client._outbox:
                continue
            chat = (item.to, item.conv)
            if chat in held:
                reason = held[chat]
                if reason is not None:
                    self._set_pending(item, reason)
                continue
            try:
                await self._pump_item(item, loop)
            finally:
                current = self.client._outbox.get(item.id)
                if current is not None and not current.ready:
                    held[chat] = current.pending

    async def _pump_item(self, item: OutboxItem, loop: asyncio.AbstractEventLoop) -> None:
        from roost.client.client import RoostError

        if item.to is not None:
            if self._blocked.get(item.to, 0.0) > loop.time():
                self._set_pending(item, self._why_blocked.get(item.to, "waiting for a key fetch"))
                return
            try:
                await self.ensure_session(item.to, fresh=item.to in self._renew)
            except RoostError as exc:
                self._fetch_failed(item, exc)
                return
            self._renew.discard(item.to)
            self._poll_delay.pop(item.to, None)
            self._seal_and_send(item, self._seal_direct)
        elif item.conv is not None:
            if self._blocked.get(item.conv, 0.0) > loop.time():
                return
            try:
                await self._prepare_group(item.conv)
            except RoostError as exc:
                if exc.code == "connection_lost":
                    raise
                if exc.code in ("rate_limited", "unavailable"):
                    # Not the message's fault: the pump tries the group
                    # again when this runs out (it wakes on _blocked).
                    wait = RATE_LIMITED_WAIT if exc.code == "rate_limited" else UNAVAILABLE_WAIT
                    self._blocked[item.conv] = loop.time() + wait
                    self._set_pending(
                        item, f"the server could not answer for the group ({exc.code}); retrying"
                    )
                    return
                self.client._fail_item(item.id, exc.code, exc.message)
                return
            self._blocked.pop(item.conv, None)
            self._seal_and_send(item, self._seal_group)

    def _seal_and_send(self, item: OutboxItem, seal: Callable[[OutboxItem], OutboxItem]) -> None:
        current = self.client._outbox.get(item.id)
        if current is None or current.ready:
            return
        sealed = seal(current)
        self.state.commit()  # the ciphertext and the state that made it, together
        self.client._outbox[item.id] = sealed
        self.client._send_item(sealed)

    def _fetch_failed(self, item: OutboxItem, exc: Exception) -> None:
        from roost.client.client import RoostError

        assert item.to is not None and isinstance(exc, RoostError)
        loop = asyncio.get_running_loop()
        if exc.code == "no_keys":
            delay = self._poll_delay.get(item.to, KEYS_POLL_FIRST / 2) * 2
            self._poll_delay[item.to] = min(KEYS_POLL_CAP, delay)
            self._blocked[item.to] = loop.time() + self._poll_delay[item.to]
            who = item.to
            self._why_blocked[who] = (
                f"waiting for {who}'s encryption keys ({who} has not started a Roost client yet)"
            )
            self._set_pending(item, self._why_blocked[who])
        elif exc.code == "rate_limited":
            self._blocked[item.to] = loop.time() + RATE_LIMITED_WAIT
            self._why_blocked[item.to] = "key fetches are rate-limited by the server; retrying"
            self._set_pending(item, self._why_blocked[item.to])
        elif exc.code == "unavailable":
            # The server's store failed for a moment: not the message's fault.
            self._blocked[item.to] = loop.time() + UNAVAILABLE_WAIT
            self._why_blocked[item.to] = "the server could not read keys for a moment; retrying"
            self._set_pending(item, self._why_blocked[item.to])
        elif exc.code == "connection_lost":
            raise exc
        else:
            self.client._fail_item(item.id, exc.code, exc.message)

    def _set_pending(self, item: OutboxItem, reason: str) -> None:
        current = self.client._outbox.get(item.id)
        if current is None or current.pending == reason:
            return
        self.state.outbox_set_pending(item.id, reason)
        self.client._outbox[item.id] = OutboxItem(
            current.id, current.to, current.conv, current.ct, current.body, current.created,
            None, None, reason, current.control,
        )  # fmt: skip
        if not current.control:
            self.client._on_pending(item.id, current.to, current.conv, reason)

    # -- groups: our sender key ----------------------------------------------

    def _group_ready(self, conv: str) -> bool:
        members = self._members.get(conv)
        own = self.state.own_sender_key(conv)
        if members is None or own is None:
            return False
        return members - {self.client.user} <= set(own[2])

    async def _prepare_group(self, conv: str) -> None:
        """Our sender key for ``conv`` handed to every member (over the pairwise
        sessions) before a group message uses it."""
        if conv not in self._members:
            info = await self.client.group_info(conv)
            self._members[conv] = set(info.members)
        own = self.state.own_sender_key(conv)
        if own is None:
            record, skdm = SenderKeyRecord.create(self.new_uuid())
            self.state.save_own_sender_key(conv, record.to_bytes(), skdm, [])
            self.state.commit()
            own = self.state.own_sender_key(conv)
            assert own is not None
        missing = sorted(self._members[conv] - {self.client.user} - set(own[2]))
        if not missing:
            return
        # Sessions first (bounded concurrency), so the distribution messages go
        # out before the group message that needs them.
        gate = asyncio.Semaphore(FETCH_CONCURRENCY)

        async def session_with(user: str) -> None:
            async with gate:
                with contextlib.suppress(Exception):
                    if self._blocked.get(user, 0.0) <= asyncio.get_running_loop().time():
                        await self.ensure_session(user)

        await asyncio.gather(*(session_with(u) for u in missing))
        for user in missing:
            self.queue_control(user, Content("skdm", body=own[1], conv=conv))
        self.state.save_own_sender_key(conv, own[0], own[1], [*own[2], *missing])
        self.state.commit()
        # Those with sessions are sealed and sent now; the rest wait in the outbox.
        for item in [i for i in self.client._outbox.values() if i.control and not i.ready]:
            if item.to in missing and self._session(item.to or "") is not None:
                self._seal_and_send(item, self._seal_direct)

    def on_membership(self, event: Membership) -> None:
        """Who can read our next group message follows the membership: anyone
        gone means a new sender key before the next send."""
        members = self._members.get(event.conv)
        if event.action in ("removed", "left"):
            if self.client.user in event.users:
                self._members.pop(event.conv, None)
                self.state.drop_own_sender_key(event.conv)
                return
            if members is not None:
                members.difference_update(event.users)
            self.state.drop_own_sender_key(event.conv)
        elif event.action in ("created", "added") and members is not None:
            members.update(event.users)

    # -- receiving -----------------------------------------------------------

    def open(self, m: Message) -> list[Message]:
        """The messages ``m`` (a ciphertext, released in seq order) makes
        readable, in their conversations' seq order: itself; or none (a
        control message, a duplicate, one held for its sender key or after a
        failure, or one waiting behind such a message of its conversation);
        plus what it unblocked (a sender key or a resend came). State writes
        join the open transaction, committed with the conversation's cursor."""
        shown: list[Message] = []
        for message in self._open(m, shown):
            if self._held_up(message.conv):
                self._hold_behind(message)
            else:
                shown.append(message)
        return shown

    def _open(self, m: Message, unblocked: list[Message]) -> list[Message]:
        try:
            envelope = _decode_envelope(m.body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self._failed(m, "malformed envelope", retry=False)
            return []
        if envelope.kind == "s":
            return self._open_direct(m, envelope, unblocked)
        if envelope.kind == "g":
            return self._open_group(m, envelope)
        self._failed(m, f"unknown envelope kind {envelope.kind!r}", retry=False)
        return []

    def _open_direct(self, m: Message, envelope: Envelope, unblocked: list[Message]) -> list[Message]:
        session: Session | None = None
        try:
            plaintext = None
            error: E2eeError | None = None
            for candidate in self._sessions_with(m.sender):
                try:
                    plaintext = candidate.decrypt(envelope.data)  # unchanged if it fails
                except DuplicateMessage:
                    raise
                except E2eeError as exc:
                    error = error or exc
                    continue
                session = candidate
                break
            if plaintext is None:
                if not Session.is_prekey_message(envelope.data):
                    raise error or E2eeError("no session with the sender")
                session, plaintext = Session.respond(self.keys, m.sender, envelope.data)
                self.state.save_e2ee_local_keys(self.keys.to_bytes())  # its one-time keys are used up
                # They have keys now: what waits for them goes without another poll.
                if self._blocked.pop(m.sender, None) is not None:
                    self.wake()
                self._see_identity(m.sender, session.remote_identity)
        except DuplicateMessage:
            return []
        except E2eeError as exc:
            self._failed(m, f"{type(exc).__name__}: {exc}", retry=True)
            return []
        assert session is not None
        self._save_session(m.sender, session)
        content = self._content(m, plaintext)
        if content is None:
            return []
        if content.kind == "msg":
            return [self._message(m, content)]
        self.client._emit(ProtocolMessage(m.conv, m.seq, m.sender, outgoing=False))
        if content.kind == "skdm":
            self._on_skdm(m.sender, content, unblocked)
        elif content.kind == "retry":
            self._on_retry(m.sender, content)
        elif content.kind == "resend":
            self._on_resend(m.sender, content, unblocked)
        return []

    def _open_group(self, m: Message, envelope: Envelope) -> list[Message]:
        """[the message], or [] with it held (no sender key yet), failed or a duplicate."""
        record = self._sender_key(m.conv, m.sender, envelope.dist)
        if record is None:
            self.state.hold(m.conv, m.seq, m.id, m.sender, m.body, m.ts, HELD_NO_KEY)
            with contextlib.suppress(RuntimeError):  # no loop: swept on the next connect
                asyncio.get_running_loop().call_later(HOLD_GRACE, self._sweep_held)
            return []
        try:
            plaintext = record.decrypt(envelope.data)
        except DuplicateMessage:
            return []
        except E2eeError as exc:
            self._failed(m, f"{type(exc).__name__}: {exc}", retry=True)
            return []
        self._save_sender_key(m.conv, m.sender, envelope.dist, record)
        content = self._content(m, plaintext)
        if content is None or content.kind != "msg":
            return []  # control messages travel pairwise only
        return [self._message(m, content)]

    def _content(self, m: Message, plaintext: bytes) -> Content | None:
        try:
            return _decode_content(plaintext)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self._failed(m, "malformed content", retry=False)
            return None

    @staticmethod
    def _message(m: Message, content: Content) -> Message:
        return Message(m.conv, m.seq, m.id, m.sender, content.ct, content.body, m.ts, encrypted=True)

    def _sender_key(self, conv: str, sender: str, dist: str) -> SenderKeyRecord | None:
        key = (conv, sender, dist)
        record = self._sender_keys.get(key)
        if record is None:
            raw = self.state.sender_key(conv, sender, dist)
            if raw is not None:
                record = self._sender_keys[key] = SenderKeyRecord.from_bytes(raw)
        return record

    def _save_sender_key(self, conv: str, sender: str, dist: str, record: SenderKeyRecord) -> None:
        self._sender_keys[(conv, sender, dist)] = record
        self.state.save_sender_key(conv, sender, dist, record.to_bytes())

    # -- held messages: a conversation is shown in seq order ---------------------
    #
    # A message that cannot be read yet (no sender key, or it failed and a
    # retry request went out) holds up the later messages of its conversation,
    # which wait (decrypted, in the state) behind it, so the user sees the
    # conversation in order. It is released when its key or its resend comes,
    # or given up after GIVE_UP (a late resend is then shown when it comes).

    def _held_up(self, conv: str) -> bool:
        return self.state.held_blocking(conv)

    def hold_membership(self, event: Membership) -> bool:
        """Hold a group's membership event behind a message of that group still
        unreadable (no sender key yet, or a retry out): the user sees the
        group in seq order. False when nothing holds the group up: show it."""
        if not self._held_up(event.conv):
            return False
        held = Message(event.conv, event.seq, "", f.SYSTEM_SENDER, f.MEMBERSHIP_CT, event.to_body(), event.ts)
        self._hold_behind(held)
        return True

    def _hold_behind(self, message: Message) -> None:
        body = _encode(Content("msg", message.ct, message.body))
        self.state.hold(message.conv, message.seq, message.id, message.sender, body, message.ts, HELD_BEHIND)

    def _flush(self, conv: str, out: list[Message]) -> None:
        """What waits in ``conv`` up to the first message still unreadable, into ``out``."""
        now_ms = int(self.wall_clock() * 1000)
        for _c, seq, mid, sender, body, ts, reason, retried in self.state.held(conv):
            m = Message(conv, seq, mid, sender, E2EE_CT, body, ts)
            if reason == HELD_BEHIND:
                self.state.unhold(conv, seq)
                out.append(self._message(m, _decode_content(body)))
            elif reason == HELD_GAVE_UP:
                continue
            elif reason == HELD_NO_KEY:
                envelope = _decode_envelope(body)
                if self._sender_key(conv, sender, envelope.dist) is None:
                    if not (retried and now_ms - retried > GIVE_UP * 1000):
                        return
                    self.state.set_held_reason(conv, seq, HELD_GAVE_UP)
                    continue
                self.state.unhold(conv, seq)
                opened = self._open_group(m, envelope)
                if not opened and self.state.held_by_id(conv, mid, sender) is not None:
                    return  # failed now: held again, as the head
                out.extend(opened)
            elif reason == HELD_FAILED:
                if not (retried and now_ms - retried > GIVE_UP * 1000):
                    return
                self.state.set_held_reason(conv, seq, HELD_GAVE_UP)

    def _on_skdm(self, sender: str, content: Content, unblocked: list[Message]) -> None:
        if not is_group(content.conv):
            return
        try:
            record = SenderKeyRecord.from_distribution(content.body)
        except E2eeError:
            return
        dist = record.distribution_id.hex
        if self._sender_key(content.conv, sender, dist) is None:
            self._save_sender_key(content.conv, sender, dist, record)
        self._flush(content.conv, unblocked)

    def _on_retry(self, requester: str, content: Content) -> None:
        """``requester`` could not read our message ``content.id``: send it again,
        from our local copy, in the session their request just started."""
        me = self.client.user or ""
        if is_group(content.conv):
            own = self.state.own_sender_key(content.conv)
            members = self._members.get(content.conv)
            if own is not None and (members is None or requester in members):
                self.queue_control(requester, Content("skdm", body=own[1], conv=content.conv))
        copy = self.state.sent_copy(content.conv, content.id, me)
        if copy is not None:
            self.queue_control(requester, Content("resend", copy[0], copy[1], content.conv, content.id))

    def _on_resend(self, sender: str, content: Content, unblocked: list[Message]) -> None:
        held = self.state.held_by_id(content.conv, content.id, sender)
        if held is None:
            return  # read meanwhile (its sender key came) or a duplicate
        seq, ts, reason = held
        self.state.unhold(content.conv, seq)
        late = Message(content.conv, seq, content.id, sender, content.ct, content.body, ts, encrypted=True)
        if reason == HELD_GAVE_UP:
            unblocked.append(late)  # given up waiting for it: shown now, late
            return
        self._hold_behind(late)  # in its place; shown with what follows it
        self._flush(content.conv, unblocked)

    def _failed(self, m: Message, reason: str, *, retry: bool) -> None:
        self.decryption_failures += 1
        self.state.hold(m.conv, m.seq, m.id, m.sender, m.body, m.ts, HELD_FAILED if retry else HELD_GAVE_UP)
        self.client._emit(DecryptionFailed(m.conv, m.seq, m.id, m.sender, reason))
        if retry:
            # The retry request goes in a fresh session (the current one may
            # be what broke); the sender answers in it.
            self._renew.add(m.sender)
            self._request_retry(m.conv, m.seq, m.id, m.sender)

    def _request_retry(self, conv: str, seq: int, message_id: str, sender: str) -> bool:
        now = time.monotonic()
        times = self._retry_times.setdefault(sender, deque())
        while times and now - times[0] > 60.0:
            times.popleft()
        if len(times) >= RETRIES_PER_MINUTE:
            return False
        times.append(now)
        self.state.mark_held_retried(conv, seq, int(self.wall_clock() * 1000))
        self.queue_control(sender, Content("retry", conv=conv, id=message_id))
        return True

    def _sweep_held(self) -> None:
        """Held messages whose sender key did not come in time, and failed ones
        whose retry request was rate-limited: ask their senders (again); and
        conversations held up past GIVE_UP move on."""
        if not self.client.connected:
            return  # the next connect sweeps
        cutoff = int((self.wall_clock() - HOLD_GRACE) * 1000)
        convs: set[str] = set()
        for conv, seq, mid, sender, _body, ts, reason, retried in self.state.held():
            if reason in (HELD_NO_KEY, HELD_FAILED) and not retried and ts <= cutoff:
                self._request_retry(conv, seq, mid, sender)
            convs.add(conv)
        released: list[Message] = []
        for conv in convs:
            self._flush(conv, released)
        self.client._show(released)
        self.state.commit()
        if self.state.held():
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_later(HOLD_GRACE, self._sweep_held)


def _is_connection_error(exc: BaseException | None) -> bool:
    from roost.client.client import ConnectionLost

    return isinstance(exc, ConnectionLost | asyncio.TimeoutError | ConnectionError)
