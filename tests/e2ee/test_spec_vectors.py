"""The KDFs as the specifications write them, recomputed independently (stdlib hmac, RFC 5869 by hand).

The 1:1 ratchet has no interop oracle (libsignal's needs SPQR), so these pin its
derivations to the Double Ratchet and PQXDH specifications: a swapped constant
or info string, or a missing 0xFF prefix, fails here even though both sides of
a roost conversation would still agree with each other.
"""

from __future__ import annotations

import hmac
import os

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from roost.e2ee import LocalKeys, pqxdh, ratchet, sender_keys
from roost.e2ee import keys as k
from tests.e2ee.conftest import publish


def rfc5869(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.digest(salt or bytes(32), ikm, "sha256")
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes([counter]), "sha256")
        out += block
        counter += 1
    return out[:length]


def test_chain_and_root_kdfs_are_the_double_ratchet_recommendations() -> None:
    chain_key, root_key, dh_out = os.urandom(32), os.urandom(32), os.urandom(32)
    assert ratchet.kdf_ck(chain_key) == (
        hmac.digest(chain_key, b"\x02", "sha256"),  # next chain key
        hmac.digest(chain_key, b"\x01", "sha256"),  # message key
    )
    derived = rfc5869(dh_out, root_key, b"Roost_Ratchet_RootKey", 64)
    assert ratchet.kdf_rk(root_key, dh_out) == (derived[:32], derived[32:])


def test_sender_key_derivations_are_libsignals() -> None:
    seed = os.urandom(32)
    derived = rfc5869(seed, b"", b"WhisperGroup", 48)
    assert sender_keys.message_keys(seed) == (derived[:16], derived[16:])


def test_pqxdh_secret_is_the_specifications_formula() -> None:
    alice, bob = LocalKeys.generate(), LocalKeys.generate()
    bundle = publish(bob)
    session = ratchet.Session.initiate(alice, "bob", bob.identity_public, bundle)
    fields, _, _ = ratchet._parse_prekey(session.encrypt(b"x"))
    _, _, base_key, signed_id, prekey_id, kem_id, kem_ciphertext = fields

    def x25519(private: bytes, public33: bytes) -> bytes:
        return X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(public33[1:])
        )

    spk = bob.signed_prekey_private(signed_id)
    dh1 = x25519(spk, alice.identity_public)
    dh2 = x25519(bob.identity_private, base_key)
    dh3 = x25519(spk, base_key)
    dh4 = x25519(bob.prekey_private(prekey_id), base_key)
    ss = k.kem_decapsulate(bob.kem_seed(kem_id), kem_ciphertext)
    expected = rfc5869(
        b"\xff" * 32 + dh1 + dh2 + dh3 + dh4 + ss, bytes(32), b"Roost_PQXDH_X25519_SHA-256_ML-KEM-1024", 32
    )
    got = pqxdh.respond(
        bob.identity_private,
        spk,
        bob.prekey_private(prekey_id),
        bob.kem_seed(kem_id),
        alice.identity_public[1:],
        base_key[1:],
        kem_ciphertext,
    )
    assert got == expected
