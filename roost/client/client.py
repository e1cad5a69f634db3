"""The asyncio SDK.

    async with Client("http://127.0.0.1:8765", token) as chat:
        await chat.send("hello", to="bob")          # returns at ✓ (durably stored)
        async for event in chat.events():
            print(event)

What it does for the application:

* a durable outbox: ``send`` commits the message locally before sending, and
  everything not yet acked is resent, in order and with the same ids, after a
  reconnect or a restart on the same state file;
* reconnects on its own to one of the given URLs, with exponential backoff and
  full jitter;
* per-conversation order and dedupe (``ConversationOrder``): each message is
  shown once, in seq order, with gaps filled from history; it is committed
  locally before it is shown and before the server is told it arrived;
* what reached the device stays *unconsumed* in the state until someone shows
  it to the user (``unconsumed`` / ``mark_consumed``);
* while it runs, other commands of the account hand it their work through a
  Unix socket beside the state file (``roost.client.local``), instead of
  opening a second connection that would replace this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

import aiohttp
import msgspec

from roost.client.attachments import ATTACHMENT_CT, MAX_CAPTION_CHARS
from roost.client.crypto import E2EE_CT, E2ee
from roost.client.events import (
    Connected,
    Consumed,
    Disconnected,
    ErrorEvent,
    Event,
    KeysLow,
    LocalSend,
    Membership,
    Message,
    Pending,
    PresenceEvent,
    ProtocolMessage,
    ReceiptEvent,
    Sent,
    TypingEvent,
)
from roost.client.keys import KeyCounts, KeyUpload, PreKeyBundle, bundle_of, upload_frames
from roost.client.local import LocalEndpoint
from roost.client.media import Progress, Uploader
from roost.client.media import download as download_attachment
from roost.client.ordering import ConversationOrder
from roost.client.state import ClientState, Outbox, OutboxItem, UploadItem, default_state_path
from roost.protocol import frames as f
from roost.protocol.codec import decode_server, encode
from roost.protocol.errors import RETRYABLE, CloseCode, ErrorCode

log = logging.getLogger("roost.client")

# Close codes after which reconnecting would be wrong.
FATAL_CLOSE_CODES = {
    CloseCode.AUTH_FAILED,
    CloseCode.REPLACED,
    CloseCode.UNSUPPORTED_VERSION,
    CloseCode.REVOKED,
}
HISTORY_PAGE = 200


class RoostError(Exception):
    """The server refused a request (``code`` is a stable error code)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectionLost(RoostError):
    def __init__(self, message: str = "connection lost") -> None:
        super().__init__("connection_lost", message)


class CannotConnect(RoostError, TimeoutError):
    """``connect`` gave up: the message says what failed for each URL.

    A ``TimeoutError`` too, as ``connect`` raised before it said why.
    ``final``: every URL failed in a way retrying cannot fix (TLS, unknown
    host, an HTTP 4xx from something that is not a Roost server), rather
    than running out of time.
    """

    def __init__(self, message: str, final: bool = False) -> None:
        super().__init__("unreachable", message)
        self.final = final


class InvalidArgument(ValueError):
    """Refused by the SDK before anything was sent or queued: nothing changed."""


class InvalidMessage(InvalidArgument):
    """A message ``send`` refuses before it reaches the outbox."""


class MessageTooLarge(InvalidMessage):
    def __init__(self, size: int, limit: int = f.MAX_BODY_BYTES) -> None:
        super().__init__(f"message is {size:,} bytes; the limit is {limit:,} bytes ({limit // 1024} KiB)")
        self.size = size
        self.limit = limit


class EmptyMessage(InvalidMessage):
    def __init__(self) -> None:
        super().__init__("message is empty")


@dataclass(slots=True, frozen=True)
class SendResult:
    message_id: str
    conv: str
    seq: int
    ts: int
    duplicate: bool = False


@dataclass(slots=True, frozen=True)
class SafetyNumber:
    user: str
    digits: str  # 60 digits
    verified: bool  # the user marked it verified (``mark_verified``)
    changed: bool  # their key changed since it was first seen, not verified since

    @property
    def groups(self) -> str:
        """The digits in twelve groups of five, as Signal shows them."""
        return " ".join(self.digits[i : i + 5] for i in range(0, len(self.digits), 5))


@dataclass(slots=True, frozen=True)
class GroupInfo:
    group: str
    name: str
    members: list[str]
    admins: list[str]
    last_seq: int


@dataclass(slots=True)
class _ReceiptView:
    all_delivered: int = 0
    all_read: int = 0
    marks: dict[str, tuple[int, int]] = field(default_factory=dict)


