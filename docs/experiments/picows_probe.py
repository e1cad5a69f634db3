"""Probe: Roost's chat service behind picows instead of aiohttp (issue #16).

An experiment, not a server: it measures what the WebSocket layer costs.
The store, registry and chat service are the real ones (``Gateway`` builds
and starts them); only the socket layer differs. A picows listener takes
the auth frame, authenticates, connects the session and hands every later
text frame to ``ChatService.handle``; frames pushed to a connection are
joined once per loop pass and written raw, as ``roost.gateway.connection``
does. Left out on purpose (so do not run it for users): admission
control, the auth deadline, rate-limit pauses, fragmented frames,
slow-consumer queueing, TLS, graceful drain. picows itself answers pings
and pings idle peers (one task per connection, counted in the memory
figure).

    pip install picows==2.3.1
    taskset -c 0 python docs/experiments/picows_probe.py --data-dir D --port P
    taskset -c 1 roost bench one-to-one --url http://127.0.0.1:P --store D --rates 5000,10000
    taskset -c 1 python -m roost.bench.login_cost http://127.0.0.1:P D PID -n 4000

Figures: docs/performance.md, "The WebSocket layer measured".
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import uvloop
from picows import (
    WSCloseCode,
    WSListener,
    WSMsgType,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from roost.gateway.connection import text_frame_header
from roost.gateway.server import Gateway, GatewayConfig, tune_gc
from roost.protocol import frames as f
from roost.protocol.codec import decode_client, encode
from roost.protocol.errors import ErrorCode, ProtocolError
from roost.service.chat import ServiceConfig, error_frame

TEXT = WSMsgType.TEXT


class Sink:
    """What the service pushes to: a pass's frames joined, one raw write."""

    __slots__ = ("batch", "close_code", "closed", "loop", "metrics", "raw", "scheduled", "ws")

    def __init__(self, ws: Any, metrics: Any) -> None:
        self.ws, self.raw, self.metrics = ws, ws.underlying_transport, metrics
        self.loop = asyncio.get_running_loop()
        self.batch: list[bytes] = []
        self.scheduled = self.closed = False
        self.close_code: int | None = None

    def push(self, frame: bytes) -> None:
        if self.closed:
            return
        self.metrics.frame_pushed(frame)
        self.batch.append(frame)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        frames, self.batch = self.batch, []
        if frames and not self.raw.is_closing():
            self.raw.write(b"".join(part for fr in frames for part in (text_frame_header(len(fr)), fr)))

    def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.flush()
        self.closed, self.close_code = True, code
        known = code in WSCloseCode._value2member_map_
        self.ws.send_close(WSCloseCode(code) if known else WSCloseCode.NORMAL, reason.encode())
        self.ws.disconnect()


class Listener(WSListener):  # type: ignore[misc]
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.session: Any = None
        self.waiting: list[bytes] | None = None  # frames that came during the login

    def on_ws_connected(self, ws: Any) -> None:
        self.sink = Sink(ws, self.gateway.metrics)

    def on_ws_frame(self, ws: Any, frame: Any) -> None:
        if frame.msg_type is TEXT:
            data = frame.get_payload_as_bytes()
            if self.session is not None:
                self.gateway.service.handle(self.session, data)
            elif self.waiting is None:
                self.waiting = []
                asyncio.get_running_loop().create_task(self.login(data))
            else:
                self.waiting.append(data)
        elif frame.msg_type is WSMsgType.CLOSE:
            ws.send_close(frame.get_close_code())
            ws.disconnect()

    async def login(self, data: bytes) -> None:
        service = self.gateway.service
        try:
            auth = decode_client(data)
            if not isinstance(auth, f.Auth):
                raise ProtocolError(ErrorCode.AUTH_REQUIRED, "the first frame must be auth")
            started = time.monotonic()
            user = await service.authenticate(auth.token)
            if user is None:
                raise ProtocolError(ErrorCode.AUTH_FAILED, "unknown or revoked token")
        except ProtocolError as exc:
            self.sink.push(error_frame(exc))
            self.sink.close(4001, exc.code.value)
            return
        self.sink.push(encode(f.Welcome(user=user, v=f.PROTOCOL_VERSION, heartbeat=30)))
        self.session = await service.connect(user, self.sink, auth.client, started, auth.e2ee)
        for waiting in self.waiting or ():
            service.handle(self.session, waiting)

    def on_ws_disconnected(self, ws: Any) -> None:
        self.sink.closed = True
        if self.session is not None:
            self.gateway.service.disconnect(self.session)
            self.session = None


async def main(args: argparse.Namespace) -> None:
    # The gateway's own aiohttp listener goes to the next port; only its parts are used.
    service = ServiceConfig(rate=0.0, burst=1.0)
    config = GatewayConfig(data_dir=Path(args.data_dir), port=args.port + 1, service=service)
    gateway = Gateway(config)
    await gateway.start()

    def route(request: Any) -> Any:
        if request.path == b"/healthz":  # roost bench --url checks it
            ok = WSUpgradeResponse.create_ok_response(b'{"status": "ok"}')
            return WSUpgradeResponseWithListener(ok, None)
        return Listener(gateway)

    server = await ws_create_server(
        route, "127.0.0.1", args.port, enable_auto_ping=True, auto_ping_idle_timeout=30,
        auto_ping_reply_timeout=15, read_buffer_init_size=2048, max_frame_size=1 << 20, backlog=4096,
    )  # fmt: skip
    tune_gc()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await gateway.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    uvloop.run(main(parser.parse_args()))
