"""A load-generator process holding thousands of light WebSocket clients.

The SDK's ``Client`` (aiohttp, a SQLite outbox, ordering) costs far more CPU
and memory per connection than a server-side connection does, so a benchmark
built on it would measure the load generator. A worker here speaks just
enough of the protocol for connection benchmarks, over a bare asyncio
protocol per socket:

* the HTTP upgrade, then ``auth``; it waits for ``welcome``;
* answers WebSocket pings, and pings the server every ``ping_interval``
  seconds as the SDK's aiohttp heartbeat does (staggered over connections);
* counts delivered messages (deduplicated by ``(conv, seq)``) and acks them
  with one cumulative ``dack`` per conversation and read;
* sender connections keep an outbox: every message is resent, with the same
  id, after a reconnect until its ``ack`` arrives (as the SDK does);
* after losing a connection it reconnects with the SDK's policy
  (``reconnect_delay``: exponential backoff with full jitter, or without
  jitter for contrast), cycling through its URL list as the SDK does.

Client frames carry the all-zero mask key: legal WebSocket framing and no
XOR work here (the mask protects proxies from browser scripts, not needed
between processes we own).

The parent drives a worker with JSON lines on stdin and reads one JSON line
per command on stdout (``WorkerProcess``). Commands: ``connect``, ``arm``,
``status``, ``report``, ``send``, ``close``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

from roost.client.client import FATAL_CLOSE_CODES, backoff_delay
from roost.protocol import frames as f
from roost.protocol.codec import decode_server, encode
from roost.protocol.errors import CloseCode

# The SDK's limits for one attempt: aiohttp's default 300 s for the connect and the upgrade
# (ClientSession's total timeout), then 15 s from the upgrade for the welcome.
UPGRADE_TIMEOUT = 300.0
WELCOME_TIMEOUT = 15.0
# Error codes in answer to auth after which the SDK stops for good; any other error is retried.
FATAL_AUTH_ERRORS = frozenset({"auth_auth_failed", "auth_unsupported_version", "auth_auth_required"})
MAX_HEADER_BYTES = 16 * 1024
READ_LIMIT = 256 * 1024 * 1024  # command and report lines can be large (15k tokens, per-conn arrays)

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_ZERO_MASK = b"\x00\x00\x00\x00"


def reconnect_delay(attempt: int, jitter: bool, base: float, cap: float, rng: random.Random) -> float:
    """The SDK's delay before reconnect attempt ``attempt`` (roost/client/client.py ``Client._run``)."""
    if jitter:
        return backoff_delay(attempt, base, cap, rng)
    return min(cap, base * 2.0 ** min(attempt, 30))


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked (zero key) client frame."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return header + _ZERO_MASK + payload


def parse_frames(buf: bytearray) -> tuple[list[tuple[int, bytes]], int]:
    """Complete frames at the start of ``buf`` as ``(opcode, payload)`` and the bytes they used."""
    frames: list[tuple[int, bytes]] = []
    pos = 0
    end = len(buf)
    while end - pos >= 2:
        b0, b1 = buf[pos], buf[pos + 1]
        length = b1 & 0x7F
        head = pos + 2
        if length == 126:
            if end - head < 2:
                break
            length = int.from_bytes(buf[head : head + 2], "big")
            head += 2
        elif length == 127:
            if end - head < 8:
                break
            length = int.from_bytes(buf[head : head + 8], "big")
            head += 8
        mask = b""
        if b1 & 0x80:
            if end - head < 4:
                break
            mask = bytes(buf[head : head + 4])
            head += 4
        if end - head < length:
            break
        payload = bytes(buf[head : head + length])
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        frames.append((b0 & 0x0F, payload))
        pos = head + length
    return frames, pos


