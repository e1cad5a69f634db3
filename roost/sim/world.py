"""One simulated run: clients, gateways, a store and a router on a virtual clock.

Everything is drawn from one seed: the shape of the run (how many users,
gateways, groups, how small the delivery window), the workload (who sends
what when, who reads, who is added to or removed from a group), every
network delay and every fault. The same seed gives the same run, event for
event (``roost simulate --seed S --trace`` prints it).

What runs is production code: ``ChatService``/``Session``/``DeliveryCursor``
on the server side, the SQLite store's operations (``SimStore``), the real
protocol codec, and the SDK's ``Client`` itself on the client side: its
outbox, resend-in-order, reconnect with backoff, ``ConversationOrder``,
gap filling from history, delivery acks and receipt acks. Only the sockets
(``roost.sim.net``), the gateway's socket loop (``roost.sim.cluster``) and the
clock are simulated.

After the workload every fault heals by itself; the run then settles and the
recorded history goes through the same checker as ``roost verify``.
"""

from __future__ import annotations

import asyncio
import functools
import random
import re
import shutil
import ssl
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from roost.client import Client, Membership, Message, ProtocolMessage, ReceiptEvent, Sent
from roost.client.events import DecryptionFailed, ErrorEvent
from roost.core.tokens import hash_token
from roost.service.chat import ServiceConfig
from roost.sim.cluster import Gateway, Router
from roost.sim.faults import DEFAULT_FAULTS
from roost.sim.loop import VirtualClockLoop
from roost.sim.net import Connection
from roost.sim.store import STORE_FAIL_STEPS, SimStore
from roost.sim.trace import Trace, request_ref
from roost.verify.history import SYSTEM, History, ReceiptSeen, Report, Shown, Violation, check
from roost.verify.history import Sent as SentRecord

NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")
BIG_SHARE = 0.15  # the share of runs drawn as a bigger world
SETTLE_SECONDS = 20.0  # virtual time after the workload for everything to heal and drain
# One-time prekeys of each kind per simulated client (the SDK keeps 100): each
# is an ML-KEM key generation and a signature, most of a run's CPU at 100, and
# at most 7 peers start a session with a simulated user; spent, the bundle
# falls back to the last-resort KEM key and the refill path runs, as on a device.
SIM_PREKEY_BATCH = 20


def _rng(seed: int, name: str) -> random.Random:
    # A separate stream per concern, so one more draw in one place does not
    # shift every later choice of the run.
    return random.Random(f"{seed}/{name}")


@dataclass(frozen=True, slots=True)
class Action:
    t: float
    kind: str  # send | add | remove | leave
    user: str
    to: str | None = None  # send: a user
    group: str | None = None  # send to a group, or the group of a membership change
    target: str | None = None  # add/remove: the member


@dataclass(slots=True)
class Scenario:
    seed: int
    users: list[str]
    gateways: int
    window: int
    duration: float
    latency: tuple[float, float]
    groups: dict[str, list[str]]  # created at the start; the first member is the admin
    starts: dict[str, float]  # when each user's app first starts
    actions: list[Action]
    faults: list[tuple[float, str]]
    read_probability: float


def draw_scenario(seed: int, faults: Iterable[str] = DEFAULT_FAULTS) -> Scenario:
    rng = _rng(seed, "scenario")
    # Most runs are small (a bug shows in few events, and the story is short);
    # one in BIG_SHARE is a bigger world: more users, groups, messages, faults.
    big = rng.random() < BIG_SHARE
    users = list(NAMES[: rng.randint(6, 8) if big else rng.randint(2, 5)])
    duration = rng.uniform(4.0, 10.0) if big else rng.uniform(2.0, 6.0)
    groups: dict[str, list[str]] = {}
    if len(users) >= 3:
        for _ in range(rng.randint(1, 3) if big else rng.randint(0, 2)):
            gid = f"g:{rng.getrandbits(64):016x}"
            groups[gid] = rng.sample(users, rng.randint(2, len(users)))
    starts = {u: 0.0 if rng.random() < 0.6 else rng.uniform(0.0, duration / 2) for u in users}
    actions = _draw_actions(rng, users, groups, duration, (40, 100) if big else (5, 40))
    kinds = list(faults)
    count = rng.randint(2, 14) if big else rng.randint(0, 8)
    fault_plan = (
        sorted((rng.uniform(0.05, duration), rng.choice(kinds)) for _ in range(count)) if kinds else []
    )
    return Scenario(
        seed=seed,
        users=users,
        gateways=rng.randint(1, 3),
        window=rng.choice((1, 2, 3, 4, 8, 128)),
        duration=duration,
        latency=(0.0001, rng.uniform(0.001, 0.05)),
        groups=groups,
        starts=starts,
        actions=actions,
        faults=fault_plan,
        read_probability=rng.choice((0.0, 0.3, 1.0)),
    )


