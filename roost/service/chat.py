"""The chat service: the delivery logic between the gateway and the store.

For every message it does the one thing the design repeats forever:
persist (durable commit), then look the recipients up in the registry, then
push to the connected ones. Recipients that are not connected, or whose push
does not get through, find the message in their inbox on the next drain.

Ordering of effects matters and is deliberate:

* ``Store.append`` is called synchronously while the frame is handled, so a
  sender's messages are committed in the order they arrived on its socket;
* the ✓ (``ack``) and the fan-out of one message happen in one callback after
  the commit, in commit order, so a client never sees a later message pushed
  before the ack of its own earlier one;
* a session is registered before its inbox is read, so a message committed
  meanwhile is either offered to the session or found by the read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from roost.core.ids import is_group_id, new_group_id
from roost.core.metrics import Metrics, frame_type
from roost.core.presence import PresenceTracker
from roost.core.ratelimit import TokenBucket
from roost.core.tokens import hash_token
from roost.protocol import frames as f
from roost.protocol.codec import decode_client, encode
from roost.protocol.errors import CloseCode, ErrorCode, ProtocolError
from roost.registry.base import Registry
from roost.service.keys import KeyDirectory, KeyLimits
from roost.service.media import MediaService
from roost.service.session import Session, Sink, receipt_frame
from roost.store.base import (
    GroupSnapshot,
    InboxEntry,
    MarkResult,
    ReceiptState,
    Store,
    StoredMessage,
    StoreUnavailable,
)

log = logging.getLogger("roost.chat")


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(slots=True)
class ServiceConfig:
    window: int = 128  # messages in flight to one device before drains wait for acks
    max_group_members: int = 1024
    rate: float = 500.0  # frames per second per connection (0: unlimited)
    burst: float = 1000.0
    presence_debounce: float = 3.0
    keys: KeyLimits = field(default_factory=KeyLimits)


def _log_last_seen_failure(fut: asyncio.Future[None]) -> None:
    # Last-seen is best effort (presence, not a message): a store outage costs
    # a stale "last seen", which the next disconnect corrects.
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("last-seen not saved: %s", fut.exception())


MEDIA_FRAMES = (f.BlobNew, f.BlobPutUrls, f.BlobStatus, f.BlobComplete, f.BlobGet)


def _no_media(session: Session, frame: Any) -> None:
    raise ProtocolError(ErrorCode.INVALID, "media is not enabled on this server")


def error_frame(exc: ProtocolError, ref: str = "") -> bytes:
    return encode(f.Error(code=exc.code.value, message=exc.message, ref=exc.ref or ref))


UNAVAILABLE = ErrorCode.UNAVAILABLE
UNCHARGED = (f.DeliveryAck, f.ReadMarker, f.ReceiptAck, f.Ping)
MARK_RETRY_SECONDS = 1.0
PENDING_RECEIPT_TRIES = 5  # then the senders learn on their next reconnect
RECEIPT_SENDERS_WINDOW = 64  # messages looked at to find who a lost mark commit owed a receipt
RESYNC_RETRY_SECONDS = 1.0
# How long a revocation is remembered for connections whose token check was
# already under way (a check takes milliseconds; a stalled store, seconds).
REVOKED_MEMORY_SECONDS = 60.0


class ChatService:
    def __init__(
        self,
        store: Store,
        registry: Registry,
        config: ServiceConfig,
        metrics: Metrics | None = None,
        media: MediaService | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics or Metrics()
        self.registry = registry
        self.config = config
        self.presence = PresenceTracker(config.presence_debounce)
        self._presence_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Future[Any]] = set()
        # user -> when (monotonic) its token was last revoked: a connection
        # whose token was checked before that is closed once it registers.
        self._revoked: dict[str, float] = {}
        self.keys = KeyDirectory(store, registry, config.keys, self._spawn)
        self._handlers: dict[type, Callable[[Session, Any], None]] = {
            f.Send: self._on_send,
            f.DeliveryAck: self._on_dack,
            f.ReadMarker: self._on_read,
            f.ReceiptAck: self._on_rack,
            f.PresenceSubscribe: self._on_presence_sub,
            f.PresenceUnsubscribe: self._on_presence_unsub,
            f.Typing: self._on_typing,
            f.GroupCreate: self._on_group_create,
            f.GroupAdd: self._on_group_add,
            f.GroupRemove: self._on_group_remove,
            f.GroupLeave: self._on_group_leave,
            f.GroupInfo: self._on_group_info,
            f.HistoryRequest: self._on_history,
            f.SyncRequest: self._on_sync,
            f.Ping: self._on_ping,
            f.KeysPut: self.keys.on_put,
            f.KeysCount: self.keys.on_count,
            f.KeysGet: self.keys.on_get,
        }
        # The blob_* frames (roost/service/media.py): off the message path.
        self.media = media
        for frame_type_ in MEDIA_FRAMES:
            self._handlers[frame_type_] = _no_media
        if media is not None:
            self._handlers.update(media.handlers())
        # Label children resolved once: labels() per frame would cost ~1.9 µs.
        frames_in = self.metrics.frames_in
        self._frame_counters = {
            cls: self.metrics.loop_counter(frames_in.labels(frame_type(cls))) for cls in self._handlers
        }
        self._invalid_frames = self.metrics.loop_counter(frames_in.labels("invalid"))
        self.metrics.inbox_drains_pending.set_function(self._drains_pending)

    def _drains_pending(self) -> int:
        """Inbox backlog of this gateway's devices (scrape time, O(sessions))."""
        return sum(s.cursor.pending_drains for s in self.registry.sessions() if isinstance(s, Session))

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        self._presence_task = asyncio.get_running_loop().create_task(self._presence_loop())
        self.registry.on_recovered = self.resync_all
        if hasattr(self.registry, "on_revoked"):  # cluster: revocations from the admin CLI
            self.registry.on_revoked = self.revoke_local

    def resync_all(self, users: Collection[str] | None = None) -> None:
        """Pushes may have been lost (the router was down, or these users'
        routes were): those local sessions re-read their inbox, a few at a time."""
        # This service registers only Sessions; the registry knows them as SessionHandles.
        sessions = [
            s
            for s in self.registry.sessions()
            if isinstance(s, Session) and (users is None or s.user in users)
        ]
        log.info("re-reading the inbox of %d sessions", len(sessions))
        self._spawn(self._resync_many(sessions))

    async def _resync_many(self, sessions: list[Session]) -> None:
        limit = asyncio.Semaphore(16)

        async def one(session: Session) -> None:
            async with limit:
                if session.active and not await self._resync(session):
                    self._spawn(self._resync_until_done(session))

        await asyncio.gather(*(one(s) for s in sessions), return_exceptions=True)

    async def stop(self) -> None:
        if self._presence_task is not None:
            self._presence_task.cancel()
        # Last-seen of everyone still connected, so it survives the restart.
        ts = int(time.time())
        for session in self.registry.sessions():
            self.store.set_last_seen(session.user, ts).add_done_callback(_log_last_seen_failure)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        self.keys.stop()
        if self.media is not None:
            await self.media.stop()

    def _spawn(self, awaitable: Any) -> None:
        fut = asyncio.ensure_future(awaitable)
        self._background.add(fut)
        fut.add_done_callback(self._background.discard)

    # -- connections -------------------------------------------------------

    async def authenticate(self, token: str) -> str | None:
        return await self.store.user_by_token(hash_token(token))

    async def connect(
        self,
        user: str,
        sink: Sink,
        client: str = "",
        authenticated_at: float | None = None,
        e2ee: bool = False,
    ) -> Session:
        """``authenticated_at``: ``time.monotonic()`` when its token check began;
        ``e2ee``: the client keeps end-to-end keys (its auth frame said so)."""
        session = Session(
            user,
            sink,
            self.store,
            self.config.window,
            self.config.rate,
            self.config.burst,
            client,
            self.metrics,
        )
        # Register first: from here on, new messages are offered to this session.
        previous = self.registry.attach(session)
        if previous is not None:
            previous.replaced(bool(client) and previous.client == client)
        revoked = self._revoked.get(user)
        if revoked is not None and authenticated_at is not None and revoked >= authenticated_at:
            # The token was revoked while it was being checked: the revocation
            # found no session to close then, so this one closes now.
            session.revoked("token revoked")
        change = self.presence.connected(user)
        if change is not None:
            self.registry.announce(change)
        # In a cluster the registration must be visible to the other gateways
        # before the inbox read, or their pushes could miss this session.
        await self.registry.flush()
        # Then read the inbox: whatever was committed before registering is there.
        # The same read brings the pending receipts and the key stock.
        if not await self._resync(session, e2ee):
            log.warning("inbox unavailable at connect of %s; retrying", user)
            self._spawn(self._resync_until_done(session))
            # After the inbox: a device with few or no one-time keys is told to upload.
            self._spawn(self.keys.after_connect(session, e2ee))
        return session

    def disconnect(self, session: Session) -> None:
        session.stop()
        if self.registry.detach(session):
            self.presence.disconnected(session.user, time.time())
            fut = self.store.set_last_seen(session.user, int(time.time()))
            fut.add_done_callback(_log_last_seen_failure)

    # -- account administration (the Notifier of roost.service.admin) -------

    def revoke_local(self, user: str, reason: str) -> None:
        """Close ``user``'s connection to this gateway, if any (4008)."""
        now = time.monotonic()
        self._revoked = {u: t for u, t in self._revoked.items() if now - t < REVOKED_MEMORY_SECONDS}
        self._revoked[user] = now
        for session in self.registry.sessions():
            if session.user == user:
                session.revoked(reason)

    async def revoke(self, user: str, reason: str) -> None:
        self.revoke_local(user, reason)

    async def changed(self, snapshots: list[GroupSnapshot]) -> None:
        for snap in snapshots:
            self._deliver_change(snap)

    async def online(self, users: list[str]) -> set[str] | None:
        return await self.registry.fetch_online(users)

    # -- frames ------------------------------------------------------------

    def handle(self, session: Session, data: bytes | str) -> float:
        """Handle one client frame. Never raises: refusals become error frames.

        Returns how long the gateway should pause reading this connection
        (its rate limit); acks and pings are not charged, they only ever
        shrink the server's work.
        """
        ref = ""
        try:
            try:
                frame = decode_client(data)
            except ProtocolError:
                self._invalid_frames.inc()
                raise
            ref = getattr(frame, "id", "") or getattr(frame, "ref", "")
            handler = self._handlers.get(type(frame))
            if handler is None:
                self._invalid_frames.inc()
                raise ProtocolError(ErrorCode.INVALID, "already authenticated")
            self._frame_counters[type(frame)].inc()
            handler(session, frame)
            if session.limiter is None or type(frame) in UNCHARGED:
                return 0.0
            return self._charge(session.limiter)
        except ProtocolError as exc:
            session.push_frame(error_frame(exc, ref))
        except StoreUnavailable as exc:
            session.push_frame(error_frame(ProtocolError(UNAVAILABLE, str(exc)), ref))
        except Exception:
            log.exception("frame from %s failed", session.user)
            session.push_frame(error_frame(ProtocolError(ErrorCode.INTERNAL, "internal error"), ref))
        if session.limiter is not None:
            return self._charge(session.limiter)  # refusals cost too
        return 0.0

    def _charge(self, limiter: TokenBucket) -> float:
        pause = limiter.charge(time.monotonic())
        if pause:
            self.metrics.rate_limited.inc()
        return pause

    def _settle(self, session: Session, ref: str, fut: asyncio.Future[Any]) -> Any | None:
        """The result of a store future, or None after pushing its error frame."""
        if fut.cancelled():
            return None
        exc = fut.exception()
        if exc is None:
            return fut.result()
        if isinstance(exc, ProtocolError):
            session.push_frame(error_frame(exc, ref))
        elif isinstance(exc, StoreUnavailable):
            session.push_frame(error_frame(ProtocolError(UNAVAILABLE, str(exc)), ref))
        else:
            log.error("store operation failed", exc_info=exc)
            session.push_frame(error_frame(ProtocolError(ErrorCode.INTERNAL, "internal error"), ref))
        return None

    # -- send --------------------------------------------------------------

    def _on_send(self, session: Session, frame: f.Send) -> None:
        if (frame.to is None) == (frame.conv is None):
            raise ProtocolError(ErrorCode.BAD_FRAME, "give exactly one of 'to' and 'conv'", frame.id)
        if frame.ct != f.E2EE_CT:
            raise ProtocolError(
                ErrorCode.ENCRYPTION_REQUIRED,
                f"messages must be end-to-end encrypted (ct {f.E2EE_CT}), not {frame.ct}",
                frame.id,
            )
        fut = self.store.append(
            session.user,
            frame.id,
            frame.ct,
            frame.body,
            now_ms(),
            to=frame.to,
            conv=frame.conv,
            stream=session.send_stream,
        )
        fut.add_done_callback(partial(self._sent, session, frame.id, time.perf_counter()))

    def _sent(
        self, session: Session, client_id: str, received: float, fut: asyncio.Future[StoredMessage]
    ) -> None:
        if not fut.cancelled() and isinstance(fut.exception(), StoreUnavailable):
            # Later sends of this connection may already be queued behind this
            # one; the store refuses them too (same stream), and the client
            # resends all of them, in order, after reconnecting.
            session.push_frame(error_frame(ProtocolError(UNAVAILABLE, str(fut.exception())), client_id))
            session.sink.close(CloseCode.STORE_FAILED, "store unavailable; reconnect and resend")
            return
        stored = self._settle(session, client_id, fut)
        if stored is None:
            return
        # ✓ only now: the commit is on disk.
        session.push_frame(
            encode(
                f.SendAck(
                    id=stored.client_id,
                    conv=stored.conv,
                    seq=stored.seq,
                    ts=stored.ts,
                    duplicate=stored.duplicate,
                )
            )
        )
        self.metrics.send_ack_seconds.observe(time.perf_counter() - received)
        if not stored.duplicate:
            self.metrics.messages_committed.inc()
        # A duplicate is fanned out too: its first commit may have lost its
        # answer (store or gateway died after COMMIT), and then nothing pushed
        # it. Devices that already hold it drop the repeat by seq.
        self._fan_out(stored, (*stored.recipients, stored.sender))

    def _fan_out(self, stored: StoredMessage, users: tuple[str, ...]) -> None:
        # Persisted first, looked up now: a recipient that is not registered
        # here will read the message from its inbox when it connects.
        self.registry.push_message(stored, users)

    # -- marks and receipts ------------------------------------------------

    def _on_dack(self, session: Session, frame: f.DeliveryAck) -> None:
        self._mark(session, frame.conv, frame.seq, None)

    def _on_read(self, session: Session, frame: f.ReadMarker) -> None:
        self._mark(session, frame.conv, None, frame.seq)

    def _mark(
        self, session: Session, conv: str, delivered: int | None, read: int | None, retry: bool = False
    ) -> None:
        fut = self.store.advance_marks(session.user, conv, delivered, read)
        fut.add_done_callback(partial(self._marked, session, conv, delivered, read, retry))

    def _marked(
        self,
        session: Session,
        conv: str,
        delivered: int | None,
        read: int | None,
        retry: bool,
        fut: asyncio.Future[MarkResult],
    ) -> None:
        if not fut.cancelled() and isinstance(fut.exception(), StoreUnavailable):
            # The device does hold these messages, so its window is freed now,
            # and the cumulative mark is retried until the store takes it
            # (otherwise the device would wait for pushes that never come).
            session.acked(conv, max(delivered or 0, read or 0))
            if session.active:
                asyncio.get_running_loop().call_later(
                    MARK_RETRY_SECONDS, self._mark, session, conv, delivered, read, True
                )
            return
        result = self._settle(session, "", fut)
        if result is None:
            return
        session.acked(conv, result.delivered)
        for receipt in result.receipts:
            self.registry.push_receipt(receipt)
        # Acks folded into one store operation share this result: push its
        # receipts once, not once per folded ack.
        result.receipts.clear()
        if retry:
            # The failed attempt may have committed and lost only its answer:
            # then this retry changed nothing, and the receipts that commit
            # left pending were never pushed (their senders would learn only
            # on their next reconnect). Push those of this conversation.
            self._spawn(self._push_pending_receipts(session.user, conv, max(delivered or 0, read or 0)))

    async def _push_pending_receipts(self, user: str, conv: str, upto: int) -> None:
        """Push the pending receipts in ``conv`` of whoever sent one of the
        last RECEIPT_SENDERS_WINDOW messages up to ``upto`` (the senders a lost
        mark commit can have owed a receipt: acks are cumulative and frequent),
        at a bounded cost: one history read, then one read per such sender."""
        for _ in range(PENDING_RECEIPT_TRIES):
            try:
                messages, _, _ = await self.store.history(user, conv, upto + 1, None, RECEIPT_SENDERS_WINDOW)
                senders = dict.fromkeys(m.sender for m in messages if m.sender not in (user, f.SYSTEM_SENDER))
                for sender in senders:
                    for receipt in await self.store.pending_receipts(sender):
                        if receipt.conv == conv:
                            self.registry.push_receipt(receipt)
                return
            except ProtocolError:
                return  # no longer a member: nothing of this conversation to tell
            except StoreUnavailable:
                await asyncio.sleep(MARK_RETRY_SECONDS)

    def _on_rack(self, session: Session, frame: f.ReceiptAck) -> None:
        fut = self.store.ack_receipts(session.user, frame.conv, frame.rv)
        fut.add_done_callback(partial(self._settle, session, ""))

    # -- presence and typing -----------------------------------------------

    def _on_presence_sub(self, session: Session, frame: f.PresenceSubscribe) -> None:
        users = [u for u in dict.fromkeys(frame.users) if u != session.user]
        self.registry.subscribe(session, users)
        self._spawn(self._send_presence_state(session, users))

    async def _send_presence_state(self, session: Session, users: list[str]) -> None:
        # Asked after the watch is registered: a change after this answer is
        # announced, one before it is in the answer.
        anywhere = await self.registry.fetch_online(users)
        online = {u for u in users if u in anywhere or self.presence.is_online(u)}
        offline = [u for u in users if u not in online]
        try:
            seen = await self.store.last_seen(offline) if offline else {}
        except StoreUnavailable:
            seen = {}
        for user in users:
            if user in online:
                session.push_frame(encode(f.Presence(user=user, online=True)))
            elif user in seen:
                session.push_frame(encode(f.Presence(user=user, online=False, last_seen=seen[user])))

    def _on_presence_unsub(self, session: Session, frame: f.PresenceUnsubscribe) -> None:
        self.registry.unsubscribe(session, frame.users)

    async def _presence_loop(self) -> None:
        # Presence is not on the message path; a coarse tick is enough to
        # release debounced "offline" announcements.
        while True:
            await asyncio.sleep(min(1.0, self.presence.debounce / 2 or 1.0))
            for change in self.presence.due(time.time()):
                self.registry.announce(change)

    def _on_typing(self, session: Session, frame: f.Typing) -> None:
        if session.typing_throttled(time.monotonic()):
            return  # typing is ephemeral: excess is dropped silently
        self._spawn(self._relay_typing(session, frame))

    async def _relay_typing(self, session: Session, frame: f.Typing) -> None:
        try:
            members = await self.store.active_members(session.user, frame.conv)
        except ProtocolError as exc:
            session.push_frame(error_frame(exc))
            return
        except StoreUnavailable:
            return
        event = encode(f.TypingEvent(conv=frame.conv, user=session.user, active=frame.active))
        self.registry.push_frame((m for m in members if m != session.user), event)

    # -- groups ------------------------------------------------------------

    def _group_reply(self, session: Session, ref: str, fut: asyncio.Future[GroupSnapshot]) -> None:
        snap = self._settle(session, ref, fut)
        if snap is None:
            return
        session.push_frame(
            encode(
                f.GroupState(
                    group=snap.group,
                    name=snap.name,
                    members=snap.members,
                    admins=snap.admins,
                    last_seq=snap.last_seq,
                    ref=ref,
                )
            )
        )
        self._deliver_change(snap)

    def _deliver_change(self, snap: GroupSnapshot) -> None:
        """A membership change's event to the members, and the receipts it completed to their senders."""
        if snap.event is not None:
            self._fan_out(snap.event, snap.event.recipients)
        for receipt in snap.receipts:
            self.registry.push_receipt(receipt)

    def _check_group(self, group: str, ref: str) -> None:
        if not is_group_id(group):
            raise ProtocolError(ErrorCode.UNKNOWN_CONVERSATION, f"no group {group}", ref)

    def _on_group_create(self, session: Session, frame: f.GroupCreate) -> None:
        fut = self.store.create_group(
            session.user,
            new_group_id(),
            frame.name,
            frame.members,
            self.config.max_group_members,
            now_ms(),
        )
        fut.add_done_callback(partial(self._group_reply, session, frame.ref))

    def _on_group_add(self, session: Session, frame: f.GroupAdd) -> None:
        self._check_group(frame.group, frame.ref)
        fut = self.store.add_members(
            session.user, frame.group, frame.members, self.config.max_group_members, now_ms()
        )
        fut.add_done_callback(partial(self._group_reply, session, frame.ref))

    def _on_group_remove(self, session: Session, frame: f.GroupRemove) -> None:
        self._check_group(frame.group, frame.ref)
        fut = self.store.remove_members(session.user, frame.group, frame.members, now_ms())
        fut.add_done_callback(partial(self._group_reply, session, frame.ref))

    def _on_group_leave(self, session: Session, frame: f.GroupLeave) -> None:
        self._check_group(frame.group, frame.ref)
        fut = self.store.remove_members(session.user, frame.group, [session.user], now_ms())
        fut.add_done_callback(partial(self._group_reply, session, frame.ref))

    def _on_group_info(self, session: Session, frame: f.GroupInfo) -> None:
        self._check_group(frame.group, frame.ref)
        fut = asyncio.ensure_future(self.store.group_info(session.user, frame.group))
        fut.add_done_callback(partial(self._group_reply, session, frame.ref))

    # -- history, sync, ping -----------------------------------------------

    def _on_history(self, session: Session, frame: f.HistoryRequest) -> None:
        if frame.before is not None and frame.after is not None:
            raise ProtocolError(ErrorCode.BAD_FRAME, "give at most one of before/after", frame.ref)
        self._spawn(self._history(session, frame))

    async def _history(self, session: Session, frame: f.HistoryRequest) -> None:
        try:
            messages, first, last = await self.store.history(
                session.user, frame.conv, frame.before, frame.after, frame.limit
            )
        except ProtocolError as exc:
            session.push_frame(error_frame(exc, frame.ref))
            return
        except StoreUnavailable as exc:
            session.push_frame(error_frame(ProtocolError(UNAVAILABLE, str(exc)), frame.ref))
            return
        page = f.HistoryPage(
            conv=frame.conv,
            messages=[f.HistoryMessage(m.seq, m.client_id, m.sender, m.ct, m.body, m.ts) for m in messages],
            last_seq=last,
            first_seq=first,
            ref=frame.ref,
        )
        session.push_frame(encode(page))

    def _on_sync(self, session: Session, frame: f.SyncRequest) -> None:
        self._spawn(self._resync(session))

    async def _resync(self, session: Session, e2ee: bool | None = None) -> bool:
        """Offer the session its inbox and its pending receipts again.
        False when the store could not be read.

        At connect (``e2ee`` given: whether the device keeps end-to-end keys)
        one store read brings both and the key stock too, and a device whose
        one-time keys run low is told so after the inbox is loaded."""
        if e2ee is not None:
            try:
                state = await self.store.connect_state(session.user)
            except StoreUnavailable:
                return False
            self._load(session, state.inbox, state.receipts)
            self.keys.tell_if_low(session, e2ee, state.keys)
            return True
        # Both reads at once: one wait instead of two.
        entries, receipts = await asyncio.gather(
            self.store.inbox(session.user), self.store.pending_receipts(session.user), return_exceptions=True
        )
        # The first failure decides: an unavailable store is retried, anything else raised.
        if isinstance(entries, BaseException):
            if isinstance(entries, StoreUnavailable):
                return False
            raise entries
        if isinstance(receipts, BaseException):
            if isinstance(receipts, StoreUnavailable):
                return False
            raise receipts
        self._load(session, entries, receipts)
        return True

    @staticmethod
    def _load(session: Session, entries: list[InboxEntry], receipts: list[ReceiptState]) -> None:
        session.load_inbox([(e.conv, e.delivered) for e in entries])
        for receipt in receipts:  # the device keeps the highest marks: a repeat is harmless
            session.push_frame(receipt_frame(receipt))

    async def _resync_until_done(self, session: Session) -> None:
        # Nothing else would bring what waits in the inbox: the device only
        # gets new pushes until it reconnects.
        while session.active and not await self._resync(session):
            await asyncio.sleep(RESYNC_RETRY_SECONDS)

    def _on_ping(self, session: Session, frame: f.Ping) -> None:
        session.push_frame(encode(f.Pong(t=frame.t)))


__all__ = ["ChatService", "CloseCode", "ServiceConfig"]
