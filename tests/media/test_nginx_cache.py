"""deploy/nginx/roost.conf in front of a gateway with local blobs: uploads stream
through nginx, a repeated download URL is served from nginx's cache (the
gateway is not asked again), and Range requests are answered from it."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from roost.client.client import Client
from roost.protocol import frames as f
from tests.deploy.test_nginx import render
from tests.e2e.server import free_port
from tests.media.conftest import MediaHarness, start_gateway, stop_harness


@pytest.fixture
async def behind_nginx(tmp_path: Path) -> AsyncIterator[tuple[MediaHarness, str]]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.skip("nginx is not installed")
    media = await start_gateway(tmp_path, "local", None)
    port = free_port()
    conf = tmp_path / "nginx.conf"
    # As root, nginx's workers run as nobody, who may not enter pytest's 0700
    # temporary directory where the cache lives.
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf.write_text(
        user + "worker_processes 1;\npid nginx.pid;\nerror_log error.log;\n"
        "events { worker_connections 1024; }\n"
        "http {\n access_log off;\n client_body_temp_path tmp;\n proxy_temp_path tmp;\n"
        + render([f"127.0.0.1:{media.gateway.port}"], port)
        + "}\n"
    )
    (tmp_path / "tmp").mkdir()
    proc = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                await asyncio.to_thread(urllib.request.urlopen, url + "/healthz", None, 1)
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "error.log").read_text()
                await asyncio.sleep(0.1)
        yield media, url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        await stop_harness(media)


async def test_downloads_are_cached_and_ranges_served_from_the_cache(
    behind_nginx: tuple[MediaHarness, str], tmp_path: Path
) -> None:
    media, url = behind_nginx
    token = await media.user("alice")
    data = os.urandom(3 * media.part_size + 999)
    source = tmp_path / "up.bin"
    source.write_bytes(data)
    async with Client(url, token, state_path=":memory:", serve_local=False) as alice:
        blob = await alice.upload_blob(source, kind="image")  # parts PUT through nginx
        got: f.BlobUrl = await alice._request(f.BlobGet(blob=blob))
        again: f.BlobUrl = await alice._request(f.BlobGet(blob=blob))
    assert again.url == got.url  # one URL per blob and window: what makes the cache work
    served = []
    original = media.gateway.blobs._send  # type: ignore[attr-defined]

    async def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        served.append(1)
        return await original(*args, **kwargs)

    media.gateway.blobs._send = counting  # type: ignore[attr-defined]
    async with aiohttp.ClientSession() as http:
        statuses = []
        for _ in range(2):
            async with http.get(url + got.url) as resp:
                assert resp.status == 200, (tmp_path / "error.log").read_text()[-800:]
                assert await resp.read() == data
                statuses.append(resp.headers["X-Cache-Status"])
        async with http.get(url + got.url, headers={"Range": "bytes=10-19"}) as resp:
            assert resp.status == 206 and await resp.read() == data[10:20]
            statuses.append(resp.headers["X-Cache-Status"])
        async with http.get(url + got.url.replace("sig=", "sig=x")) as resp:
            assert resp.status == 403  # another key: not from the cache, refused by the gateway
    assert statuses == ["MISS", "HIT", "HIT"]
    assert len(served) == 1  # the gateway sent the blob once