def _draw_actions(
    rng: random.Random,
    users: list[str],
    groups: dict[str, list[str]],
    duration: float,
    count: tuple[int, int],
) -> list[Action]:
    times = sorted(rng.uniform(0.0, duration) for _ in range(rng.randint(*count)))
    members = {g: list(m) for g, m in groups.items()}
    ever = {g: set(m) for g, m in groups.items()}  # nobody joins twice: the checker keeps one span
    actions: list[Action] = []
    for t in times:
        user = rng.choice(users)
        mine = [g for g, m in members.items() if user in m]
        roll = rng.random()
        if groups and roll < 0.08:
            group = rng.choice(list(groups))
            admin = members[group][0]
            outsiders = [u for u in users if u not in ever[group]]
            others = members[group][1:]
            change = rng.choice(("add", "remove", "leave"))
            if change == "add" and outsiders:
                target = rng.choice(outsiders)
                ever[group].add(target)
                members[group].append(target)
                actions.append(Action(t, "add", admin, group=group, target=target))
            elif change == "remove" and others:
                target = rng.choice(others)
                members[group].remove(target)
                actions.append(Action(t, "remove", admin, group=group, target=target))
            elif change == "leave" and others:
                target = rng.choice(others)
                members[group].remove(target)
                actions.append(Action(t, "leave", target, group=group))
        elif mine and roll < 0.4:
            actions.append(Action(t, "send", user, group=rng.choice(mine)))
        else:
            actions.append(Action(t, "send", user, to=rng.choice([u for u in users if u != user])))
    return actions


class _OrderedSet(dict[str, None]):
    """An insertion-ordered stand-in for the SDK's set of conversations owing a
    dack: a set of strings iterates in hash order, which changes from process
    to process, and the order of dack frames must replay exactly."""

    def add(self, item: str) -> None:
        self[item] = None


class _Dial:
    """``ClientSession.ws_connect(...)`` for the simulated network."""

    def __init__(self, world: World, user: SimUser, url: str) -> None:
        self.world = world
        self.user = user
        self.url = url
        self.conn: Connection | None = None

    async def __aenter__(self) -> Any:
        world = self.world
        await asyncio.sleep(world.dial_rng.uniform(0.0005, 0.005))  # TCP and the HTTP upgrade
        gateway = world.gateways.get(self.url.removesuffix("/v1/ws"))
        if gateway is None or not gateway.alive:
            raise aiohttp.ClientConnectionError(f"{self.url}: connection refused")
        world.conn_ids += 1
        conn = Connection(
            world.conn_ids,
            self.user.name,
            gateway.name,
            _rng(world.seed, f"conn/{world.conn_ids}"),
            world.scenario.latency,
            world.record,
        )
        self.conn = conn
        self.user.conn = conn
        gateway.accept(conn)
        return conn.client

    async def __aexit__(self, *exc: object) -> None:
        if self.conn is not None:
            await self.conn.client.close()


class _FakeHttp:
    def __init__(self, world: World, user: SimUser) -> None:
        self.world = world
        self.user = user

    def ws_connect(self, url: str, **kwargs: Any) -> _Dial:
        return _Dial(self.world, self.user, url)

    async def close(self) -> None:
        """No real session to close."""


@functools.cache
def _tls() -> ssl.SSLContext:
    return ssl.create_default_context()


def _quiet(fut: asyncio.Future[Any]) -> None:
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())


