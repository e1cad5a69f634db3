"""Slow and unfinished handshakes against a real ``roost serve``, over real sockets.

A socket that never finishes its HTTP request (or trickles it), or upgrades and
never authenticates, is closed at the handshake deadline; unauthenticated
connections are capped per gateway (503) and per source address (429); and
authenticated users chat on undisturbed meanwhile. The source addresses are
loopback aliases (127.0.0.2, 127.0.0.3 reach a server on 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import aiohttp
import pytest

from roost.gateway.admission import CLOSE_GRACE, EVICT_AGE
from tests.e2e.helpers import RawWS, add_users, b64
from tests.e2e.server import ServerProcess

pytestmark = pytest.mark.embedded_only  # the gateway's own behaviour: one server is enough

UNFINISHED = b"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # no blank line: headers never end
OTHER_HOST = "127.0.0.2"
THIRD_HOST = "127.0.0.3"


class SlowSocket:
    """A TCP connection that sent an unfinished request and then waits."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, opened: float) -> None:
        self.reader = reader
        self.writer = writer
        self.opened = opened

    @classmethod
    async def open(
        cls, srv: ServerProcess, source: str = "127.0.0.1", head: bytes = UNFINISHED
    ) -> SlowSocket:
        opened = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port, local_addr=(source, 0))
        writer.write(head)
        await writer.drain()
        return cls(reader, writer, opened)

    async def closed_by_server(self, timeout: float) -> tuple[float, bytes]:
        """(seconds from open until the server closed it, what it sent before)."""
        got = b""
        try:
            async with asyncio.timeout(timeout):
                while chunk := await self.reader.read(4096):
                    got += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            return float("inf"), got  # still open
        return time.monotonic() - self.opened, got

    def close(self) -> None:
        self.writer.transport.abort()


def open_fds(srv: ServerProcess) -> int:
    (pid,) = srv.pids
    return len(os.listdir(f"/proc/{pid}/fd"))


async def assert_held(slow: list[SlowSocket]) -> None:
    """None of ``slow`` was refused: a refusal is written the moment a socket
    is accepted, so by now it would be readable; none is (nor closed)."""

    async def nothing_comes(s: SlowSocket) -> bool:
        try:
            await asyncio.wait_for(s.reader.read(1), 0.3)
        except TimeoutError:
            return True
        return False

    held = await asyncio.gather(*(nothing_comes(s) for s in slow))
    assert all(held), f"{held.count(False)} of {len(slow)} were refused or closed"


async def open_slow(srv: ServerProcess, n: int, source: str = "127.0.0.1") -> list[SlowSocket]:
    return [await SlowSocket.open(srv, source) for _ in range(n)]


async def healthz_from(srv: ServerProcess, source: str) -> tuple[int, dict[str, Any] | None]:
    """GET /healthz from ``source``: (status, body if 200)."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0), force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.get(srv.url + "/healthz", timeout=aiohttp.ClientTimeout(total=5)) as resp,
    ):
        return resp.status, (await resp.json() if resp.status == 200 else None)


async def wait_unauthenticated(srv: ServerProcess, source: str, expected: int, timeout: float = 5.0) -> None:
    """Until /healthz (asked from ``source``) counts ``expected`` unauthenticated
    connections besides its own; the server releases closed ones on its next loop pass."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        status, body = await healthz_from(srv, source)
        last = (status, body)
        if status == 200 and body is not None and body["unauthenticated"] == expected + 1:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"still not {expected} unauthenticated: {last}")


