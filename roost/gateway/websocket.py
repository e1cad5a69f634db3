"""One WebSocket session of the gateway, on picows.

picows parses frames in compiled code and calls ``WebSocketSession`` once per
frame, from the socket's read callback: no task, future or queue per frame.
A session goes through four states:

* ``AWAITING_AUTH``: the upgrade is done; the first frame must be ``auth``
  within the auth deadline (``auth_timeout``, and admission's deadline from
  accept), else ``auth_timeout`` and close 4002.
* ``LOGGING_IN``: the token check and the connect-time reads run in a task.
  Reading goes on, so a socket that dies meanwhile is seen and never
  registered; frames read meanwhile wait in order, and past
  ``WAITING_BYTES`` of them reading stops (TCP pushes back on the client).
* ``OPEN``: every text frame goes to ``ChatService.handle`` as it is parsed.
  When the service asks for a pause (the rate limit), reading stops for that
  long; frames already read wait and are handled first, in order. A close
  frame from the peer waits its turn like any other.
* ``CLOSED``: the socket is gone; the session is detached.

Fragmented messages are joined here (picows hands over frames, not
messages), up to ``WS_HARD_LIMIT`` bytes: past it, close 1009, as for a
single frame (picows' own limit). Binary frames are refused with a typed
error. A close frame from the peer is answered and the socket closed. Pings
are answered by picows. The heartbeat is the session's own: one timer per
``heartbeat`` seconds (a flag set per frame, no per-frame timer work); a
peer silent for a whole period is pinged, and dropped (the socket aborted,
1006 for the peer, as aiohttp did) if nothing comes within half a period:
a silent peer goes 1.5 to 2.5 heartbeats after its last frame.

Measured (docs/performance.md, "The WebSocket layer measured"): a login on
aiohttp's request machinery cost ~3 times the CPU it costs here.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from picows import WSAutoPingStrategy, WSListener, WSMsgType
from picows.picows import WSProtocol  # type: ignore[attr-defined]  # not in picows' stub

from roost.core.metrics import Metrics
from roost.gateway.admission import Admission
from roost.gateway.connection import CLOSE_TIMEOUT, Connection
from roost.logs import new_connection_id
from roost.protocol.errors import CloseCode, ErrorCode, ProtocolError
from roost.service.chat import ChatService, error_frame
from roost.service.session import Session

log = logging.getLogger("roost.gateway")
# picows logs every disconnect at INFO: kept to warnings and errors.
_picows_log = logging.getLogger("roost.gateway.picows")
_picows_log.setLevel(logging.WARNING)

# The largest message (one frame, or the fragments of one) a client may send;
# larger closes the socket with 1009. Frames between MAX_FRAME_BYTES (the
# protocol's limit) and this get a typed ``too_large`` error instead.
WS_HARD_LIMIT = 1024 * 1024
# picows' smallest read buffer (it grows for large frames): idle memory.
READ_BUFFER_BYTES = 2048

# The protocol is JSON text frames only; a binary frame is refused like any
# other malformed frame (before auth: then the socket closes with 4001).
BINARY_REFUSED = "binary frames are not accepted: send JSON text frames"

AWAITING_AUTH, LOGGING_IN, OPEN, CLOSED = range(4)

# Frames read during a login that may wait before reading stops (aiohttp's
# queue stopped reading at the same mark).
WAITING_BYTES = 64 * 1024
# What waits in a session's queue: a text or binary message, or the peer's close.
_TEXT_MESSAGE, _BINARY_MESSAGE, _PEER_CLOSE = range(3)

_TEXT = WSMsgType.TEXT
_BINARY = WSMsgType.BINARY
_CONTINUATION = WSMsgType.CONTINUATION
_CLOSE = WSMsgType.CLOSE


class SessionSettings(Protocol):
    """The gateway settings a session reads (``GatewayConfig`` has them)."""

    @property
    def heartbeat(self) -> float: ...
    @property
    def auth_timeout(self) -> float: ...
    @property
    def max_queued_bytes(self) -> int: ...


class SessionHost(Protocol):
    """What a session needs of its gateway."""

    service: ChatService
    metrics: Metrics
    admission: Admission | None
    connections: set[Connection]

    @property
    def config(self) -> SessionSettings: ...

    async def authenticate(self, conn: Connection, data: bytes) -> tuple[str, str, float, bool] | None: ...


def websocket_protocol(host: SessionHost, route: Callable[[Any], Any]) -> asyncio.BaseProtocol:
    """picows' protocol for one accepted socket whose request is a WebSocket
    upgrade; ``route`` gets the parsed request and returns the listener (or an
    HTTP response). The arguments are those picows' own ``ws_create_server``
    passes (picows 2.3)."""
    heartbeat = host.config.heartbeat
    protocol: asyncio.BaseProtocol = WSProtocol(
        None,  # host and port: a client's
        None,  # path: a client's
        False,  # server side
        route,
        _picows_log,
        True,  # disconnect on an exception from a listener callback (ours catch theirs)
        None,  # no handshake timeout of its own: admission's deadline covers it
        False,  # no ping task per connection: the session's heartbeat timer pings
        max(heartbeat, 1.0),
        max(heartbeat, 1.0) / 2,
        WSAutoPingStrategy.PING_WHEN_IDLE,
        True,  # answer pings
        WS_HARD_LIMIT,
        None,  # no extra response headers
        READ_BUFFER_BYTES,
    )
    return protocol


class WebSocketSession(WSListener):
    """The listener of one socket: login, then frames to the chat service."""

    # One of these per connection (idle memory goal): no __dict__.
    __slots__ = (
        "conn",
        "conn_id",
        "fragments",
        "fragments_binary",
        "fragments_size",
        "heard",
        "heartbeat",
        "host",
        "login",
        "paused",
        "peer_code",
        "pinged",
        "session",
        "state",
        "timer",
        "waiting",
        "waiting_bytes",
        "ws",
    )

    def __init__(self, host: SessionHost) -> None:
        self.host = host
        self.ws: Any = None
        self.conn: Connection | None = None
        self.conn_id = ""
        self.session: Session | None = None
        self.state = AWAITING_AUTH
        self.paused = False
        # Frames read while they cannot be handled yet (login, pause), in order.
        self.waiting: deque[tuple[bytes, int]] | None = None
        self.waiting_bytes = 0
        self.fragments: list[bytes] | None = None  # an unfinished fragmented message
        self.fragments_binary = False
        self.fragments_size = 0
        self.peer_code: int | None = None
        self.timer: asyncio.TimerHandle | None = None  # the auth deadline, or a pause
        self.heartbeat: asyncio.TimerHandle | None = None
        self.heard = False  # a frame came in this heartbeat period
        self.pinged = False
        self.login: asyncio.Task[None] | None = None  # held while it runs

    # -- picows' callbacks ----------------------------------------------------

    def on_ws_connected(self, ws: Any) -> None:
        host = self.host
        self.ws = ws
        # picows keeps the upgrade request and response for the socket's
        # life; their headers are never read again (idle memory goal).
        for message in (ws.request, ws.response):
            if message is not None:
                message.headers.clear()
        self.conn = conn = Connection(ws, host.config.max_queued_bytes, host.metrics)
        host.connections.add(conn)
        host.metrics.connections_accepted.inc()
        transport = ws.underlying_transport
        wait = host.config.auth_timeout
        if host.admission is not None:
            host.admission.upgraded(transport)
            # The deadline from accept covers the request and the upgrade too.
            wait = min(wait, host.admission.remaining(transport))
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(max(0.0, wait), self._auth_timed_out)
        if host.config.heartbeat > 0:
            self.heartbeat = loop.call_later(host.config.heartbeat, self._beat)

    def on_ws_frame(self, ws: Any, frame: Any) -> None:
        self.heard = True
        kind = frame.msg_type
        if kind is _TEXT or kind is _BINARY or kind is _CONTINUATION:
            if frame.fin and self.fragments is None:
                if kind is _CONTINUATION:
                    self._protocol_error("a continuation frame without a message to continue")
                    return
                self._message(frame.get_payload_as_bytes(), kind is _BINARY)
            else:
                self._fragment(frame, kind)
        elif kind is _CLOSE:
            self.peer_code = int(frame.get_close_code())
            if self.waiting or self.paused or self.state == LOGGING_IN:
                self._wait(b"", _PEER_CLOSE)  # after the frames read before it
            else:
                self._peer_closed()

    def on_ws_disconnected(self, ws: Any) -> None:
        host = self.host
        self.state = CLOSED
        self._cancel_timer()
        if self.heartbeat is not None:
            self.heartbeat.cancel()
            self.heartbeat = None
        conn = self.conn
        if conn is None:
            return
        host.connections.discard(conn)
        # The code this server closed with; else the peer's (None: no close frame).
        code = conn.close_code if conn.close_code is not None else self.peer_code
        conn.lost()
        host.metrics.closed(code)
        session = self.session
        if session is not None:
            self.session = None
            self._detach(session, code)

    def pause_writing(self) -> None:
        pass  # the connection looks at the transport's buffer itself

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.resume_writing()

    # -- messages ------------------------------------------------------------

    def _message(self, data: bytes, binary: bool) -> None:
        state = self.state
        if state == OPEN and not self.paused and not self.waiting:
            self._handle(data, binary)
        elif state == AWAITING_AUTH:
            self._begin_login(data, binary)
        elif state != CLOSED:
            self._wait(data, _BINARY_MESSAGE if binary else _TEXT_MESSAGE)

    def _wait(self, data: bytes, kind: int) -> None:
        """Queue what cannot be handled yet; stop reading once much waits."""
        if self.waiting is None:
            self.waiting = deque()
        self.waiting.append((data, kind))
        self.waiting_bytes += len(data)
        if self.waiting_bytes > WAITING_BYTES and not self.paused:
            self._pause_reading()

    def _fragment(self, frame: Any, kind: Any) -> None:
        parts = self.fragments
        if parts is None:
            if kind is _CONTINUATION:
                self._protocol_error("a continuation frame without a message to continue")
                return
            parts = self.fragments = []
            self.fragments_binary = kind is _BINARY
            self.fragments_size = 0
        elif kind is not _CONTINUATION:
            self._protocol_error("a new message before the fragmented one ended")
            return
        payload = frame.get_payload_as_bytes()
        self.fragments_size += len(payload)
        if self.fragments_size > WS_HARD_LIMIT:
            self.fragments = None
            self._close_now(CloseCode.TOO_BIG, "message too big")
            return
        parts.append(payload)
        if frame.fin:
            self.fragments = None
            self._message(b"".join(parts), self.fragments_binary)

    def _handle(self, data: bytes, binary: bool) -> None:
        conn, session = self.conn, self.session
        assert conn is not None and session is not None
        if conn.closed:
            return  # closing: what the peer sends now is not acted on
        if binary:
            conn.push(error_frame(ProtocolError(ErrorCode.BAD_FRAME, BINARY_REFUSED)))
            return
        try:
            pause = self.host.service.handle(session, data)
        except Exception:  # the service answers bad frames itself; this is a bug
            log.exception("frame handling failed", extra={"conn": self.conn_id})
            pause = 0.0
        if pause:
            # Over the rate: stop reading for a while. TCP pushes back on
            # the client; nothing is dropped or reordered.
            self._pause_reading()
            self.timer = asyncio.get_running_loop().call_later(pause, self._resume)

    def _resume(self) -> None:
        """Handle the frames that waited, in order, then read again."""
        self.timer = None
        self.paused = False
        waiting = self.waiting
        while waiting and not self.paused and self.state == OPEN:
            data, kind = waiting.popleft()
            self.waiting_bytes -= len(data)
            if kind == _PEER_CLOSE:
                self._peer_closed()
                return
            self._handle(data, kind == _BINARY_MESSAGE)
        if not self.paused and self.state == OPEN:
            self.ws.underlying_transport.resume_reading()

    def _pause_reading(self) -> None:
        self.paused = True
        transport = self.ws.underlying_transport
        if not transport.is_closing():
            transport.pause_reading()

    # -- login ---------------------------------------------------------------

    def _begin_login(self, data: bytes, binary: bool) -> None:
        if self.conn is None or self.conn.closed:
            return  # closing (the auth deadline passed): not acted on
        self._cancel_timer()
        self.state = LOGGING_IN
        # Every log line of the login carries this connection's id (roost/logs.py).
        context = contextvars.copy_context()
        self.conn_id = context.run(new_connection_id)
        loop = asyncio.get_running_loop()
        self.login = loop.create_task(self._login(data, binary), context=context)

    async def _login(self, data: bytes, binary: bool) -> None:
        try:
            await self._log_in(data, binary)
        finally:
            self.login = None
            if self.state == LOGGING_IN:  # refused: closing
                self.state = CLOSED
                if self.waiting and self.waiting[-1][1] == _PEER_CLOSE:
                    self._peer_closed()  # the peer's close came during the login
                else:
                    # Read on, for the peer's answer to our close frame.
                    self.paused = False
                    transport = self.ws.underlying_transport
                    if not transport.is_closing():
                        transport.resume_reading()

    async def _log_in(self, data: bytes, binary: bool) -> None:
        host, conn = self.host, self.conn
        assert conn is not None
        try:
            if binary:
                host.metrics.auth_failure["bad_frame"].inc()
                conn.push(error_frame(ProtocolError(ErrorCode.BAD_FRAME, BINARY_REFUSED)))
                conn.close(CloseCode.AUTH_FAILED, ErrorCode.BAD_FRAME.value)
                return
            identity = await host.authenticate(conn, data)
            if identity is not None:
                # Two loop passes: the first reads a reset or EOF that has
                # already arrived, the second runs its connection_lost.
                for _ in range(2):
                    await asyncio.sleep(0)
            # A socket that died (or is being closed) while its token was being
            # checked is not registered: it would replace the live connection
            # its client has meanwhile opened, and that client would be told
            # it was replaced.
            if identity is None or self.state == CLOSED or conn.closed:
                return
            user, client, started, e2ee = identity
            if host.admission is not None:
                host.admission.authenticated(self.ws.underlying_transport)
            session = await host.service.connect(user, conn, client, started, e2ee)
        except Exception:
            log.exception("login failed")
            conn.close(CloseCode.GOING_AWAY, "unavailable")
            return
        log.info("connected", extra={"user": user})
        if self.state == CLOSED or conn.closed:  # it went away, or is closing
            self._detach(session, self.peer_code)
            return
        self.session = session
        self.state = OPEN
        self._resume()

    def _auth_timed_out(self) -> None:
        self.timer = None
        if self.state != AWAITING_AUTH or self.conn is None:
            return
        self.state = CLOSED  # an auth frame arriving now is not acted on
        self.host.metrics.auth_failure["timeout"].inc()
        self.conn.push(error_frame(ProtocolError(ErrorCode.AUTH_TIMEOUT, "no auth frame in time")))
        self.conn.close(CloseCode.AUTH_TIMEOUT, "auth timeout")

    # -- the end -------------------------------------------------------------

    def _beat(self) -> None:
        """Once per heartbeat period: ping a silent peer; drop one that stays silent."""
        period = self.host.config.heartbeat
        if self.heard or self.paused:  # a pong cannot be read while paused
            self.heard = self.pinged = False
        elif not self.pinged:
            self.pinged = True
            self.ws.send_ping()
            period /= 2
        else:
            # No pong: the peer or the path is dead. No close frame (it could
            # wait behind a full buffer for ever): drop the TCP connection.
            self.heartbeat = None
            self.ws.underlying_transport.abort()
            return
        self.heartbeat = asyncio.get_running_loop().call_later(period, self._beat)

    def _peer_closed(self) -> None:
        """The peer sent a close frame: answer it (unless we sent ours) and hang up."""
        self.state = CLOSED  # nothing the peer sends after its close is acted on
        if self.conn is not None:
            self.conn.flush()  # the answers to the frames before the close go first
        ws = self.ws
        if not ws.is_close_frame_sent:
            ws.send_close(CloseCode.NORMAL)
        ws.disconnect()
        # A graceful close waits for our unsent bytes: not for ever.
        transport = ws.underlying_transport
        asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, transport.abort)

    def _protocol_error(self, why: str) -> None:
        log.info("websocket protocol error", extra={"conn": self.conn_id, "error": why})
        self._close_now(1002, why)

    def _close_now(self, code: int, reason: str) -> None:
        """Close without handling what else the peer sent."""
        self.state = CLOSED  # reading goes on, for the peer's answer to our close
        if self.conn is not None:
            self.conn.close(code, reason)
        if self.paused:
            self._cancel_timer()
            self.paused = False
            self.ws.underlying_transport.resume_reading()

    def _detach(self, session: Session, code: int | None) -> None:
        self.host.service.disconnect(session)
        log.info("disconnected", extra={"user": session.user, "code": code, "conn": self.conn_id})

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
