"""The parent side of the load generator: N ``roost.bench.worker`` processes.

``call(i, cmd, **args)`` sends one JSON command to worker ``i`` and returns
its JSON reply; ``all(cmd, [args per worker])`` does it for every worker at
once. A worker reply with ``error`` raises ``WorkerError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import msgspec

from roost.bench.cli import SATURATED_PCT

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class WorkerError(RuntimeError):
    pass


class WorkerPool:
    def __init__(self, count: int, module: str = "roost.bench.worker", prefix: Sequence[str] = ()) -> None:
        self.count = max(1, count)
        self.module = module  # what the processes run (``python -m``)
        self.prefix = list(prefix)  # runs them (e.g. ``roost.bench.priority.wrap``), which must exec them
        self.procs: list[asyncio.subprocess.Process] = []
        self._locks: list[asyncio.Lock] = []

    async def start(self) -> WorkerPool:
        for _ in range(self.count):
            proc = await asyncio.create_subprocess_exec(
                *self.prefix, sys.executable, "-m", self.module,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, limit=1 << 30,
            )  # fmt: skip
            self.procs.append(proc)
            self._locks.append(asyncio.Lock())
        return self

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    async def call(self, i: int, cmd: str, **args: Any) -> dict[str, Any]:
        proc = self.procs[i]
        assert proc.stdin is not None and proc.stdout is not None
        async with self._locks[i]:
            proc.stdin.write(_encode({"cmd": cmd, **args}) + b"\n")
            await proc.stdin.drain()
            line = await proc.stdout.readline()
        if not line:
            raise WorkerError(f"worker {i} (pid {proc.pid}) exited during {cmd!r}")
        reply: dict[str, Any] = _decode(line)
        if "error" in reply:
            raise WorkerError(f"worker {i} {cmd}: {reply['error']}")
        return reply

    async def all(
        self, cmd: str, args: Sequence[dict[str, Any] | None] | None = None
    ) -> list[dict[str, Any]]:
        """``cmd`` on every worker at once, with its own arguments (None: skip that worker)."""
        per_worker = args if args is not None else [{} for _ in self.procs]
        return list(
            await asyncio.gather(*(self.call(i, cmd, **a) for i, a in enumerate(per_worker) if a is not None))
        )

    async def stop(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.returncode is None:
                with contextlib.suppress(WorkerError, TimeoutError, BrokenPipeError, ConnectionError):
                    await asyncio.wait_for(self.call(i, "quit"), 15)
        for proc in self.procs:
            if proc.returncode is None:
                try:
                    await asyncio.wait_for(proc.wait(), 5)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()

    async def __aenter__(self) -> WorkerPool:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def split(items: list[Any], parts: int) -> list[list[Any]]:
    """Round-robin ``items`` into ``parts`` lists."""
    return [items[i::parts] for i in range(parts)]


def loadgen_figures(replies: list[dict[str, Any]]) -> dict[str, Any]:
    """The busiest worker's CPU% (100 = one core) and whether it saturated."""
    peak = max((r.get("cpu_pct", 0.0) for r in replies), default=0.0)
    return {"loadgen_cpu_pct": round(peak, 1), "loadgen_saturated": peak > SATURATED_PCT}
