"""``roost app``: start the client and the local server, open the browser, run until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import html
import os
import signal
import sys
import webbrowser
from pathlib import Path

from roost.app.server import AppServer
from roost.client import Client, StateInUse


def _launcher(state_path: str, url: str) -> Path:
    """A page only this user can read that sends the browser on to ``url``.

    The browser is opened on this file, not on ``url``: a command line is
    visible to every local user (``ps``), and the URL holds the secret."""
    path = Path(state_path).with_name(f"roost-app-{os.getpid()}-open.html")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        target = html.escape(url, quote=True)
        out.write(
            f'<!doctype html><meta charset="utf-8"><meta http-equiv="refresh" content="0;url={target}">'
            f'<title>Roost</title><a href="{target}">Open Roost</a>\n'
        )
    return path


async def app_main(
    urls: list[str],
    token: str,
    state: str | None,
    ca_file: str | None = None,
    *,
    open_browser: bool = True,
    port: int = 0,
) -> int:
    client = Client(urls, token, state_path=state, ca_file=ca_file)
    server = AppServer(client)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    launcher: Path | None = None
    try:
        await server.start(port)
        print(f"Roost app for {client.user or 'this account'}: {server.url}", flush=True)
        print("(the link holds this run's secret: do not share it; Ctrl-C stops the app)", flush=True)
        if open_browser:
            launcher = _launcher(client.state.path, server.url)
            if not webbrowser.open(launcher.as_uri()):
                print("no browser found: open the link above", file=sys.stderr, flush=True)
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.close()
        if launcher is not None:
            with contextlib.suppress(FileNotFoundError):
                launcher.unlink()
    return 0


def run_app(
    urls: list[str],
    token: str,
    state: str | None,
    ca_file: str | None = None,
    *,
    open_browser: bool = True,
    port: int = 0,
) -> int:
    try:
        return asyncio.run(app_main(urls, token, state, ca_file, open_browser=open_browser, port=port))
    except StateInUse as exc:
        print(f"roost app: {exc}", file=sys.stderr)
        return 1