@dataclass
class SimUser:
    """One user's app: the SDK client on a durable state file, and what it saw."""

    name: str
    world: World
    state_path: Path
    client: Client | None = None
    conn: Connection | None = None
    reader: asyncio.Task[None] | None = None
    generation: int = 0
    sent: int = 0
    dead_clients: list[Client] = field(default_factory=list)

    def start(self) -> None:
        world = self.world
        self.generation += 1
        client = Client(
            list(world.urls_for(self.name)),
            f"tok-{self.name}",
            state_path=self.state_path,
            backoff_base=0.05,
            backoff_cap=1.0,
            ssl=_tls(),  # never used (no TLS in the simulated network); the system's CAs load once
        )
        client.crypto.prekey_batch = SIM_PREKEY_BATCH
        # Held-message timers on the run's virtual time: seconds of virtual
        # time pass in milliseconds of wall time, and server timestamps are
        # wall time, so virtual seconds are added to the wall clock at start.
        client.crypto.wall_clock = world.virtual_wall_clock
        ids = _rng(world.seed, f"uuids/{self.name}/{self.generation}")
        client.crypto.new_uuid = lambda: uuid.UUID(int=ids.getrandbits(128), version=4)
        client._rng = _rng(world.seed, f"backoff/{self.name}/{self.generation}")
        client._dack_due = _OrderedSet()  # type: ignore[assignment]
        client._http = _FakeHttp(world, self)  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        client._first_result = loop.create_future()
        _quiet(client._first_result)
        client._run_task = loop.create_task(client._run())
        self.client = client
        self.reader = loop.create_task(self._read(client))
        world.record("client-up", self.name, f"app started (generation {self.generation})")

    async def _read(self, client: Client) -> None:
        while True:
            self._record(client, await client.next_event())

    def _record(self, client: Client, event: Any) -> None:
        world = self.world
        now = world.now()
        history = world.history
        if isinstance(event, Message):
            history.shown.append(Shown(self.name, event.conv, event.seq, event.sender, event.id, now))
            world.record("shown", self.name, f"{event.conv}#{event.seq} id={event.id} from={event.sender}")
            if world.read_rng.random() < world.scenario.read_probability:
                _quiet(asyncio.get_running_loop().create_task(client.mark_read(event.conv, event.seq)))
        elif isinstance(event, Membership):
            history.shown.append(Shown(self.name, event.conv, event.seq, SYSTEM, "", now))
            world.record(
                "shown", self.name, f"{event.conv}#{event.seq} {event.action} {','.join(event.users)}"
            )
        elif isinstance(event, Sent):
            world.acked[(self.name, event.message_id)] = (event.conv, event.seq, now)
        elif isinstance(event, ProtocolMessage):  # an encryption protocol message: its seq is no gap
            history.protocol[(self.name, event.conv)].add(event.seq)
        elif isinstance(event, ReceiptEvent):
            history.receipts.append(ReceiptSeen(self.name, event.conv, dict(event.marks), now))
        elif isinstance(event, ErrorEvent):
            world.record("error", self.name, f"{event.code} {event.message} ref={request_ref(event.ref)}")
        elif isinstance(event, DecryptionFailed):
            # Goal 0: the SDK asks the sender again, but a failure means a
            # session or sender key went wrong somewhere.
            world.undecryptable.append(
                Violation(
                    "undecryptable",
                    event.conv,
                    event.seq,
                    f"{self.name} could not decrypt {event.message_id!r} from {event.sender}: {event.reason}",
                )
            )
            world.record("undecryptable", self.name, f"{event.conv}#{event.seq} {event.reason}")
        # Connected / Disconnected: the network traces connections itself.

    def crash(self) -> None:
        """The app is killed: the socket resets, uncommitted local state is lost."""
        client = self.client
        if client is None:
            return
        self.world.record("client-crash", self.name, f"app killed (generation {self.generation})")
        # Whatever the SDK already emitted was on screen.
        while not client._events.empty():
            self._record(client, client._events.get_nowait())
        if self.reader is not None:
            self.reader.cancel()
        client._closing = True
        if self.conn is not None:
            self.conn.cut("client crashed", 0.0, self.world.fault_rng.uniform(0.0, 0.3))
        if client._run_task is not None:
            client._run_task.cancel()
        state = client.state
        if state._in_tx:
            state.db.execute("ROLLBACK")
            state._in_tx = False
        state.release_lock()  # as the kernel does for a killed process
        self.dead_clients.append(client)
        self.client = None

    def send(self, action: Action) -> None:
        client = self.client
        if client is None:
            return  # the app is not running: nothing is sent
        world = self.world
        message_id = f"{self.name}-{self.sent}"
        world.history.sent.append(SentRecord(self.name, message_id, self.sent, world.now()))
        self.sent += 1
        target = action.to or action.group
        world.record("send", self.name, f"id={message_id} to={target}")
        text = f"{message_id} to {target}"
        world.plaintexts.append(text.encode())
        task = asyncio.get_running_loop().create_task(
            client.send(
                text,
                to=action.to,
                group=action.group,
                message_id=message_id,
                wait=False,
            )
        )
        _quiet(task)

    def change_group(self, action: Action) -> None:
        client = self.client
        if client is None or action.group is None:
            return
        if action.kind == "add":
            request = client.add_members(action.group, [action.target or ""])
        elif action.kind == "remove":
            request = client.remove_members(action.group, [action.target or ""])
        else:
            request = client.leave_group(action.group)
        self.world.record(action.kind, self.name, f"{action.group} {action.target or ''}".strip())
        _quiet(asyncio.get_running_loop().create_task(request))

    def close_states(self) -> None:
        for client in [*self.dead_clients, *([self.client] if self.client else [])]:
            client.state.db.close()


