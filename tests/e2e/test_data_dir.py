"""The embedded data directory: one ``roost serve`` at a time, clear errors, no
accidental fresh databases. Real ``roost`` subprocesses throughout."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from roost.store.sqlite import database_path
from tests.cli_subprocess import run_roost
from tests.e2e.helpers import RawWS
from tests.e2e.server import ServerProcess, free_port

# The server fixture (tests/e2e/conftest.py) in its embedded mode: these are about the data directory.
pytestmark = pytest.mark.embedded_only


def roost(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return run_roost(*args, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=timeout)


def assert_one_line_error(out: subprocess.CompletedProcess[str], *mentions: str) -> None:
    assert out.returncode == 1, (out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    for text in mentions:
        assert text in lines[0], (text, lines[0])


def test_a_second_server_on_the_same_data_dir_exits_at_once_naming_the_holder(
    server: ServerProcess,
) -> None:
    assert server.proc is not None
    second = roost("serve", "--data-dir", str(server.data_dir), "--port", str(free_port()), timeout=15)
    assert_one_line_error(second, str(server.data_dir), f"pid {server.proc.pid}")
    assert server.proc.poll() is None, "the first server must keep running"


async def test_the_lock_dies_with_its_server(server: ServerProcess) -> None:
    # kill -9 leaves serve.lock behind; the kernel has dropped the flock, so a
    # new server starts on the same data and still knows its accounts.
    token = server.add_user("alice")
    server.kill9()
    server.start()
    ws = await RawWS.open(server, token)
    await ws.close()


async def test_user_add_beside_a_running_server_is_seen_by_it(server: ServerProcess) -> None:
    out = roost("user", "add", "alice", "--data-dir", str(server.data_dir))
    assert out.returncode == 0, out.stderr
    ws = await RawWS.open(server, out.stdout.strip().splitlines()[-1])  # asserts the welcome
    await ws.close()


@pytest.mark.parametrize("layout", ["parent is a file", "data dir is a file"])
def test_an_unusable_data_dir_is_one_line_naming_it(tmp_path: Path, layout: str) -> None:
    blocker = tmp_path / "occupied"
    blocker.write_text("not a directory")
    data_dir = blocker / "data" if layout == "parent is a file" else blocker
    out = roost("serve", "--data-dir", str(data_dir), "--port", str(free_port()), timeout=15)
    assert_one_line_error(out, str(data_dir))


def test_user_add_refuses_a_missing_data_dir_unless_asked_to_create(tmp_path: Path) -> None:
    missing = tmp_path / "typo"
    refused = roost("user", "add", "alice", "--data-dir", str(missing))
    assert_one_line_error(refused, str(missing), "--create")
    assert not missing.exists(), "a refused user add must create nothing"

    empty = tmp_path / "empty"
    empty.mkdir()
    refused = roost("user", "add", "alice", "--data-dir", str(empty))
    assert_one_line_error(refused, str(empty), "--create")
    assert list(empty.iterdir()) == []

    created = roost("user", "add", "alice", "--data-dir", str(missing), "--create")
    assert created.returncode == 0, created.stderr
    assert database_path(missing).is_file()
    # Once the database exists, no flag is needed.
    again = roost("user", "add", "bob", "--data-dir", str(missing))
    assert again.returncode == 0, again.stderr
