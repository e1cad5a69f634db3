"""A gateway Connection counts the frames it queues and the slow consumers it
cuts off (a real picows server and aiohttp client on loopback)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
from picows import WSListener, WSMsgType, ws_create_server

from roost.core.metrics import Metrics
from roost.gateway.connection import HIGH_WATER, Connection
from roost.gateway.server import Gateway, GatewayConfig
from roost.protocol import frames as f
from roost.protocol.codec import encode
from roost.protocol.errors import CloseCode


class OneConnection(WSListener):
    """The server side of one socket: a Connection that ``act`` pushes to."""

    def __init__(self, act: Callable[[Connection], None], max_queued: int, metrics: Metrics) -> None:
        self.act, self.max_queued, self.metrics = act, max_queued, metrics
        self.conn: Connection | None = None

    def on_ws_connected(self, ws: Any) -> None:
        self.conn = Connection(ws, self.max_queued, self.metrics)
        self.act(self.conn)  # the server closes the socket; the client sees it

    def on_ws_frame(self, ws: Any, frame: Any) -> None:
        if frame.msg_type is WSMsgType.CLOSE:  # the client's answer to our close
            ws.disconnect()

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.resume_writing()


async def serve_one(act: Callable[[Connection], None], max_queued: int) -> tuple[Metrics, int | None]:
    """Accept one WebSocket, let ``act`` push to it, return the metrics and the close code seen."""
    metrics = Metrics()
    listeners: list[OneConnection] = []

    def route(request: Any) -> OneConnection:
        listeners.append(OneConnection(act, max_queued, metrics))
        return listeners[-1]

    server = await ws_create_server(route, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as http, http.ws_connect(f"http://127.0.0.1:{port}/") as ws:
            code = await asyncio.wait_for(read_to_close(ws), 10)
        for listener in listeners:
            assert listener.conn is not None
            await listener.conn.finish()
    finally:
        server.close()
    return metrics, code


async def read_to_close(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    async for _ in ws:
        pass
    return ws.close_code


def counted(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_frames_out_are_counted_by_type() -> None:
    def act(conn: Connection) -> None:
        conn.push(encode(f.Pong(t=1)))
        conn.push(encode(f.Pong(t=2)))
        conn.push(encode(f.Presence(user="bob", online=True)))
        conn.push(b'{"type":"no_such_type"}')
        conn.close(1000, "done")

    metrics, code = await serve_one(act, 1 << 20)
    assert code == 1000
    assert counted(metrics, "roost_frames_out_total", type="pong") == 2
    assert counted(metrics, "roost_frames_out_total", type="presence") == 1
    assert counted(metrics, "roost_presence_events_total") == 1
    assert counted(metrics, "roost_frames_out_total", type="other") == 1
    assert counted(metrics, "roost_slow_consumers_total") == 0


async def test_a_full_send_queue_counts_one_slow_consumer() -> None:
    body = "x" * 16 * 1024

    def act(conn: Connection) -> None:
        # In one loop pass: ~HIGH_WATER goes to the socket, the rest must queue,
        # and the queue limit is far below what is left.
        for n in range(4 * HIGH_WATER // len(body)):
            conn.push(encode(f.Error(code="x", message=body, ref=str(n))))

    metrics, code = await serve_one(act, HIGH_WATER)
    assert code == CloseCode.SLOW_CONSUMER
    assert counted(metrics, "roost_slow_consumers_total") == 1
    assert counted(metrics, "roost_frames_out_total", type="error") == 16


async def test_cluster_parts_share_the_gateways_metrics() -> None:
    # Nothing is opened: the store and registry only connect on start.
    config = GatewayConfig(store_url="postgresql://127.0.0.1:1/roost", registry_url="redis://127.0.0.1:1")
    gateway = Gateway(config)
    assert gateway.store.metrics is gateway.metrics
    assert gateway.registry.metrics is gateway.metrics
