"""LocalKeys, key formats and XEdDSA signatures (roost.e2ee.keys)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roost.e2ee import DecryptError, E2eeError, LocalKeys
from roost.e2ee import keys as k


def test_generate_gives_a_33_byte_identity_a_registration_and_the_device() -> None:
    local = LocalKeys.generate(device=3)
    assert len(local.identity_public) == 33 and local.identity_public[0] == 0x05
    assert 1 <= local.registration <= 16380
    assert local.device == 3
    assert LocalKeys.generate().identity_public != local.identity_public


def test_sign_makes_xeddsa_signatures_that_verify_only_for_that_message_and_key() -> None:
    local = LocalKeys.generate()
    sig = local.sign(b"hello")
    assert len(sig) == 64
    assert k.verify(local.identity_public, b"hello", sig)
    assert not k.verify(local.identity_public, b"hellO", sig)
    assert not k.verify(LocalKeys.generate().identity_public, b"hello", sig)
    assert not k.verify(local.identity_public, b"hello", sig[:63])
    assert not k.verify(local.identity_public[1:], b"hello", sig)
    assert not k.verify(b"\x06" + local.identity_public[1:], b"hello", sig)


@settings(max_examples=30, deadline=None)
@given(message=st.binary(max_size=200), byte=st.integers(0, 63), bit=st.integers(0, 7))
def test_any_flipped_signature_bit_fails_verification(message: bytes, byte: int, bit: int) -> None:
    local = LocalKeys.generate()
    sig = bytearray(local.sign(message))
    sig[byte] ^= 1 << bit
    assert not k.verify(local.identity_public, message, bytes(sig))


def test_signed_prekey_is_signed_by_the_identity_and_the_previous_one_is_kept_for_a_while() -> None:
    local = LocalKeys.generate()
    assert local.signed_prekey_age(100.0) == float("inf")
    first_id, first_key, first_sig = local.new_signed_prekey(100.0)
    assert 0 < first_id < 2**24 and len(first_key) == 33
    assert k.verify(local.identity_public, first_key, first_sig)
    assert local.signed_prekey_age(160.0) == 60.0
    second_id, _, _ = local.new_signed_prekey(200.0)
    assert second_id != first_id
    assert local.signed_prekey_age(200.0) == 0.0
    local.signed_prekey_private(first_id)  # still there for late PQXDH starts
    local.new_signed_prekey(200.0 + k.SIGNED_PREKEY_GRACE + 1)
    with pytest.raises(DecryptError):
        local.signed_prekey_private(first_id)  # replaced more than the grace period ago
    local.signed_prekey_private(second_id)


def test_one_time_prekeys_have_distinct_ids_and_valid_keys() -> None:
    local = LocalKeys.generate()
    prekeys = local.new_prekeys(5) + local.new_prekeys(5)
    assert len({i for i, _ in prekeys}) == 10
    assert all(0 < i < 2**24 and len(key) == 33 and key[0] == 5 for i, key in prekeys)
    assert local.prekey_count() == (10, 0)


def test_kem_prekeys_are_signed_ml_kem_1024_keys() -> None:
    local = LocalKeys.generate()
    kem = local.new_kem_prekeys(3)
    assert len({i for i, _, _ in kem}) == 3
    for _, key, sig in kem:
        assert len(key) == 1569 and key[0] == 0x08
        assert k.verify(local.identity_public, key, sig)
    secret, ciphertext = k.kem_encapsulate(kem[0][1])
    assert k.kem_decapsulate(local.kem_seed(kem[0][0]), ciphertext) == secret


def test_last_resort_kem_is_created_once_and_kept() -> None:
    local = LocalKeys.generate()
    first = local.last_resort_kem()
    assert local.last_resort_kem() == first
    assert k.verify(local.identity_public, first[1], first[2])
    local.consume(None, first[0])  # a last-resort key is never consumed
    local.kem_seed(first[0])


def test_consume_deletes_the_one_time_keys_only() -> None:
    local = LocalKeys.generate()
    (pid, _), (other, _) = local.new_prekeys(2)
    (kid, _, _), (kother, _, _) = local.new_kem_prekeys(2)
    local.consume(pid, kid)
    for lookup in (lambda: local.prekey_private(pid), lambda: local.kem_seed(kid)):
        with pytest.raises(DecryptError):
            lookup()
    local.prekey_private(other)
    local.kem_seed(kother)


def test_round_trip_keeps_everything() -> None:
    local = LocalKeys.generate()
    local.new_signed_prekey(1.0)
    local.new_prekeys(3)
    local.new_kem_prekeys(2)
    local.last_resort_kem()
    again = LocalKeys.from_bytes(local.to_bytes())
    assert again.to_bytes() == local.to_bytes()
    assert again.identity_public == local.identity_public
    assert again.registration == local.registration
    assert again.last_resort_kem() == local.last_resort_kem()
    assert k.verify(local.identity_public, b"m", again.sign(b"m"))


@pytest.mark.parametrize("data", [b"", b"\x00", b"garbage", LocalKeys.generate().to_bytes()[:-5]])
def test_from_bytes_refuses_corrupt_state(data: bytes) -> None:
    with pytest.raises(E2eeError):
        LocalKeys.from_bytes(data)


def test_dh_refuses_a_small_order_public_key() -> None:
    with pytest.raises(DecryptError):
        k.dh(k.generate_private(), bytes(32))


def test_kem_encapsulate_refuses_a_wrong_type_byte_or_length() -> None:
    key = LocalKeys.generate().last_resort_kem()[1]
    for bad in (b"\x07" + key[1:], key[:-1]):
        with pytest.raises(E2eeError):
            k.kem_encapsulate(bad)
