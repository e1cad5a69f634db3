"""Blobs on local disk, uploaded and downloaded through the gateway's HTTP server.

Layout under ``root``::

    parts/<blob>/p00001-<etag>  an uploaded part (its etag in the name: 32 hex digits
                                of a hash of its bytes)
    parts/<blob>/.tmp-...       a part being received
    blobs/<ab>/<blob>           a complete blob (parts joined)

Routes (``add_routes``), each authorized by a signed URL (roost/media/signing.py)
and no database read, so they cost the chat path nothing:

* ``PUT /media/{blob}/{part}?size=&exp=&sig=`` -- the part's exact bytes. They go
  to a temporary file; only when exactly ``size`` bytes arrived is it fsynced
  and renamed into place. A wrong signature, method, size or an expired URL is
  refused with 403 before anything is written.
* ``GET /media/{blob}?size=&exp=&sig=`` -- the blob, one Range allowed (206),
  with an ETag and a Cache-Control that lets a CDN or an nginx cache keep it
  until the URL expires (the bytes are ciphertext and never change). On plain
  TCP the body goes by ``sendfile`` from an I/O thread (page cache to socket,
  no pass through Python); under TLS it is read and written in chunks.

Every disk operation of the routes (open, write, fsync, rename, read) runs on
the store's own few I/O threads, never on the event loop: the chat path shares
that loop, and a write into a full page cache, an fsync or a read from a cold
disk can take a long time. A request whose disk work waits its turn reads no
more of its socket meanwhile, so TCP slows its sender.

A download holds the file open from the start; the sweeper does not delete a
blob while a download of it runs here (``delete`` answers False and the next
sweep retries), and an unlink would not cut an open file anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar, TypeVarTuple, Unpack, cast

from aiohttp import web

from roost.media import signing
from roost.media.base import PartUrl, StoredPart, check_parts
from roost.media.config import LOCAL_MIN_PART
from roost.store.blobmeta import BlobRecord

log = logging.getLogger("roost.media")

CHUNK = 256 * 1024
SENDFILE_SLICE = 4 * 1024 * 1024  # the most one I/O thread call sends (threads are shared)
WRITE_BATCH = 1024 * 1024  # received bytes handed to an I/O thread at once
IO_THREADS = 4  # disk operations of the media routes at once (per gateway)
T = TypeVar("T")
Ts = TypeVarTuple("Ts")
_PART_NAME = re.compile(r"^p(\d{5})-([0-9a-f]{32})$")
_BLOB = r"[0-9a-f]{32}"
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def load_or_make_key(path: Path) -> bytes:
    """The signing key at ``path``: 32 random bytes, made (mode 0600) if absent."""
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_bytes(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return load_or_make_key(path)
        with os.fdopen(fd, "wb") as out:
            out.write(key)
            out.flush()
            os.fsync(out.fileno())
        return key
    if len(key) < 32:
        raise ValueError(f"{path}: a media key needs at least 32 bytes")
    return key


def _sha_in_hardware() -> bool:
    """Whether the CPU computes SHA-256 itself (x86 SHA-NI, Arm SHA2): then it is the
    cheapest 128-bit hash at hand (~0.6 ms/MiB against MD5's 1.5 and BLAKE2b's 1.0)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    words = line.partition(":")[2].split()
                    return "sha_ni" in words or "sha2" in words
    except OSError:
        pass
    return False


class Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def digest(self) -> bytes: ...


def _part_hash() -> Callable[[], Digest]:
    """What a part's etag hashes with. An etag is opaque to clients (they echo
    the one a PUT answered), so parts of different hashes may meet in one blob."""
    if _sha_in_hardware():
        return hashlib.sha256
    return lambda: hashlib.blake2b(digest_size=16)


PART_HASH = _part_hash()


