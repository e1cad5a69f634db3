"""``roost backup`` beside a running server under load, ``roost restore`` into a
new data directory, and the refusals. Real ``roost`` subprocesses throughout."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from roost.core.ids import direct_conv_id
from roost.store.sqlite import database_path
from tests.cli_subprocess import ROOST, run_roost
from tests.e2e.helpers import RawWS, add_users, b64, unb64
from tests.e2e.server import ServerProcess

pytestmark = pytest.mark.embedded_only

CONV = direct_conv_id("alice", "bob")
BODY = "x" * 900  # a few messages a page: the database spans many backup steps
PIPELINE = 20  # sends in flight at once


def roost(*args: str) -> subprocess.CompletedProcess[str]:
    return run_roost(*args, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=60)


def assert_refused(out: subprocess.CompletedProcess[str], *mentions: str) -> None:
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    for text in mentions:
        assert text in lines[0], (text, lines[0])


class Load:
    """alice sends to bob in pipelined batches until stopped; remembers every ✓."""

    def __init__(self, raw: RawWS) -> None:
        self.raw = raw
        self.acked: list[str] = []
        self.sent = 0
        self.stop = asyncio.Event()

    async def batch(self) -> None:
        ids = [f"m{self.sent + i}" for i in range(PIPELINE)]
        self.sent += PIPELINE
        for mid in ids:
            await self.raw.send({"type": "send", "id": mid, "to": "bob", "body": b64(f"{mid} {BODY}")})
        for mid in ids:
            ack = await self.raw.recv_type("ack")
            assert ack["id"] == mid, ack
            self.acked.append(mid)

    async def run(self) -> None:
        while not self.stop.is_set():
            await self.batch()


async def history_ids(srv: ServerProcess, token: str) -> set[str]:
    raw = await RawWS.open(srv, token)
    try:
        ids: set[str] = set()
        after = 0
        while True:
            await raw.send({"type": "history", "conv": CONV, "after": after, "limit": 200, "ref": "h"})
            page = await raw.recv_type("history_page")
            for m in page["messages"]:
                assert unb64(m["body"]).decode() == f"{m['id']} {BODY}"
                ids.add(m["id"])
            if not page["messages"] or page["messages"][-1]["seq"] >= page["last_seq"]:
                return ids
            after = page["messages"][-1]["seq"]
    finally:
        await raw.close()


async def test_a_backup_under_load_restores_every_message_acked_before_it(
    server: ServerProcess, make_server, tmp_path: Path
) -> None:
    tokens = add_users(server, ["alice", "bob"])
    load = Load(await RawWS.open(server, tokens["alice"]))
    for _ in range(50):  # ~1,000 messages: the database spans many backup steps
        await load.batch()
    # A reader that keeps its snapshot (as a long `roost user list` would)
    # stops checkpoints at this point: what the load commits from here on is
    # only in the WAL when the backup runs, which a copy of the file alone misses.
    pin = sqlite3.connect(database_path(server.data_dir))
    pin.execute("PRAGMA wal_checkpoint(PASSIVE)")  # the file alone holds the first ~1,000
    pin.execute("BEGIN")
    pin.execute("SELECT count(*) FROM messages").fetchone()
    running = asyncio.create_task(load.run())
    try:
        await asyncio.sleep(0.2)  # the steady load is running: wait for its ✓s to move
        acked_before = list(load.acked)
        assert len(acked_before) > 1000
        backup_file = tmp_path / "roost.backup"
        proc = await asyncio.create_subprocess_exec(
            *ROOST,
            "backup",
            "--data-dir",
            str(server.data_dir),
            "--to",
            str(backup_file),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        acked_during = len(load.acked) - len(acked_before)
        assert acked_during > 0, "the server must keep acking sends while the backup runs"
    finally:
        pin.close()
        load.stop.set()
        await asyncio.wait_for(running, 30)
        await load.raw.close()
    assert server.terminate() == 0

    restored = make_server(start=False)  # a new, empty data directory
    out_restore = roost("restore", "--from", str(backup_file), "--data-dir", str(restored.data_dir))
    assert out_restore.returncode == 0, out_restore.stderr
    restored.start()
    present = await history_ids(restored, tokens["alice"])
    missing = [mid for mid in acked_before if mid not in present]
    assert not missing, f"{len(missing)} messages acked before the backup are gone, e.g. {missing[:5]}"
    assert present <= set(load.acked), "the backup holds only messages the server acked"
    print(f"backup: {out.decode().strip()}; {len(acked_before)} acked before, {acked_during} during")


def test_restore_refuses_while_a_server_holds_the_data_dir(server: ServerProcess, tmp_path: Path) -> None:
    add_users(server, ["alice"])
    backup_file = tmp_path / "b.sqlite"
    assert roost("backup", "--data-dir", str(server.data_dir), "--to", str(backup_file)).returncode == 0
    before = database_path(server.data_dir).read_bytes()
    assert server.proc is not None
    refused = roost("restore", "--from", str(backup_file), "--data-dir", str(server.data_dir), "--force")
    assert_refused(refused, str(server.data_dir), f"pid {server.proc.pid}")
    assert database_path(server.data_dir).read_bytes() == before
    assert server.proc.poll() is None


def test_restore_refuses_an_existing_database_unless_forced(server: ServerProcess, tmp_path: Path) -> None:
    add_users(server, ["alice"])
    backup_file = tmp_path / "b.sqlite"
    assert roost("backup", "--data-dir", str(server.data_dir), "--to", str(backup_file)).returncode == 0
    again = roost("backup", "--data-dir", str(server.data_dir), "--to", str(backup_file))
    assert_refused(again, str(backup_file), "--force")
    live = database_path(server.data_dir)
    onto_itself = roost("backup", "--data-dir", str(server.data_dir), "--to", str(live), "--force")
    assert_refused(onto_itself, str(live), "the database being backed up")
    server.add_user("carol")  # only in the live database, not in the backup
    # Killed: its last commits stay in roost.sqlite-wal, which must not be
    # replayed onto the restored database.
    server.kill9()
    assert database_path(server.data_dir).with_name("roost.sqlite-wal").stat().st_size > 0
    refused = roost("restore", "--from", str(backup_file), "--data-dir", str(server.data_dir))
    assert_refused(refused, str(server.data_dir), "--force")
    forced = roost("restore", "--from", str(backup_file), "--data-dir", str(server.data_dir), "--force")
    assert forced.returncode == 0, forced.stderr
    server.start()
    users = roost("user", "list", "--data-dir", str(server.data_dir), "--json")
    assert users.returncode == 0, users.stderr
    assert '"alice"' in users.stdout and '"carol"' not in users.stdout


@pytest.mark.parametrize(
    "content", [b"", b"not a database at all", b"sqlite-but-not-roost", b"future-schema"]
)
def test_restore_refuses_a_file_that_is_not_a_supported_roost_database(
    tmp_path: Path, content: bytes
) -> None:
    bad = tmp_path / "bad.sqlite"
    if content in (b"sqlite-but-not-roost", b"future-schema"):
        conn = sqlite3.connect(bad)
        if content == b"future-schema":
            conn.executescript(
                "CREATE TABLE users(x); CREATE TABLE conversations(x);"
                " CREATE TABLE members(x); CREATE TABLE messages(x); PRAGMA user_version=999;"
            )
        else:
            conn.execute("CREATE TABLE notes(x)")
        conn.commit()
        conn.close()
    else:
        bad.write_bytes(content)
    data_dir = tmp_path / "data"
    refused = roost("restore", "--from", str(bad), "--data-dir", str(data_dir))
    assert_refused(refused, str(bad))
    assert not database_path(data_dir).exists()


def test_backup_of_a_missing_database_is_refused(tmp_path: Path) -> None:
    refused = roost("backup", "--data-dir", str(tmp_path / "typo"), "--to", str(tmp_path / "b"))
    assert_refused(refused, str(tmp_path / "typo"))
    assert not (tmp_path / "b").exists()
