"""Backup and restore of the embedded store (``roost backup`` / ``roost restore``).

A backup is taken beside a running server with SQLite's online backup API:
it copies the database as of one snapshot, including commits that are still
only in the WAL, which a plain file copy of ``roost.sqlite`` would miss. The
copy runs in steps of a few hundred pages with a short pause between them, so
the server's writer thread keeps its disk and its locks. A commit by the
server between two steps restarts the copy (SQLite's rule: the result must be
one snapshot); when that keeps happening under a steady load, the rest is
copied in one step, which in WAL mode does not block the server's writer
either (a reader never blocks a writer), it only holds back checkpoints.

The result is a single self-contained file (journal mode DELETE, no -wal),
written under a temporary name and renamed into place only once it is on disk
and passes ``PRAGMA quick_check``.

A restore puts such a file back as a data directory's database. It holds the
data directory's server lock while it works, so it refuses while a server
runs there and no server can start half-way through.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from roost.store.datadir import DataDirError, ServerLock
from roost.store.sqlite import SCHEMA_VERSION, database_path

PAGES_PER_STEP = 256
PAUSE_SECONDS = 0.005
MAX_RESTARTS = 3  # then the rest is copied in one step

# Tables every Roost schema (1..SCHEMA_VERSION) has.
REQUIRED_TABLES = frozenset({"users", "conversations", "members", "messages"})


class BackupError(Exception):
    """The backup or restore cannot be done; the message is one line naming the file."""


@dataclass
class BackupResult:
    pages: int
    restarts: int
    one_step: bool  # the copy finished in one step after too many restarts


class _TooManyRestarts(Exception):
    pass


def _sidecars(path: Path) -> list[Path]:
    return [path.with_name(path.name + suffix) for suffix in ("-wal", "-shm", "-journal")]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_pages(source: sqlite3.Connection, target: sqlite3.Connection) -> BackupResult:
    """Copy ``source`` into ``target`` in steps; one step after MAX_RESTARTS restarts."""
    result = BackupResult(pages=0, restarts=0, one_step=False)
    last_remaining: int | None = None

    def progress(status: int, remaining: int, total: int) -> None:
        nonlocal last_remaining
        result.pages = total
        if last_remaining is not None and remaining > last_remaining:
            result.restarts += 1  # the source changed: SQLite began again
            if result.restarts > MAX_RESTARTS:
                raise _TooManyRestarts
        last_remaining = remaining
        if remaining:
            time.sleep(PAUSE_SECONDS)  # let the server's writer have the disk

    try:
        source.backup(target, pages=PAGES_PER_STEP, progress=progress)
    except _TooManyRestarts:
        result.one_step = True
        source.backup(target, pages=-1)
    return result


def backup(data_dir: Path | str, to: Path | str, force: bool = False) -> BackupResult:
    """Copy ``data_dir``'s database to the file ``to``, consistent, beside a running server."""
    source_path = database_path(data_dir)
    target = Path(to)
    if not source_path.is_file():
        raise BackupError(f"no database in {data_dir}")
    if target.resolve() in {p.resolve() for p in (source_path, *_sidecars(source_path))}:
        raise BackupError(f"{target} is the database being backed up")
    if target.exists() and not force:
        raise BackupError(f"{target} exists (pass --force to replace it)")
    if target.exists() and not target.is_file():
        raise BackupError(f"{target} is not a file")
    partial = target.with_name(target.name + ".partial")
    for stale in (partial, *_sidecars(partial)):
        stale.unlink(missing_ok=True)
    try:
        # Read-only: the backup never writes to the server's database.
        source = sqlite3.connect(f"file:{source_path}?mode=ro", uri=True)
        try:
            source.execute("PRAGMA busy_timeout=10000")
            dest = sqlite3.connect(partial, isolation_level=None)
            try:
                result = _copy_pages(source, dest)
                # The copy carries the source's WAL flag; one file is easier to keep.
                dest.execute("PRAGMA journal_mode=DELETE")
                if dest.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                    raise BackupError(f"the copy in {partial} fails its integrity check")
            finally:
                dest.close()
        finally:
            source.close()
        _fsync(partial)
        os.replace(partial, target)
        _fsync(target.parent)
    except sqlite3.Error as exc:
        partial.unlink(missing_ok=True)
        raise BackupError(f"cannot back up {source_path} to {target}: {exc}") from None
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise BackupError(f"cannot write {target}: {exc.strerror or exc}") from None
    return result


def check_backup(path: Path | str) -> int:
    """Refuse a file that is not a Roost database this Roost can open; its schema version."""
    path = Path(path)
    if not path.is_file():
        raise BackupError(f"no backup file {path}")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise BackupError(f"{path} is not a Roost database ({exc})") from None
    missing = REQUIRED_TABLES - tables
    if missing:
        raise BackupError(f"{path} is not a Roost database (no table {', '.join(sorted(missing))})")
    if version > SCHEMA_VERSION:
        raise BackupError(f"{path} has schema {version}; this Roost knows up to {SCHEMA_VERSION}")
    if check != "ok":
        raise BackupError(f"{path} fails its integrity check: {check}")
    return version


def restore(backup_file: Path | str, data_dir: Path | str, force: bool = False) -> int:
    """Make ``backup_file`` the database of ``data_dir``; returns its schema version."""
    source = Path(backup_file)
    version = check_backup(source)
    target = database_path(data_dir)
    try:
        with ServerLock(data_dir):
            if target.exists() and not force:
                raise BackupError(f"{data_dir} already has a database (pass --force to replace it)")
            partial = target.with_name(target.name + ".restoring")
            try:
                with source.open("rb") as src, partial.open("wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                    dst.flush()
                    os.fsync(dst.fileno())
                # The replaced database's WAL would be replayed onto the restored one.
                for stale in _sidecars(target):
                    stale.unlink(missing_ok=True)
                os.replace(partial, target)
                _fsync(target.parent)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    partial.unlink()
                raise BackupError(f"cannot write {target}: {exc.strerror or exc}") from None
    except DataDirError as exc:
        raise BackupError(str(exc)) from None
    return version
