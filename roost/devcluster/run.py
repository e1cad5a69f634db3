"""``roost dev-cluster``: PostgreSQL, Redis and N gateways on this machine, for trying cluster mode.

Everything lives in a temporary directory and is stopped on Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from roost.devcluster import seaweed
from roost.devcluster.postgres import PgServer, PgUnavailable, free_port
from roost.devcluster.redis import RedisServer
from roost.devcluster.seaweed import SeaweedServer


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

    def __init__(
        self,
        gateways: int,
        base_port: int = 0,
        extra_args: list[str] | None = None,
        media: str | None = None,
    ) -> None:
        """``media``: None (one blob directory and signing key shared by the
        gateways), ``seaweed`` (a throwaway SeaweedFS S3 server) or a ``--media`` value."""
        self.count = gateways
        self.media = media
        self.seaweed: SeaweedServer | None = None
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
        if self.media == "seaweed":
            self.seaweed = SeaweedServer()
            self.seaweed.start()
        for i in range(self.count):
            self.start_gateway(i)

    def gateway_args(self, i: int, port: int) -> list[str]:
        assert self.redis is not None
        return [
            sys.executable, "-m", "roost.cli.main", "serve",
            "--store", self.dsn, "--registry", self.redis.url,
            "--gateway-id", f"gw{i}", "--port", str(port),
            "--data-dir", str(self.root / f"gw{i}"), *self.media_args(), *self.extra_args,
        ]  # fmt: skip

    def media_args(self) -> list[str]:
        """Every gateway of a cluster needs the same media settings: the same
        bucket, or the same directory and signing key."""
        if "--media" in self.extra_args:
            return []
        if self.seaweed is not None:
            return [
                "--media", self.seaweed.media_url,
                "--s3-access-key", seaweed.ACCESS_KEY, "--s3-secret-key", seaweed.SECRET_KEY,
            ]  # fmt: skip
        if self.media:
            return ["--media", self.media]
        return ["--media", str(self.root / "media"), "--media-secret-file", str(self.root / "media.key")]

    def start_gateway(self, i: int, port: int | None = None) -> str:
        port = port or (self.base_port + i if self.base_port else free_port())
        log = open(self.root / f"gw{i}.log", "ab")  # noqa: SIM115 (the child keeps it)
        proc = subprocess.Popen(
            self.gateway_args(i, port), stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        log.close()
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc)
        except RuntimeError as exc:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            why = last_line(self.root / f"gw{i}.log") or str(exc)
            raise GatewayFailed(f"gateway gw{i} on port {port} did not start: {why}") from None
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
        if self.seaweed is not None:
            self.seaweed.destroy()
        shutil.rmtree(self.root, ignore_errors=True)


class GatewayFailed(RuntimeError):
    """A gateway did not start; the message names it and says why."""


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the gateway binds
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


class Supervisor:
    """Keeps a ``roost dev-cluster`` running: a gateway that dies is reported and
    restarted on its port (or, with ``restart=False``, left down), while the
    others keep serving. Tests and ``roost verify --cluster`` use ``DevCluster``
    alone: their kills must stay kills."""

    def __init__(self, cluster: DevCluster, restart: bool) -> None:
        self.cluster = cluster
        self.restart = restart
        self.down: set[int] = set()
        self.stopping = False

    def check(self) -> None:
        for i, (url, proc) in enumerate(list(self.cluster.gateways)):
            if self.stopping or i in self.down or proc.poll() is None:
                continue
            say(f"gateway gw{i} {url} (pid {proc.pid}) died: {exit_reason(proc.returncode)}")
            if not self.restart:
                self.down.add(i)
                say(f"gateway gw{i} left down (--no-restart); the others keep serving")
                continue
            try:
                self.cluster.start_gateway(i, port=int(url.rsplit(":", 1)[1]))
            except GatewayFailed as exc:
                self.down.add(i)
                say(f"{exc}; left down, the others keep serving")
                continue
            say(f"gateway gw{i} restarted: {url} (pid {self.cluster.gateways[i][1].pid})")


def exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def say(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


def run_dev_cluster(gateways: int, base_port: int, restart: bool = True, media: str | None = None) -> int:
    # Refuse taken ports before the seconds PostgreSQL takes to start.
    taken = [base_port + i for i in range(gateways) if port_in_use(base_port + i)]
    if taken:
        ports = ", ".join(str(p) for p in taken)
        print(f"roost dev-cluster: port {ports} on 127.0.0.1 is in use (try another --port)", file=sys.stderr)
        return 1
    cluster = DevCluster(gateways, base_port, media=media)
    supervisor = Supervisor(cluster, restart)

    def on_signal(signum: int, frame: object) -> None:
        # A terminal's Ctrl-C reaches the gateways too: their exits are the
        # stop, not deaths to restart.
        supervisor.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        try:
            cluster.start()
        except (GatewayFailed, PgUnavailable, FileNotFoundError) as exc:
            print(f"roost dev-cluster: {exc}", file=sys.stderr)
            return 1
        print(f"PostgreSQL: {cluster.dsn}")
        assert cluster.redis is not None
        print(f"Redis:      {cluster.redis.url}")
        print(f"media:      {cluster.media_args()[1]}")
        for i, (url, proc) in enumerate(cluster.gateways):
            print(f"gateway:    {url} (gw{i}, pid {proc.pid})")
        print(f"add a user: roost user add NAME --store {cluster.dsn}")
        dead = "restarted" if restart else "left down (--no-restart)"
        print(f"A gateway that dies is {dead}. Ctrl-C stops everything and deletes its data.", flush=True)
        while not supervisor.stopping:
            supervisor.check()
            time.sleep(0.2)
    finally:
        cluster.stop()
    return 0
