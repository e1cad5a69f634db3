"""Cluster registry/router: sessions in process, the user → gateway map in Redis.

Every gateway process keeps its own sessions in a dict exactly like
``MemoryRegistry``; a push to a user connected to *this* gateway never touches
Redis. Redis holds what the gateways must share, and every call the chat
service makes stays synchronous: work for Redis is queued and one background
task (the *router*) sends it, so nothing on the hot path awaits the network.

Keys (``prefix`` defaults to ``roost:``)::

    {p}u:{user}  "gateway|token"   PX ttl   where the user is connected (also: "online")
    {p}w:{user}  SET of gateway ids          gateways with sessions watching the user's presence
    {p}g:{gw}    instance nonce   PX ttl     gateway liveness; its loss reveals a Redis restart

Channel ``{p}c:{gw}``: each gateway subscribes to its own channel only.

Router batching. ``push_message``/``push_receipt``/``push_frame`` deliver to
local sessions at once and queue the remaining users. The router task wakes
after the current event-loop iteration and takes *everything* queued; while
it waits on Redis the next batch fills up, so batches grow with load (like
the store's group commit, no timer). One round is at most two round trips:

1. one pipeline: the queued attach/detach/watch writes in call order (a run
   of the same kind is one Lua call for up to 1000 users), ``fetch_online``
   reads, one ``MGET`` per 1000 distinct remote users of the batch,
   ``SMEMBERS``/``EXISTS`` for queued presence changes, and a slice of the
   heartbeat work;
2. one pipeline with ONE ``PUBLISH`` per destination gateway, carrying every
   message/receipt/frame/presence change/"replaced" notice of the batch for it
   (each message lists its target users on that gateway, so a 1024-member
   group costs one publish per gateway, not per member).

A push that cannot be routed (user offline, stale mapping, gateway gone,
Redis down, queue full) is dropped: the message is committed and stays in the
inbox.

One device per user across the cluster: ``attach`` writes the mapping with
``SET ... GET`` (Lua, batched); if the old value names another gateway, that
gateway gets a "replaced" notice carrying the old value and closes that
session (4003) if it is still the one the value names. Every ``heartbeat``
seconds the gateway refreshes its liveness key and, ``CHUNK`` users per
round so pushes never queue behind one huge pipeline, every local user's key
with a Lua script that extends it if it is ours, sets it again if it is
missing (Redis restarted empty, or an outage outlived the TTL) and reports it
if another gateway owns it now (a lost notice): that session is replaced
too. ``detach`` deletes the key only if it still holds this session's value
(Lua compare-and-delete). An attach whose round failed (Redis down, or the
first round after a Redis restart, which meets a dead pooled connection) is
retried by the router from 50 ms on, backing off up to the heartbeat.

Presence. The service's ``PresenceTracker`` still debounces; its changes go
through ``announce``. A gateway adds its id to ``{p}w:{user}`` when a first
local session subscribes to ``user`` and removes it when the last one leaves,
so a change costs one ``SMEMBERS`` and one publish per gateway that watches
(none if nobody does), batched with everything else: no channel per user,
and a gateway only hears about users its own sessions watch. Offline changes
are dropped when the user's key exists (the user reconnected on another
gateway within the debounce). A publish that reaches nobody prunes that
gateway from the sets it was sent for (atomically, in Lua), and a gateway
re-adds all its watches after every (re)subscribe or Redis restart.
``is_online`` answers from memory: local sessions plus a view of the
*watched* remote users, kept from events, filled when the watch is
registered and re-validated on every heartbeat (which also notices users of
a crashed gateway once their keys expire). ``fetch_online`` gives the initial
state after a subscription, ordered after the watch registration.

Wire format: msgspec MessagePack, array-like structs, bodies as raw bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from roost.core.metrics import Metrics
from roost.core.presence import PresenceChange
from roost.protocol.codec import encode
from roost.protocol.frames import Presence
from roost.registry.base import SessionHandle
from roost.registry.memory import deliver_frame
from roost.store.base import ReceiptState, StoredMessage

log = logging.getLogger("roost.registry.redis")

CHUNK = 1000  # keys per MGET / Lua call
RETRY_FIRST = 0.05  # seconds before a failed attach is tried again; doubles up to the heartbeat

# -- wire format -------------------------------------------------------------


class _Msg(msgspec.Struct, array_like=True):
    conv: str
    seq: int
    id: str
    sender: str
    ct: str
    body: bytes
    ts: int
    users: list[str]


class _Rcpt(msgspec.Struct, array_like=True):
    user: str
    conv: str
    rv: int
    marks: dict[str, tuple[int, int]]
    all_delivered: int
    all_read: int


class _Frame(msgspec.Struct, array_like=True):
    frame: bytes
    users: list[str]


class _Presence(msgspec.Struct, array_like=True):
    user: str
    online: bool
    last_seen: int | None


class _Replaced(msgspec.Struct, array_like=True):
    user: str
    value: bytes  # the mapping value that was overwritten: names the session to close
    client: str = ""  # the new session's client run id (auth frame's ``client``)


class _Revoked(msgspec.Struct, array_like=True):
    user: str
    reason: str


class _Envelope(msgspec.Struct, array_like=True):
    src: str
    msgs: list[_Msg] = []
    rcpts: list[_Rcpt] = []
    frames: list[_Frame] = []
    presence: list[_Presence] = []
    replaced: list[_Replaced] = []
    # From the admin CLI (``RedisNotifier``), sent to every gateway: close
    # these users' sessions (4008); re-read these users' inboxes and receipts.
    revoked: list[_Revoked] = []
    resync: list[str] = []


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(_Envelope).decode

# -- Lua ---------------------------------------------------------------------

# KEYS mapping keys, ARGV[1] ttl ms, ARGV[i+1] the value for KEYS[i]; returns the
# previous values ('' for none) so the gateways that lost a user can be told.
_ATTACH_MANY = """
local olds = {}
for i, key in ipairs(KEYS) do
  local mine = ARGV[i + 1]
  local cur = redis.call('GET', key)
  local newer = false
  if cur and cur ~= mine then
    -- An attach that waited out a Redis outage must not displace a
    -- connection made later elsewhere: values end in '|<connect ms>'.
    local t_cur = tonumber(string.match(cur, '|(%d+)$') or '0') or 0
    local t_mine = tonumber(string.match(mine, '|(%d+)$') or '0') or 0
    if t_cur > t_mine then
      newer = true
    end
  end
  if newer then
    olds[i] = '!' .. cur
  else
    olds[i] = redis.call('SET', key, mine, 'PX', ARGV[1], 'GET') or ''
  end
