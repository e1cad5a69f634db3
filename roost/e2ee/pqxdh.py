"""PQXDH key agreement (Signal's specification, revision 3), X25519 + SHA-256 + ML-KEM-1024.

    DH1 = DH(IK_A, SPK_B)  DH2 = DH(EK_A, IK_B)  DH3 = DH(EK_A, SPK_B)
    DH4 = DH(EK_A, OPK_B) when a one-time prekey was used
    (SS, CT) = ML-KEM-1024 encapsulation to PQPK_B
    SK = HKDF-SHA256(salt = 32 zero bytes, IKM = 32 x 0xFF || DH1 || DH2 || DH3 [|| DH4] || SS, info = INFO)

The caller verifies the signatures of SPK_B and PQPK_B before calling initiate
(Session.initiate does). Associated data for the ratchet: IK_A || IK_B, both
serialised (33 bytes each).
"""

from __future__ import annotations

from roost.e2ee.keys import dh, generate_private, kem_decapsulate, kem_encapsulate, public_raw, serialize_ec
from roost.e2ee.primitives import hkdf_sha256

INFO = b"Roost_PQXDH_X25519_SHA-256_ML-KEM-1024"
_F = b"\xff" * 32  # the spec's curve-dependent prefix for X25519
_SALT = b"\x00" * 32


def kdf(key_material: bytes) -> bytes:
    return hkdf_sha256(_F + key_material, _SALT, INFO, 32)


def initiate(
    identity_private: bytes,
    remote_identity: bytes,
    signed_prekey: bytes,
    one_time_prekey: bytes | None,
    kem_prekey: bytes,
) -> tuple[bytes, bytes, bytes]:
    """(SK, serialised base key EK_A, KEM ciphertext); EC keys raw 32-byte X25519, the KEM key serialised."""
    base_private = generate_private()
    material = (
        dh(identity_private, signed_prekey)
        + dh(base_private, remote_identity)
        + dh(base_private, signed_prekey)
    )
    if one_time_prekey is not None:
        material += dh(base_private, one_time_prekey)
    secret, ciphertext = kem_encapsulate(kem_prekey)
    return kdf(material + secret), serialize_ec(public_raw(base_private)), ciphertext


def respond(
    identity_private: bytes,
    signed_private: bytes,
    one_time_private: bytes | None,
    kem_seed: bytes,
    remote_identity: bytes,
    base_key: bytes,
    kem_ciphertext: bytes,
) -> bytes:
    """SK as the responder computes it; remote keys raw 32-byte X25519."""
    material = (
        dh(signed_private, remote_identity) + dh(identity_private, base_key) + dh(signed_private, base_key)
    )
    if one_time_private is not None:
        material += dh(one_time_private, base_key)
    return kdf(material + kem_decapsulate(kem_seed, kem_ciphertext))
