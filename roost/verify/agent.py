"""One ``roost verify`` client process: a few SDK users running the workload.

Started by the checker as ``python -m roost.verify.agent CONFIG.json``. Each
user is a real :class:`roost.client.Client` with its own durable state file,
so when the checker kills this process with SIGKILL and starts it again, the
SDK resends its outbox exactly as an app killed by its OS would.

What every user does and sees is appended to its own log (JSON lines),
written with one ``os.write`` per record *synchronously when the SDK emits
the event*, so a SIGKILL never loses a record of something the SDK already
showed (the kernel keeps the written bytes; only the process dies).

Signals: SIGUSR1 stops the sending (the checker is converging); SIGTERM
flushes, closes the clients and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from roost.client import (
    Client,
    DecryptionFailed,
    Disconnected,
    Membership,
    Message,
    ProtocolMessage,
    ReceiptEvent,
    Sent,
)
from roost.client.events import Event
from roost.verify.history import SYSTEM


class RecordLog:
    """Append-only JSON lines, one write(2) per record."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict[str, Any]) -> None:
        os.write(self.fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())

    def close(self) -> None:
        os.close(self.fd)


def read_log(path: Path) -> list[dict[str, Any]]:
    """Every complete record (a torn last line, impossible with one small write, is skipped)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_bytes().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


class RecordingClient(Client):
    """The SDK client, recording each event at the moment the SDK emits it."""

    def __init__(self, *args: Any, log: RecordLog, incarnation: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log = log
        self.incarnation = incarnation

    def _emit(self, event: Event) -> None:
        now = time.monotonic()
        if isinstance(event, Message):
            self.log.write(
                {"k": "shown", "conv": event.conv, "seq": event.seq, "from": event.sender,
                 "id": event.id, "t": now, "inc": self.incarnation}
            )  # fmt: skip
        elif isinstance(event, Membership):
            self.log.write(
                {"k": "shown", "conv": event.conv, "seq": event.seq, "from": SYSTEM, "id": "",
                 "t": now, "inc": self.incarnation}
            )  # fmt: skip
        elif isinstance(event, Sent):
            self.log.write(
                {"k": "acked", "id": event.message_id, "conv": event.conv, "seq": event.seq, "t": now}
            )
        elif isinstance(event, ReceiptEvent):
            marks = {user: list(mark) for user, mark in event.marks.items()}
            every = [event.all_delivered, event.all_read]
            self.log.write({"k": "receipt", "conv": event.conv, "marks": marks, "all": every, "t": now})
        elif isinstance(event, ProtocolMessage):
            self.log.write({"k": "protocol", "conv": event.conv, "seq": event.seq, "t": now})
        elif isinstance(event, DecryptionFailed):
            # Counted per run next to loss and duplicates (goal: 0); the SDK
            # asks the sender again, so the message itself is not lost.
            self.log.write(
                {"k": "undecryptable", "conv": event.conv, "seq": event.seq, "from": event.sender,
                 "id": event.message_id, "why": event.reason, "t": now}
            )  # fmt: skip
        elif isinstance(event, Disconnected):
            self.log.write({"k": "disconnected", "code": event.code, "final": event.final, "t": now})
        super()._emit(event)


@dataclass
class UserConfig:
    name: str
    token: str
    state: str
    log: str


@dataclass
class AgentConfig:
    urls: list[str]
    users: list[UserConfig]
    peers: list[str]  # every user of the run
    groups: dict[str, list[str]]  # group id -> members
    rate: float  # messages per second, this process's users together
    seed: int
    incarnation: int
    status: str  # where the pending-outbox counts are written
    read_fraction: float = 0.3
    group_fraction: float = 0.2

    @classmethod
    def load(cls, path: str) -> AgentConfig:
        raw = json.loads(Path(path).read_text())
        raw["users"] = [UserConfig(**u) for u in raw["users"]]
        return cls(**raw)


class User:
    def __init__(self, config: UserConfig, agent: AgentConfig) -> None:
        self.name = config.name
        self.log = RecordLog(Path(config.log))
        # The send index goes on from the log: a restarted process never reuses an id.
        self.index = sum(1 for r in read_log(Path(config.log)) if r.get("k") == "sent")
        self.client = RecordingClient(
            agent.urls, config.token, state_path=config.state, backoff_cap=1.0,
            log=self.log, incarnation=agent.incarnation,
        )  # fmt: skip
        self.rng = random.Random(f"{agent.seed}-{config.name}-{agent.incarnation}")
        self.read_fraction = agent.read_fraction
        self.groups = [g for g, members in agent.groups.items() if config.name in members]

    async def consume(self) -> None:
        async for event in self.client.events():
            if isinstance(event, Message) and self.rng.random() < self.read_fraction:
                await self.client.mark_read(event.conv, event.seq)

    async def send_one(self, peers: list[str], group_fraction: float) -> None:
        message_id = f"{self.name}-{self.index}"
        self.log.write({"k": "sent", "id": message_id, "i": self.index, "t": time.monotonic()})
        self.index += 1
        if self.groups and self.rng.random() < group_fraction:
            await self.client.send(f"group message {message_id}", group=self.rng.choice(self.groups),
                                   message_id=message_id, wait=False)  # fmt: skip
        else:
            peer = self.rng.choice([p for p in peers if p != self.name])
            await self.client.send(f"hello {peer}", to=peer, message_id=message_id, wait=False)


async def run_agent(config: AgentConfig) -> None:
    loop = asyncio.get_running_loop()
    sending = asyncio.Event()
    sending.set()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, sending.clear)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    users = [User(u, config) for u in config.users]
    for user in users:
        # Keep trying: the server may be down (killed by the nemesis) right now.
        await user.client.connect(timeout=None)
    consumers = [asyncio.create_task(u.consume()) for u in users]
    status_task = asyncio.create_task(_write_status(users, Path(config.status)))
    rng = random.Random(f"{config.seed}-send-{config.incarnation}")
    interval = 1.0 / config.rate if config.rate > 0 else None
    while not stop.is_set():
        if interval is None or not sending.is_set():
            await _wait_any(stop, 0.2)
            continue
        await rng.choice(users).send_one(config.peers, config.group_fraction)
        await _wait_any(stop, interval)
    status_task.cancel()
    for user in users:
        await user.client.flush(timeout=2.0)
    for task in consumers:
        task.cancel()
    for user in users:
        await user.client.close()
        user.log.close()


async def _wait_any(event: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)


async def _write_status(users: list[User], path: Path) -> None:
    """Pending outbox counts and connection state, for the checker's convergence test."""
    tmp = path.with_suffix(".tmp")
    while True:
        status = {
            u.name: {
                "pending": len(u.client.pending_outbox()),
                "connected": u.client.connected,
                "fatal": str(u.client._fatal) if u.client._fatal is not None else None,
            }
            for u in users
        }
        tmp.write_text(json.dumps(status))
        tmp.replace(path)
        await asyncio.sleep(0.25)


def main() -> int:
    config = AgentConfig.load(sys.argv[1])
    asyncio.run(run_agent(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