def _receipt_state(violation: Violation, world: World) -> tuple[bool, bool] | None:
    """For a missing receipt: (the store holds the recipient's mark, the sender
    is still owed a receipt for the conversation); None for other violations."""
    if violation.kind != "missing_receipt":
        return None
    names = re.fullmatch(r"(\S+) never learnt that (\S+) got .*", violation.detail)
    if names is None:
        return None
    sender, recipient = names.groups()
    conn = world.store.connection
    mark = conn.execute(
        "SELECT delivered FROM members WHERE conv=? AND user=?", (violation.conv, recipient)
    ).fetchone()
    owed = conn.execute(
        "SELECT 1 FROM receipt_pending WHERE user=? AND conv=? AND rv > acked", (sender, violation.conv)
    ).fetchone()
    return mark is not None and mark[0] >= violation.seq, owed is not None


def _receipt_died_with_gateway(violation: Violation, world: World) -> bool:
    """The store holds the recipient's mark and still owes the sender the
    receipt, in a run where a gateway died: the mark's commit was answered to
    a dead gateway, and only the sender's next connection replays it."""
    killed = world.faults.get("gateway-kill", 0) + world.faults.get("server-kill", 0)
    return killed > 0 and _receipt_state(violation, world) == (True, True)


# Violations explained by a documented, still open gap of the code
# (docs/simulation.md, "What it found"): reported apart, failed only with
# ``--strict``. Each entry names the gap and recognises its violations from
# the violation and the world as the run left it (its store, its faults).
OPEN_GAPS: dict[str, Callable[[Violation, World], bool]] = {
    "receipt-died-with-gateway": _receipt_died_with_gateway,
}


def known_gaps(violations: list[Violation], world: World) -> dict[Violation, str]:
    """The open gap each explained violation comes from."""
    found: dict[Violation, str] = {}
    for violation in violations:
        for name, matches in OPEN_GAPS.items():
            if matches(violation, world):
                found[violation] = name
                break
    return found


@dataclass
class SimResult:
    seed: int
    scenario: Scenario
    report: Report
    extra: list[Violation]
    trace: Trace
    faults: dict[str, int]
    members: dict[str, dict[str, tuple[int, int | None]]] = field(default_factory=dict)
    gaps: dict[Violation, str] = field(default_factory=dict)  # violation -> the open gap it comes from

    @property
    def violations(self) -> list[Violation]:
        return [*self.report.violations, *self.extra]

    @property
    def known(self) -> list[Violation]:
        """Violations explained by a documented gap of the current code."""
        return [v for v in self.violations if v in self.gaps]

    @property
    def unexplained(self) -> list[Violation]:
        return [v for v in self.violations if v not in self.gaps]

    @property
    def ok(self) -> bool:
        return not self.unexplained

    def involved_users(self) -> set[str]:
        found: set[str] = set()
        for v in self.violations:
            found.update(u for u in self.scenario.users if re.search(rf"\b{u}\b", v.detail))
        return found


