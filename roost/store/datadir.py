"""The embedded data directory: one server at a time, clear errors when unusable.

Two ``roost serve`` on one directory would each run a writer thread that
believes its in-memory conversation state is authoritative, and the second
would hand out sequence numbers the first already used. ``roost serve`` takes
an exclusive ``flock`` on ``serve.lock`` in the directory for as long as it
runs (the kernel drops it when the process dies, even by ``kill -9``), and
writes its PID there so a second server can say who holds it.

Only servers take the lock. ``roost user add`` and other readers and
occasional writers open the database beside a running server: SQLite's own
locking (WAL, busy timeout) serializes their transactions with the server's.
"""

from __future__ import annotations

import os
from pathlib import Path

from roost.store.sqlite import database_path

try:
    import fcntl
except ImportError:  # Windows: no advisory lock; one server per directory is up to the operator
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = "serve.lock"


class DataDirError(Exception):
    """The data directory cannot be used; the message is one line naming it."""


def _make_dir(data_dir: Path) -> None:
    if data_dir.exists() and not data_dir.is_dir():
        raise DataDirError(f"the data directory {data_dir} is not a directory")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataDirError(f"cannot create the data directory {data_dir}: {exc.strerror or exc}") from None


class ServerLock:
    """Held while a server uses a data directory: ``with ServerLock(dir): ...``."""

    def __init__(self, data_dir: Path | str) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        _make_dir(self.data_dir)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DataDirError(
                f"cannot write in the data directory {self.data_dir}: {exc.strerror or exc}"
            ) from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                by = f"pid {holder}" if holder.isdigit() else "another process"
                raise DataDirError(
                    f"the data directory {self.data_dir} is in use by another roost serve ({by})"
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> ServerLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def require_database(data_dir: Path | str, create: bool) -> None:
    """Refuse a data directory without a database unless asked to create one.

    A typo in ``--data-dir`` would otherwise create a fresh database whose
    accounts the running server never sees.
    """
    data_dir = Path(data_dir)
    if database_path(data_dir).is_file():
        return
    if not create:
        what = "no database in" if data_dir.is_dir() else "no data directory"
        raise DataDirError(
            f"{what} {data_dir} (start `roost serve --data-dir {data_dir}` first, or pass --create)"
        )
    _make_dir(data_dir)
