"""The media sweeper with a short clock: orphan uploads go after a day,
complete blobs after the retention, never while a download URL is valid or
a download runs; on both blob stores."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiohttp
import pytest

from roost.media.sweeper import Sweeper
from roost.protocol import frames as f
from tests.media.conftest import MediaHarness, start_gateway, stop_harness

HOUR = 3600.0
DAY = 86400.0


def sweeper_at(media: MediaHarness, offset: float) -> Sweeper:
    """A sweeper whose clock runs ``offset`` seconds ahead."""
    gateway = media.gateway
    return Sweeper(
        gateway.store, gateway.blobs, gateway.config.media.limits, 3600, clock=lambda: time.time() + offset
    )


async def stored_objects(media: MediaHarness) -> int:
    """How many blobs or uploads the raw store holds (files, or bucket objects + open uploads)."""
    blobs = media.gateway.blobs
    if media.backend == "local":
        root = blobs.root  # type: ignore[attr-defined]
        return sum(1 for p in (root / "blobs").rglob("*") if p.is_file()) + sum(
            1 for p in (root / "parts").iterdir()
        )
    return len(await blobs.object_keys())  # type: ignore[attr-defined]


async def test_orphan_uploads_go_after_a_day_and_blobs_after_the_retention(
    media: MediaHarness, tmp_path: Path
) -> None:
    alice = await media.client("alice")
    orphan: f.BlobSlot = await alice._request(f.BlobNew(size=1000, kind="file"))
    urls: f.BlobUrls = await alice._request(f.BlobPutUrls(blob=orphan.blob, parts=[1]))
    async with aiohttp.ClientSession() as http:
        url = urls.urls[0][1]
        async with http.put(url if "://" in url else media.url + url, data=os.urandom(1000)) as resp:
            assert resp.status == 200
    source = tmp_path / "kept.bin"
    kept_bytes = os.urandom(3000)
    source.write_bytes(kept_bytes)
    kept = await alice.upload_blob(source, kind="image")
    before = await stored_objects(media)

    assert await sweeper_at(media, 23 * HOUR).sweep() == 0
    assert await media.record(orphan.blob) is not None

    assert await sweeper_at(media, 25 * HOUR).sweep() == 1
    assert await media.record(orphan.blob) is None
    assert await media.gateway.blobs.raw(await media.record(kept)) == kept_bytes
    assert (await media.record(kept)).state == "complete"
    if media.backend == "local":
        assert await stored_objects(media) == before - 1  # the orphan's part directory

    retention = media.gateway.config.media.limits.retention_days * DAY
    assert await sweeper_at(media, retention - HOUR).sweep() == 0
    rec = await media.record(kept)
    assert await sweeper_at(media, retention + HOUR).sweep() == 1
    assert await media.record(kept) is None
    assert await media.gateway.blobs.raw(rec) is None
    assert await stored_objects(media) == 0


async def test_a_blob_is_not_swept_while_its_download_url_is_valid(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    weed = request.getfixturevalue("seaweed") if backend == "s3" else None
    media = await start_gateway(tmp_path, backend, weed, retention_days=1 / DAY)  # one second
    try:
        alice = await media.client("alice")
        source = tmp_path / "b.bin"
        source.write_bytes(os.urandom(2000))
        blob = await alice.upload_blob(source, kind="image")
        got: f.BlobUrl = await alice._request(f.BlobGet(blob=blob))
        assert got.expires >= time.time() + media.gateway.config.media.url_ttl - 1
        # Past the retention, but the URL just handed out is valid for an hour.
        assert await sweeper_at(media, 60).sweep() == 0
        dest = tmp_path / "d.bin"
        await alice.download_blob(blob, dest)
        assert dest.read_bytes() == source.read_bytes()
        # Once the URL expired, it goes; and no new URL is handed out for it.
        assert await sweeper_at(media, got.expires - time.time() + 5).sweep() == 1
        with pytest.raises(Exception) as refused:
            await alice._request(f.BlobGet(blob=blob))
        assert getattr(refused.value, "code", "") == "unknown_blob"
    finally:
        await stop_harness(media)


async def test_a_download_in_progress_holds_off_the_sweep(tmp_path: Path) -> None:
    media = await start_gateway(tmp_path, "local", None)
    try:
        alice = await media.client("alice")
        data = os.urandom(8 * 1024 * 1024)  # more than loopback socket buffers hold
        source = tmp_path / "big.bin"
        source.write_bytes(data)
        blob = await alice.upload_blob(source, kind="video")
        got: f.BlobUrl = await alice._request(f.BlobGet(blob=blob))
        far = 365 * DAY  # past the retention and the URL's expiry
        async with aiohttp.ClientSession() as http, http.get(media.url + got.url) as resp:
            assert resp.status == 200
            first = await resp.content.readexactly(64 * 1024)
            assert await sweeper_at(media, far).sweep() == 0  # the download holds it
            assert await media.record(blob) is not None
            assert (await media.record(blob)).state == "complete"
            rest = await resp.read()
        assert first + rest == data
        await asyncio.sleep(0)  # the handler's finally has run
        assert await sweeper_at(media, far).sweep() == 1
        assert await media.record(blob) is None
    finally:
        await stop_harness(media)
