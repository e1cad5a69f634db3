"""The CLI with end-to-end encryption: a send to a user without keys is
queued (exit 4, with the reason) and goes out once they have run a client;
``roost safety-number`` prints the same number on both sides and marks a
contact verified."""

from __future__ import annotations

import re
from pathlib import Path

from tests.e2e.helpers import add_users
from tests.e2e.server import ServerProcess
from tests.e2e.test_cli import client_args, json_lines, roost

SAFETY = re.compile(r"^(\d{5} ){11}\d{5}$")


def test_send_to_a_user_without_keys_is_queued_then_goes_out(server: ServerProcess, tmp_path: Path) -> None:
    tokens = add_users(server, ["alice", "bob"])
    alice = client_args(server, tokens["alice"], tmp_path / "alice.state")
    bob = client_args(server, tokens["bob"], tmp_path / "bob.state")

    first = roost(tmp_path, "send", *alice, "--to", "bob", "before bob had keys", "--timeout", "20")
    assert first.returncode == 4, first.stderr
    (out,) = json_lines(first.stdout)
    assert out["status"] == "queued" and "bob's encryption keys" in out["error"]
    assert "has not started a Roost client yet" in first.stderr and "queued in the outbox" in first.stderr

    # bob's first client publishes his keys; alice's next client sends what waited, then the new one.
    nothing = roost(tmp_path, "listen", *bob, "--timeout", "3")
    assert nothing.returncode == 0 and nothing.stdout == "", nothing.stderr
    second = roost(tmp_path, "send", *alice, "--to", "bob", "after")
    assert second.returncode == 0, second.stderr
    got = roost(tmp_path, "listen", *bob, "--count", "2", "--timeout", "30")
    assert got.returncode == 0, got.stderr
    assert [m["text"] for m in json_lines(got.stdout)] == ["before bob had keys", "after"]


def test_safety_numbers_match_on_both_sides_and_verify_marks_the_contact(
    server: ServerProcess, tmp_path: Path
) -> None:
    tokens = add_users(server, ["alice", "bob"])
    alice = client_args(server, tokens["alice"], tmp_path / "alice.state")
    bob = client_args(server, tokens["bob"], tmp_path / "bob.state")
    assert roost(tmp_path, "listen", *bob, "--timeout", "2").returncode == 0  # bob's keys are published

    mine = roost(tmp_path, "safety-number", *alice, "--with", "bob")
    assert mine.returncode == 0, mine.stderr
    assert SAFETY.match(mine.stdout.strip()), mine.stdout
    assert "not verified" in mine.stderr
    theirs = roost(tmp_path, "safety-number", *bob, "--with", "alice")
    assert theirs.returncode == 0, theirs.stderr
    assert theirs.stdout == mine.stdout  # the same 60 digits on both sides

    verified = roost(tmp_path, "safety-number", *alice, "--with", "bob", "--verify")
    assert verified.returncode == 0 and verified.stdout == mine.stdout
    assert ": verified" in verified.stderr
    again = roost(tmp_path, "safety-number", *alice, "--with", "bob")
    assert ": verified" in again.stderr  # kept in alice's state

    unknown = roost(tmp_path, "safety-number", *alice, "--with", "nobody")
    assert unknown.returncode == 1 and "unknown_user" in unknown.stderr
