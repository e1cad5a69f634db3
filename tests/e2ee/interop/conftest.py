"""The libsignal oracle: tests/e2ee/interop/oracle.js run under Node with @signalapp/libsignal-client.

The package is found at $ROOST_LIBSIGNAL_DIR or .ci/node in the repository
(.ci/run installs it there); without Node or the package the tests skip with
the reason (a failure under ROOST_REQUIRE_SERVICES=1).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
ORACLE = Path(__file__).with_name("oracle.js")

Oracle = Callable[[list[dict[str, Any]]], list[Any]]


def libsignal_dir() -> Path:
    return Path(os.environ.get("ROOST_LIBSIGNAL_DIR") or REPO / ".ci" / "node")


@pytest.fixture(scope="session")
def oracle() -> Oracle:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (the libsignal oracle runs under Node)")
    directory = libsignal_dir()
    if not (directory / "node_modules" / "@signalapp" / "libsignal-client").is_dir():
        pytest.skip(f"@signalapp/libsignal-client is not installed in {directory} (see .ci/run)")

    def ask(requests: list[dict[str, Any]]) -> list[Any]:
        done = subprocess.run(
            [node, str(ORACLE)],
            input=json.dumps(requests).encode(),
            capture_output=True,
            timeout=60,
            env={**os.environ, "ROOST_LIBSIGNAL_DIR": str(directory)},
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()
        answers: list[Any] = json.loads(done.stdout)
        return answers

    return ask
