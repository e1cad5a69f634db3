"""A WebSocket connection's outgoing side: a bounded queue and one writer task.

``push`` never blocks the caller (the chat service calls it from commit
callbacks). Frames queue here in push order and a per-connection task writes
them out. A reader that cannot keep up makes the queue grow; past
``max_queued_bytes`` the socket is closed as a slow consumer, which bounds
server memory per connection. Nothing is lost by that: messages that were not
acked are still in the user's inbox and are delivered on reconnect.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from aiohttp import WSMsgType, web

from roost.protocol.errors import CloseCode

log = logging.getLogger("roost.gateway")

CLOSE_TIMEOUT = 2.0  # seconds a peer gets to take our close frame before we abort


class Connection:
    __slots__ = (
        "_close_code",
        "_close_reason",
        "_closed",
        "_queue",
        "_queued_bytes",
        "_transport",
        "_wakeup",
        "_writer",
        "max_queued_bytes",
        "ws",
    )

    def __init__(
        self, ws: web.WebSocketResponse, max_queued_bytes: int, transport: asyncio.BaseTransport | None = None
    ) -> None:
        self.ws = ws
        self._transport = transport
        self.max_queued_bytes = max_queued_bytes
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._wakeup = asyncio.Event()
        self._closed = False
        self._close_code: int | None = None
        self._close_reason = ""
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    @property
    def closed(self) -> bool:
        return self._closed

    def push(self, frame: bytes) -> None:
        if self._closed:
            return
        self._queue.append(frame)
        self._queued_bytes += len(frame)
        if self._queued_bytes > self.max_queued_bytes:
            log.warning("closing slow consumer (%d bytes queued)", self._queued_bytes)
            self._queue.clear()
            self._queued_bytes = 0
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer: reconnect to resume")
            # The writer may be stuck waiting for the peer to read: stop it, so
            # the close (or an abort) happens now, not when the peer wakes up.
            self._writer.cancel()
            return
        self._wakeup.set()

    def close(self, code: int, reason: str) -> None:
        """Close after the frames already queued are written."""
        if self._closed:
            return
        self._closed = True
        self._close_code = code
        self._close_reason = reason
        self._wakeup.set()

    async def _write_loop(self) -> None:
        ws = self.ws
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                while self._queue:
                    frame = self._queue.popleft()
                    self._queued_bytes -= len(frame)
                    await ws.send_frame(frame, WSMsgType.TEXT)
                if self._closed:
                    break
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            # Peer went away; the inbox keeps whatever it did not ack.
            self._closed = True
        finally:
            self._queue.clear()
            if self._close_code is not None and not ws.closed:
                await self._close_or_abort()

    async def _close_or_abort(self) -> None:
        assert self._close_code is not None
        try:
            await asyncio.wait_for(
                self.ws.close(code=self._close_code, message=self._close_reason.encode()), CLOSE_TIMEOUT
            )
        except (Exception, asyncio.CancelledError):
            # The peer does not even take a close frame: drop the TCP connection.
            if self._transport is not None:
                self._transport.abort()

    async def finish(self, timeout: float = 2.0) -> None:
        """Flush and stop the writer (the socket is gone or closing)."""
        self._closed = True
        self._wakeup.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._writer), timeout)
        except (TimeoutError, asyncio.CancelledError):
            self._writer.cancel()
