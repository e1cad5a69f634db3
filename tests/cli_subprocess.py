"""Run the ``roost`` command as a real subprocess: piped, or on a pseudo-terminal.

Each test module keeps its own thin wrapper for the environment it needs
(a private XDG state directory, no ROOST_URL, ...); how the process is run and
read lives here once."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOST = (sys.executable, "-m", "roost.cli.main")


def run_roost(
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: Path = REPO,
    stdin: str | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """``roost ARGS`` with stdout and stderr captured as text."""
    return subprocess.run(
        [*ROOST, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=dict(os.environ if env is None else env),
    )


def run_on_terminal(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path = REPO,
    timeout: float = 60,
    columns: int | None = None,
) -> tuple[int, str]:
    """Run ARGV with stdout and stderr on a pseudo-terminal (``columns`` wide if
    given); returns (exit code, all it wrote). Reading stops when the child
    closes the terminal or ``timeout`` passes."""
    leader, follower = pty.openpty()
    if columns is not None:
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        cwd=cwd,
        env=dict(os.environ if env is None else env),
    )
    os.close(follower)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    return proc.wait(timeout=10), out.decode(errors="replace")
