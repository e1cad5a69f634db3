"""Suite-wide hooks.

With ROOST_REQUIRE_SERVICES=1 (set by .ci/run) a test marked ``redis`` or
``postgres`` that was skipped counts as failed: CI has those binaries, so a
skip there means the cluster code went untested.
"""

from __future__ import annotations

import os

import pytest

SERVICE_MARKERS = ("redis", "postgres")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and os.environ.get("ROOST_REQUIRE_SERVICES") == "1"
        and any(item.get_closest_marker(m) for m in SERVICE_MARKERS)
    ):
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid} needs Redis/PostgreSQL and was skipped; CI requires it to run"
