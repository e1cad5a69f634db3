"""The end-to-end suite against a 2-gateway cluster: ``ClusterServer``.

``ClusterServices`` is one throwaway PostgreSQL and one throwaway Redis for
the whole test session (``roost.devcluster``). Every test gets a fresh
database, ``CREATE DATABASE roost_tN TEMPLATE roost_template`` (the template
is migrated once, so the gateways find the schema current), and an empty
Redis (``FLUSHALL`` before its gateways start); only the ``roost serve``
gateways themselves are started per test.

``ClusterServer`` has the interface the tests use on ``ServerProcess``:

* ``url`` alternates between the gateways on every access, so two users
  connected one after the other land on different gateways and the
  cross-gateway paths (routing, receipts, presence, replacement of a device
  on another gateway) get exercised; ``urls`` lists them all.
* ``start``/``kill9``/``terminate``/``stop`` act on every gateway (a kill -9
  of "the server" is a kill -9 of the whole cluster tier; the state survives
  in PostgreSQL), restarting on the same ports.
* ``proc``/``port`` are gateway 0's, ``pids`` all of them. An RSS check of
  ``proc`` alone only means something embedded; the e2e helpers sum the RSS
  of ``pids`` instead.
* ``log()`` is the tail of every gateway's log, each under a header.
* ``store_args`` is what ``roost user add`` needs to reach the store
  (``--store DSN``; ``--data-dir DIR`` on ``ServerProcess``).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from roost.devcluster.postgres import PgServer
from roost.devcluster.redis import RedisServer
from tests.e2e.server import free_port

T = TypeVar("T")

TEMPLATE_DB = "roost_template"
GATEWAYS = 2


def run_sync(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``fn()`` to completion on a private event loop in a worker thread.

    Works from plain code and from inside a running loop (an async test calling
    a sync helper) alike; the caller blocks, as it would on a subprocess."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, fn()).result()


class ClusterServices:
    """PostgreSQL + Redis, once per test session. ``PgServer()`` raises
    ``PgUnavailable`` and ``RedisServer()`` ``FileNotFoundError`` when the
    binaries are missing."""

    def __init__(self) -> None:
        self.redis = RedisServer()
        try:
            self.pg = PgServer()
        except BaseException:
            self.redis.close()
            raise
        self._databases = itertools.count(1)

    def start(self) -> None:
        try:
            self.pg.start()
            self.redis.start()
            run_sync(self._create_template)
        except BaseException:
            self.close()
            raise

    async def _create_template(self) -> None:
        import asyncpg

        from roost.store.postgres import migrate

        conn = await asyncpg.connect(self.pg.dsn())
        try:
            await conn.execute(f"CREATE DATABASE {TEMPLATE_DB}")
        finally:
            await conn.close()
        await migrate(self.pg.dsn(TEMPLATE_DB))

    def new_database(self) -> str:
        """A fresh, migrated, empty database; its DSN."""
        name = f"roost_t{next(self._databases)}"

        async def create() -> None:
            import asyncpg

            conn = await asyncpg.connect(self.pg.dsn())
            try:
                await conn.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}")
            finally:
                await conn.close()

        run_sync(create)
        return self.pg.dsn(name)

    def flush_redis(self) -> None:
        import redis

        client = redis.Redis.from_url(self.redis.url, socket_timeout=5)
        try:
            client.flushall()
        finally:
            client.close()

    def close(self) -> None:
        self.redis.close()
        self.pg.destroy()


class ClusterServer:
    """``GATEWAYS`` times ``roost serve`` on one fresh database and the shared Redis."""

    embedded = False
    mode = "cluster"

    def __init__(
        self,
        services: ClusterServices,
        data_dir: Path,
        extra_args: list[str] | None = None,
        gateways: int = GATEWAYS,
    ) -> None:
        self.services = services
        self.data_dir = data_dir
        self.extra_args = extra_args or []
        self.dsn = services.new_database()
        self.ports = [free_port() for _ in range(gateways)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * gateways
        self._next = itertools.count()

    # -- addresses --------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    @property
    def url(self) -> str:
        """The gateways in turn: every access returns the next one."""
        urls = self.urls
        return urls[next(self._next) % len(urls)]

    @property
    def port(self) -> int:
        return self.ports[0]

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        """Gateway 0's process (RSS checks of one pid only make sense embedded; see ``pids``)."""
        return self.procs[0]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None and p.poll() is None]

    @property
    def store_args(self) -> list[str]:
        return ["--store", self.dsn]

    @property
    def admin_args(self) -> list[str]:
        """What ``roost user token reset / disable / remove`` need to reach every gateway."""
        return [*self.store_args, "--registry", self.services.redis.url]

    def log_path(self, i: int) -> Path:
        return self.data_dir / f"gw{i}-{self.ports[i]}.log"

    # -- accounts -----------------------------------------------------------------------

    def add_user(self, name: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "roost.cli.main", "user", "add", name, *self.store_args],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip().splitlines()[-1]

    # -- processes ----------------------------------------------------------------------

    def _args(self, i: int) -> list[str]:
        return [
            sys.executable, "-m", "roost.cli.main", "serve",
            "--store", self.dsn, "--registry", self.services.redis.url,
            "--gateway-id", f"gw{i}", "--port", str(self.ports[i]),
            "--data-dir", str(self.data_dir / f"gw{i}"), *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = 15.0) -> None:
        """Start every gateway that is not running (same ports as before) and
        wait until all of them answer /healthz."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for i, proc in enumerate(self.procs):
            if proc is not None and proc.poll() is None:
                continue
            log = open(self.log_path(i), "ab")  # noqa: SIM115 - kept open for the child's lifetime
            self.procs[i] = subprocess.Popen(
                self._args(i), stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
            log.close()
        pending = set(range(len(self.procs)))
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for i in sorted(pending):
                proc = self.procs[i]
                assert proc is not None
                if proc.poll() is not None:
                    raise RuntimeError(f"gateway gw{i} exited with {proc.returncode}: {self.log()}")
                try:
                    with urllib.request.urlopen(self.urls[i] + "/healthz", timeout=1) as resp:
                        if resp.status == 200:
                            pending.discard(i)
                except OSError:
                    pass
            if pending:
                time.sleep(0.02)
        if pending:
            raise RuntimeError(f"gateways {sorted(pending)} did not become healthy: {self.log()}")

    def _signal_all(self, sig: int) -> list[subprocess.Popen[bytes]]:
        running = [p for p in self.procs if p is not None and p.poll() is None]
        for proc in running:
            proc.send_signal(sig)
        return running

    def kill9(self) -> None:
        """kill -9 every gateway (at once)."""
        assert any(p is not None for p in self.procs)
        for proc in self._signal_all(signal.SIGKILL):
            proc.wait(timeout=10)

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM every gateway at once; the first non-zero exit code, else 0."""
        assert any(p is not None for p in self.procs)
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes = [p.wait(timeout=max(deadline - time.monotonic(), 0.01)) for p in self.procs if p is not None]
        return next((c for c in codes if c != 0), 0)

    def stop(self) -> None:
        for proc in self._signal_all(signal.SIGKILL):
            proc.wait(timeout=10)

    def log(self) -> str:
        parts = []
        for i in range(len(self.procs)):
            try:
                text = self.log_path(i).read_text(errors="replace")[-4000:]
            except OSError:
                text = ""
            parts.append(f"----- gw{i} -----\n{text}")
        return "\n".join(parts)
