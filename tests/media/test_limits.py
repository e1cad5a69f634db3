"""The per-kind media limits are file (plaintext) sizes, as users read them.

A file of exactly the limit goes; one byte more is refused with ``too_large``
saying the limit in file bytes; the server still bounds the blob exactly (the
blob of a file at the limit, roost/core/blobsize.py)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from roost.client import Message
from roost.client import attachments as att
from roost.client.client import RoostError
from roost.core.blobsize import MiB, blob_size, human_size, plain_size_range
from roost.media.config import MediaLimits
from roost.protocol import frames as f
from roost.protocol.errors import ErrorCode, ProtocolError
from roost.service.media import check_size
from tests.media.conftest import MediaHarness, start_gateway, state_client, stop_harness

LIMIT = 100_000  # bytes of file; a multiple of 16, as the default 100 MiB is


@pytest.mark.parametrize("plain", [0, 1, 15, 16, 17, 31, 32, 1000, 65_535, 65_536])
def test_blob_size_is_what_encryption_writes(tmp_path: Path, plain: int) -> None:
    source = tmp_path / "file"
    source.write_bytes(os.urandom(plain))
    encrypted = att.encrypt_file(source, tmp_path / "blob")
    assert encrypted.size == blob_size(plain) == (tmp_path / "blob").stat().st_size
    span = plain_size_range(encrypted.size)
    assert span is not None and span[0] <= plain <= span[1] and span[1] - span[0] == 15
    assert blob_size(span[0]) == blob_size(span[1]) == encrypted.size  # the 16 files one blob size stands for


@pytest.mark.parametrize(
    ("size", "files"), [(0, None), (63, None), (64, (0, 15)), (65, None), (80, (16, 31)), (96, (32, 47))]
)
def test_the_files_a_blob_size_stands_for(size: int, files: tuple[int, int] | None) -> None:
    assert plain_size_range(size) == files


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (100 * MiB, "100 MiB"),
        (16 * MiB, "16 MiB"),
        (3 * MiB // 2, "1.5 MiB"),
        (1 << 30, "1 GiB"),
        (100_000, "100,000 bytes"),
    ],
)
def test_human_sizes_are_exact(n: int, text: str) -> None:
    assert human_size(n) == text


def test_the_default_100_mib_limit_admits_a_100_mib_file_by_arithmetic() -> None:
    limit = MediaLimits().max_bytes("video")
    assert limit == 100 * MiB
    at_limit = blob_size(100 * MiB)
    assert at_limit == 100 * MiB + 64  # IV 16 + a whole block of padding 16 + HMAC 32
    check_size(f.BlobNew(size=at_limit, kind="video", plain_size=100 * MiB), limit)  # no error
    check_size(f.BlobNew(size=at_limit, kind="video"), limit)  # the blob alone, too
    with pytest.raises(ProtocolError) as over:
        check_size(f.BlobNew(size=blob_size(100 * MiB + 1), kind="video", plain_size=100 * MiB + 1), limit)
    assert over.value.code == ErrorCode.TOO_LARGE
    assert "a video may be 100 MiB (104,857,600 bytes) at most" in over.value.message
    with pytest.raises(ProtocolError) as blob_over:
        check_size(f.BlobNew(size=at_limit + 1, kind="video"), limit)
    assert blob_over.value.code == ErrorCode.TOO_LARGE and "100 MiB" in blob_over.value.message


def test_a_plain_size_that_does_not_make_the_blob_is_invalid() -> None:
    with pytest.raises(ProtocolError) as wrong:
        check_size(f.BlobNew(size=blob_size(1000) + 16, kind="file", plain_size=1000), LIMIT)
    assert wrong.value.code == ErrorCode.INVALID


@pytest.fixture
async def limited(tmp_path: Path) -> AsyncIterator[MediaHarness]:
    harness = await start_gateway(tmp_path, "local", None, file_bytes=LIMIT)
    try:
        yield harness
    finally:
        await stop_harness(harness)


def stored_uploads(media: MediaHarness) -> list[Path]:
    """The local store's pending uploads (one directory per blob_new granted)."""
    return list((media.gateway.config.data_dir / "media" / "parts").iterdir())


async def test_a_file_of_exactly_the_limit_is_sent(limited: MediaHarness, tmp_path: Path) -> None:
    doc = tmp_path / "exact.bin"
    doc.write_bytes(os.urandom(LIMIT))
    alice = await state_client(limited, "alice", tmp_path)
    bob = await state_client(limited, "bob", tmp_path)  # online: his keys are there to seal to
    await alice.send_file(doc, to="bob")  # ✓: the blob went and the message was acked
    assert alice.state.uploads() == []
    while not isinstance(message := await bob.next_event(30), Message):
        pass
    assert (await bob.download(message, tmp_path / "bob")).read_bytes() == doc.read_bytes()


async def test_one_byte_over_the_limit_is_refused_in_file_terms(
    limited: MediaHarness, tmp_path: Path
) -> None:
    doc = tmp_path / "over.bin"
    doc.write_bytes(os.urandom(LIMIT + 1))  # the same blob size as LIMIT: only plain_size tells
    assert blob_size(LIMIT + 1) == blob_size(LIMIT)
    alice = await state_client(limited, "alice", tmp_path)
    await limited.user("bob")
    with pytest.raises(RoostError) as refused:
        await alice.send_file(doc, to="bob")
    assert refused.value.code == "too_large"
    assert "a file may be 100,000 bytes at most; this one is 100,001 bytes" in refused.value.message
    assert alice.state.uploads() == [] and stored_uploads(limited) == []  # nothing kept on either side
    assert list(alice.media_folder().glob("*.enc")) == []


async def test_the_blob_is_bounded_exactly_without_a_plain_size(limited: MediaHarness) -> None:
    alice = await limited.client("alice")
    slot: f.BlobSlot = await alice._request(f.BlobNew(size=blob_size(LIMIT), kind="file"))
    assert slot.parts >= 1
    with pytest.raises(RoostError) as refused:
        await alice._request(f.BlobNew(size=blob_size(LIMIT) + 1, kind="file"))
    assert refused.value.code == "too_large"
    assert "100,000 bytes" in refused.value.message and str(f"{blob_size(LIMIT):,}") in refused.value.message
    assert len(stored_uploads(limited)) == 1  # only the slot granted
