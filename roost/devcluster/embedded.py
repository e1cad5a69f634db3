"""One throwaway ``roost serve`` on the embedded defaults (SQLite, in-process
registry), as ``roost verify --embedded`` and ``roost bench`` start it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from roost.devcluster.postgres import free_port
from roost.devcluster.run import wait_healthy

# Set by ``roost bench --server-cpus``: servers started here run pinned to
# these CPUs (``taskset -c``), apart from the load generator.
SERVER_CPUS_ENV = "ROOST_BENCH_SERVER_CPUS"


def parse_cpu_list(text: str) -> set[int]:
    """``0``, ``0,2`` or ``0-3`` (taskset's list syntax) as a set of CPU numbers."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def pinned(command: list[str]) -> list[str]:
    """``command`` under ``taskset -c`` when the bench asked for pinned servers."""
    cpus = os.environ.get(SERVER_CPUS_ENV)
    if not cpus:
        return command
    parse_cpu_list(cpus)  # a bad list fails here, not in taskset
    return ["taskset", "-c", cpus, *command]


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> None:
    """SIGTERM (the server's clean shutdown), then SIGKILL if it takes too long."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class EmbeddedServer:
    """``roost serve --data-dir DIR`` on a free port (kept across restarts), logging to ``log``."""

    def __init__(
        self,
        data_dir: Path,
        log: Path,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.log = log
        self.extra_args = extra_args or []
        self.env = env or {}  # added to the server's environment (verify's storage-fault shim)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start (or restart) it and wait until it answers /healthz."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                pinned([
                    sys.executable, "-m", "roost.cli.main", "serve", "--data-dir", str(self.data_dir),
                    "--port", str(self.port), *self.extra_args,
                ]),
                stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )  # fmt: skip
        wait_healthy(self.url, self.proc)

    def kill(self) -> None:
        """kill -9, as a crash."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc)
