"""One connected device: its delivery cursor, its inbox drains, its outbox sink.

The session turns the pure ``DeliveryCursor`` decisions into effects: frames
pushed to the gateway's ``Sink`` and inbox pages read from the store. It never
waits on the socket: ``Sink.push`` queues, and the gateway closes a socket
whose queue grows past its limit (its undelivered messages stay in the inbox).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Protocol

from roost.core.delivery import DeliveryCursor, DrainRequest
from roost.core.metrics import Metrics
from roost.core.ratelimit import TokenBucket
from roost.protocol.codec import encode
from roost.protocol.errors import CloseCode, ProtocolError
from roost.protocol.frames import MemberMarks, Receipt
from roost.registry.memory import deliver_frame
from roost.store.base import DrainPage, ReceiptState, SendStream, StoredMessage, StoreUnavailable

if TYPE_CHECKING:
    from roost.store.base import Store

log = logging.getLogger("roost.session")

DRAIN_RETRY_SECONDS = 1.0
# Conversations read per inbox read: a device back after a while owes many
# conversations a few messages each, and one read per conversation made the
# drain a round trip per conversation.
DRAIN_BATCH = 32


class Sink(Protocol):
    """The gateway side of a session: a socket's outgoing queue."""

    def push(self, frame: bytes) -> None: ...
    def close(self, code: int, reason: str) -> None: ...
    @property
    def closed(self) -> bool: ...


def receipt_frame(receipt: ReceiptState) -> bytes:
    return encode(
        Receipt(
            conv=receipt.conv,
            rv=receipt.rv,
            marks={u: MemberMarks(d, r) for u, (d, r) in receipt.marks.items()},
            all_delivered=receipt.all_delivered,
            all_read=receipt.all_read,
        )
    )


class Session:
    # One per connected device: no per-instance __dict__.
    __slots__ = (
        "_drain_task",
        "_typing_limiter",
        "active",
        "client",
        "cursor",
        "keys_work",
        "limiter",
        "metrics",
        "send_stream",
        "sink",
        "store",
        "user",
    )

    def __init__(
        self,
        user: str,
        sink: Sink,
        store: Store,
        window: int,
        rate: float,
        burst: float,
        client: str = "",
        metrics: Metrics | None = None,
    ) -> None:
        self.user = user
        self.metrics = metrics
        self.client = client  # the auth frame's client run id ("" if not given)
        self.sink = sink
        self.store = store
        self.cursor = DeliveryCursor(window)
        self.limiter = TokenBucket(rate, burst, time.monotonic()) if rate > 0 else None
        self._typing_limiter: TokenBucket | None = None  # made on the first typing frame
        self._drain_task: asyncio.Task[None] | None = None
        self.send_stream = SendStream()
        # The last key-directory request of this connection still running:
        # key frames are answered in the order they came (roost.service.keys).
        self.keys_work: asyncio.Future[None] | None = None
        self.active = True

    def typing_throttled(self, now: float) -> bool:
        """True: drop this typing frame (more than 2 a second, bursts of 5)."""
        if self._typing_limiter is None:
            self._typing_limiter = TokenBucket(2.0, 5.0, now)
        return self._typing_limiter.take(now) > 0

    # -- called by the registry --------------------------------------------

    def offer(self, message: StoredMessage, frame: bytes) -> None:
        if not self.active:
            return
        own = message.sender == self.user
        if self.cursor.offer(message.conv, message.seq, own, len(frame)):
            self.sink.push(frame)
            if self.metrics is not None:
                self.metrics.delivered_push.inc()
        else:
            self.kick()

    def push_receipt(self, receipt: ReceiptState) -> None:
        if self.active:
            self.sink.push(receipt_frame(receipt))

    def push_frame(self, frame: bytes) -> None:
        if self.active:
            self.sink.push(frame)

    def replaced(self, by_same_client: bool = False) -> None:
        """Another connection of the same user took over: one of this same
        client run (e.g. an attempt it gave up on, authenticated late), which
        it may take back by reconnecting, or another device's."""
        self.stop()
        if by_same_client:
            self.sink.close(CloseCode.SUPERSEDED, "superseded by a newer connection of this client")
        else:
            self.sink.close(CloseCode.REPLACED, "replaced by a newer connection of this user")

    def revoked(self, reason: str) -> None:
        """The account's token was reset, or the account disabled or removed."""
        self.stop()
        self.sink.close(CloseCode.REVOKED, reason)

    # -- called by the chat service ----------------------------------------

    def acked(self, conv: str, seq: int) -> None:
        self.cursor.ack(conv, seq)
        self.kick()

    def load_inbox(self, entries: list[tuple[str, int]]) -> None:
        for conv, delivered in entries:
            self.cursor.load(conv, delivered)
        self.kick()

    def kick(self) -> None:
        """Run inbox drains if any are due and none is running."""
        if not self.active or (self._drain_task is not None and not self._drain_task.done()):
            return
        if self.cursor.pending_drains == 0:
            return
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    def stop(self) -> None:
        self.active = False
        if self._drain_task is not None:
            self._drain_task.cancel()

    async def _drain(self) -> None:
        while self.active:
            requests = self.cursor.next_drains(DRAIN_BATCH)
            if not requests:
                return
            # The free window is the same for every request of the batch.
            budget = requests[0].limit
            try:
                pages = await self.store.read_inboxes(self.user, requests, budget)
            except Exception as exc:
                # StoreUnavailable, or a bug: either way the messages stay in
                # the store and are read again, at a calm pace.
                if isinstance(exc, StoreUnavailable):
                    log.warning("inbox read failed for %s: %s", self.user, exc)
                else:
                    log.exception("inbox read failed for %s", self.user)
                for request in requests:
                    self.cursor.drain_failed(request.conv)
                await asyncio.sleep(DRAIN_RETRY_SECONDS)
                continue
            if not self.active:
                return
            # Requests the budget left unread go back in the queue first, so
            # the conversation that took the budget (queued again by
            # ``drained`` if it owes more) waits behind them: oldest first.
            for request in requests[len(pages) :]:
                self.cursor.drain_failed(request.conv)
            for request, page in zip(requests, pages, strict=False):
                self._push_page(request, page)

    def _push_page(self, request: DrainRequest, page: DrainPage | ProtocolError) -> None:
        if isinstance(page, ProtocolError):  # e.g. no longer a member: nothing to drain there
            log.info("inbox read refused for %s in %s: %s", self.user, request.conv, page)
            self.cursor.drained(request.conv, request.after or 0, [], 0, 0)
            return
        frames = {m.seq: deliver_frame(m) for m in page.messages}
        to_push = self.cursor.drained(
            page.conv,
            page.start,
            list(frames),
            page.scanned_to,
            page.last_seq,
            [len(frame) for frame in frames.values()],
        )
        for seq in to_push:
            self.sink.push(frames[seq])
        if to_push and self.metrics is not None:
            self.metrics.delivered_inbox.inc(len(to_push))
