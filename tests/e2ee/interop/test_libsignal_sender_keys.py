"""Sender Keys both ways against Signal's libsignal (the Node oracle)."""

from __future__ import annotations

import os
import uuid

import pytest

from roost.e2ee import DuplicateMessage, InvalidSignature, SenderKeyRecord
from tests.e2ee.interop.conftest import Oracle


def test_libsignal_sender_key_messages_decrypt_and_verify_here(oracle: Oracle) -> None:
    did = uuid.uuid4()
    plaintexts = [
        b"",
        b"x",
        os.urandom(15),
        os.urandom(16),
        os.urandom(17),
        "héllo 👋".encode(),
        os.urandom(3000),
    ]
    [made] = oracle(
        [
            {
                "op": "sender_key_encrypt",
                "distribution_id": str(did),
                "plaintexts": [p.hex() for p in plaintexts],
            }
        ]
    )
    member = SenderKeyRecord.from_distribution(bytes.fromhex(made["skdm"]))
    assert member.distribution_id == did
    messages = [bytes.fromhex(m) for m in made["messages"]]
    # out of order: the last first, then the rest; then a replay
    assert member.decrypt(messages[-1]) == plaintexts[-1]
    assert [member.decrypt(m) for m in messages[:-1]] == plaintexts[:-1]
    with pytest.raises(DuplicateMessage):
        member.decrypt(messages[2])
    tampered = bytearray(messages[0])
    tampered[-70] ^= 1  # inside the ciphertext, covered by the signature
    fresh = SenderKeyRecord.from_distribution(bytes.fromhex(made["skdm"]))
    with pytest.raises(InvalidSignature):
        fresh.decrypt(bytes(tampered))


def test_libsignal_signing_keys_of_either_edwards_sign_bit_verify_here(oracle: Oracle) -> None:
    # libsignal keeps the signing key's Edwards sign bit in the signature's top bit; about half of
    # its keys have it set. 24 chains: both kinds occur (all alike: probability 2**-23).
    made = oracle(
        [
            {"op": "sender_key_encrypt", "distribution_id": str(uuid.uuid4()), "plaintexts": ["6869"]}
            for _ in range(24)
        ]
    )
    bits = set()
    for chain in made:
        member = SenderKeyRecord.from_distribution(bytes.fromhex(chain["skdm"]))
        message = bytes.fromhex(chain["messages"][0])
        bits.add(message[-1] >> 7)
        assert member.decrypt(message) == b"hi"
    assert bits == {0, 1}


def test_roost_sender_key_messages_decrypt_under_libsignal(oracle: Oracle) -> None:
    own, skdm = SenderKeyRecord.create(uuid.uuid4())
    plaintexts = [b"", b"group hello", os.urandom(16), os.urandom(1000)]
    messages = [own.encrypt(p) for p in plaintexts]
    forged_record, _ = SenderKeyRecord.create(own.distribution_id)
    forged_record._state.chain_id = own.chain_id
    forged = forged_record.encrypt(b"forged")
    fields, results = oracle(
        [
            {"op": "skdm_fields", "skdm": skdm.hex()},
            {
                "op": "sender_key_decrypt",
                "skdm": skdm.hex(),
                "messages": [m.hex() for m in [*messages[::-1], forged]],
            },
        ]
    )
    assert fields["chain_id"] == own.chain_id and fields["iteration"] == 0
    assert fields["distribution_id"] == str(own.distribution_id)
    assert [bytes.fromhex(r["ok"]) for r in results[:-1]] == plaintexts[::-1]
    assert "ok" not in results[-1] and "ignature" in results[-1]["error"]


def test_a_late_distribution_message_from_roost_works_under_libsignal(oracle: Oracle) -> None:
    own, _ = SenderKeyRecord.create(uuid.uuid4())
    for i in range(5):
        own.encrypt(b"before %d" % i)
    later = own.distribution_message()
    message = own.encrypt(b"after")
    [results] = oracle([{"op": "sender_key_decrypt", "skdm": later.hex(), "messages": [message.hex()]}])
    assert results == [{"ok": b"after".hex()}]
