"""Attachment encryption, as Signal attachments, and the reference message.

A file is sent as an encrypted blob in the media store and a small chat
message that points at it (``ATTACHMENT_CT``). The blob is

    IV (16) || AES-256-CBC(PKCS7)(file) || HMAC-SHA256(IV || ciphertext) (32)

under a fresh random 64-byte key (32 bytes AES key, 32 bytes HMAC key), and
the message carries the key and the SHA-256 digest of the whole blob. A
recipient checks the digest, then the MAC, and decrypts only then; a blob that
fails either is ``BlobTampered`` and nothing is written where the file goes.

Only ``cryptography``'s primitives; files are streamed in chunks, so a 100 MiB
video never sits in memory. No network I/O here.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from roost.core.blobsize import IV_BYTES as IV_BYTES
from roost.core.blobsize import MAC_BYTES as MAC_BYTES
from roost.core.blobsize import blob_size, plain_size_range

ATTACHMENT_CT = "application/vnd.roost.attachment+json"
KEY_BYTES = 64  # AES-256 key || HMAC-SHA256 key
DIGEST_BYTES = 32
CHUNK = 1 << 20  # streamed 1 MiB at a time
MAX_THUMBNAIL_BYTES = 8 * 1024
MAX_FILE_BYTES = 1 << 40  # what a reference may claim; the server's limits are far lower
MAX_NAME_CHARS = 255
MAX_CAPTION_CHARS = 4096
MAX_DIMENSION = 1 << 16
KINDS = ("image", "video", "audio", "file")
# The blob size of a file (roost/core/blobsize.py: the server uses the same arithmetic).
encrypted_size = blob_size
# Blob ids are the server's (128-bit random, url-safe); a reference naming
# anything else is refused before a request is made with it.
_BLOB_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_CONTENT_TYPE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}$")


class BlobTampered(Exception):
    """A downloaded blob does not match its reference (digest or MAC): refused, nothing written."""


class InvalidAttachment(ValueError):
    """A reference message that is not a well-formed attachment reference."""


@dataclass(slots=True, frozen=True)
class EncryptedFile:
    path: Path
    key: bytes
    digest: bytes  # SHA-256 of the whole blob at ``path``
    plain_size: int
    size: int  # of the blob


def _split_key(key: bytes) -> tuple[bytes, bytes]:
    if len(key) != KEY_BYTES:
        raise ValueError(f"an attachment key is {KEY_BYTES} bytes")
    return key[:32], key[32:]


def encrypt_file(
    source: Path, dest: Path, *, key: bytes | None = None, iv: bytes | None = None
) -> EncryptedFile:
    """Encrypt ``source`` into ``dest`` (created or replaced, fsynced); streaming.

    ``key``/``iv`` default to fresh random ones (given only by tests)."""
    key = key if key is not None else secrets.token_bytes(KEY_BYTES)
    iv = iv if iv is not None else secrets.token_bytes(IV_BYTES)
    aes_key, mac_key = _split_key(key)
    encryptor = Cipher(algorithms.AES256(aes_key), modes.CBC(iv)).encryptor()
    padder = padding.PKCS7(128).padder()
    mac = crypto_hmac.HMAC(mac_key, hashes.SHA256())
    digest = hashlib.sha256()
    plain_size = 0

    with open(source, "rb") as src, open(dest, "wb") as out:

        def emit(data: bytes) -> None:
            mac.update(data)
            digest.update(data)
            out.write(data)

        emit(iv)
        while chunk := src.read(CHUNK):
            plain_size += len(chunk)
            emit(encryptor.update(padder.update(chunk)))
        emit(encryptor.update(padder.finalize()) + encryptor.finalize())
        tag = mac.finalize()
        digest.update(tag)
        out.write(tag)
        out.flush()
        os.fsync(out.fileno())
    size = dest.stat().st_size
    return EncryptedFile(dest, key, digest.digest(), plain_size, size)


def _read_range(f: Any, end: int, each: Callable[[bytes], None]) -> None:
    """Feed ``f``'s bytes from its position up to offset ``end`` to ``each``."""
    while (left := end - f.tell()) > 0:
        chunk = f.read(min(CHUNK, left))
        if not chunk:
            raise BlobTampered("the blob is shorter than it was")
        each(chunk)


