"""The nginx config of docs/deploy.md, run for real in front of a 2-gateway cluster."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from roost.client import Client, Message
from roost.core.tokens import hash_token
from roost.devcluster.postgres import PgUnavailable, free_port
from roost.devcluster.run import DevCluster
from roost.service.chat import now_ms
from roost.store.postgres import PostgresStore

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "roost.conf"

pytestmark = [pytest.mark.redis, pytest.mark.postgres]


def render(upstreams: list[str], port: int) -> str:
    text = CONFIG.read_text()
    servers = "".join(f"    server {u} max_fails=1 fail_timeout=5s;\n" for u in upstreams)
    text = re.sub(r"(    server gw\d\.internal:8765 [^\n]*\n)+", servers, text)
    text = text.replace("/var/cache/nginx/roost-media", "media-cache")  # relative to nginx -p
    return text.replace("listen 8080;", f"listen 127.0.0.1:{port};")


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[tuple[DevCluster, str]]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.skip("nginx is not installed")
    try:
        cluster = DevCluster(2)
        cluster.start()
    except (PgUnavailable, FileNotFoundError) as exc:
        pytest.skip(str(exc))
    port = free_port()
    conf = tmp_path / "nginx.conf"
    upstreams = [u.removeprefix("http://") for u in cluster.urls]
    conf.write_text(
        "worker_processes 1;\npid nginx.pid;\nerror_log error.log;\n"
        "events { worker_connections 1024; }\n"
        "http {\n access_log off;\n client_body_temp_path tmp;\n proxy_temp_path tmp;\n"
        + render(upstreams, port)
        + "}\n"
    )
    (tmp_path / "tmp").mkdir()
    proc = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=1) as resp:
                    assert resp.status == 200
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        yield cluster, url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        cluster.stop()


async def add_users(dsn: str, names: list[str]) -> dict[str, str]:
    store = PostgresStore(dsn)
    await store.open()
    try:
        tokens = {n: f"token-{n}-{now_ms()}" for n in names}
        for name, token in tokens.items():
            await store.add_user(name, hash_token(token), now_ms())
        return tokens
    finally:
        await store.close()


async def test_chat_through_nginx_survives_a_gateway_kill(proxied, tmp_path: Path) -> None:
    cluster, url = proxied
    tokens = await add_users(cluster.dsn, ["alice", "bob"])
    alice = Client(url, tokens["alice"], state_path=tmp_path / "a.state", backoff_cap=0.5)
    bob = Client(url, tokens["bob"], state_path=tmp_path / "b.state", backoff_cap=0.5)
    await alice.connect()
    await bob.connect()
    try:
        sent = await asyncio.wait_for(alice.send("through nginx", to="bob"), 10)
        event = await bob.next_event(10)
        while not isinstance(event, Message):
            event = await bob.next_event(10)
        assert event.text == "through nginx"
        await asyncio.wait_for(alice.wait_receipt(sent.conv, sent.seq, "delivered"), 10)
        # One gateway dies; nginx sends the reconnects to the other one.
        cluster.kill_gateway(0)
        results = await asyncio.wait_for(
            asyncio.gather(*(alice.send(f"after kill {i}", to="bob") for i in range(20))), 30
        )
        assert [r.seq for r in results] == list(range(2, 22))
        texts = []
        while len(texts) < 20:
            event = await bob.next_event(20)
            if isinstance(event, Message):
                texts.append(event.text)
        assert texts == [f"after kill {i}" for i in range(20)]
    finally:
        await alice.close()
        await bob.close()
