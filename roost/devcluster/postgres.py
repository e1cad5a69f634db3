"""A throwaway PostgreSQL server for tests.

``initdb`` into a fresh temporary directory, then ``postgres`` on a free port
on 127.0.0.1 with its socket in that directory (``-k``) and ``fsync=on``. It
never touches the machine's shared instance on 5432. PostgreSQL refuses to
run as root; when the tests run as root the server runs as the unprivileged
``postgres`` OS user (``runuser -u postgres --``) and the directory is
chowned to it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SUPERUSER = "roost"
BINARIES = ("initdb", "pg_ctl", "postgres")


class PgUnavailable(Exception):
    """No PostgreSQL server binaries here (the reason says what is missing)."""


def find_bindir() -> Path:
    """The directory holding initdb, pg_ctl and postgres: PATH first, then
    /usr/lib/postgresql/<version>/bin (newest version first)."""
    found = [shutil.which(b) for b in BINARIES]
    if all(found):
        dirs = {Path(f).resolve().parent for f in found if f}
        if len(dirs) == 1:
            return dirs.pop()
        return Path(str(found[0])).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parent.name.split(".")],
        reverse=True,
    )
    for candidate in candidates:
        if all(os.access(Path(candidate) / b, os.X_OK) for b in BINARIES):
            return Path(candidate)
    raise PgUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found on PATH "
        "or in /usr/lib/postgresql/*/bin; install the postgresql server package"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One throwaway cluster. ``start()``, ``dsn(db)``, ``restart()``, ``stop()``."""

    def __init__(self, bindir: Path | None = None) -> None:
        self.bindir = bindir or find_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="roost-pg-"))
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.log = self.root / "postgres.log"
        self.port = 0
        self.running = False
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise PgUnavailable("running as root and there is no 'postgres' OS user to run as") from exc
            if shutil.which("runuser") is None:
                raise PgUnavailable("running as root and runuser(1) is missing")
            self._as_user = ["runuser", "-u", "postgres", "--"]
            self.sock.mkdir()
            for path in (self.root, self.sock):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        else:
            self.sock.mkdir()

    # -- running the binaries -------------------------------------------------------

    def _run(self, binary: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [*self._as_user, str(self.bindir / binary), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if proc.returncode != 0:
            output = f"{proc.stdout}\n{proc.stderr}\n{self.log_tail()}"
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output}")
        return proc

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def initdb(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",  # the template files; the server itself runs with fsync=on
        )

    def _options(self) -> str:
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.sock),
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            "max_connections": "100",
            "shared_buffers": "64MB",
        }
        return " ".join(f"-c {k}={v}" for k, v in settings.items())

    def start(self) -> None:
        if not self.data.exists():
            self.initdb()
        last: Exception | None = None
        for _ in range(5):
            self.port = self.port or free_port()
            try:
                self._run(
                    "pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log),
                    "-o", self._options(),
                )  # fmt: skip
                self.running = True
                return
            except RuntimeError as exc:  # most likely the port was taken meanwhile
                last = exc
                self.port = 0
        raise RuntimeError(f"could not start PostgreSQL: {last}")

    def stop(self, mode: str = "fast") -> None:
        if self.running:
            self._run("pg_ctl", "stop", "-w", "-t", "60", "-m", mode, "-D", str(self.data))
            self.running = False

    def restart(self, down_for: float = 0.0) -> None:
        """Crash-stop (``-m immediate``: no checkpoint, backends killed), then
        start again on the same port; recovery replays the WAL."""
        self.stop("immediate")
        if down_for:
            time.sleep(down_for)
        self.start()

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"
