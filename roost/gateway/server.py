"""The gateway: HTTP + WebSocket endpoint, authentication, heartbeats, shutdown.

It terminates sockets and forwards frames; every decision about messages is
the chat service's. One listener serves two protocols: a request for
``/v1/ws`` goes to picows (roost/gateway/websocket.py), every other request
to aiohttp (roost/gateway/admission.py picks by the request line).
Endpoints:

* ``GET /v1/ws``   WebSocket, JSON text frames (docs/protocol.md)
* ``GET /healthz`` 200 ``{"status": "ok"}`` once the store is open (liveness)
* ``GET /readyz``  200 while the store (and Redis) answer and the gateway is
  not draining, else 503 with a reason (roost/gateway/readiness.py)
* ``PUT /media/{blob}/{part}``, ``GET /media/{blob}`` signed upload and
  download URLs of the local blob store (roost/media/local.py); absent when
  blobs go to S3

With ``tls_cert``/``tls_key`` the same listener speaks https/wss only
(roost/gateway/tls.py); SIGHUP reloads the certificate for new connections.

``GET /metrics`` (Prometheus) is served only on the admin listener
(``admin_port``; off when unset), never on the public port.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiofastnet
from aiohttp import web
from picows import WSUpgradeResponse, WSUpgradeResponseWithListener
from prometheus_client.aiohttp import make_aiohttp_handler

from roost.core.metrics import Metrics
from roost.gateway.admission import Admission, AdmissionLimits
from roost.gateway.connection import Connection
from roost.gateway.readiness import Readiness
from roost.gateway.tls import ServerTLS
from roost.gateway.websocket import WebSocketSession, websocket_protocol
from roost.media.config import MediaConfig
from roost.media.factory import make_blob_store
from roost.media.local import LocalBlobStore
from roost.media.sweeper import Sweeper
from roost.protocol import frames as f
from roost.protocol.codec import decode_client, encode
from roost.protocol.errors import CloseCode, ErrorCode, ProtocolError
from roost.registry.memory import MemoryRegistry
from roost.service.admin import AdminServer
from roost.service.chat import ChatService, ServiceConfig, error_frame, now_ms
from roost.service.media import MediaService
from roost.store.base import StoreUnavailable
from roost.store.sqlite import COMMIT_INTERVAL_SECONDS, SqliteStore, database_path

log = logging.getLogger("roost.gateway")

# A request that starts so, then a space or a query, goes to picows.
WEBSOCKET_REQUEST = b"GET /v1/ws"


@dataclass(slots=True)
class GatewayConfig:
    data_dir: Path = Path("roost-data")
    # Cluster mode: a PostgreSQL DSN for the store and a Redis URL for the
    # registry. Unset: embedded SQLite under data_dir and an in-process registry.
    store_url: str | None = None
    registry_url: str | None = None
    gateway_id: str = ""
    host: str = "127.0.0.1"
    port: int = 8765
    # Both or neither: the listener then serves https:// and wss:// only.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    heartbeat: float = 30.0  # ping interval; a peer silent for ~1.5x this is dropped
    auth_timeout: float = 10.0  # upgrade -> auth frame; within admission's deadline
    admission: AdmissionLimits = field(default_factory=AdmissionLimits)
    max_queued_bytes: int = 8 * 1024 * 1024
    shutdown_timeout: float = 5.0
    # SIGTERM: /readyz turns 503 at once; open sockets are closed with 1001
    # spread evenly over this many seconds (0: all at once), so clients do
    # not all reconnect in the same second.
    drain_seconds: float = 5.0
    service: ServiceConfig = field(default_factory=ServiceConfig)
    # The admin listener serving /metrics: off when admin_port is None.
    admin_host: str = "127.0.0.1"
    admin_port: int | None = None
    # Blobs (attachments): local files under data_dir by default, or S3.
    media: MediaConfig = field(default_factory=MediaConfig)
    # Embedded store: commit pacing under load (roost/store/sqlite.py).
    commit_interval: float = COMMIT_INTERVAL_SECONDS


def make_store(config: GatewayConfig, metrics: Metrics | None = None) -> Any:
    url = config.store_url
    if url is None:
        return SqliteStore(
            database_path(config.data_dir), metrics=metrics, commit_interval=config.commit_interval
        )
    if url.startswith(("postgresql://", "postgres://")):
        from roost.store.postgres import PostgresStore

        return PostgresStore(url, metrics=metrics)
    raise ValueError(f"unsupported --store URL {url!r}: use postgresql://...")


def make_registry(config: GatewayConfig, metrics: Metrics | None = None) -> Any:
    url = config.registry_url
    if url is None:
        return MemoryRegistry()
    if url.startswith(("redis://", "rediss://", "unix://")):
        from roost.registry.redis import RedisRegistry

        gateway_id = config.gateway_id or f"{socket.gethostname()}:{config.port}:{os.getpid()}"
        return RedisRegistry(url, gateway_id, metrics=metrics)
    raise ValueError(f"unsupported --registry URL {url!r}: use redis://...")


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.tls: ServerTLS | None = None
        if config.tls_cert is not None and config.tls_key is not None:
            self.tls = ServerTLS(config.tls_cert, config.tls_key)  # a bad pair: nothing opened yet
        self.metrics = Metrics()
        self.store = make_store(config, self.metrics)
        self.registry = make_registry(config, self.metrics)
        self.blobs = make_blob_store(config.media, config.data_dir)
        self.media = MediaService(self.store, self.blobs, config.media)
        self.sweeper = Sweeper(self.store, self.blobs, config.media.limits, config.media.sweep_interval)
        self.service = ChatService(self.store, self.registry, config.service, self.metrics, self.media)
        self.connections: set[Connection] = set()
        self._route_websocket = self._websocket_listener  # one bound method for every socket
        self.metrics.connections_open.set_function(lambda: len(self.connections))
        self._metrics_runner: web.AppRunner | None = None
        self.admin_port: int | None = None
        self.ready = False
        self.stopping = False
        self._auth_unavailable = RateLimitedWarning("authentication deferred, store unavailable")
        self.app = web.Application()
        # Only a connection's first request can become a WebSocket (see
        # _protocol_for); a later one on a kept-alive connection is told to
        # come again on a new connection.
        self.app.router.add_get("/v1/ws", self._upgrade_on_a_new_connection)
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        if isinstance(self.blobs, LocalBlobStore):
            self.blobs.add_routes(self.app, self._media_authorized)
        self.readiness = Readiness(self.store, self.registry, cluster=config.registry_url is not None)
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.AbstractServer | None = None
        self.admission: Admission | None = None
        self.port: int | None = None
        # Embedded: `roost user token reset / disable / remove` reach this
        # server through a socket in its data directory (cluster: via Redis).
        self.admin: AdminServer | None = None
        if config.store_url is None:
            self.admin = AdminServer(config.data_dir, self.store, self.service, now_ms)

    async def start(self) -> None:
        await self.store.open()
        await self.blobs.start()
        await self.registry.start()
        self.service.start()
        self.sweeper.start()
        if self.admin is not None:
            await self.admin.start()
        self._runner = web.AppRunner(self.app, handle_signals=False, access_log=None)
        await self._runner.setup()
        assert self._runner.server is not None
        # Our own listener instead of web.TCPSite: every accepted connection
        # passes admission (deadline, caps) before picows or aiohttp sees it.
        self.admission = Admission(self.config.admission, self._protocol_for)
        tls: dict[str, Any] = {}
        if self.tls is not None:
            # Admission's clock starts once the TLS handshake is done (the
            # protocol sees the connection only then), so the handshake gets
            # its own deadline of the same length: a socket that stalls in it
            # is closed by the loop, like one that stalls in its request.
            tls = {"ssl": self.tls.context, "ssl_handshake_timeout": self.config.admission.handshake_timeout}
        # aiofastnet's transports (picows' own transport layer) instead of
        # the loop's: a login costs ~35% less server CPU (docs/performance.md,
        # "Change 6"); on a loop it does not support it uses the loop's own.
        self._listener = await aiofastnet.create_server(
            asyncio.get_running_loop(),
            self.admission.protocol,
            self.config.host,
            self.config.port,
            backlog=4096,
            reuse_address=True,
            **tls,
        )
        if self._listener.sockets:
            self.port = self._listener.sockets[0].getsockname()[1]
        if self.config.admin_port is not None:
            await self._start_metrics()
        self.ready = True
        log.info(
            "listening",
            extra={
                "host": self.config.host,
                "port": self.port,
                "tls": self.tls is not None,
                "data_dir": str(self.config.data_dir),
                "admin_port": self.admin_port,
            },
        )

    async def _start_metrics(self) -> None:
        """The admin listener: /metrics for Prometheus, apart from the public port."""
        app = web.Application()
        app.router.add_get("/metrics", make_aiohttp_handler(self.metrics.registry))
        self._metrics_runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._metrics_runner.setup()
        site = web.TCPSite(self._metrics_runner, self.config.admin_host, self.config.admin_port)
        await site.start()
        addresses = self._metrics_runner.addresses
        if addresses:
            self.admin_port = addresses[0][1]

    async def stop(self) -> None:
        """Graceful: stop accepting, tell clients to go away, finish commits."""
        self.stopping = True
        await self._drain()
        self.ready = False
        for conn in list(self.connections):
            conn.close(CloseCode.GOING_AWAY, "server shutting down")
        if self.connections:
            await asyncio.wait(
                [asyncio.ensure_future(c.finish()) for c in list(self.connections)],
                timeout=self.config.shutdown_timeout,
            )
        for conn in list(self.connections):  # did not take the close in time
            conn.ws.disconnect(graceful=False)
        if self._listener is not None:
            self._listener.close()
        if self.admission is not None:
            self.admission.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        if self.admin is not None:
            await self.admin.stop()
        await self.sweeper.stop()
        await self.service.stop()
        await self.registry.stop()
        await self.blobs.close()
        await self.store.close()
        log.info("stopped")

    async def _drain(self) -> None:
        """Close open sockets with 1001, spread evenly over ``drain_seconds``.

        The listener stays open meanwhile: /readyz answers 503 (a load
        balancer must see that before connections are refused) and new
        WebSocket upgrades get 503.
        """
        conns = list(self.connections)
        period = self.config.drain_seconds
        if not conns or period <= 0:
            return
        log.info("draining", extra={"connections": len(conns), "seconds": period})
        loop = asyncio.get_running_loop()
        start, step = loop.time(), period / len(conns)
        for i, conn in enumerate(conns):
            delay = start + i * step - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            conn.close(CloseCode.GOING_AWAY, "server shutting down")

    def _media_authorized(self, request: web.Request) -> None:
        """A media request's signature checked out: like an authenticated
        session, it is no longer held to the handshake deadline (a large
        part takes longer than that to arrive)."""
        if self.admission is not None:
            self.admission.authenticated(request.transport)

    async def readyz(self, request: web.Request) -> web.Response:
        if self.stopping:
            reason: str | None = "draining: shutting down"
        elif not self.ready:
            reason = "starting"
        else:
            reason = await self.readiness.reason()
        if reason is not None:
            return web.json_response({"status": "unready", "reason": reason}, status=503)
        return web.json_response({"status": "ready"})

    async def healthz(self, request: web.Request) -> web.Response:
        if not self.ready:
            return web.json_response({"status": "starting"}, status=503)
        pending = 0 if self.admission is None else len(self.admission.pending)
        # "unauthenticated" counts this request's own connection too.
        body = {"status": "ok", "connections": len(self.connections), "unauthenticated": pending}
        return web.json_response(body)

    def _protocol_for(self, head: bytes) -> asyncio.BaseProtocol | None:
        """The protocol serving a connection, from the first bytes of its
        request: picows for a WebSocket request, aiohttp for everything else
        (garbage included: it answers 400 at once); None until they tell."""
        if len(head) <= len(WEBSOCKET_REQUEST) and WEBSOCKET_REQUEST.startswith(head):
            return None
        if head.startswith(WEBSOCKET_REQUEST) and head[len(WEBSOCKET_REQUEST)] in b" ?":
            return websocket_protocol(self, self._route_websocket)
        assert self._runner is not None and self._runner.server is not None
        return self._runner.server()

    def _websocket_listener(self, request: Any) -> Any:
        """picows asks for the listener of an upgrade request (or an answer)."""
        # RFC 6455 4.1: Connection *includes* "Upgrade" (Firefox sends
        # "keep-alive, Upgrade"); picows 2.3 checks that it equals it.
        connection = request.headers.get("Connection", "")
        if "upgrade" in (token.strip().lower() for token in connection.split(",")):
            request.headers["Connection"] = "Upgrade"
        if self.stopping:
            busy = WSUpgradeResponse.create_error_response(
                503, b'{"status": "stopping"}', {"Content-Type": "application/json"}
            )
            return WSUpgradeResponseWithListener(busy, None)
        return WebSocketSession(self)

    async def _upgrade_on_a_new_connection(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"status": "retry", "reason": "open the WebSocket on a new connection"},
            status=503,
            headers={"Connection": "close", "Retry-After": "0"},
        )

    async def authenticate(self, conn: Connection, data: bytes) -> tuple[str, str, float, bool] | None:
        """(user, client run id, when its token check began, whether it keeps
        end-to-end keys) once the auth frame ``data`` checks out; None after
        answering and closing."""
        try:
            frame = decode_client(data)
            if not isinstance(frame, f.Auth):
                raise ProtocolError(ErrorCode.AUTH_REQUIRED, "the first frame must be auth")
            if frame.v != f.PROTOCOL_VERSION:
                self.metrics.auth_failure["version"].inc()
                conn.push(
                    error_frame(
                        ProtocolError(
                            ErrorCode.UNSUPPORTED_VERSION,
                            f"protocol v{frame.v} unsupported; this server speaks v{f.PROTOCOL_VERSION}",
                        )
                    )
                )
                conn.close(CloseCode.UNSUPPORTED_VERSION, "unsupported version")
                return None
            started = time.monotonic()
            user = await self.service.authenticate(frame.token)
            if user is None:
                raise ProtocolError(ErrorCode.AUTH_FAILED, "unknown or revoked token")
        except ProtocolError as exc:
            reason = "failed" if exc.code == ErrorCode.AUTH_FAILED else "bad_frame"
            self.metrics.auth_failure[reason].inc()
            conn.push(error_frame(exc))
            conn.close(CloseCode.AUTH_FAILED, exc.code.value)
            return None
        except StoreUnavailable as exc:
            self.metrics.auth_failure["unavailable"].inc()
            # Expected while the store is down or overloaded: the client
            # retries. One line per interval, not a traceback per client (in
            # a reconnect storm those cost more CPU than the work itself).
            self._auth_unavailable.warn(str(exc))
            conn.push(error_frame(ProtocolError(ErrorCode.UNAVAILABLE, "try again")))
            conn.close(CloseCode.GOING_AWAY, "unavailable")
            return None
        except Exception:
            self.metrics.auth_failure["unavailable"].inc()
            log.exception("authentication failed")
            conn.push(error_frame(ProtocolError(ErrorCode.UNAVAILABLE, "try again")))
            conn.close(CloseCode.GOING_AWAY, "unavailable")
            return None
        conn.push(encode(f.Welcome(user=user, v=f.PROTOCOL_VERSION, heartbeat=int(self.config.heartbeat))))
        return user, frame.client, started, frame.e2ee


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (a dependency on Linux and macOS), else the stdlib loop.

    Measured (docs/architecture.md, "Dependencies"): ~20% less
    event-loop CPU per message than the stdlib loop with aiohttp.
    """
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def serve(config: GatewayConfig) -> signal.Signals:
    """Run one gateway until SIGINT/SIGTERM (``roost serve``); returns which one."""
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(run_gateway(config))


