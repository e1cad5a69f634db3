"""The storage-fault shim fails SQLite's calls on the data directory, and only there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from roost.verify.storage_faults import StorageFaults, compiler

pytestmark = pytest.mark.skipif(
    compiler() is None and os.environ.get("ROOST_REQUIRE_SERVICES") != "1",
    reason="no C compiler for the storage-fault shim",
)

# One transaction per line read from stdin; prints what became of it.
CHILD = r"""
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE IF NOT EXISTS t (x)")
print("ready", flush=True)
for line in sys.stdin:
    try:
        if line.strip() == "read":
            fresh = sqlite3.connect(sys.argv[1])
            print("ok", fresh.execute("SELECT count(*) FROM t").fetchone()[0], flush=True)
            fresh.close()
            continue
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t VALUES (1)")
        db.execute("COMMIT")
        print("ok", flush=True)
    except sqlite3.Error as exc:
        if db.in_transaction:
            db.execute("ROLLBACK")
        print("error", exc, flush=True)
"""


class Child:
    def __init__(self, db: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, **env},
        )  # fmt: skip
        assert self.ask_line() == "ready"

    def ask_line(self, command: str | None = None) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


@pytest.fixture
def faults(tmp_path: Path):  # type: ignore[no-untyped-def]
    storage = StorageFaults(tmp_path, tmp_path / "data")
    storage.build()
    yield storage
    storage.close()


def test_a_failed_fsync_fails_exactly_one_commit(faults: StorageFaults, tmp_path: Path) -> None:
    child = Child(tmp_path / "data" / "db.sqlite", faults.env())
    try:
        assert child.ask_line("write") == "ok"
        faults.arm("fail-commit", 1)
        assert child.ask_line("write") == "error disk I/O error"
        assert child.ask_line("write") == "ok"  # the next commit works again
        assert child.ask_line("read") == "ok 2"  # the failed one is not there
    finally:
        child.close()
    assert faults.failed_calls() == {"fail-commit": 1, "disk-full": 0, "fail-reads": 0}


def test_a_full_disk_and_failing_reads_until_cleared(faults: StorageFaults, tmp_path: Path) -> None:
    child = Child(tmp_path / "data" / "db.sqlite", faults.env())
    try:
        faults.arm("disk-full")
        assert child.ask_line("write") == "error database or disk is full"
        assert child.ask_line("write") == "error database or disk is full"
        faults.clear()
        assert child.ask_line("write") == "ok"
        faults.arm("fail-reads")
        assert child.ask_line("read").startswith("error")
        faults.clear()
        assert child.ask_line("read") == "ok 1"
    finally:
        child.close()
    failed = faults.failed_calls()
    assert failed["disk-full"] >= 2 and failed["fail-reads"] >= 1


def test_files_outside_the_data_directory_are_left_alone(faults: StorageFaults, tmp_path: Path) -> None:
    child = Child(tmp_path / "elsewhere.sqlite", faults.env())
    try:
        faults.arm("fail-commit")
        faults.arm("disk-full")
        assert child.ask_line("write") == "ok"
    finally:
        child.close()
    assert sum(faults.failed_calls().values()) == 0
