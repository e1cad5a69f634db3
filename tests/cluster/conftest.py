"""Fixtures for the cluster tests: a throwaway PostgreSQL + Redis + N ``roost serve`` gateways.

Each test module gets one ``DevCluster`` (starting PostgreSQL costs a couple of
seconds). Tests keep out of each other's way by using their own user names
(``names``), never shared ones. A test that breaks the cluster (kills a
gateway, restarts PostgreSQL or Redis) leaves it to ``healthy_cluster`` to
bring every part back before the next test.

Only the launchers' "binaries missing" exceptions skip (``PgUnavailable``,
``FileNotFoundError`` from ``RedisServer``); anything else is an error.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator

import pytest

from roost.devcluster.postgres import PgUnavailable
from roost.devcluster.run import DevCluster, wait_healthy

DEBOUNCE = "0.5"  # --presence-debounce for every gateway here (seconds)

_counter = itertools.count(1)


def start_cluster(gateways: int, extra_args: list[str] | None = None) -> DevCluster:
    args = ["--presence-debounce", DEBOUNCE, *(extra_args or [])]
    cluster = DevCluster(gateways, extra_args=args)
    try:
        cluster.start()
    except PgUnavailable as exc:
        cluster.stop()
        pytest.skip(f"PostgreSQL server binaries missing: {exc}")
    except FileNotFoundError as exc:  # RedisServer: no redis-server on PATH
        cluster.stop()
        pytest.skip(f"redis-server missing: {exc}")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def gateway_log(cluster: DevCluster, i: int, lines: int = 40) -> str:
    try:
        text = (cluster.root / f"gw{i}.log").read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)


def _heal(cluster: DevCluster) -> None:
    """Bring every stopped part of ``cluster`` back (same ports, same data)."""
    assert cluster.pg is not None and cluster.redis is not None
    if not cluster.pg.running:
        cluster.pg.start()
    if cluster.redis.process is None or cluster.redis.process.poll() is not None:
        cluster.redis.start()
    for i, (url, proc) in enumerate(list(cluster.gateways)):
        if proc.poll() is not None:
            cluster.start_gateway(i, port=int(url.rsplit(":", 1)[1]))
        else:
            wait_healthy(url, proc)


@pytest.fixture
def names(request: pytest.FixtureRequest):
    """``names("alice", "bob")`` -> user names unique to this test (``alice-7``, ...)."""
    n = next(_counter)
    short = re.sub(r"[^a-z0-9]", "", request.node.name.lower())[-6:]

    def make(*bases: str) -> list[str]:
        out = [f"{b}-{short}{n}"[:32] for b in bases]
        assert len(set(out)) == len(out)
        return out

    return make


def _dump_logs_on_failure(request: pytest.FixtureRequest, cluster: DevCluster) -> None:
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for i in range(len(cluster.gateways)):
            print(f"----- gw{i}.log (tail) -----\n{gateway_log(cluster, i)}")


@pytest.fixture(scope="module")
def cluster3() -> Iterator[DevCluster]:
    """Three gateways, for this module's tests (presence debounce 0.5 s)."""
    cluster = start_cluster(3)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def cluster2() -> Iterator[DevCluster]:
    """Two gateways, for this module's tests (presence debounce 0.5 s)."""
    cluster = start_cluster(2)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(cluster3: DevCluster, request: pytest.FixtureRequest) -> Iterator[DevCluster]:
    """The module's three-gateway cluster, whole before the test; logs printed on failure."""
    started = time.monotonic()
    _heal(cluster3)
    assert time.monotonic() - started < 60
    yield cluster3
    _dump_logs_on_failure(request, cluster3)


@pytest.fixture
def pair(cluster2: DevCluster, request: pytest.FixtureRequest) -> Iterator[DevCluster]:
    """The module's two-gateway cluster, whole before the test; logs printed on failure."""
    _heal(cluster2)
    yield cluster2
    _dump_logs_on_failure(request, cluster2)
