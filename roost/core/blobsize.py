"""The size arithmetic of an attachment blob, shared by the SDK and the server.

An attachment is sent as the blob (roost/client/attachments.py)

    IV (16) || AES-256-CBC with PKCS7 padding (file) || HMAC-SHA256 (32)

PKCS7 always pads to the next whole 16-byte block (a full block when the file
is a multiple of 16), so an N-byte file makes a blob of
``16 + 16 * (N // 16 + 1) + 32`` bytes: 49 to 64 bytes more than the file.

The server's media limits are stated in the file's (plaintext) bytes, what a
user sees; the server checks the blob against ``blob_size(limit)``, the exact
blob of a file at the limit. Pure arithmetic, no I/O.
"""

from __future__ import annotations

IV_BYTES = 16
BLOCK_BYTES = 16  # AES
MAC_BYTES = 32  # HMAC-SHA256
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


def blob_size(plain_size: int) -> int:
    """The blob size of an attachment of ``plain_size`` bytes."""
    if plain_size < 0:
        raise ValueError(f"a file has no negative size ({plain_size})")
    return IV_BYTES + (plain_size // BLOCK_BYTES + 1) * BLOCK_BYTES + MAC_BYTES


def plain_size_range(size: int) -> tuple[int, int] | None:
    """The (first, last) plaintext sizes whose blob is exactly ``size`` bytes; None if no file makes it.

    One blob size stands for 16 file sizes (the padding hides which)."""
    body = size - IV_BYTES - MAC_BYTES
    if body < BLOCK_BYTES or body % BLOCK_BYTES:
        return None
    first = body - BLOCK_BYTES
    return first, first + BLOCK_BYTES - 1


def human_size(n: int) -> str:
    """``104857600`` -> ``100 MiB``; exact (``1.5 MiB``, else the bytes), so a limit reads as it is."""
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit and (n * 10) % unit == 0:
            value = n / unit
            return f"{value:g} {name}"
    return f"{n:,} bytes"