class AttemptFailed(Exception):
    """A connection attempt that did not reach ``welcome``; ``kind`` names why."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


@dataclass(slots=True)
class Policy:
    jitter: bool = True
    base: float = 0.25
    cap: float = 8.0
    reconnect: bool = True


class Conn:
    """One simulated device: its account, URLs, what it received, its outbox."""

    __slots__ = (
        "armed_count",
        "attempt",
        "dups",
        "gaps",
        "have",
        "index",
        "last_new_at",
        "link",
        "lost_at",
        "outbox",
        "pool",
        "reconnected_at",
        "stopped",
        "token",
        "url_index",
        "urls",
        "user",
    )

    def __init__(self, pool: Pool, index: int, user: str, token: str, urls: list[str]) -> None:
        self.pool = pool
        self.index = index
        self.user = user
        self.token = token
        self.urls = urls
        self.url_index = 0
        self.attempt = 0
        self.link: Link | None = None
        self.stopped = False
        self.have: dict[str, int] = {}
        self.outbox: dict[str, tuple[str, bytes]] = {}  # id -> (recipient, send frame), in send order
        self.armed_count = 0  # new messages carrying the armed tag
        self.last_new_at = 0.0
        self.reconnected_at = 0.0  # first welcome after arm
        self.lost_at = 0.0  # first connection loss after arm
        self.dups = 0
        self.gaps = 0

    def next_url(self) -> str:
        url = self.urls[self.url_index % len(self.urls)]
        self.url_index += 1
        return url

    # -- frames from the server ---------------------------------------------

    def on_welcome(self, link: Link, frame: f.Welcome) -> None:
        self.link = link
        self.attempt = 0
        pool = self.pool
        pool.server_heartbeat = frame.heartbeat
        if pool.armed_at and not self.reconnected_at:
            self.reconnected_at = time.monotonic()
        # Everything unacked is resent, oldest first, before anything new (the SDK's outbox rule),
        # and what this device holds is acked again: a dack lost with the old socket frees the window.
        for _, frame_bytes in self.outbox.values():
            link.send_text(frame_bytes)
        for conv, seq in self.have.items():
            link.send_text(encode(f.DeliveryAck(conv=conv, seq=seq)))

    def on_message(self, frame: f.Deliver, due: set[str]) -> None:
        have = self.have.get(frame.conv, 0)
        if frame.seq <= have:
            self.dups += 1
            due.add(frame.conv)  # redelivered: our dack was lost, send it again
            return
        if have and frame.seq != have + 1:  # (a first message may follow ones from before this worker)
            self.gaps += 1
        self.have[frame.conv] = frame.seq
        due.add(frame.conv)
        pool = self.pool
        if pool.tag and frame.id.startswith(pool.tag):
            self.armed_count += 1
            self.last_new_at = time.monotonic()

    def on_ack(self, frame: f.SendAck) -> None:
        entry = self.outbox.pop(frame.id, None)
        if entry is not None:
            self.pool.acked[entry[0]] += 1
            if frame.duplicate:
                self.pool.ack_duplicates += 1

    def on_lost(self, reason: str) -> None:
        self.link = None
        pool = self.pool
        pool.disconnects[reason] += 1
        if pool.armed_at and not self.lost_at:
            self.lost_at = time.monotonic()
        if not self.stopped and pool.policy.reconnect:
            pool.spawn(pool.reconnect(self))

    def queue_send(self, message_id: str, to: str, body: bytes) -> None:
        frame = encode(f.Send(id=message_id, to=to, body=body))
        self.outbox[message_id] = (to, frame)
        if self.link is not None:
            self.link.send_text(frame)


class Link(asyncio.Protocol):
    """One TCP connection of a ``Conn``: the upgrade, auth, then frames."""

    __slots__ = ("buf", "closing", "conn", "deadline", "host", "transport", "upgraded", "welcome", "welcomed")

    def __init__(self, conn: Conn, welcome: asyncio.Future[None], host: bytes) -> None:
        self.conn = conn
        self.host = host
        self.deadline: asyncio.Timeout | None = None  # the attempt's; shortened once upgraded
        self.welcome = welcome
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = False
        self.welcomed = False
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = transport = cast(asyncio.Transport, transport)
        key = base64.b64encode(os.urandom(16))
        transport.write(
            b"GET /v1/ws HTTP/1.1\r\nHost: " + self.host + b"\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\n\r\n"
        )

    def send_text(self, payload: bytes) -> None:
        if self.transport is not None and not self.closing:
            self.transport.write(client_frame(OP_TEXT, payload))

    def ping(self) -> None:
        if self.transport is not None and not self.closing:
            self.transport.write(client_frame(OP_PING, b""))

    def fail(self, kind: str) -> None:
        if not self.welcome.done():
            self.welcome.set_exception(AttemptFailed(kind))
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.upgraded and not self._upgrade():
            return
        frames, used = parse_frames(self.buf)
        if used:
            del self.buf[:used]
        due: set[str] = set()
        for opcode, payload in frames:
            if opcode in (OP_TEXT, OP_BINARY):
                self._on_text(payload, due)
            elif opcode == OP_PING:
                self.transport.write(client_frame(OP_PONG, payload))  # type: ignore[union-attr]
            elif opcode == OP_CLOSE:
                self._on_close(payload)
                return
        # One cumulative dack per conversation per read, after everything in it is counted.
        for conv in due:
            self.send_text(encode(f.DeliveryAck(conv=conv, seq=self.conn.have[conv])))

    def _upgrade(self) -> bool:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEADER_BYTES:
                self.fail("bad_handshake")
            return False
        status = bytes(self.buf[: self.buf.find(b"\r\n")]).split()
        if len(status) < 2 or status[1] != b"101":
            self.fail(f"http_{status[1].decode(errors='replace') if len(status) > 1 else 'bad'}")
            return False
        del self.buf[: end + 4]
        self.upgraded = True
        if self.deadline is not None:
            self.deadline.reschedule(asyncio.get_running_loop().time() + WELCOME_TIMEOUT)
        self.send_text(encode(f.Auth(token=self.conn.token)))
        return True

    def _on_text(self, payload: bytes, due: set[str]) -> None:
        try:
            frame = decode_server(payload)
        except Exception:
            self.conn.pool.errors["bad_server_frame"] += 1
            return
        conn = self.conn
        if isinstance(frame, f.Deliver):
            conn.on_message(frame, due)
        elif isinstance(frame, f.SendAck):
            conn.on_ack(frame)
        elif isinstance(frame, f.Receipt):
            # Acked so the server stops replaying it on every reconnect.
            self.send_text(encode(f.ReceiptAck(conv=frame.conv, rv=frame.rv)))
        elif isinstance(frame, f.Welcome):
            self.welcomed = True
            conn.on_welcome(self, frame)
            if not self.welcome.done():
                self.welcome.set_result(None)
        elif isinstance(frame, f.Error):
            if self.welcomed:
                conn.pool.errors[f"error_{frame.code}"] += 1
            else:  # counted once, as the attempt's failure
                self.fail(f"auth_{frame.code}")

    def _on_close(self, payload: bytes) -> None:
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else CloseCode.NORMAL
        if self.welcomed and code in FATAL_CLOSE_CODES:  # the SDK gives up after these (4003: replaced)
            self.conn.stopped = True
        self.closing = True
        if self.transport is not None:
            self.transport.write(client_frame(OP_CLOSE, payload[:2]))
            self.transport.close()
        self.conn.pool.close_codes[str(code)] += 1
        if not self.welcomed:
            self.fail(f"close_{code}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.welcome.done():
            self.welcome.set_exception(AttemptFailed("closed_before_welcome"))
        if self.welcomed:
            self.conn.on_lost("closed" if self.closing else "lost")


class Pool:
    """All connections of this worker, their counters and the reconnect policy."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.conns: list[Conn] = []
        self.policy = Policy()
        self.rng = random.Random()
        self.expected: dict[int, int] = {}  # conn index -> tagged messages it must receive
        self.errors: Counter[str] = Counter()  # failed attempts and error frames, by kind
        self.disconnects: Counter[str] = Counter()  # established connections that ended, by how
        self.close_codes: Counter[str] = Counter()
        self.acked: Counter[str] = Counter()  # recipient -> messages acked (senders)
        self.ack_duplicates = 0
        self.armed_at = 0.0
        self.tag = ""
        self.server_heartbeat = 0
        self.ping_interval = 0.0
        self.tasks: set[asyncio.Task[Any]] = set()
        self.send_seq = 0

    def spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    @property
    def open_count(self) -> int:
        return sum(1 for c in self.conns if c.link is not None)

    async def attempt(self, conn: Conn) -> None:
        """One connection attempt to the conn's next URL; raises ``AttemptFailed``."""
        url = urlsplit(conn.next_url())
        if url.hostname is None or url.port is None:
            raise ValueError(f"{url.geturl()}: a bench URL needs a host and a port")
        welcome: asyncio.Future[None] = self.loop.create_future()
        # An attempt may fail after nobody waits for it any more: mark the outcome as seen.
        welcome.add_done_callback(lambda fut: fut.cancelled() or fut.exception())
        link = Link(conn, welcome, f"{url.hostname}:{url.port}".encode())
        try:
            async with asyncio.timeout(UPGRADE_TIMEOUT) as deadline:
                link.deadline = deadline
                await self.loop.create_connection(lambda: link, url.hostname, url.port)
                await welcome
        except TimeoutError:
            kind = "timeout_welcome" if link.upgraded else "timeout_upgrade"
            link.fail(kind)
            raise AttemptFailed(kind) from None
        except ConnectionRefusedError:
            raise AttemptFailed("refused") from None
        except OSError as exc:
            raise AttemptFailed(f"oserror_{exc.errno}") from None

    async def reconnect(self, conn: Conn) -> None:
        """The SDK's loop after a lost connection: delay, next URL, until welcome or stop."""
        policy = self.policy
        while not conn.stopped:
            delay = reconnect_delay(conn.attempt, policy.jitter, policy.base, policy.cap, self.rng)
            await asyncio.sleep(delay)
            conn.attempt += 1
            if conn.stopped:
                return
            try:
                await self.attempt(conn)
                return
            except AttemptFailed as exc:
                self.errors[exc.kind] += 1
                if exc.kind in FATAL_AUTH_ERRORS:
                    conn.stopped = True

    async def connect_first(self, conn: Conn, gate: asyncio.Semaphore, max_attempts: int) -> bool:
        """Initial connection, at most ``gate`` handshakes in flight; retried with the policy."""
        for _ in range(max_attempts):
            conn.url_index = 0  # set-up connects to the first URL only (the storm's victim holds them all)
            async with gate:
                try:
                    await self.attempt(conn)
                    return True
                except AttemptFailed as exc:
                    self.errors[exc.kind] += 1
            await asyncio.sleep(reconnect_delay(conn.attempt, True, self.policy.base, 2.0, self.rng))
            conn.attempt += 1
        return False

    async def ping_loop(self) -> None:
        """Each connection pings every ``ping_interval`` s; the pings are spread over the interval."""
        tick = 0
        while True:
            await asyncio.sleep(1.0)
            if self.ping_interval <= 0:
                continue
            slots = max(1, round(self.ping_interval))
            for conn in self.conns[tick % slots :: slots]:
                if conn.link is not None:
                    conn.link.ping()
            tick += 1

    # -- commands -------------------------------------------------------------

    async def cmd_connect(self, msg: dict[str, Any]) -> dict[str, Any]:
        url_lists: list[list[str]] = msg["url_lists"]
        policy = msg.get("policy", {})
        self.policy = Policy(**policy)
        self.ping_interval = float(msg.get("ping_interval", 0.0))
        start = len(self.conns)
        new = [
            Conn(self, start + i, user, token, url_lists[which])
            for i, (user, token, which) in enumerate(msg["conns"])
        ]
        self.conns.extend(new)
        gate = asyncio.Semaphore(int(msg.get("concurrency", 200)))
        began = time.monotonic()
        results = await asyncio.gather(
            *(self.connect_first(c, gate, int(msg.get("max_attempts", 8))) for c in new)
        )
        return {
            "connected": sum(results),
            "failed": len(results) - sum(results),
            "seconds": round(time.monotonic() - began, 3),
            **self.counters(),
        }

    def cmd_arm(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Start a measured phase: count messages tagged ``tag``, note reconnects from now."""
        self.tag = msg["tag"]
        self.armed_at = time.monotonic()
        self.errors.clear()
        self.disconnects.clear()
        self.close_codes.clear()
        self.expected = {int(k): v for k, v in msg.get("expect", {}).items()}
        for conn in self.conns:
            conn.armed_count = 0
            conn.last_new_at = conn.reconnected_at = conn.lost_at = 0.0
            conn.dups = conn.gaps = 0
        return {"armed_at": self.armed_at}

    def cmd_status(self) -> dict[str, Any]:
        missing = sum(max(0, n - self.conns[i].armed_count) for i, n in self.expected.items())
        return {
            "open": self.open_count,
            "reconnected": sum(1 for c in self.conns if c.reconnected_at),
            "lost": sum(1 for c in self.conns if c.lost_at),
            "missing": missing,
            "received": sum(c.armed_count for c in self.conns),
            "unacked": sum(len(c.outbox) for c in self.conns),
            **self.counters(),
        }

    def cmd_report(self) -> dict[str, Any]:
        return {
            **self.cmd_status(),
            "reconnected_at": [c.reconnected_at for c in self.conns],
            "lost_at": [c.lost_at for c in self.conns],
            "received": [c.armed_count for c in self.conns],
            "last_new_at": [c.last_new_at for c in self.conns],
            "dups": sum(c.dups for c in self.conns),
            "gaps": sum(c.gaps for c in self.conns),
            "acked": dict(self.acked),
        }

    async def cmd_send(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Queue ``[[conn_index, recipient, count], ...]``; answer once all are acked (or timeout)."""
        tag = msg["tag"]
        body = b"x" * int(msg.get("body_bytes", 32))
        began = time.monotonic()
        self.acked.clear()
        self.ack_duplicates = 0
        planned = 0
        for index, to, count in msg["plan"]:
            conn = self.conns[index]
            for _ in range(count):
                self.send_seq += 1
                conn.queue_send(f"{tag}{self.send_seq}", to, body)
                planned += 1
        deadline = began + float(msg.get("timeout", 60.0))
        while any(c.outbox for c in self.conns) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return {
            "planned": planned,
            "acked_total": sum(self.acked.values()),
            "unacked": sum(len(c.outbox) for c in self.conns),
            "ack_duplicates": self.ack_duplicates,
            "seconds": round(time.monotonic() - began, 3),
            "acked": dict(self.acked),
        }

    async def cmd_close(self) -> dict[str, Any]:
        for conn in self.conns:
            conn.stopped = True
            link = conn.link
            if link is not None and link.transport is not None:
                link.closing = True
                link.transport.write(client_frame(OP_CLOSE, CloseCode.NORMAL.to_bytes(2, "big")))
                link.transport.close()
        await asyncio.sleep(0.2)
        return {"closed": len(self.conns)}

    def counters(self) -> dict[str, Any]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "errors": dict(self.errors),
            "disconnects": dict(self.disconnects),
            "close_codes": dict(self.close_codes),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "rss_kib": usage.ru_maxrss,
            "server_heartbeat": self.server_heartbeat,
        }


