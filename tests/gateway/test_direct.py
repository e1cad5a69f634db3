"""Text frames handled as aiohttp parses them (roost/gateway/direct.py): the
path is really taken, and frames keep the socket's order when some of them
take aiohttp's queue (real gateway, raw TCP client on loopback)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from roost.core.tokens import hash_token
from roost.gateway.direct import DirectQueue, DirectWebSocketResponse
from roost.gateway.server import Gateway, GatewayConfig
from tests.e2e.server import free_port


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked client frame (RFC 6455 5.2); the zero mask leaves the payload as is."""
    assert len(payload) < 126
    return bytes((0x80 | opcode, 0x80 | len(payload))) + b"\0\0\0\0" + payload


class RawClient:
    """A WebSocket client that writes bytes exactly as given (several frames in one write)."""

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

    async def recv(self) -> dict[str, Any]:
        first, size = await self.reader.readexactly(2)
        assert first == 0x81, first  # a final text frame
        if size == 126:
            size = int.from_bytes(await self.reader.readexactly(2), "big")
        return json.loads(await self.reader.readexactly(size))  # type: ignore[no-any-return]


async def test_frames_behind_a_queued_frame_keep_their_order(tmp_path: Path) -> None:
    """A binary frame takes aiohttp's queue; a ping right behind it in the same
    socket read must wait for it, not be answered first."""
    gateway = Gateway(GatewayConfig(data_dir=tmp_path, port=free_port(), heartbeat=30.0))
    await gateway.start()
    try:
        await gateway.store.add_user("alice", hash_token("tok-alice"), int(time.time() * 1000))
        assert gateway.port is not None
        client = await RawClient.connect(gateway.port)
        client.writer.write(client_frame(0x1, json.dumps({"type": "auth", "token": "tok-alice"}).encode()))
        assert (await asyncio.wait_for(client.recv(), 10))["type"] == "welcome"
        ping = json.dumps({"type": "ping", "t": 1}).encode()
        for _ in range(20):  # after the first round the text frames go straight to the service
            client.writer.write(client_frame(0x2, ping) + client_frame(0x1, ping))
            first = await asyncio.wait_for(client.recv(), 10)
            second = await asyncio.wait_for(client.recv(), 10)
            assert (first["type"], first.get("code"), second["type"]) == ("error", "bad_frame", "pong")
        client.writer.close()
    finally:
        await gateway.stop()


async def test_text_frames_skip_the_queue_once_a_handler_is_set() -> None:
    """With aiohttp's compiled reader too, the queue aiohttp builds is a
    DirectQueue and text frames reach the handler without ``receive``."""
    seen: list[str] = []
    result: asyncio.Future[tuple[bool, str]] = asyncio.get_running_loop().create_future()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = DirectWebSocketResponse()
        await ws.prepare(request)
        queue = ws.direct_queue
        assert isinstance(queue, DirectQueue)
        queue.handle = lambda _target, data: seen.append(data) or 0.0
        msg = await ws.receive()  # the close frame after three text frames
        result.set_result((msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED), str(seen)))
        return ws

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as http, http.ws_connect(f"http://127.0.0.1:{port}/") as ws:
            await asyncio.sleep(0.1)  # the handler is set
            for text in ("one", "two", "three"):
                await ws.send_str(text)
            await ws.close()
        closed, _ = await asyncio.wait_for(result, 10)
    finally:
        await runner.cleanup()
    assert closed
    assert seen == ["one", "two", "three"]


async def test_a_text_frame_waits_until_the_frame_taken_before_it_is_handled() -> None:
    """Once a frame queues, later text frames queue too until the connection's
    task has taken *and handled* it and re-armed direct handling: a text frame
    that arrives after the task took the queued frame from the buffer, but
    before it handled it, must not be handled first (the buffer is empty in
    that window, so the buffer alone cannot tell)."""
    from types import SimpleNamespace

    from aiohttp.http import WSMessage

    protocol = SimpleNamespace(_reading_paused=False, pause_reading=lambda: None)
    queue = DirectQueue(protocol, 2**16, loop=asyncio.get_running_loop())
    handled: list[object] = []

    def arm() -> None:  # what the gateway's loop does at its top when the buffer is empty
        queue.handle = lambda _target, data: handled.append(data) or 0.0

    arm()
    queue.feed_data(WSMessage(WSMsgType.TEXT, "one", None), 3)  # handled on the spot
    queue.feed_data(WSMessage(WSMsgType.BINARY, b"two", None), 3)  # takes the queue
    taken = await queue.read()  # the task takes it; the buffer is empty now
    queue.feed_data(WSMessage(WSMsgType.TEXT, "three", None), 5)  # arrives before it is handled
    handled.append(taken.data)  # the task handles it
    assert handled == ["one", b"two"]
    # The task re-arms only with its buffer empty; "three" waits in it, in order.
    handled.append((await queue.read()).data)
    assert handled == ["one", b"two", "three"]