class World:
    def __init__(self, scenario: Scenario, root: Path) -> None:
        self.scenario = scenario
        self.seed = scenario.seed
        self.root = root
        self.trace = Trace()
        self.history = History()
        self.acked: dict[tuple[str, str], tuple[str, int, float]] = {}
        self.fault_rng = _rng(self.seed, "faults")
        self.dial_rng = _rng(self.seed, "dial")
        self.read_rng = _rng(self.seed, "reads")
        self.faults: dict[str, int] = {}
        self.errors: list[str] = []
        self.undecryptable: list[Violation] = []
        self.plaintexts: list[bytes] = []  # every text sent: none may reach the store as is
        self.conn_ids = 0
        self.finished = False  # the verdict is in; tearing down is not part of the run
        self.store = SimStore(_rng(self.seed, "store"), self.record)
        self.router = Router(self.seed, self.record)
        config = ServiceConfig(window=scenario.window, rate=0.0, presence_debounce=3.0)
        self.gateways = {
            f"sim://g{i}": Gateway(f"g{i}", self.store, self.router, config, self.record)
            for i in range(scenario.gateways)
        }
        self.users = {u: SimUser(u, self, root / f"{u}.sqlite") for u in scenario.users}
        self.wall_at_start = time.time()

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def virtual_wall_clock(self) -> float:
        """The wall clock at the run's start plus the virtual time since."""
        return self.wall_at_start + self.now()

    def record(self, kind: str, who: str, detail: str | bytes) -> None:
        if not self.finished:
            self.trace.add(self.now(), kind, who, detail)

    def urls_for(self, user: str) -> list[str]:
        urls = list(self.gateways)
        _rng(self.seed, f"urls/{user}").shuffle(urls)
        return urls

    async def run(self) -> SimResult:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._on_loop_error)
        scenario = self.scenario
        await self.store.open()
        await self._setup()
        for gateway in self.gateways.values():
            gateway.start()
        start = loop.time()
        for name, at in scenario.starts.items():
            loop.call_at(start + at, self.users[name].start)
        for action in scenario.actions:
            loop.call_at(start + action.t, self._act, action)
        for at, kind in scenario.faults:
            loop.call_at(start + at, self._inject, kind)
        await asyncio.sleep(scenario.duration + SETTLE_SECONDS)
        for user in self.users.values():
            if user.client is not None:
                while not user.client._events.empty():
                    user._record(user.client, user.client._events.get_nowait())
        self.finished = True
        return self._result()

    async def _setup(self) -> None:
        now = 0
        await asyncio.gather(*(self.store.add_user(u, hash_token(f"tok-{u}"), now) for u in self.users))
        for gid, members in self.scenario.groups.items():
            await self.store.create_group(members[0], gid, gid[-4:], members, 1024, now)

    def _act(self, action: Action) -> None:
        user = self.users[action.user]
        if action.kind == "send":
            user.send(action)
        else:
            user.change_group(action)

    # -- faults ----------------------------------------------------------------

    def _inject(self, kind: str) -> None:
        rng = self.fault_rng
        loop = asyncio.get_running_loop()
        self.faults[kind] = self.faults.get(kind, 0) + 1
        live = [u for u in self.users.values() if u.conn is not None and u.conn.alive]
        if kind == "cut" and live:
            rng.choice(live).conn.cut("network", rng.uniform(0, 0.3), rng.uniform(0, 0.3))  # type: ignore[union-attr]
        elif kind == "partition" and live:
            rng.choice(live).conn.partition(rng.uniform(0.1, 2.0))  # type: ignore[union-attr]
        elif kind == "client-crash":
            running = [u for u in self.users.values() if u.client is not None]
            if running:
                user = rng.choice(running)
                user.crash()
                loop.call_later(rng.uniform(0.05, 1.0), user.start)
        elif kind == "server-kill":
            # Every gateway at once (the embedded server, or a whole cluster).
            self.record("server-kill", "", "every gateway is killed")
            for gateway in self.gateways.values():
                if gateway.alive:
                    gateway.kill()
                    loop.call_later(rng.uniform(0.1, 1.5), gateway.start)
        elif kind == "gateway-kill":
            alive = [g for g in self.gateways.values() if g.alive]
            if alive:
                gateway = rng.choice(alive)
                gateway.kill()
                loop.call_later(rng.uniform(0.1, 1.5), gateway.start)
        elif kind.startswith("store-fail"):
            at_commit = kind == "store-fail-at-commit"
            steps = [
                "commit" if at_commit else rng.choice(STORE_FAIL_STEPS) for _ in range(rng.randint(1, 3))
            ]
            self.record("store-fail", "store", f"the next {len(steps)} batches fail at {','.join(steps)}")
            self.store.fail_batches(steps)
        elif kind == "writer-crash":
            step = rng.choice(("before", "after"))
            self.record("writer-crash", "store", f"the next batch's writer fails {step} COMMIT")
            self.store.writer_crash(step)
        elif kind == "store-read-fail":
            seconds = rng.uniform(0.2, 2.0)
            self.record("read-fail", "store", f"half of the reads fail for {seconds:.3f}s")
            self.store.fail_reads(seconds)
        elif kind == "store-slow-reads":
            seconds = rng.uniform(0.1, 1.5)
            self.record("slow-reads", "store", f"reads answer late for {seconds:.3f}s")
            self.store.slow_reads(seconds)
        elif kind.startswith("store-crash") and not self.store.down:
            self.store.crash(after_commit=kind == "store-crash-after-commit")
            loop.call_later(rng.uniform(0.05, 1.0), self.store.restart)
        elif kind == "registry-restart" and not self.router.down:
            self.router.lose_all(rng.uniform(0.05, 0.5))
        elif kind == "registry-stale":
            self.router.make_stale(rng.choice(self.scenario.users), rng.uniform(0.1, 1.0))

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        text = f"{context.get('message')}: {exc!r}"
        self.errors.append(text)
        self.record("exception", "", text)

    # -- the verdict -----------------------------------------------------------

    def _stored_messages(self) -> list[tuple[str, int, str, str, bytes]]:
        """(conv, seq, sender, client id, body) of every committed message."""
        rows = self.store.connection.execute(
            "SELECT conv, seq, sender, client_id, body FROM messages ORDER BY conv, seq"
        ).fetchall()
        return [(c, q, s, i, bytes(b)) for c, q, s, i, b in rows]

    def _plaintext_in_store(self, stored: list[tuple[str, int, str, str, bytes]]) -> list[Violation]:
        """Every message crossed the server as ciphertext: no stored body
        holds a text the simulated users typed."""
        return _plaintext_hits(stored, self.plaintexts)[:20]

    def _result(self) -> SimResult:
        history = self.history
        history.sent = [
            SentRecord(s.sender, s.client_id, s.index, s.t, True, *self.acked[(s.sender, s.client_id)])
            if (s.sender, s.client_id) in self.acked
            else s
            for s in history.sent
        ]
        history.members = self.store.membership()
        stored = self._stored_messages()
        report = check(history)
        extra: list[Violation] = [*self.undecryptable[:20], *self._plaintext_in_store(stored)]
        for user in self.users.values():
            if user.client is not None and user.client.pending_outbox():
                ids = [item.id for item in user.client.pending_outbox()]
                extra.append(Violation("stuck", "", 0, f"{user.name}'s outbox still holds {ids[:5]}"))
        extra += [Violation(*broken) for broken in self.store.broken_rules()]
        for text in [e for e in self.errors if not _expected(e)][:5]:
            extra.append(Violation("exception", "", 0, text))
        return SimResult(
            self.seed,
            self.scenario,
            report,
            extra,
            self.trace,
            dict(sorted(self.faults.items())),
            history.members,
            known_gaps([*report.violations, *extra], self),
        )


