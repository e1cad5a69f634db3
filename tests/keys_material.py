"""Key material for the key-directory tests, made with ``xeddsa`` and
``cryptography`` directly (libsignal's serialisations): X25519 identities that
sign XEdDSA, one-time EC keys and ML-KEM-1024 keys."""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass
from typing import Any

import xeddsa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import mlkem
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from roost.core.prekeys import verify_signature

EC, KEM = b"\x05", b"\x08"


def ec_public() -> bytes:
    key = X25519PrivateKey.generate().public_key()
    return EC + key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@functools.cache
def _kem_pool() -> tuple[bytes, ...]:
    # ML-KEM key generation is ~0.15 ms; a few distinct ones serve every test.
    return tuple(KEM + mlkem.MLKEM1024PrivateKey.generate().public_key().public_bytes_raw() for _ in range(8))


def kem_public(i: int = 0) -> bytes:
    return _kem_pool()[i % 8]


@dataclass
class Identity:
    """An identity key pair that signs as libsignal does (XEdDSA, sign bit in the signature)."""

    private: bytes
    public: bytes  # 33 bytes

    @classmethod
    def generate(cls) -> Identity:
        key = X25519PrivateKey.generate()
        raw = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        public = EC + key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return cls(raw, public)

    def sign(self, message: bytes) -> bytes:
        sig = bytearray(xeddsa.ed25519_priv_sign(self.private, message))
        sig[63] |= xeddsa.priv_to_ed25519_pub(self.private)[31] & 0x80
        assert verify_signature(self.public, message, bytes(sig))
        return bytes(sig)

    def sign_standard(self, message: bytes) -> bytes:
        """XEdDSA as specified (sign bit forced to 0), as other implementations sign."""
        return xeddsa.ed25519_priv_sign(xeddsa.priv_force_sign(self.private, False), message)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def upload(
    identity: Identity,
    ec_ids: range | list[int] = range(1, 6),
    kem_ids: range | list[int] = range(1, 6),
    last_resort: int | None = 1000,
    signed_id: int = 1,
    registration: int = 42,
    signer: Identity | None = None,
) -> dict[str, Any]:
    """A keys_put frame (a JSON dict) with valid keys and signatures."""
    signer = signer or identity
    signed_key = ec_public()
    frame: dict[str, Any] = {
        "type": "keys_put",
        "registration": registration,
        "identity": b64(identity.public),
        "signed": {"id": signed_id, "key": b64(signed_key), "sig": b64(signer.sign(signed_key))},
        "prekeys": [{"id": i, "key": b64(ec_public())} for i in ec_ids],
        "kem_prekeys": [
            {"id": i, "key": b64(kem_public(i)), "sig": b64(signer.sign(kem_public(i)))} for i in kem_ids
        ],
        "ref": "put",
    }
    if last_resort is not None:
        key = kem_public(last_resort)
        frame["last_resort"] = {"id": last_resort, "key": b64(key), "sig": b64(signer.sign(key))}
    return frame
