"""One running client per state file: a second one is refused with a clear error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from roost.cli.main import main
from roost.client import Client, StateInUse
from roost.client.state import ClientState

HOLD = """
import sys, time
from roost.client.state import ClientState
state = ClientState(sys.argv[1])
print("holding", flush=True)
time.sleep(60)
"""


def test_a_second_client_on_one_state_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    path = tmp_path / "alice.sqlite"
    first = ClientState(path)
    with pytest.raises(StateInUse, match=rf"in use by another running client \(pid {os.getpid()}\)"):
        ClientState(path)
    with pytest.raises(StateInUse):
        Client("ws://127.0.0.1:9/v1/ws", "token", state_path=path)
    first.close()
    second = ClientState(path)  # free again
    second.close()


def test_the_lock_dies_with_a_killed_client_process(tmp_path: Path) -> None:
    path = tmp_path / "alice.sqlite"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        with pytest.raises(StateInUse, match=rf"pid {holder.pid}"):
            ClientState(path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    deadline = time.monotonic() + 5
    while True:  # the kernel drops the lock with the process
        try:
            ClientState(path).close()
            break
        except StateInUse:
            assert time.monotonic() < deadline, "lock still held after kill -9"
            time.sleep(0.05)


def test_the_cli_says_why_instead_of_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "alice.sqlite"
    held = ClientState(path)
    try:
        argv = ["send", "--url", "ws://127.0.0.1:9/v1/ws", "--token", "t", "--state", str(path)]
        assert main([*argv, "--to", "bob", "hello"]) == 1
    finally:
        held.close()
    err = capsys.readouterr().err
    assert "in use by another running client" in err
    # Never the advice that would break the running client: a second state
    # means a second connection of the account, which replaces the first (4003).
    assert "state file" not in err and "--state" not in err