def etag_of(digest: Digest) -> str:
    return digest.digest()[:16].hex()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _PartFile:
    """A part being received: a temporary file and the hash of its bytes (its etag).

    Its methods block (disk I/O) and run on the store's I/O threads; a lock
    orders them, as two may run on two threads (a write, then the discard of
    a cut request)."""

    def __init__(self, parts_dir: Path, part: int) -> None:
        self.parts_dir = parts_dir
        self.part = part
        self.tmp = parts_dir / f".tmp-{part}-{secrets.token_hex(6)}"
        self._lock = threading.Lock()
        self._digest = PART_HASH()
        # Open across calls (closed by ``finish`` or ``discard``); FileNotFoundError: the upload is gone.
        self._out = open(self.tmp, "xb")  # noqa: SIM115

    def write(self, chunks: list[bytes]) -> None:
        with self._lock:
            for chunk in chunks:
                self._out.write(chunk)
                self._digest.update(chunk)

    def finish(self) -> str:
        """fsync, close and rename into place (dropping an earlier upload of the part); the etag."""
        with self._lock:
            self._out.flush()
            os.fsync(self._out.fileno())
            self._out.close()
            etag = etag_of(self._digest)
            name = f"p{self.part:05d}-{etag}"
            os.rename(self.tmp, self.parts_dir / name)
            for entry in os.scandir(self.parts_dir):  # an earlier upload of the same part, other bytes
                if entry.name.startswith(f"p{self.part:05d}-") and entry.name != name:
                    os.unlink(entry.path)
            _fsync_dir(self.parts_dir)
            return etag

    def discard(self) -> None:
        """Close and remove the temporary file (nothing, once ``finish`` renamed it)."""
        with self._lock:
            self._out.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)


