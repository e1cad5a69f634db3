"""Fixtures for the ``roost app`` tests: a real server, real ``roost app``
processes, and Debian's Chromium driven by Playwright (no browser download).

Tests that need the browser skip with the reason when Chromium or Playwright
is missing (``.ci/run`` installs both, and counts a skip as a failure).
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.server import ServerProcess

CHROMIUM = os.environ.get("ROOST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
URL_LINE = re.compile(r"(http://127\.0\.0\.1:(\d+)/\?s=[A-Za-z0-9_-]+)")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


class AppProcess:
    """One ``roost app --no-browser`` for one account, on its own state file."""

    def __init__(self, server_url: str, token: str, state: Path) -> None:
        self.server_url = server_url
        self.token = token
        self.state = state
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.port = 0
        self.log_path = state.with_suffix(".log")

    def start(self, timeout: float = 60.0) -> AppProcess:
        return self.launch().wait_url(timeout)

    def launch(self) -> AppProcess:
        args = [sys.executable, "-m", "roost.cli.main", "app", "--no-browser"]
        args += ["--url", self.server_url, "--token", self.token, "--state", str(self.state)]
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=open(self.log_path, "a"),  # noqa: SIM115 - the child keeps it
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        return self

    def wait_url(self, timeout: float = 60.0) -> AppProcess:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline()
                match = URL_LINE.search(line)
                if match:
                    self.url, self.port = match.group(1), int(match.group(2))
                    return self
                if not line and self.proc.poll() is not None:
                    break
        raise RuntimeError(f"roost app did not print its URL: {self.log()}")

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-3000:]
        except OSError:
            return ""


USERS = ("alice", "bob", "carol")


def add_users(data_dir: Path, names: tuple[str, ...]) -> dict[str, str]:
    """``roost user add`` for each name, side by side (each is a process start)."""
    procs = {
        name: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "roost.cli.main",
                "user",
                "add",
                name,
                "--data-dir",
                str(data_dir),
                "--create",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    }
    tokens = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        tokens[name] = out.strip().splitlines()[-1]
    return tokens


@pytest.fixture(scope="session")
def users_data_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A server data dir holding just the users, made once: each test starts on a copy."""
    data_dir = tmp_path_factory.mktemp("users") / "data"
    data_dir.mkdir()
    return data_dir, add_users(data_dir, USERS)


@pytest.fixture
def server(tmp_path: Path, users_data_dir: tuple[Path, dict[str, str]]) -> Iterator[ServerProcess]:
    template, tokens = users_data_dir
    srv = ServerProcess(tmp_path / "server")
    shutil.copytree(template, srv.data_dir)  # no server holds the template: a plain copy is consistent
    srv.tokens = tokens  # type: ignore[attr-defined]
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def tokens(server: ServerProcess) -> Any:
    """``tokens("alice")``: the user's token."""
    made: dict[str, str] = server.tokens  # type: ignore[attr-defined]
    return made.__getitem__


@pytest.fixture
def make_app(server: ServerProcess, tokens: Any, tmp_path: Path) -> Iterator[Any]:
    """``make_app("alice")`` starts alice's app on her own state (the same one each time)."""
    apps: list[AppProcess] = []

    def make(*users: str) -> Any:
        """One app per user, started side by side; the app, or a tuple of them."""
        started = [AppProcess(server.url, tokens(u), tmp_path / f"{u}.sqlite").launch() for u in users]
        apps.extend(started)
        for app in started:
            app.wait_url()
        return started[0] if len(started) == 1 else tuple(started)

    try:
        yield make
    finally:
        for app in apps:
            app.stop()


# Module scope, not session: while sync_playwright() is open it keeps an event
# loop running in the main thread, and every later asyncio test of the suite
# then fails with "Cannot run the event loop while another loop is running".
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as pw:
        # launch() gives every run a fresh temporary profile (user data dir).
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def open_page(browser: Any) -> Iterator[Any]:
    """``open_page(app)``: a page of its own browser context (own cookies) on the app."""
    contexts: list[Any] = []

    def open_(app: AppProcess, *, dark: bool = False, width: int = 1000, height: int = 640) -> Any:
        context = browser.new_context(
            viewport={"width": width, "height": height}, color_scheme="dark" if dark else "light"
        )
        context.set_default_timeout(20_000)  # a loaded CI machine; a pass takes far less
        contexts.append(context)
        page = context.new_page()
        page.goto(app.url)
        page.wait_for_selector("#connection[data-state=connected]")
        return page

    try:
        yield open_
    finally:
        for context in contexts:
            context.close()


def screenshot(page: Any, name: str) -> None:
    """Rewrite docs/screenshots/NAME.png, only with ROOST_SCREENSHOTS=1
    (so a normal run leaves the tree clean)."""
    if os.environ.get("ROOST_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))
