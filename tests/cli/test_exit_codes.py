"""Usage errors of the long commands exit 2 with one line, like argparse's own."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli_subprocess import run_roost


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ("simulate", "--seeds", "1", "--faults", "cut,bogus"),
            "roost simulate: unknown fault kind(s) bogus",
        ),
        (("bench", "reconnect-storm", "--cluster", "1"), "roost bench: reconnect-storm needs a cluster"),
        (("bench", "reconnect-storm"), "roost bench: reconnect-storm needs a cluster"),
        (("send", "--to", "bob"), "roost send: give the message TEXT, or --file PATH"),
        (("send", "--to", "bob", "--file", "/no/such/file"), "roost send: --file /no/such/file: no such"),
        # A negative cap would refuse every connection; a deadline of 0 would close each at once.
        (("serve", "--max-unauthenticated", "-1"), "argument --max-unauthenticated: must be 0 or more"),
        (("serve", "--max-unauthenticated-per-address", "-3"), "must be 0 or more"),
        (("serve", "--handshake-timeout", "0"), "argument --handshake-timeout: must be more than 0"),
        (("serve", "--handshake-timeout", "nan"), "argument --handshake-timeout: must be more than 0"),
        (("serve", "--max-unauthenticated", "many"), "not a whole number: 'many'"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: tuple[str, ...], expected: str) -> None:
    out = run_roost(
        *args,
        env={"PATH": "/usr/bin:/bin", "XDG_CONFIG_HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path)},
    )
    assert out.returncode == 2, out.stderr
    assert expected in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
