"""A throwaway redis-server for tests: free port on 127.0.0.1, no persistence, own temp dir.

Never touches a Redis already running on the machine (6379 or any other
port): the port is picked free by the OS and the server is started with
``--save "" --appendonly no`` in a temporary directory, so ``restart()``
brings it back empty ("Redis restarted empty").
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    def __init__(self, binary: str | None = None) -> None:
        found = binary or redis_server_binary()
        if found is None:
            raise FileNotFoundError("redis-server not found on PATH")
        self.binary = found
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="roost-redis-")
        self.dir = Path(self._tmp.name)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start on a free port (or the same port again after ``stop``)."""
        attempts = 1 if self.port else 5
        for _ in range(attempts):
            if not self.port:
                self.port = _free_port()
            if self._spawn(timeout):
                return
            if attempts > 1:
                self.port = 0  # lost the race for that port: pick another
        raise RuntimeError(f"redis-server did not start on port {self.port}: see {self.dir / 'redis.log'}")

    def _spawn(self, timeout: float) -> bool:
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 (the child keeps it)
        try:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.dir),
                    "--daemonize",
                    "no",
                    "--protected-mode",
                    "yes",
                    "--loglevel",
                    "warning",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                return False
            if self.ping():
                return True
            time.sleep(0.01)
        self.stop()
        return False

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def restart(self) -> None:
        """Stop and start again on the same port: the new server is empty."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
