"""Suite-wide hooks.

With ROOST_REQUIRE_SERVICES=1 (set by .ci/run) a skipped test counts as
failed. Every skip in this suite means a real part was missing (PostgreSQL,
Redis, nginx, tmux, a C compiler); CI installs them all, so a skip there
means that code went untested. An expected failure (xfail) is not a skip.
"""

from __future__ import annotations

import os

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and os.environ.get("ROOST_REQUIRE_SERVICES") == "1":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid} was skipped ({reason}); CI installs every part the tests need"