end
return olds
"""

# Compare-and-delete: KEYS mapping keys, ARGV[i] the value this gateway wrote to KEYS[i].
_CAD_MANY = """
local n = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i] then
    redis.call('DEL', key)
    n = n + 1
  end
end
return n
"""

# KEYS watcher sets, ARGV[1] 'SADD' or 'SREM', ARGV[2] the gateway id.
_MEMBER_MANY = """
for _, key in ipairs(KEYS) do redis.call(ARGV[1], key, ARGV[2]) end
return #KEYS
"""

# KEYS mapping keys; ARGV[1] ttl ms, ARGV[i+1] our value for KEYS[i].
# Ours: extend. Missing (expired, Redis restarted): set again. Someone else's:
# the user connected elsewhere meanwhile; return its index (that session lost).
_REFRESH = """
local lost = {}
local restored = {}
for i, key in ipairs(KEYS) do
  local mine = ARGV[i + 1]
  local cur = redis.call('GET', key)
  if cur == mine then
    redis.call('PEXPIRE', key, ARGV[1])
  elseif not cur then
    -- Gone (expired during a stall, evicted, flushed): pushes meanwhile found nobody.
    redis.call('SET', key, mine, 'PX', ARGV[1])
    restored[#restored + 1] = i
  else
    -- Someone else's. Values end in '|<connect ms>': the later connection
    -- wins, and a tie stays with the holder. An older one (e.g. made while
    -- Redis was down) or a route without a time (stale, forged) is replaced.
    local t_cur = tonumber(string.match(cur, '|(%d+)$') or '0') or 0
    local t_mine = tonumber(string.match(mine, '|(%d+)$') or '0') or 0
    if t_cur >= t_mine then
      lost[#lost + 1] = i
    else
      redis.call('SET', key, mine, 'PX', ARGV[1])
      restored[#restored + 1] = i
    end
  end
end
return {lost, restored}
"""

# KEYS watcher sets of the users in the payload; ARGV channel, payload, gateway id.
# Nobody listening on that gateway's channel: it is gone, forget its watches
# (atomically, so a gateway that resubscribes and re-adds them is not undone).
_PUBLISH_PRUNE = """
local n = redis.call('PUBLISH', ARGV[1], ARGV[2])
if n == 0 then
  for _, key in ipairs(KEYS) do redis.call('SREM', key, ARGV[3]) end
end
return n
"""

_REDIS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)

# op kinds, applied in call order in the router's pipeline
_ATTACH, _DETACH, _WATCH, _UNWATCH = range(4)


def _chunks(items: list[Any], size: int = CHUNK) -> Iterable[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class _Batch:
    """Everything taken from the queues for one router round."""

    __slots__ = ("changes", "fetches", "frames", "msgs", "ops", "rcpts", "waiters")

    def __init__(self) -> None:
        self.ops: list[tuple[int, str, bytes | None]] = []
        self.msgs: list[tuple[StoredMessage, list[str]]] = []
        self.rcpts: list[ReceiptState] = []
        self.frames: list[tuple[bytes, list[str]]] = []
        self.changes: list[PresenceChange] = []
        self.waiters: list[asyncio.Future[None]] = []
        self.fetches: list[tuple[list[str], asyncio.Future[set[str]]]] = []

    def pushes(self) -> bool:
        return bool(self.msgs or self.rcpts or self.frames)

    def size(self) -> int:
        """Items of work in the batch (flush waiters are not work)."""
        return (
            len(self.ops)
            + len(self.msgs)
            + len(self.rcpts)
            + len(self.frames)
            + len(self.changes)
            + len(self.fetches)
        )


class RedisRegistry:
    """``Registry`` for cluster mode. See the module docstring for the design.

    Beyond ``Registry`` the chat service uses, in cluster mode:

    * ``await start()`` before serving, ``await stop()`` after the service stopped;
    * ``await flush()`` between ``attach`` and the inbox read at connect, so the
      mapping is in Redis before the read (otherwise a message committed in
      that window on another gateway may wait for the next drain);
    * ``announce(change)`` instead of pushing to ``subscribers()``, which
      lists local watchers only;
    * ``await fetch_online(users)`` for the state sent after a subscription.

    ``detach`` also returns True for a session another gateway took over, so
    the service marks the user disconnected here (its offline announcement
    is then dropped because the user's key exists elsewhere).
    """

    def __init__(
        self,
        url: str,
        gateway_id: str,
        *,
        heartbeat: float = 5.0,
        ttl: float = 15.0,
        prefix: str = "roost:",
        socket_timeout: float = 2.0,
        max_pending: int = 200_000,
        route_cache_ttl: float = 0.0,
        client: aioredis.Redis | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if not gateway_id or "|" in gateway_id:
            raise ValueError("gateway_id must be non-empty and contain no '|'")
        if ttl <= heartbeat:
            raise ValueError("ttl must be longer than the heartbeat interval")
        self.url = url
        self.metrics = metrics or Metrics()
        # Called after Redis or the subscription comes back: pushes may have
        # been lost meanwhile (the chat service then re-reads every local inbox).
        self.on_recovered: Callable[[Collection[str] | None], None] | None = None
        # Called with (user, reason) when the admin CLI revoked a user's token.
        self.on_revoked: Callable[[str, str], None] | None = None
        self._moved_in: set[str] = set()  # attached here while online on another gateway
        self._leaving: set[str] = set()  # detached here, this gateway's "offline" not decided yet
        self._subscribed_before = False
        self.gateway_id = gateway_id
        self.heartbeat = heartbeat
        self.ttl_ms = int(ttl * 1000)
        self.prefix = prefix
        self.socket_timeout = socket_timeout
        self.max_pending = max_pending
        # Positive entries only, user -> (gateway, expiry). Off by default: it
        # saves one round trip per batch (~0.3 ms p50 locally, no throughput
        # gain) but a push may then follow a mapping read before the message
        # was committed, so a user who just moved gateways may get that
        # message only at the next drain instead of at once.
        self.route_cache_ttl = route_cache_ttl
        self._route_cache: dict[str, tuple[str, float]] = {}
        self._client = client
        self._own_client = client is None
        self.channel = f"{prefix}c:{gateway_id}"
        self._alive_key = f"{prefix}g:{gateway_id}"
        self._gw_bytes = gateway_id.encode()
        self._nonce = secrets.token_hex(6).encode()
        self._tokens = itertools.count(1)

        # local state, as in MemoryRegistry
        self._sessions: dict[str, SessionHandle] = {}
        self._watchers: dict[str, set[SessionHandle]] = {}
        self._watching: dict[int, set[str]] = {}
        # user -> the mapping value of its local session; confirmed once written
        self._values: dict[str, bytes] = {}
        self._confirmed: dict[str, bytes] = {}
        # sessions taken over by another gateway (detach still reports them)
        self._evicted: dict[int, SessionHandle] = {}
        # remote presence view, for watched users only
        self._remote_online: set[str] = set()
        self._event_at: dict[str, float] = {}  # watched user -> monotonic time of last event
        self._missing_since: dict[str, float] = {}
        self._unwatch_sent: set[str] = set()
        # detaches that failed while Redis was unreachable, retried later
        self._retry_detach: dict[str, bytes] = {}
        # attaches whose round failed, retried by the next round: soon (with
        # backoff), not a heartbeat later. The first round after a Redis
        # restart fails on the dead pooled connection, and until the mapping
        # is written the other gateways' pushes to the user find no route.
        self._retry_attach: dict[str, bytes] = {}
        self._retry_backoff = RETRY_FIRST
        self._retry_at = 0.0

        # queues for the router
        self._batch = _Batch()
        self._pending = 0
        self._wake = asyncio.Event()
        self._resync_watch = True
        # heartbeat work, done CHUNK users per router round
        self._refresh_backlog: deque[str] = deque()
        self._revalidate_backlog: deque[str] = deque()
        self._rewatch_backlog: deque[str] = deque()
        self._router_task: asyncio.Task[None] | None = None
        self._listen_task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._first_heartbeat = asyncio.Event()
        self._running = False
        self._stopping = False
        self._down_since: float | None = None
        # Set when a heartbeat finds Redis emptied: once every mapping is set
        # again, local sessions re-read their inboxes (pushes meanwhile found
        # no route and were left there).
        self._resync_after_refresh = False
        self._last_warning = 0.0
        self._gw_names: dict[bytes, str] = {}
        self.stats: dict[str, int] = dict.fromkeys(
            (
                "publishes",
                "envelopes_in",
                "remote_pushes",
                "dropped_offline",
                "dropped_unreachable",
                "dropped_overflow",
                "replaced_remote",
            ),
            0,
        )

    # -- lifecycle ---------------------------------------------------------

    async def start(self, wait: float | None = None) -> None:
        """Start the router and the subscriber; wait (bounded) until both ran once.

        Never raises when Redis is down: the registry then works locally and
        catches up when Redis comes back.
        """
        if self._client is None:
            self._client = aioredis.Redis.from_url(
                self.url,
                socket_timeout=self.socket_timeout,
                socket_connect_timeout=self.socket_timeout,
                retry=Retry(NoBackoff(), 0),
                protocol=2,
            )
        self._running = True
        self._stopping = False
        loop = asyncio.get_running_loop()
        self._router_task = loop.create_task(self._router(), name=f"roost-redis-router-{self.gateway_id}")
        self._listen_task = loop.create_task(self._listen(), name=f"roost-redis-sub-{self.gateway_id}")
        timeout = self.socket_timeout if wait is None else wait
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._subscribed.wait()
                await self._first_heartbeat.wait()
        if not (self._subscribed.is_set() and self._first_heartbeat.is_set()):
            log.warning("gateway %s: Redis not ready at start; running locally until it is", self.gateway_id)

    async def ping(self) -> None:
        """One round trip to Redis (readiness); raises when it does not answer."""
        if self._client is None:
            raise ConnectionError("redis client not started")
        await self._client.ping()

    async def stop(self, timeout: float = 2.0) -> None:
        """Remove this gateway's keys and watches (best effort, bounded), then stop."""
        if not self._running:
            return
        await self._cancel(self._listen_task, timeout)
        self._stopping = True
        for user, value in self._values.items():
            self._batch.ops.append((_DETACH, user, value))
        for user in self._watchers:
            self._batch.ops.append((_UNWATCH, user, None))
        self._values.clear()
        self._confirmed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.flush()
        self._running = False
        self._wake.set()
        await self._cancel(self._router_task, timeout)
        if self._client is not None:
            with contextlib.suppress(TimeoutError, *_REDIS_ERRORS):
                async with asyncio.timeout(timeout):
                    await self._client.delete(self._alive_key)
            if self._own_client:
                with contextlib.suppress(TimeoutError, *_REDIS_ERRORS):
                    async with asyncio.timeout(timeout):
                        await self._client.aclose()
                self._client = None

    @staticmethod
    async def _cancel(task: asyncio.Task[None] | None, timeout: float) -> None:
        if task is None or task.done():
            return
        task.cancel()
        await asyncio.wait({task}, timeout=timeout)
        if not task.done():
            log.warning("%s did not stop within %.1f s", task.get_name(), timeout)

    async def flush(self) -> None:
        """Wait until everything queued so far went through the router (sent or dropped).

        The chat service may await it between ``attach`` and the inbox read so
        that the mapping is in Redis before the read starts: a message committed
        after that is then routed here by any gateway.
        """
        if not self._running:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._batch.waiters.append(fut)
        self._wake.set()
        await fut

    @property
    def connected(self) -> bool:
        """Redis reachable and our channel subscribed (for health checks)."""
        return self._running and self._down_since is None and self._subscribed.is_set()

    # -- Registry: sessions --------------------------------------------------

    def attach(self, session: SessionHandle) -> SessionHandle | None:
        user = session.user
        previous = self._sessions.get(user)
        self._sessions[user] = session
        value = b"%s|%s%x|%d" % (self._gw_bytes, self._nonce, next(self._tokens), int(time.time() * 1000))
        self._values[user] = value
        self._retry_detach.pop(user, None)
        if user in self._remote_online:
            # Online elsewhere a moment ago (a move or a flap across gateways):
            # our watchers already know, so the "online" this gateway's tracker
            # is about to announce must not reach them again.
            self._moved_in.add(user)
        self._remote_online.discard(user)  # known from the sessions dict while here
        self._leaving.discard(user)
        self._missing_since.pop(user, None)
        self._op(_ATTACH, user, value)
        return previous

    def detach(self, session: SessionHandle) -> bool:
        for user in self._watching.pop(id(session), ()):
            self._unwatch_one(session, user)
        if self._evicted.pop(id(session), None) is not None:
            # Replaced by a session on another gateway: the user left *this*
            # gateway (the service's offline announcement is dropped in
            # ``announce`` as long as the user's key exists elsewhere).
            self._leaving.add(session.user)
            return True
        user = session.user
        if self._sessions.get(user) is session:
            del self._sessions[user]
            # Until this gateway's debounced "offline" for the user is decided,
            # our watchers still see the user online: an "online" from another
            # gateway meanwhile (a flap across gateways) must not reach them.
            self._leaving.add(user)
            value = self._values.pop(user, None)
            self._confirmed.pop(user, None)
            if value is not None:
                self._op(_DETACH, user, value)
            return True
        return False

    def is_online(self, user: str) -> bool:
        """Connected here, or known online on another gateway (watched users only)."""
        return user in self._sessions or user in self._remote_online

    def session(self, user: str) -> SessionHandle | None:
        return self._sessions.get(user)

    def sessions(self) -> list[SessionHandle]:
        return list(self._sessions.values())

    # -- Registry: pushes ----------------------------------------------------

    def push_message(self, message: StoredMessage, users: Iterable[str]) -> None:
        sessions = self._sessions
        frame: bytes | None = None
        remote: list[str] | None = None
        for user in users:
            session = sessions.get(user)
            if session is not None:
                if frame is None:
                    frame = deliver_frame(message)
                session.offer(message, frame)
            elif remote is None:
                remote = [user]
            else:
                remote.append(user)
        if remote and self._admit(len(remote)):
            self._batch.msgs.append((message, remote))
            self._wake.set()

    def push_receipt(self, receipt: ReceiptState) -> None:
        session = self._sessions.get(receipt.user)
        if session is not None:
            session.push_receipt(receipt)
        elif self._admit(1):
            self._batch.rcpts.append(receipt)
            self._wake.set()

    def push_frame(self, users: Iterable[str], frame: bytes) -> None:
        sessions = self._sessions
        remote: list[str] | None = None
        for user in users:
            session = sessions.get(user)
            if session is not None:
                session.push_frame(frame)
            elif remote is None:
                remote = [user]
            else:
                remote.append(user)
        if remote and self._admit(len(remote)):
            self._batch.frames.append((frame, remote))
            self._wake.set()

    def _admit(self, n: int) -> bool:
        if not self._running:
            return False
        if self._pending + n > self.max_pending:
            self.stats["dropped_overflow"] += n
            self._warn("router queue full (%d pending): dropping remote pushes", self._pending)
            return False
        self._pending += n
        return True

    def _op(self, kind: int, user: str, value: bytes | None) -> None:
        # Before start() there is nothing to queue: the first heartbeat writes
        # every local mapping and watch anyway.
        if self._running:
            self._batch.ops.append((kind, user, value))
            self._wake.set()

    # -- Registry: presence --------------------------------------------------

    def subscribe(self, session: SessionHandle, users: Iterable[str]) -> None:
        watching = self._watching.setdefault(id(session), set())
        for user in users:
            watching.add(user)
            watchers = self._watchers.get(user)
            if watchers is None:
                self._watchers[user] = {session}
                self._unwatch_sent.discard(user)
                self._op(_WATCH, user, None)
            else:
                watchers.add(session)

    def unsubscribe(self, session: SessionHandle, users: Iterable[str]) -> None:
        watching = self._watching.get(id(session), set())
        for user in users:
            watching.discard(user)
            self._unwatch_one(session, user)

    def _unwatch_one(self, session: SessionHandle, user: str) -> None:
        watchers = self._watchers.get(user)
        if watchers is None:
            return
        watchers.discard(session)
        if not watchers:
            del self._watchers[user]
            self._remote_online.discard(user)
            self._event_at.pop(user, None)
            self._missing_since.pop(user, None)
            self._op(_UNWATCH, user, None)

    def subscribers(self, user: str) -> list[SessionHandle]:
        """Local sessions watching ``user`` (use ``announce`` to reach all gateways)."""
        return list(self._watchers.get(user, ()))

    def announce(self, change: PresenceChange) -> None:
        """A presence change of a user of this gateway, for watchers on every gateway.

        "Online" reaches local watchers at once. "Offline" is checked against
        Redis first: if the user's key exists it reconnected elsewhere within
        the debounce, and the change is dropped everywhere.
        """
        self._remote_online.discard(change.user)  # a user of this gateway
        if not change.online:
            self._leaving.discard(change.user)
        moved_in = change.user in self._moved_in
        self._moved_in.discard(change.user)
        if change.online and not moved_in:
            self._deliver_presence(change.user, True, None)
        if self._running:
            self._batch.changes.append(change)
            self._wake.set()
        elif not change.online:
            self._deliver_presence(change.user, False, change.last_seen)

    async def fetch_online(self, users: Iterable[str]) -> set[str]:
        """Which of ``users`` are online anywhere (local view if Redis fails).

        Meant for the initial state sent after ``subscribe``: the read goes
        through the router *after* the queued watch registrations, so a user
        who comes online later is announced to this gateway, and one who came
        online earlier is in the answer: nothing falls in between. Also
        refreshes the view of watched users.
        """
        users = list(dict.fromkeys(users))
        remote = [u for u in users if u not in self._sessions]
        if not remote or not self._running:
            return {u for u in users if self.is_online(u)}
        fut: asyncio.Future[set[str]] = asyncio.get_running_loop().create_future()
        self._batch.fetches.append((remote, fut))
        self._wake.set()
        found = await fut
        return {u for u in users if u in self._sessions or u in found}

    def _deliver_presence(self, user: str, online: bool, last_seen: int | None) -> None:
        watchers = self._watchers.get(user)
        if not watchers:
            return
        frame = encode(Presence(user=user, online=online, last_seen=last_seen))
        for watcher in list(watchers):
            watcher.push_frame(frame)

    # -- keys ----------------------------------------------------------------

    def _ukey(self, user: str) -> str:
        return f"{self.prefix}u:{user}"

    def _wkey(self, user: str) -> str:
        return f"{self.prefix}w:{user}"

    def _gw_of(self, value: bytes) -> str:
        gw = value.split(b"|", 1)[0]
        name = self._gw_names.get(gw)
        if name is None:
            name = self._gw_names[gw] = gw.decode()
        return name

    # -- the router ----------------------------------------------------------

    async def _router(self) -> None:
        next_heartbeat = 0.0
        while self._running:
            if not self._has_work():
                wake_at = min(next_heartbeat, self._retry_at) if self._retry_attach else next_heartbeat
                delay = wake_at - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await self._wake.wait()
            self._wake.clear()
            heartbeat = time.monotonic() >= next_heartbeat
            if heartbeat:
                next_heartbeat = time.monotonic() + self.heartbeat
            batch, self._batch, self._pending = self._batch, _Batch(), 0
            self.metrics.registry_round_batch_size.observe(batch.size())
            started = time.perf_counter()
            try:
                await self._round(batch, heartbeat)
            except asyncio.CancelledError:
                self._release(batch)
                raise
            except _REDIS_ERRORS as exc:
                self._failed(batch, exc)
            except Exception:
                log.exception("gateway %s: router round failed", self.gateway_id)
                self._failed(batch, None)
            else:
                self._retry_backoff = RETRY_FIRST
                self._recovered()
                if self._resync_after_refresh and not self._refresh_backlog:
                    self._resync_after_refresh = False
                    self._notify_recovered()
            finally:
                self._release(batch)
                self.metrics.registry_round_seconds.observe(time.perf_counter() - started)
            if heartbeat:
                self._first_heartbeat.set()

    def _has_work(self) -> bool:
        b = self._batch
        return bool(
            b.ops
            or b.msgs
            or b.rcpts
            or b.frames
            or b.changes
            or b.waiters
            or b.fetches
            or self._refresh_backlog
            or self._revalidate_backlog
            or self._rewatch_backlog
            or (self._resync_watch and self._down_since is None)
        )

    def _release(self, batch: _Batch) -> None:
        for fut in batch.waiters:
            if not fut.done():
                fut.set_result(None)
        batch.waiters.clear()
        for users, found in batch.fetches:
            if not found.done():  # Redis failed: what this gateway knows
                found.set_result({u for u in users if u in self._remote_online})
        batch.fetches.clear()

    async def _round(self, batch: _Batch, heartbeat: bool) -> None:
        """One router round: at most two pipelined round trips to Redis."""
        assert self._client is not None
        pipe = self._client.pipeline(transaction=False)
        handlers: list[Callable[[Any], None] | None] = []
        notices: dict[str, list[_Replaced]] = {}
        now = time.monotonic()

        # 1. writes, in call order (runs of the same kind share one Lua call);
        # attaches of a failed round first, if still current: they are older
        if self._retry_attach:
            retried = [(_ATTACH, u, v) for u, v in self._retry_attach.items() if self._values.get(u) == v]
            self._retry_attach.clear()  # a failure of this round puts them back
            batch.ops[:0] = retried
        attaching = self._write_ops(batch.ops, pipe, handlers, notices, now)
        for users, found in batch.fetches:
            pipe.mget(list(map(self._ukey, users)))
            handlers.append(self._on_fetched(users, found, now))
        retry = list(self._retry_detach.items())
        if retry:
            for chunk in _chunks(retry):
                pipe.eval(_CAD_MANY, len(chunk), *(self._ukey(u) for u, _ in chunk), *(v for _, v in chunk))
                handlers.append(None)
        if not self._stopping:
            if heartbeat:
                self._heartbeat_tick(pipe, handlers)
            self._background_slices(pipe, handlers, attaching, notices, now)

        # 2. where the remote users of the batch are
        routes: dict[str, str] = {}
        if batch.pushes():
            self._lookup(batch, pipe, handlers, routes, now)

        # 3. who watches the users whose presence changed
        watched_by: list[set[str]] = []
        elsewhere: list[bool] = []
        for change in batch.changes:
            pipe.smembers(self._wkey(change.user))
            handlers.append(lambda r: watched_by.append(self._gw_set(r)))
            if not change.online:
                pipe.exists(self._ukey(change.user))
                handlers.append(lambda r: elsewhere.append(bool(r) and not isinstance(r, Exception)))

        if handlers:
            results = await pipe.execute(raise_on_error=False)
            for user, value in retry:
                if self._retry_detach.get(user) == value:
                    del self._retry_detach[user]
            for handler, result in zip(handlers, results, strict=True):
                if handler is not None:
                    handler(result)
                elif isinstance(result, Exception):
                    self._warn("redis command failed: %s", result)

        # 4. one envelope per destination gateway
        envelopes: dict[str, _Envelope] = {}
        prune: dict[str, list[str]] = {}

        def envelope(gw: str) -> _Envelope:
            env = envelopes.get(gw)
            if env is None:
                env = envelopes[gw] = _Envelope(self.gateway_id)
            return env

        for gw, items in notices.items():
            envelope(gw).replaced.extend(items)
        if batch.pushes():
            self._route(batch, routes, envelope)
        offline = iter(elsewhere)
        for change, gateways in zip(batch.changes, watched_by, strict=True):
            if not change.online:
                if next(offline):
                    continue  # online again on some gateway: the flap is invisible
                self._deliver_presence(change.user, False, change.last_seen)
            item = _Presence(change.user, change.online, change.last_seen)
            for gw in gateways:
                if gw != self.gateway_id:
                    envelope(gw).presence.append(item)
                    prune.setdefault(gw, []).append(self._wkey(change.user))
        if envelopes:
            await self._publish(envelopes, prune)

    def _write_ops(
        self,
        ops: list[tuple[int, str, bytes | None]],
        pipe: Any,
        handlers: list[Callable[[Any], None] | None],
        notices: dict[str, list[_Replaced]],
        now: float,
    ) -> set[str]:
        attaching: set[str] = set()
        i = 0
        while i < len(ops):
            kind = ops[i][0]
            j = i + 1
            while j < len(ops) and ops[j][0] == kind and j - i < CHUNK:
                j += 1
            run = ops[i:j]
            i = j
            if kind == _ATTACH:
                pairs = [(user, value) for _, user, value in run if value is not None]
                attaching.update(user for user, _ in pairs)
                self._attach_many(pairs, pipe, handlers, notices)
            elif kind == _DETACH:
                pipe.eval(_CAD_MANY, len(run), *(self._ukey(u) for _, u, _ in run), *(v for _, _, v in run))
                handlers.append(None)
            elif kind == _WATCH:
                users = [user for _, user, _ in run if user in self._watchers]
                if users:
                    pipe.eval(_MEMBER_MANY, len(users), *map(self._wkey, users), "SADD", self.gateway_id)
                    pipe.mget(list(map(self._ukey, users)))  # fill the presence view
                    handlers.append(None)
                    handlers.append(self._on_probe(users, now))
            else:  # _UNWATCH, unless watched again since
                users = [user for _, user, _ in run if self._stopping or user not in self._watchers]
                if users:
                    pipe.eval(_MEMBER_MANY, len(users), *map(self._wkey, users), "SREM", self.gateway_id)
                    handlers.append(None)
        return attaching

    def _attach_many(
        self,
        pairs: list[tuple[str, bytes]],
        pipe: Any,
        handlers: list[Callable[[Any], None] | None],
        notices: dict[str, list[_Replaced]],
    ) -> None:
        if not pairs:
            return
        pipe.eval(
            _ATTACH_MANY,
            len(pairs),
            *(self._ukey(u) for u, _ in pairs),
            self.ttl_ms,
            *(v for _, v in pairs),
        )

        def handle(olds: Any) -> None:
            if isinstance(olds, Exception):
                self._warn("attach failed: %s", olds)
                return
            for (user, value), old in zip(pairs, olds, strict=True):
                if isinstance(old, bytes) and old.startswith(b"!"):
                    self._evict(user, value)  # a later connection elsewhere won
                    continue
                if self._values.get(user) == value:
                    self._confirmed[user] = value
                if old and old != value:
                    gw = self._gw_of(old)
                    if gw != self.gateway_id:
                        session = self._sessions.get(user)
                        client = session.client if session is not None else ""
                        notices.setdefault(gw, []).append(_Replaced(user, old, client))

        handlers.append(handle)

    def _on_probe(self, users: list[str], sent: float) -> Callable[[Any], None]:
        def handle(values: Any) -> None:
            if isinstance(values, Exception):
                return
            for user, value in zip(users, values, strict=True):
                if user not in self._watchers or user in self._sessions:
                    continue
                if self._event_at.get(user, 0.0) >= sent:
                    continue  # an event is newer than this read
                if value is not None:
                    self._remote_online.add(user)
                else:
                    self._remote_online.discard(user)

        return handle

    def _on_fetched(
        self, users: list[str], found: asyncio.Future[set[str]], sent: float
    ) -> Callable[[Any], None]:
        def handle(values: Any) -> None:
            if isinstance(values, Exception):
                return  # answered from the local view on release
            online = set()
            for user, value in zip(users, values, strict=True):
                if value is not None:
                    online.add(user)
                if (
                    user in self._watchers
                    and user not in self._sessions
                    and self._event_at.get(user, 0.0) < sent
                ):
                    if value is not None:
                        self._remote_online.add(user)
                        self._missing_since.pop(user, None)
                    else:
                        self._remote_online.discard(user)
            if not found.done():
                found.set_result(online)

        return handle

    def _heartbeat_tick(self, pipe: Any, handlers: list[Callable[[Any], None] | None]) -> None:
        """Liveness, then queue this interval's refresh and re-validation work.

        The per-user work is done in slices of ``CHUNK`` users per round
        (``_background_slices``), so a gateway with 100k sessions never holds
        pushes back behind one huge pipeline.
        """
        pipe.set(self._alive_key, self._nonce, px=self.ttl_ms, get=True)
        handlers.append(self._on_alive)
        self._refresh_backlog = deque(self._values)
        self._revalidate_backlog = deque(u for u in self._watchers if u not in self._sessions)
        self._unwatch_sent.clear()
        if self._route_cache:
            now = time.monotonic()
            self._route_cache = {u: hit for u, hit in self._route_cache.items() if hit[1] > now}
        if self._resync_watch:
            self._resync_watch = False
            self._rewatch_backlog = deque(self._watchers)

    def _background_slices(
        self,
        pipe: Any,
        handlers: list[Callable[[Any], None] | None],
        attaching: set[str],
        notices: dict[str, list[_Replaced]],
        now: float,
    ) -> None:
        if self._resync_watch and self._down_since is None:
            self._resync_watch = False
            self._rewatch_backlog = deque(self._watchers)
        refresh: list[tuple[str, bytes]] = []
        backlog = self._refresh_backlog
        while backlog and len(refresh) < CHUNK:
            user = backlog.popleft()
            value = self._values.get(user)
            if value is None or user in attaching:
                continue
            # Also users whose attach never reached Redis (it was down): not a
            # blind take-over, since a newer connection on another gateway may
            # hold the key by now, and then it is our session that lost.
            refresh.append((user, value))
        if refresh:
            pipe.eval(
                _REFRESH,
                len(refresh),
                *(self._ukey(u) for u, _ in refresh),
                self.ttl_ms,
                *(v for _, v in refresh),
            )
            handlers.append(self._on_refreshed(refresh))
        rewatch = self._take(self._rewatch_backlog)
        rewatch = [u for u in rewatch if u in self._watchers]
        if rewatch:
            pipe.eval(_MEMBER_MANY, len(rewatch), *map(self._wkey, rewatch), "SADD", self.gateway_id)
            handlers.append(None)
        revalidate = self._take(self._revalidate_backlog)
        if revalidate:
            pipe.mget(list(map(self._ukey, revalidate)))
            handlers.append(self._on_revalidated(revalidate, now))

    @staticmethod
    def _take(backlog: deque[str]) -> list[str]:
        return [backlog.popleft() for _ in range(min(CHUNK, len(backlog)))]

    def _on_alive(self, previous: Any) -> None:
        if isinstance(previous, Exception):
            return
        if previous != self._nonce:
            # First heartbeat, or Redis lost our keys (restart, flush, or an
            # outage longer than the TTL): this tick's refresh sets the
            # mappings again; the watches are re-added too.
            if previous is None and self._first_heartbeat.is_set():
                log.warning(
                    "gateway %s: Redis lost its state; restoring mappings and watches", self.gateway_id
                )
                self._resync_after_refresh = True
            self._resync_watch = True
            self._wake.set()

    def _on_refreshed(self, chunk: list[tuple[str, bytes]]) -> Callable[[Any], None]:
        def handle(result: Any) -> None:
            if isinstance(result, Exception):
                self._warn("mapping refresh failed: %s", result)
                return
            lost, restored = result
            gone = {int(index) - 1 for index in lost}
            for i, (user, value) in enumerate(chunk):
                if i in gone:
                    self._evict(user, value)
                elif self._values.get(user) == value:
                    self._confirmed[user] = value
            if restored and not self._resync_after_refresh:
                # Routes this refresh had to set again were missing or wrong
                # for a while; pushes to those users were left in their inbox.
                users = [chunk[int(index) - 1][0] for index in restored]
                log.info("gateway %s: %d routes restored; re-reading inboxes", self.gateway_id, len(users))
                self._notify_recovered(users)

        return handle

    def _on_revalidated(self, users: list[str], sent: float) -> Callable[[Any], None]:
        grace = 2 * self.heartbeat

        def handle(values: Any) -> None:
            if isinstance(values, Exception):
                return
            now = time.monotonic()
            for user, value in zip(users, values, strict=True):
                if user not in self._watchers or user in self._sessions:
                    continue
                if self._event_at.get(user, 0.0) >= sent:
                    continue
                if value is not None:
                    self._missing_since.pop(user, None)
                    if user not in self._remote_online:  # missed its "online" event
                        self._remote_online.add(user)
                        self._deliver_presence(user, True, None)
                elif user in self._remote_online:
                    since = self._missing_since.setdefault(user, now)
                    if now - since >= grace:  # no key and no "offline" event: its gateway died
                        self._missing_since.pop(user, None)
                        self._remote_online.discard(user)
                        self._deliver_presence(user, False, int(time.time()))

        return handle

    def _lookup(
        self,
        batch: _Batch,
        pipe: Any,
        handlers: list[Callable[[Any], None] | None],
        routes: dict[str, str],
        now: float,
    ) -> None:
        needed: dict[str, None] = {}
        for _, users in batch.msgs:
            needed.update(dict.fromkeys(users))
        for receipt in batch.rcpts:
            needed[receipt.user] = None
        for _, users in batch.frames:
            needed.update(dict.fromkeys(users))
        if self.route_cache_ttl > 0:
            cache = self._route_cache
            for user in list(needed):
                hit = cache.get(user)
                if hit is not None:
                    if hit[1] > now:
                        routes[user] = hit[0]
                        del needed[user]
                    else:
                        del cache[user]
        for chunk in _chunks(list(needed)):
            pipe.mget([self._ukey(u) for u in chunk])
            handlers.append(self._on_routes(chunk, routes, now))

    def _on_routes(self, users: list[str], routes: dict[str, str], now: float) -> Callable[[Any], None]:
        def handle(values: Any) -> None:
            if isinstance(values, Exception):
                self._warn("route lookup failed: %s", values)
                return
            expiry = now + self.route_cache_ttl
            for user, value in zip(users, values, strict=True):
                if value is not None:
                    gw = self._gw_of(value)
                    routes[user] = gw
                    if self.route_cache_ttl > 0:
                        self._route_cache[user] = (gw, expiry)

        return handle

    def _route(self, batch: _Batch, routes: dict[str, str], envelope: Callable[[str], _Envelope]) -> None:
        me = self.gateway_id
        stats = self.stats
        for message, users in batch.msgs:
            by_gw = self._split(users, routes)
            local = by_gw.pop(me, None)
            if local:  # attached here since the push: offer it like a local push
                self.push_message(message, [u for u in local if u in self._sessions])
            for gw, targets in by_gw.items():
                stats["remote_pushes"] += len(targets)
                envelope(gw).msgs.append(
                    _Msg(
                        message.conv,
                        message.seq,
                        message.client_id,
                        message.sender,
                        message.ct,
                        message.body,
                        message.ts,
                        targets,
                    )
                )
        for r in batch.rcpts:
            route = routes.get(r.user)
            if route is None:
                stats["dropped_offline"] += 1
            elif route == me:
                if r.user in self._sessions:
                    self._sessions[r.user].push_receipt(r)
            else:
                stats["remote_pushes"] += 1
                envelope(route).rcpts.append(
                    _Rcpt(r.user, r.conv, r.rv, dict(r.marks), r.all_delivered, r.all_read)
                )
        for frame, users in batch.frames:
            by_gw = self._split(users, routes)
            local = by_gw.pop(me, None)
            if local:
                self.push_frame([u for u in local if u in self._sessions], frame)
            for gw, targets in by_gw.items():
                stats["remote_pushes"] += len(targets)
                envelope(gw).frames.append(_Frame(frame, targets))

    def _split(self, users: list[str], routes: dict[str, str]) -> dict[str, list[str]]:
        by_gw: dict[str, list[str]] = {}
        dropped = 0
        for user in users:
            gw = routes.get(user)
            if gw is None:
                dropped += 1
            else:
                targets = by_gw.get(gw)
                if targets is None:
                    by_gw[gw] = [user]
                else:
                    targets.append(user)
        self.stats["dropped_offline"] += dropped
        return by_gw

    async def _publish(self, envelopes: dict[str, _Envelope], prune: dict[str, list[str]]) -> None:
        assert self._client is not None
        pipe = self._client.pipeline(transaction=False)
        order = list(envelopes)
        for gw in order:
            channel = f"{self.prefix}c:{gw}"
            data = _encode(envelopes[gw])
            keys = prune.get(gw)
            if keys:
                pipe.eval(_PUBLISH_PRUNE, len(keys), *keys, channel, data, gw)
            else:
                pipe.publish(channel, data)
        self.stats["publishes"] += len(order)
        results = await pipe.execute(raise_on_error=False)
        for gw, result in zip(order, results, strict=True):
            if isinstance(result, Exception):
                self._warn("publish to %s failed: %s", gw, result)
            elif result == 0:
                # Nobody listens there (gateway gone or reconnecting): those
                # pushes are lost, the inbox has them.
                env = envelopes[gw]
                self.stats["dropped_unreachable"] += sum(len(m.users) for m in env.msgs) + len(env.rcpts)
                if self.route_cache_ttl > 0:
                    for user, (cached, _) in list(self._route_cache.items()):
                        if cached == gw:
                            del self._route_cache[user]

    def _gw_set(self, members: Any) -> set[str]:
        if isinstance(members, Exception) or not members:
            return set()
        return {self._gw_of(m) for m in members}

    def _failed(self, batch: _Batch, exc: BaseException | None) -> None:
        """A round failed: its pushes are lost (the inbox has them); keep the state fixable."""
        if exc is not None:
            if self._down_since is None:
                self._down_since = time.monotonic()
                self._last_warning = time.monotonic()
                log.warning(
                    "gateway %s: Redis unavailable (%s); pushes to other gateways are dropped "
                    "(recipients get them from their inbox) until it is back",
                    self.gateway_id,
                    exc,
                )
            else:
                self._warn("Redis still unavailable: %s", exc)
        self.stats["dropped_unreachable"] += sum(len(u) for _, u in batch.msgs) + len(batch.rcpts)
        for kind, user, value in batch.ops:
            if (
                kind == _DETACH
                and value is not None
                and user not in self._values
                and len(self._retry_detach) < self.max_pending
            ):
                self._retry_detach[user] = value
            elif kind == _ATTACH and value is not None and self._values.get(user) == value:
                self._retry_attach[user] = value  # bounded: one per local session
        if self._retry_attach:
            self._retry_at = time.monotonic() + self._retry_backoff
            self._retry_backoff = min(self._retry_backoff * 2, self.heartbeat)
        # Whatever watch writes were in flight may be lost: re-add them all
        # later. Heartbeat work is dropped until the next tick, so a Redis
        # outage costs one failing round per push batch or tick (plus the
        # attach retries, backing off to one per tick), no busy loop.
        self._resync_watch = True
        self._refresh_backlog.clear()
        self._revalidate_backlog.clear()
        self._rewatch_backlog.clear()
        for change in batch.changes:
            if not change.online:  # could not check: tell the local watchers at least
                self._deliver_presence(change.user, False, change.last_seen)

    def _recovered(self) -> None:
        if self._down_since is not None:
            log.info(
                "gateway %s: Redis reachable again after %.1f s",
                self.gateway_id,
                time.monotonic() - self._down_since,
            )
            self._down_since = None
            self._notify_recovered()

    def _notify_recovered(self, users: Collection[str] | None = None) -> None:
        if self.on_recovered is not None:
            try:
                self.on_recovered(users)
            except Exception:
                log.exception("gateway %s: on_recovered failed", self.gateway_id)

    def _warn(self, fmt: str, *args: Any) -> None:
        """A warning at most every 30 s."""
        now = time.monotonic()
        if now - self._last_warning >= 30.0:
            self._last_warning = now
            log.warning("gateway %s: " + fmt, self.gateway_id, *args)

    # -- the subscriber ------------------------------------------------------

    async def _listen(self) -> None:
        assert self._client is not None
        backoff = 0.05
        while self._running:
            pubsub = self._client.pubsub()
            try:
                if not self._running:
                    return
                await pubsub.subscribe(self.channel)
                while True:  # the subscribe confirmation
                    msg = await pubsub.get_message(timeout=self.socket_timeout)
                    if msg is None:
                        raise ConnectionError("no subscribe confirmation")
                    if msg["type"] == "subscribe":
                        break
                # Events published while we were not subscribed are lost, and
                # a publish that reached nobody pruned our watches: re-add them
                # and let the heartbeat re-validate the presence view.
                self._resync_watch = True
                self._wake.set()
                if self._subscribed_before:
                    # Pushes to our sessions may have been lost meanwhile: they
                    # are in the inbox; have every local session read it now.
                    self._notify_recovered()
                self._subscribed_before = True
                self._subscribed.set()
                backoff = 0.05
                idle = 0
                while True:
                    msg = await pubsub.get_message(timeout=self.heartbeat)
                    if msg is None:
                        idle += 1
                        if idle >= 3:
                            raise ConnectionError("subscription silent, ping unanswered")
                        await pubsub.ping()
                        continue
                    idle = 0
                    if msg["type"] == "message":
                        self._on_envelope(msg["data"])
            except asyncio.CancelledError:
                raise
            except _REDIS_ERRORS as exc:
                self._subscribed.clear()
                self._warn("subscription to %s lost: %s; reconnecting", self.channel, exc)
            except Exception:
                self._subscribed.clear()
                log.exception("gateway %s: subscriber failed", self.gateway_id)
            finally:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.socket_timeout):
                        await pubsub.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.heartbeat, 1.0)

    def _on_envelope(self, data: bytes) -> None:
        try:
            env = _decode(data)
        except msgspec.DecodeError:
            self._warn("undecodable frame on %s", self.channel)
            return
        self.stats["envelopes_in"] += 1
        sessions = self._sessions
        for m in env.msgs:
            message: StoredMessage | None = None
            frame = b""
            for user in m.users:
                session = sessions.get(user)
                if session is None:
                    continue  # stale mapping: gone from here, the inbox has it
                if message is None:
                    message = StoredMessage(m.conv, m.seq, m.id, m.sender, m.ct, m.body, m.ts)
                    frame = deliver_frame(message)
                self._call(session.offer, message, frame)
        for r in env.rcpts:
            session = sessions.get(r.user)
            if session is not None:
                receipt = ReceiptState(r.user, r.conv, r.rv, r.marks, r.all_delivered, r.all_read)
                self._call(session.push_receipt, receipt)
        for fr in env.frames:
            for user in fr.users:
                session = sessions.get(user)
                if session is not None:
                    self._call(session.push_frame, fr.frame)
        now = time.monotonic()
        for p in env.presence:
            self._on_presence(p, now)
        for rp in env.replaced:
            self._evict(rp.user, rp.value, rp.client)
        for rv in env.revoked:
            if self.on_revoked is not None:
                self._call(self.on_revoked, rv.user, rv.reason)
        local = [u for u in env.resync if u in sessions]
        if local:
            self._notify_recovered(local)

    def _call(self, method: Callable[..., None], *args: Any) -> None:
        try:
            method(*args)
        except Exception:
            log.exception("gateway %s: session callback failed", self.gateway_id)

    def _on_presence(self, p: _Presence, now: float) -> None:
        user = p.user
        if user not in self._watchers:
            # Nobody here watches any more (a lost SREM): forget the watch.
            if user not in self._unwatch_sent:
                self._unwatch_sent.add(user)
                self._op(_UNWATCH, user, None)
            return
        self._event_at[user] = now
        self._missing_since.pop(user, None)
        if p.online:
            if user in self._remote_online:
                return  # e.g. the user moved gateways within the debounce
            self._remote_online.add(user)
            if user in self._leaving:
                return  # it left here inside the debounce: our watchers never saw it go
        else:
            self._remote_online.discard(user)
        self._deliver_presence(user, p.online, p.last_seen)

    def _evict(self, user: str, value: bytes, client: str = "") -> None:
        """The user connected on another gateway: close the session ``value`` names."""
        if self._values.get(user) != value:
            return  # already gone, or a newer local session
        session = self._sessions.pop(user)
        del self._values[user]
        self._confirmed.pop(user, None)
        self._evicted[id(session)] = session
        self.stats["replaced_remote"] += 1
        self._call(session.replaced, bool(client) and session.client == client)


class RedisNotifier:
    """The admin CLI's side of cluster mode (``roost.service.admin.Notifier``):
    no sessions, only one-off publishes to every live gateway.

    Every gateway, not only the one the user's route names: a connection
    whose token check began before the revocation may register on any of
    them, and each gateway also remembers the revocation for such late
    registrations (``ChatService.connect``)."""

    def __init__(self, url: str, prefix: str = "roost:", socket_timeout: float = 5.0) -> None:
        self.prefix = prefix
        self._client = aioredis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout, protocol=2
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def gateways(self) -> list[str]:
        """The ids of the gateways whose liveness key exists."""
        start = len(self.prefix) + 2
        return sorted(
            [key.decode()[start:] async for key in self._client.scan_iter(match=f"{self.prefix}g:*")]
        )

    async def _broadcast(self, envelope: _Envelope) -> int:
        data = _encode(envelope)
        reached = 0
        for gw in await self.gateways():
            reached += int(await self._client.publish(f"{self.prefix}c:{gw}", data) > 0)
        return reached

    async def revoke(self, user: str, reason: str) -> None:
        await self._broadcast(_Envelope("admin", revoked=[_Revoked(user, reason)]))

    async def changed(self, snapshots: list[Any]) -> None:
        users: set[str] = set()
        for snap in snapshots:
            if snap.event is not None:
                users.update(snap.event.recipients)
            users.update(r.user for r in snap.receipts)
        if users:
            await self._broadcast(_Envelope("admin", resync=sorted(users)))

    async def online(self, users: list[str]) -> set[str] | None:
        if not users:
            return set()
        values = await self._client.mget([f"{self.prefix}u:{u}" for u in users])
        return {u for u, v in zip(users, values, strict=True) if v is not None}


__all__ = ["RedisNotifier", "RedisRegistry"]
