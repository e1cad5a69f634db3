"""``roost verify --embedded``: a workload under faults, then the history check.

K SDK clients (each with its own durable state file) send 1:1 and group
messages at a steady rate, read some conversations, and record what they sent
and every message and receipt the SDK showed them. A nemesis drawn from
``--seed`` kills the server with SIGKILL and restarts it, cuts client
connections mid-stream, and crashes clients (the client object is abandoned
without a goodbye; a new one is started from the same state file, so its
outbox is resent). Then every fault is healed, the run waits until the system
has converged and ``roost.verify.history.check`` judges the whole history.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roost.client import Client, Membership, Message, ReceiptEvent, Sent
from roost.devcluster.postgres import free_port
from roost.devcluster.run import wait_healthy
from roost.verify.history import SYSTEM, History, ReceiptSeen, Report, Shown, check
from roost.verify.history import Sent as SentRecord

NEMESES = ("kill-server", "cut-connection", "crash-client")


class EmbeddedTarget:
    """A ``roost serve`` subprocess on a free port with its own data dir."""

    def __init__(self, root: Path) -> None:
        self.data_dir = root / "server"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "roost.cli.main", "serve", "--data-dir", str(self.data_dir),
                    "--port", str(self.port), "--rate-limit", "0", "--log-level", "warning",
                ],
                stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        wait_healthy(self.url, self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Recorder:
    """One simulated user: its client and what it recorded."""

    name: str
    token: str
    state: Path
    url: str
    history: History
    client: Client | None = None
    reader: asyncio.Task[None] | None = None
    index: int = 0
    acked: dict[str, tuple[str, int, float]] = field(default_factory=dict)

    async def start(self) -> None:
        self.client = Client(self.url, self.token, state_path=self.state, backoff_cap=1.0)
        await self.client.connect(timeout=None)
        self.reader = asyncio.create_task(self._read(self.client))

    async def _read(self, client: Client) -> None:
        rng = random.Random(self.name)
        async for event in client.events():
            now = time.monotonic()
            if isinstance(event, Message):
                self.history.shown.append(
                    Shown(self.name, event.conv, event.seq, event.sender, event.id, now)
                )
                if rng.random() < 0.3:
                    await client.mark_read(event.conv, event.seq)
            elif isinstance(event, Membership):
                self.history.shown.append(Shown(self.name, event.conv, event.seq, SYSTEM, "", now))
            elif isinstance(event, Sent):
                self.acked[event.message_id] = (event.conv, event.seq, now)
            elif isinstance(event, ReceiptEvent):
                self.history.receipts.append(ReceiptSeen(self.name, event.conv, dict(event.marks), now))

    async def send(self, text: str, to: str | None = None, group: str | None = None) -> None:
        assert self.client is not None
        message_id = f"{self.name}-{self.index}"
        self.history.sent.append(SentRecord(self.name, message_id, self.index, time.monotonic()))
        self.index += 1
        await self.client.send(text, to=to, group=group, message_id=message_id, wait=False)

    def crash(self) -> None:
        """Abandon the client without a goodbye, as a killed app would."""
        if self.client is not None:
            ws = self.client._ws
            if ws is not None and ws._writer.transport is not None:  # abort the TCP connection
                ws._writer.transport.abort()
            self.client._closing = True
            if self.client._run_task is not None:
                self.client._run_task.cancel()
            self.client.state.close()
        if self.reader is not None:
            self.reader.cancel()
        self.client = None

    async def stop(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        if self.client is not None:
            await self.client.close()


@dataclass
class VerifyResult:
    report: Report
    faults: dict[str, int]
    duration: float
    seed: int

    def as_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "duration": self.duration,
            "sent": self.report.sent,
            "acked": self.report.acked,
            "delivered": self.report.delivered,
            "faults": self.faults,
            "violations": [
                {"kind": v.kind, "conv": v.conv, "seq": v.seq, "detail": v.detail}
                for v in self.report.violations
            ],
            "latency_ms": {
                "p50": self.report.percentile(50),
                "p99": self.report.percentile(99),
                "max": self.report.percentile(100),
            },
        }


async def _add_users(data_dir: Path, names: list[str]) -> dict[str, str]:
    from roost.service.chat import hash_token, now_ms
    from roost.store.sqlite import SqliteStore, database_path

    tokens = {name: "rt_" + secrets.token_urlsafe(24) for name in names}
    store = SqliteStore(database_path(data_dir))
    await store.open()
    try:
        await asyncio.gather(*(store.add_user(n, hash_token(t), now_ms()) for n, t in tokens.items()))
    finally:
        await store.close()
    return tokens


async def verify_embedded(
    clients: int = 50,
    duration: float = 60.0,
    seed: int = 1,
    rate: float = 100.0,
    nemeses: tuple[str, ...] = NEMESES,
    converge_timeout: float = 60.0,
) -> VerifyResult:
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="roost-verify-"))
    target = EmbeddedTarget(root)
    target.data_dir.mkdir(parents=True)
    names = [f"v{i}" for i in range(clients)]
    tokens = await _add_users(target.data_dir, names)
    target.start()
    history = History()
    users = {n: Recorder(n, tokens[n], root / f"{n}.state", target.url, history) for n in names}
    faults = dict.fromkeys(nemeses, 0)
    started = time.monotonic()
    try:
        await asyncio.gather(*(u.start() for u in users.values()))
        # Two groups, created before the workload: members see them from seq 1.
        groups: list[str] = []
        for g in range(2):
            members = rng.sample(names, max(2, clients // 4))
            owner = users[members[0]]
            assert owner.client is not None
            info = await owner.client.create_group(f"group{g}", members[1:])
            groups.append(info.group)
            history.members[info.group] = {m: (0, None) for m in info.members}
        interval = 1.0 / rate
        next_fault = time.monotonic() + rng.uniform(2, 5)
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            sender = users[rng.choice(names)]
            if sender.client is not None:
                mine = [g for g in groups if sender.name in history.members[g]]
                if mine and rng.random() < 0.2:
                    await sender.send(f"to the group at {time.monotonic():.3f}", group=rng.choice(mine))
                else:
                    peer = rng.choice([n for n in names if n != sender.name])
                    await sender.send(f"hello {peer}", to=peer)
            if nemeses and time.monotonic() >= next_fault:
                await _inject(rng.choice(nemeses), rng, target, users, faults)
                next_fault = time.monotonic() + rng.uniform(2, 6)
            await asyncio.sleep(interval)
        # Heal: server up, every user connected again.
        if target.proc is None or target.proc.poll() is not None:
            target.start()
        for user in users.values():
            if user.client is None:
                await user.start()
        await _converge(history, users, converge_timeout)
    finally:
        await asyncio.gather(*(u.stop() for u in users.values()), return_exceptions=True)
        target.stop()
    # Fill in what the SDK acked.
    acked = {mid: info for u in users.values() for mid, info in u.acked.items()}
    history.sent = [
        SentRecord(s.sender, s.client_id, s.index, s.t, True, acked[s.client_id][0], acked[s.client_id][1],
                   acked[s.client_id][2])
        if s.client_id in acked else s
        for s in history.sent
    ]  # fmt: skip
    return VerifyResult(check(history), faults, time.monotonic() - started, seed)


async def _inject(kind: str, rng: random.Random, target: EmbeddedTarget, users: dict[str, Recorder],
                  faults: dict[str, int]) -> None:  # fmt: skip
    faults[kind] += 1
    if kind == "kill-server":
        target.kill()
        await asyncio.sleep(rng.uniform(0.2, 1.0))
        await asyncio.to_thread(target.start)
    elif kind == "cut-connection":
        for user in rng.sample(list(users.values()), k=max(1, len(users) // 10)):
            ws = user.client._ws if user.client is not None else None
            if ws is not None and ws._writer.transport is not None:
                ws._writer.transport.abort()
    elif kind == "crash-client":
        user = rng.choice(list(users.values()))
        user.crash()
        await asyncio.sleep(rng.uniform(0.1, 1.0))
        await user.start()


async def _converge(history: History, users: dict[str, Recorder], timeout: float) -> None:
    """Wait until outboxes are empty and the history check finds nothing missing."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        pending = sum(len(u.client.pending_outbox()) for u in users.values() if u.client is not None)
        if pending == 0:
            acked = {mid: info for u in users.values() for mid, info in u.acked.items()}
            snapshot = History(
                [
                    SentRecord(s.sender, s.client_id, s.index, s.t, True, *acked[s.client_id])
                    if s.client_id in acked else s
                    for s in history.sent
                ],
                list(history.shown),
                list(history.receipts),
                history.members,
            )  # fmt: skip
            kinds = {v.kind for v in check(snapshot).violations}
            if not kinds & {"lost", "missing_receipt", "gap"}:
                return
        await asyncio.sleep(0.5)


