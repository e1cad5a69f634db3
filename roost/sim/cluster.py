"""Simulated gateways around the production chat service.

Each gateway is a real ``ChatService`` (with its real ``Session``s and
``DeliveryCursor``s) fed by a loop that does what ``roost.gateway.server``
does per socket: authenticate the first frame, answer ``welcome``, connect
the session, hand every later frame to ``ChatService.handle`` and call
``disconnect`` when the socket ends.

All gateways share one store (``SimStore``) and one ``Router`` (the part of
the registry that is shared in cluster mode, like Redis): which session a
user is connected to. Each gateway sees them through views that die with it,
so a killed gateway's pending store answers and pushes simply never come,
as with a ``kill -9``. A push to a session on another gateway crosses the
router with a seeded delay, FIFO per pair of gateways (one pub/sub channel).

Router faults: ``lose_all`` forgets every route, as Redis restarting empty;
the gateways find out (their round fails), set their users' routes again
after a while and call the service's ``on_recovered`` (every local session
re-reads its inbox), as ``RedisRegistry`` does. ``stale`` makes one user's
route point to an older session for a while, then the heartbeat refresh
restores it and, as ``RedisRegistry`` does when a refresh has to set a route
again, the gateway holding the user has its sessions re-read their inboxes.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import Executor, Future
from typing import Any

from roost.core.presence import PresenceChange
from roost.protocol import frames as f
from roost.protocol.codec import decode_client, encode
from roost.protocol.errors import CloseCode, ErrorCode, ProtocolError
from roost.registry.memory import deliver_frame
from roost.service.chat import ChatService, ServiceConfig, error_frame
from roost.service.session import Session
from roost.sim.net import FIFO_STEP, Connection, ServerEnd
from roost.sim.store import SimStore
from roost.store.base import ReceiptState, StoredMessage

AUTH_TIMEOUT = 10.0


class _InlineExecutor(Executor):
    """An executor that runs each call at once, on the loop's own thread."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


class Router:
    """Shared routes: user -> the session it is connected with."""

    def __init__(self, seed: int, trace: Callable[..., None]) -> None:
        self.seed = seed
        self.rng = random.Random(f"{seed}/router")
        self.trace = trace
        self.routes: dict[str, Session] = {}
        self.homes: dict[str, str] = {}  # user -> the gateway its route names
        self.stale: dict[str, Session | None] = {}  # user -> what lookups wrongly return
        self.down = False
        self.gateways: dict[str, Gateway] = {}
        # One FIFO with its own random stream per (source gateway, target
        # gateway, user): pushes to one device stay in order, and the order in
        # which pushes to different users are made (the store builds receipts
        # from a set) changes nothing else in the run.
        self._channels: dict[tuple[str, str, str], tuple[random.Random, float]] = {}

    def lookup(self, user: str) -> Session | None:
        if self.down:
            return None
        if user in self.stale:
            return self.stale[user]
        return self.routes.get(user)

    def hop(self, source: str, session: Session, fn: Callable[..., None], *args: Any) -> None:
        """Deliver to ``session``: at once on the same gateway, else through its channel."""
        target = getattr(session, "gateway", "")
        if target == source:
            fn(*args)
            return
        loop = asyncio.get_running_loop()
        key = (source, target, session.user)
        rng, last = self._channels.get(key) or (random.Random(f"{self.seed}/channel/{'/'.join(key)}"), 0.0)
        at = max(last + FIFO_STEP, loop.time() + rng.uniform(0.0002, 0.003))
        self._channels[key] = (rng, at)
        loop.call_at(at, fn, *args)

    # -- faults ----------------------------------------------------------------

    def lose_all(self, outage: float) -> None:
        self.trace("registry-lost", "", f"every route forgotten, down {outage:.3f}s")
        self.routes.clear()
        self.homes.clear()
        self.down = True
        asyncio.get_running_loop().call_later(outage, self._recover)

    def _recover(self) -> None:
        self.down = False
        self.trace("registry-up", "", "gateways restore their routes and resync")
        for gateway in list(self.gateways.values()):
            if gateway.alive:
                gateway.registry.restore_routes()

    def make_stale(self, user: str, duration: float) -> None:
        current = self.routes.get(user)
        self.stale[user] = None
        self.trace(
            "registry-stale", user, f"route of {user} lost for {duration:.3f}s (was {current is not None})"
        )
        asyncio.get_running_loop().call_later(duration, self._refresh_stale, user)

    def _refresh_stale(self, user: str) -> None:
        self.stale.pop(user, None)
        session = self.routes.get(user)
        gateway = self.gateways.get(self.homes.get(user, "")) if session is not None else None
        if gateway is not None and gateway.alive and gateway.registry.on_recovered is not None:
            self.trace("registry-refresh", user, f"route of {user} set again; {gateway.name} resyncs")
            gateway.registry.on_recovered([user])


