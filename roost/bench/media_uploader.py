"""The upload side of ``roost bench media``'s chat phase, in a process of its own.

Run as ``python -m roost.bench.media_uploader`` by ``roost.bench.pool.WorkerPool``
(one JSON command per line on stdin, one reply per line on stdout), possibly
under ``roost.bench.priority``: its clients upload one file again and again
between ``start`` and ``stop``, all on one event loop. Being its own process,
its CPU priority can be set apart from the load generator that measures the chat.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from roost.bench.worker import main
from roost.client import Client


class Uploader:
    def __init__(self) -> None:
        self.clients: list[Client] = []
        self.stop = asyncio.Event()
        self.loops: list[asyncio.Task[tuple[int, float]]] = []

    async def cmd_connect(self, url: str, tokens: list[str], state_dir: str) -> dict[str, Any]:
        for i, token in enumerate(tokens):
            client = Client(url, token, state_path=Path(state_dir) / f"upl{i}.state", serve_local=False)
            await client.connect()
            self.clients.append(client)
        return {"pid": os.getpid(), "clients": len(self.clients)}

    async def cmd_start(self, blob: str) -> dict[str, Any]:
        """Every client uploads ``blob`` back to back until ``stop``."""
        self.stop.clear()
        self.loops = [asyncio.create_task(upload_loop(c, Path(blob), self.stop)) for c in self.clients]
        return {"ok": True}

    async def cmd_stop(self) -> dict[str, Any]:
        """Let each client finish its current upload; (uploads finished, seconds) per client."""
        self.stop.set()
        done = await asyncio.gather(*self.loops)
        self.loops = []
        return {"uploads": [n for n, _ in done], "seconds": [s for _, s in done]}

    async def cmd_close_all(self) -> dict[str, Any]:
        self.stop.set()
        for task in self.loops:
            task.cancel()
        await asyncio.gather(*self.loops, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in self.clients))
        self.clients = []
        return {"ok": True}


async def upload_loop(client: Client, blob_path: Path, stop: asyncio.Event) -> tuple[int, float]:
    """Upload ``blob_path`` again and again until ``stop``; (uploads finished, seconds)."""
    t0 = time.perf_counter()
    count = 0
    while not stop.is_set():
        await client.upload_blob(blob_path, kind="video")
        count += 1
    return count, time.perf_counter() - t0


if __name__ == "__main__":
    main(Uploader)
