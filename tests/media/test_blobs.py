"""Blob upload and download on both blob stores (local files, real S3 via SeaweedFS),
through a real gateway socket and real HTTP: parts, resume, Range, refusals,
limits, ownership and the raw stored bytes."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiohttp
import pytest

from roost.client.client import RoostError
from roost.core.blobsize import blob_size
from roost.protocol import frames as f
from tests.media.conftest import MediaHarness, start_gateway, stop_harness


def blob_bytes(harness: MediaHarness, parts: int) -> bytes:
    """Random bytes that make ``parts`` parts, the last one short."""
    return os.urandom(harness.part_size * (parts - 1) + harness.part_size // 3 + 7)


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


async def put(url: str, data: bytes, headers: dict[str, str] | None = None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.put(url, data=data, headers=headers or {}) as resp:
        await resp.read()
        return resp.status, resp.headers.get("ETag", "").strip('"')


def absolute(harness: MediaHarness, url: str) -> str:
    return url if "://" in url else harness.url + url


async def test_upload_in_parts_then_download_gives_the_same_bytes(
    media: MediaHarness, tmp_path: Path
) -> None:
    alice, bob = await media.client("alice"), await media.client("bob")
    data = blob_bytes(media, 3)
    seen: list[tuple[int, int]] = []
    slots: list[str] = []
    blob = await alice.upload_blob(
        write(tmp_path, "up.bin", data),
        kind="video",
        progress=lambda d, t: seen.append((d, t)),
        on_slot=slots.append,
    )
    assert slots == [blob]
    rec = await media.record(blob)
    assert (rec.state, rec.size, rec.parts, rec.owner) == ("complete", len(data), 3, "alice")
    assert seen[-1] == (len(data), len(data))
    # What the store holds is exactly the bytes uploaded (the raw file or object).
    assert await media.gateway.blobs.raw(rec) == data
    dest = tmp_path / "down.bin"
    await bob.download_blob(blob, dest)
    assert dest.read_bytes() == data


async def test_a_cut_upload_resumes_with_the_parts_the_store_lacks(
    media: MediaHarness, tmp_path: Path
) -> None:
    alice = await media.client("alice")
    data = blob_bytes(media, 3)
    slot: f.BlobSlot = await alice._request(f.BlobNew(size=len(data), kind="file"))
    urls: f.BlobUrls = await alice._request(f.BlobPutUrls(blob=slot.blob, parts=[2]))
    ((_part, url, headers),) = urls.urls
    size = slot.part_size
    status, _ = await put(absolute(media, url), data[size : 2 * size], headers)
    assert status == 200
    state: f.BlobState = await alice._request(f.BlobStatus(blob=slot.blob))
    assert (state.parts_done, state.complete, state.part_size) == ([2], False, size)
    seen: list[int] = []
    blob = await alice.upload_blob(
        write(tmp_path, "up.bin", data), kind="file", resume=slot.blob, progress=lambda d, t: seen.append(d)
    )
    assert blob == slot.blob
    assert seen[0] == size  # part 2 counted as done: only parts 1 and 3 were sent
    assert await media.gateway.blobs.raw(await media.record(blob)) == data
    # Resuming a complete blob only confirms it.
    assert await alice.upload_blob(tmp_path / "up.bin", kind="file", resume=blob) == blob


async def test_range_requests_and_a_resumed_download(media: MediaHarness, tmp_path: Path) -> None:
    alice = await media.client("alice")
    data = blob_bytes(media, 2)
    blob = await alice.upload_blob(write(tmp_path, "up.bin", data), kind="audio")
    got: f.BlobUrl = await alice._request(f.BlobGet(blob=blob))
    async with aiohttp.ClientSession() as http:
        async with http.get(absolute(media, got.url), headers={"Range": "bytes=100-1099"}) as resp:
            assert resp.status == 206
            assert resp.headers["Content-Range"] == f"bytes 100-1099/{len(data)}"
            assert await resp.read() == data[100:1100]
            assert resp.headers.get("ETag")
        async with http.get(absolute(media, got.url), headers={"Range": "bytes=-10"}) as resp:
            assert resp.status == 206 and await resp.read() == data[-10:]
        async with http.get(absolute(media, got.url), headers={"Range": f"bytes={len(data)}-"}) as resp:
            assert resp.status == 416
        async with http.head(absolute(media, got.url)) as resp:
            # S3 presigns the GET method only; the local store answers HEAD with headers alone.
            assert resp.status == (200 if media.backend == "local" else 403)
            if media.backend == "local":
                assert int(resp.headers["Content-Length"]) == len(data)
        async with http.get(absolute(media, got.url)) as resp:  # the same connection, kept alive
            assert resp.status == 200 and await resp.read() == data
    dest = write(tmp_path, "partial.bin", data[:12345])
    progress: list[int] = []
    await alice.download_blob(blob, dest, progress=lambda d, t: progress.append(d))
    assert dest.read_bytes() == data
    assert progress[0] > 12345  # it went on from the partial file


async def _one_part_slot(media: MediaHarness, size: int | None = None) -> tuple[f.BlobSlot, bytes]:
    alice = await media.client("alice")
    data = os.urandom(size or 1000)
    slot: f.BlobSlot = await alice._request(f.BlobNew(size=len(data), kind="image"))
    return slot, data


async def test_an_expired_upload_url_is_refused_and_nothing_is_stored(media: MediaHarness) -> None:
    slot, data = await _one_part_slot(media)
    rec = await media.record(slot.blob)
    (expiring,) = await media.gateway.blobs.put_urls(rec, [1], int(time.time()) + 1)
    await asyncio.sleep(2.2)
    status, _ = await put(absolute(media, expiring.url), data)
    assert status == 403
    assert await media.gateway.blobs.parts_done(rec) == {}


async def test_a_forged_signature_is_refused_and_nothing_is_stored(media: MediaHarness) -> None:
    slot, data = await _one_part_slot(media)
    rec = await media.record(slot.blob)
    (good,) = await media.gateway.blobs.put_urls(rec, [1], int(time.time()) + 600)
    key = "sig=" if media.backend == "local" else "X-Amz-Signature="
    head, _, tail = good.url.partition(key)
    forged = head + key + ("A" if tail[0] != "A" else "B") + tail[1:]
    status, _ = await put(absolute(media, forged), data)
    assert status == 403
    assert await media.gateway.blobs.parts_done(rec) == {}
    # The same URL for another blob's part is refused too (the blob is signed).
    other, _ = await _one_part_slot(media)
    moved = absolute(media, good.url).replace(slot.blob, other.blob)
    assert (await put(moved, data))[0] == 403


@pytest.mark.parametrize("delta", [1, -1])
async def test_a_body_of_another_size_than_signed_is_refused(media: MediaHarness, delta: int) -> None:
    slot, data = await _one_part_slot(media)
    urls: f.BlobUrls = await media.clients[0]._request(f.BlobPutUrls(blob=slot.blob, parts=[1]))
    url = absolute(media, urls.urls[0][1])
    body = data + b"x" if delta > 0 else data[:-1]
    status, _ = await put(url, body)
    assert status == 403  # refused on its Content-Length, before the body is read
    assert await media.gateway.blobs.parts_done(await media.record(slot.blob)) == {}
    # Completing it now is refused: the part is missing.
    with pytest.raises(RoostError) as refused:
        await media.clients[0]._request(f.BlobComplete(blob=slot.blob, parts=[(1, "x")]))
    assert refused.value.code == "incomplete_upload"


async def test_over_the_kind_limit_is_refused_with_too_large(media: MediaHarness) -> None:
    alice = await media.client("alice")
    # The limit is of the file; the blob may be what encrypting a file at the limit makes.
    most = blob_size(media.gateway.config.media.limits.image_bytes)
    with pytest.raises(RoostError) as refused:
        await alice._request(f.BlobNew(size=most + 1, kind="image"))
    assert refused.value.code == "too_large"
    slot: f.BlobSlot = await alice._request(f.BlobNew(size=most + 1, kind="video"))  # video allows more
    assert slot.parts >= 1


async def test_the_quota_counts_every_stored_blob(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    weed = request.getfixturevalue("seaweed") if backend == "s3" else None
    media = await start_gateway(tmp_path, backend, weed, quota_bytes=10_000)
    try:
        alice = await media.client("alice")
        await alice._request(f.BlobNew(size=6_000, kind="file"))
        with pytest.raises(RoostError) as refused:
            await alice._request(f.BlobNew(size=5_000, kind="file"))
        assert refused.value.code == "quota_exceeded"
        await alice._request(f.BlobNew(size=4_000, kind="file"))  # exactly the quota
        bob = await media.client("bob")  # someone else's quota is their own
        await bob._request(f.BlobNew(size=9_000, kind="file"))
    finally:
        await stop_harness(media)


async def test_uploads_per_minute_are_limited(tmp_path: Path) -> None:
    media = await start_gateway(tmp_path, "local", None, uploads_per_minute=3)
    try:
        alice = await media.client("alice")
        for _ in range(3):
            await alice._request(f.BlobNew(size=10, kind="file"))
        with pytest.raises(RoostError) as refused:
            await alice._request(f.BlobNew(size=10, kind="file"))
        assert refused.value.code == "rate_limited"
    finally:
        await stop_harness(media)


async def test_only_the_uploader_acts_on_an_upload(media: MediaHarness, tmp_path: Path) -> None:
    alice, mallory = await media.client("alice"), await media.client("mallory")
    data = blob_bytes(media, 1)
    slot: f.BlobSlot = await alice._request(f.BlobNew(size=len(data), kind="file"))
    urls: f.BlobUrls = await alice._request(f.BlobPutUrls(blob=slot.blob, parts=[1]))
    status, etag = await put(absolute(media, urls.urls[0][1]), data)
    assert status == 200
    for frame in (
        f.BlobComplete(blob=slot.blob, parts=[(1, etag)]),
        f.BlobPutUrls(blob=slot.blob, parts=[1]),
        f.BlobStatus(blob=slot.blob),
    ):
        with pytest.raises(RoostError) as refused:
            await mallory._request(frame)
        assert refused.value.code == "not_owner"
    # Nobody downloads an upload that is not complete.
    with pytest.raises(RoostError) as refused:
        await mallory._request(f.BlobGet(blob=slot.blob))
    assert refused.value.code == "unknown_blob"
    assert (await media.record(slot.blob)).state == "pending"
    state: f.BlobState = await alice._request(f.BlobComplete(blob=slot.blob, parts=[(1, etag)]))
    assert state.complete
    with pytest.raises(RoostError) as refused:
        await mallory._request(f.BlobGet(blob="0" * 32))
    assert refused.value.code == "unknown_blob"


async def test_completing_with_a_wrong_etag_is_refused(media: MediaHarness) -> None:
    slot, data = await _one_part_slot(media)
    alice = media.clients[0]
    urls: f.BlobUrls = await alice._request(f.BlobPutUrls(blob=slot.blob, parts=[1]))
    status, _etag = await put(absolute(media, urls.urls[0][1]), data)
    assert status == 200
    with pytest.raises(RoostError) as refused:
        await alice._request(f.BlobComplete(blob=slot.blob, parts=[(1, "0" * 32)]))
    assert refused.value.code == "incomplete_upload"
    assert (await media.record(slot.blob)).state == "pending"


async def test_a_url_signed_for_one_method_is_refused_for_the_other(
    media: MediaHarness, tmp_path: Path
) -> None:
    alice = await media.client("alice")
    data = blob_bytes(media, 1)
    blob = await alice.upload_blob(write(tmp_path, "up.bin", data), kind="file")
    got: f.BlobUrl = await alice._request(f.BlobGet(blob=blob))
    status, _ = await put(absolute(media, got.url), b"x" * len(data))  # a download URL used to upload
    assert status in (403, 405)
    assert await media.gateway.blobs.raw(await media.record(blob)) == data
    slot: f.BlobSlot = await alice._request(f.BlobNew(size=1000, kind="file"))
    urls: f.BlobUrls = await alice._request(f.BlobPutUrls(blob=slot.blob, parts=[1]))
    async with aiohttp.ClientSession() as http, http.get(absolute(media, urls.urls[0][1])) as resp:
        assert resp.status in (403, 405)  # an upload URL used to download


async def test_a_slow_upload_outlives_the_handshake_deadline(tmp_path: Path) -> None:
    """A media request is held to the gateway's accept->authenticated deadline
    only until its signature checks out: a part may take longer to arrive."""
    media = await start_gateway(tmp_path, "local", None)
    media.gateway.config.admission.handshake_timeout = 1.0
    assert media.gateway.admission is not None
    media.gateway.admission.limits.handshake_timeout = 1.0
    try:
        alice = await media.client("alice")
        data = os.urandom(3000)
        slot: f.BlobSlot = await alice._request(f.BlobNew(size=len(data), kind="file"))
        urls: f.BlobUrls = await alice._request(f.BlobPutUrls(blob=slot.blob, parts=[1]))

        async def trickle():  # type: ignore[no-untyped-def]
            for i in range(0, len(data), 1000):
                yield data[i : i + 1000]
                await asyncio.sleep(0.8)

        headers = {"Content-Length": str(len(data))}
        url = media.url + urls.urls[0][1]
        async with aiohttp.ClientSession() as http, http.put(url, data=trickle(), headers=headers) as resp:
            assert resp.status == 200
            etag = resp.headers["ETag"].strip('"')
        state: f.BlobState = await alice._request(f.BlobComplete(blob=slot.blob, parts=[(1, etag)]))
        assert state.complete
        assert await media.gateway.blobs.raw(await media.record(slot.blob)) == data
    finally:
        await stop_harness(media)


async def test_media_requests_with_bad_paths_change_nothing(tmp_path: Path) -> None:
    media = await start_gateway(tmp_path, "local", None)  # (with S3 the gateway has no /media routes)
    try:
        await _bad_requests(media)
    finally:
        await stop_harness(media)


async def _bad_requests(media: MediaHarness) -> None:
    async with aiohttp.ClientSession() as http:
        for method, path in [
            ("PUT", "/media/../../etc/passwd/1?size=1&exp=9999999999&sig=x"),
            ("PUT", "/media/" + "a" * 32 + "/1"),
            ("PUT", "/media/" + "a" * 32 + "/1?size=x&exp=y&sig=z"),
            ("GET", "/media/" + "a" * 32 + "?size=1&exp=1&sig=x"),
            ("GET", "/media/" + "A" * 32),
        ]:
            async with http.request(method, media.url + path, data=b"x" if method == "PUT" else None) as resp:
                assert resp.status in (403, 404), (method, path, resp.status)
    root = media.gateway.blobs.root  # type: ignore[attr-defined]
    assert list((root / "parts").iterdir()) == [] and list((root / "blobs").iterdir()) == []


async def test_a_part_cut_off_mid_body_leaves_nothing(tmp_path: Path) -> None:
    media = await start_gateway(tmp_path, "local", None)
    try:
        alice = await media.client("alice")
        slot: f.BlobSlot = await alice._request(f.BlobNew(size=50_000, kind="file"))  # one part
        urls: f.BlobUrls = await alice._request(f.BlobPutUrls(blob=slot.blob, parts=[1]))
        _reader, writer = await asyncio.open_connection("127.0.0.1", media.gateway.port)
        assert "size=50000&" in urls.urls[0][1]
        head = f"PUT {urls.urls[0][1]} HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\n\r\n"
        writer.write(head.encode() + os.urandom(30_000))
        await writer.drain()
        await asyncio.sleep(0.3)  # the handler is receiving: its temporary file exists
        parts_dir = media.gateway.blobs.root / "parts" / slot.blob  # type: ignore[attr-defined]
        assert [p.name[:5] for p in parts_dir.iterdir()] == [".tmp-"]
        writer.close()  # cut: 20,000 bytes never come
        await writer.wait_closed()
        await asyncio.sleep(0.3)
        rec = await media.record(slot.blob)
        assert await media.gateway.blobs.parts_done(rec) == {}
        assert list(parts_dir.iterdir()) == []  # no temporary file left either
    finally:
        await stop_harness(media)


async def test_concurrent_completions_of_one_blob_agree(media: MediaHarness, tmp_path: Path) -> None:
    alice = await media.client("alice")
    data = blob_bytes(media, 2)
    size = media.part_size
    slot: f.BlobSlot = await alice._request(f.BlobNew(size=len(data), kind="file"))
    urls: f.BlobUrls = await alice._request(f.BlobPutUrls(blob=slot.blob, parts=[1, 2]))
    etags = []
    for part, url, headers in urls.urls:
        status, etag = await put(absolute(media, url), data[(part - 1) * size : part * size], headers)
        assert status == 200
        etags.append((part, etag))
    states = await asyncio.gather(
        *(alice._request(f.BlobComplete(blob=slot.blob, parts=etags)) for _ in range(5)),
        return_exceptions=True,
    )
    assert all(isinstance(s, f.BlobState) and s.complete for s in states), states
    assert await media.gateway.blobs.raw(await media.record(slot.blob)) == data


class Crash(Exception):
    pass


async def test_an_upload_killed_midway_is_finished_by_a_new_client(
    media: MediaHarness, tmp_path: Path
) -> None:
    """The caller records the blob id (``on_slot``); the process "dies" after
    the first part; a new client resumes with that id and sends only the rest."""
    data = blob_bytes(media, 4)
    source = write(tmp_path, "up.bin", data)
    first = await media.client("alice")
    recorded: list[str] = []

    def die_after_a_part(done: int, total: int) -> None:
        if done > 0:
            raise Crash

    with pytest.raises(Crash):
        await first.upload_blob(source, kind="video", progress=die_after_a_part, on_slot=recorded.append)
    await first.close()
    await asyncio.sleep(0.2)  # nothing of the dead upload keeps running
    (blob,) = recorded
    rec = await media.record(blob)
    held = await media.gateway.blobs.parts_done(rec)
    assert 1 <= len(held) < 4 and rec.state == "pending"
    again = await media.client("alice")
    seen: list[int] = []
    assert (
        await again.upload_blob(source, kind="video", resume=blob, progress=lambda d, t: seen.append(d))
        == blob
    )
    assert seen[0] == sum(rec.part_length(p) for p in held)  # what was there was not sent again
    assert await media.gateway.blobs.raw(await media.record(blob)) == data
