"""Fixtures for the end-to-end tests: every test runs in two modes.

``embedded``: one ``roost serve`` (SQLite, in-process registry), ``ServerProcess``.
``cluster``: two gateways on one PostgreSQL and one Redis, ``ClusterServer``
(tests/e2e/cluster.py); PostgreSQL and Redis are started once per session,
each test gets a fresh database and an empty Redis. The cluster runs carry the
``redis`` and ``postgres`` markers and are skipped (with the reason) only when
those binaries are missing; with ROOST_REQUIRE_SERVICES=1 such a skip fails.

A test marked ``embedded_only`` runs in the embedded mode only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TypeAlias

import pytest

from roost.devcluster.postgres import PgUnavailable
from tests.e2e.cluster import ClusterServer, ClusterServices
from tests.e2e.server import ServerProcess

AnyServer: TypeAlias = ServerProcess | ClusterServer

MODES = ("embedded", "cluster")
CLUSTER_MARKS = (pytest.mark.redis, pytest.mark.postgres)

_servers_key = pytest.StashKey[list[AnyServer]]()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "mode" not in metafunc.fixturenames:
        return
    if metafunc.definition.get_closest_marker("embedded_only"):
        params = [pytest.param("embedded", id="embedded")]
    else:
        params = [
            pytest.param("embedded", id="embedded"),
            pytest.param("cluster", id="cluster", marks=CLUSTER_MARKS),
        ]
    metafunc.parametrize("mode", params, indirect=True, scope="function")


@pytest.fixture
def mode(request: pytest.FixtureRequest) -> str:
    """``embedded`` or ``cluster`` (parametrized by ``pytest_generate_tests``)."""
    return request.param


@pytest.fixture(scope="session")
def cluster_services() -> Iterator[ClusterServices]:
    """PostgreSQL + Redis for every cluster-mode test of the session."""
    try:
        services = ClusterServices()
    except PgUnavailable as exc:
        pytest.skip(f"PostgreSQL server binaries missing: {exc}")
    except FileNotFoundError as exc:  # RedisServer: no redis-server on PATH
        pytest.skip(f"redis-server missing: {exc}")
    services.start()
    try:
        yield services
    finally:
        services.close()


@pytest.fixture
def make_server(mode: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator:
    """Factory for servers with extra flags: ``make_server("--rate-limit", "5")``.

    In cluster mode the flags go to every gateway; each server gets its own database."""
    started: list[AnyServer] = []
    request.node.stash[_servers_key] = started
    services: ClusterServices | None = None
    if mode == "cluster":
        services = request.getfixturevalue("cluster_services")
        services.flush_redis()

    def make(*args: str, start: bool = True) -> AnyServer:
        data_dir = tmp_path / f"data{len(started)}"
        data_dir.mkdir(parents=True)
        srv: AnyServer
        if services is None:
            srv = ServerProcess(data_dir, extra_args=list(args))
        else:
            srv = ClusterServer(services, data_dir, extra_args=list(args))
        started.append(srv)
        if start:
            srv.start()
        return srv

    try:
        yield make
    finally:
        for srv in started:
            srv.stop()


@pytest.fixture
def server(make_server) -> AnyServer:
    """A running server (or cluster) with fresh state; killed after the test."""
    return make_server()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """A failed test's report carries the tail of its servers' logs."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when in ("setup", "call"):
        for i, srv in enumerate(item.stash.get(_servers_key, [])):
            report.sections.append((f"server {i} ({srv.mode}) log", srv.log()))
