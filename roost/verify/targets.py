"""What ``roost verify`` runs against, and the server-side faults each allows.

* :class:`EmbeddedTarget`: its own ``roost serve`` (SQLite), killed with
  SIGKILL and restarted on the same port.
* :class:`ClusterTarget`: its own throwaway PostgreSQL, Redis and three
  gateways; a gateway is killed and restarted, Redis restarts empty,
  PostgreSQL crash-restarts (``pg_ctl -m immediate``: WAL recovery).
* :class:`UrlTarget`: a deployment someone else runs; only client-side
  faults are injected, users are created through ``--store``.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from roost.devcluster.postgres import free_port
from roost.devcluster.run import DevCluster, wait_healthy
from roost.store.accounts import add_users

CLIENT_NEMESES = ("cut-connection", "blackhole", "crash-client")


class Target(Protocol):
    mode: str
    server_nemeses: tuple[str, ...]

    @property
    def urls(self) -> list[str]: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    async def add_users(self, names: list[str]) -> dict[str, str]: ...
    async def inject(self, kind: str, rng: random.Random) -> None: ...
    async def heal(self) -> None: ...


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme in ("https", "wss") else 80)


class EmbeddedTarget:
    mode = "embedded"
    server_nemeses = ("kill-server",)

    def __init__(self, root: Path) -> None:
        self.data_dir = root / "server"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = root / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.port}"]

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "roost.cli.main", "serve", "--data-dir", str(self.data_dir),
                    "--port", str(self.port), "--rate-limit", "0", "--log-level", "warning",
                ],
                stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        wait_healthy(self.urls[0], self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    async def add_users(self, names: list[str]) -> dict[str, str]:
        return await add_users(self.data_dir, names)

    async def inject(self, kind: str, rng: random.Random) -> None:
        assert kind == "kill-server", kind
        self.kill()
        await asyncio.sleep(rng.uniform(0.2, 1.0))
        await asyncio.to_thread(self.start)

    async def heal(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            await asyncio.to_thread(self.start)


class ClusterTarget:
    mode = "cluster"
    server_nemeses = ("kill-gateway", "restart-redis", "restart-postgres")

    def __init__(self, root: Path, gateways: int = 3) -> None:
        self.root = root
        self.cluster = DevCluster(gateways, extra_args=["--rate-limit", "0", "--log-level", "warning"])
        self.ports: list[int] = []

    @property
    def urls(self) -> list[str]:
        return self.cluster.urls

    def start(self) -> None:
        self.cluster.start()
        self.ports = [host_port(url)[1] for url in self.cluster.urls]

    def stop(self) -> None:
        self.cluster.stop_gateways()
        for log in self.cluster.root.glob("gw*.log"):  # the cluster's directory goes; its logs stay
            shutil.copy(log, self.root / log.name)
        self.cluster.stop()

    async def add_users(self, names: list[str]) -> dict[str, str]:
        return await add_users(self.cluster.dsn, names)

    def _gateway_down(self, i: int) -> bool:
        return self.cluster.gateways[i][1].poll() is not None

    async def inject(self, kind: str, rng: random.Random) -> None:
        if kind == "kill-gateway":
            i = rng.randrange(len(self.ports))
            if not self._gateway_down(i):
                self.cluster.kill_gateway(i)
            await asyncio.sleep(rng.uniform(0.2, 2.0))
            await asyncio.to_thread(self.cluster.start_gateway, i, self.ports[i])
        elif kind == "restart-redis":
            assert self.cluster.redis is not None
            await asyncio.to_thread(self.cluster.redis.restart)
        elif kind == "restart-postgres":
            assert self.cluster.pg is not None
            await asyncio.to_thread(self.cluster.pg.restart, rng.uniform(0.2, 2.0))
        else:
            raise ValueError(kind)

    async def heal(self) -> None:
        for i, port in enumerate(self.ports):
            if self._gateway_down(i):
                await asyncio.to_thread(self.cluster.start_gateway, i, port)


class UrlTarget:
    mode = "url"
    server_nemeses: tuple[str, ...] = ()

    def __init__(self, urls: list[str], store: str) -> None:
        self._urls = urls
        self.store = store

    @property
    def urls(self) -> list[str]:
        return self._urls

    def start(self) -> None:
        for url in self._urls:
            host_port(url)  # a malformed URL fails here, before any client starts

    def stop(self) -> None:
        pass

    async def add_users(self, names: list[str]) -> dict[str, str]:
        return await add_users(self.store, names)

    async def inject(self, kind: str, rng: random.Random) -> None:
        raise ValueError(f"{kind} is not possible against --url")

    async def heal(self) -> None:
        pass