class GatewayRegistry:
    """One gateway's ``Registry``: local sessions plus the shared router."""

    def __init__(self, gateway: Gateway, router: Router) -> None:
        self.gateway = gateway
        self.router = router
        self.local: dict[str, Session] = {}
        self.on_recovered: Callable[[Collection[str] | None], None] | None = None

    async def start(self) -> None:
        """Nothing to connect to."""

    async def stop(self) -> None:
        """Nothing to release."""

    async def flush(self) -> None:
        # A round trip to the shared registry.
        await asyncio.sleep(self.router.rng.uniform(0.0001, 0.001))

    def announce(self, change: PresenceChange) -> None:
        """Presence is not part of the simulated workload."""

    async def fetch_online(self, users: Iterable[str]) -> set[str]:
        return {u for u in users if self.router.lookup(u) is not None}

    def attach(self, session: Session) -> Session | None:
        self.local[session.user] = session
        self.router.trace("registered", session.user, f"route to {self.gateway.name}")
        previous = self.router.routes.get(session.user)
        self.router.routes[session.user] = session
        self.router.homes[session.user] = self.gateway.name
        return previous if previous is not session else None

    def detach(self, session: Session) -> bool:
        if self.local.get(session.user) is session:
            del self.local[session.user]
        if self.router.routes.get(session.user) is session:
            del self.router.routes[session.user]
            del self.router.homes[session.user]
            return True
        return False

    def restore_routes(self) -> None:
        for user, session in self.local.items():
            if user not in self.router.routes:
                self.router.routes[user] = session
                self.router.homes[user] = self.gateway.name
        if self.on_recovered is not None:
            self.on_recovered(None)

    def is_online(self, user: str) -> bool:
        return self.router.lookup(user) is not None

    def sessions(self) -> list[Session]:
        return list(self.local.values())

    def push_message(self, message: StoredMessage, users: Iterable[str]) -> None:
        if not self.gateway.alive:
            return
        frame: bytes | None = None
        for user in users:
            session = self.router.lookup(user)
            if session is not None:
                if frame is None:
                    frame = deliver_frame(message)
                self.router.hop(self.gateway.name, session, session.offer, message, frame)

    def push_receipt(self, receipt: ReceiptState) -> None:
        if not self.gateway.alive:
            return
        session = self.router.lookup(receipt.user)
        if session is not None:
            self.router.hop(self.gateway.name, session, session.push_receipt, receipt)

    def push_frame(self, users: Iterable[str], frame: bytes) -> None:
        if not self.gateway.alive:
            return
        for user in users:
            session = self.router.lookup(user)
            if session is not None:
                self.router.hop(self.gateway.name, session, session.push_frame, frame)

    def subscribe(self, session: Session, users: Iterable[str]) -> None:
        """Presence is not part of the simulated workload."""

    def unsubscribe(self, session: Session, users: Iterable[str]) -> None:
        """Presence is not part of the simulated workload."""

    def subscribers(self, user: str) -> list[Session]:
        return []


class StoreView:
    """One gateway's handle on the shared store: answers stop when it dies."""

    def __init__(self, store: SimStore, gateway: Gateway) -> None:
        self._store = store
        self._gateway = gateway

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if not self._gateway.alive:
                # A dead process asks nothing (its leftover timers would).
                return self._never(attr)
            result = attr(*args, **kwargs)
            if asyncio.isfuture(result):
                return self._relay(result)
            if asyncio.iscoroutine(result):
                return self._guard(result)
            return result

        return call

    @staticmethod
    def _never(method: Any) -> Any:
        if asyncio.iscoroutinefunction(method):

            async def cancelled() -> Any:
                raise asyncio.CancelledError

            return cancelled()
        return asyncio.get_running_loop().create_future()

    def _relay(self, inner: asyncio.Future[Any]) -> asyncio.Future[Any]:
        outer = asyncio.get_running_loop().create_future()

        def done(fut: asyncio.Future[Any]) -> None:
            exc = None if fut.cancelled() else fut.exception()
            if not self._gateway.alive or outer.done():
                return  # the process that asked is gone
            if fut.cancelled():
                outer.cancel()
            elif exc is not None:
                outer.set_exception(exc)
            else:
                outer.set_result(fut.result())

        inner.add_done_callback(done)
        return outer

    async def _guard(self, coro: Any) -> Any:
        result = await coro
        if not self._gateway.alive:
            raise asyncio.CancelledError
        return result