def _retrieved(fut: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen (no "never retrieved" warning)."""
    if not fut.cancelled():
        fut.exception()


def ws_url(url: str) -> str:
    """``http://host:port`` -> ``ws://host:port/v1/ws`` (ws/wss URLs pass through)."""
    url = url.rstrip("/")
    if url.startswith("http://"):
        url = "ws://" + url[len("http://") :]
    elif url.startswith("https://"):
        url = "wss://" + url[len("https://") :]
    if not url.endswith("/v1/ws"):
        url += "/v1/ws"
    return url


def message_payload(text: str | None, body: bytes | None) -> bytes:
    """The bytes ``send`` queues for ``text`` or ``body``.

    Raises ``EmptyMessage`` for an empty or whitespace-only text (or an empty
    body) and ``MessageTooLarge`` over the protocol's body limit, so a caller
    can check a message before it connects."""
    payload = body if body is not None else (text or "").encode()
    if not payload or (text is not None and not text.strip()):
        raise EmptyMessage()
    if len(payload) > f.MAX_BODY_BYTES:
        raise MessageTooLarge(len(payload))
    return payload


URL_SCHEMES = ("http", "https", "ws", "wss")


def check_url(url: str) -> str:
    """``url`` if it can name a Roost server, else ``InvalidArgument`` saying why."""
    example = "e.g. http://127.0.0.1:8765"
    try:
        parsed = urllib.parse.urlsplit(url.strip())
        parsed.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise InvalidArgument(f"bad server URL {url!r}: {exc}") from None
    if parsed.scheme not in URL_SCHEMES or not parsed.netloc:
        raise InvalidArgument(
            f"bad server URL {url!r}: it must start with http://, https://, ws:// or wss:// ({example})"
        )
    if not parsed.hostname:
        raise InvalidArgument(f"bad server URL {url!r}: no host name ({example})")
    return url.strip()


def tls_context(ca_file: str | Path | None = None, context: ssl.SSLContext | None = None) -> ssl.SSLContext:
    """What https/wss connections verify the server against: ``context`` as
    given, else the system's trusted CAs plus ``ca_file`` (a private CA, PEM).
    Plain http/ws URLs ignore it. ``InvalidArgument`` if ``ca_file`` is unusable."""
    if context is not None:
        return context
    verify = ssl.create_default_context()
    if ca_file is not None:
        try:
            verify.load_verify_locations(cafile=ca_file)
        except OSError as exc:  # ssl.SSLError too: not a PEM certificate
            why = exc.strerror or getattr(exc, "reason", None) or exc
            raise InvalidArgument(f"cannot use CA file {str(ca_file)!r}: {why}") from None
    return verify


def describe_failure(exc: BaseException) -> tuple[str, bool]:
    """Why a connection attempt failed, in words, and whether that is final
    (trying again cannot help: a TLS mismatch, an unknown host, an HTTP 4xx)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate not accepted: {exc.certificate_error}", True
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        reason = getattr(exc.os_error, "reason", None) or exc.os_error
        return f"TLS handshake failed ({reason}); does the server speak https?", True
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        temporary = getattr(exc.os_error, "errno", None) == socket.EAI_AGAIN
        return f"host name not found: {exc.host}", not temporary
    if isinstance(exc, aiohttp.NonHttpUrlClientError):
        return f"not an http(s) or ws(s) URL: {exc}", True
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        if exc.status in (401, 403):
            return f"HTTP {exc.status}: the server refused the token", True
        if exc.status < 400:
            return f"HTTP {exc.status}: no WebSocket there (is this a Roost server?)", True
        final = exc.status < 500 and exc.status not in (408, 429)
        return f"HTTP {exc.status} from the server" + (" (is this a Roost server?)" if final else ""), final
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return f"connection refused by {exc.host}:{exc.port}", False
        return f"cannot connect to {exc.host}:{exc.port}: {exc.os_error.strerror or exc.os_error}", False
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection", False
    if isinstance(exc, TimeoutError):
        return "timed out", False
    return str(exc) or type(exc).__name__, False


async def authenticate(
    urls: Sequence[str], token: str, timeout: float = 10.0, tls: ssl.SSLContext | None = None
) -> str:
    """Log in once and return the user name the token belongs to.

    Tries each URL once, with no client state: the socket is closed right after
    the welcome, so nothing waiting in the inbox is taken or acknowledged.
    Raises ``RoostError`` when the server refuses the token, ``CannotConnect``
    when no URL answered. ``tls`` verifies https/wss servers (see ``tls_context``)."""
    tls = tls or tls_context()
    failures: list[str] = []
    async with aiohttp.ClientSession() as http:
        for url in urls:
            try:
                connecting = http.ws_connect(ws_url(url), autoclose=True, ssl=tls)
                async with asyncio.timeout(timeout), connecting as ws:
                    auth = encode(f.Auth(token=token, client=uuid.uuid4().hex))
                    await ws.send_frame(auth, aiohttp.WSMsgType.TEXT)  # text only (docs/protocol.md)
                    first = await ws.receive()
                    if first.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                        raise ConnectionError("the server closed the connection during authentication")
                    frame = decode_server(first.data)
                    if isinstance(frame, f.Error):
                        raise RoostError(frame.code, frame.message)
                    if not isinstance(frame, f.Welcome):
                        raise ConnectionError("no welcome from the server (is this a Roost server?)")
                    return frame.user
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                failures.append(f"{url}: {describe_failure(exc)[0]}")
    raise CannotConnect("; ".join(failures))


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt))."""
    return rng.uniform(0, min(cap, base * (2 ** min(attempt, 30))))


class Client:
    def __init__(
        self,
        urls: str | Sequence[str],
        token: str,
        *,
        state_path: str | Path | None = None,
        reconnect: bool = True,
        backoff_base: float = 0.25,
        backoff_cap: float = 8.0,
        jitter: bool = True,
        heartbeat: float = 20.0,
        keep_events: bool = True,
        serve_local: bool = True,
        on_retry: Callable[[str, str, float], None] | None = None,
        ca_file: str | Path | None = None,
        ssl: ssl.SSLContext | None = None,
        e2ee: bool = True,
    ) -> None:
        """``on_retry(url, reason, delay)`` is called after each failed
        connection attempt that will be retried in ``delay`` seconds.
        https/wss servers are verified against the system's CAs plus
        ``ca_file`` (a private CA), or against the ``ssl`` context if given.
        ``e2ee``: tell the server this client keeps end-to-end keys, so it
        says after every welcome (a ``KeysLow`` event) when it holds few or
        none. The SDK always encrypts (``roost.client.crypto``) and refills
        its keys on ``KeysLow``; False only spares a client that will never
        publish keys of that reminder."""
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise InvalidArgument("at least one URL is needed")
        if not token.strip():
            raise InvalidArgument("the token is empty")
        self.token = token
        self.e2ee = e2ee
        self.tls = tls_context(ca_file, ssl)
        self.on_retry = on_retry
        # url -> (why its last attempt failed, whether that is final); emptied on connecting.
        self.failures: dict[str, tuple[str, bool]] = {}
        self.state = ClientState(state_path if state_path is not None else default_state_path(token))
        self.reconnect = reconnect
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.jitter = jitter
        self.heartbeat = heartbeat
        self.keep_events = keep_events
        # The local socket other commands of this account hand their work to.
        self._local = (
            LocalEndpoint(self, self.state.path)
            if serve_local and self.state.path != ":memory:" and hasattr(socket, "AF_UNIX")
            else None
        )
        # Known before connecting once the state has seen a welcome.
        self.user: str | None = self.state.get_meta("user")
        self.connections = 0  # successful connections so far
        # This client object's run: the server tells our own stale attempt
        # (superseded, 4007: reconnect) from another device (replaced, 4003: stop).
        self.instance = uuid.uuid4().hex
        self._rng = random.Random()
        self._http: aiohttp.ClientSession | None = None
        # The server URL of the current (or last) connection: relative media URLs point there.
        self.connected_url: str | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._first_result: asyncio.Future[None] | None = None
        self._closing = False
        self._fatal: RoostError | None = None
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        # outbox: id -> item, in send order; waiters for acks
        self._outbox = Outbox(self.state.outbox())
        self._out: deque[bytes] = deque()
        self._out_ready = asyncio.Event()
        self._ack_waiters: dict[str, asyncio.Future[SendResult]] = {}
        # Ids of messages another local command handed over (``LocalSend``):
        # the application shows them, so it hears of a refusal too.
        self._announced: set[str] = set()
        self._orders: dict[str, ConversationOrder[Message | Membership]] = {}
        for conv, have in self.state.haves().items():
            self._orders[conv] = ConversationOrder(have)
        self._dacked: dict[str, int] = {}
        self._dack_due: set[str] = set()
        self._dack_scheduled = False
        self._filling: set[str] = set()
        self._read_marks: dict[str, int] = {}
        marks = self.state.member_marks()
        self._receipts: dict[str, _ReceiptView] = {
            conv: _ReceiptView(d, r, marks.get(conv, {})) for conv, (d, r) in self.state.receipts().items()
        }
        self._receipt_waiters: list[tuple[str, int, str, asyncio.Future[None]]] = []
        self._requests: dict[str, asyncio.Future[Any]] = {}
        self._presence: set[str] = set()
        # Unconsumed messages handed to a reader that has not confirmed
        # showing them yet (see ``take_unconsumed``).
        self._claimed: set[tuple[str, int]] = set()
        self._unconsumed_waiters: list[asyncio.Future[None]] = []
        # message id -> future resolved with the reason once it is pending (no keys yet)
        self._pending_waiters: dict[str, asyncio.Future[str]] = {}
        # End-to-end encryption: every message is sealed before it leaves and
        # opened before it is stored or shown (roost.client.crypto).
        self.crypto = E2ee(self)
        # File sends waiting for their blob (send_file), uploaded in order by one task.
        self._uploader = Uploader(self)

    # -- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, timeout: float | None = 10.0) -> None:
        """Start the connection loop; return once authenticated (or raise)."""
        if self._run_task is not None:
            return
        if self._local is not None:
            await self._local.start()
        self._http = aiohttp.ClientSession()
        self._first_result = asyncio.get_running_loop().create_future()
        self._run_task = asyncio.create_task(self._run())
        self._uploader.start()
        try:
            await asyncio.wait_for(asyncio.shield(self._first_result), timeout)
        except CannotConnect:
            await self.close()
            raise
        except TimeoutError:
            await self.close()
            raise CannotConnect(f"gave up after {timeout:g} s: {self._failure_summary()}") from None
        except BaseException:
            await self.close()
            raise

    def _failure_summary(self) -> str:
        if not self.failures:
            return "no answer"
        return "; ".join(f"{url}: {reason}" for url, (reason, _) in self.failures.items())

    async def close(self) -> None:
        await self.crypto.close()  # first: a key upload under way may finish
        self._closing = True
        await self._uploader.stop()
        if self._local is not None:
            await self._local.close()
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._run_task is not None:
            self._run_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._run_task
            self._run_task = None
        if self._http is not None:
            await self._http.close()
            self._http = None
        self._fail_requests(ConnectionLost("client closed"))
        for fut in self._ack_waiters.values():
            if not fut.done():
                fut.set_exception(ConnectionLost("client closed before the ack"))
        self.state.close()

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until every queued frame (acks, read markers) was handed to the socket."""
        if self._dack_scheduled:
            self._flush_dacks()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._out and self._ws is not None and loop.time() < deadline:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    def pending_outbox(self) -> list[OutboxItem]:
        return list(self._outbox.values())

    def pending_uploads(self) -> list[UploadItem]:
        """File sends whose blob is not complete yet (their message is not in the outbox yet)."""
        return list(self._uploader.pending.values())

    async def drain_outbox(self, timeout: float = 5.0) -> bool:
        """Wait (up to ``timeout``) for the ✓ of everything in the outbox and
        of the file sends uploading, including what earlier runs queued,
        except what is pending for a recipient's keys (it cannot go soon);
        True if none is left."""
        waits = [self.wait_sent(mid) for mid in self._uploader.pending]
        waits += [self.wait_sent(mid) for mid, item in list(self._outbox.items()) if item.pending is None]
        if waits:
            with contextlib.suppress(TimeoutError, RoostError):
                await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), timeout)
        return not self._outbox and not self._uploader.pending

    # -- the connection loop -------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        index = 0
        while not self._closing:
            url = self.urls[index % len(self.urls)]
            index += 1
            code: int | None = None
            try:
                code = await self._session(url)
                attempt = 0 if code is not None else attempt
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.debug("connect to %s failed: %s", url, exc)
                self.failures[url] = describe_failure(exc)
            except RoostError as exc:
                self._fatal = exc
            finally:
                self._ws = None
                self._connected.clear()
                self._fail_requests(ConnectionLost())
            if self._closing:
                break
            if self._fatal is None and self.connections == 0 and self._all_failed_for_good():
                self._fatal = CannotConnect(self._failure_summary(), final=True)
            if self._fatal is None and code in FATAL_CLOSE_CODES:
                self._fatal = RoostError(
                    "replaced" if code == CloseCode.REPLACED else "closed",
                    f"server closed the connection with code {code}",
                )
            if self._fatal is not None:
                self._resolve_first(self._fatal)
                self._emit(Disconnected(code or 0, str(self._fatal), final=True))
                return
            self._emit(Disconnected(code or 0, "connection lost", final=not self.reconnect))
            if not self.reconnect:
                self._resolve_first(CannotConnect(self._failure_summary()))
                return
            delay = (
                backoff_delay(attempt, self.backoff_base, self.backoff_cap, self._rng)
                if self.jitter
                else min(self.backoff_cap, self.backoff_base * 2 ** min(attempt, 30))
            )
            attempt += 1
            if self.on_retry is not None and url in self.failures:
                try:
                    self.on_retry(url, self.failures[url][0], delay)
                except Exception:  # the application's bug must not end the reconnecting
                    log.exception("on_retry callback failed")
            await asyncio.sleep(delay)

    def _all_failed_for_good(self) -> bool:
        """Every URL failed in a way that retrying cannot mend (before any connection)."""
        return all(self.failures.get(url, ("", False))[1] for url in self.urls)

    def _resolve_first(self, exc: BaseException | None) -> None:
        fut = self._first_result
        if fut is not None and not fut.done():
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)

    async def _session(self, url: str) -> int | None:
        assert self._http is not None
        async with self._http.ws_connect(
            ws_url(url),
            ssl=self.tls,
            heartbeat=self.heartbeat,
            max_msg_size=4 * 1024 * 1024,
            autoclose=True,
            timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
        ) as ws:
            self.connected_url = ws_url(url)
            auth = encode(f.Auth(token=self.token, client=self.instance, e2ee=self.e2ee))
            await ws.send_frame(auth, aiohttp.WSMsgType.TEXT)  # text only (docs/protocol.md)
            first = await ws.receive(timeout=15.0)
            if first.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                raise ConnectionError("closed during authentication")
            frame = decode_server(first.data)
            if isinstance(frame, f.Error):
                if frame.code in (
                    ErrorCode.AUTH_FAILED,
                    ErrorCode.UNSUPPORTED_VERSION,
                    ErrorCode.AUTH_REQUIRED,
                ):
                    raise RoostError(frame.code, frame.message)
                raise ConnectionError(frame.message)
            if not isinstance(frame, f.Welcome):
                raise ConnectionError("expected welcome")
            self.failures.clear()
            if self.user != frame.user:
                self.user = frame.user
                self.state.set_meta("user", frame.user)
            self._ws = ws
            self._out.clear()
            writer = asyncio.create_task(self._write_loop(ws))
            try:
                self.connections += 1
                self._on_connected()
                self._connected.set()
                self._resolve_first(None)
                self._emit(Connected(frame.user))
                async for msg in ws:
                    if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                        self._on_frame(msg.data)
                    elif msg.type == aiohttp.WSMsgType.ERROR:
                        break
            finally:
                writer.cancel()
                self._out.clear()
            return ws.close_code

    def _on_connected(self) -> None:
        # Everything not acked is resent, oldest first, before any new send;
        # what still waits to be encrypted goes to the encryption pump.
        for item in list(self._outbox.values()):
            if item.ready:
                self._send_item(item)
        self.crypto.on_connected()
        self._dacked.clear()
        for conv in self._orders:
            self._dack_due.add(conv)
        self._schedule_dacks()
        for conv, seq in self._read_marks.items():
            self._write(encode(f.ReadMarker(conv=conv, seq=seq)))
        if self._presence:
            self._write(encode(f.PresenceSubscribe(users=sorted(self._presence))))
        self._filling.clear()
        for conv, order in self._orders.items():
            if order.buffer:
                self._fill_gap(conv)

    def _write(self, frame: bytes) -> None:
        """Queue a frame for the current socket (dropped if there is none:
        whatever matters is re-sent by ``_on_connected`` after a reconnect)."""
        if self._ws is None:
            return
        self._out.append(frame)
        self._out_ready.set()

    async def _write_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """The socket's only writer, so frames leave in the order queued."""
        with contextlib.suppress(ConnectionError, RuntimeError):
            while True:
                await self._out_ready.wait()
                self._out_ready.clear()
                while self._out:
                    await ws.send_frame(self._out.popleft(), aiohttp.WSMsgType.TEXT)

    def _send_item(self, item: OutboxItem) -> None:
        """Send the sealed (encrypted) item: never a plaintext body."""
        assert item.wire_body is not None and item.wire_ct is not None
        self._write(
            encode(f.Send(id=item.id, body=item.wire_body, ct=item.wire_ct, to=item.to, conv=item.conv))
        )

    def _queue(self, item: OutboxItem, *, commit: bool = True) -> None:
        """Into the durable outbox, sealed now if that needs no network (the
        session state joins the same transaction), and sent if sealed."""
        item = self.crypto.seal_now(item)
        self.state.outbox_add(item, commit=commit)
        self._outbox[item.id] = item
        if item.ready:
            self._send_item(item)
        else:
            self.crypto.wake()

    def _fail_item(self, message_id: str, code: str, message: str) -> None:
        """An outbox item that can never go (unknown user, not a member): removed, its sender told."""
        self._on_send_error(f.Error(code=code, message=message, ref=message_id))

    def _on_pending(self, message_id: str, to: str | None, conv: str | None, reason: str) -> None:
        self._emit(Pending(message_id, to, conv, reason))
        fut = self._pending_waiters.pop(message_id, None)
        if fut is not None and not fut.done():
            fut.set_result(reason)

    def wait_pending(self, message_id: str) -> Awaitable[str]:
        """Resolves with the reason once ``message_id`` is pending in the outbox
        for something other than the connection (the recipient has no keys yet)."""
        fut = self._pending_waiters.get(message_id)
        if fut is None:
            fut = self._pending_waiters[message_id] = asyncio.get_running_loop().create_future()
            fut.add_done_callback(_retrieved)
        item = self._outbox.get(message_id)
        if item is not None and item.pending is not None and not fut.done():
            fut.set_result(item.pending)
        return asyncio.shield(fut)

    # -- sending -------------------------------------------------------------

    # What send returns follows ``wait``; each overload repeats send's
    # parameters, so a new parameter goes in all four.
    @overload
    async def send(
        self,
        text: str | None = None,
        *,
        to: str | None = None,
        group: str | None = None,
        conv: str | None = None,
        body: bytes | None = None,
        ct: str = "text/plain",
        message_id: str | None = None,
        wait: Literal[True] = True,
        announce: bool = False,
    ) -> SendResult: ...
    @overload
    async def send(
        self,
        text: str | None = None,
        *,
        to: str | None = None,
        group: str | None = None,
        conv: str | None = None,
        body: bytes | None = None,
        ct: str = "text/plain",
        message_id: str | None = None,
        wait: Literal[False],
        announce: bool = False,
    ) -> str: ...
    @overload
    async def send(
        self,
        text: str | None = None,
        *,
        to: str | None = None,
        group: str | None = None,
        conv: str | None = None,
        body: bytes | None = None,
        ct: str = "text/plain",
        message_id: str | None = None,
        wait: bool,
        announce: bool = False,
    ) -> SendResult | str: ...

    async def send(
        self,
        text: str | None = None,
        *,
        to: str | None = None,
        group: str | None = None,
        conv: str | None = None,
        body: bytes | None = None,
        ct: str = "text/plain",
        message_id: str | None = None,
        wait: bool = True,
        announce: bool = False,
    ) -> SendResult | str:
        """Send a message to a user (``to``) or a conversation (``group``/``conv``).

        The message is in the durable outbox when this returns or raises,
        except for ``InvalidMessage`` (empty, or over 64 KiB), raised at once
        with nothing queued.
        With ``wait`` it returns the ``SendResult`` at ✓ (stored by the server);
        without, it returns the message id at once. ``announce`` emits a
        ``LocalSend`` event for it (a message another local command handed over).
        """
        target_conv = group or conv
        if (to is None) == (target_conv is None):
            raise ValueError("give exactly one of to= and group=/conv=")
        if (text is None) == (body is None):
            raise ValueError("give exactly one of text and body=")
        payload = message_payload(text, body)
        item = OutboxItem(
            message_id or uuid.uuid4().hex, to, target_conv, ct, payload, int(time.time() * 1000)
        )
        future: asyncio.Future[SendResult] | None = (
            asyncio.get_running_loop().create_future() if wait else None
        )
        if future is not None:
            self._ack_waiters[item.id] = future
        if item.id not in self._outbox:
            self._queue(item)
            if announce:
                self._announced.add(item.id)
                self._emit(LocalSend(item.id, item.to, item.conv, item.ct, item.body, item.created))
        if future is None:
            return item.id
        return await future

    def wait_sent(self, message_id: str) -> Awaitable[SendResult]:
        """The ✓ of a message in the outbox (queued by ``send(wait=False)`` or
        by an earlier run), to await; raises ``RoostError`` if the server
        refuses it. Registered at the call, so an answer that arrives before
        the caller awaits it is not missed."""
        if message_id not in self._outbox and message_id not in self._uploader.pending:
            raise KeyError(f"{message_id} is not in the outbox")
        fut = self._ack_waiters.get(message_id)
        if fut is None or fut.done():
            fut = self._ack_waiters[message_id] = asyncio.get_running_loop().create_future()
            # Shielded: a waiter that timed out leaves it to the next one (or to close()).
            fut.add_done_callback(_retrieved)
        waiter = asyncio.shield(fut)
        waiter.add_done_callback(_retrieved)  # a caller that gave up (queued) does not await it
        return waiter

    # -- files -------------------------------------------------------------------

    async def send_file(
        self,
        path: str | Path,
        *,
        to: str | None = None,
        group: str | None = None,
        conv: str | None = None,
        caption: str | None = None,
        progress: Progress | None = None,
        message_id: str | None = None,
        wait: bool = True,
        announce: bool = False,
    ) -> SendResult | str:
        """Send the file at ``path`` to a user (``to``) or a conversation.

        The file is encrypted with a fresh key into the state's media dir and
        the send is durable when this returns or raises (but for
        ``InvalidArgument``/``OSError``, raised with nothing queued): the blob
        is uploaded in parts, resumed after a reconnect or a restart on the
        same state, and the message carrying the reference goes out only once
        the blob is complete, exactly once. ``progress(done, total)`` reports
        uploaded bytes (this run only). With ``wait`` it returns the
        ``SendResult`` at ✓; without, the message id at once; ``wait_sent`` works on it.
        ``announce`` emits a ``LocalSend`` event (its body the reference, blob id still empty)."""
        target_conv = group or conv
        if (to is None) == (target_conv is None):
            raise ValueError("give exactly one of to= and group=/conv=")
        source = Path(path)
        if not source.is_file():
            raise InvalidArgument(f"{source} is not a file")
        if caption is not None and len(caption) > MAX_CAPTION_CHARS:
            raise InvalidMessage(f"the caption is over {MAX_CAPTION_CHARS} characters")
        message_id = message_id or uuid.uuid4().hex
        if progress is not None:
            self._uploader.progress[message_id] = progress
        future: asyncio.Future[SendResult] | None = None
        if wait:
            future = self._ack_waiters[message_id] = asyncio.get_running_loop().create_future()
        if message_id not in self._outbox and message_id not in self._uploader.pending:
            try:
                item = await self._uploader.add(source, to, target_conv, caption, message_id)
            except BaseException:
                self._ack_waiters.pop(message_id, None)
                self._uploader.progress.pop(message_id, None)
                raise
            if announce:
                self._announced.add(item.id)
                self._emit(LocalSend(item.id, item.to, item.conv, ATTACHMENT_CT, item.ref, item.created))
        if future is None:
            return message_id
        return await future

    async def download(
        self, message: Message, dest_dir: str | Path, progress: Progress | None = None
    ) -> Path:
        """Save ``message``'s attachment in ``dest_dir``; the path written.

        The name is the sender's file name made safe (no directory part) and
        never replaces a file: ``name (1).ext`` and so on. Resumes a cut
        download. ``InvalidAttachment`` if the message is not a valid
        attachment, ``BlobTampered`` if the blob fails its digest or MAC
        check (nothing is written then), ``RoostError`` if the server refuses."""
        return await download_attachment(self, message, Path(dest_dir), progress)

    def media_folder(self) -> Path:
        """Where this client keeps encrypted uploads and partial downloads
        (``STATE.media`` beside the state file; a temporary one for ``:memory:``)."""
        return self._uploader.folder

    def _queue_finished_upload(self, item: OutboxItem) -> None:
        """A file send's blob is complete: its reference message replaces the
        upload row in one transaction (sealed like any message) and is sent."""
        self.state.upload_remove(item.id, commit=False)
        self._queue(item)

    def _fail_send(self, message_id: str, code: str, message: str) -> None:
        """A send refused for good (already out of the state): tell whoever waits, else the events."""
        waiter = self._ack_waiters.pop(message_id, None)
        awaited = waiter is not None and not waiter.done()
        if waiter is not None and awaited:
            waiter.set_exception(RoostError(code, message))
        if not awaited or message_id in self._announced:
            self._emit(ErrorEvent(code, message, message_id))
        self._announced.discard(message_id)

    def _on_ack(self, frame: f.SendAck) -> None:
        item = self._outbox.pop(frame.id, None)
        if item is not None:
            self.state.outbox_remove(frame.id)
            if not item.control:  # the local copy: history, and what a retry request resends
                self.state.store_message(
                    frame.conv, frame.seq, frame.id, self.user or "", item.ct, item.body, frame.ts,
                    consumed=True, encrypted=item.wire_ct == E2EE_CT,
                )  # fmt: skip
        self._accept(frame.conv, frame.seq, None)
        self.state.commit()
        self._announced.discard(frame.id)
        self._pending_waiters.pop(frame.id, None)
        if item is not None and not item.control:
            self._emit(Sent(frame.id, frame.conv, frame.seq, frame.ts))
        elif item is not None:
            self._emit(ProtocolMessage(frame.conv, frame.seq, self.user or "", outgoing=True))
        waiter = self._ack_waiters.pop(frame.id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(SendResult(frame.id, frame.conv, frame.seq, frame.ts, frame.duplicate))

    def _on_send_error(self, frame: f.Error) -> bool:
        """An error about one of our sends. True if it was one."""
        if frame.ref not in self._outbox:
            return False
        if frame.code in RETRYABLE:
            return True  # stays in the outbox; resent after the reconnect
        item = self._outbox.pop(frame.ref)
        self.state.outbox_remove(frame.ref)
        self.state.commit()
        if item.control:
            return True  # a protocol message to someone gone: nobody to tell
        waiter = self._ack_waiters.pop(frame.ref, None)
        awaited = False
        if waiter is not None and not waiter.done():
            waiter.set_exception(RoostError(frame.code, frame.message))
            awaited = True
        if not awaited or frame.ref in self._announced:
            self._emit(ErrorEvent(frame.code, frame.message, frame.ref))
        self._announced.discard(frame.ref)
        return True

    # -- receiving -----------------------------------------------------------

    def _on_frame(self, data: bytes | str) -> None:
        try:
            frame = decode_server(data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            log.warning("undecodable frame from server: %.200r", data)
            return
        if isinstance(frame, f.Deliver):
            self._on_deliver(frame.conv, frame.seq, frame.id, frame.sender, frame.ct, frame.body, frame.ts)
            self.state.commit()
        elif isinstance(frame, f.SendAck):
            self._on_ack(frame)
        elif isinstance(frame, f.Receipt):
            self._on_receipt(frame)
        elif isinstance(frame, f.Presence):
            self._emit(PresenceEvent(frame.user, frame.online, frame.last_seen))
        elif isinstance(frame, f.TypingEvent):
            self._emit(TypingEvent(frame.conv, frame.user, frame.active))
        elif isinstance(frame, f.HistoryPage):
            self._on_history_page(frame)
        elif isinstance(frame, f.GroupState):
            self._resolve_request(
                frame.ref,
                GroupInfo(frame.group, frame.name, frame.members, frame.admins, frame.last_seq),
            )
        elif isinstance(frame, f.BlobSlot | f.BlobUrls | f.BlobState | f.BlobUrl):
            self._resolve_request(frame.ref, frame)
        elif isinstance(frame, f.KeysState):
            self._resolve_request(frame.ref, KeyCounts(frame.ec, frame.kem, frame.has_identity))
        elif isinstance(frame, f.KeysBundle):
            self._resolve_request(frame.ref, bundle_of(frame))
        elif isinstance(frame, f.KeysLow):
            self._emit(KeysLow(frame.ec, frame.kem))
            self.crypto.keys_low()
        elif isinstance(frame, f.Error):
            if self._on_send_error(frame):
                return
            if frame.ref and frame.ref in self._requests:
                self._fail_request(frame.ref, RoostError(frame.code, frame.message))
                return
            self._emit(ErrorEvent(frame.code, frame.message, frame.ref))

    def _order(self, conv: str) -> ConversationOrder[Message | Membership]:
        order = self._orders.get(conv)
        if order is None:
            order = self._orders[conv] = ConversationOrder()
        return order

    def _on_deliver(
        self, conv: str, seq: int, message_id: str, sender: str, ct: str, body: bytes, ts: int
    ) -> None:
        if sender == self.user:
            # Sent by this account from another state (a gap fill brings it):
            # it belongs in the local history, and the user has seen it; an
            # encrypted one was sealed for the others and cannot be read here.
            if ct != E2EE_CT:
                self.state.store_message(conv, seq, message_id, sender, ct, body, ts, consumed=True)
            self._accept(conv, seq, None)
            return
        item: Message | Membership
        if sender == f.SYSTEM_SENDER and ct == f.MEMBERSHIP_CT:
            item = Membership.parse(conv, seq, body, ts)
            if item.action in ("created", "added") and self.user in item.users:
                # We see the group from here on; nothing before concerns us.
                self._release(conv, self._order(conv).skip_to(seq - 1))
        else:
            item = Message(conv, seq, message_id, sender, ct, body, ts)
        self._accept(conv, seq, item)

    def _accept(self, conv: str, seq: int, item: Message | Membership | None) -> None:
        order = self._order(conv)
        accepted = order.accept(seq, item)
        self._release(conv, accepted.released)
        if accepted.gap is not None:
            self._fill_gap(conv)

    def _release(self, conv: str, released: list[tuple[int, Message | Membership | None]]) -> None:
        if not released:
            return
        for _seq, item in released:
            if isinstance(item, Message):
                # Decrypted in seq order, the session or sender-key state
                # written in this transaction with the message and the cursor.
                self._show(self.crypto.open(item) if item.ct == E2EE_CT else [item])
                continue
            if isinstance(item, Membership):
                # The sender-key consequences at once (a removal rotates our
                # key before the next send); the event itself in seq order.
                self.crypto.on_membership(item)
                if self.crypto.hold_membership(item):
                    continue
            if item is not None:
                self._emit(item)
        self.state.save_have(conv, self._orders[conv].have)
        self._dack_due.add(conv)
        self._schedule_dacks()

    def _show(self, messages: list[Message]) -> None:
        """Store received messages (in the open transaction), then emit them."""
        for m in messages:
            if m.sender == f.SYSTEM_SENDER and m.ct == f.MEMBERSHIP_CT:  # a membership event held behind
                self._emit(Membership.parse(m.conv, m.seq, m.body, m.ts))
                continue
            self.state.store_message(m.conv, m.seq, m.id, m.sender, m.ct, m.body, m.ts, encrypted=m.encrypted)
            self._wake_unconsumed_waiters()
            self._emit(m)

    def _schedule_dacks(self) -> None:
        if not self._dack_scheduled:
            self._dack_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_dacks)

    def _flush_dacks(self) -> None:
        # Coalesced: one cumulative ack per conversation per loop pass, sent
        # only after the local commit of what it covers.
        self._dack_scheduled = False
        self.state.commit()
        for conv in self._dack_due:
            have = self._orders[conv].have
            if have > self._dacked.get(conv, 0) and self._ws is not None:
                self._dacked[conv] = have
                self._write(encode(f.DeliveryAck(conv=conv, seq=have)))
        self._dack_due.clear()

    def _fill_gap(self, conv: str) -> None:
        if conv in self._filling or self._ws is None:
            return
        self._filling.add(conv)
        order = self._orders[conv]
        ref = f"fill-{uuid.uuid4().hex[:12]}"
        self._requests[ref] = asyncio.get_running_loop().create_future()
        self._requests[ref].add_done_callback(lambda fut: fut.exception())
        self._write(encode(f.HistoryRequest(conv=conv, after=order.have, limit=HISTORY_PAGE, ref=ref)))

    def _on_history_page(self, frame: f.HistoryPage) -> None:
        if frame.ref.startswith("fill-"):
            self._requests.pop(frame.ref, None)
            self._filling.discard(frame.conv)
            order = self._order(frame.conv)
            if frame.first_seq - 1 > order.have:
                self._release(frame.conv, order.skip_to(frame.first_seq - 1))
            for m in frame.messages:
                self._on_deliver(frame.conv, m.seq, m.id, m.sender, m.ct, m.body, m.ts)
            self.state.commit()
            return
        self._resolve_request(
            frame.ref,
            ([self._readable(frame.conv, m) for m in frame.messages], frame.last_seq),
        )

    def _readable(self, conv: str, m: f.HistoryMessage) -> Message:
        """A history page's message as this device can show it: a ciphertext
        can be decrypted only once, so it is the local copy (or, if this device
        never had it, an empty body under the encrypted content type)."""
        if m.ct != E2EE_CT:
            return Message(conv, m.seq, m.id, m.sender, m.ct, m.body, m.ts)
        local = self.state.stored_message(conv, m.seq)
        if local is not None:
            mid, sender, ct, body, ts = local
            return Message(conv, m.seq, mid, sender, ct, body, ts, encrypted=True)
        return Message(conv, m.seq, m.id, m.sender, E2EE_CT, b"", m.ts, encrypted=True)

    def _on_receipt(self, frame: f.Receipt) -> None:
        view = self._receipts.setdefault(frame.conv, _ReceiptView())
        view.all_delivered = max(view.all_delivered, frame.all_delivered)
        view.all_read = max(view.all_read, frame.all_read)
        now = int(time.time() * 1000)
        for user, marks in frame.marks.items():
            old = view.marks.get(user, (0, 0))
            view.marks[user] = (max(old[0], marks.delivered), max(old[1], marks.read))
            # Each advance is kept with the time it was heard (receipt_times).
            if marks.delivered > old[0]:
                self.state.save_member_mark(frame.conv, user, "delivered", marks.delivered, now)
            if marks.read > old[1]:
                self.state.save_member_mark(frame.conv, user, "read", marks.read, now)
        self.state.save_receipt(frame.conv, view.all_delivered, view.all_read)
        self.state.commit()
        self._write(encode(f.ReceiptAck(conv=frame.conv, rv=frame.rv)))
        self._emit(
            ReceiptEvent(
                frame.conv,
                {u: (m.delivered, m.read) for u, m in frame.marks.items()},
                frame.all_delivered,
                frame.all_read,
            )
        )
        still = []
        for conv, seq, kind, fut in self._receipt_waiters:
            if fut.done():
                continue
            if conv == frame.conv and self._receipt_reached(conv, seq, kind):
                fut.set_result(None)
            else:
                still.append((conv, seq, kind, fut))
        self._receipt_waiters = still

    def _receipt_reached(self, conv: str, seq: int, kind: str) -> bool:
        view = self._receipts.get(conv)
        if view is None:
            return False
        return (view.all_read if kind == "read" else view.all_delivered) >= seq

    async def wait_receipt(self, conv: str, seq: int, kind: str = "delivered") -> None:
        """Wait until every other member has ``kind`` (delivered / read) ``seq``."""
        if kind not in ("delivered", "read"):
            raise ValueError("kind is 'delivered' or 'read'")
        if self._receipt_reached(conv, seq, kind):
            return
        fut = asyncio.get_running_loop().create_future()
        self._receipt_waiters.append((conv, seq, kind, fut))
        await fut

    def receipt_state(self, conv: str) -> tuple[int, int]:
        view = self._receipts.get(conv, _ReceiptView())
        return view.all_delivered, view.all_read

    def receipt_marks(self, conv: str) -> dict[str, tuple[int, int]]:
        """member -> (delivered seq, read seq) for ``conv``: the marks of the
        other members for this user's messages there (kept in the state)."""
        view = self._receipts.get(conv)
        return dict(view.marks) if view is not None else {}

    def receipt_times(self, conv: str, seq: int) -> dict[str, tuple[int | None, int | None]]:
        """member -> (delivered at, read at), ms, for this user's message
        ``seq`` of ``conv``; None while that member has not. The time is when
        this device heard the member's mark reach ``seq`` (the protocol's
        marks carry no times; a connected client hears each at once)."""
        return self.state.receipt_times(conv, seq)

    def _emit(self, event: Event) -> None:
        if self.keep_events:
            self._events.put_nowait(event)

    async def events(self, timeout: float | None = None) -> AsyncIterator[Event]:
        """Events in arrival order; messages per conversation in seq order, once."""
        while True:
            try:
                event = await asyncio.wait_for(self._events.get(), timeout)
            except TimeoutError:
                return
            yield event

    async def next_event(self, timeout: float | None = None) -> Event:
        return await asyncio.wait_for(self._events.get(), timeout)

    # -- requests ------------------------------------------------------------

    async def _request(self, frame: Any, timeout: float = 30.0) -> Any:
        await asyncio.wait_for(self._connected.wait(), timeout)
        ref = uuid.uuid4().hex[:16]
        frame.ref = ref
        fut = asyncio.get_running_loop().create_future()
        self._requests[ref] = fut
        self._write(encode(frame))
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._requests.pop(ref, None)

    def _resolve_request(self, ref: str, value: Any) -> None:
        fut = self._requests.pop(ref, None)
        if fut is not None and not fut.done():
            fut.set_result(value)

    def _fail_request(self, ref: str, exc: BaseException) -> None:
        fut = self._requests.pop(ref, None)
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def _fail_requests(self, exc: BaseException) -> None:
        for ref in list(self._requests):
            self._fail_request(ref, exc)
        self._filling.clear()

    # -- blobs (roost/client/blobs.py) ----------------------------------------

    async def upload_blob(
        self,
        source: Path,
        *,
        kind: str,
        progress: Callable[[int, int], None] | None = None,
        resume: str | None = None,
        on_slot: Callable[[str], None] | None = None,
    ) -> str:
        """Upload ``source``'s bytes as they are (the caller encrypted them) in
        parts; with ``resume``, finish that blob's upload (only the parts the
        store lacks are sent). Returns the blob id, complete.
        ``progress(bytes_done, total)`` is called as parts finish;
        ``on_slot(blob)`` once a new upload has its id, before any byte is
        sent (record it to resume after a crash)."""
        from roost.client.blobs import upload_blob

        return await upload_blob(self, source, kind=kind, progress=progress, resume=resume, on_slot=on_slot)

    async def download_blob(
        self, blob: str, dest: Path, *, progress: Callable[[int, int], None] | None = None
    ) -> None:
        """Download a complete blob to ``dest``, resuming what ``dest`` already holds (Range).

        ``dest`` must hold nothing but a prefix of this very blob (name it after
        the blob id): its bytes are trusted as they are, and a file already of
        the blob's size counts as done. The caller's digest check is what proves
        the whole file right."""
        from roost.client.blobs import download_blob

        await download_blob(self, blob, dest, progress=progress)

    async def _group_request(self, frame: Any) -> GroupInfo:
        info: GroupInfo = await self._request(frame)  # a group reply resolves it with a GroupInfo
        return info

    async def create_group(self, name: str, members: Sequence[str]) -> GroupInfo:
        return await self._group_request(f.GroupCreate(name=name, members=list(members)))

    async def add_members(self, group: str, members: Sequence[str]) -> GroupInfo:
        return await self._group_request(f.GroupAdd(group=group, members=list(members)))

    async def remove_members(self, group: str, members: Sequence[str]) -> GroupInfo:
        return await self._group_request(f.GroupRemove(group=group, members=list(members)))

    async def leave_group(self, group: str) -> GroupInfo:
        return await self._group_request(f.GroupLeave(group=group))

    async def group_info(self, group: str) -> GroupInfo:
        return await self._group_request(f.GroupInfo(group=group))

    # -- the key directory (transport only: roost.e2ee makes the keys) ----------

    async def put_keys(self, upload: KeyUpload) -> KeyCounts:
        """Publish this device's keys (more than 100 one-time keys of a kind
        go out as several frames, in order). Raises ``RoostError`` with the
        server's code (bad_key, bad_signature, too_many_keys,
        duplicate_key_id, invalid, rate_limited): a refused frame changed
        nothing, the frames before it stay stored."""
        counts: KeyCounts | None = None
        for frame in upload_frames(upload):
            counts = await self._request(frame)
        assert counts is not None
        return counts

    async def key_counts(self) -> KeyCounts:
        counts: KeyCounts = await self._request(f.KeysCount())
        return counts

    async def fetch_bundle(self, user: str) -> PreKeyBundle:
        """``user``'s prekey bundle; hands out one of its one-time keys of each
        kind. Raises ``RoostError`` (no_keys, unknown_user, rate_limited)."""
        bundle: PreKeyBundle = await self._request(f.KeysGet(user=user))
        return bundle

    async def history(
        self, conv: str, *, before: int | None = None, after: int | None = None, limit: int = 50
    ) -> tuple[list[Message], int]:
        """A page of ``conv`` from the server: (messages ascending, last seq)."""
        page: tuple[list[Message], int] = await self._request(
            f.HistoryRequest(conv=conv, before=before, after=after, limit=limit)
        )
        return page

    async def mark_read(self, conv: str, seq: int) -> None:
        """Tell the senders ``conv`` was read up to ``seq`` (blue ticks).

        Read implies shown: those messages are also marked consumed, so the
        chat that displays them needs no second call."""
        self.state.mark_consumed(conv, seq)
        if seq > self._read_marks.get(conv, 0):
            self._read_marks[conv] = seq
            self._write(encode(f.ReadMarker(conv=conv, seq=seq)))

    async def subscribe_presence(self, users: Sequence[str]) -> None:
        self._presence.update(users)
        self._write(encode(f.PresenceSubscribe(users=list(users))))

    async def unsubscribe_presence(self, users: Sequence[str]) -> None:
        self._presence.difference_update(users)
        self._write(encode(f.PresenceUnsubscribe(users=list(users))))

    async def typing(self, conv: str, active: bool = True) -> None:
        self._write(encode(f.Typing(conv=conv, active=active)))

    async def ping(self) -> None:
        self._write(encode(f.Ping(t=int(time.time() * 1000))))

    def unconsumed(self, conv: str | None = None, limit: int | None = None) -> list[Message]:
        """Received messages no one has shown to the user yet, oldest first.

        Every received message is stored unconsumed before it is emitted; a
        client that shows it (``roost listen`` prints it, ``roost chat``
        displays its chat) calls ``mark_consumed`` (``mark_read`` does it too). What a short-lived command
        such as ``roost send`` received meanwhile stays here for the next
        ``roost listen``, and ``len(unconsumed(conv))`` is the chat's unread count.
        """
        return [Message(*row) for row in self.state.unconsumed(conv, limit)]

    def unread_counts(self) -> dict[str, int]:
        """conv -> number of unconsumed (unread) received messages in it."""
        return self.state.unconsumed_counts()

    def is_consumed(self, conv: str, seq: int) -> bool:
        """False while ``(conv, seq)`` is a received message not yet shown to the user."""
        return self.state.is_consumed(conv, seq)

    def mark_consumed(self, conv: str, seq: int) -> None:
        """The user has been shown ``conv`` up to ``seq``: committed at once, so
        no later client (``roost listen`` after a restart) shows them again.
        ``mark_read`` does this too; this alone tells the sender nothing."""
        self.state.mark_consumed(conv, seq)

    # Two readers of one client (a running ``roost listen`` and one handed
    # over through the local socket) must not both show a message: a reader
    # claims it, shows it, then ``consume``s it (or ``release``s it unshown).

    def claim(self, message: Message) -> bool:
        """True if ``message`` is unconsumed and no other reader holds it; it is now claimed."""
        key = (message.conv, message.seq)
        if key in self._claimed or self.state.is_consumed(*key):
            return False
        self._claimed.add(key)
        return True

    def take_unconsumed(self, limit: int) -> list[Message]:
        """Claim up to ``limit`` of the oldest unconsumed messages."""
        taken: list[Message] = []
        for m in self.unconsumed(limit=limit + len(self._claimed)):
            if len(taken) < limit and self.claim(m):
                taken.append(m)
        return taken

    def consume(self, messages: Sequence[Message]) -> None:
        """Claimed messages were shown: mark them consumed and drop the claims.

        A ``Consumed`` event follows, so an application counting unread
        messages learns of it (``roost chat``, when a ``roost listen`` handed
        to it printed them)."""
        for m in messages:
            self.state.consume_one(m.conv, m.seq)
        self.release(messages)
        if messages:
            self._emit(Consumed(tuple(dict.fromkeys(m.conv for m in messages))))

    def release(self, messages: Sequence[Message]) -> None:
        for m in messages:
            self._claimed.discard((m.conv, m.seq))

    async def wait_unconsumed(self, timeout: float) -> None:
        """Return once a new message is stored, or after ``timeout`` seconds."""
        fut = asyncio.get_running_loop().create_future()
        self._unconsumed_waiters.append(fut)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fut, timeout)

    def _wake_unconsumed_waiters(self) -> None:
        waiters, self._unconsumed_waiters = self._unconsumed_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    # -- end-to-end encryption: the user's view of a contact's key ---------------

    async def safety_number(self, user: str) -> SafetyNumber:
        """Signal's 60-digit safety number with ``user`` (the same on both
        sides when no one is in between), and whether the user verified it.
        Fetches their keys (starting a session) if this device never saw them;
        raises ``RoostError`` (``no_keys``, ``unknown_user``) if it cannot."""
        if self.state.identity(user) is None:
            await self.crypto.ensure_session(user)
        number = self.crypto.safety_number(user)
        seen = self.state.identity(user)
        assert number is not None and seen is not None
        return SafetyNumber(user, number, verified=seen[1], changed=seen[2])

    def mark_verified(self, user: str, verified: bool = True) -> None:
        """The user compared safety numbers with ``user`` (or withdraws that):
        kept in the state until their identity key changes."""
        if self.state.identity(user) is None:
            raise InvalidArgument(f"no key seen for {user} yet")
        self.state.set_identity_verified(user, verified)

    def local_history(self, conv: str, limit: int = 50, before: int | None = None) -> list[Message]:
        """Stored messages of ``conv``, oldest first: the newest ``limit``, or
        the ``limit`` just older than seq ``before`` (paging back)."""
        return [
            Message(conv, seq, mid, sender, ct, body, ts, encrypted)
            for seq, mid, sender, ct, body, ts, encrypted in self.state.local_history(conv, limit, before)
        ]

    def search_local(self, text: str, limit: int = 50) -> list[Message]:
        """Stored text messages containing ``text``, newest first (the local
        history only: the server cannot search what it cannot read)."""
        return [Message(*row) for row in self.state.search(text, limit)]
