"""Text frames handed to the chat service as aiohttp parses them.

aiohttp's ``WebSocketResponse`` puts every parsed frame in a queue and wakes
the connection's task to take it (``async for msg in ws``): per frame a
future, a task step and the ``receive`` bookkeeping, ~a third of the event
loop's work per message under load. ``DirectQueue`` is that queue with one
addition: once the connection is authenticated, a text frame that arrives
while nothing waits in the queue is handled on the spot, inside aiohttp's
``data_received``, in the order the socket delivered it. Everything else
(close, ping, pong, binary frames, errors, and text frames behind any of
them or behind a rate-limit pause) takes aiohttp's usual path, so the order
of frames is the socket's order either way.

It is installed by ``DirectWebSocketResponse`` while aiohttp builds the
queue; with an aiohttp whose response builds its queue differently the
response simply keeps aiohttp's own queue and every frame takes the usual
path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web, web_ws
from aiohttp.http import WSMessage

log = logging.getLogger("roost.gateway")

# Queued in place of a frame when the service asks to stop reading (rate
# limit): the connection's task sleeps that long, then takes the frames that
# queued up meanwhile the usual way.
PAUSED = WSMessage(WSMsgType.TEXT, "", "roost-pause")

_TEXT = WSMsgType.TEXT
_web_ws: Any = web_ws  # its queue class is not part of aiohttp's typed interface
_Queue: Any = _web_ws.WebSocketDataQueue  # the compiled class when aiohttp has its extensions


class DirectQueue(_Queue):  # type: ignore[misc]
    """aiohttp's per-connection frame queue, with direct handling of text frames."""

    # No per-instance __dict__: one of these per connection (idle memory goal).
    __slots__ = ("handle", "pause", "target")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Set by the gateway while frames may be handled here: called with
        # ``target`` (the connection's session) and a text frame's data,
        # returns the seconds to stop reading (0: go on). One handler for all
        # connections and a slot, not a closure per connection (idle memory).
        self.handle: Callable[[Any, Any], float] | None = None
        self.target: Any = None
        self.pause = 0.0

    def feed_data(self, data: Any, size: int) -> None:
        handle = self.handle
        if handle is None or data[0] is not _TEXT or self._buffer:
            # Queued: every later frame queues behind it until the
            # connection's task has taken *and handled* it (it sets
            # ``handle`` again at the top of its loop). Checking only the
            # buffer let a frame arriving between that task's receive() and
            # its handling overtake the frame just taken.
            self.handle = None
            super().feed_data(data, size)
            return
        try:
            pause = handle(self.target, data[1])
        except Exception:  # the service answers bad frames itself; this is a bug
            log.exception("frame handling failed")
            pause = 0.0
        if pause:
            self.handle = None  # later frames queue up behind the pause, in order
            self.pause = pause
            super().feed_data(PAUSED, 0)


class DirectWebSocketResponse(web.WebSocketResponse):
    """A ``WebSocketResponse`` whose frame queue is a ``DirectQueue``."""

    def _post_start(self, *args: Any, **kwargs: Any) -> None:
        # aiohttp builds the queue from its module's name inside this
        # synchronous call (no other code runs meanwhile): point the name at
        # DirectQueue for the call's length.
        original = _web_ws.WebSocketDataQueue
        _web_ws.WebSocketDataQueue = DirectQueue
        try:
            super()._post_start(*args, **kwargs)
        finally:
            _web_ws.WebSocketDataQueue = original

    @property
    def direct_queue(self) -> DirectQueue | None:
        """The queue when it is a ``DirectQueue`` (None: aiohttp built its own)."""
        reader = self._reader
        return reader if isinstance(reader, DirectQueue) else None
