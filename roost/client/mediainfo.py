"""What an attachment reference says about a file: content type, kind,
image dimensions, duration and a small thumbnail.

Dimensions come from the image's own header (PNG, GIF, JPEG, WebP) and the
duration from a WAV header or an MP4/MOV ``mvhd`` box, read here with no
decoder: a few hundred bytes of each file. A thumbnail needs a decoder, so it
is made only when Pillow is importable (it is not a dependency of the
package); without it, a reference simply has none.
"""

from __future__ import annotations

import io
import mimetypes
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from roost.client.attachments import MAX_THUMBNAIL_BYTES

THUMBNAIL_EDGE = 96  # px, the longer side
_SNIFF = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"\xff\xd8\xff", "image/jpeg"),
)


@dataclass(slots=True, frozen=True)
class MediaInfo:
    content_type: str
    kind: str
    width: int | None = None
    height: int | None = None
    duration_ms: int | None = None


def kind_of(content_type: str) -> str:
    major = content_type.split("/", 1)[0]
    return major if major in ("image", "video", "audio") else "file"


def sniff_type(head: bytes, name: str) -> str:
    for magic, ct in _SNIFF:
        if head.startswith(magic):
            return ct
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio/wav"
    guessed, _ = mimetypes.guess_type(name, strict=False)
    return (guessed or "application/octet-stream").lower()


def image_size(head: bytes, f: BinaryIO) -> tuple[int, int] | None:
    """(width, height) from a PNG, GIF, WebP or JPEG header; None if unknown."""
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])
        return w, h
    if head[:6] in (b"GIF87a", b"GIF89a"):
        w, h = struct.unpack("<HH", head[6:10])
        return w, h
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp_size(head)
    if head.startswith(b"\xff\xd8"):
        return _jpeg_size(f)
    return None


def _webp_size(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8X" and len(head) >= 30:
        w = int.from_bytes(head[24:27], "little") + 1
        h = int.from_bytes(head[27:30], "little") + 1
        return w, h
    if chunk == b"VP8 " and len(head) >= 30:
        w, h = struct.unpack("<HH", head[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and len(head) >= 25:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(f: BinaryIO, max_segments: int = 512) -> tuple[int, int] | None:
    """Walk the JPEG's marker segments to the first start-of-frame (bounded)."""
    f.seek(2)
    for _ in range(max_segments):
        marker = f.read(2)
        if len(marker) < 2 or marker[0] != 0xFF:
            return None
        while marker[1] == 0xFF:  # fill bytes
            marker = marker[1:] + f.read(1)
        code = marker[1]
        if code in (0xD8, 0x01) or 0xD0 <= code <= 0xD7:
            continue
        length_bytes = f.read(2)
        if len(length_bytes) < 2:
            return None
        (length,) = struct.unpack(">H", length_bytes)
        if code in _SOF:
            data = f.read(5)
            if len(data) < 5:
                return None
            h, w = struct.unpack(">HH", data[1:5])
            return w, h
        if length < 2:
            return None
        f.seek(length - 2, io.SEEK_CUR)
    return None


def duration_ms(head: bytes, f: BinaryIO, size: int) -> int | None:
    """The duration of a WAV (PCM header) or an MP4/MOV (``moov/mvhd``); None if unknown."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return _wav_duration(head, f)
    if head[4:8] == b"ftyp":
        return _mp4_duration(f, size)
    return None


def _wav_duration(head: bytes, f: BinaryIO) -> int | None:
    f.seek(12)
    byte_rate = 0
    for _ in range(64):
        header = f.read(8)
        if len(header) < 8:
            return None
        chunk, length = header[:4], struct.unpack("<I", header[4:])[0]
        if chunk == b"fmt ":
            fmt = f.read(length)
            if len(fmt) >= 12:
                byte_rate = struct.unpack("<I", fmt[8:12])[0]
            continue
        if chunk == b"data":
            return length * 1000 // byte_rate if byte_rate else None
        f.seek(length + (length & 1), io.SEEK_CUR)
    return None


def _boxes(f: BinaryIO, start: int, end: int) -> list[tuple[bytes, int, int]]:
    """(type, payload start, box end) of the ISO-BMFF boxes in [start, end), at most 256."""
    out: list[tuple[bytes, int, int]] = []
    pos = start
    while pos + 8 <= end and len(out) < 256:
        f.seek(pos)
        header = f.read(16)
        if len(header) < 8:
            break
        length, kind = struct.unpack(">I4s", header[:8])
        payload = pos + 8
        if length == 1 and len(header) >= 16:
            length = struct.unpack(">Q", header[8:16])[0]
            payload = pos + 16
        elif length == 0:
            length = end - pos
        if length < 8:
            break
        out.append((kind, payload, pos + length))
        pos += length
    return out


def _mp4_duration(f: BinaryIO, size: int) -> int | None:
    for kind, start, end in _boxes(f, 0, size):
        if kind != b"moov":
            continue
        for inner, payload, _ in _boxes(f, start, end):
            if inner != b"mvhd":
                continue
            f.seek(payload)
            data = f.read(32)
            if not data:
                return None
            if data[0] == 1 and len(data) >= 32:  # version 1: 64-bit times
                scale, length = struct.unpack(">IQ", data[20:32])
            elif len(data) >= 20:
                scale, length = struct.unpack(">II", data[12:20])
            else:
                return None
            return length * 1000 // scale if scale else None
    return None


def probe(path: Path, name: str | None = None) -> MediaInfo:
    """Content type, kind, dimensions and duration of the file at ``path`` (reads its headers only)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
        content_type = sniff_type(head, name or path.name)
        kind = kind_of(content_type)
        dims = image_size(head, f) if kind == "image" else None
        duration = duration_ms(head, f, size) if kind in ("video", "audio") else None
    width, height = dims if dims is not None and all(0 < d <= 1 << 16 for d in dims) else (None, None)
    return MediaInfo(content_type, kind, width, height, duration)


def thumbnail(path: Path, info: MediaInfo) -> tuple[bytes, str] | None:
    """A JPEG of at most MAX_THUMBNAIL_BYTES for an image, if Pillow is installed; else None."""
    if info.kind != "image":
        return None
    try:
        from PIL import Image
    except ImportError:
        return None
    try:
        with Image.open(path) as img:
            img.thumbnail((THUMBNAIL_EDGE, THUMBNAIL_EDGE))
            rgb = img.convert("RGB")
            for quality in (70, 50, 30):
                out = io.BytesIO()
                rgb.save(out, "JPEG", quality=quality)
                if out.tell() <= MAX_THUMBNAIL_BYTES:
                    return out.getvalue(), "image/jpeg"
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return None
