"""The key directory's rules: what a ``keys_put`` must satisfy, when stock is low.

No I/O: the decoder (``roost.protocol.frames``) already checked every length
and id range; this module checks what msgspec cannot — the type bytes and the
XEdDSA signatures — and the ids within one frame. The store checks the rest
(ids already stored, the stock cap) in the transaction that writes the keys.

Signatures are XEdDSA over the serialised public key (33 or 1569 bytes), as
libsignal signs signed prekeys and Kyber prekeys. libsignal carries the sign
bit of the signer's Edwards key in the top bit of the signature's last byte
(a standard XEdDSA signature has it clear), so verification reads it from
there: both kinds verify.
"""

from __future__ import annotations

from collections.abc import Iterable

import xeddsa

from roost.protocol.errors import ErrorCode, ProtocolError
from roost.protocol.frames import KeysPut

EC_TYPE = 0x05  # libsignal's DJB (X25519) key type byte
KEM_TYPE = 0x08  # libsignal's ML-KEM-1024 key type byte
MAX_STOCK = 1000  # one-time keys of one kind a device may hold
LOW_WATER = 10  # fewer one-time keys of a kind left than this: tell the owner


def verify_signature(identity: bytes, message: bytes, signature: bytes) -> bool:
    """XEdDSA: does ``signature`` sign ``message`` with the X25519 ``identity`` (33 bytes)?"""
    if len(identity) != 33 or identity[0] != EC_TYPE or len(signature) != 64:
        return False
    sign_bit = bool(signature[63] & 0x80)
    try:
        edwards = xeddsa.curve25519_pub_to_ed25519_pub(identity[1:], sign_bit)
        return xeddsa.ed25519_verify(signature[:63] + bytes([signature[63] & 0x7F]), edwards, message)
    except (ValueError, xeddsa.XEdDSAException):
        return False


def _require_type(key: bytes, kind: int, what: str, ref: str) -> None:
    if not key or key[0] != kind:
        raise ProtocolError(
            ErrorCode.BAD_KEY, f"{what}: type byte {key[:1].hex() or 'missing'}, want {kind:02x}", ref
        )


def _require_signed(identity: bytes, key: bytes, sig: bytes, what: str, ref: str) -> None:
    if not verify_signature(identity, key, sig):
        raise ProtocolError(
            ErrorCode.BAD_SIGNATURE, f"{what}: the signature does not verify with identity", ref
        )


def _require_distinct(ids: Iterable[int], what: str, ref: str) -> None:
    seen: set[int] = set()
    for key_id in ids:
        if key_id in seen:
            raise ProtocolError(ErrorCode.DUPLICATE_KEY_ID, f"{what}: id {key_id} given twice", ref)
        seen.add(key_id)


def check_upload(frame: KeysPut) -> None:
    """Raise the typed ``ProtocolError`` of the first thing wrong with ``frame``.

    Type bytes first (cheap), then the ids, then every signature (~0.1 ms
    each): a frame is refused before anything of it is stored.
    """
    ref = frame.ref
    _require_type(frame.identity, EC_TYPE, "identity", ref)
    _require_type(frame.signed.key, EC_TYPE, "signed", ref)
    for pre in frame.prekeys:
        _require_type(pre.key, EC_TYPE, f"prekey {pre.id}", ref)
    kem = [*frame.kem_prekeys, *([frame.last_resort] if frame.last_resort is not None else [])]
    for k in kem:
        _require_type(k.key, KEM_TYPE, f"kem prekey {k.id}", ref)
    _require_distinct((p.id for p in frame.prekeys), "prekeys", ref)
    # The last-resort key shares the KEM ids: a bundle names a KEM key by id alone.
    _require_distinct((k.id for k in kem), "kem prekeys", ref)
    _require_signed(frame.identity, frame.signed.key, frame.signed.sig, "signed", ref)
    for k in kem:
        _require_signed(frame.identity, k.key, k.sig, f"kem prekey {k.id}", ref)


def is_low(ec: int, kem: int) -> bool:
    """Should the owner be told to refill (one kind below the low-water mark)?"""
    return ec < LOW_WATER or kem < LOW_WATER
