"""The local web server of ``roost app``: the UI files and one WebSocket, on loopback only.

Every request passes ``Guard`` (the run's secret, Host and Origin checks) in
a middleware before any handler runs; a refused request gets 403 and a line
saying why, and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import socket
import uuid
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import WSMsgType, web

from roost.app.bridge import AppBridge, CommandError
from roost.app.guard import SECRET_PARAM, Guard, new_secret
from roost.client import Client, InvalidArgument, RoostError
from roost.client.attachments import safe_file_name

log = logging.getLogger("roost.app")

STATIC_FILES = {
    "app.js": "text/javascript",
    "dom.js": "text/javascript",
    "style.css": "text/css",
}
MAX_FRAME = 1024 * 1024  # a command (a text message is at most 64 KiB); files come by POST /upload
# The largest file the page may hand over: the media server's largest limit
# (video, audio, files: 100 MiB by default). A server with lower limits
# refuses the upload, and the message shows as not sent.
MAX_UPLOAD_BYTES = 100 * 1024 * 1024
UPLOAD_CHUNK = 1024 * 1024
# Shown in the page (images, players); any other type is offered as a download
# (never rendered by the app's origin: no HTML, no SVG, no PDF).
INLINE_TYPES = {
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "audio/wav",
    "audio/x-wav",
    "audio/wave",
    "audio/mpeg",
    "audio/ogg",
    "audio/webm",
    "audio/mp4",
    "audio/aac",
    "video/mp4",
    "video/webm",
    "video/ogg",
}
MAX_COMMANDS_IN_FLIGHT = 32  # per page socket; more are answered "busy"


def _static(name: str) -> bytes:
    return resources.files("roost.app").joinpath("static", name).read_bytes()


class AppServer:
    """Serves one ``Client`` to the pages of this machine's browser."""

    def __init__(self, client: Client, *, secret: str | None = None) -> None:
        self.client = client
        self.secret = secret or new_secret()
        self.bridge = AppBridge(client, self.broadcast)
        self.pages: set[_Page] = set()
        self.guard: Guard | None = None
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def url(self) -> str:
        """The URL that opens the app (with the secret: give it to no one)."""
        return f"http://127.0.0.1:{self.port}/?{SECRET_PARAM}={self.secret}"

    # -- lifecycle --------------------------------------------------------------

    async def start(self, port: int = 0) -> None:
        """Listen on 127.0.0.1 (a random port by default) and start relaying;
        the SDK client connects in the background, so the UI is there offline too."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        self.port = sock.getsockname()[1]
        self.guard = Guard(self.secret, self.port)
        app = web.Application(middlewares=[self._guard_middleware], client_max_size=MAX_FRAME)
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{name}", self._file)
        app.router.add_get("/ws", self._websocket)
        app.router.add_get("/media/{conv}/{seq}", self._media)
        app.router.add_post("/upload", self._upload)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        self._tasks.append(asyncio.create_task(self.bridge.pump()))
        self._tasks.append(asyncio.create_task(self._connect()))

    async def _connect(self) -> None:
        try:
            await self.client.connect(timeout=None)  # retries until connected or refused for good
        except asyncio.CancelledError:
            raise
        except RoostError as exc:
            self._gave_up(f"{exc.code}: {exc.message}")
        except Exception as exc:
            self._gave_up(repr(exc))

    def _gave_up(self, reason: str) -> None:
        """The client will not connect (a refused token, a replaced session)."""
        self.bridge.stop(reason)
        self.broadcast({"type": "connection", "state": "offline", "detail": reason, "me": None})

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for page in list(self.pages):
            with contextlib.suppress(Exception):
                await page.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.client.flush(), 2.0)
        await self.client.close()

    # -- requests -----------------------------------------------------------------

    @web.middleware
    async def _guard_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        assert self.guard is not None
        why = self.guard.refusal(
            host=request.headers.get("Host"),
            origin=request.headers.get("Origin"),
            cookies=request.cookies,
            query_secret=request.query.get(SECRET_PARAM) if request.path == "/" else None,
            websocket=request.path == "/ws",
            changes=request.method not in ("GET", "HEAD"),
        )
        if why is not None:
            log.warning("refused %s %s: %s", request.method, request.path, why)
            return web.Response(status=403, text=f"roost app: {why}\n")
        response: web.StreamResponse = await handler(request)
        self._secure_headers(response)
        return response

    def _secure_headers(self, response: web.StreamResponse) -> None:
        if response.prepared:  # the WebSocket
            return
        ws_origins = f"ws://127.0.0.1:{self.port} ws://localhost:{self.port}"
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:;"
            " media-src 'self';"
            f" connect-src 'self' {ws_origins}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"

    async def _index(self, request: web.Request) -> web.Response:
        assert self.guard is not None
        response = web.Response(body=_static("index.html"), content_type="text/html", charset="utf-8")
        if SECRET_PARAM in request.query:
            # The first load: from now on the cookie carries the secret (the
            # page then drops it from the address bar).
            response.set_cookie(self.guard.cookie, self.secret, path="/", httponly=True, samesite="Strict")
        return response

    async def _file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        content_type = STATIC_FILES.get(name)
        if content_type is None:
            raise web.HTTPNotFound()
        return web.Response(body=_static(name), content_type=content_type, charset="utf-8")

    async def _media(self, request: web.Request) -> web.StreamResponse:
        """A received or sent file, decrypted (downloaded once); images inline, the rest as downloads."""
        conv = request.match_info["conv"]
        try:
            seq = int(request.match_info["seq"])
            path, content_type = await self.bridge.file_of(conv, seq, self._media_cache())
        except (ValueError, CommandError, RoostError, OSError) as exc:
            raise web.HTTPNotFound(text=f"no such file: {exc}") from None
        inline = content_type in INLINE_TYPES
        response = web.FileResponse(path)
        response.content_type = content_type if inline else "application/octet-stream"
        if not inline:
            response.headers["Content-Disposition"] = f"attachment; filename*=UTF-8''{quote(path.name)}"
        return response

    async def _upload(self, request: web.Request) -> web.Response:
        """A file the page hands over to send (``POST /upload?conv=C&name=N``,
        the raw bytes as the body): streamed to a temp file in the state's
        media folder, never held whole, then given to the SDK's ``send_file``
        (which keeps its own encrypted copy). The reply: the pending message."""
        name = safe_file_name(request.query.get("name", ""), "file")
        if request.content_length is not None and request.content_length > MAX_UPLOAD_BYTES:
            return _upload_error(413, f"a file may have at most {MAX_UPLOAD_BYTES // (1024 * 1024)} MiB")
        folder = self.client.media_folder() / "app-outgoing" / uuid.uuid4().hex
        folder.mkdir(parents=True)
        try:
            source = folder / name
            size = await _receive(request, source)
            if size is None:
                return _upload_error(413, f"a file may have at most {MAX_UPLOAD_BYTES // (1024 * 1024)} MiB")
            if size == 0:
                return _upload_error(400, "the file is empty")
            reply = await self.bridge.send_file_at(request.query.get("conv"), source)
        except (CommandError, InvalidArgument) as exc:
            return _upload_error(400, str(exc))
        except RoostError as exc:
            return _upload_error(502, f"{exc.code}: {exc.message}")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return web.json_response({"ok": True, **reply})

    def _media_cache(self) -> Path:
        return self.client.media_folder() / "app-downloads"

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME, heartbeat=30.0)
        await ws.prepare(request)
        page = _Page(ws)
        page.put(self.bridge.snapshot())
        self.pages.add(page)
        writer = asyncio.create_task(page.write_loop())
        in_flight: set[asyncio.Task[None]] = set()
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    break
                if len(in_flight) >= MAX_COMMANDS_IN_FLIGHT:
                    page.put({"type": "reply", "ok": False, "error": "busy"})
                    continue
                task = asyncio.create_task(self._command(page, msg.data))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
        finally:
            self.pages.discard(page)
            for task in [*in_flight, writer]:
                task.cancel()
            await asyncio.gather(*in_flight, writer, return_exceptions=True)
        return ws

    async def _command(self, page: _Page, data: str) -> None:
        try:
            request = json.loads(data)
        except ValueError:
            request = None
        if not isinstance(request, dict):
            page.put({"type": "reply", "ref": None, "ok": False, "error": "a command is a JSON object"})
            return
        reply = await self.bridge.command(request)
        page.put({"type": "reply", "ref": request.get("ref"), **reply})

    def broadcast(self, event: dict[str, Any]) -> None:
        for page in list(self.pages):
            page.put(event)


async def _receive(request: web.Request, dest: Path) -> int | None:
    """Write the request body to ``dest`` a chunk at a time; its size, or
    None if it went over ``MAX_UPLOAD_BYTES`` (the rest is not read)."""
    size = 0
    with open(dest, "wb") as out:
        async for chunk in request.content.iter_chunked(UPLOAD_CHUNK):
            size += len(chunk)
            if size > MAX_UPLOAD_BYTES:
                return None
            out.write(chunk)
    return size


def _upload_error(status: int, error: str) -> web.Response:
    return web.json_response({"ok": False, "error": error}, status=status)


class _Page:
    """One page's socket; one writer, so events leave in the order they happened."""

    QUEUE_MAX = 10_000  # a page that reads nothing for this long is dropped (it reloads and resyncs)

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.queue: asyncio.Queue[str] = asyncio.Queue(self.QUEUE_MAX)
        self.overflowed = False

    def put(self, event: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(json.dumps(event))
        except asyncio.QueueFull:
            self.overflowed = True  # the writer closes the socket

    async def write_loop(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while not self.overflowed:
                await self.ws.send_str(await self.queue.get())
            await self.ws.close(message=b"too slow: reload")
