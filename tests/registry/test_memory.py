"""MemoryRegistry: the embedded registry's bookkeeping and pushes."""

from __future__ import annotations

from unittest.mock import patch

import msgspec

from roost.registry import memory
from roost.registry.memory import MemoryRegistry, deliver_frame
from roost.store.base import ReceiptState
from tests.registry.conftest import FakeSession, message


def test_attach_returns_the_replaced_session_and_detach_only_forgets_the_current_one() -> None:
    reg = MemoryRegistry()
    first, second = FakeSession("ann"), FakeSession("ann")
    assert reg.attach(first) is None
    assert reg.attach(second) is first
    assert reg.session("ann") is second
    assert reg.detach(first) is False  # already replaced: the user is still online
    assert reg.is_online("ann")
    assert reg.detach(second) is True
    assert not reg.is_online("ann")
    assert reg.session("ann") is None
    assert reg.detach(second) is False


def test_sessions_lists_current_sessions() -> None:
    reg = MemoryRegistry()
    ann, bob = FakeSession("ann"), FakeSession("bob")
    reg.attach(ann)
    reg.attach(bob)
    assert sorted(s.user for s in reg.sessions()) == ["ann", "bob"]


def test_push_message_offers_to_connected_users_only_with_one_shared_frame() -> None:
    reg = MemoryRegistry()
    ann, bob, cy = FakeSession("ann"), FakeSession("bob"), FakeSession("cy")
    for s in (ann, bob, cy):
        reg.attach(s)
    msg = message(conv="g:1", seq=7)
    with patch.object(memory, "deliver_frame", wraps=deliver_frame) as encoder:
        reg.push_message(msg, ["ann", "bob", "cy", "offline"])
    assert encoder.call_count == 1
    assert ann.offered == bob.offered == cy.offered == [(msg, deliver_frame(msg))]
    assert ann.offered[0][1] is bob.offered[0][1]


def test_push_message_to_nobody_online_encodes_nothing() -> None:
    reg = MemoryRegistry()
    with patch.object(memory, "deliver_frame", wraps=deliver_frame) as encoder:
        reg.push_message(message(), ["bob"])
    assert encoder.call_count == 0


def test_deliver_frame_is_the_protocol_msg_frame() -> None:
    msg = message(body=b"\x00\xffbytes")
    decoded = msgspec.json.decode(deliver_frame(msg))
    assert decoded["type"] == "msg"
    assert decoded["conv"] == msg.conv and decoded["seq"] == msg.seq and decoded["id"] == msg.client_id
    assert decoded["sender"] == "ann" and decoded["ts"] == msg.ts


def test_push_receipt_and_frames_reach_connected_users_only() -> None:
    reg = MemoryRegistry()
    ann = FakeSession("ann")
    reg.attach(ann)
    receipt = ReceiptState("ann", "d:ann:bob", 3, {"bob": (2, 1)}, 2, 1)
    reg.push_receipt(receipt)
    reg.push_receipt(ReceiptState("bob", "d:ann:bob", 1, {}, 0, 0))
    reg.push_frame(iter(["ann", "bob"]), b'{"type":"typing"}')
    assert ann.receipts == [receipt]
    assert ann.frames == [b'{"type":"typing"}']


def test_presence_subscriptions() -> None:
    reg = MemoryRegistry()
    ann, bob, cy = FakeSession("ann"), FakeSession("bob"), FakeSession("cy")
    reg.subscribe(ann, ["dan", "eve"])
    reg.subscribe(bob, ["dan"])
    assert set(reg.subscribers("dan")) == {ann, bob}
    assert reg.subscribers("eve") == [ann]
    assert reg.subscribers("nobody") == []
    reg.unsubscribe(ann, ["dan", "never-subscribed"])
    assert reg.subscribers("dan") == [bob]
    reg.unsubscribe(cy, ["dan"])  # not subscribed at all: no effect
    assert reg.subscribers("dan") == [bob]


def test_detach_drops_the_sessions_subscriptions_even_when_replaced() -> None:
    reg = MemoryRegistry()
    old, new = FakeSession("ann"), FakeSession("ann")
    reg.attach(old)
    reg.subscribe(old, ["dan", "eve"])
    reg.attach(new)
    reg.subscribe(new, ["dan"])
    assert reg.detach(old) is False
    assert reg.subscribers("dan") == [new]
    assert reg.subscribers("eve") == []
    reg.detach(new)
    assert reg.subscribers("dan") == []
    assert reg._watchers == {} and reg._watching == {}
