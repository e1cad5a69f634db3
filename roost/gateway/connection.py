"""A WebSocket connection's outgoing side: coalesced writes, bounded when the peer is slow.

``push`` never blocks the caller (the chat service calls it from commit
callbacks). Frames pushed during one event-loop pass are joined and written
to the socket with one ``transport.write`` at the end of the pass: no task,
future or syscall per frame, and a connection that is only idle costs no
task at all.

Only when the peer does not keep up (the transport already buffers more than
``HIGH_WATER`` bytes) do frames go to a queue drained by a writer task that
waits for the socket to drain. Past ``max_queued_bytes`` (queue plus transport
buffer) the socket is closed as a slow consumer, which bounds server memory
per connection. Nothing is lost by that: messages that were not acked are
still in the user's inbox and are delivered on reconnect.

Frames are framed here (server frames are never masked) and written to the
socket's transport directly; the WebSocket layer (picows, see
roost/gateway/websocket.py) is used for the close frame only.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from typing import Any

from roost.core.metrics import Metrics
from roost.protocol.errors import CloseCode

log = logging.getLogger("roost.gateway")

CLOSE_TIMEOUT = 2.0  # seconds a peer gets to take our close frame before we abort
# A writer waiting for the socket to drain looks again at least this often, in
# case the transport's resume_writing never comes (it was not paused for it).
DRAIN_POLL = 0.5
# RFC 6455 5.5: a control frame's payload is at most 125 bytes, 2 of them the code.
MAX_CLOSE_REASON = 123
# Above this many bytes waiting in the transport, frames queue here instead and
# a writer task feeds them as the socket drains (asyncio's own high-water mark).
HIGH_WATER = 64 * 1024

_TEXT_FIN = 0x81  # FIN + text opcode; server frames are never masked (RFC 6455 5.1)
_LEN16 = struct.Struct("!BBH").pack
_LEN64 = struct.Struct("!BBQ").pack


def text_frame_header(size: int) -> bytes:
    """The WebSocket header of an unmasked, uncompressed, final text frame."""
    if size < 126:
        return bytes((_TEXT_FIN, size))
    if size < 65536:
        return _LEN16(_TEXT_FIN, 126, size)
    return _LEN64(_TEXT_FIN, 127, size)


class Connection:
    """The outgoing side of one WebSocket.

    ``ws`` is picows' ``WSTransport`` of the socket (typed loosely: picows
    ships its types as a stub of a compiled module).
    """

    __slots__ = (
        "_batch",
        "_close_code",
        "_close_reason",
        "_closed",
        "_closer",
        "_drained",
        "_flush_scheduled",
        "_loop",
        "_metrics",
        "_queue",
        "_queued_bytes",
        "_transport",
        "_writer",
        "max_queued_bytes",
        "ws",
    )

    def __init__(self, ws: Any, max_queued_bytes: int, metrics: Metrics | None = None) -> None:
        self.ws = ws
        self._metrics = metrics
        self._transport: asyncio.Transport = ws.underlying_transport
        self.max_queued_bytes = max_queued_bytes
        self._loop = asyncio.get_running_loop()
        self._batch: list[bytes] = []  # frames pushed during this loop pass
        self._flush_scheduled = False
        self._queue: deque[bytes] | None = None  # only while the peer is slow
        self._queued_bytes = 0
        self._writer: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self._drained: asyncio.Future[None] | None = None  # the writer waits on it
        self._closed = False
        self._close_code: int | None = None
        self._close_reason = ""

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def close_code(self) -> int | None:
        """The code this server closed (or is closing) the socket with; None if it did not."""
        return self._close_code

    def push(self, frame: bytes) -> None:
        if self._closed:
            return
        if self._metrics is not None:
            self._metrics.frame_pushed(frame)
        if self._writer is not None:
            self._enqueue(frame)
            return
        self._batch.append(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def flush(self) -> None:
        """Write what was pushed in this pass now, not at its end (before a
        close frame that the WebSocket layer writes at once)."""
        self._flush()

    def _flush(self) -> None:
        """Write this pass's frames in one go, or queue them if the peer is behind."""
        self._flush_scheduled = False
        frames = self._batch
        if not frames:
            return
        self._batch = []
        if self._writer is not None:
            self._enqueue_all(frames)
            return
        transport = self._transport
        if transport.is_closing() or self.ws.is_close_frame_sent:
            return  # the peer is gone; the inbox keeps whatever it did not ack
        # Straight into the transport while it holds little; what does not fit
        # waits in the queue, so the transport never buffers much more than
        # HIGH_WATER (plus one frame) for a peer that does not read.
        room = HIGH_WATER - transport.get_write_buffer_size()
        parts: list[bytes] = []
        written = 0
        for frame in frames:
            if room <= 0:
                break
            parts.append(text_frame_header(len(frame)))
            parts.append(frame)
            room -= len(frame)
            written += 1
        if parts:
            transport.write(b"".join(parts))
        if written < len(frames):
            self._enqueue_all(frames[written:])

    def _enqueue_all(self, frames: list[bytes]) -> None:
        for frame in frames:
            if not self._enqueue(frame):
                return  # cut off as a slow consumer: the rest is dropped too

    def _enqueue(self, frame: bytes) -> bool:
        """Queue ``frame`` for the writer task; False if that cut the peer off."""
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        queue.append(frame)
        self._queued_bytes += len(frame)
        buffered = self._transport.get_write_buffer_size()
        if self._queued_bytes + buffered > self.max_queued_bytes:
            log.warning("closing slow consumer (%d bytes queued)", self._queued_bytes + buffered)
            queue.clear()
            self._queued_bytes = 0
            if self._metrics is not None:
                self._metrics.slow_consumers.inc()
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer: reconnect to resume")
            # The writer may be stuck waiting for the peer to read (or not even
            # started): stop it and close now, not when the peer wakes up.
            if self._writer is not None:
                self._writer.cancel()
            self._start_closer()
            return False
        if self._writer is None:
            self._writer = self._loop.create_task(self._write_queued())
        return True

    async def _write_queued(self) -> None:
        """Feed the queue to the socket as it drains; end when the queue is empty."""
        transport = self._transport
        queue = self._queue
        assert queue is not None
        try:
            while queue:
                if transport.is_closing():
                    raise ConnectionResetError("the socket closed")
                if transport.get_write_buffer_size() > HIGH_WATER:
                    await self._drain()
                    continue
                frame = queue.popleft()
                self._queued_bytes -= len(frame)
                transport.write(text_frame_header(len(frame)) + frame)
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            # Peer went away; the inbox keeps whatever it did not ack.
            self._closed = True
            queue.clear()
            self._queued_bytes = 0
        finally:
            self._writer = None
            if self._closed:
                self._start_closer()

    async def _drain(self) -> None:
        """Until the transport's buffer drains (``resume_writing``), or DRAIN_POLL."""
        drained = self._drained = self._loop.create_future()
        try:
            await asyncio.wait_for(drained, DRAIN_POLL)
        except TimeoutError:
            pass
        finally:
            self._drained = None

    def resume_writing(self) -> None:
        """The socket's transport drained below its low-water mark."""
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def lost(self) -> None:
        """The socket is gone: nothing more is written; queued frames are dropped
        (the inbox keeps what was not acked)."""
        self._closed = True
        self._batch = []
        if self._queue is not None:
            self._queue.clear()
            self._queued_bytes = 0
        for task in (self._writer, self._closer):
            if task is not None and not task.done():
                task.cancel()

    def close(self, code: int, reason: str) -> None:
        """Close after the frames already pushed are written."""
        if self._closed:
            return
        self._closed = True
        self._close_code = code
        self._close_reason = reason
        if self._writer is not None:
            return  # the writer sends the queue, then starts the close
        self._flush()
        if self._writer is None:
            self._start_closer()

    def _start_closer(self) -> None:
        if self._closer is None and self._close_code is not None and not self.ws.is_disconnected:
            self._closer = self._loop.create_task(self._close_or_abort())

    async def _close_or_abort(self) -> None:
        """Send the close frame, then wait for the peer's (the session then
        drops the socket); a peer that does not answer in time is cut off."""
        assert self._close_code is not None
        ws = self.ws
        try:
            if not ws.is_close_frame_sent:
                reason = self._close_reason.encode()[:MAX_CLOSE_REASON].decode(errors="ignore")
                ws.send_close(self._close_code, reason.encode())
            await asyncio.wait_for(ws.wait_disconnected(), CLOSE_TIMEOUT)
        except (Exception, asyncio.CancelledError):
            # The peer does not even take a close frame: drop the TCP connection.
            self._transport.abort()

    async def finish(self, timeout: float = 2.0) -> None:
        """Write what is pending and wait for the close (the socket is gone or closing)."""
        self._closed = True
        self._flush()
        tasks = [t for t in (self._writer, self._closer) if t is not None and not t.done()]
        if not tasks:
            return
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.gather(*tasks, return_exceptions=True)), timeout)
        except (TimeoutError, asyncio.CancelledError):
            for task in tasks:
                task.cancel()
