"""``roost.store.backup.backup`` against a writer in another connection: the
copy is one snapshot, and a steady writer cannot keep the copy restarting."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from roost.store.backup import PAGES_PER_STEP, backup
from roost.store.sqlite import database_path

WRITER_CAP_SECONDS = 20.0  # the writer stops by itself even if the backup never ends


def make_database(data_dir: Path, rows: int) -> Path:
    path = database_path(data_dir)
    data_dir.mkdir()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    # Two tables the writer changes together: a consistent copy has as many rows in each.
    conn.execute("CREATE TABLE a (n INTEGER PRIMARY KEY, pad BLOB)")
    conn.execute("CREATE TABLE b (n INTEGER PRIMARY KEY, pad BLOB)")
    with conn:
        conn.execute("BEGIN")
        for n in range(rows):
            conn.execute("INSERT INTO a VALUES (?, zeroblob(1000))", (n,))
            conn.execute("INSERT INTO b VALUES (?, zeroblob(1000))", (n,))
    conn.close()
    return path


def counts(path: Path) -> tuple[int, int]:
    conn = sqlite3.connect(path)
    try:
        a = conn.execute("SELECT count(*) FROM a").fetchone()[0]
        b = conn.execute("SELECT count(*) FROM b").fetchone()[0]
        return a, b
    finally:
        conn.close()


def test_an_idle_database_is_copied_in_several_paced_steps(tmp_path: Path) -> None:
    make_database(tmp_path / "data", rows=1500)
    result = backup(tmp_path / "data", tmp_path / "copy.sqlite")
    assert result.pages > 2 * PAGES_PER_STEP
    assert (result.restarts, result.one_step) == (0, False)
    assert counts(tmp_path / "copy.sqlite") == (1500, 1500)
    assert not (tmp_path / "copy.sqlite-wal").exists(), "a backup is one self-contained file"


def test_a_steady_writer_gets_a_consistent_copy_that_finishes(tmp_path: Path) -> None:
    path = make_database(tmp_path / "data", rows=1500)
    done = threading.Event()
    committed: list[int] = []

    def write() -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=10000")
        n = 1500
        deadline = time.monotonic() + WRITER_CAP_SECONDS
        while not done.is_set() and time.monotonic() < deadline:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO a VALUES (?, zeroblob(1000))", (n,))
            conn.execute("INSERT INTO b VALUES (?, zeroblob(1000))", (n,))
            conn.execute("COMMIT")
            n += 1
            committed.append(n)
            time.sleep(0.001)
        conn.close()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        while len(committed) < 20:  # the writer is committing
            time.sleep(0.01)
        before = len(committed)
        result = backup(tmp_path / "data", tmp_path / "copy.sqlite")
        still_writing = writer.is_alive()
    finally:
        done.set()
        writer.join()
    assert still_writing, "the backup only finished once the writer stopped"
    a, b = counts(tmp_path / "copy.sqlite")
    assert a == b, "the copy mixes two snapshots"
    assert a >= 1500 + before, "the copy misses commits made before it began"
    print(f"pages {result.pages}, restarts {result.restarts}, one step {result.one_step}")