async def ws_status_from(srv: ServerProcess, source: str) -> int:
    """The HTTP status a WebSocket upgrade from ``source`` gets (101 if it opens)."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        try:
            ws = await asyncio.wait_for(http.ws_connect(srv.url.replace("http://", "ws://") + "/v1/ws"), 5)
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status
        await ws.close()
        return 101


async def open_ws_from(srv: ServerProcess, source: str, token: str) -> RawWS:
    """An authenticated ``RawWS`` whose socket is bound to ``source``."""
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0)))
    try:
        ws = await asyncio.wait_for(http.ws_connect(srv.url.replace("http://", "ws://") + "/v1/ws"), 10)
    except BaseException:
        await http.close()
        raise
    raw = RawWS(http, ws)
    await raw.send({"type": "auth", "token": token})
    welcome = await raw.recv()
    assert welcome["type"] == "welcome", welcome
    return raw


async def chat(sender: RawWS, recipient: RawWS, to: str, text: str) -> None:
    """``sender`` sends ``text`` to ``to``; it is acked and arrives at ``recipient``."""
    await sender.send({"type": "send", "id": text, "to": to, "body": b64(text)})
    ack = await sender.recv_type("ack", 5)
    assert ack["id"] == text
    msg = await recipient.recv_type("msg", 5)
    assert (msg["id"], msg["body"]) == (text, b64(text))
    await recipient.send({"type": "dack", "conv": msg["conv"], "seq": msg["seq"]})


async def test_unfinished_requests_are_closed_at_the_deadline(make_server) -> None:
    timeout = 1.5
    srv = make_server(
        "--handshake-timeout",
        str(timeout),
        "--max-unauthenticated",
        "0",
        "--max-unauthenticated-per-address",
        "0",
    )
    tokens = add_users(srv, ["alice", "bob"])
    slow = await open_slow(srv, 200)
    # One that trickles its headers, a byte at a time: reading never stalls for long.
    trickler = await SlowSocket.open(srv, head=b"G")

    async def trickle() -> None:
        for byte in b"ET /v1/ws HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000:
            await asyncio.sleep(0.1)
            if trickler.writer.is_closing():
                return
            trickler.writer.write(bytes([byte]))

    trickling = asyncio.create_task(trickle())
    await wait_unauthenticated(srv, "127.0.0.1", 201)
    fds_held = open_fds(srv)
    # Authenticated users chat meanwhile, before and after the deadline.
    users_opened = time.monotonic()
    alice = await RawWS.open(srv, tokens["alice"])
    bob = await RawWS.open(srv, tokens["bob"])
    try:
        await chat(alice, bob, "bob", "during")
        closes = await asyncio.gather(*(s.closed_by_server(timeout + 5) for s in [*slow, trickler]))
        late = [round(t, 2) for t, _ in closes if t > timeout + 3]
        early = [round(t, 2) for t, _ in closes if t < timeout - 0.2]
        assert not late and not early, f"closed too late {late[:5]} / too early {early[:5]}"
        assert all(got == b"" for _, got in closes), "an unfinished request got an answer"
        # Their 201 file descriptors are back (alice's and bob's sockets and
        # the store's reader connections opened meanwhile are the slack).
        assert open_fds(srv) <= fds_held - 201 + 8
        # No event marks "a deadline passed and nothing happened": wait past
        # the users' own deadline and its backstop, then they still chat.
        await asyncio.sleep(max(0.0, users_opened + timeout + CLOSE_GRACE + 0.5 - time.monotonic()))
        await chat(bob, alice, "alice", "after")
        assert srv.log().count("Traceback") == 0
    finally:
        trickling.cancel()
        for s in [*slow, trickler]:
            s.close()
        await alice.close()
        await bob.close()
    await wait_unauthenticated(srv, "127.0.0.1", 0)


async def test_upgraded_socket_without_auth_is_closed_at_the_deadline(make_server) -> None:
    """The deadline runs from accept, so it also cuts a longer --auth-timeout short."""
    srv = make_server("--handshake-timeout", "1", "--auth-timeout", "30")
    raw = await RawWS.open(srv)
    try:
        start = time.monotonic()
        err = await raw.recv(10)
        assert (err["type"], err["code"]) == ("error", "auth_timeout")
        assert await raw.wait_closed(5) == 4002
        assert time.monotonic() - start < 3.0
    finally:
        await raw.close()


async def test_unauthenticated_connections_per_address_are_capped(make_server) -> None:
    srv = make_server(
        "--handshake-timeout", "60", "--max-unauthenticated", "1000", "--max-unauthenticated-per-address", "5"
    )
    tokens = add_users(srv, ["alice", "bob", "carol"])
    alice = await RawWS.open(srv, tokens["alice"])  # from 127.0.0.1, authenticated before the flood
    slow = await open_slow(srv, 5)
    bob: RawWS | None = None
    try:
        await assert_held(slow)  # alice, authenticated, does not count
        await wait_unauthenticated(srv, OTHER_HOST, 5)
        # The sixth from 127.0.0.1 is refused at once, before its request is read.
        sixth = await SlowSocket.open(srv)
        seconds, answer = await sixth.closed_by_server(5)
        assert answer.startswith(b"HTTP/1.1 429 "), answer
        assert seconds < 2.0
        assert await ws_status_from(srv, "127.0.0.1") == 429
        # Another address connects, and the authenticated user is undisturbed.
        bob = await open_ws_from(srv, OTHER_HOST, tokens["bob"])
        await chat(alice, bob, "bob", "to-bob")
        await chat(bob, alice, "alice", "to-alice")
        # The held ones were not closed by the cap.
        await assert_held(slow)
    finally:
        for s in slow:
            s.close()
        await alice.close()
        if bob is not None:
            await bob.close()
    # Freed as they close: 127.0.0.1 gets in again.
    await wait_unauthenticated(srv, OTHER_HOST, 0)
    carol = await RawWS.open(srv, tokens["carol"])
    await carol.close()


async def test_unauthenticated_connections_per_gateway_are_capped(make_server) -> None:
    """At the cap, fresh handshakes are refused (503), but a connection pending
    for EVICT_AGE makes room: new clients get in while slow sockets hold the cap."""
    srv = make_server(
        "--handshake-timeout", "60", "--max-unauthenticated", "5", "--max-unauthenticated-per-address", "0"
    )
    tokens = add_users(srv, ["alice", "bob", "carol", "dave"])
    alice = await RawWS.open(srv, tokens["alice"])
    bob = await RawWS.open(srv, tokens["bob"])
    slow = await open_slow(srv, 5)
    carol: RawWS | None = None
    try:
        # All five are younger than EVICT_AGE: nothing can make room.
        extra = await SlowSocket.open(srv, OTHER_HOST)
        seconds, answer = await extra.closed_by_server(5)
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert seconds < EVICT_AGE
        assert slow[0].opened + EVICT_AGE > time.monotonic(), "too slow to check the refusal"
        await assert_held(slow)  # alice and bob, authenticated, do not count
        # Authenticated sessions are not refused anything.
        await chat(alice, bob, "bob", "still-here")
        # Once the oldest slow socket is EVICT_AGE old, a new client gets in
        # in its place (there is no event for "old enough": wait that long).
        await asyncio.sleep(max(0.0, slow[0].opened + EVICT_AGE + 0.1 - time.monotonic()))
        carol = await open_ws_from(srv, THIRD_HOST, tokens["carol"])
        seconds, answer = await slow[0].closed_by_server(5)
        assert answer == b"" and seconds < 60
        await assert_held(slow[1:])
        await chat(carol, alice, "alice", "carol-got-in")
        await chat(bob, alice, "alice", "me-too")
    finally:
        for s in slow:
            s.close()
        await alice.close()
        await bob.close()
        if carol is not None:
            await carol.close()
    # Room again once they close.
    deadline = time.monotonic() + 5
    while (status := (await healthz_from(srv, THIRD_HOST))[0]) != 200 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert status == 200
    dave = await RawWS.open(srv, tokens["dave"])
    await dave.send({"type": "ping", "t": 1})
    assert await dave.recv(5) == {"type": "pong", "t": 1}
    await dave.close()
