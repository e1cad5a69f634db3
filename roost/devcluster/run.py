"""``roost dev-cluster``: PostgreSQL, Redis and N gateways on this machine, for trying cluster mode.

Everything lives in a temporary directory and is stopped on Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from roost.devcluster.postgres import PgServer, free_port
from roost.devcluster.redis import RedisServer


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway at {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"gateway at {url} did not become healthy")


class DevCluster:
    """PostgreSQL + Redis + ``gateways`` times ``roost serve``, all throwaway."""

    def __init__(self, gateways: int, base_port: int = 0, extra_args: list[str] | None = None) -> None:
        self.count = gateways
        self.base_port = base_port
        self.extra_args = extra_args or []
        self.root = Path(tempfile.mkdtemp(prefix="roost-cluster-"))
        self.pg: PgServer | None = None
        self.redis: RedisServer | None = None
        self.gateways: list[tuple[str, subprocess.Popen[bytes]]] = []

    @property
    def dsn(self) -> str:
        assert self.pg is not None
        return self.pg.dsn("postgres")

    @property
    def urls(self) -> list[str]:
        return [url for url, _ in self.gateways]

    def start(self) -> None:
        self.pg = PgServer()
        self.pg.start()
        self.redis = RedisServer()
        self.redis.start()
        for i in range(self.count):
            self.start_gateway(i)

    def gateway_args(self, i: int, port: int) -> list[str]:
        assert self.redis is not None
        return [
            sys.executable, "-m", "roost.cli.main", "serve",
            "--store", self.dsn, "--registry", self.redis.url,
            "--gateway-id", f"gw{i}", "--port", str(port),
            "--data-dir", str(self.root / f"gw{i}"), *self.extra_args,
        ]  # fmt: skip

    def start_gateway(self, i: int, port: int | None = None) -> str:
        port = port or (self.base_port + i if self.base_port else free_port())
        log = open(self.root / f"gw{i}.log", "ab")  # noqa: SIM115 (the child keeps it)
        proc = subprocess.Popen(
            self.gateway_args(i, port), stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        log.close()
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        if i < len(self.gateways):
            self.gateways[i] = (url, proc)
        else:
            self.gateways.append((url, proc))
        return url

    def kill_gateway(self, i: int) -> None:
        _, proc = self.gateways[i]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop_gateways(self) -> None:
        for _, proc in self.gateways:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in self.gateways:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def stop(self) -> None:
        self.stop_gateways()
        if self.redis is not None:
            self.redis.close()
        if self.pg is not None:
            self.pg.destroy()
        shutil.rmtree(self.root, ignore_errors=True)


def run_dev_cluster(gateways: int, base_port: int) -> int:
    cluster = DevCluster(gateways, base_port)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        cluster.start()
        print(f"PostgreSQL: {cluster.dsn}")
        assert cluster.redis is not None
        print(f"Redis:      {cluster.redis.url}")
        for url in cluster.urls:
            print(f"gateway:    {url}")
        print(f"add a user: roost user add NAME --store {cluster.dsn}")
        print("Ctrl-C stops everything and deletes its data.", flush=True)
        while not stop:
            for url, proc in cluster.gateways:
                if proc.poll() is not None:
                    print(f"gateway {url} exited with {proc.returncode}", file=sys.stderr)
                    stop = True
            time.sleep(0.2)
    finally:
        cluster.stop()
    return 0
