"""Sender Keys (roost.e2ee.sender_keys): ordering, duplicates, tampering, bounds, persistence."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roost.e2ee import DecryptError, DuplicateMessage, E2eeError, InvalidSignature, SenderKeyRecord, protobuf
from roost.e2ee import sender_keys as sk
from tests.e2ee.conftest import damage


def group(n: int) -> tuple[SenderKeyRecord, SenderKeyRecord, list[bytes]]:
    own, skdm = SenderKeyRecord.create(uuid.uuid4())
    member = SenderKeyRecord.from_distribution(skdm)
    return own, member, [own.encrypt(b"msg %d" % i) for i in range(n)]


def test_create_gives_a_libsignal_version_3_distribution_message() -> None:
    did = uuid.uuid4()
    own, skdm = SenderKeyRecord.create(did)
    assert own.distribution_id == did and skdm[0] == 0x33
    fields = protobuf.decode(skdm[1:], {1: 2, 2: 0, 3: 0, 4: 2, 5: 2})
    assert fields[1] == did.bytes and fields[2] == own.chain_id < 2**31 and fields[3] == 0
    assert len(fields[4]) == 32 and len(fields[5]) == 33  # type: ignore[arg-type]
    member = SenderKeyRecord.from_distribution(skdm)
    assert member.distribution_id == did and member.chain_id == own.chain_id


def test_a_member_decrypts_in_order_and_the_message_carries_the_iteration() -> None:
    own, member, messages = group(3)
    assert [member.decrypt(m) for m in messages] == [b"msg 0", b"msg 1", b"msg 2"]
    assert sk.parse_message(messages[2]).iteration == 2
    assert own.iteration == member.iteration == 3


def test_a_late_joiner_gets_the_current_iteration_and_cannot_read_earlier_messages() -> None:
    own, _, early = group(2)
    late = SenderKeyRecord.from_distribution(own.distribution_message())
    with pytest.raises(DuplicateMessage):
        late.decrypt(early[0])
    assert late.decrypt(own.encrypt(b"now")) == b"now"


def test_same_chain_tells_a_resent_distribution_message_from_a_new_chain() -> None:
    own, member, _ = group(0)
    own.encrypt(b"x")
    assert member.same_chain(own.distribution_message())  # re-sent later: same chain
    assert own.same_chain(own.distribution_message())
    _, renewed_skdm = SenderKeyRecord.create(own.distribution_id)
    assert not member.same_chain(renewed_skdm)
    with pytest.raises(DecryptError):
        member.same_chain(b"\x33")


def test_a_member_record_cannot_encrypt_or_redistribute() -> None:
    _, member, _ = group(0)
    with pytest.raises(E2eeError):
        member.encrypt(b"x")
    with pytest.raises(E2eeError):
        member.distribution_message()


def test_wrong_distribution_id_chain_or_signing_key_is_refused_without_change() -> None:
    own, member, [message] = group(1)
    other, _, [foreign] = group(1)
    before = member.to_bytes()
    with pytest.raises(DecryptError):
        member.decrypt(foreign)
    # Same distribution id and chain id, but signed by another key: InvalidSignature.
    impostor, _ = SenderKeyRecord.create(own.distribution_id)
    impostor._state.chain_id = own.chain_id
    with pytest.raises(InvalidSignature):
        member.decrypt(impostor.encrypt(b"forged"))
    assert member.to_bytes() == before
    assert member.decrypt(message) == b"msg 0"
    assert other.iteration == 1


def test_a_message_too_far_ahead_is_refused_and_changes_nothing() -> None:
    own, member, _ = group(0)
    own._state.iteration = sk.MAX_FORWARD_JUMPS + 1  # pretend that many messages were sent
    before = member.to_bytes()
    with pytest.raises(DecryptError, match="future"):
        member.decrypt(own.encrypt(b"far"))
    assert member.to_bytes() == before


def test_skipped_keys_are_bounded_oldest_dropped() -> None:
    _, member, messages = group(sk.MAX_MESSAGE_KEYS + 5)
    assert member.decrypt(messages[-1]) == b"msg %d" % (sk.MAX_MESSAGE_KEYS + 4)
    assert len(member._state.skipped) == sk.MAX_MESSAGE_KEYS
    with pytest.raises(DuplicateMessage):
        member.decrypt(messages[3])  # 2,004 keys skipped: the oldest 4 were dropped
    assert member.decrypt(messages[4]) == b"msg 4"


def test_round_trip_and_corrupt_state() -> None:
    own, member, messages = group(3)
    member.decrypt(messages[2])
    for record in (own, member):
        again = SenderKeyRecord.from_bytes(record.to_bytes())
        assert again.to_bytes() == record.to_bytes()
    member = SenderKeyRecord.from_bytes(member.to_bytes())
    assert member.decrypt(messages[0]) == b"msg 0"
    for bad in (b"", b"\x93\x01", own.to_bytes()[:-3]):
        with pytest.raises(E2eeError):
            SenderKeyRecord.from_bytes(bad)


@pytest.mark.parametrize(
    "skdm",
    [
        b"",
        b"\x23" + b"\x00" * 80,  # version 2
        b"\x43" + b"\x00" * 80,  # version 4
        b"\x33"
        + protobuf.encode([(1, b"\x00" * 16), (2, 1), (3, 0), (4, b"k" * 31), (5, b"\x05" + b"s" * 32)])
        + b"",
        b"\x33"
        + protobuf.encode([(1, b"\x00" * 16), (2, 1), (3, 0), (4, b"k" * 32), (5, b"\x06" + b"s" * 32)]),
        b"\x33"
        + protobuf.encode([(1, b"\x00" * 15), (2, 1), (3, 0), (4, b"k" * 32), (5, b"\x05" + b"s" * 32)]),
        b"\x33" + protobuf.encode([(1, b"\x00" * 16), (3, 0), (4, b"k" * 32), (5, b"\x05" + b"s" * 32)]),
        b"\x33"
        + protobuf.encode([(1, b"\x00" * 16), (2, 1), (3, 0), (4, b"k" * 32)])
        + b"\x2a\x7f",  # runs past end
    ],
)
def test_malformed_distribution_messages_are_refused(skdm: bytes) -> None:
    with pytest.raises(DecryptError):
        SenderKeyRecord.from_distribution(skdm)


def test_protobuf_decoder_bounds() -> None:
    schema = {1: protobuf.VARINT, 2: protobuf.LENGTH}
    assert protobuf.decode(b"\x08\x96\x01\x12\x02hi", schema) == {1: 150, 2: b"hi"}
    assert protobuf.decode(b"\x18\x05\x08\x01", schema) == {1: 1}  # unknown field 3 skipped
    for bad in (
        b"\x08",  # truncated varint
        b"\x08" + b"\xff" * 10 + b"\x01",  # varint longer than 10 bytes
        b"\x08\x80\x80\x80\x80\x10",  # 2**32: not a uint32
        b"\x0a\x00",  # field 1 with the wrong wire type
        b"\x12\x05hi",  # length past the end
        b"\x00\x01",  # field number 0
        b"\x1d\x00\x00",  # truncated fixed32
        b"\x1b",  # wire type 3 (groups) refused
    ):
        with pytest.raises(DecryptError):
            protobuf.decode(bad, schema)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_delivery_order_with_duplicates_decrypts_each_message_exactly_once(data: st.DataObject) -> None:
    count = data.draw(st.integers(1, 25))
    _, member, messages = group(count)
    order = data.draw(st.permutations(range(count)))
    duplicates = data.draw(st.lists(st.integers(0, count - 1), max_size=10))
    deliveries = list(order)
    for d in duplicates:  # a duplicate arrives somewhere after its original
        deliveries.insert(data.draw(st.integers(deliveries.index(d) + 1, len(deliveries))), d)
    seen: set[int] = set()
    for i in deliveries:
        if i in seen:
            before = member.to_bytes()
            with pytest.raises(DuplicateMessage):
                member.decrypt(messages[i])
            assert member.to_bytes() == before
        else:
            assert member.decrypt(messages[i]) == b"msg %d" % i
            seen.add(i)
        member = SenderKeyRecord.from_bytes(member.to_bytes())  # a crash between any two deliveries
    assert seen == set(range(count))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_a_flipped_bit_or_truncation_is_refused_and_changes_nothing(data: st.DataObject) -> None:
    _, member, messages = group(3)
    member.decrypt(messages[1])  # leaves a skipped key for 0 and a current chain at 2
    message = messages[data.draw(st.sampled_from([0, 2]))]
    bad = damage(message, data)
    before = member.to_bytes()
    with pytest.raises(DecryptError):
        member.decrypt(bad)
    assert member.to_bytes() == before