async def serve() -> None:
    """Read commands from stdin, answer each with one JSON line on stdout."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    pool = Pool()
    pool.spawn(pool.ping_loop())
    out = sys.stdout.buffer
    while line := await reader.readline():
        msg = json.loads(line)
        cmd = msg["cmd"]
        if cmd == "connect":
            reply = await pool.cmd_connect(msg)
        elif cmd == "arm":
            reply = pool.cmd_arm(msg)
        elif cmd == "status":
            reply = pool.cmd_status()
        elif cmd == "report":
            reply = pool.cmd_report()
        elif cmd == "send":
            reply = await pool.cmd_send(msg)
        elif cmd == "close":
            reply = await pool.cmd_close()
        else:
            reply = {"error": f"unknown command {cmd!r}"}
        out.write(json.dumps(reply).encode() + b"\n")
        out.flush()
        if cmd == "close":
            return


def main() -> None:
    try:
        import uvloop

        uvloop.run(serve())
    except ImportError:
        asyncio.run(serve())


# -- the parent side ---------------------------------------------------------


class WorkerProcess:
    """A ``conn_worker`` child process and its command channel."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self._lock = asyncio.Lock()

    @classmethod
    async def start(cls) -> WorkerProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "roost.bench.conn_worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=READ_LIMIT,
        )
        return cls(proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def request(self, cmd: str, **fields: Any) -> dict[str, Any]:
        """Send one command and wait for its answer (commands to one worker run one at a time)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        async with self._lock:
            self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}).encode() + b"\n")
            await self.proc.stdin.drain()
            line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"connection worker {self.pid} exited ({self.proc.returncode})")
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.request("close"), 10)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.wait()


async def start_workers(count: int) -> list[WorkerProcess]:
    return list(await asyncio.gather(*(WorkerProcess.start() for _ in range(count))))


async def stop_workers(workers: Sequence[WorkerProcess]) -> None:
    await asyncio.gather(*(w.stop() for w in workers))


def split_evenly(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """``items`` cut into ``parts`` contiguous slices whose lengths differ by at most one."""
    size, extra = divmod(len(items), parts)
    slices, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        slices.append(list(items[start:end]))
        start = end
    return slices


if __name__ == "__main__":
    main()