def format_report(result: VerifyResult) -> str:
    r = result.report
    marks = (("p50", r.percentile(50)), ("p99", r.percentile(99)), ("max", r.percentile(100)))
    lines = [
        f"roost verify (embedded) seed={result.seed} duration={result.duration:.1f}s",
        f"sent {r.sent}, acked {r.acked}, delivered (message x recipient) {r.delivered}",
        "faults: " + ", ".join(f"{k} {v}" for k, v in result.faults.items()),
        "latency ms: "
        + ", ".join(f"{name} {value:.1f}" if value is not None else f"{name} -" for name, value in marks),
        f"violations: {len(r.violations)}",
    ]
    lines += [f"  {v.kind} {v.conv}#{v.seq}: {v.detail}" for v in r.violations[:50]]
    return "\n".join(lines)


def run_cli(args: Any) -> int:
    nemeses = tuple(n for n in NEMESES if n not in (args.no or []))
    result = asyncio.run(
        verify_embedded(
            clients=args.clients, duration=args.duration, seed=args.seed, rate=args.rate, nemeses=nemeses
        )
    )
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.as_json(), indent=2))
    r = result.report
    if r.violations:
        return 1
    if r.acked == 0 or (nemeses and sum(result.faults.values()) == 0):
        print("not a meaningful run: nothing acked or no fault injected", file=sys.stderr)
        return 1
    return 0
