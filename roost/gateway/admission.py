"""Admission of new connections: a deadline from accept to authentication, and
caps on how many connections may be unauthenticated at once.

aiohttp sets no deadline on reading a request (its keep-alive timeout, an
hour, is the only one), and the gateway's ``--auth-timeout`` starts only after
the WebSocket upgrade. So a socket that sends half a request line and then
nothing, or trickles a header byte every few seconds, held a file descriptor
for good, and a few thousand of them exhausted the gateway's.

Every accepted connection is therefore *pending* until its session is
authenticated, and while pending it counts against two caps: all pending
connections of the gateway, and those from one source address (an IPv6 /64
counts as one address: one host gets a whole /64). Over the address's cap,
the connection is answered at once with ``429`` and closed, without parsing
its request or creating any aiohttp state for it. At the gateway's cap, the
oldest pending connection makes room if it has been pending for
``EVICT_AGE`` (a real client's handshake takes milliseconds, so under a flood
of slow sockets the oldest is one of them, and new clients still get in);
otherwise (a storm of fresh handshakes) the new one is answered ``503``.
A pending connection not authenticated by ``handshake_timeout`` seconds after
accept is closed: during the request it is aborted; once upgraded, the
gateway's own auth wait ends at the same deadline with ``auth_timeout`` and
close 4002, and the socket is aborted if it has not closed ``CLOSE_GRACE``
seconds later. Authenticated sessions never count, and are never refused or
closed for room; from authentication on, their socket bypasses this layer.

The check sits in front of the HTTP servers as the asyncio protocol of the
listening socket (``Admission.protocol``). Once a connection is admitted, its
request line picks the protocol that serves it (``make_handler``): picows
for a WebSocket upgrade, aiohttp for the rest (roost/gateway/server.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

log = logging.getLogger("roost.gateway")

# After the deadline, an upgraded socket gets this long to take its close (4002).
CLOSE_GRACE = 3.0
# At the gateway's cap, a pending connection this old is closed to admit a new one.
EVICT_AGE = 1.0
# A refused connection gets this long to read its 503/429 before it is dropped;
# past this many such lingering connections, a refusal is a plain reset.
REFUSE_LINGER = 1.0
MAX_REFUSING = 256

_REFUSAL_HEADERS = b"\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
BUSY = b"HTTP/1.1 503 Service Unavailable" + _REFUSAL_HEADERS
TOO_MANY = b"HTTP/1.1 429 Too Many Requests" + _REFUSAL_HEADERS


def default_max_pending() -> int:
    """A quarter of this process's open-file limit, at most 1024: a flood of
    unauthenticated sockets leaves most descriptors to sessions and the store."""
    try:
        import resource
    except ImportError:  # not on Windows
        return 1024
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(16, min(1024, soft // 4))


@dataclass(slots=True)
class AdmissionLimits:
    handshake_timeout: float = 15.0  # accept -> authenticated session, seconds
    max_pending: int = field(default_factory=default_max_pending)  # of the gateway (0: no cap)
    max_pending_per_address: int = 64  # ... from one source address (0: no cap)


def address_key(peer: object) -> str:
    """The source address a per-address cap counts: the IP, an IPv6 /64 as one."""
    if not isinstance(peer, tuple) or not peer:
        return ""  # a Unix socket or an unknown peer: all such count as one
    host = str(peer[0])
    if ":" not in host:
        return host  # IPv4: the socket's peer name is already the canonical dotted quad
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return host


class Admission:
    """The pending connections of one gateway, their deadlines and the caps."""

    def __init__(
        self, limits: AdmissionLimits, make_handler: Callable[[bytes], asyncio.BaseProtocol | None]
    ) -> None:
        self.limits = limits
        # The protocol that serves a connection, from the first bytes of its
        # request; None while those do not tell yet.
        self.make_handler = make_handler
        self.pending: dict[asyncio.BaseTransport, Guarded] = {}
        self.per_address: Counter[str] = Counter()
        self.refusing: set[Guarded] = set()
        self.refused = 0
        self.expired = 0
        self.evicted = 0
        self._last_report = 0.0

    def protocol(self) -> Guarded:
        """The protocol factory for the listening socket."""
        return Guarded(self)

    # -- the gateway's view ---------------------------------------------------

    def remaining(self, transport: asyncio.BaseTransport | None) -> float:
        """Seconds until this connection's deadline (inf if it is not pending)."""
        guarded = self.pending.get(transport) if transport is not None else None
        if guarded is None:
            return float("inf")
        return guarded.deadline - asyncio.get_running_loop().time()

    def upgraded(self, transport: asyncio.BaseTransport | None) -> None:
        """The WebSocket is open: the gateway closes it (4002) at the deadline."""
        guarded = self.pending.get(transport) if transport is not None else None
        if guarded is not None:
            guarded.upgraded = True

    def authenticated(self, transport: asyncio.BaseTransport | None) -> None:
        """The session is authenticated: no deadline, no longer counted, and
        its socket talks to its protocol directly from now on (no call in between)."""
        guarded = self.pending.get(transport) if transport is not None else None
        if guarded is None:
            return
        self._release(guarded)
        if guarded.handler is not None and transport is not None and not transport.is_closing():
            transport.set_protocol(guarded.handler)

    def close(self) -> None:
        """Shutting down: drop the connections being refused (aiohttp closes the rest)."""
        for guarded in list(self.refusing):
            guarded.abort()

    # -- the protocol's view --------------------------------------------------

    def _admit(self, guarded: Guarded, transport: asyncio.Transport) -> bytes | None:
        """None if admitted (now pending), else the refusal to send."""
        limits = self.limits
        key = guarded.address
        if limits.max_pending_per_address and self.per_address[key] >= limits.max_pending_per_address:
            return self._refuse(TOO_MANY, f"too many unauthenticated connections from {key}")
        loop = asyncio.get_running_loop()
        now = loop.time()
        if limits.max_pending and len(self.pending) >= limits.max_pending and not self._evict_oldest(now):
            return self._refuse(BUSY, "too many unauthenticated connections")
        self.pending[transport] = guarded
        self.per_address[key] += 1
        guarded.accepted = now
        guarded.deadline = now + limits.handshake_timeout
        guarded.timer = loop.call_at(guarded.deadline, self._expire, guarded)
        return None

    def _evict_oldest(self, now: float) -> bool:
        """Close the longest-pending connection if it is at least EVICT_AGE old."""
        oldest = next(iter(self.pending.values()))  # dicts keep admission order
        if now - oldest.accepted < EVICT_AGE:
            return False
        self.evicted += 1
        self._report("made room for a new connection by closing the oldest unauthenticated one")
        self._release(oldest)
        oldest.abort()
        return True

    def _refuse(self, response: bytes, why: str) -> bytes:
        self.refused += 1
        self._report(why)
        return response

    def _expire(self, guarded: Guarded) -> None:
        self.expired += 1
        self._report("a connection did not authenticate in time")
        if guarded.upgraded:
            # The auth wait ends at this same deadline with 4002; this is the backstop.
            guarded.timer = asyncio.get_running_loop().call_later(CLOSE_GRACE, guarded.abort)
        else:
            guarded.abort()

    def _release(self, guarded: Guarded) -> None:
        if guarded.transport is None or self.pending.pop(guarded.transport, None) is None:
            return
        key = guarded.address
        self.per_address[key] -= 1
        if self.per_address[key] <= 0:
            del self.per_address[key]
        if guarded.timer is not None:
            guarded.timer.cancel()
            guarded.timer = None

    def _report(self, why: str) -> None:
        # Under a flood this runs per connection: one line per interval.
        now = time.monotonic()
        if now - self._last_report >= 5.0:
            self._last_report = now
            log.warning(
                "%s (so far: %d refused, %d timed out, %d closed for room; %d pending)",
                why,
                self.refused,
                self.expired,
                self.evicted,
                len(self.pending),
            )