def _plaintext_hits(
    stored: list[tuple[str, int, str, str, bytes]], plaintexts: list[bytes]
) -> list[Violation]:
    found: list[Violation] = []
    for conv, seq, sender, _cid, body in stored:
        hit = next((text for text in plaintexts if text in body), None)
        if hit is not None:
            found.append(Violation("plaintext", conv, seq, f"the store holds {hit!r} from {sender} as is"))
    return found


def _expected(error: str) -> bool:
    """Store failures whose future nobody awaits (last-seen writes, ...): log noise, not a bug."""
    return "never retrieved" in error and ("StoreUnavailable" in error or "ProtocolError" in error)


def run_seed(
    seed: int, faults: Iterable[str] = DEFAULT_FAULTS, scenario: Scenario | None = None
) -> SimResult:
    """One run from ``seed``, on a fresh virtual-clock loop."""
    scenario = scenario or draw_scenario(seed, faults)
    root = Path(tempfile.mkdtemp(prefix=f"roost-sim-{seed}-", dir=_scratch_dir()))
    loop = VirtualClockLoop()
    world = World(scenario, root)
    try:
        return loop.run_until_complete(world.run())
    finally:
        _shutdown(loop, world)
        shutil.rmtree(root, ignore_errors=True)


def _shutdown(loop: VirtualClockLoop, world: World) -> None:
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for user in world.users.values():
        user.close_states()
    loop.run_until_complete(world.store.close())
    loop.close()


def _scratch_dir() -> str | None:
    # Client state files are tiny and short-lived: keep them in memory when possible.
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() else None
