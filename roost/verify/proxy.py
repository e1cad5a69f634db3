"""A TCP proxy between the checker's clients and one gateway, with faults on demand.

The clients of ``roost verify`` connect to the proxy, never to the gateway,
so the checker can break their connections the ways networks do:

* ``cut``: the next chunk of bytes in either direction is forwarded only in
  part, then both sides are aborted: the receiver holds a torn WebSocket
  frame. An idle link is aborted after a short wait instead.
* ``blackhole``: nothing moves in either direction for a while (bytes stay
  queued, as in a partition where TCP keeps retransmitting), and new
  connections hang too when the whole proxy is blackholed. When it ends the
  link either resumes, with everything delivered late and in order, or is
  aborted, as a connection that timed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

CHUNK = 64 * 1024
IDLE_CUT_AFTER = 0.3  # seconds a cut waits for traffic before aborting an idle link


class Link:
    """One client connection and its upstream twin."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.cut_pending = False
        self.closed = False

    def abort(self) -> None:
        self.closed = True
        self.flowing.set()  # wake the pumps so they notice
        for writer in (self.client, self.upstream):
            if writer is not None and writer.transport is not None:
                writer.transport.abort()


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.links: set[Link] = set()
        self.open = asyncio.Event()  # cleared while the whole proxy is blackholed
        self.open.set()
        self.server: asyncio.Server | None = None
        self.port = 0
        self.counts = {"cut": 0, "blackholed": 0, "resumed": 0, "timed_out": 0}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for link in list(self.links):
            link.abort()
        if self.server is not None:
            with contextlib.suppress(Exception):
                await self.server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = Link(writer)
        self.links.add(link)
        try:
            await self.open.wait()  # a blackholed proxy leaves new connections hanging
            try:
                up_reader, link.upstream = await asyncio.open_connection(*self.upstream)
            except OSError:
                return  # gateway down: the client sees the connection close
            await asyncio.gather(self._pump(link, reader, link.upstream), self._pump(link, up_reader, writer))
        finally:
            self.links.discard(link)
            link.abort()

    async def _pump(self, link: Link, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while not link.closed:
                data = await src.read(CHUNK)
                if not data:
                    break
                await link.flowing.wait()
                if link.closed:
                    break
                if link.cut_pending:
                    dst.write(data[: max(1, len(data) // 2)])  # a torn frame, then nothing
                    link.abort()
                    break
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            link.abort()

    def cut(self, rng: random.Random, fraction: float) -> int:
        """Tear some live links mid-frame. Returns how many were chosen."""
        chosen = self._choose(rng, fraction)
        for link in chosen:
            link.cut_pending = True
            asyncio.get_running_loop().call_later(IDLE_CUT_AFTER, link.abort)
        self.counts["cut"] += len(chosen)
        return len(chosen)

    async def blackhole(self, rng: random.Random, fraction: float, seconds: float, whole: bool) -> int:
        """Stall some links (or everything, new connections included) for ``seconds``."""
        chosen = list(self.links) if whole else self._choose(rng, fraction)
        if whole:
            self.open.clear()
        for link in chosen:
            link.flowing.clear()
        self.counts["blackholed"] += len(chosen)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.open.set()
            for link in chosen:
                if rng.random() < 0.5:
                    self.counts["resumed"] += 1
                    link.flowing.set()
                else:
                    self.counts["timed_out"] += 1
                    link.abort()
        return len(chosen)

    def _choose(self, rng: random.Random, fraction: float) -> list[Link]:
        live = sorted((link for link in self.links if not link.closed), key=id)
        if not live:
            return []
        return rng.sample(live, k=max(1, round(len(live) * fraction)))
