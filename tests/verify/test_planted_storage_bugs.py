"""``roost verify --embedded`` with storage faults catches rollback bugs planted in the server.

Each test starts verify against a server whose ``SqliteStore._run_batch``
is a patched copy of the real one (a ``sitecustomize`` on the server's
PYTHONPATH rewrites one line of its source at start-up), with only the
storage nemeses on, and asserts verify reports the violation under the
invariant it breaks. The correct server under the same faults is clean.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from roost.verify.run import STORAGE_NEMESES, VerifyConfig, VerifyResult, exit_code, verify
from roost.verify.storage_faults import compiler

# CI (ROOST_REQUIRE_SERVICES=1) installs a compiler: there a missing one fails these tests.
pytestmark = pytest.mark.skipif(
    compiler() is None and os.environ.get("ROOST_REQUIRE_SERVICES") != "1",
    reason="no C compiler for the storage-fault shim",
)

# Replaces one line of SqliteStore._run_batch (``old`` must be in its source).
PLANT = """
import inspect, re, textwrap
import roost.store.sqlite as m

def _answer_before_commit(store, batch, outcome):
    results = []
    for op in batch:
        leader = op
        while leader.merged_into is not None:
            leader = leader.merged_into
        results.append(outcome[id(leader)])
    store._loop.call_soon_threadsafe(m._resolve, batch, results)

m._answer_before_commit = _answer_before_commit
source = textwrap.dedent(inspect.getsource(m.SqliteStore._run_batch))
old, new = {old!r}, {new!r}
assert old in source, "the plant no longer matches SqliteStore._run_batch"
source = re.sub(r"( *)" + re.escape(old), lambda g: g[1] + new.replace("\\n", "\\n" + g[1]), source)
namespace = {{}}
exec(compile(source, m.__file__, "exec"), m.__dict__, namespace)
m.SqliteStore._run_batch = namespace["_run_batch"]
"""

# (a) The in-memory conversation cache (with its advanced last seq) survives
# a rolled-back batch, so the next message skips the seqs the failed one took.
SEQS_NOT_RESTORED = ("self._convs.clear()", "pass  # planted: cached seqs survive the rollback")
# (b) The sender's ✓ (and the push) go out just before COMMIT, not after it.
ACK_BEFORE_COMMIT = (
    'conn.execute("COMMIT")',
    '_answer_before_commit(self, batch, outcome)\nconn.execute("COMMIT")',
)


def planted_env(tmp_path: Path, plant: tuple[str, str]) -> dict[str, str]:
    site = tmp_path / "plant"
    site.mkdir()
    old, new = plant
    (site / "sitecustomize.py").write_text(textwrap.dedent(PLANT.format(old=old, new=new)))
    return {"PYTHONPATH": str(site)}


async def run_with_storage_faults(server_env: dict[str, str], seed: int) -> VerifyResult:
    config = VerifyConfig(
        "embedded", clients=6, duration=12.0, seed=seed, rate=40.0, nemeses=STORAGE_NEMESES,
        per_process=3, converge_timeout=8.0, server_env=server_env,
    )  # fmt: skip
    return await verify(config)


def invariants(result: VerifyResult) -> set[str]:
    return {v.invariant for v in result.report.violations}


async def test_seqs_that_skip_after_a_rolled_back_batch_are_reported(tmp_path: Path) -> None:
    result = await run_with_storage_faults(planted_env(tmp_path, SEQS_NOT_RESTORED), seed=31)
    assert "contiguous seqs" in invariants(result), result.report.violations[:5]
    assert any(v.kind == "gap" and "the store has no seq" in v.detail for v in result.report.violations)
    assert result.as_json()["invariants_broken"]["contiguous seqs"] >= 1
    assert exit_code(result, nemeses_wanted=True) == 1


async def test_an_ack_sent_before_commit_is_reported(tmp_path: Path) -> None:
    result = await run_with_storage_faults(planted_env(tmp_path, ACK_BEFORE_COMMIT), seed=32)
    assert "ack after commit" in invariants(result), result.report.violations[:5]
    assert any(v.kind == "not_durable" for v in result.report.violations)
    assert exit_code(result, nemeses_wanted=True) == 1


async def test_the_correct_server_under_the_same_storage_faults_is_clean() -> None:
    result = await run_with_storage_faults({}, seed=31)
    assert result.report.violations == [], result.report.violations[:5]
    assert result.converged and result.report.acked >= 200
    assert result.storage["fail-commit"] + result.storage["disk-full"] >= 1, result.storage
    assert exit_code(result, nemeses_wanted=True) == 0
