"""A load-generator process holding real SDK clients (``roost.client.Client``).

The raw-protocol workers (``roost.bench.worker``) cannot say what end-to-end
encryption costs: they send plaintext frames. Here every device is a full
SDK ``Client`` with its own state file (its keys, sessions, sender keys and
outbox in SQLite), so a message costs what it costs on a phone: seal, the
state's transactions, framing, open.

Run as ``python -m roost.bench.sdk_worker``; the parent drives it with one
JSON command per line (``roost.bench.pool.WorkerPool(..., module=...)``), as
the raw workers. A message's text is ``TAG|SENT`` with ``SENT`` the sender's
``time.monotonic()`` (one clock for every process on Linux), so each reader
computes its own send → decrypted time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import Counter
from pathlib import Path
from typing import Any

from roost.bench.worker import main
from roost.client import Client, DecryptionFailed, Event, Membership, Message

POLL = 0.002  # s between looks at the sender's outbox (the send is not an event)


class _Device(Client):
    """An SDK client whose events the worker sees the moment the SDK emits
    them: a reader task per client would stamp a decrypt when the loop gets
    round to that task, after every other client's work of the same burst."""

    def __init__(self, worker: SdkWorker, name: str, url: str, token: str, state: Path) -> None:
        super().__init__(url, token, state_path=state, serve_local=False, keep_events=False)
        self.worker = worker
        self.name = name

    def _emit(self, event: Event) -> None:
        self.worker.on_event(self.name, event)
        super()._emit(event)


class SdkWorker:
    def __init__(self) -> None:
        self.clients: dict[str, Client] = {}
        # tag -> reader -> send → decrypted (ms), the first decrypt of that tag only
        self.read: dict[str, dict[str, float]] = {}
        self.memberships: list[tuple[str, str, str, tuple[str, ...]]] = []  # (reader, conv, action, users)
        self.failures: Counter[str] = Counter()  # DecryptionFailed per reason
        self.changed = asyncio.Event()
        self.cpu_mark = time.process_time()

    # -- devices -------------------------------------------------------------

    async def cmd_start(
        self, users: list[list[str]], root: str, prekey_batch: int, timeout: float, concurrency: int = 16
    ) -> dict[str, Any]:
        """Connect ``[[name, token, url], ...]``, each with its state file in
        ``root``, and wait until each one's keys are on the server."""
        gate = asyncio.Semaphore(concurrency)
        t0, cpu0 = time.monotonic(), time.process_time()

        async def one(name: str, token: str, url: str) -> None:
            async with gate:
                client = _Device(self, name, url, token, Path(root) / f"{name}.state")
                # Fewer one-time keys than a phone keeps: see roost.bench.e2ee.
                client.crypto.prekey_batch = prekey_batch
                self.clients[name] = client
                await client.connect(timeout=timeout)
                await asyncio.wait_for(client.crypto.published.wait(), timeout)

        # A task group: one failure cancels the rest, so that no client is
        # still being made when ``close_all`` closes them.
        async with asyncio.TaskGroup() as group:
            for user in users:
                group.create_task(one(*user))
        return {
            "started": len(users),
            "seconds": round(time.monotonic() - t0, 3),
            "cpu_s": round(time.process_time() - cpu0, 3),
        }

    def on_event(self, name: str, event: Event) -> None:
        """What ``name``'s SDK hands its application, as it does (see ``_Device``)."""
        if isinstance(event, Message) and event.encrypted:
            tag, sep, sent = event.text.partition("|")
            if sep:
                self.read.setdefault(tag, {}).setdefault(name, (time.monotonic() - float(sent)) * 1000)
        elif isinstance(event, Membership):
            self.memberships.append((name, event.conv, event.action, event.users))
        elif isinstance(event, DecryptionFailed):
            self.failures[event.reason] += 1
        else:
            return
        self.changed.set()

    async def _until(self, done: Any, timeout: float, what: str) -> None:
        """Wait until ``done()`` (checked after each recorded event), at most ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not done():
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{what}: not within {timeout} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)

    # -- groups --------------------------------------------------------------

    async def cmd_create_group(self, admin: str, name: str, members: list[str]) -> dict[str, Any]:
        info = await self.clients[admin].create_group(name, members)
        return {"group": info.group, "members": len(info.members)}

    async def cmd_leave(self, name: str, group: str) -> dict[str, Any]:
        info = await self.clients[name].leave_group(group)
        return {"members": len(info.members)}

    async def cmd_wait_membership(
        self, name: str, group: str, action: str, user: str, timeout: float
    ) -> dict[str, Any]:
        """Until ``name``'s client has shown ``user``'s ``action`` in ``group``
        (its SDK has then applied it: a leave drops its sender key)."""
        wanted = (name, group, action)
        await self._until(
            lambda: any(m[:3] == wanted and user in m[3] for m in self.memberships), timeout, f"{action} seen"
        )
        return {"ok": True}

    # -- the measured steps --------------------------------------------------

    async def cmd_send(self, sender: str, group: str, tag: str, timeout: float) -> dict[str, Any]:
        """One group message from ``sender``, timed until it is sealed (the
        sender key handed out first) and until the server acked everything
        it took (the pairwise sender-key messages and the group message)."""
        client = self.clients[sender]
        cpu0, t0 = time.process_time(), time.monotonic()
        message_id = await client.send(f"{tag}|{t0:.6f}", group=group, wait=False)
        deadline = t0 + timeout
        sealed = acked = 0.0
        while not acked:
            pending = client.pending_outbox()
            if not sealed and all(i.id != message_id or i.ready for i in pending):
                sealed = time.monotonic() - t0
            if not pending:
                acked = time.monotonic() - t0
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"send by {sender}: {len(pending)} messages not acked within {timeout} s")
            await asyncio.sleep(POLL)
        cpu = time.process_time() - cpu0
        own = client.state.own_sender_key(group)
        assert own is not None, "the group message went out without a sender key"
        return {
            "sent_at": t0,
            "sealed_ms": sealed * 1000,
            "acked_ms": acked * 1000,
            "cpu_ms": cpu * 1000,
            "handed_to": len(own[2]),  # members this sender key was sealed for
            "sender_key": hashlib.sha256(own[1]).hexdigest()[:16],
        }

    async def cmd_wait_read(self, tag: str, names: list[str], timeout: float) -> dict[str, Any]:
        """Until every one of ``names`` has decrypted the message ``tag``: each one's time."""
        read = self.read.setdefault(tag, {})
        await self._until(lambda: all(n in read for n in names), timeout, f"{tag} read by {len(names)}")
        return {
            "read_ms": {n: read[n] for n in names},
            "others": sorted(set(read) - set(names)),  # readers that were not expected to read it
            "cpu_s": time.process_time() - self.cpu_mark,
            "decryption_failures": dict(self.failures),
        }

    async def cmd_has_read(self, tag: str, name: str) -> dict[str, Any]:
        return {"read": name in self.read.get(tag, {})}

    async def cmd_cpu_mark(self) -> dict[str, Any]:
        self.cpu_mark = time.process_time()
        return {"ok": True}

    async def cmd_close_all(self) -> dict[str, Any]:
        gate = asyncio.Semaphore(64)

        async def close(client: Client) -> None:
            async with gate:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.close(), 10)

        await asyncio.gather(*(close(c) for c in self.clients.values()))
        closed = len(self.clients)
        self.clients.clear()
        return {"closed": closed}


if __name__ == "__main__":
    main(SdkWorker)
