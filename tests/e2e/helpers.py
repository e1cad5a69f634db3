"""Helpers for the end-to-end tests: bulk accounts, a raw WebSocket client, event collection.

Everything here talks to the server over real sockets (or, for accounts, writes
the database as ``roost user add`` does: the SQLite file from a separate
process, or PostgreSQL for a ``ClusterServer``). Every helper takes either a
``ServerProcess`` or a ``ClusterServer``.
"""

from __future__ import annotations

import array
import asyncio
import base64
import fcntl
import json
import subprocess
import sys
import termios
import textwrap
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from roost.client import Client, Event, Message
from roost.core.tokens import hash_token
from roost.service.chat import now_ms
from tests.e2e.cluster import ClusterServer, run_sync
from tests.e2e.server import ServerProcess

AnyServer = ServerProcess | ClusterServer

_ADD_USERS = textwrap.dedent(
    """
    import asyncio, json, sys
    from roost.core.tokens import hash_token
    from roost.service.chat import now_ms
    from roost.store.sqlite import SqliteStore, database_path

    async def main():
        data_dir, tokens = sys.argv[1], json.loads(sys.stdin.read())
        store = SqliteStore(database_path(data_dir))
        await store.open()
        try:
            await asyncio.gather(*(store.add_user(n, hash_token(t), now_ms()) for n, t in tokens.items()))
        finally:
            await store.close()

    asyncio.run(main())
    """
)


def token_for(name: str) -> str:
    return f"test-token-{name}-0123456789"


async def add_users_pg(dsn: str, tokens: dict[str, str]) -> None:
    """Create the accounts ``tokens`` (name -> token) in the PostgreSQL store at ``dsn``."""
    from roost.store.postgres import PostgresStore

    store = PostgresStore(dsn, migrate=False, pool_size=1)
    await store.open()
    try:
        await asyncio.gather(*(store.add_user(n, hash_token(t), now_ms()) for n, t in tokens.items()))
    finally:
        await store.close()


def add_users(srv: AnyServer, names: list[str]) -> dict[str, str]:
    """Create ``names`` in one store transaction; returns name -> token.

    Safe while the server runs (SQLite WAL, the server only reads accounts;
    PostgreSQL is shared by the gateways anyway)."""
    tokens = {name: token_for(name) for name in names}
    if isinstance(srv, ClusterServer):
        run_sync(lambda: add_users_pg(srv.dsn, tokens))
        return tokens
    srv.data_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-c", _ADD_USERS, str(srv.data_dir)],
        input=json.dumps(tokens),
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return tokens


def b64(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data).decode()


def unb64(data: str) -> bytes:
    return base64.b64decode(data)


def healthz(srv: AnyServer) -> dict[str, Any]:
    """/healthz of the server; for a cluster, of every gateway folded into one:
    ``status`` "ok" if all are, ``connections`` summed."""
    bodies = []
    for url in srv.urls:
        with urllib.request.urlopen(url + "/healthz", timeout=5) as resp:
            assert resp.status == 200
            bodies.append(json.loads(resp.read()))
    if len(bodies) == 1:
        return bodies[0]
    return {
        "status": "ok" if all(b["status"] == "ok" for b in bodies) else "degraded",
        "connections": sum(b["connections"] for b in bodies),
        "gateways": bodies,
    }


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def server_rss_kib(srv: AnyServer) -> int:
    """The resident memory of the server: summed over every gateway of a cluster."""
    pids = srv.pids
    assert pids, "the server is not running"
    return sum(rss_kib(pid) for pid in pids)


class Closed(Exception):
    def __init__(self, code: int | None) -> None:
        super().__init__(f"socket closed with code {code}")
        self.code = code


