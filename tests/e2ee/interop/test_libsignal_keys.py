"""XEdDSA, safety numbers and prekey formats against Signal's libsignal (the Node oracle)."""

from __future__ import annotations

import os

from roost.e2ee import LocalKeys, safety_number
from roost.e2ee import keys as k
from tests.e2ee.interop.conftest import Oracle


def test_libsignal_signatures_verify_under_roost_and_roost_signatures_under_libsignal(oracle: Oracle) -> None:
    pairs = oracle([{"op": "keypair"} for _ in range(24)])
    messages = [os.urandom(n) for n in (0, 1, 33, 1569, 5, 64, 100, 7)] * 3
    # libsignal keeps the Edwards sign bit in the signature: about half of the keys have it set,
    # so among 24 keys both kinds occur (all alike: probability 2**-23).
    libsignal_sigs = oracle(
        [
            {"op": "sign", "private": p["private"], "message": m.hex()}
            for p, m in zip(pairs, messages, strict=True)
        ]
    )
    assert {bytes.fromhex(sig)[63] >> 7 for sig in libsignal_sigs} == {0, 1}
    for pair, message, sig in zip(pairs, messages, libsignal_sigs, strict=True):
        public = bytes.fromhex(pair["public"])
        assert k.verify(public, message, bytes.fromhex(sig))
        assert not k.verify(public, message + b"x", bytes.fromhex(sig))

    # roost signs with a libsignal private key and with its own keys; libsignal verifies both.
    requests = []
    expected = []
    for pair, message in zip(pairs, messages, strict=True):
        private = bytes.fromhex(pair["private"])
        sig = k.sign(private, message)
        requests.append(
            {"op": "verify", "public": pair["public"], "message": message.hex(), "signature": sig.hex()}
        )
        expected.append(True)
        requests.append(
            {
                "op": "verify",
                "public": pair["public"],
                "message": (message + b"!").hex(),
                "signature": sig.hex(),
            }
        )
        expected.append(False)
    local = LocalKeys.generate()
    requests.append(
        {
            "op": "verify",
            "public": local.identity_public.hex(),
            "message": "abcd",
            "signature": local.sign(b"\xab\xcd").hex(),
        }
    )
    expected.append(True)
    assert oracle(requests) == expected


def test_safety_numbers_match_libsignal_fingerprint_for_random_identities(oracle: Oracle) -> None:
    cases = [
        ("alice", LocalKeys.generate().identity_public, "bob", LocalKeys.generate().identity_public),
        ("zoë", LocalKeys.generate().identity_public, "ünïcode-名前", LocalKeys.generate().identity_public),
        ("same", LocalKeys.generate().identity_public, "same", LocalKeys.generate().identity_public),
    ]
    answers = oracle(
        [
            {
                "op": "fingerprint",
                "iterations": 5200,
                "version": 2,
                "local_id": a,
                "local_key": ak.hex(),
                "remote_id": b,
                "remote_key": bk.hex(),
            }
            for a, ak, b, bk in cases
        ]
    )
    assert answers == [safety_number(a, ak, b, bk) for a, ak, b, bk in cases]


def test_libsignal_signed_and_kyber_prekey_records_verify_under_roost(oracle: Oracle) -> None:
    identity = oracle([{"op": "keypair"}])[0]
    records = oracle(
        [{"op": "signed_prekey_records", "identity_private": identity["private"]} for _ in range(4)]
    )
    public = bytes.fromhex(identity["public"])
    for record in records:
        signed_key, kem_key = bytes.fromhex(record["signed_key"]), bytes.fromhex(record["kem_key"])
        assert len(signed_key) == 33 and len(kem_key) == 1569 and kem_key[0] == k.KEM_TYPE
        assert k.verify(public, signed_key, bytes.fromhex(record["signed_sig"]))
        assert k.verify(public, kem_key, bytes.fromhex(record["kem_sig"]))
        assert not k.verify(public, kem_key[:-1] + bytes([kem_key[-1] ^ 1]), bytes.fromhex(record["kem_sig"]))
        k.kem_encapsulate(kem_key)  # libsignal's public key parses as an ML-KEM-1024 encapsulation key


def test_libsignal_accepts_a_roost_bundle_and_rejects_a_forged_signature(oracle: Oracle) -> None:
    local = LocalKeys.generate()
    signed_id, signed_key, signed_sig = local.new_signed_prekey(0.0)
    [(prekey_id, prekey_key)] = local.new_prekeys(1)
    [(kem_id, kem_key, kem_sig)] = local.new_kem_prekeys(1)
    bundle = {
        "op": "process_bundle",
        "registration": local.registration,
        "identity": local.identity_public.hex(),
        "signed_id": signed_id,
        "signed_key": signed_key.hex(),
        "signed_sig": signed_sig.hex(),
        "prekey_id": prekey_id,
        "prekey_key": prekey_key.hex(),
        "kem_id": kem_id,
        "kem_key": kem_key.hex(),
        "kem_sig": kem_sig.hex(),
    }
    forged_signed = {**bundle, "signed_sig": LocalKeys.generate().sign(signed_key).hex()}
    forged_kem = {**bundle, "kem_sig": local.sign(kem_key[:-1]).hex()}
    ok, bad_signed, bad_kem = oracle([bundle, forged_signed, forged_kem])
    assert ok == {"ok": True}
    assert not bad_signed["ok"] and "ignature" in bad_signed["error"]
    assert not bad_kem["ok"] and "ignature" in bad_kem["error"]
