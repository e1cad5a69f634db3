"""A bare relay: the machine's limit for Roost's frames, with no persistence and no logic.

Same WebSocket library as the gateway (picows: a callback per frame, the
same read buffer and frame limit), same codec (``roost.protocol.codec``),
same event loop as ``roost serve`` (uvloop where installed:
``roost.gateway.server.event_loop_factory``; ``/healthz`` names it) and
exactly the frames Roost exchanges per 1:1 message:

    sender --send--> relay --ack--> sender
                     relay --msg--> recipient
    recipient --dack--> relay --receipt--> sender --rack--> relay

plus the same ``auth`` → ``welcome`` handshake (token looked up by its
SHA-256 hash, as the server does). A seq is a per-conversation counter in a
dict; nothing is stored and an offline recipient simply misses the message.
``roost bench one-to-one --with-baseline`` and ``roost bench baseline`` drive
it with the same clients as Roost; Roost's throughput divided by the relay's
is the price of durability and delivery logic.

Run: ``python -m roost.bench.relay --port P --admin-port Q``: WebSockets and
``GET /healthz`` on P; users are added with ``POST /users`` ``{name: token}``
on Q (``RelayTarget.add_users``), aiohttp's, since picows serves GETs only.
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
from typing import Any

from aiohttp import web
from picows import WSListener, WSMsgType, WSUpgradeResponse, WSUpgradeResponseWithListener, ws_create_server

from roost.bench.target import Target, new_token
from roost.devcluster.embedded import pinned, stop_process
from roost.devcluster.postgres import free_port
from roost.devcluster.run import wait_healthy
from roost.gateway.server import event_loop_factory
from roost.gateway.websocket import READ_BUFFER_BYTES, WS_HARD_LIMIT
from roost.protocol import frames as f
from roost.protocol.codec import decode_client, encode
from roost.protocol.errors import ProtocolError

_TEXT = WSMsgType.TEXT


class Relay:
    def __init__(self, heartbeat: float = 30.0) -> None:
        self.heartbeat = heartbeat
        self.users: dict[bytes, str] = {}  # sha256(token) -> name
        self.online: dict[str, RelaySocket] = {}
        self.seqs: dict[str, int] = {}
        self.receipt_versions: dict[tuple[str, str], int] = {}

    def route(self, request: Any) -> Any:
        if request.path == b"/healthz":
            loop = type(asyncio.get_running_loop()).__module__
            body = json.dumps({"status": "ok", "connections": len(self.online), "loop": loop})
            ok = WSUpgradeResponse.create_ok_response(body.encode(), {"Content-Type": "application/json"})
            return WSUpgradeResponseWithListener(ok, None)
        return RelaySocket(self)

    def admin_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/users", self.add_users)
        return app

    async def add_users(self, request: web.Request) -> web.Response:
        tokens: dict[str, str] = await request.json()
        for name, token in tokens.items():
            self.users[hashlib.sha256(token.encode()).digest()] = name
        return web.json_response({"added": len(tokens)})

    def handle(self, user: str, ws: Any, data: bytes) -> None:
        try:
            frame = decode_client(data)
        except ProtocolError as exc:
            ws.send(_TEXT, encode(f.Error(code=exc.code.value, message=exc.message)))
            return
        if isinstance(frame, f.Send) and frame.to is not None:
            self.relay_message(user, ws, frame, frame.to)
        elif isinstance(frame, f.DeliveryAck):
            self.relay_receipt(user, frame)
        # rack (and anything else) needs no answer: nothing is pending anywhere

    def relay_message(self, user: str, ws: Any, frame: f.Send, to: str) -> None:
        a, b = sorted((user, to))
        conv = f"d:{a}:{b}"
        seq = self.seqs.get(conv, 0) + 1
        self.seqs[conv] = seq
        ts = int(time.time() * 1000)
        ws.send(_TEXT, encode(f.SendAck(id=frame.id, conv=conv, seq=seq, ts=ts)))
        peer = self.online.get(to)
        if peer is not None:
            deliver = f.Deliver(
                conv=conv, seq=seq, id=frame.id, sender=user, ct=frame.ct, body=frame.body, ts=ts
            )
            peer.ws.send(_TEXT, encode(deliver))

    def relay_receipt(self, user: str, frame: f.DeliveryAck) -> None:
        _, a, b = frame.conv.split(":", 2)
        sender = b if a == user else a
        key = (sender, frame.conv)
        rv = self.receipt_versions.get(key, 0) + 1
        self.receipt_versions[key] = rv
        peer = self.online.get(sender)
        if peer is not None:
            marks = {user: f.MemberMarks(delivered=frame.seq, read=0)}
            receipt = f.Receipt(conv=frame.conv, rv=rv, marks=marks, all_delivered=frame.seq, all_read=0)
            peer.ws.send(_TEXT, encode(receipt))


class RelaySocket(WSListener):
    """One relayed connection: the auth frame, then every text frame relayed."""

    __slots__ = ("relay", "user", "ws")

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.user: str | None = None
        self.ws: Any = None

    def on_ws_connected(self, ws: Any) -> None:
        self.ws = ws

    def on_ws_frame(self, ws: Any, frame: Any) -> None:
        if frame.msg_type is WSMsgType.CLOSE:
            ws.send_close(1000)
            ws.disconnect()
            return
        if frame.msg_type is not _TEXT:
            return
        data = frame.get_payload_as_bytes()
        if self.user is not None:
            self.relay.handle(self.user, ws, data)
            return
        auth = decode_client(data)
        relay = self.relay
        user = (
            relay.users.get(hashlib.sha256(auth.token.encode()).digest())
            if isinstance(auth, f.Auth)
            else None
        )
        if user is None:
            ws.send_close(4001, b"auth failed")
            ws.disconnect()
            return
        self.user = user
        relay.online[user] = self
        ws.send(_TEXT, encode(f.Welcome(user=user, v=1, heartbeat=int(relay.heartbeat))))

    def on_ws_disconnected(self, ws: Any) -> None:
        if self.user is not None and self.relay.online.get(self.user) is self:
            del self.relay.online[self.user]


async def serve(host: str, port: int, admin_port: int) -> None:
    relay = Relay()
    server = await ws_create_server(
        relay.route, host, port, enable_auto_ping=True, auto_ping_idle_timeout=relay.heartbeat,
        auto_ping_reply_timeout=relay.heartbeat / 2, max_frame_size=WS_HARD_LIMIT,
        read_buffer_init_size=READ_BUFFER_BYTES, backlog=4096,
    )  # fmt: skip
    runner = web.AppRunner(relay.admin_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, admin_port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await runner.cleanup()


class RelayTarget(Target):
    """The relay as a benchmark target (a subprocess on a free port)."""

    name = "relay"

    def __init__(self) -> None:
        super().__init__()
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin_url = ""
        self.log = Path(tempfile.mkstemp(prefix="roost-relay-", suffix=".log")[1])

    def start(self) -> None:
        port, admin_port = free_port(), free_port()
        url = f"http://127.0.0.1:{port}"
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        command = [
            sys.executable,
            "-m",
            "roost.bench.relay",
            "--port",
            str(port),
            "--admin-port",
            str(admin_port),
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                pinned(command),
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
            self.admin_url + "/users", data=body, headers={"Content-Type": "application/json"}
        )
        await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=30).read())
        return tokens

    def server_pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--admin-port", type=int, required=True)
    args = parser.parse_args()
    # The gateway's own loop: a relay on a slower loop would flatter Roost's ratio.
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(serve(args.host, args.port, args.admin_port))


if __name__ == "__main__":
    main()
