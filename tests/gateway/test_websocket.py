"""The gateway's WebSocket sessions on picows (roost/gateway/websocket.py),
driven by a raw TCP client on loopback that writes frames exactly as given:
several in one write, fragmented, binary, unanswered pings. A real gateway
(embedded store) on a free port."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from roost.core.tokens import hash_token
from roost.gateway.server import Gateway, GatewayConfig
from roost.gateway.websocket import WS_HARD_LIMIT
from roost.service.chat import ServiceConfig
from tests.e2e.server import free_port

TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One masked client frame (RFC 6455 5.2); the zero mask leaves the payload as is."""
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        head = bytes((first, 0x80 | size))
    elif size < 65536:
        head = bytes((first, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((first, 0x80 | 127)) + size.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


def ping(t: int) -> bytes:
    """A ping frame; its pong carries ``t`` (t=0 would be left out of it)."""
    return client_frame(TEXT, json.dumps({"type": "ping", "t": t}).encode())


AUTH = client_frame(TEXT, json.dumps({"type": "auth", "token": "tok-alice"}).encode())


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                "GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def frame(self, timeout: float = 10) -> tuple[int, bytes]:
        """The next server frame: (opcode, payload)."""
        first, size = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        assert first & 0x80, "the server does not fragment"
        if size == 126:
            size = int.from_bytes(await self.reader.readexactly(2), "big")
        elif size == 127:
            size = int.from_bytes(await self.reader.readexactly(8), "big")
        return first & 0x0F, await self.reader.readexactly(size)

    async def recv(self, timeout: float = 10) -> dict[str, Any]:
        """The next text frame, as JSON (pings from the server are answered)."""
        while True:
            opcode, payload = await self.frame(timeout)
            if opcode == PING:
                self.writer.write(client_frame(PONG, payload))
                continue
            assert opcode == TEXT, (opcode, payload)
            return json.loads(payload)  # type: ignore[no-any-return]

    async def close_code(self, timeout: float = 10) -> int:
        """Read up to the server's close frame; its code."""
        while True:
            opcode, payload = await self.frame(timeout)
            if opcode == CLOSE:
                return int.from_bytes(payload[:2], "big")

    async def authenticated(self) -> RawClient:
        self.writer.write(AUTH)
        assert (await self.recv())["type"] == "welcome"
        return self


@pytest.fixture
async def gateway(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Gateway]:
    options: dict[str, Any] = getattr(request, "param", {})
    gateway = Gateway(GatewayConfig(data_dir=tmp_path, port=free_port(), **options))
    await gateway.start()
    await gateway.store.add_user("alice", hash_token("tok-alice"), int(time.time() * 1000))
    try:
        yield gateway
    finally:
        await gateway.stop()


async def connect(gateway: Gateway) -> RawClient:
    assert gateway.port is not None
    return await RawClient.connect(gateway.port)


async def test_frames_right_behind_the_auth_frame_wait_for_the_login(gateway: Gateway) -> None:
    """In one write: auth and three pings. The pings arrive while the token is
    being checked; they are answered after the welcome, in order."""
    client = await connect(gateway)
    client.writer.write(AUTH + ping(1) + ping(2) + ping(3))
    assert (await client.recv())["type"] == "welcome"
    assert [(await client.recv())["t"] for _ in range(3)] == [1, 2, 3]


async def test_a_binary_frame_is_refused_in_its_place(gateway: Gateway) -> None:
    client = await (await connect(gateway)).authenticated()
    for round_ in range(1, 6):
        client.writer.write(ping(2 * round_) + client_frame(BINARY, b"\x01\x02") + ping(2 * round_ + 1))
        answers = [await client.recv() for _ in range(3)]
        assert [a["type"] for a in answers] == ["pong", "error", "pong"]
        assert answers[1]["code"] == "bad_frame"
        assert [answers[0]["t"], answers[2]["t"]] == [2 * round_, 2 * round_ + 1]


async def test_a_binary_first_frame_closes_with_4001(gateway: Gateway) -> None:
    client = await connect(gateway)
    client.writer.write(client_frame(BINARY, b"{}"))
    assert (await client.recv())["code"] == "bad_frame"
    assert await client.close_code() == 4001


async def test_a_fragmented_message_is_joined(gateway: Gateway) -> None:
    client = await (await connect(gateway)).authenticated()
    text = json.dumps({"type": "ping", "t": 42}).encode()
    client.writer.write(
        client_frame(TEXT, text[:5], fin=False)
        + client_frame(PING, b"in between")  # control frames may interleave
        + client_frame(CONTINUATION, text[5:9], fin=False)
        + client_frame(CONTINUATION, text[9:])
        + ping(43)
    )
    opcode, payload = await client.frame()
    assert (opcode, payload) == (PONG, b"in between")
    assert [(await client.recv())["t"] for _ in range(2)] == [42, 43]


async def test_a_continuation_without_a_message_closes_with_1002(gateway: Gateway) -> None:
    client = await (await connect(gateway)).authenticated()
    client.writer.write(client_frame(CONTINUATION, b"{}") + ping(1))
    assert await client.close_code() == 1002


async def test_fragments_over_the_hard_limit_close_with_1009(gateway: Gateway) -> None:
    client = await (await connect(gateway)).authenticated()
    half = b"x" * (WS_HARD_LIMIT // 2 + 1)
    client.writer.write(client_frame(TEXT, half, fin=False) + client_frame(CONTINUATION, half))
    assert await client.close_code() == 1009


@pytest.mark.parametrize("gateway", [{"heartbeat": 1.0}], indirect=True)
async def test_a_peer_that_answers_no_ping_is_dropped(gateway: Gateway) -> None:
    client = await (await connect(gateway)).authenticated()
    started = time.monotonic()
    opcode, _ = await client.frame(5)  # the server's ping after a silent period
    assert opcode == PING
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        await client.frame(5)  # not answered: the socket is dropped, no close frame
    # 1.5 to 2.5 heartbeats after the last frame (the welcome came before `started`).
    assert 1.0 <= time.monotonic() - started <= 4.0
    assert not gateway.connections


@pytest.mark.parametrize("gateway", [{"heartbeat": 1.0}], indirect=True)
async def test_a_peer_that_answers_pings_stays(gateway: Gateway) -> None:
    client = await (await connect(gateway)).authenticated()
    pings = 0
    deadline = time.monotonic() + 4.5
    while time.monotonic() < deadline:
        try:
            opcode, payload = await client.frame(deadline - time.monotonic())
        except TimeoutError:
            break
        assert opcode == PING
        pings += 1
        client.writer.write(client_frame(PONG, payload))
    assert pings >= 2
    client.writer.write(ping(7))
    assert (await client.recv())["t"] == 7


@pytest.mark.parametrize("gateway", [{"service": ServiceConfig(rate=20.0, burst=5.0)}], indirect=True)
async def test_over_the_rate_reading_pauses_and_nothing_is_lost_or_reordered(gateway: Gateway) -> None:
    """30 charged frames (a second auth is refused, and refusals are charged),
    each followed by an uncharged ping, in one write: 5 at once, then 20/s."""
    client = await (await connect(gateway)).authenticated()
    started = time.monotonic()
    client.writer.write(b"".join(AUTH + ping(t) for t in range(1, 31)))
    answers = [await client.recv() for _ in range(60)]
    assert [a["type"] for a in answers] == ["error", "pong"] * 30
    assert [a["t"] for a in answers[1::2]] == list(range(1, 31))
    assert time.monotonic() - started >= 1.0
    assert (gateway.metrics.registry.get_sample_value("roost_rate_limited_total") or 0) > 0


async def test_a_close_frame_is_answered_and_the_session_ends(gateway: Gateway) -> None:
    client = await (await connect(gateway)).authenticated()
    client.writer.write(client_frame(CLOSE, (1000).to_bytes(2, "big")))
    assert await client.close_code() == 1000
    assert await asyncio.wait_for(client.reader.read(), 5) == b""  # the server hung up
    for _ in range(100):
        if not gateway.connections:
            break
        await asyncio.sleep(0.01)
    assert not gateway.connections
    closed = gateway.metrics.registry.get_sample_value("roost_connections_closed_total", {"code": "1000"})
    assert closed == 1


async def test_other_requests_on_the_same_port_go_to_aiohttp(gateway: Gateway) -> None:
    url = f"http://127.0.0.1:{gateway.port}"
    health = await asyncio.to_thread(lambda: json.load(urllib.request.urlopen(url + "/healthz", timeout=5)))
    assert health["status"] == "ok"
    # A path that only starts like the WebSocket's is not it.
    with pytest.raises(urllib.error.HTTPError) as refused:
        await asyncio.to_thread(lambda: urllib.request.urlopen(url + "/v1/wsx", timeout=5))
    assert refused.value.code == 404


async def test_a_close_frame_waits_its_turn_behind_the_login(gateway: Gateway) -> None:
    """auth, two pings and a close in one write: the pings are answered after
    the welcome, then the close; the close does not overtake them."""
    client = await connect(gateway)
    client.writer.write(AUTH + ping(1) + ping(2) + client_frame(CLOSE, (1000).to_bytes(2, "big")))
    assert (await client.recv())["type"] == "welcome"
    assert [(await client.recv())["t"] for _ in range(2)] == [1, 2]
    assert await client.close_code() == 1000


@pytest.mark.parametrize("gateway", [{"service": ServiceConfig(rate=20.0, burst=2.0)}], indirect=True)
async def test_a_close_frame_waits_its_turn_behind_a_pause(gateway: Gateway) -> None:
    client = await (await connect(gateway)).authenticated()
    closing = client_frame(CLOSE, (1000).to_bytes(2, "big"))
    client.writer.write(b"".join(AUTH + ping(t) for t in range(1, 11)) + closing)
    answers = [await client.recv() for _ in range(20)]
    assert [a["t"] for a in answers[1::2]] == list(range(1, 11))
    assert await client.close_code() == 1000


@pytest.mark.parametrize("gateway", [{"auth_timeout": 0.3}], indirect=True)
async def test_an_auth_frame_after_the_deadline_logs_nobody_in(gateway: Gateway) -> None:
    client = await connect(gateway)
    assert (await client.recv())["code"] == "auth_timeout"
    client.writer.write(AUTH)  # too late: the server is closing this socket
    assert await client.close_code() == 4002
    await asyncio.sleep(0.2)
    assert not await gateway.registry.fetch_online(["alice"])


async def test_a_socket_gone_during_the_token_check_does_not_replace_the_next_one(gateway: Gateway) -> None:
    """Socket A sends auth and hangs up while its (slow) token check runs; the
    client's next socket B logs in meanwhile. A's late login must not register
    A and so replace B (B would be closed as replaced)."""
    original = gateway.service.authenticate
    calls = 0

    async def slow_first(token: str) -> str | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0.5)
        return await original(token)

    gateway.service.authenticate = slow_first  # type: ignore[method-assign]
    first = await connect(gateway)
    first.writer.write(AUTH)
    await first.writer.drain()
    first.writer.close()
    await asyncio.sleep(0.05)
    second = await (await connect(gateway)).authenticated()
    await asyncio.sleep(0.8)  # A's token check is long over
    second.writer.write(ping(9))
    assert (await second.recv())["t"] == 9  # a close frame here fails recv()
    assert len(gateway.connections) == 1


async def test_firefox_connection_header_is_an_upgrade(gateway: Gateway) -> None:
    """RFC 6455: Connection includes Upgrade; Firefox sends 'keep-alive, Upgrade'."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            "GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: keep-alive, Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    client = await RawClient(reader, writer).authenticated()
    client.writer.write(ping(5))
    assert (await client.recv())["t"] == 5


async def test_an_upgrade_on_a_kept_alive_connection_is_sent_to_a_new_one(gateway: Gateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200"), head
    size = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
    await reader.readexactly(size)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            "GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 503"), head
    assert b"connection: close" in head.lower()
    writer.close()


async def test_the_upgrade_headers_are_not_kept_for_the_sockets_life(gateway: Gateway) -> None:
    """picows keeps the upgrade request and response on its transport; their
    headers were ~2 KiB of every idle connection (docs/performance.md)."""
    await (await connect(gateway)).authenticated()
    [conn] = gateway.connections
    assert len(conn.ws.request.headers) == 0
    assert len(conn.ws.response.headers) == 0
