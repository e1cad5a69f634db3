"""A bare relay: the machine's limit for Roost's frames, with no persistence and no logic.

Same WebSocket library (aiohttp, same settings as the gateway), same codec
(``roost.protocol.codec``), same event loop as ``roost serve`` (uvloop where
installed: ``roost.gateway.server.event_loop_factory``; ``/healthz`` names
it) and exactly the frames Roost exchanges per 1:1 message:

    sender --send--> relay --ack--> sender
                     relay --msg--> recipient
    recipient --dack--> relay --receipt--> sender --rack--> relay

plus the same ``auth`` → ``welcome`` handshake (token looked up by its
SHA-256 hash, as the server does). A seq is a per-conversation counter in a
dict; nothing is stored and an offline recipient simply misses the message.
``roost bench one-to-one --with-baseline`` and ``roost bench baseline`` drive
it with the same clients as Roost; Roost's throughput divided by the relay's
is the price of durability and delivery logic.

Run: ``python -m roost.bench.relay --port P``; users are added with
``POST /users`` ``{name: token}`` (``RelayTarget.add_users``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from aiohttp import WSMsgType, web

from roost.bench.target import Target, new_token
from roost.devcluster.embedded import pinned, stop_process
from roost.devcluster.postgres import free_port
from roost.devcluster.run import wait_healthy
from roost.gateway.server import event_loop_factory
from roost.protocol import frames as f
from roost.protocol.codec import decode_client, encode
from roost.protocol.errors import ProtocolError


class Relay:
    def __init__(self, heartbeat: float = 30.0) -> None:
        self.heartbeat = heartbeat
        self.users: dict[bytes, str] = {}  # sha256(token) -> name
        self.online: dict[str, web.WebSocketResponse] = {}
        self.seqs: dict[str, int] = {}
        self.receipt_versions: dict[tuple[str, str], int] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/ws", self.websocket)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_post("/users", self.add_users)
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        loop = type(asyncio.get_running_loop()).__module__
        return web.json_response({"status": "ok", "connections": len(self.online), "loop": loop})

    async def add_users(self, request: web.Request) -> web.Response:
        tokens: dict[str, str] = await request.json()
        for name, token in tokens.items():
            self.users[hashlib.sha256(token.encode()).digest()] = name
        return web.json_response({"added": len(tokens)})

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=self.heartbeat, max_msg_size=1 << 20, compress=False)
        await ws.prepare(request)
        first = await ws.receive()
        if first.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            return ws
        auth = decode_client(first.data)
        user = (
            self.users.get(hashlib.sha256(auth.token.encode()).digest()) if isinstance(auth, f.Auth) else None
        )
        if user is None:
            await ws.close(code=4001, message=b"auth failed")
            return ws
        await ws.send_frame(encode(f.Welcome(user=user, v=1, heartbeat=int(self.heartbeat))), WSMsgType.TEXT)
        self.online[user] = ws
        try:
            async for msg in ws:
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    await self.handle(user, ws, msg.data)
        finally:
            if self.online.get(user) is ws:
                del self.online[user]
        return ws

    async def handle(self, user: str, ws: web.WebSocketResponse, data: bytes | str) -> None:
        try:
            frame = decode_client(data)
        except ProtocolError as exc:
            await ws.send_frame(encode(f.Error(code=exc.code.value, message=exc.message)), WSMsgType.TEXT)
            return
        if isinstance(frame, f.Send) and frame.to is not None:
            await self.relay_message(user, ws, frame, frame.to)
        elif isinstance(frame, f.DeliveryAck):
            await self.relay_receipt(user, frame)
        # rack (and anything else) needs no answer: nothing is pending anywhere

    async def relay_message(self, user: str, ws: web.WebSocketResponse, frame: f.Send, to: str) -> None:
        a, b = sorted((user, to))
        conv = f"d:{a}:{b}"
        seq = self.seqs.get(conv, 0) + 1
        self.seqs[conv] = seq
        ts = int(time.time() * 1000)
        await ws.send_frame(encode(f.SendAck(id=frame.id, conv=conv, seq=seq, ts=ts)), WSMsgType.TEXT)
        peer = self.online.get(to)
        if peer is not None:
            deliver = f.Deliver(
                conv=conv, seq=seq, id=frame.id, sender=user, ct=frame.ct, body=frame.body, ts=ts
            )
            await peer.send_frame(encode(deliver), WSMsgType.TEXT)

    async def relay_receipt(self, user: str, frame: f.DeliveryAck) -> None:
        _, a, b = frame.conv.split(":", 2)
        sender = b if a == user else a
        key = (sender, frame.conv)
        rv = self.receipt_versions.get(key, 0) + 1
        self.receipt_versions[key] = rv
        peer = self.online.get(sender)
        if peer is not None:
            marks = {user: f.MemberMarks(delivered=frame.seq, read=0)}
            receipt = f.Receipt(conv=frame.conv, rv=rv, marks=marks, all_delivered=frame.seq, all_read=0)
            await peer.send_frame(encode(receipt), WSMsgType.TEXT)


async def serve(host: str, port: int) -> None:
    runner = web.AppRunner(Relay().app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=4096).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


class RelayTarget(Target):
    """The relay as a benchmark target (a subprocess on a free port)."""

    name = "relay"

    def __init__(self) -> None:
        super().__init__()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(tempfile.mkstemp(prefix="roost-relay-", suffix=".log")[1])

    def start(self) -> None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                pinned([sys.executable, "-m", "roost.bench.relay", "--port", str(port)]),
                stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        wait_healthy(url, self.proc)
        self.urls = [url]

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.unlink(missing_ok=True)

    async def add_users(self, names: list[str]) -> dict[str, str]:
        tokens = {name: new_token() for name in names}
        body = json.dumps(tokens).encode()
        request = urllib.request.Request(
            self.urls[0] + "/users", data=body, headers={"Content-Type": "application/json"}
        )
        await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=30).read())
        return tokens

    def server_pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # The gateway's own loop: a relay on a slower loop would flatter Roost's ratio.
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
