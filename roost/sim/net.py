"""The simulated network: one TCP connection per client session.

Each direction is a FIFO with seeded per-frame delays (TCP never reorders a
stream, so a frame arrives no earlier than the one sent before it; frames of
different connections interleave freely). A connection can be cut (frames
in flight are lost, each side notices after its own delay, like a reset
seen on the next read) or blackholed by a partition (frames vanish until the
heartbeats give up and the connection is cut).

The client end looks like the ``aiohttp`` WebSocket the SDK uses
(``send_frame``, ``send_bytes``, ``receive``, ``async for``, ``close_code``);
the server end is the gateway's ``Sink`` plus an inbound queue that the
simulated gateway reads like its socket.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Callable
from typing import Any

from aiohttp import WSMessage, WSMsgType

ABNORMAL_CLOSURE = 1006  # what the client socket reports after a reset
FIFO_STEP = 1e-7  # seconds between two frames of one stream arriving "together"

_CLOSED = WSMessage(WSMsgType.CLOSED, None, None)


class Connection:
    """Both ends of one simulated connection."""

    def __init__(
        self,
        conn_id: int,
        user: str,
        gateway: str,
        rng: random.Random,
        latency: tuple[float, float],
        trace: Callable[..., None],
    ) -> None:
        self.id = conn_id
        self.user = user
        self.gateway = gateway
        self.rng = rng
        self.latency = latency
        self.trace = trace
        self.alive = True  # False once cut: nothing more crosses
        self.blackholed = False
        self._up_at = 0.0  # arrival time of the last frame to the server
        self._down_at = 0.0  # ... and to the client
        self.client = ClientEnd(self)
        self.server = ServerEnd(self)

    def _arrival(self, last: float) -> float:
        # Strictly after the previous frame: timers due at the very same
        # instant would run in heap order, not in send order.
        loop = asyncio.get_running_loop()
        return max(last + FIFO_STEP, loop.time() + self.rng.uniform(*self.latency))

    def _schedule(self, when: float, fn: Callable[..., None], *args: Any) -> None:
        asyncio.get_running_loop().call_at(when, fn, *args)

    # -- client -> server ------------------------------------------------------

    def up(self, data: bytes) -> None:
        if not self.alive or self.blackholed:
            self.trace("lost-xmit", self.user, data)
            return
        self._up_at = self._arrival(self._up_at)
        self._schedule(self._up_at, self._arrive_up, data)

    def _arrive_up(self, data: bytes) -> None:
        if self.alive and not self.server.ended:
            self.trace("xmit", self.user, data)
            self.server.feed(data)
        else:
            self.trace("lost-xmit", self.user, data)

    # -- server -> client ------------------------------------------------------

    def down(self, data: bytes) -> None:
        if not self.alive or self.blackholed:
            self.trace("lost-recv", self.user, data)
            return
        self._down_at = self._arrival(self._down_at)
        self._schedule(self._down_at, self._arrive_down, data)

    def _arrive_down(self, data: bytes) -> None:
        if self.alive and not self.client.closed:
            self.trace("recv", self.user, data)
            self.client.feed(data)
        else:
            self.trace("lost-recv", self.user, data)

    def close_from_server(self, code: int) -> None:
        """A close frame after the frames queued; then both ends are done."""
        if not self.alive or self.blackholed:
            return
        self._down_at = self._arrival(self._down_at)
        self._schedule(self._down_at, self._closed_by_server, code)

    def _closed_by_server(self, code: int) -> None:
        if not self.alive:
            return
        self.alive = False
        self.client.end(code)
        self._schedule(self._arrival(0.0), self.server.end)

    def close_from_client(self) -> None:
        if not self.alive:
            self.client.end(self.client.close_code or ABNORMAL_CLOSURE)
            return
        self.trace("close", self.user, f"conn {self.id} closed by the client")
        self.alive = False
        self.client.end(1000)
        self._schedule(self._arrival(self._up_at), self.server.end)

    # -- faults ----------------------------------------------------------------

    def cut(self, reason: str, client_notices: float, server_notices: float) -> None:
        """Reset: frames in flight are lost; each side notices after its delay."""
        if not self.alive:
            return
        self.alive = False
        self.trace("cut", self.user, f"conn {self.id} to {self.gateway}: {reason}")
        loop = asyncio.get_running_loop()
        loop.call_later(client_notices, self.client.end, ABNORMAL_CLOSURE)
        loop.call_later(server_notices, self.server.end)

    def partition(self, duration: float) -> None:
        """Blackhole, then the heartbeats give up and the connection is cut."""
        if not self.alive or self.blackholed:
            return
        self.blackholed = True
        self.trace("partition", self.user, f"conn {self.id} to {self.gateway} for {duration:.3f}s")
        asyncio.get_running_loop().call_later(
            duration, self.cut, "heartbeat timeout after a partition", self.rng.uniform(0, 0.5), 0.0
        )


class ClientEnd:
    """What the SDK sees: the subset of ``aiohttp.ClientWebSocketResponse`` it uses."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._messages: deque[WSMessage] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.close_code: int | None = None
        self.closed = False

    def feed(self, data: bytes) -> None:
        if self.closed:
            return
        self._messages.append(WSMessage(WSMsgType.TEXT, data, None))
        self._wake()

    def end(self, code: int) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_code = code
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def send_frame(self, data: bytes, opcode: Any = None) -> None:
        self._send(data)

    async def send_bytes(self, data: bytes) -> None:
        self._send(data)

    def _send(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionResetError("Cannot write to closing transport")
        self._conn.up(data)

    async def _next(self) -> WSMessage:
        while not self._messages:
            if self.closed:
                return _CLOSED
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._messages.popleft()

    async def receive(self, timeout: float | None = None) -> WSMessage:
        return await asyncio.wait_for(self._next(), timeout)

    def __aiter__(self) -> ClientEnd:
        return self

    async def __anext__(self) -> WSMessage:
        msg = await self._next()
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
            raise StopAsyncIteration
        return msg

    async def close(self, *, code: int = 1000, message: bytes = b"") -> bool:
        self._conn.close_from_client()
        return True


class ServerEnd:
    """The gateway's side: a ``Sink`` for the chat service and an inbound queue."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._inbound: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False  # the gateway closed (no more pushes)
        self.ended = False  # the socket is gone

    @property
    def closed(self) -> bool:
        return self._closed or self.ended

    def push(self, frame: bytes) -> None:
        if self.closed:
            return
        self._conn.down(frame)

    def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self._closed = True
        self._conn.trace("server-close", self._conn.user, f"conn {self._conn.id} code {code} ({reason})")
        self._conn.close_from_server(code)

    def feed(self, data: bytes) -> None:
        if not self.ended:
            self._inbound.append(data)
            self._wake()

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def receive(self) -> bytes | None:
        """The next frame from the client; None once the socket is gone."""
        while not self._inbound:
            if self.ended:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._inbound.popleft()
