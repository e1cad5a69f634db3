"""A load-generator process: many raw WebSocket devices on one asyncio loop.

Run as ``python -m roost.bench.worker``; the parent (``roost.bench.pool``)
writes one JSON command per line on stdin and reads one JSON reply per line
on stdout. Each device does per message what the SDK does: it sends ``send``
and waits for nothing (the ``ack`` is matched when it comes), answers every
``msg`` with a cumulative ``dack`` (coalesced per loop turn, as the SDK does),
and every ``receipt`` with a ``rack``.

Latency: a message body starts with the sender's ``time.monotonic()`` (Linux
CLOCK_MONOTONIC is one clock for every process on the machine), so the
recipient computes send → shown without asking anyone. Every reply carries
the worker's own CPU use over the command, so the parent can tell when the
load generator, not the server, was the bottleneck.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec

from roost.protocol import frames as f
from roost.protocol.codec import decode_server, encode

_json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.Decoder().decode


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://").replace("https://", "wss://").rstrip("/") + "/v1/ws"


def make_body(size: int) -> bytes:
    """A body starting with the send time; padded to ``size`` bytes."""
    stamp = b"%.6f|" % time.monotonic()
    return stamp + b"x" * max(0, size - len(stamp))


def sent_at(body: bytes) -> float | None:
    head, sep, _ = body.partition(b"|")
    if not sep:
        return None
    try:
        return float(head)
    except ValueError:
        return None


def micros(seconds: float) -> int:
    return int(seconds * 1_000_000)


class Mode:
    """What a scenario records; the default records nothing."""

    def on_ack(self, conn: Conn, frame: f.SendAck, now: float) -> None:
        pass

    def on_msg(self, conn: Conn, frame: f.Deliver, now: float) -> None:
        pass

    def on_receipt(self, conn: Conn, frame: f.Receipt, now: float) -> None:
        pass


class Conn:
    """One simulated device: one WebSocket, an outgoing queue, a reader task."""

    __slots__ = (
        "_dack_due",
        "_out",
        "_out_ready",
        "_tasks",
        "closing",
        "name",
        "token",
        "url",
        "worker",
        "ws",
    )

    def __init__(self, worker: Worker, name: str, token: str, url: str) -> None:
        self.worker = worker
        self.name = name
        self.token = token
        self.url = url
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._out: deque[bytes] = deque()
        self._out_ready = asyncio.Event()
        self._dack_due: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.closing = False

    async def open(self, http: aiohttp.ClientSession, timeout: float = 30.0) -> None:
        ws = await http.ws_connect(ws_url(self.url), max_msg_size=4 * 1024 * 1024, autoclose=True)
        await ws.send_frame(encode(f.Auth(token=self.token)), aiohttp.WSMsgType.TEXT)
        first = await ws.receive(timeout=timeout)
        if first.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            await ws.close()
            raise ConnectionError(f"{self.name}: closed during authentication ({first.type})")
        welcome = decode_server(first.data)
        if not isinstance(welcome, f.Welcome):
            await ws.close()
            raise ConnectionError(f"{self.name}: not welcomed: {welcome}")
        self.ws = ws
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read(ws)), loop.create_task(self._write(ws))]

    def write(self, frame: bytes) -> None:
        self._out.append(frame)
        self._out_ready.set()

    async def _write(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while True:
                await self._out_ready.wait()
                self._out_ready.clear()
                while self._out:
                    await ws.send_frame(self._out.popleft(), aiohttp.WSMsgType.TEXT)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        worker = self.worker
        try:
            async for message in ws:
                if message.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    continue
                now = time.monotonic()
                frame = decode_server(message.data)
                if isinstance(frame, f.Deliver):
                    self._due_dack(frame.conv, frame.seq)
                    worker.mode.on_msg(self, frame, now)
                elif isinstance(frame, f.SendAck):
                    worker.mode.on_ack(self, frame, now)
                elif isinstance(frame, f.Receipt):
                    self.write(encode(f.ReceiptAck(conv=frame.conv, rv=frame.rv)))
                    worker.mode.on_receipt(self, frame, now)
                elif isinstance(frame, f.GroupState):
                    worker.resolve(frame.ref, frame)
                elif isinstance(frame, f.Error):
                    worker.errors[frame.code] += 1
                    worker.resolve(frame.ref, frame)
        finally:
            if not self.closing:
                worker.errors[f"closed:{ws.close_code}"] += 1
            self._tasks[1].cancel()

    def _due_dack(self, conv: str, seq: int) -> None:
        """Cumulative dack, one per conversation per loop turn (what the SDK does)."""
        if not self._dack_due:
            asyncio.get_running_loop().call_soon(self._flush_dacks)
        if seq > self._dack_due.get(conv, 0):
            self._dack_due[conv] = seq

    def _flush_dacks(self) -> None:
        for conv, seq in self._dack_due.items():
            self.write(encode(f.DeliveryAck(conv=conv, seq=seq)))
        self._dack_due.clear()

    async def close(self) -> None:
        self.closing = True
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), 5.0)
        for task in self._tasks:
            task.cancel()


# --------------------------------------------------------------------------
# modes: what each scenario records
# --------------------------------------------------------------------------


@dataclass
class Traffic(Mode):
    """Paced 1:1 traffic: latencies of msg (send → shown), ack (✓) and receipt (✓✓)."""

    prefix: str  # message ids of this step start with it
    msg_us: list[int] = field(default_factory=list)
    ack_us: list[int] = field(default_factory=list)
    receipt_us: list[int] = field(default_factory=list)
    sent_times: dict[str, float] = field(default_factory=dict)
    # (sender, conv) -> [(seq, send time)] awaiting ✓✓, ascending seq
    awaiting: dict[tuple[str, str], deque[tuple[int, float]]] = field(default_factory=dict)
    received: set[str] = field(default_factory=set)
    lag_us: list[int] = field(default_factory=list)  # per send burst: behind schedule by
    duplicates: int = 0
    acked: int = 0
    last_msg: float = 0.0

    def on_ack(self, conn: Conn, frame: f.SendAck, now: float) -> None:
        sent = self.sent_times.pop(frame.id, None)
        if sent is None:
            return
        self.acked += 1
        self.ack_us.append(micros(now - sent))
        self.awaiting.setdefault((conn.name, frame.conv), deque()).append((frame.seq, sent))

    def on_msg(self, conn: Conn, frame: f.Deliver, now: float) -> None:
        if not frame.id.startswith(self.prefix):
            return  # a straggler of an earlier step
        key = frame.sender + "/" + frame.id
        if key in self.received:
            self.duplicates += 1
            return
        sent = sent_at(frame.body)
        if sent is None:
            return
        self.received.add(key)
        self.msg_us.append(micros(now - sent))
        self.last_msg = now

    def on_receipt(self, conn: Conn, frame: f.Receipt, now: float) -> None:
        queue = self.awaiting.get((conn.name, frame.conv))
        while queue and queue[0][0] <= frame.all_delivered:
            _, sent = queue.popleft()
            self.receipt_us.append(micros(now - sent))

    def receipts_outstanding(self) -> int:
        return sum(len(q) for q in self.awaiting.values())


@dataclass
class Collect(Mode):
    """Counts bench messages per device and their latency (offline drain, group fan-out).

    ``per_id`` maps a message's ``sender/id`` to ``[times received, max
    latency µs]``, so the parent can compute time-to-all over workers.
    """

    per_device: Counter[str] = field(default_factory=Counter)
    per_id: dict[str, list[int]] = field(default_factory=dict)
    seen: set[tuple[str, str]] = field(default_factory=set)
    duplicates: int = 0
    first_msg: float = 0.0
    last_msg: float = 0.0
    acked: int = 0
    ack_waiters: dict[str, asyncio.Future[None]] = field(default_factory=dict)

    def on_ack(self, conn: Conn, frame: f.SendAck, now: float) -> None:
        self.acked += 1
        waiter = self.ack_waiters.pop(frame.id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_msg(self, conn: Conn, frame: f.Deliver, now: float) -> None:
        if frame.sender == f.SYSTEM_SENDER:
            return
        sent = sent_at(frame.body)
        if sent is None:
            return
        key = frame.sender + "/" + frame.id
        if (conn.name, key) in self.seen:
            self.duplicates += 1
            return
        self.seen.add((conn.name, key))
        self.per_device[conn.name] += 1
        latency = micros(now - sent)
        entry = self.per_id.get(key)
        if entry is None:
            self.per_id[key] = [1, latency]
        else:
            entry[0] += 1
            entry[1] = max(entry[1], latency)
        if not self.first_msg:
            self.first_msg = now
        self.last_msg = now


# --------------------------------------------------------------------------
# the worker and its commands
# --------------------------------------------------------------------------


class Worker:
    def __init__(self) -> None:
        self.conns: dict[str, Conn] = {}
        self.mode: Mode = Mode()
        self.errors: Counter[str] = Counter()
        self.waiters: dict[str, asyncio.Future[Any]] = {}
        self.http: aiohttp.ClientSession | None = None
        # (CPU seconds, wall time) at the start of the current collect window
        self.cpu_mark = (time.process_time(), time.monotonic())

    def cpu_window(self, restart: bool = False) -> float:
        """CPU% since the last mark (100 = one core); ``restart`` starts a new window."""
        cpu, wall = time.process_time(), time.monotonic()
        pct = 100.0 * (cpu - self.cpu_mark[0]) / max(wall - self.cpu_mark[1], 1e-9)
        if restart:
            self.cpu_mark = (cpu, wall)
        return pct

    def resolve(self, ref: str, frame: Any) -> None:
        waiter = self.waiters.pop(ref, None) if ref else None
        if waiter is not None and not waiter.done():
            waiter.set_result(frame)

    async def cmd_connect(self, users: list[list[str]], concurrency: int = 200) -> dict[str, Any]:
        """Open and authenticate ``[[name, token, url], ...]``, ``concurrency`` at a time."""
        if self.http is None:
            self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=False))
        http = self.http
        gate = asyncio.Semaphore(concurrency)
        failures: Counter[str] = Counter()
        started = time.monotonic()
        finished: list[float] = []

        async def one(name: str, token: str, url: str) -> None:
            async with gate:
                conn = Conn(self, name, token, url)
                try:
                    await conn.open(http)
                except (OSError, aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
                    failures[type(exc).__name__] += 1
                    return
                self.conns[name] = conn
                finished.append(time.monotonic())

        await asyncio.gather(*(one(*u) for u in users))
        return {
            "connected": len(finished),
            "failed": sum(failures.values()),
            "failures": dict(failures),
            "started": started,
            "all_connected": max(finished, default=started),
        }

    async def cmd_disconnect(self, names: list[str]) -> dict[str, Any]:
        conns = [self.conns.pop(n) for n in names if n in self.conns]
        await asyncio.gather(*(c.close() for c in conns))
        return {"closed": len(conns)}

    async def cmd_traffic(
        self,
        pairs: list[list[str]],
        rate: float,
        duration: float,
        start_at: float,
        drain_timeout: float,
        body_size: int,
        step: int,
    ) -> dict[str, Any]:
        """Both sides of every pair send to each other, ``rate`` msg/s in total, for ``duration`` s."""
        mode = Traffic(prefix=f"{step}-")
        self.mode = mode
        errors_before = sum(self.errors.values())
        senders = [(self.conns[a], b) for a, b in pairs] + [(self.conns[b], a) for a, b in pairs]
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        cpu0 = time.process_time()
        sent = await self._pace(mode, senders, rate, duration, start_at, body_size, step)
        stop_sending = time.monotonic()
        # CPU while sending: the loaded part of the step, where saturation matters
        cpu_sending = time.process_time() - cpu0
        deadline = stop_sending + drain_timeout
        while time.monotonic() < deadline and (
            len(mode.received) < sent or mode.receipts_outstanding() or mode.acked < sent
        ):
            await asyncio.sleep(0.02)
        wall = time.monotonic() - start_at
        cpu = time.process_time() - cpu0
        self.mode = Mode()
        return {
            "sent": sent,
            "acked": mode.acked,
            "received": len(mode.received),
            "duplicates": mode.duplicates,
            "receipts": len(mode.receipt_us),
            "errors": sum(self.errors.values()) - errors_before,
            "error_codes": dict(self.errors),
            "stop_sending": stop_sending,
            "last_msg": mode.last_msg,
            "msg_us": mode.msg_us,
            "ack_us": mode.ack_us,
            "receipt_us": mode.receipt_us,
            "lag_us": mode.lag_us,
            "cpu_seconds": cpu,
            "cpu_pct": 100.0 * cpu_sending / max(stop_sending - start_at, 1e-9),
            "cpu_pct_with_drain": 100.0 * cpu / max(wall, 1e-9),
        }

    async def _pace(
        self,
        mode: Traffic,
        senders: list[tuple[Conn, str]],
        rate: float,
        duration: float,
        start_at: float,
        body_size: int,
        step: int,
    ) -> int:
        """Open loop: send whatever is due every ~2 ms, whatever came back or not.

        Latency is measured from the actual send; how late a message left
        against its schedule goes to ``mode.lag_us``, so a late load generator
        (which would hide server latency) shows in the report.
        """
        sent = 0
        total = int(rate * duration)
        n = len(senders)
        sent_times = mode.sent_times
        while sent < total:
            now = time.monotonic()
            due = min(total, int(rate * (now - start_at))) - sent
            if due > 0:
                mode.lag_us.append(micros(now - (start_at + sent / rate)))
            for _ in range(due):
                conn, peer = senders[sent % n]
                message_id = f"{step}-{sent}"
                body = make_body(body_size)
                sent_times[message_id] = sent_at(body) or 0.0
                conn.write(encode(f.Send(id=message_id, body=body, to=peer)))
                sent += 1
            await asyncio.sleep(0.002)
        return sent

    async def cmd_collect_start(self) -> dict[str, Any]:
        """From now on count bench messages per device (and acks of own sends)."""
        self.mode = Collect()
        self.cpu_window(restart=True)
        return {"ok": True}

    async def cmd_send_bulk(self, sends: list[list[Any]], prefix: str, body_size: int) -> dict[str, Any]:
        """``[[sender, to, count], ...]``: pipeline everything, return when all are acked."""
        mode = self.mode
        assert isinstance(mode, Collect), "collect_start first"
        loop = asyncio.get_running_loop()
        last: list[asyncio.Future[None]] = []
        errors_before = sum(self.errors.values())
        cpu0, t0 = time.process_time(), time.monotonic()
        total = 0
        for sender, to, count in sends:
            conn = self.conns[sender]
            for i in range(count):
                message_id = f"{prefix}-{sender}-{to}-{i}"
                conn.write(encode(f.Send(id=message_id, body=make_body(body_size), to=to)))
                total += 1
            # Acks of one sender come in order: waiting for its last one waits for all.
            waiter = loop.create_future()
            mode.ack_waiters[message_id] = waiter
            last.append(waiter)
        await asyncio.wait_for(asyncio.gather(*last), 120)
        wall = time.monotonic() - t0
        return {
            "sent": total,
            "acked": mode.acked,
            "seconds": wall,
            "errors": sum(self.errors.values()) - errors_before,
            "cpu_pct": 100.0 * (time.process_time() - cpu0) / max(wall, 1e-9),
        }

    async def cmd_drain(
        self, users: list[list[str]], start_at: float, expected: int, timeout: float
    ) -> dict[str, Any]:
        """Connect ``users`` at ``start_at``; wait until ``expected`` messages arrived in total."""
        self.mode = mode = Collect()
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        cpu0 = time.process_time()
        connected = await self.cmd_connect(users, concurrency=len(users))
        deadline = start_at + timeout
        while sum(mode.per_device.values()) < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        wall = time.monotonic() - start_at
        return {
            **connected,
            "received": sum(mode.per_device.values()),
            "per_device": dict(mode.per_device),
            "duplicates": mode.duplicates,
            "last_msg": mode.last_msg,
            "errors": sum(self.errors.values()),
            "error_codes": dict(self.errors),
            "cpu_pct": 100.0 * (time.process_time() - cpu0) / max(wall, 1e-9),
        }

    async def cmd_group_create(self, admin: str, name: str, members: list[str]) -> dict[str, Any]:
        ref = f"create-{name}"
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiters[ref] = waiter
        self.conns[admin].write(encode(f.GroupCreate(name=name, members=members, ref=ref)))
        frame = await asyncio.wait_for(waiter, 60)
        if isinstance(frame, f.Error):
            raise RuntimeError(f"group_create failed: {frame.code} {frame.message}")
        return {"group": frame.group, "members": len(frame.members)}

    async def cmd_group_post(
        self, sender: str, group: str, first: int, count: int, interval: float, prefix: str, body_size: int
    ) -> dict[str, Any]:
        """Posts ids ``prefix-first`` onwards, ``interval`` s apart; returns at the last ack."""
        mode = self.mode
        assert isinstance(mode, Collect), "collect_start first"
        conn = self.conns[sender]
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for i in range(first, first + count):
            message_id = f"{prefix}-{i}"
            if i == first + count - 1:
                mode.ack_waiters[message_id] = waiter
            conn.write(encode(f.Send(id=message_id, body=make_body(body_size), conv=group)))
            if i < first + count - 1:
                await asyncio.sleep(interval)
        await asyncio.wait_for(waiter, 60)
        return {"sent": count}

    async def cmd_collect_wait(self, expected_per_id: int, ids: list[str], timeout: float) -> dict[str, Any]:
        """Wait until each of ``ids`` reached ``expected_per_id`` devices here; report per id."""
        mode = self.mode
        assert isinstance(mode, Collect), "collect_start first"
        deadline = time.monotonic() + timeout

        def complete() -> bool:
            return all(mode.per_id.get(i, (0, 0))[0] >= expected_per_id for i in ids)

        while not complete() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return {
            "per_id": {i: mode.per_id.get(i, [0, 0]) for i in ids},
            "cpu_pct": self.cpu_window(),
            "per_device": dict(mode.per_device),
            "duplicates": mode.duplicates,
            "errors": sum(self.errors.values()),
            "error_codes": dict(self.errors),
        }

    async def cmd_cpu_mark(self) -> dict[str, Any]:
        """Start a new CPU window (reported by every ``collect_wait`` until the next mark)."""
        self.cpu_window(restart=True)
        return {"ok": True}

    async def cmd_close_all(self) -> dict[str, Any]:
        closed = await self.cmd_disconnect(list(self.conns))
        if self.http is not None:
            await self.http.close()
            self.http = None
        return closed


async def serve(reader: asyncio.StreamReader, write: Any, make: Callable[[], Any] = Worker) -> None:
    """Run commands from ``reader`` on a worker ``make()`` builds (its ``cmd_*``
    coroutines; ``quit`` calls its ``cmd_close_all``) until ``quit`` or EOF."""
    worker = make()
    while True:
        line = await reader.readline()
        if not line:
            break
        request = _json_decode(line)
        command = request.pop("cmd")
        if command == "quit":
            await worker.cmd_close_all()
            write({"ok": True})
            break
        try:
            reply = await getattr(worker, "cmd_" + command)(**request)
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        write(reply)


async def _main(make: Callable[[], Any]) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 30)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout.buffer

    def write(reply: dict[str, Any]) -> None:
        out.write(_json_encode(reply) + b"\n")
        out.flush()

    await serve(reader, write, make)


def main(make: Callable[[], Any] = Worker) -> None:
    try:
        import uvloop  # the load generator may use the fastest loop: it is not what is measured
    except ImportError:
        asyncio.run(_main(make))
    else:
        uvloop.run(_main(make))


if __name__ == "__main__":
    main()
