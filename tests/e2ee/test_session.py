"""PQXDH + Double Ratchet sessions (roost.e2ee.ratchet): every entry point, error paths, properties."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roost.e2ee import (
    DecryptError,
    DuplicateMessage,
    E2eeError,
    InvalidSignature,
    LocalKeys,
    Session,
    UnknownSession,
    ratchet,
)
from tests.e2ee.conftest import Bundle, damage, publish


def start(**bundle_options: bool) -> tuple[LocalKeys, LocalKeys, Session, Bundle]:
    alice, bob = LocalKeys.generate(), LocalKeys.generate()
    bundle = publish(bob, **bundle_options)
    return alice, bob, Session.initiate(alice, "bob", bob.identity_public, bundle), bundle


def talking() -> tuple[Session, Session]:
    """Alice and Bob after Alice's first message and Bob's reply."""
    _, bob_keys, alice, _ = start()
    bob, _ = Session.respond(bob_keys, "alice", alice.encrypt(b"hi"))
    alice.decrypt(bob.encrypt(b"hello"))
    return alice, bob


# -- initiate ----------------------------------------------------------------


def test_initiate_sends_prekey_messages_until_the_first_reply_decrypts() -> None:
    alice_keys, bob_keys, alice, bundle = start()
    assert alice.remote_identity == bob_keys.identity_public and alice.remote_user == "bob"
    first, second = alice.encrypt(b"one"), alice.encrypt(b"two")
    assert Session.is_prekey_message(first) and Session.is_prekey_message(second)
    bob, plaintext = Session.respond(bob_keys, "alice", first)
    assert plaintext == b"one" and bob.remote_identity == alice_keys.identity_public
    assert bob.remote_registration == alice_keys.registration and bob.remote_user == "alice"
    assert bob.decrypt(second) == b"two"
    reply = bob.encrypt(b"reply")
    assert not Session.is_prekey_message(reply)
    assert Session.is_prekey_message(alice.encrypt(b"still pending"))  # reply not decrypted yet
    assert alice.decrypt(reply) == b"reply"
    after = alice.encrypt(b"three")
    assert not Session.is_prekey_message(after)
    assert bob.decrypt(after) == b"three"
    assert alice.base_key == bob.base_key and bundle.kem_last_resort is False


@pytest.mark.parametrize("field", ["signed_sig", "kem_sig"])
def test_initiate_refuses_a_bad_prekey_signature(field: str) -> None:
    alice, bob = LocalKeys.generate(), LocalKeys.generate()
    bundle = publish(bob)
    forged = dataclasses.replace(
        bundle, **{field: LocalKeys.generate().sign(getattr(bundle, field[:-3] + "key"))}
    )
    with pytest.raises(InvalidSignature):
        Session.initiate(alice, "bob", bob.identity_public, forged)
    # The right keys under another identity do not verify either.
    with pytest.raises(InvalidSignature):
        Session.initiate(alice, "bob", LocalKeys.generate().identity_public, bundle)


@pytest.mark.parametrize(
    "change",
    [
        {"signed_key": b"\x05" + bytes(31)},
        {"kem_key": b"\x07" + bytes(1568)},
        {"kem_key": b"\x08" + bytes(1567)},
        {"prekey_key": b"\x06" + bytes(32)},
    ],
)
def test_initiate_refuses_malformed_bundle_keys(change: dict[str, bytes]) -> None:
    alice, bob = LocalKeys.generate(), LocalKeys.generate()
    bundle = dataclasses.replace(publish(bob), **change)  # type: ignore[arg-type]
    with pytest.raises(E2eeError):
        Session.initiate(alice, "bob", bob.identity_public, bundle)
    with pytest.raises(E2eeError):
        Session.initiate(alice, "bob", bob.identity_public[:32], publish(bob))


# -- respond -----------------------------------------------------------------


def test_respond_consumes_the_one_time_keys_and_only_them() -> None:
    _, bob_keys, alice, bundle = start()
    ec_before, kem_before = bob_keys.prekey_count()
    Session.respond(bob_keys, "alice", alice.encrypt(b"hi"))
    assert bob_keys.prekey_count() == (ec_before - 1, kem_before - 1)
    with pytest.raises(DecryptError):
        bob_keys.prekey_private(bundle.prekey_id or 0)
    # The same PreKey message again (a replay to a fresh responder) finds its keys gone.
    with pytest.raises(DecryptError):
        Session.respond(bob_keys, "alice", alice.encrypt(b"again"))


def test_respond_without_a_one_time_ec_key_and_with_the_last_resort_kem_key() -> None:
    _, bob_keys, alice, bundle = start(one_time_ec=False, last_resort=True)
    message = alice.encrypt(b"hi")
    bob, plaintext = Session.respond(bob_keys, "alice", message)
    assert plaintext == b"hi"
    bob_keys.kem_seed(bundle.kem_id)  # the last-resort key stays
    second, plaintext = Session.respond(bob_keys, "alice", message)  # and serves again
    assert plaintext == b"hi" and second.base_key == bob.base_key


def test_respond_works_with_the_previous_signed_prekey_after_rotation() -> None:
    _, bob_keys, alice, _ = start()
    bob_keys.new_signed_prekey(10.0)
    _, plaintext = Session.respond(bob_keys, "alice", alice.encrypt(b"late start"))
    assert plaintext == b"late start"


def test_respond_refuses_a_normal_message_and_unknown_keys_and_changes_nothing() -> None:
    alice, _ = talking()
    other = LocalKeys.generate()
    before = other.to_bytes()
    with pytest.raises(DecryptError):
        Session.respond(other, "alice", alice.encrypt(b"normal"))
    _, _, stranger, _ = start()
    with pytest.raises(DecryptError):
        Session.respond(other, "x", stranger.encrypt(b"not for you"))
    assert other.to_bytes() == before


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_a_damaged_prekey_message_is_refused_and_consumes_nothing(data: st.DataObject) -> None:
    _, bob_keys, alice, _ = start()
    message = alice.encrypt(b"first")
    before = bob_keys.to_bytes()
    with pytest.raises(DecryptError):
        Session.respond(bob_keys, "alice", damage(message, data))
    assert bob_keys.to_bytes() == before
    assert Session.respond(bob_keys, "alice", message)[1] == b"first"


# -- decrypt: errors and bounds ------------------------------------------------


def test_a_duplicate_raises_duplicate_message_also_from_an_earlier_chain() -> None:
    alice, bob = talking()
    old = alice.encrypt(b"old chain")
    assert bob.decrypt(old) == b"old chain"
    alice.decrypt(bob.encrypt(b"ratchet"))
    new = alice.encrypt(b"new chain")
    assert bob.decrypt(new) == b"new chain"
    for message in (new, old):
        before = bob.to_bytes()
        with pytest.raises(DuplicateMessage):
            bob.decrypt(message)
        assert bob.to_bytes() == before


def test_a_prekey_message_of_another_session_raises_unknown_session() -> None:
    _, bob_keys, alice, _ = start()
    bob, _ = Session.respond(bob_keys, "alice", alice.encrypt(b"hi"))
    restarted = Session.initiate(LocalKeys.generate(), "alice", bob_keys.identity_public, publish(bob_keys))
    with pytest.raises(UnknownSession):
        bob.decrypt(restarted.encrypt(b"after a reinstall"))


def test_a_message_further_ahead_than_the_bound_is_refused_unchanged() -> None:
    alice, bob = talking()
    messages = [alice.encrypt(b"%d" % i) for i in range(ratchet.MAX_SKIP + 3)]
    # A new chain (Bob has not seen Alice's current ratchet key): the DH-step path.
    before = bob.to_bytes()
    with pytest.raises(DecryptError, match="ahead"):
        bob.decrypt(messages[ratchet.MAX_SKIP + 1])  # would skip MAX_SKIP + 1 keys
    assert bob.to_bytes() == before
    assert bob.decrypt(messages[0]) == b"0"
    # The same chain, once known.
    before = bob.to_bytes()
    with pytest.raises(DecryptError, match="ahead"):
        bob.decrypt(messages[ratchet.MAX_SKIP + 2])  # would skip keys 1 .. MAX_SKIP + 1
    assert bob.to_bytes() == before
    assert bob.decrypt(messages[ratchet.MAX_SKIP + 1]) == b"%d" % (ratchet.MAX_SKIP + 1)  # exactly MAX_SKIP
    assert bob.decrypt(messages[1]) == b"1"


def test_an_out_of_order_message_decrypts_once_then_is_a_duplicate() -> None:
    alice, bob = talking()
    first, second = alice.encrypt(b"first"), alice.encrypt(b"second")
    assert bob.decrypt(second) == b"second"
    assert bob.decrypt(first) == b"first"  # from the skipped keys
    before = bob.to_bytes()
    for message in (first, second):
        with pytest.raises(DuplicateMessage):
            bob.decrypt(message)
    assert bob.to_bytes() == before


def test_skipped_keys_are_bounded_oldest_dropped() -> None:
    alice, bob = talking()
    first_chain = [alice.encrypt(b"a%d" % i) for i in range(5)]
    bob.decrypt(first_chain[-1])  # 4 skipped
    alice.decrypt(bob.encrypt(b"turn"))
    second_chain = [alice.encrypt(b"b%d" % i) for i in range(ratchet.MAX_SKIP + 1)]
    assert bob.decrypt(second_chain[-1]) == b"b%d" % ratchet.MAX_SKIP  # 2,000 more skipped
    assert len(Session.from_bytes(bob.to_bytes())._skipped) == ratchet.MAX_SKIP
    with pytest.raises(DuplicateMessage):
        bob.decrypt(first_chain[0])  # dropped: the oldest four went
    assert bob.decrypt(second_chain[0]) == b"b0"


def test_encrypt_needs_a_sending_chain() -> None:
    state = talking()[1]._state
    state.cks = None
    with pytest.raises(E2eeError):
        Session(state).encrypt(b"x")


@pytest.mark.parametrize("data", [b"", b"\x92\x01", b"garbage"])
def test_from_bytes_refuses_corrupt_state(data: bytes) -> None:
    with pytest.raises(E2eeError):
        Session.from_bytes(data)


def test_is_prekey_message() -> None:
    assert not Session.is_prekey_message(b"")
    assert Session.is_prekey_message(b"\x12")
    assert not Session.is_prekey_message(b"\x11")


# -- properties ----------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_conversation_in_any_order_with_drops_duplicates_and_crashes(data: st.DataObject) -> None:
    """Both sides send; messages are delivered in any order, some dropped, some twice; either side may
    crash (reload from bytes) between any two steps. Every delivered message decrypts exactly once."""
    alice_keys, bob_keys = LocalKeys.generate(), LocalKeys.generate()
    bob_bundle = publish(bob_keys)
    sessions: dict[str, Session | None] = {
        "alice": Session.initiate(alice_keys, "bob", bob_keys.identity_public, bob_bundle),
        "bob": None,
    }
    in_flight: list[tuple[str, bytes, bytes]] = []  # (to, message, plaintext)
    delivered: list[tuple[str, bytes]] = []
    for step in range(data.draw(st.integers(1, 30))):
        action = data.draw(
            st.sampled_from(["send_a", "send_b", "deliver", "deliver", "duplicate", "drop", "crash"])
        )
        if action in ("send_a", "send_b"):
            sender, receiver = ("alice", "bob") if action == "send_a" else ("bob", "alice")
            session = sessions[sender]
            if session is None:
                continue
            plaintext = b"%s %d" % (sender.encode(), step)
            in_flight.append((receiver, session.encrypt(plaintext), plaintext))
        elif action == "deliver" and in_flight:
            to, message, plaintext = in_flight.pop(data.draw(st.integers(0, len(in_flight) - 1)))
            receiving = sessions[to]
            if receiving is None:
                receiving, got = Session.respond(bob_keys, "alice", message)
                sessions["bob"] = receiving
            else:
                got = receiving.decrypt(message)
            assert got == plaintext
            delivered.append((to, message))
        elif action == "duplicate" and delivered:
            to, message = data.draw(st.sampled_from(delivered))
            receiving = sessions[to]
            assert receiving is not None
            before = receiving.to_bytes()
            with pytest.raises(DuplicateMessage):
                receiving.decrypt(message)
            assert receiving.to_bytes() == before
        elif action == "drop" and in_flight:
            in_flight.pop(data.draw(st.integers(0, len(in_flight) - 1)))
        elif action == "crash":
            for name, session in sessions.items():
                if session is not None:
                    sessions[name] = Session.from_bytes(session.to_bytes())
            bob_keys = LocalKeys.from_bytes(bob_keys.to_bytes())


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_any_damaged_message_is_refused_and_changes_nothing(data: st.DataObject) -> None:
    """Damage a message of the current chain, a new chain (DH step), a skipped key or a PreKey message."""
    alice, bob = talking()
    early = alice.encrypt(b"skipped")
    alice.encrypt(b"lost")
    current = alice.encrypt(b"current")
    bob.decrypt(current)  # leaves keys for `early` and `lost` skipped
    kind = data.draw(st.sampled_from(["current", "skipped", "ratchet", "prekey"]))
    expected = {"current": b"next", "skipped": b"skipped", "ratchet": b"after a DH step"}.get(kind, b"second")
    if kind == "current":
        message = alice.encrypt(expected)
    elif kind == "skipped":
        message = early
    elif kind == "ratchet":
        alice.decrypt(bob.encrypt(b"turn"))
        message = alice.encrypt(expected)
    else:  # a PreKey message to an existing session
        alice_keys, bob_keys = LocalKeys.generate(), LocalKeys.generate()
        pending = Session.initiate(alice_keys, "bob", bob_keys.identity_public, publish(bob_keys))
        bob, _ = Session.respond(bob_keys, "alice", pending.encrypt(b"first"))
        message = pending.encrypt(expected)
    bad = damage(message, data)
    before = bob.to_bytes()
    with pytest.raises(DecryptError):
        bob.decrypt(bad)
    assert bob.to_bytes() == before
    assert bob.decrypt(message) == expected  # the intact message still decrypts
