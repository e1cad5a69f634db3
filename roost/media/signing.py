"""Signed, expiring URLs of the local blob store (HMAC-SHA256; no I/O).

A signature binds the HTTP method, the blob, the part (0: the whole blob),
the exact size in bytes and the expiry (unix seconds), so a URL cannot be
used for another blob, part, size or method, nor after it expired.
"""

from __future__ import annotations

import base64
import hashlib
import hmac


def _message(method: str, blob: str, part: int, size: int, expires: int) -> bytes:
    return f"roost-media-v1\n{method}\n{blob}\n{part}\n{size}\n{expires}".encode()


def sign(key: bytes, method: str, blob: str, part: int, size: int, expires: int) -> str:
    mac = hmac.new(key, _message(method, blob, part, size, expires), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def verify(
    key: bytes, signature: str, method: str, blob: str, part: int, size: int, expires: int, now: float
) -> bool:
    """True when ``signature`` is ours for exactly these values and ``expires`` has not passed."""
    if now > expires:
        return False
    expected = sign(key, method, blob, part, size, expires)
    return hmac.compare_digest(expected.encode(), signature.encode())