def verify_blob(f: Any, size: int, key: bytes, digest: bytes) -> None:
    """Digest first, then MAC, over the open blob ``f`` (``size`` bytes); else ``BlobTampered``."""
    _, mac_key = _split_key(key)
    if plain_size_range(size) is None:
        raise BlobTampered(f"a blob of {size} bytes cannot be an attachment")
    sha = hashlib.sha256()
    mac = crypto_hmac.HMAC(mac_key, hashes.SHA256())
    f.seek(0)

    def both(chunk: bytes) -> None:
        sha.update(chunk)
        mac.update(chunk)

    _read_range(f, size - MAC_BYTES, both)
    tag = f.read(MAC_BYTES)
    sha.update(tag)
    if not hmac.compare_digest(sha.digest(), digest):
        raise BlobTampered("the blob's digest does not match its reference")
    if not hmac.compare_digest(mac.finalize(), tag):
        raise BlobTampered("the blob's MAC does not verify")


def decrypt_file(
    source: Path, dest_dir: Path, name: str, *, key: bytes, digest: bytes, plain_size: int | None = None
) -> Path:
    """Check ``source``'s digest and MAC, then decrypt it into ``dest_dir``/``name``; the path written.

    ``name`` must be safe already (``safe_file_name``). An existing file is
    never replaced: ``photo (1).jpg``, ``photo (2).jpg``... are tried. The
    plaintext goes to a hidden temp file in ``dest_dir`` and is linked to its
    name only when the whole blob decrypted (and the MAC, recomputed while
    decrypting, still matched: the file could change between the passes).
    ``BlobTampered`` if the blob fails a check: then nothing is left in ``dest_dir``.
    """
    aes_key, mac_key = _split_key(key)
    with open(source, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        verify_blob(f, size, key, digest)
        f.seek(0)
        iv = f.read(IV_BYTES)
        decryptor = Cipher(algorithms.AES256(aes_key), modes.CBC(iv)).decryptor()
        unpadder = padding.PKCS7(128).unpadder()
        mac = crypto_hmac.HMAC(mac_key, hashes.SHA256())
        mac.update(iv)
        temp = dest_dir / f".{secrets.token_hex(8)}.roost-part"
        try:
            with open(temp, "xb") as out:
                written = 0

                def plain(chunk: bytes) -> None:
                    nonlocal written
                    mac.update(chunk)
                    data = unpadder.update(decryptor.update(chunk))
                    written += len(data)
                    out.write(data)

                _read_range(f, size - MAC_BYTES, plain)
                try:
                    tail = unpadder.update(decryptor.finalize()) + unpadder.finalize()
                except ValueError:
                    raise BlobTampered("the blob's padding is wrong") from None
                if not hmac.compare_digest(mac.finalize(), f.read(MAC_BYTES)):
                    raise BlobTampered("the blob changed while it was decrypted")
                out.write(tail)
                written += len(tail)
                if plain_size is not None and written != plain_size:
                    raise BlobTampered(f"the file is {written} bytes, its reference says {plain_size}")
                out.flush()
                os.fsync(out.fileno())
            return _link_unused(temp, dest_dir, name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)


def _link_unused(temp: Path, dest_dir: Path, name: str) -> Path:
    """Give ``temp`` the first free name of ``name``, ``name (1)``, ...; a hard
    link fails rather than replace, so a file that appears meanwhile is kept."""
    for n in range(10_000):
        target = dest_dir / (name if n == 0 else numbered(name, n))
        try:
            os.link(temp, target)
        except FileExistsError:
            continue
        return target
    raise FileExistsError(f"no free name for {name} in {dest_dir}")


# -- the reference message ----------------------------------------------------------


class AttachmentRef(msgspec.Struct, frozen=True, forbid_unknown_fields=False, omit_defaults=True):
    """The body of an ``ATTACHMENT_CT`` message (JSON). ``key``/``digest``/``thumbnail`` are base64.

    ``size`` is the file's (plaintext) size; the blob's follows from it
    (``encrypted_size``). Unknown fields are ignored, so a later version can add some."""

    blob: str
    key: str
    digest: str
    size: int
    content_type: str
    name: str
    kind: str = "file"
    width: int | None = None
    height: int | None = None
    duration_ms: int | None = None
    thumbnail: str | None = None  # base64 JPEG/PNG, at most MAX_THUMBNAIL_BYTES
    thumbnail_type: str | None = None
    caption: str | None = None
    v: int = 1

    @property
    def key_bytes(self) -> bytes:
        return base64.b64decode(self.key)

    @property
    def digest_bytes(self) -> bytes:
        return base64.b64decode(self.digest)

    @property
    def blob_size(self) -> int:
        return encrypted_size(self.size)

    def thumbnail_bytes(self) -> bytes | None:
        return None if self.thumbnail is None else base64.b64decode(self.thumbnail)

    def encode(self) -> bytes:
        return msgspec.json.encode(self)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _b64_exact(value: str, length: int | None, what: str, limit: int | None = None) -> bytes:
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidAttachment(f"{what} is not base64") from None
    if length is not None and len(data) != length:
        raise InvalidAttachment(f"{what} is {len(data)} bytes, not {length}")
    if limit is not None and len(data) > limit:
        raise InvalidAttachment(f"{what} is {len(data)} bytes, over {limit}")
    return data


def _check_text(value: str, limit: int, what: str, allowed: str = "") -> None:
    if len(value) > limit:
        raise InvalidAttachment(f"{what} is over {limit} characters")
    if any((ord(c) < 32 or ord(c) == 127) and c not in allowed for c in value):
        raise InvalidAttachment(f"{what} has control characters")


def _check_dimension(value: int | None, what: str) -> None:
    if value is not None and not 0 < value <= MAX_DIMENSION:
        raise InvalidAttachment(f"{what} {value} is out of range")


def validate(ref: AttachmentRef) -> AttachmentRef:
    """``ref`` if every field is within bounds, else ``InvalidAttachment`` saying which is not."""
    if ref.v != 1:
        raise InvalidAttachment(f"reference version {ref.v} is not supported")
    if not _BLOB_ID.match(ref.blob):
        raise InvalidAttachment("the blob id is malformed")
    _b64_exact(ref.key, KEY_BYTES, "the key")
    _b64_exact(ref.digest, DIGEST_BYTES, "the digest")
    if not 0 <= ref.size <= MAX_FILE_BYTES:
        raise InvalidAttachment(f"size {ref.size} is out of range")
    if not _CONTENT_TYPE.match(ref.content_type):
        raise InvalidAttachment("the content type is malformed")
    if ref.kind not in KINDS:
        raise InvalidAttachment(f"kind {ref.kind!r} is not one of {', '.join(KINDS)}")
    if not ref.name:
        raise InvalidAttachment("the file name is empty")
    _check_text(ref.name, MAX_NAME_CHARS, "the file name")
    if ref.caption is not None:
        _check_text(ref.caption, MAX_CAPTION_CHARS, "the caption", allowed="\n\t")
    _check_dimension(ref.width, "width")
    _check_dimension(ref.height, "height")
    if ref.duration_ms is not None and not 0 <= ref.duration_ms <= 1 << 40:
        raise InvalidAttachment("the duration is out of range")
    if ref.thumbnail is not None:
        _b64_exact(ref.thumbnail, None, "the thumbnail", MAX_THUMBNAIL_BYTES)
        if ref.thumbnail_type not in ("image/jpeg", "image/png"):
            raise InvalidAttachment("the thumbnail is neither JPEG nor PNG")
    return ref


def parse_reference(body: bytes) -> AttachmentRef:
    """The reference in a received message body; ``InvalidAttachment`` if it is not a valid one."""
    try:
        ref = msgspec.json.decode(body, type=AttachmentRef)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidAttachment(f"not an attachment reference: {exc}") from None
    return validate(ref)


# -- safe file names ------------------------------------------------------------------

_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
_UNSAFE = re.compile(r'[\x00-\x1f\x7f<>:"|?*]')


def safe_file_name(name: str, fallback: str = "attachment") -> str:
    """A peer's file name made harmless as one path component of a save directory.

    No directory part (``/`` and ``\\`` end it), no ``..``/hidden names, no
    control or Windows-reserved characters, at most 200 UTF-8 bytes with the
    extension kept."""
    base = re.split(r"[/\\]", name)[-1]
    base = _UNSAFE.sub("_", base).strip().lstrip(".").strip()
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem, ext = base, ""
    if stem.lower() in _RESERVED or base.lower() in _RESERVED:
        base = "_" + base
    if not base or not stem:
        base = fallback + (f".{ext}" if ext and len(ext) <= 16 else "")
    while len(base.encode()) > 200:
        stem, dot, ext = base.rpartition(".")
        base = stem[:-1] + "." + ext if dot and 0 < len(ext.encode()) <= 16 and stem else base[:-1]
    return base


def numbered(name: str, n: int) -> str:
    """``photo.jpg`` -> ``photo (n).jpg`` for the n-th name taken."""
    stem, dot, ext = name.rpartition(".")
    return f"{stem} ({n}).{ext}" if dot and stem else f"{name} ({n})"