class RawWS:
    """A bare protocol client: JSON dicts in and out, nothing automatic."""

    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.http = http
        self.ws = ws

    @classmethod
    async def open(cls, srv: Any, token: str | None = None, **auth: Any) -> RawWS:
        """Connect; with ``token``, authenticate and check the welcome."""
        http = aiohttp.ClientSession()
        try:
            ws = await asyncio.wait_for(
                http.ws_connect(srv.url.replace("http://", "ws://") + "/v1/ws", max_msg_size=0), 10
            )
        except BaseException:
            await http.close()
            raise
        raw = cls(http, ws)
        if token is not None:
            await raw.send({"type": "auth", "token": token, **auth})
            welcome = await raw.recv()
            assert welcome["type"] == "welcome", welcome
        return raw

    async def send(self, frame: dict[str, Any] | str) -> None:
        data = frame if isinstance(frame, str) else json.dumps(frame)
        await asyncio.wait_for(self.ws.send_str(data), 30)

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        msg = await self.ws.receive(timeout=timeout)
        if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
            return json.loads(msg.data)
        raise Closed(self._code_of(msg))

    def _code_of(self, msg: aiohttp.WSMessage) -> int | None:
        # The code the server sent, even if our close reply then failed
        # (which makes aiohttp report 1006 as ``close_code``).
        if msg.type == aiohttp.WSMsgType.CLOSE:
            return int(msg.data)
        return self.ws.close_code

    async def recv_until(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The first frame matching ``pred`` and the frames skipped before it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        skipped: list[dict[str, Any]] = []
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no matching frame; skipped {skipped[-5:]}")
            frame = await self.recv(remaining)
            if pred(frame):
                return frame, skipped
            skipped.append(frame)

    async def recv_type(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        frame, _ = await self.recv_until(lambda fr: fr["type"] == kind, timeout)
        return frame

    async def drain(self, quiet: float = 0.5) -> list[dict[str, Any]]:
        """Every frame that arrives until the socket is quiet for ``quiet`` seconds."""
        frames = []
        while True:
            try:
                frames.append(await self.recv(quiet))
            except TimeoutError:
                return frames

    async def roundtrip(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Ping and wait for the pong: every earlier frame of ours was handled.

        Returns the frames that arrived before the pong."""
        marker = 987654321
        await self.send({"type": "ping", "t": marker})
        _, skipped = await self.recv_until(lambda fr: fr == {"type": "pong", "t": marker}, timeout)
        return skipped

    async def wait_closed(self, timeout: float = 10.0) -> int | None:
        """Read (and drop) frames until the server closes; returns the close code."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError("socket still open")
            msg = await self.ws.receive(timeout=remaining)
            if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                return self._code_of(msg)

    def kernel_unread(self) -> int:
        """Bytes waiting in this socket's kernel receive queue (FIONREAD)."""
        transport = self.ws._writer.transport  # aiohttp keeps no public handle on it
        sock = transport.get_extra_info("socket")
        buf = array.array("i", [0])
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
        return buf[0]

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.ws.close(), 5)
        except (TimeoutError, OSError, aiohttp.ClientError):
            pass
        finally:
            # After some server-side closes aiohttp leaves the upgrade response
            # open; release it now rather than in a later test's GC.
            response = getattr(self.ws, "_response", None)
            if response is not None:
                response.close()
            await self.http.close()


async def collect(
    client: Client,
    n: int,
    timeout: float,
    kind: type | tuple[type, ...] = Message,
    others: list[Event] | None = None,
) -> list[Any]:
    """Up to ``n`` events of ``kind`` within ``timeout``; other events go to ``others``."""
    got: list[Any] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(got) < n:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            event = await client.next_event(remaining)
        except TimeoutError:
            break
        if isinstance(event, kind):
            got.append(event)
        elif others is not None:
            others.append(event)
    return got


async def next_of(client: Client, kind: type | tuple[type, ...], timeout: float = 10.0) -> Any:
    got = await collect(client, 1, timeout, kind)
    assert got, f"no {kind} event within {timeout}s"
    return got[0]


async def wait_for_event(
    client: Client, pred: Callable[[Event], bool], timeout: float = 10.0
) -> tuple[Event, list[Event]]:
    """The first event matching ``pred``, and the events before it."""
    skipped: list[Event] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(f"no matching event within {timeout}s; saw {skipped[-5:]}")
        try:
            event = await client.next_event(remaining)
        except TimeoutError:
            continue
        if pred(event):
            return event, skipped
        skipped.append(event)


async def connect(srv: AnyServer, token: str, state: Path, **kwargs: Any) -> Client:
    client = Client(srv.url, token, state_path=state, **kwargs)
    await client.connect(timeout=10)
    return client


async def publish_keys(srv: AnyServer, users: dict[str, tuple[str, Path]], timeout: float = 20.0) -> None:
    """Run each user's client (name -> (token, state file)) once, until its
    end-to-end keys are on the server: a message to a user who never ran a
    client waits in the sender's outbox until they do."""

    async def one(token: str, state: Path) -> None:
        client = await connect(srv, token, state)
        try:
            await asyncio.wait_for(client.crypto.published.wait(), timeout)
        finally:
            await client.close()

    await asyncio.gather(*(one(token, state) for token, state in users.values()))


async def users_with_keys(srv: AnyServer, names: list[str], tmp_path: Path) -> dict[str, str]:
    """``add_users``, then each user's client publishes its keys once, on the
    state file ``tmp_path / "<initial>.state"`` (alice: a.state) the test
    goes on with: messages to them are encrypted and sent at once."""
    tokens = add_users(srv, names)
    await publish_keys(srv, {n: (tokens[n], tmp_path / f"{n[0]}.state") for n in names})
    return tokens


async def close_all(*clients: Client | RawWS | None) -> None:
    for c in clients:
        if c is not None:
            await asyncio.wait_for(c.close(), 10)


async def assert_taken_over(first: RawWS, second: RawWS, code: int, timeout: float = 5) -> None:
    """The same user's ``second`` socket took over: ``first`` is closed with
    ``code`` and ``second`` still answers. Both are closed afterwards."""
    try:
        assert await first.wait_closed(timeout) == code
        await second.send({"type": "ping", "t": 1})
        assert await second.recv(5) == {"type": "pong", "t": 1}
    finally:
        for ws in (first, second):
            await asyncio.wait_for(ws.close(), 10)