def _open_blob(path: Path) -> tuple[int, int] | None:
    """(fd, size) of a complete blob; None if there is none."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    return fd, os.fstat(fd).st_size


class LocalBlobStore:
    min_part_size = LOCAL_MIN_PART

    def __init__(
        self, root: Path, key: bytes | Path, public_url: str = "", clock: Callable[[], float] = time.time
    ) -> None:
        """``key``: the signing key, or the file holding it (made at ``start`` if absent)."""
        self.root = root
        self._key_source = key
        self.key = key if isinstance(key, bytes) else b""
        self.public_url = public_url.rstrip("/")
        self.clock = clock
        self.downloads: Counter[str] = Counter()  # blob -> downloads running now
        self._completing: dict[str, asyncio.Lock] = {}  # one join per blob at a time
        self._completers: Counter[str] = Counter()  # blob -> blob_complete calls under way
        # The routes' disk work, off the event loop (the chat path shares it),
        # and bounded: a burst of uploads queues here rather than taking every thread.
        self._io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="roost-media-io")

    def _run(self, fn: Callable[[Unpack[Ts]], T], *args: *Ts) -> asyncio.Future[T]:
        """``fn(*args)`` on an I/O thread."""
        return asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    async def start(self) -> None:
        if isinstance(self._key_source, Path):
            self.key = load_or_make_key(self._key_source)
        for sub in ("parts", "blobs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    async def close(self) -> None:
        # Work already running finishes on its thread (a part is renamed only when whole).
        self._io.shutdown(wait=False, cancel_futures=True)

    # -- paths ----------------------------------------------------------------

    def _parts_dir(self, blob: str) -> Path:
        return self.root / "parts" / blob

    def blob_path(self, blob: str) -> Path:
        return self.root / "blobs" / blob[:2] / blob

    def _url(self, path: str) -> str:
        return f"{self.public_url}{path}"

    # -- BlobStore -------------------------------------------------------------

    async def create(self, blob: str) -> str:
        await self._run(self._make_parts_dir, blob)
        return ""

    def _make_parts_dir(self, blob: str) -> None:
        self._parts_dir(blob).mkdir(parents=True, exist_ok=False)

    async def put_urls(self, rec: BlobRecord, parts: list[int], expires: int) -> list[PartUrl]:
        urls = []
        for part in parts:
            size = rec.part_length(part)
            sig = signing.sign(self.key, "PUT", rec.blob, part, size, expires)
            urls.append(
                PartUrl(part, self._url(f"/media/{rec.blob}/{part}?size={size}&exp={expires}&sig={sig}"), {})
            )
        return urls

    async def parts_done(self, rec: BlobRecord) -> dict[int, StoredPart]:
        return await self._run(self._list_parts, rec.blob)

    def _list_parts(self, blob: str) -> dict[int, StoredPart]:
        found: dict[int, StoredPart] = {}
        try:
            entries = list(os.scandir(self._parts_dir(blob)))
        except FileNotFoundError:
            return found
        for entry in entries:
            match = _PART_NAME.match(entry.name)
            if match is not None:
                part = int(match.group(1))
                found[part] = StoredPart(part, match.group(2), entry.stat().st_size)
        return found

    async def complete(self, rec: BlobRecord, parts: list[tuple[int, str]]) -> None:
        lock = self._completing.setdefault(rec.blob, asyncio.Lock())
        self._completers[rec.blob] += 1
        try:
            async with lock:  # a repeated blob_complete waits for the first, then finds the blob
                if await self._run(self.blob_path(rec.blob).exists):
                    return  # completed before (a retried blob_complete)
                stored = await self.parts_done(rec)
                check_parts(rec, stored, parts)
                await self._run(self._join, rec, stored)
        finally:
            self._completers[rec.blob] -= 1
            if self._completers[rec.blob] <= 0:
                del self._completers[rec.blob]
                self._completing.pop(rec.blob, None)

    def _join(self, rec: BlobRecord, stored: dict[int, StoredPart]) -> None:
        """Concatenate the parts into a temporary file, fsync, rename, drop the parts.

        One part is the blob already (fsynced when it arrived): it is renamed.
        Several are copied by the kernel (copy_file_range: no pass through
        this process, a reflink on file systems that share extents)."""
        final = self.blob_path(rec.blob)
        final.parent.mkdir(parents=True, exist_ok=True)
        parts_dir = self._parts_dir(rec.blob)
        names = [parts_dir / f"p{part:05d}-{stored[part].etag}" for part in range(1, rec.parts + 1)]
        if len(names) == 1:
            os.rename(names[0], final)
            _fsync_dir(final.parent)
            shutil.rmtree(parts_dir, ignore_errors=True)
            return
        tmp = final.parent / f".tmp-{rec.blob}-{secrets.token_hex(4)}"
        try:
            with open(tmp, "wb") as out:
                for name in names:
                    with open(name, "rb") as src:
                        _copy_all(src, out)
                out.flush()
                os.fsync(out.fileno())
            os.rename(tmp, final)
            _fsync_dir(final.parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        shutil.rmtree(parts_dir, ignore_errors=True)

    async def get_url(self, rec: BlobRecord, expires: int) -> str:
        sig = signing.sign(self.key, "GET", rec.blob, 0, rec.size, expires)
        return self._url(f"/media/{rec.blob}?size={rec.size}&exp={expires}&sig={sig}")

    async def delete(self, rec: BlobRecord) -> bool:
        if self.downloads[rec.blob] > 0:
            return False  # a download holds it: the next sweep deletes it
        await self._run(self._remove, rec.blob)
        return True

    def _remove(self, blob: str) -> None:
        shutil.rmtree(self._parts_dir(blob), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.blob_path(blob))

    async def raw(self, rec: BlobRecord) -> bytes | None:
        try:
            return await self._run(self.blob_path(rec.blob).read_bytes)
        except FileNotFoundError:
            return None

    # -- HTTP -------------------------------------------------------------------

    def add_routes(self, app: web.Application, on_authorized: Callable[[web.Request], None]) -> None:
        """Serve the signed URLs on ``app``; ``on_authorized(request)`` runs once a
        request's signature checks out (the gateway lifts its handshake deadline)."""
        self._on_authorized = on_authorized
        app.router.add_put(f"/media/{{blob:{_BLOB}}}/{{part:\\d{{1,5}}}}", self.handle_put)
        app.router.add_get(f"/media/{{blob:{_BLOB}}}", self.handle_get)

    def _signed(self, request: web.Request, method: str, part: int) -> tuple[str, int] | None:
        """(blob, size) if the request's URL is signed for ``method`` and ``part``."""
        blob = request.match_info["blob"]
        query = request.query
        try:
            size, expires, sig = int(query["size"]), int(query["exp"]), query["sig"]
        except (KeyError, ValueError):
            return None
        if not signing.verify(self.key, sig, method, blob, part, size, expires, self.clock()):
            return None
        return blob, size

    async def handle_put(self, request: web.Request) -> web.StreamResponse:
        part = int(request.match_info["part"])
        signed = self._signed(request, "PUT", part)
        if signed is None:
            return web.Response(status=403, text="bad or expired signature\n")
        blob, size = signed
        # The size is signed: a body of any other length is refused before a byte is stored.
        if request.content_length != size:
            return web.Response(status=403, text=f"Content-Length must be {size}\n")
        self._on_authorized(request)
        try:
            sink = await self._run(_PartFile, self._parts_dir(blob), part)
        except FileNotFoundError:
            return web.Response(status=404, text="no such upload (completed or expired)\n")
        try:
            etag = await self._receive(request, sink, size)
        finally:
            # Shielded: a cancelled request still waits for its file to be closed and removed.
            await asyncio.shield(self._run(sink.discard))
        if etag is None:
            return web.Response(status=400, text=f"the body was not {size} bytes\n")
        return web.Response(status=200, headers={"ETag": f'"{etag}"'})

    async def _receive(self, request: web.Request, sink: _PartFile, size: int) -> str | None:
        """Write the body to ``sink``'s temporary file; fsync and rename it once
        exactly ``size`` bytes arrived. The part's etag, None if the body was cut.

        The loop only gathers the body: every WRITE_BATCH bytes go to an I/O
        thread, which writes them while the loop reads the next ones (one
        batch in flight per request bounds its memory to two batches)."""
        received = 0
        batch: list[bytes] = []
        batched = 0
        writing: asyncio.Future[None] | None = None
        try:
            async for chunk in request.content.iter_chunked(CHUNK):
                received += len(chunk)
                if received > size:
                    return None
                batch.append(chunk)
                batched += len(chunk)
                if batched >= WRITE_BATCH:
                    if writing is not None:
                        await writing
                    writing = self._run(sink.write, batch)
                    batch, batched = [], 0
            if received != size:
                return None
            if writing is not None:
                await writing
                writing = None
            await self._run(sink.write, batch)
            return await self._run(sink.finish)
        finally:
            if writing is not None:  # cut or failed: let the write end before the discard
                with contextlib.suppress(BaseException):
                    await asyncio.shield(writing)

    async def handle_get(self, request: web.Request) -> web.StreamResponse:
        signed = self._signed(request, "GET", 0)
        if signed is None:
            return web.Response(status=403, text="bad or expired signature\n")
        blob, _size = signed
        self._on_authorized(request)
        self.downloads[blob] += 1  # before the open: the sweeper waits from here
        try:
            opened = await self._run(_open_blob, self.blob_path(blob))
            if opened is None:
                return web.Response(status=404, text="no such blob\n")
            fd, total = opened
            try:
                return await self._send(request, blob, fd, total)
            finally:
                os.close(fd)
        finally:
            self.downloads[blob] -= 1
            if self.downloads[blob] <= 0:
                del self.downloads[blob]

    async def _send(self, request: web.Request, blob: str, fd: int, total: int) -> web.StreamResponse:
        expires = int(request.query["exp"])
        headers = {
            "ETag": f'"{blob}"',
            # Ciphertext that never changes: any cache may keep it while the URL is valid.
            "Cache-Control": f"public, max-age={max(0, expires - int(self.clock()))}, immutable",
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if request.headers.get("If-None-Match") == headers["ETag"]:
            return web.Response(status=304, headers=headers)
        span = parse_range(request.headers.get("Range"), total)
        if isinstance(span, str):  # unsatisfiable
            headers["Content-Range"] = f"bytes */{total}"
            return web.Response(status=416, headers=headers)
        start, end = (0, total - 1) if span is None else span
        status = 200
        if span is not None:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = end - start + 1
        await response.prepare(request)
        if request.method == "HEAD":  # headers only (a body would corrupt a kept-alive connection)
            await response.write_eof()
            return response
        await self._stream(request, response, fd, start, end)
        await response.write_eof()
        return response

    async def _stream(
        self, request: web.Request, response: web.StreamResponse, fd: int, start: int, end: int
    ) -> None:
        """Bytes ``start``..``end`` of ``fd`` to ``response``, read on an I/O
        thread: the next chunk is read while the current one is sent."""
        transport = request.transport
        sock = _plain_socket(transport)
        if sock is not None and transport is not None:
            await self._sendfile(transport, sock, fd, start, end)
            return
        pos = start
        reading = self._run(os.pread, fd, min(CHUNK, end + 1 - pos), pos)
        try:
            while True:
                chunk = await reading
                pos += len(chunk)
                if not chunk or pos > end:
                    break
                reading = self._run(os.pread, fd, min(CHUNK, end + 1 - pos), pos)
                await response.write(chunk)
            if chunk:
                await response.write(chunk)
        finally:
            # The caller closes ``fd``: a read still running must end first.
            with contextlib.suppress(BaseException):
                await asyncio.shield(reading)

    async def _sendfile(
        self, transport: asyncio.BaseTransport, sock: int, fd: int, start: int, end: int
    ) -> None:
        """Bytes ``start``..``end`` of ``fd`` straight to the connection's socket.

        The kernel reads the file (on an I/O thread: a cold disk blocks that
        thread, not the loop) and writes the socket, past the transport, which
        must have sent everything it holds first (the headers). A duplicate of
        the socket's descriptor is used: the connection may close meanwhile and
        its descriptor number be reused, the duplicate still names this socket.
        When the socket is full the loop waits until it can take more."""
        writer = cast(asyncio.WriteTransport, transport)  # uvloop's is one without the class
        while writer.get_write_buffer_size():
            if writer.is_closing():
                raise ConnectionResetError("the connection closed")
            await asyncio.sleep(0.001)
        loop = asyncio.get_running_loop()
        out = os.dup(sock)
        sending: asyncio.Future[int] | None = None
        try:
            pos = start
            while pos <= end:
                want = min(SENDFILE_SLICE, end + 1 - pos)
                sending = self._run(_send_some, out, fd, pos, want)
                sent = await sending
                sending = None
                pos += sent
                if sent < want:
                    await _writable(loop, out)
        finally:
            if sending is not None:  # cancelled: the thread must be done with both descriptors
                with contextlib.suppress(BaseException):
                    await asyncio.shield(sending)
            os.close(out)


def _copy_all(src: BinaryIO, out: BinaryIO) -> None:
    """Append all of ``src`` to ``out``: in the kernel when it can, else through a buffer."""
    left = os.fstat(src.fileno()).st_size
    out.flush()
    try:
        while left > 0:
            copied = os.copy_file_range(src.fileno(), out.fileno(), left)
            if copied == 0:
                raise OSError(f"{src.name}: shorter than it was")
            left -= copied
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
        # On from where the kernel stopped: it moved both descriptors' positions,
        # and neither file's Python buffer holds anything (``out`` was flushed).
        shutil.copyfileobj(src, out, CHUNK)


def _plain_socket(transport: asyncio.BaseTransport | None) -> int | None:
    """The descriptor of a plain-TCP connection's socket; None under TLS or without one."""
    if transport is None or transport.is_closing():
        return None
    if (
        transport.get_extra_info("sslcontext") is not None
        or transport.get_extra_info("ssl_object") is not None
    ):
        return None
    sock = transport.get_extra_info("socket")
    try:
        return int(sock.fileno()) if sock is not None else None
    except (OSError, ValueError):
        return None


def _send_some(sock: int, fd: int, offset: int, count: int) -> int:
    """``os.sendfile`` until ``count`` bytes went or the socket is full; the bytes sent."""
    sent = 0
    while sent < count:
        try:
            n = os.sendfile(sock, fd, offset + sent, count - sent)
        except BlockingIOError:
            break
        if n == 0:
            raise OSError(f"the blob ended before byte {offset + sent}")
        sent += n
    return sent


async def _writable(loop: asyncio.AbstractEventLoop, sock: int) -> None:
    """Until the socket ``sock`` (a descriptor of this process only) can take more bytes."""
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(sock, wake)
    try:
        await ready
    finally:
        loop.remove_writer(sock)


def parse_range(header: str | None, total: int) -> tuple[int, int] | str | None:
    """One ``bytes=a-b`` range -> (first, last) inclusive; None: the whole blob;
    "unsatisfiable": a range outside it. Several ranges: served whole."""
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None  # several ranges or another unit: RFC 9110 lets us send it all
    first, last = match.group(1), match.group(2)
    if not first:
        if not last or int(last) == 0:
            return "unsatisfiable"
        length = min(int(last), total)
        return (total - length, total - 1) if total else "unsatisfiable"
    start = int(first)
    end = min(int(last), total - 1) if last else total - 1
    if start >= total or end < start:
        return "unsatisfiable"
    return start, end
