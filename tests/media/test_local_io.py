"""The local blob store's disk work never blocks the event loop (the chat path shares it).

A slow disk is simulated: each write of a part's bytes sleeps, and os.fsync,
os.pread and os.sendfile sleep; a task ticking every 10 ms on the same loop
must keep ticking while a part is uploaded and while a blob is downloaded. The
temp-file + fsync + rename-only-when-whole guarantee still holds. Downloads
on plain TCP go by sendfile (the bytes never pass through Python), also when
the client reads slowly; without a plain socket (TLS) they go in chunks."""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from roost.media import local
from roost.media.config import LOCAL_MIN_PART
from roost.media.local import LocalBlobStore
from roost.store.blobmeta import PENDING, BlobRecord

SLOW = 0.5  # s per slow disk call
TICK = 0.01
# A tick later than this means the loop was held; far below SLOW, far above
# a busy machine's scheduling noise.
MAX_GAP = 0.25


class SlowFile:
    """A real file whose ``write`` takes SLOW seconds, as on a disk whose page cache is full."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def write(self, data: bytes) -> int:
        time.sleep(SLOW)
        return int(self._real.write(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __enter__(self) -> SlowFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._real.close()


def slowly(call: Callable[..., Any]) -> Callable[..., Any]:
    def slow(*args: Any) -> Any:
        time.sleep(SLOW)
        return call(*args)

    return slow


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[LocalBlobStore, TestServer]]:
    store = LocalBlobStore(tmp_path / "media", secrets.token_bytes(32))
    await store.start()
    app = web.Application()
    store.add_routes(app, lambda request: None)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield store, server
    finally:
        await server.close()
        await store.close()


async def max_gap_during(work: asyncio.Future[Any] | Any) -> float:
    """Run ``work`` while a task ticks every TICK seconds; the longest wait between ticks."""
    ticks: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            ticks.append(time.monotonic())
            await asyncio.sleep(TICK)

    task = asyncio.create_task(ticker())
    try:
        await work
    finally:
        done.set()
        await task
    ticks.append(time.monotonic())
    return max(b - a for a, b in itertools.pairwise(ticks))


async def new_blob(store: LocalBlobStore, size: int) -> BlobRecord:
    blob = secrets.token_hex(16)
    await store.create(blob)
    return BlobRecord(blob, "alice", "file", size, size, PENDING, 0)


async def put(server: TestServer, url: str, data: bytes) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.put(server.make_url(url), data=data) as resp:
        await resp.read()
        return resp.status, resp.headers.get("ETag", "").strip('"')


async def test_a_part_written_to_a_slow_disk_leaves_the_loop_free(
    served: tuple[LocalBlobStore, TestServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, server = served
    data = os.urandom(1 << 20)
    rec = await new_blob(store, len(data))
    (url,) = await store.put_urls(rec, [1], int(time.time()) + 60)
    real_open = open
    monkeypatch.setattr(local, "open", lambda *a, **k: SlowFile(real_open(*a, **k)), raising=False)
    monkeypatch.setattr(os, "fsync", slowly(os.fsync))

    upload = asyncio.ensure_future(put(server, url.url, data))
    gap = await max_gap_during(upload)
    status, etag = upload.result()

    assert status == 200
    assert gap < MAX_GAP, f"the event loop was held {gap:.3f} s during the part's write"
    # Still whole or nothing: the part is in place under its etag, no temporary file is left.
    assert [p.name for p in (store.root / "parts" / rec.blob).iterdir()] == [f"p00001-{etag}"]
    assert (await store.parts_done(rec))[1].size == len(data)


async def test_a_cut_part_on_a_slow_disk_leaves_nothing(
    served: tuple[LocalBlobStore, TestServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, server = served
    rec = await new_blob(store, 2 << 20)
    (url,) = await store.put_urls(rec, [1], int(time.time()) + 60)
    real_open = open
    monkeypatch.setattr(local, "open", lambda *a, **k: SlowFile(real_open(*a, **k)), raising=False)
    host, port = server.host, server.port
    _reader, writer = await asyncio.open_connection(host, port)
    head = f"PUT {url.url} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {2 << 20}\r\n\r\n"
    # 1.5 of 2 MiB, then the sender is gone: a batch is being written when the cut is seen.
    writer.write(head.encode() + os.urandom(3 << 19))
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    deadline = time.monotonic() + 10
    parts_dir = store.root / "parts" / rec.blob
    while any(parts_dir.iterdir()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert list(parts_dir.iterdir()) == []
    assert await store.parts_done(rec) == {}


async def test_a_download_from_a_slow_disk_leaves_the_loop_free(
    served: tuple[LocalBlobStore, TestServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, server = served
    data = os.urandom(3 * local.CHUNK + 5)
    rec = await new_blob(store, len(data))
    (url,) = await store.put_urls(rec, [1], int(time.time()) + 60)
    status, etag = await put(server, url.url, data)
    assert status == 200
    await store.complete(rec, [(1, etag)])
    get_url = await store.get_url(rec, int(time.time()) + 60)
    monkeypatch.setattr(os, "pread", slowly(os.pread))
    monkeypatch.setattr(os, "sendfile", slowly(os.sendfile))

    async def download() -> bytes:
        async with aiohttp.ClientSession() as http, http.get(server.make_url(get_url)) as resp:
            assert resp.status == 200
            return await resp.read()

    fetch = asyncio.ensure_future(download())
    gap = await max_gap_during(fetch)
    assert fetch.result() == data
    assert gap < MAX_GAP, f"the event loop was held {gap:.3f} s during the download's reads"


async def stored_blob(store: LocalBlobStore, server: TestServer, data: bytes) -> str:
    """A complete blob of ``data``; its signed GET URL."""
    rec = await new_blob(store, len(data))
    (url,) = await store.put_urls(rec, [1], int(time.time()) + 60)
    status, etag = await put(server, url.url, data)
    assert status == 200
    await store.complete(rec, [(1, etag)])
    return await store.get_url(rec, int(time.time()) + 60)


async def get(server: TestServer, url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http, http.get(server.make_url(url), headers=headers) as resp:
        return resp.status, await resp.read()


def no_reads(*args: Any) -> Any:
    raise AssertionError("the download read the blob through Python")


async def test_a_download_on_plain_tcp_goes_by_sendfile(
    served: tuple[LocalBlobStore, TestServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, server = served
    data = os.urandom(5 * local.CHUNK + 7)
    url = await stored_blob(store, server, data)
    monkeypatch.setattr(os, "pread", no_reads)
    sent: list[int] = []
    real_sendfile = os.sendfile

    def counted(out: int, fd: int, offset: int, count: int) -> int:
        n = real_sendfile(out, fd, offset, count)
        sent.append(n)
        return n

    monkeypatch.setattr(os, "sendfile", counted)
    assert await get(server, url) == (200, data)
    assert sum(sent) == len(data)
    # a range goes the same way, and the connection's next answer is whole (no stray bytes)
    async with aiohttp.ClientSession() as http:
        for first, last in ((3, 3 * local.CHUNK), (len(data) - 10, len(data) - 1)):
            async with http.get(server.make_url(url), headers={"Range": f"bytes={first}-{last}"}) as resp:
                assert resp.status == 206
                assert await resp.read() == data[first : last + 1]


async def test_a_download_without_a_plain_socket_goes_in_chunks(
    served: tuple[LocalBlobStore, TestServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, server = served
    data = os.urandom(3 * local.CHUNK + 1)
    url = await stored_blob(store, server, data)
    monkeypatch.setattr(local, "_plain_socket", lambda transport: None)  # as under TLS
    monkeypatch.setattr(os, "sendfile", no_reads)
    assert await get(server, url) == (200, data)
    assert await get(server, url, {"Range": "bytes=-5"}) == (206, data[-5:])


async def test_a_slow_reader_gets_every_byte_by_sendfile(
    served: tuple[LocalBlobStore, TestServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The socket fills (the client does not read for a while): the sender waits
    for room on the loop, without a thread, and goes on where it stopped."""
    store, server = served
    data = os.urandom(8 << 20)
    url = await stored_blob(store, server, data)
    waits: list[int] = []
    real_writable = local._writable

    async def counted(loop: asyncio.AbstractEventLoop, sock: int) -> None:
        waits.append(sock)
        await real_writable(loop, sock)

    monkeypatch.setattr(local, "_writable", counted)
    monkeypatch.setattr(os, "pread", no_reads)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (server.host, server.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET {url} HTTP/1.1\r\nHost: {server.host}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    await asyncio.sleep(0.5)  # not reading: the server's socket fills
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == data
    assert waits, "the socket never filled: the test did not reach the wait"


@pytest.mark.parametrize("kernel_copy", ["whole", "refused", "stops", "stops once"])
async def test_parts_join_in_order_with_or_without_the_kernel_copy(
    served: tuple[LocalBlobStore, TestServer], monkeypatch: pytest.MonkeyPatch, kernel_copy: str
) -> None:
    """Several parts are joined by copy_file_range, or, where the file system
    refuses it (EXDEV, EINVAL, ...) at once or after some bytes, through a
    buffer from where it stopped; one part is renamed."""
    store, server = served
    real_copy = os.copy_file_range
    calls: list[int] = []

    def copy(src: int, dst: int, count: int, *args: Any) -> int:
        calls.append(count)
        if kernel_copy == "refused" or (kernel_copy == "stops" and len(calls) > 1):
            raise OSError(errno.EXDEV, "cross-device")
        if kernel_copy == "stops once":  # part 1 but its last 5 bytes, then part 1 by buffer, part 2 again
            if len(calls) == 1:
                count -= 5
            elif len(calls) == 2:
                raise OSError(errno.EINVAL, "not here")
        return real_copy(src, dst, min(count, 1000) if kernel_copy == "stops" else count, *args)

    monkeypatch.setattr(os, "copy_file_range", copy)
    part = LOCAL_MIN_PART
    data = os.urandom(2 * part + 5)
    rec = BlobRecord(secrets.token_hex(16), "alice", "file", len(data), part, PENDING, 0)
    await store.create(rec.blob)
    urls = await store.put_urls(rec, [1, 2, 3], int(time.time()) + 60)
    etags = []
    for url in urls:
        first = (url.part - 1) * part
        status, etag = await put(server, url.url, data[first : first + rec.part_length(url.part)])
        assert status == 200
        etags.append((url.part, etag))
    await store.complete(rec, etags)
    assert store.blob_path(rec.blob).read_bytes() == data
    assert not (store.root / "parts" / rec.blob).exists()
    assert [p.name for p in store.blob_path(rec.blob).parent.iterdir()] == [rec.blob]  # no temporary file
