from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.server import ServerProcess


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A running server with a fresh data dir; killed after the test."""
    srv = ServerProcess(tmp_path / "data")
    srv.data_dir.mkdir(parents=True)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator:
    """Factory for servers with extra flags: ``make_server("--rate-limit", "5")``."""
    started: list[ServerProcess] = []

    def make(*args: str, start: bool = True) -> ServerProcess:
        srv = ServerProcess(tmp_path / f"data{len(started)}", extra_args=list(args))
        srv.data_dir.mkdir(parents=True)
        started.append(srv)
        if start:
            srv.start()
        return srv

    try:
        yield make
    finally:
        for srv in started:
            srv.stop()