async def run_gateway(config: GatewayConfig) -> signal.Signals:
    """Run until SIGINT/SIGTERM, then shut down gracefully; returns the signal.
    With TLS, SIGHUP reloads the certificate and key."""
    gateway = Gateway(config)
    await gateway.start()
    tune_gc()
    stopped_by: asyncio.Future[signal.Signals] = asyncio.get_running_loop().create_future()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, _resolve_once, stopped_by, sig)
    if gateway.tls is not None and hasattr(signal, "SIGHUP"):
        # New certificate for new connections; open ones keep theirs.
        loop.add_signal_handler(signal.SIGHUP, gateway.tls.reload)
    sig = await stopped_by
    await gateway.stop()
    return sig


# Full (oldest-generation) collections at most once per this many
# collections of the middle one (CPython's default is 10).
GC_FULL_EVERY = 100
# A young collection after this many new container objects (CPython's
# default is 700): every message allocates dozens, and what is in flight
# under load (ops, futures, frames) is traversed again by every young and
# middle collection.
GC_YOUNG_EVERY = 20_000


def tune_gc() -> None:
    """Once started: the objects made so far (modules, the app) leave the
    collector's view (``gc.freeze``), full collections wait for 100
    middle-generation ones instead of 10, and young ones for 20,000 new
    objects instead of 700.

    Why (docs/performance.md, "Issue 16: the login path"): a gateway that
    takes on thousands of connections at once grows its heap by ~60 tracked
    objects per connection, and CPython runs a full collection every time the
    old generation grew by a quarter: 8 full collections, 1.5 s of CPU, for
    8,000 logins on one core, a third of the login cost. With this, none in
    such a burst. In a steady state the quarter rule still decides; what
    waits longer is cyclic garbage of closed connections (some 10 to 30
    objects each), freed at the next full collection.

    The young threshold (docs/performance.md, "Garbage collection on the
    message path"): at 5,000-7,000 msg/s the collector took 0.75-2.05 s of
    a 17-20 s run with CPython's 700, and 0.04-0.17 s with 20,000; the cost
    grows with the backlog, so it pushed a loaded gateway further behind.
    What waits longer is at most 20,000 objects of cyclic garbage."""
    gc.freeze()
    _, middle, _ = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_EVERY, middle, GC_FULL_EVERY)


def _resolve_once(fut: asyncio.Future[signal.Signals], sig: signal.Signals) -> None:
    if not fut.done():  # a second Ctrl-C during the graceful stop changes nothing
        fut.set_result(sig)


class RateLimitedWarning:
    """A warning logged at most once per ``interval`` seconds, with how many were folded."""

    def __init__(self, what: str, interval: float = 5.0) -> None:
        self.what = what
        self.interval = interval
        self.folded = 0
        self.last = float("-inf")

    def warn(self, detail: str) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            self.folded += 1
            return
        more = f" (and {self.folded} more since the last report)" if self.folded else ""
        log.warning("%s: %s%s", self.what, detail, more)
        self.last, self.folded = now, 0
