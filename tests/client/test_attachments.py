"""Attachment crypto, the reference format and safe file names (no server)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tracemalloc
import wave
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roost.client.attachments import (
    IV_BYTES,
    MAC_BYTES,
    AttachmentRef,
    BlobTampered,
    InvalidAttachment,
    b64,
    decrypt_file,
    encrypt_file,
    encrypted_size,
    parse_reference,
    safe_file_name,
)
from roost.client.mediainfo import probe, thumbnail

FIXED_KEY = bytes(range(64))
FIXED_IV = bytes(16)


def _roundtrip(tmp: Path, data: bytes) -> tuple[Path, bytes]:
    src = tmp / "in.bin"
    src.write_bytes(data)
    enc = encrypt_file(src, tmp / "blob")
    out_dir = tmp / "out"
    out_dir.mkdir(exist_ok=True)
    path = decrypt_file(enc.path, out_dir, "file.bin", key=enc.key, digest=enc.digest, plain_size=len(data))
    return path, path.read_bytes()


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(data=st.binary(max_size=5000))
def test_roundtrip_any_size(tmp_path: Path, data: bytes) -> None:
    for p in tmp_path.iterdir():
        if p.is_dir():
            for q in p.iterdir():
                q.unlink()
        else:
            p.unlink()
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    enc = encrypt_file(src, tmp_path / "blob")
    assert enc.size == encrypted_size(len(data)) == (tmp_path / "blob").stat().st_size
    assert enc.digest == hashlib.sha256((tmp_path / "blob").read_bytes()).digest()
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    path = decrypt_file(enc.path, out, "f", key=enc.key, digest=enc.digest, plain_size=len(data))
    assert path.read_bytes() == data


def test_blob_layout_matches_signal_attachments(tmp_path: Path) -> None:
    """IV || AES-256-CBC(PKCS7) || HMAC-SHA256(IV||ct), recomputed with hashlib/hmac here."""
    import hmac as std_hmac

    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    data = b"attachment bytes" * 100
    src = tmp_path / "in"
    src.write_bytes(data)
    enc = encrypt_file(src, tmp_path / "blob", key=FIXED_KEY, iv=FIXED_IV)
    blob = (tmp_path / "blob").read_bytes()
    padder = padding.PKCS7(128).padder()
    enc_ = Cipher(algorithms.AES256(FIXED_KEY[:32]), modes.CBC(FIXED_IV)).encryptor()
    ct = enc_.update(padder.update(data) + padder.finalize()) + enc_.finalize()
    mac = std_hmac.new(FIXED_KEY[32:], FIXED_IV + ct, "sha256").digest()
    assert blob == FIXED_IV + ct + mac
    assert enc.digest == hashlib.sha256(blob).digest()


def test_fresh_key_and_iv_each_time(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.write_bytes(b"same file")
    a = encrypt_file(src, tmp_path / "a")
    b = encrypt_file(src, tmp_path / "b")
    assert a.key != b.key and len(a.key) == 64
    assert (tmp_path / "a").read_bytes()[:IV_BYTES] != (tmp_path / "b").read_bytes()[:IV_BYTES]


@pytest.mark.parametrize("where", ["iv", "middle", "last_block", "mac"])
def test_tampered_blob_refused_and_nothing_written(tmp_path: Path, where: str) -> None:
    src = tmp_path / "in"
    src.write_bytes(os.urandom(10_000))
    enc = encrypt_file(src, tmp_path / "blob")
    blob = bytearray((tmp_path / "blob").read_bytes())
    at = {"iv": 3, "middle": len(blob) // 2, "last_block": len(blob) - MAC_BYTES - 5, "mac": len(blob) - 1}
    blob[at[where]] ^= 0x01
    (tmp_path / "blob").write_bytes(bytes(blob))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BlobTampered, match="digest"):
        decrypt_file(tmp_path / "blob", out, "f", key=enc.key, digest=enc.digest)
    # The attacker also controls the digest (a forged reference): the MAC still refuses it.
    forged = hashlib.sha256(bytes(blob)).digest()
    with pytest.raises(BlobTampered, match="MAC"):
        decrypt_file(tmp_path / "blob", out, "f", key=enc.key, digest=forged)
    assert list(out.iterdir()) == []


def test_truncated_and_wrong_key_refused(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.write_bytes(os.urandom(5000))
    enc = encrypt_file(src, tmp_path / "blob")
    out = tmp_path / "out"
    out.mkdir()
    wrong = bytes(64)
    with pytest.raises(BlobTampered):
        decrypt_file(enc.path, out, "f", key=wrong, digest=enc.digest)
    blob = (tmp_path / "blob").read_bytes()
    (tmp_path / "short").write_bytes(blob[:-16])
    with pytest.raises(BlobTampered):
        decrypt_file(tmp_path / "short", out, "f", key=enc.key, digest=enc.digest)
    (tmp_path / "tiny").write_bytes(blob[:20])
    with pytest.raises(BlobTampered):
        decrypt_file(tmp_path / "tiny", out, "f", key=enc.key, digest=hashlib.sha256(blob[:20]).digest())
    assert list(out.iterdir()) == []


def test_wrong_claimed_size_refused(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.write_bytes(b"x" * 100)
    enc = encrypt_file(src, tmp_path / "blob")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BlobTampered, match="100 bytes"):
        decrypt_file(enc.path, out, "f", key=enc.key, digest=enc.digest, plain_size=99)
    assert list(out.iterdir()) == []


def test_existing_file_never_replaced(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.write_bytes(b"new")
    enc = encrypt_file(src, tmp_path / "blob")
    out = tmp_path / "out"
    out.mkdir()
    (out / "photo.jpg").write_bytes(b"old")
    (out / "photo (1).jpg").write_bytes(b"old1")
    path = decrypt_file(enc.path, out, "photo.jpg", key=enc.key, digest=enc.digest)
    assert path == out / "photo (2).jpg" and path.read_bytes() == b"new"
    assert (out / "photo.jpg").read_bytes() == b"old"
    assert sorted(p.name for p in out.iterdir()) == ["photo (1).jpg", "photo (2).jpg", "photo.jpg"]


def test_streams_without_loading_the_file(tmp_path: Path) -> None:
    src = tmp_path / "in"
    with open(src, "wb") as f:
        for _ in range(24):
            f.write(os.urandom(1 << 20))
    out = tmp_path / "out"
    out.mkdir()
    tracemalloc.start()
    try:
        enc = encrypt_file(src, tmp_path / "blob")
        decrypt_file(enc.path, out, "big", key=enc.key, digest=enc.digest, plain_size=24 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak:,} bytes for a 24 MiB file"
    assert hashlib.sha256((out / "big").read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()


# -- the reference --------------------------------------------------------------------


def _ref(**over: object) -> dict[str, object]:
    ref: dict[str, object] = {
        "blob": "a" * 32,
        "key": b64(bytes(64)),
        "digest": b64(bytes(32)),
        "size": 10,
        "content_type": "image/png",
        "name": "p.png",
        "kind": "image",
        "width": 4,
        "height": 3,
    }
    ref.update(over)
    return {k: v for k, v in ref.items() if v is not None}


def test_valid_reference_parses_and_roundtrips() -> None:
    ref = parse_reference(
        json.dumps(
            _ref(caption="hi\nthere", thumbnail=b64(b"x" * 100), thumbnail_type="image/jpeg", extra="ignored")
        ).encode()
    )
    assert ref.width == 4 and ref.caption == "hi\nthere" and ref.thumbnail_bytes() == b"x" * 100
    assert parse_reference(ref.encode()) == ref


BAD = [
    {"blob": "../../etc/passwd"},
    {"blob": "a" * 8},
    {"key": b64(bytes(63))},
    {"key": "not base64!"},
    {"digest": b64(bytes(31))},
    {"size": -1},
    {"size": 1 << 50},
    {"size": "10"},
    {"content_type": "image/png\r\nX: y"},
    {"content_type": "nonsense"},
    {"kind": "virus"},
    {"name": ""},
    {"name": "a\x00b"},
    {"name": "x" * 300},
    {"width": 0},
    {"height": 1 << 20},
    {"width": 1.5},
    {"thumbnail": b64(b"x" * 9000), "thumbnail_type": "image/jpeg"},
    {"thumbnail": b64(b"x"), "thumbnail_type": "text/html"},
    {"caption": "x" * 5000},
    {"v": 2},
    {"blob": None},
]


@pytest.mark.parametrize("change", BAD, ids=[next(iter(c)) + str(i) for i, c in enumerate(BAD)])
def test_bad_reference_refused(change: dict[str, object]) -> None:
    body = _ref(**change)
    if change.get("blob", "") is None:
        body.pop("blob", None)
    with pytest.raises(InvalidAttachment):
        parse_reference(json.dumps(body).encode())


@given(
    st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
            ),
            max_leaves=20,
        ).map(lambda v: json.dumps(v).encode()),
    )
)
def test_any_body_is_a_reference_or_invalid_attachment(body: bytes) -> None:
    try:
        ref = parse_reference(body)
    except InvalidAttachment:
        return
    assert isinstance(ref, AttachmentRef)


# -- safe names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\windows\\system.ini", "system.ini"),
        ("/abs/path/x.txt", "x.txt"),
        ("..", "attachment"),
        (".bashrc", "bashrc"),
        ("", "attachment"),
        ("CON", "_CON"),
        ("a\x00b\x1f.txt", "a_b_.txt"),
        ("photo.jpg", "photo.jpg"),
    ],
)
def test_safe_file_name_examples(name: str, expected: str) -> None:
    assert safe_file_name(name) == expected


@given(st.text(max_size=400))
def test_safe_file_name_stays_in_the_directory(name: str) -> None:
    safe = safe_file_name(name)
    assert safe and "/" not in safe and "\\" not in safe and "\x00" not in safe
    assert not safe.startswith(".")
    assert len(safe.encode()) <= 200
    base = Path("/save/dir")
    assert (base / safe).resolve().parent == base.resolve()


# -- media info ------------------------------------------------------------------------


def test_probe_png_gif_jpeg_dimensions_and_thumbnail(tmp_path: Path) -> None:
    from PIL import Image

    img = Image.new("RGB", (640, 480), (200, 30, 30))
    for fmt, ct in (
        ("PNG", "image/png"),
        ("GIF", "image/gif"),
        ("JPEG", "image/jpeg"),
        ("WEBP", "image/webp"),
    ):
        path = tmp_path / f"x.{fmt.lower()}"
        img.save(path, fmt)
        info = probe(path)
        assert (info.content_type, info.kind, info.width, info.height) == (ct, "image", 640, 480), fmt
        thumb = thumbnail(path, info)
        assert thumb is not None and len(thumb[0]) <= 8192 and thumb[1] == "image/jpeg"
        assert Image.open(io.BytesIO(thumb[0])).size == (96, 72)


def test_probe_wav_duration_and_plain_file(tmp_path: Path) -> None:
    path = tmp_path / "note.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x00" * 12_000)
    info = probe(path)
    assert (info.kind, info.duration_ms) == ("audio", 1500)
    doc = tmp_path / "report.pdf"
    doc.write_bytes(b"%PDF-1.4 ...")
    info = probe(doc)
    assert (info.content_type, info.kind, info.width) == ("application/pdf", "file", None)
    assert thumbnail(doc, info) is None


def test_probe_mp4_duration(tmp_path: Path) -> None:
    def box(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I4s", 8 + len(payload), kind) + payload

    mvhd = bytes(4) + struct.pack(">IIII", 0, 0, 600, 600 * 42) + bytes(80)
    data = (
        box(b"ftyp", b"isom\x00\x00\x02\x00") + box(b"mdat", bytes(1000)) + box(b"moov", box(b"mvhd", mvhd))
    )
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    info = probe(path)
    assert (info.content_type, info.kind, info.duration_ms) == ("video/mp4", "video", 42_000)


def test_probe_garbage_image_header_is_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "bad.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0\x00\x01" + b"\xff" * 50)
    info = probe(path)
    assert info.kind == "image" and info.width is None
