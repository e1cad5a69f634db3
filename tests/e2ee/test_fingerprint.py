"""Safety numbers (roost.e2ee.fingerprint)."""

from __future__ import annotations

import pytest

from roost.e2ee import E2eeError, LocalKeys, fingerprint_digits, safety_number

# libsignal rust/protocol/src/fingerprint.rs, fingerprint_test_v1 / _v2 (same digits in both).
ALICE_IDENTITY = bytes.fromhex("0506863bc66d02b40d27b8d49ca7c09e9239236f9d7d25d6fcca5ce13c7064d868")
BOB_IDENTITY = bytes.fromhex("05f781b6fb32fed9ba1cf2de978d4d5da28dc34046ae814402b5c0dbd96fda907b")
DISPLAYABLE = "300354477692869396892869876765458257569162576843440918079131"


def test_libsignal_test_vector() -> None:
    assert safety_number("+14152222222", ALICE_IDENTITY, "+14153333333", BOB_IDENTITY) == DISPLAYABLE
    assert safety_number("+14153333333", BOB_IDENTITY, "+14152222222", ALICE_IDENTITY) == DISPLAYABLE


def test_both_sides_agree_and_any_change_of_key_or_name_changes_it() -> None:
    a, b = LocalKeys.generate().identity_public, LocalKeys.generate().identity_public
    number = safety_number("alice", a, "bob", b)
    assert len(number) == 60 and number.isdigit()
    assert safety_number("bob", b, "alice", a) == number
    assert safety_number("alice", a, "bob", LocalKeys.generate().identity_public) != number
    assert safety_number("alice", a, "bobby", b) != number


def test_a_malformed_identity_key_is_refused() -> None:
    with pytest.raises(E2eeError):
        safety_number("alice", ALICE_IDENTITY[1:], "bob", BOB_IDENTITY)


def test_fingerprint_digits_groups_by_five() -> None:
    assert fingerprint_digits(DISPLAYABLE) == (
        "30035 44776 92869 39689 28698 76765 45825 75691 62576 84344 09180 79131"
    )
    with pytest.raises(E2eeError):
        fingerprint_digits("123")
