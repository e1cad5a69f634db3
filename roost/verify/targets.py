"""What ``roost verify`` runs against, and the server-side faults each allows.

* :class:`EmbeddedTarget`: its own ``roost serve`` (SQLite), killed with
  SIGKILL and restarted on the same port; its storage made to fail under
  SQLite (a failed COMMIT, a full disk, failing reads:
  :mod:`roost.verify.storage_faults`).
* :class:`ClusterTarget`: its own throwaway PostgreSQL, Redis and three
  gateways; a gateway is killed and restarted, Redis restarts empty,
  PostgreSQL crash-restarts (``pg_ctl -m immediate``: WAL recovery).
* :class:`UrlTarget`: a deployment someone else runs; only client-side
  faults are injected, users are created through ``--store``.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import sqlite3
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import asyncpg

from roost.devcluster.embedded import EmbeddedServer
from roost.devcluster.run import DevCluster
from roost.store.accounts import add_users
from roost.store.sqlite import database_path
from roost.verify.history import StoreView
from roost.verify.storage_faults import KINDS as STORAGE_NEMESES
from roost.verify.storage_faults import StorageFaults, compiler

CLIENT_NEMESES = ("cut-connection", "blackhole", "crash-client")


class Target(Protocol):
    mode: str

    @property  # read-only: a target may declare a narrower tuple, such as tuple[str]
    def server_nemeses(self) -> tuple[str, ...]: ...

    @property
    def urls(self) -> list[str]: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    async def add_users(self, names: list[str]) -> dict[str, str]: ...
    async def inject(self, kind: str, rng: random.Random) -> None: ...
    async def heal(self) -> None: ...
    async def stored(self) -> StoreView | None: ...


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme in ("https", "wss") else 80)


class EmbeddedTarget:
    """``server_env`` is added to the server's environment (tests plant bugs through it)."""

    mode = "embedded"

    def __init__(self, root: Path, server_env: dict[str, str] | None = None) -> None:
        data_dir = root / "server"
        env = dict(server_env or {})
        self.storage: StorageFaults | None = None
        if compiler() is not None:
            self.storage = StorageFaults(root, data_dir)
            self.storage.build()
            env.update(self.storage.env())
        self.server_nemeses: tuple[str, ...] = ("kill-server", *(STORAGE_NEMESES if self.storage else ()))
        self.server = EmbeddedServer(
            data_dir, root / "server.log", ["--rate-limit", "0", "--log-level", "warning"], env
        )
        self.restarts_after_storage_fault = 0

    @property
    def urls(self) -> list[str]:
        return [self.server.url]

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
        if self.storage is not None:
            self.storage.close()

    async def add_users(self, names: list[str]) -> dict[str, str]:
        return await add_users(self.server.data_dir, names)

    async def inject(self, kind: str, rng: random.Random) -> None:
        if kind in STORAGE_NEMESES:
            await asyncio.sleep(self.arm_storage(kind, rng))
            await self.end_storage_fault()
            return
        assert kind == "kill-server", kind
        self.server.kill()
        await asyncio.sleep(rng.uniform(0.2, 1.0))
        await asyncio.to_thread(self.server.start)

    def arm_storage(self, kind: str, rng: random.Random) -> float:
        """The disk starts failing; returns for how long (0.2-1.5 s). Half
        the commit faults fail exactly one COMMIT: the next batch then runs
        on whatever state the failed one left in memory."""
        assert self.storage is not None
        once = kind == "fail-commit" and rng.random() < 0.5
        self.storage.arm(kind, 1 if once else -1)
        return rng.uniform(0.2, 1.5)

    async def end_storage_fault(self) -> None:
        assert self.storage is not None
        self.storage.clear()
        if not self.server.running:  # the server gave up: verify notes it and restarts it
            self.restarts_after_storage_fault += 1
            await asyncio.to_thread(self.server.start)

    async def heal(self) -> None:
        if self.storage is not None:
            self.storage.clear()
        if not self.server.running:
            await asyncio.to_thread(self.server.start)

    def storage_report(self) -> dict[str, int]:
        """Calls the shim failed, by kind, and how often the server had to be restarted after one."""
        if self.storage is None:
            return {}
        return {**self.storage.failed_calls(), "server_restarts": self.restarts_after_storage_fault}

    async def stored(self) -> StoreView | None:
        """Every message in the server's database, and every member's delivered mark."""

        def read() -> StoreView:
            db = sqlite3.connect(f"file:{database_path(self.server.data_dir)}?mode=ro", uri=True)
            try:
                messages = db.execute("SELECT conv, seq, sender, client_id FROM messages").fetchall()
                marks = db.execute("SELECT conv, user, delivered FROM members").fetchall()
            finally:
                db.close()
            return StoreView(
                {(conv, seq): (sender, cid) for conv, seq, sender, cid in messages},
                {(conv, user): delivered for conv, user, delivered in marks},
            )

        return await asyncio.to_thread(read)


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

    async def stored(self) -> StoreView | None:
        """Every message in the cluster's PostgreSQL, and every member's delivered mark."""
        conn = await asyncpg.connect(self.cluster.dsn)
        try:
            messages = await conn.fetch("SELECT conv, seq, sender, client_id FROM messages")
            marks = await conn.fetch("SELECT conv, user_name, delivered FROM members")
        finally:
            await conn.close()
        return StoreView(
            {(r["conv"], r["seq"]): (r["sender"], r["client_id"]) for r in messages},
            {(r["conv"], r["user_name"]): r["delivered"] for r in marks},
        )


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

    async def stored(self) -> StoreView | None:
        return None
