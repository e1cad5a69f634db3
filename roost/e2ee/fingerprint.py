"""Safety numbers: libsignal's displayable numeric fingerprint.

Per party: SHA-512 iterated 5,200 times, starting from
version(0x0000) || identity key (33) || identifier || identity key, each later
round hashing previous digest || identity key. The first 30 bytes, as six
5-byte big-endian numbers mod 100,000, give 30 digits; the two halves are
concatenated smaller-first, so both parties see the same 60 digits. The digits
are the same for libsignal's scannable fingerprint version 1 and 2 (Signal's
apps use 2 with 5,200 iterations); the version only changes the QR payload.
Identifiers are the UTF-8 user names (Signal uses its service ids).
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes

from roost.e2ee.errors import E2eeError
from roost.e2ee.keys import EC_PUBLIC_LEN, EC_TYPE

ITERATIONS = 5200
_HASH_VERSION = b"\x00\x00"


def _sha512(data: bytes) -> bytes:
    hasher = hashes.Hash(hashes.SHA512())
    hasher.update(data)
    return hasher.finalize()


def _party_digits(identifier: bytes, identity: bytes, iterations: int) -> str:
    if len(identity) != EC_PUBLIC_LEN or identity[0] != EC_TYPE:
        raise E2eeError("bad identity key")
    digest = _sha512(_HASH_VERSION + identity + identifier + identity)
    for _ in range(iterations - 1):
        digest = _sha512(digest + identity)
    return "".join(f"{int.from_bytes(digest[i : i + 5], 'big') % 100_000:05d}" for i in range(0, 30, 5))


def safety_number(
    local_user: str,
    local_identity: bytes,
    remote_user: str,
    remote_identity: bytes,
    iterations: int = ITERATIONS,
) -> str:
    """The 60-digit safety number both parties compute identically."""
    local = _party_digits(local_user.encode(), local_identity, iterations)
    remote = _party_digits(remote_user.encode(), remote_identity, iterations)
    return local + remote if local < remote else remote + local


def fingerprint_digits(number: str) -> str:
    """A safety number formatted as Signal shows it: twelve groups of five digits."""
    if len(number) != 60 or not number.isdigit():
        raise E2eeError("a safety number has 60 digits")
    return " ".join(number[i : i + 5] for i in range(0, 60, 5))
