"""A real ``roost serve`` subprocess for end-to-end tests.

Tests talk to it only over WebSocket/HTTP. It runs on a free loopback port
with its own data directory, and can be stopped gracefully (SIGTERM) or
killed (SIGKILL) and restarted on the same data.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """The embedded server (SQLite + in-process registry). ``ClusterServer``
    (tests/e2e/cluster.py) has the same interface for a cluster of gateways."""

    embedded = True
    mode = "embedded"

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        extra_args: list[str] | None = None,
        tls: ssl.SSLContext | None = None,
    ):
        """``tls``: the server serves https (its flags are in ``extra_args``);
        the context is what the health check trusts."""
        self.data_dir = data_dir
        self.tls = tls
        self.port = port or free_port()
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / f"server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def urls(self) -> list[str]:
        return [self.url]

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    @property
    def store_args(self) -> list[str]:
        """What ``roost user add`` needs to reach this server's store."""
        return ["--data-dir", str(self.data_dir)]

    @property
    def admin_args(self) -> list[str]:
        """What ``roost user token reset / disable / remove`` need to reach this server."""
        return self.store_args

    def add_user(self, name: str) -> str:
        # --create: tests may add users before the server first created its database.
        out = subprocess.run(
            [sys.executable, "-m", "roost.cli.main", "user", "add", name, *self.store_args, "--create"],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip().splitlines()[-1]

    def start(self, timeout: float = 15.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "roost.cli.main",
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--port",
                str(self.port),
                *self.extra_args,
            ],
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1, context=self.tls) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server did not become healthy: {self.log()}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-4000:]
        except OSError:
            return ""