class Guarded(asyncio.Protocol):
    """One accepted connection: its protocol behind the admission check."""

    __slots__ = (
        "accepted",
        "address",
        "admission",
        "deadline",
        "handler",
        "head",
        "timer",
        "transport",
        "upgraded",
    )

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.handler: Any = None  # an asyncio.Protocol or asyncio.BufferedProtocol
        self.head: bytes | None = None  # the request so far, until its protocol is picked
        self.transport: asyncio.Transport | None = None
        self.address = ""
        self.accepted = 0.0
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.upgraded = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = transport = cast(asyncio.Transport, transport)
        self.address = address_key(transport.get_extra_info("peername"))
        admission = self.admission
        refusal = admission._admit(self, transport)
        if refusal is None:
            self.head = b""  # admitted: the request line picks the protocol
            return
        # Answered before the request is read; then the peer's request is
        # read and dropped until it closes (closing with it unread would send
        # a reset that can destroy the answer), for at most REFUSE_LINGER.
        # Past the cap's worth of such lingering sockets, drop at once.
        if len(admission.refusing) >= MAX_REFUSING:
            transport.abort()
            return
        admission.refusing.add(self)
        transport.write(refusal)
        if transport.can_write_eof():
            transport.write_eof()
        self.timer = asyncio.get_running_loop().call_later(REFUSE_LINGER, self.abort)

    def data_received(self, data: bytes) -> None:
        handler = self.handler
        if handler is None:
            if self.head is None:
                return  # refused: read and dropped
            data = self.head + data
            handler = self.admission.make_handler(data)
            if handler is None:
                self.head = data
                return
            self.head = None
            self.handler = handler
            handler.connection_made(cast(asyncio.Transport, self.transport))
        feed(handler, data)

    def eof_received(self) -> bool | None:
        if self.handler is not None:
            keep_open: bool | None = self.handler.eof_received()
            return keep_open
        return None  # a refused peer is done: close

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        admission = self.admission
        admission._release(self)
        admission.refusing.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.handler is not None:
            self.handler.connection_lost(exc)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def feed(protocol: Any, data: bytes) -> None:
    """Hand ``data`` to a protocol, whether it reads into its own buffer or not."""
    if not isinstance(protocol, asyncio.BufferedProtocol):
        protocol.data_received(data)
        return
    view = memoryview(data)
    while view:
        buffer = memoryview(protocol.get_buffer(len(view)))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        protocol.buffer_updated(size)
        view = view[size:]
