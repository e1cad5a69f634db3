"""The SDK refuses bad input before anything is queued, and says why a connection failed.

Real sockets: an aiohttp server that is not a Roost server, a closed port.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from roost.client import CannotConnect, Client, EmptyMessage, InvalidArgument, MessageTooLarge
from roost.client.client import check_url
from roost.client.state import ClientState
from roost.protocol.frames import MAX_BODY_BYTES


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def plain_http() -> AsyncIterator[str]:
    """``http://127.0.0.1:PORT`` of a web server with no WebSocket endpoint (no TLS either)."""
    app = web.Application()
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_too_large_or_empty_is_refused_before_the_outbox(tmp_path: Path) -> None:
    path = tmp_path / "a.state"
    client = Client(f"http://127.0.0.1:{closed_port()}", "t", state_path=path)
    try:
        with pytest.raises(MessageTooLarge, match=f"limit is {MAX_BODY_BYTES:,} bytes") as info:
            await client.send("é" * (MAX_BODY_BYTES // 2 + 1), to="bob")  # bytes, not characters
        assert (info.value.size, info.value.limit) == (MAX_BODY_BYTES + 2, MAX_BODY_BYTES)
        with pytest.raises(MessageTooLarge):
            await client.send(body=b"\0" * (MAX_BODY_BYTES + 1), to="bob", ct="application/octet-stream")
        for text in ("", " ", "\n\t "):
            with pytest.raises(EmptyMessage):  # bounded: a queued send would wait for its ack
                await asyncio.wait_for(client.send(text, to="bob"), 5)
        with pytest.raises(EmptyMessage):
            await client.send(body=b"", to="bob", ct="application/octet-stream")
        assert client.pending_outbox() == []
    finally:
        await client.close()
    state = ClientState(path)
    try:
        assert state.outbox() == []
    finally:
        state.close()


def test_empty_token_and_no_url_are_refused(tmp_path: Path) -> None:
    for token in ("", "  "):
        with pytest.raises(InvalidArgument, match="token is empty"):
            Client("http://127.0.0.1:1", token, state_path=tmp_path / "x.state")
    with pytest.raises(InvalidArgument, match="at least one URL"):
        Client([], "t", state_path=tmp_path / "x.state")


@pytest.mark.parametrize(
    "url", ["ftp://host", "127.0.0.1:8765", "localhost:8765", "http://", "http://h:port", "//host:1"]
)
def test_check_url_refuses(url: str) -> None:
    with pytest.raises(InvalidArgument, match="bad server URL"):
        check_url(url)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8765", "https://chat.example:443/", "ws://h/v1/ws", "wss://h"]
)
def test_check_url_accepts(url: str) -> None:
    assert check_url(url) == url


async def test_tls_to_a_plain_server_fails_at_once(plain_http: str, tmp_path: Path) -> None:
    client = Client(plain_http.replace("http://", "https://"), "t", state_path=tmp_path / "a.state")
    start = time.monotonic()
    with pytest.raises(CannotConnect, match="TLS handshake failed"):
        await client.connect(timeout=30)
    assert time.monotonic() - start < 5


async def test_not_a_roost_server_fails_at_once_with_the_http_status(plain_http: str, tmp_path: Path) -> None:
    client = Client(plain_http, "t", state_path=tmp_path / "a.state")
    start = time.monotonic()
    with pytest.raises(CannotConnect, match="HTTP 404"):
        await client.connect(timeout=30)
    assert time.monotonic() - start < 5


async def test_a_down_server_is_retried_with_the_reason_until_the_timeout(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    retries: list[tuple[str, str, float]] = []
    client = Client(
        url, "t", state_path=tmp_path / "a.state", backoff_base=0.05, on_retry=lambda *a: retries.append(a)
    )
    start = time.monotonic()
    with pytest.raises(CannotConnect, match="connection refused") as info:
        await client.connect(timeout=1.0)
    assert isinstance(info.value, TimeoutError)  # what connect raised before it said why
    assert 1.0 <= time.monotonic() - start < 5
    assert len(retries) >= 2
    assert {(u, r) for u, r, _ in retries} == {
        (url, f"connection refused by 127.0.0.1:{url.rsplit(':', 1)[1]}")
    }


async def test_an_on_retry_callback_that_raises_does_not_stop_the_retries(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    calls: list[float] = []

    def broken(_url: str, _reason: str, delay: float) -> None:
        calls.append(delay)
        raise RuntimeError("a bug in the application's callback")

    client = Client(url, "t", state_path=tmp_path / "a.state", backoff_base=0.05, on_retry=broken)
    try:
        with pytest.raises(CannotConnect, match="connection refused"):
            await client.connect(timeout=1.0)
        assert len(calls) >= 2  # the connection loop lived on after the first raise
    finally:
        await client.close()


async def test_one_final_failure_does_not_stop_failover_to_a_working_url(
    plain_http: str, tmp_path: Path
) -> None:
    """TLS to one URL fails for good, the other is only down: keep retrying until the timeout."""
    down = f"http://127.0.0.1:{closed_port()}"
    client = Client(
        [plain_http.replace("http://", "https://"), down],
        "t",
        state_path=tmp_path / "a.state",
        backoff_base=0.05,
    )
    start = time.monotonic()
    with pytest.raises(CannotConnect) as info:
        await client.connect(timeout=1.0)
    assert time.monotonic() - start >= 1.0
    assert "TLS handshake failed" in info.value.message and "connection refused" in info.value.message


async def test_a_url_aiohttp_cannot_speak_fails_at_once(tmp_path: Path) -> None:
    """The SDK does not check schemes itself (the simulator uses its own); aiohttp's refusal is final."""
    client = Client("ftp://127.0.0.1:1", "t", state_path=tmp_path / "a.state")
    start = time.monotonic()
    with pytest.raises(CannotConnect, match=r"ftp://127.0.0.1:1: not an http\(s\) or ws\(s\) URL"):
        await client.connect(timeout=30)
    assert time.monotonic() - start < 5