class Gateway:
    """One gateway process: a ``ChatService`` and the sockets connected to it."""

    def __init__(
        self, name: str, store: SimStore, router: Router, config: ServiceConfig, trace: Callable[..., None]
    ) -> None:
        self.name = name
        self.store = store
        self.router = router
        self.config = config
        self.trace = trace
        self.alive = False
        self.registry = GatewayRegistry(self, router)
        self.service: ChatService | None = None
        self.connections: list[Connection] = []
        self._tasks: set[asyncio.Task[None]] = set()
        router.gateways[name] = self

    def start(self) -> None:
        self.alive = True
        self.registry = GatewayRegistry(self, self.router)
        view: Any = StoreView(self.store, self)
        self.service = ChatService(view, self.registry, self.config)  # type: ignore[arg-type]
        # The key directory checks upload signatures on a thread; on the
        # virtual clock a thread's answer lands at a real-time instant (runs
        # no longer replay) or never (a stalled loop). Check them inline.
        self.service.keys.stop()
        self.service.keys._verifier = _InlineExecutor()  # type: ignore[assignment]
        self.service.start()
        self.trace("gateway-up", "", self.name)

    def kill(self) -> None:
        """kill -9: sockets reset, sessions gone without a goodbye, answers lost."""
        if not self.alive:
            return
        self.alive = False
        self.trace("gateway-kill", "", self.name)
        assert self.service is not None
        if self.service._presence_task is not None:
            self.service._presence_task.cancel()
        for fut in list(self.service._background):
            fut.cancel()
        for session in self.registry.sessions():
            session.stop()
        for task in list(self._tasks):
            task.cancel()
        for conn in self.connections:
            conn.cut(f"{self.name} killed", conn.rng.uniform(0.0, 0.2), 0.0)
        self.connections = []

    def accept(self, conn: Connection) -> None:
        self.connections.append(conn)
        task = asyncio.get_running_loop().create_task(self._serve(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: Connection) -> None:
        end = conn.server
        try:
            user = await self._authenticate(end)
            if user is None:
                return
            assert self.service is not None
            session = await self.service.connect(user, end)
            self.trace("connected", user, f"conn {conn.id} on {self.name}")
            try:
                while (data := await end.receive()) is not None:
                    if end.closed:
                        break
                    self.service.handle(session, data)
            finally:
                if self.alive:
                    self.service.disconnect(session)
                    self.trace("disconnected", user, f"conn {conn.id} on {self.name}")
        finally:
            if conn in self.connections:
                self.connections.remove(conn)

    async def _authenticate(self, end: ServerEnd) -> str | None:
        try:
            data = await asyncio.wait_for(end.receive(), AUTH_TIMEOUT)
        except TimeoutError:
            end.push(error_frame(ProtocolError(ErrorCode.AUTH_TIMEOUT, "no auth frame in time")))
            end.close(CloseCode.AUTH_TIMEOUT, "auth timeout")
            return None
        if data is None:
            return None
        assert self.service is not None
        try:
            frame = decode_client(data)
            if not isinstance(frame, f.Auth):
                raise ProtocolError(ErrorCode.AUTH_REQUIRED, "the first frame must be auth")
            user = await self.service.authenticate(frame.token)
            if user is None:
                raise ProtocolError(ErrorCode.AUTH_FAILED, "unknown or revoked token")
        except ProtocolError as exc:
            end.push(error_frame(exc))
            end.close(CloseCode.AUTH_FAILED, exc.code.value)
            return None
        except Exception:  # the store is down: the client retries
            end.push(error_frame(ProtocolError(ErrorCode.UNAVAILABLE, "try again")))
            end.close(CloseCode.GOING_AWAY, "unavailable")
            return None
        end.push(encode(f.Welcome(user=user, v=f.PROTOCOL_VERSION, heartbeat=30)))
        return user
