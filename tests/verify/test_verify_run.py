"""Short real verify runs: server/cluster processes, client processes, every nemesis on."""

from __future__ import annotations

import pytest

from roost.devcluster.postgres import PgUnavailable
from roost.verify.run import (
    CLIENT_NEMESES,
    NEMESES,
    STORAGE_NEMESES,
    VerifyConfig,
    exit_code,
    verify,
    verify_embedded,
)
from roost.verify.storage_faults import compiler
from roost.verify.targets import EmbeddedTarget


def assert_meaningful_and_clean(result, min_acked: int) -> None:  # type: ignore[no-untyped-def]
    report = result.report
    assert report.violations == [], report.violations[:5]
    assert result.converged
    assert report.acked >= min_acked and report.delivered >= report.acked // 2
    assert sum(result.faults.values()) >= 2, result.faults
    assert exit_code(result, nemeses_wanted=True) == 0
    document = result.as_json()
    assert document["violations"] == [] and document["acked"] == report.acked
    assert document["latency_ms"]["all"]["p50"] is not None


async def test_short_embedded_run_under_faults_has_no_violations() -> None:
    result = await verify_embedded(clients=12, duration=15.0, seed=11, rate=40.0, nemeses=NEMESES)
    assert_meaningful_and_clean(result, min_acked=300)
    storage = STORAGE_NEMESES if compiler() is not None else ()  # the shim needs cc
    assert set(result.faults) == {"kill-server", *storage, *CLIENT_NEMESES}


@pytest.mark.redis
@pytest.mark.postgres
async def test_short_cluster_run_under_faults_has_no_violations() -> None:
    config = VerifyConfig("cluster", clients=12, duration=25.0, seed=12, rate=40.0, per_process=4)
    try:
        result = await verify(config)
    except PgUnavailable as exc:
        pytest.skip(f"PostgreSQL server binaries missing: {exc}")
    assert_meaningful_and_clean(result, min_acked=500)
    server_side = ("kill-gateway", "restart-redis", "restart-postgres")
    assert set(server_side) <= set(result.faults)
    assert sum(result.faults[k] for k in server_side) >= 1, result.faults


async def test_url_mode_injects_client_faults_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = EmbeddedTarget(tmp_path)
    server.start()
    try:
        config = VerifyConfig(
            "url", clients=8, duration=12.0, seed=13, rate=30.0, per_process=4,
            urls=server.urls, store=str(server.server.data_dir),
        )  # fmt: skip
        result = await verify(config)
    finally:
        server.stop()
    assert set(result.faults) == {"cut-connection", "blackhole", "crash-client"}
    assert_meaningful_and_clean(result, min_acked=150)


async def test_url_mode_without_a_store_is_refused() -> None:
    with pytest.raises(ValueError, match="--store"):
        await verify(VerifyConfig("url", urls=["http://127.0.0.1:1"]))
