"""The fault proxy against a real echo server on loopback."""

from __future__ import annotations

import asyncio
import random

import pytest

from roost.verify.proxy import FaultProxy


@pytest.fixture
async def echo_proxy():  # type: ignore[no-untyped-def]
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    proxy = FaultProxy("127.0.0.1", server.sockets[0].getsockname()[1])
    await proxy.start()
    yield proxy
    await proxy.stop()
    server.close()


async def connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"hello")
    assert await asyncio.wait_for(reader.readexactly(5), 2) == b"hello"
    return reader, writer


async def test_bytes_pass_through_unchanged(echo_proxy: FaultProxy) -> None:
    reader, writer = await connect(echo_proxy)
    payload = bytes(range(256)) * 1000
    writer.write(payload)
    assert await asyncio.wait_for(reader.readexactly(len(payload)), 5) == payload
    writer.close()


async def test_cut_tears_the_next_chunk_and_closes(echo_proxy: FaultProxy) -> None:
    reader, writer = await connect(echo_proxy)
    assert echo_proxy.cut(random.Random(1), 1.0) == 1
    writer.write(b"x" * 1000)
    received = b""
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        while True:
            received += await asyncio.wait_for(reader.readexactly(1), 2)
    assert len(received) < 1000  # torn: only part of it arrived
    assert echo_proxy.counts["cut"] == 1


async def test_an_idle_link_is_cut_too(echo_proxy: FaultProxy) -> None:
    reader, _ = await connect(echo_proxy)
    echo_proxy.cut(random.Random(1), 1.0)
    assert await asyncio.wait_for(reader.read(10), 2) == b""


async def test_blackhole_stalls_then_resumes_or_times_out(echo_proxy: FaultProxy) -> None:
    links = [await connect(echo_proxy) for _ in range(8)]
    loop = asyncio.get_running_loop()
    hole = asyncio.create_task(echo_proxy.blackhole(random.Random(3), 1.0, 0.5, whole=True))
    await asyncio.sleep(0.05)
    started = loop.time()
    for _, writer in links:
        writer.write(b"ping!")
    late_connect = asyncio.create_task(asyncio.open_connection("127.0.0.1", echo_proxy.port))
    outcomes = []
    for reader, _ in links:
        try:
            outcomes.append(await asyncio.wait_for(reader.readexactly(5), 3))
        except (asyncio.IncompleteReadError, ConnectionError):
            outcomes.append(None)
    assert loop.time() - started >= 0.4  # nothing moved while the hole lasted
    await hole
    counts = echo_proxy.counts
    assert counts["blackholed"] == 8 and counts["resumed"] + counts["timed_out"] == 8
    assert outcomes.count(b"ping!") == counts["resumed"] and outcomes.count(None) == counts["timed_out"]
    reader, writer = await late_connect  # the connection held during the hole goes through after it
    writer.write(b"after")
    assert await asyncio.wait_for(reader.readexactly(5), 2) == b"after"
