"""roost.core.prekeys: type bytes, ids and XEdDSA signatures of a keys_put."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roost.core.prekeys import check_upload, is_low, verify_signature
from roost.protocol import frames as f
from roost.protocol.errors import ErrorCode, ProtocolError
from tests.keys_material import Identity, ec_public, kem_public


@functools.cache
def identity() -> Identity:
    return Identity.generate()


def frame(ident: Identity, signer: Identity | None = None) -> f.KeysPut:
    signer = signer or ident
    signed, kem, last = ec_public(), kem_public(1), kem_public(2)
    return f.KeysPut(
        registration=1,
        identity=ident.public,
        signed=f.SignedPreKey(id=1, key=signed, sig=signer.sign(signed)),
        prekeys=[f.PreKey(id=i, key=ec_public()) for i in (1, 2)],
        kem_prekeys=[f.KemPreKey(id=1, key=kem, sig=signer.sign(kem))],
        last_resort=f.KemPreKey(id=2, key=last, sig=signer.sign(last)),
        ref="r",
    )


def refusal(fr: f.KeysPut) -> ErrorCode:
    with pytest.raises(ProtocolError) as err:
        check_upload(fr)
    assert err.value.ref == "r"
    return err.value.code


def test_a_valid_upload_passes_and_a_forged_one_does_not() -> None:
    check_upload(frame(identity()))
    assert refusal(frame(identity(), signer=Identity.generate())) is ErrorCode.BAD_SIGNATURE


def test_type_bytes_and_duplicate_ids_are_refused() -> None:
    good = frame(identity())
    bad_identity = f.KeysPut(**{**_fields(good), "identity": b"\x06" + good.identity[1:]})
    assert refusal(bad_identity) is ErrorCode.BAD_KEY
    ec_as_kem = f.KemPreKey(id=9, key=b"\x05" + kem_public()[1:], sig=b"\x00" * 64)
    assert refusal(f.KeysPut(**{**_fields(good), "kem_prekeys": [ec_as_kem]})) is ErrorCode.BAD_KEY
    twice = [f.PreKey(id=1, key=ec_public()), f.PreKey(id=1, key=ec_public())]
    assert refusal(f.KeysPut(**{**_fields(good), "prekeys": twice})) is ErrorCode.DUPLICATE_KEY_ID
    assert good.last_resort is not None
    clash = f.KemPreKey(id=2, key=good.last_resort.key, sig=good.last_resort.sig)
    assert refusal(f.KeysPut(**{**_fields(good), "kem_prekeys": [clash]})) is ErrorCode.DUPLICATE_KEY_ID


def _fields(fr: f.KeysPut) -> dict[str, object]:
    return {name: getattr(fr, name) for name in fr.__struct_fields__}


@settings(max_examples=200, deadline=None)
@given(kem=st.booleans(), where=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_any_flipped_bit_of_a_signed_key_or_its_signature_fails_verification(
    kem: bool, where: int, bit: int
) -> None:
    ident = identity()
    message = kem_public(3) if kem else ec_public()
    sig = ident.sign(message)
    assert verify_signature(ident.public, message, sig)
    blob = bytearray(message + sig)
    blob[where % len(blob)] ^= 1 << bit
    assert not verify_signature(ident.public, bytes(blob[: len(message)]), bytes(blob[len(message) :]))


def test_the_low_water_mark() -> None:
    assert is_low(9, 100) and is_low(100, 0) and not is_low(10, 10)
