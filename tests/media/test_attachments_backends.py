"""Attachments (send_file / download) on both blob stores: the gateway's own
disk and a real S3-compatible server (SeaweedFS), through the ``media``
harness of tests/media/conftest.py (an in-process gateway on a real socket).

The subprocess-server tests of tests/e2e/test_media_sdk.py cover the rest
(kill -9 mid-upload, the CLI, tampering, hostile file names) on the local store."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from roost.client import ATTACHMENT_CT, Client, Message
from roost.client import attachments as att
from tests.media.conftest import MediaHarness, state_client


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


async def next_message(client: Client, timeout: float = 30.0) -> Message:
    while True:
        event = await client.next_event(timeout)
        if isinstance(event, Message):
            return event


async def test_image_and_file_one_to_one_and_to_a_group(media: MediaHarness, tmp_path: Path) -> None:
    from PIL import Image

    image = tmp_path / "shot.png"
    Image.effect_noise((200, 120), 50).convert("RGB").save(image)
    # Over one S3 part (5 MiB) so the multi-part path is taken on both stores.
    video = random_file(tmp_path / "clip.mp4", 7 * 1024 * 1024 + 17)
    alice, bob, carol = [await state_client(media, n, tmp_path) for n in ("alice", "bob", "carol")]
    await alice.send_file(image, to="bob", caption="hi")
    got = await next_message(bob)
    ref = att.parse_reference(got.body)
    assert got.ct == ATTACHMENT_CT and (ref.width, ref.height, ref.kind) == (200, 120, "image")
    assert (await bob.download(got, tmp_path / "bob")).read_bytes() == image.read_bytes()

    group = await alice.create_group("crew", ["bob", "carol"])
    await alice.send_file(video, group=group.group)
    digest = hashlib.sha256(video.read_bytes()).digest()
    for name, client in (("bob", bob), ("carol", carol)):
        message = await next_message(client)
        assert message.conv == group.group
        path = await client.download(message, tmp_path / name)
        assert hashlib.sha256(path.read_bytes()).digest() == digest


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


async def test_the_store_holds_no_plaintext(
    media: MediaHarness, backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    marker = b"ROOST-S3-PLAINTEXT-" + os.urandom(6).hex().encode()
    doc = tmp_path / "letter.txt"
    doc.write_bytes((marker + b"\n") * 200_000)  # ~6.6 MiB: two S3 parts
    alice = await state_client(media, "alice", tmp_path)
    bob = await state_client(media, "bob", tmp_path)
    await alice.send_file(doc, to="bob")
    message = await next_message(bob)
    ref = att.parse_reference(message.body)
    raw = await media.gateway.blobs.raw(await media.record(ref.blob))
    assert raw is not None and len(raw) == att.encrypted_size(doc.stat().st_size)
    assert hashlib.sha256(raw).digest() == ref.digest_bytes  # the stored bytes are the blob, as sent
    assert marker not in raw
    assert (await bob.download(message, tmp_path / "bob")).read_bytes() == doc.read_bytes()
    # Below the store's API: the files it keeps on disk (the data dir, or SeaweedFS's volumes).
    root = request.getfixturevalue("seaweed").dir if backend == "s3" else tmp_path / "data"
    stored = [p.read_bytes() for p in files_under(root)]
    sample = raw[3 << 20 : (3 << 20) + 64]  # 64 ciphertext bytes from inside the second part
    assert any(sample in data for data in stored), "the blob is not where the test looks"
    assert not any(marker in data for data in stored)
