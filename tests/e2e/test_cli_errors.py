"""Client commands fail fast with one line that says what is wrong, and find
their server and token in flags, the environment or the ``roost login`` profile.

Real subprocesses and real sockets: a closed port, the plain-HTTP server
spoken to with https, a bad token, a path that is not a Roost server.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from roost.client.state import ClientState
from roost.protocol.frames import MAX_BODY_BYTES
from tests.cli_subprocess import ROOST, run_on_terminal, run_roost
from tests.e2e.helpers import add_users
from tests.e2e.server import ServerProcess, free_port

pytestmark = pytest.mark.embedded_only


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ROOST_URL", "ROOST_TOKEN")}
    env.update(
        XDG_STATE_HOME=str(tmp_path / "xdg-state"), XDG_CONFIG_HOME=str(tmp_path / "xdg-config"), **extra
    )
    return env


def roost(
    tmp_path: Path, *args: str, stdin: str = "", timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    return run_roost(*args, env=_env(tmp_path, **env), stdin=stdin, timeout=timeout)


def roost_on_terminal(tmp_path: Path, *args: str, timeout: float = 60) -> tuple[int, str]:
    """Run with stdout and stderr on a pseudo-terminal; returns (exit code, all output)."""
    return run_on_terminal([*ROOST, *args], env=_env(tmp_path), timeout=timeout)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


@pytest.fixture
def alice(server: ServerProcess, tmp_path: Path) -> str:
    tokens = add_users(server, ["alice", "bob"])
    # bob's first client publishes his end-to-end keys: a message to a user
    # who never ran a client waits in the sender's outbox (exit 4) by design.
    published = roost(tmp_path, "listen", *flags(server, tokens["bob"], tmp_path, "bob"), "--timeout", "1")
    assert published.returncode == 0, published.stderr
    return tokens["alice"]


def flags(server: ServerProcess, token: str, tmp_path: Path, name: str = "alice") -> list[str]:
    return ["--url", server.url, "--token", token, "--state", str(tmp_path / f"{name}.state")]


def test_too_large_and_empty_messages_are_refused_at_once(
    server: ServerProcess, alice: str, tmp_path: Path
) -> None:
    bob = add_users(server, ["bob2"])  # a fresh account with an empty inbox
    target = ["--to", "bob2"]
    start = time.monotonic()
    too_large = roost(tmp_path, "send", *flags(server, alice, tmp_path), *target, "x" * (MAX_BODY_BYTES + 1))
    assert too_large.returncode == 2
    assert f"{MAX_BODY_BYTES:,}" in one_line(too_large.stderr) and "64 KiB" in too_large.stderr
    assert too_large.stdout == ""
    for text in ("", "   ", "\t\n "):
        empty = roost(tmp_path, "send", *flags(server, alice, tmp_path), *target, text)
        assert empty.returncode == 2, repr(text)
        assert "empty" in one_line(empty.stderr)
    assert time.monotonic() - start < 15
    # Nothing was queued: the next send is seq 1 and bob gets only it (once
    # his first client published his keys).
    published = roost(tmp_path, "listen", *flags(server, bob["bob2"], tmp_path, "bob2"), "--timeout", "1")
    assert published.returncode == 0, published.stderr
    at_limit = roost(tmp_path, "send", *flags(server, alice, tmp_path), *target, "y" * MAX_BODY_BYTES)
    assert at_limit.returncode == 0, at_limit.stderr
    assert json.loads(at_limit.stdout)["seq"] == 1
    listen = roost(tmp_path, "listen", *flags(server, bob["bob2"], tmp_path, "bob2"), "--timeout", "2")
    got = [json.loads(line) for line in listen.stdout.splitlines()]
    assert [len(m["text"]) for m in got] == [MAX_BODY_BYTES]


@pytest.mark.parametrize(
    ("url", "token", "expected"),
    [
        ("ftp://127.0.0.1:8765", "t", "must start with http://"),
        ("127.0.0.1:8765", "t", "must start with http://"),
        ("localhost:8765", "t", "must start with http://"),
        ("http://", "t", "must start with http://"),
        ("http://127.0.0.1:port", "t", "bad server URL"),
        ("http://127.0.0.1:8765", "", "token is empty"),
        ("http://127.0.0.1:8765", "  ", "token is empty"),
    ],
)
def test_bad_url_or_empty_token_is_a_usage_error(tmp_path: Path, url: str, token: str, expected: str) -> None:
    start = time.monotonic()
    out = roost(tmp_path, "send", "--url", url, "--token", token, "--to", "bob", "hi")
    assert out.returncode == 2
    assert expected in one_line(out.stderr)
    assert time.monotonic() - start < 10


def test_connection_failures_say_what_failed(server: ServerProcess, alice: str, tmp_path: Path) -> None:
    cases = [
        # A server that is down: retried until --timeout, then the reason; the
        # message stays queued in the outbox (exit 4) for the next client.
        (f"http://127.0.0.1:{free_port()}", alice, "2", "connection refused", 4),
        # https to the plain-HTTP server: the TLS handshake fails; no retry.
        (server.url.replace("http://", "https://"), alice, "30", "TLS handshake failed", 1),
        # Something that is not a Roost server (no WebSocket at that path).
        (server.url + "/not-roost", alice, "30", "HTTP 404", 1),
        # A token the server does not know.
        (server.url, "rt_not-a-token", "30", "auth_failed", 1),
    ]
    for i, (url, token, timeout, expected, code) in enumerate(cases):
        state = tmp_path / f"case{i}.state"
        start = time.monotonic()
        out = roost(
            tmp_path,
            *("send", "--url", url, "--token", token, "--state", str(state)),
            *("--timeout", timeout, "--to", "bob", "x"),
        )
        elapsed = time.monotonic() - start
        assert out.returncode == code, (url, out.stderr)
        line = one_line(out.stderr)
        assert expected in line and line.startswith("roost send: "), line
        assert elapsed < (float(timeout) + 8 if timeout == "2" else 10), (url, elapsed)
        # Queued (4) stays in the outbox for the next client; a final failure
        # (1) would fail the same way again, so nothing is left to resend.
        held = ClientState(state)
        try:
            assert len(held.outbox()) == (1 if code == 4 else 0), (url, held.outbox())
        finally:
            held.close()


def test_retry_line_only_on_a_terminal(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    args = ("listen", "--url", dead, "--token", "t", "--timeout", "2")
    code, out = roost_on_terminal(tmp_path, *args)
    assert code == 1
    assert "retrying in" in out and "connection refused" in out, out
    assert out.rstrip().endswith("connection refused by 127.0.0.1:" + dead.rsplit(":", 1)[1]), out
    piped = roost(tmp_path, *args)
    assert piped.returncode == 1
    assert "retrying" not in piped.stderr and "connection refused" in one_line(piped.stderr)


def test_login_profile_env_and_flags(server: ServerProcess, alice: str, tmp_path: Path) -> None:
    profile = tmp_path / "xdg-config" / "roost" / "profile.json"
    dead = f"http://127.0.0.1:{free_port()}"

    none = roost(tmp_path, "send", "--to", "bob", "x")
    assert none.returncode == 2 and "roost login" in one_line(none.stderr)

    # A bad token is checked and not saved.
    refused = roost(tmp_path, "login", "--url", server.url, "--token", "-", stdin="rt_wrong\n")
    assert refused.returncode == 1 and "auth_failed" in one_line(refused.stderr)
    assert refused.stderr.startswith("roost login: auth_failed: ") and "; nothing saved" in refused.stderr
    assert not profile.exists()

    # So is one for a server that cannot be reached.
    unreachable = roost(tmp_path, "login", "--url", dead, "--token", "-", stdin=alice + "\n")
    assert unreachable.returncode == 1 and "connection refused" in one_line(unreachable.stderr)
    assert unreachable.stderr.startswith("roost login: cannot reach the server: ")
    assert unreachable.stderr.rstrip().endswith("; nothing saved")
    assert not profile.exists()
    empty = roost(tmp_path, "login", "--url", server.url, stdin="\n")  # no --token: read from stdin
    assert empty.returncode == 2 and "token is empty" in one_line(empty.stderr)

    # The token read from stdin (not the command line) is saved, owner-only.
    login = roost(tmp_path, "login", "--url", server.url, "--token", "-", stdin=alice + "\n")
    assert login.returncode == 0, login.stderr
    assert "logged in as alice" in login.stdout
    assert stat.S_IMODE(profile.stat().st_mode) == 0o600
    assert stat.S_IMODE(profile.parent.stat().st_mode) == 0o700
    assert json.loads(profile.read_text()) == {"urls": [server.url], "token": alice}

    sent = roost(tmp_path, "send", "--to", "bob", "from the profile")
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout)["conversation"] == "d:alice:bob"

    # The environment wins over the profile (its dead URL fails: queued, exit 4) ...
    env_url = roost(tmp_path, "send", "--to", "bob", "--timeout", "1", "x", ROOST_URL=dead, ROOST_TOKEN=alice)
    assert env_url.returncode == 4 and "connection refused" in env_url.stderr
    # ... and a flag wins over the environment.
    flag_url = roost(tmp_path, "send", "--url", server.url, "--to", "bob", "flag", ROOST_URL=dead)
    assert flag_url.returncode == 0, flag_url.stderr
    # The profile's token goes only to the profile's URL, never to another server.
    other = roost(tmp_path, "send", "--url", dead, "--to", "bob", "x")
    assert other.returncode == 2 and "no token for that URL" in one_line(other.stderr)
    # A bad token in the environment wins over the good one in the profile.
    bad_env = roost(tmp_path, "send", "--to", "bob", "x", ROOST_TOKEN="rt_wrong")
    assert bad_env.returncode == 1 and "auth_failed" in bad_env.stderr

    logout = roost(tmp_path, "logout")
    assert logout.returncode == 0 and not profile.exists()
    after = roost(tmp_path, "send", "--to", "bob", "x")
    assert after.returncode == 2 and "roost login" in after.stderr
