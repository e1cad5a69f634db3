"""The delivery invariants, each forced with a precise interleaving.

These run the real ChatService on a real SqliteStore; only the socket is
replaced by an in-memory sink, so the interleavings can be controlled.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from roost.core.tokens import hash_token
from roost.protocol import frames as f
from roost.protocol.codec import decode_server, encode
from roost.registry.memory import MemoryRegistry
from roost.service import session as session_module
from roost.service.chat import ChatService, ServiceConfig, now_ms
from roost.service.session import Session
from roost.store.base import StoreUnavailable
from roost.store.sqlite import SqliteStore


class MemorySink:
    def __init__(self) -> None:
        self.frames: list[f.Frame] = []
        self.closed_with: int | None = None

    def push(self, frame: bytes) -> None:
        if self.closed_with is None:
            self.frames.append(decode_server(frame))

    def close(self, code: int, reason: str) -> None:
        self.closed_with = code

    @property
    def closed(self) -> bool:
        return self.closed_with is not None

    def of(self, kind: type) -> list:
        return [fr for fr in self.frames if isinstance(fr, kind)]


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[ChatService]:
    store = SqliteStore(tmp_path / "db.sqlite")
    await store.open()
    for name in ("alice", "bob"):
        await store.add_user(name, hash_token(name), now_ms())
    svc = ChatService(store, MemoryRegistry(), ServiceConfig(rate=0))
    yield svc
    await store.close()


async def settle(predicate, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


async def inbox_delivered(svc: ChatService, user: str) -> int:
    entries = await svc.store.inbox(user)
    return entries[0].delivered if entries else -1


async def settle_async(read, expected: object, timeout: float = 5.0) -> None:
    """Like ``settle`` for a value that needs a store read to see."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (value := await read()) != expected:
        if loop.time() > deadline:
            raise AssertionError(f"{value!r}, not {expected!r}, in time")
        await asyncio.sleep(0.005)


def send(svc: ChatService, session: Session, mid: str, to: str = "bob") -> None:
    svc.handle(session, encode(f.Send(id=mid, body=mid.encode(), to=to)))


async def each_sends_bob_one(svc: ChatService, senders: list[str]) -> None:
    """Each sender connects, sends bob one message (acked: committed) and leaves."""
    for name in senders:
        sink = MemorySink()
        session = await svc.connect(name, sink)
        send(svc, session, f"from-{name}")
        await settle(lambda sink=sink: sink.of(f.SendAck))
        svc.disconnect(session)


class WriterGate:
    """Blocks the store's writer thread until released."""

    def __init__(self, store: SqliteStore) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

        def block(_conn):  # runs on the writer thread
            self.entered.set()
            self.release.wait(10)

        self.future = store._submit(block)


async def test_ack_only_after_commit(service: ChatService) -> None:
    alice_sink = MemorySink()
    alice = await service.connect("alice", alice_sink)
    gate = WriterGate(service.store)  # type: ignore[arg-type]
    await asyncio.to_thread(gate.entered.wait, 5)
    send(service, alice, "m1")
    await asyncio.sleep(0.1)
    assert alice_sink.of(f.SendAck) == [], "✓ was sent before the commit"
    gate.release.set()
    await settle(lambda: alice_sink.of(f.SendAck))
    assert alice_sink.of(f.SendAck)[0].seq == 1


async def test_persist_before_lookup(service: ChatService) -> None:
    """Bob connects while Alice's message is queued but not committed: the
    look-up after the commit must find him (a look-up before persisting would
    not, and his inbox read ran before the commit)."""
    alice = await service.connect("alice", MemorySink())
    gate = WriterGate(service.store)  # type: ignore[arg-type]
    await asyncio.to_thread(gate.entered.wait, 5)
    send(service, alice, "m1")
    bob_sink = MemorySink()
    await service.connect("bob", bob_sink)  # inbox read sees nothing yet
    gate.release.set()
    await settle(lambda: bob_sink.of(f.Deliver))
    assert [m.id for m in bob_sink.of(f.Deliver)] == ["m1"]


async def test_register_before_drain(service: ChatService, monkeypatch: pytest.MonkeyPatch) -> None:
    """A message committed while Bob's inbox is being read must reach him."""
    alice = await service.connect("alice", MemorySink())
    real_read = service.store.connect_state  # the connect-time read: inbox, receipts, key stock

    async def inbox_then_commit(user: str):
        state = await real_read(user)  # empty: nothing for bob yet
        if user == "bob":
            send(service, alice, "m-during-drain")
            await settle(lambda: service.store.committed_ops >= 1)  # type: ignore[attr-defined]
            await asyncio.sleep(0.05)
        return state

    monkeypatch.setattr(service.store, "connect_state", inbox_then_commit)
    bob_sink = MemorySink()
    await service.connect("bob", bob_sink)
    await settle(lambda: bob_sink.of(f.Deliver))
    assert [m.id for m in bob_sink.of(f.Deliver)] == ["m-during-drain"]


async def test_inbox_entry_leaves_only_on_ack(service: ChatService) -> None:
    alice = await service.connect("alice", MemorySink())
    for i in range(3):
        send(service, alice, f"m{i}")
    first = MemorySink()
    bob = await service.connect("bob", first)
    await settle(lambda: len(first.of(f.Deliver)) == 3)
    service.disconnect(bob)  # pushed, never acked
    second = MemorySink()
    bob = await service.connect("bob", second)
    await settle(lambda: len(second.of(f.Deliver)) == 3)
    service.handle(bob, encode(f.DeliveryAck(conv="d:alice:bob", seq=2)))
    # The store's cache moves when the dack's batch runs, before its COMMIT:
    # wait for what a new connection reads (the inbox), not for the cache, or
    # a loaded machine reconnects before the commit and rightly gets all three.
    await settle_async(lambda: inbox_delivered(service, "bob"), 2)
    service.disconnect(bob)
    third = MemorySink()
    await service.connect("bob", third)
    await settle(lambda: len(third.of(f.Deliver)) == 1)
    assert [m.seq for m in third.of(f.Deliver)] == [3]


async def test_push_failure_degrades_to_inbox(service: ChatService) -> None:
    """A push into a socket that is already dead (the frame goes nowhere)."""
    alice = await service.connect("alice", MemorySink())
    dead = MemorySink()
    bob = await service.connect("bob", dead)
    dead.closed_with = 1006  # the socket died; pushes vanish
    send(service, alice, "lost-on-the-wire")
    await settle(lambda: service.store.committed_ops >= 1)  # type: ignore[attr-defined]
    await asyncio.sleep(0.05)
    assert dead.of(f.Deliver) == []
    service.disconnect(bob)
    fresh = MemorySink()
    await service.connect("bob", fresh)
    await settle(lambda: fresh.of(f.Deliver))
    assert [m.id for m in fresh.of(f.Deliver)] == ["lost-on-the-wire"]


async def test_retry_is_idempotent_and_keeps_seq(service: ChatService) -> None:
    sink = MemorySink()
    alice = await service.connect("alice", sink)
    send(service, alice, "once")
    send(service, alice, "twice")
    send(service, alice, "once")
    await settle(lambda: len(sink.of(f.SendAck)) == 3)
    acks = sink.of(f.SendAck)
    assert [(a.id, a.seq, a.duplicate) for a in acks] == [
        ("once", 1, False),
        ("twice", 2, False),
        ("once", 1, True),
    ]
    messages, _, last = await service.store.history("alice", "d:alice:bob", None, None, 10)
    assert [m.client_id for m in messages] == ["once", "twice"] and last == 2


async def test_failed_commit_breaks_the_stream_in_order(service: ChatService) -> None:
    """After a storage failure no later send of the same connection may commit."""
    sink = MemorySink()
    alice = await service.connect("alice", sink)
    store = service.store
    gate = WriterGate(store)  # type: ignore[arg-type]
    await asyncio.to_thread(gate.entered.wait, 5)
    send(service, alice, "a")  # will be in the failing batch

    def explode(_conn):
        raise OSError("disk on fire")

    store._submit(explode)  # type: ignore[attr-defined]
    gate.release.set()
    await settle(lambda: sink.of(f.Error))
    assert [e.code for e in sink.of(f.Error)] == ["unavailable"]
    assert sink.closed_with == 4006
    # Storage works again, but "b" must not overtake "a", which the client resends.
    send(service, alice, "b")
    await asyncio.sleep(0.2)
    assert sink.of(f.SendAck) == []
    assert await service.store.inbox("bob") == []


async def test_an_inbox_unreadable_at_connect_is_read_once_the_store_is_back(
    service: ChatService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bob connects while the store cannot be read: what waits in his inbox
    (and the receipts waiting for him) must still reach him without a reconnect."""
    from roost.service import chat

    monkeypatch.setattr(chat, "RESYNC_RETRY_SECONDS", 0.05)
    alice_sink = MemorySink()
    alice = await service.connect("alice", alice_sink)
    send(service, alice, "waiting")
    await settle(lambda: alice_sink.of(f.SendAck))  # committed and fanned out: bob was offline
    service.disconnect(alice)
    real_inbox = service.store.inbox
    failures = 3

    async def flaky_inbox(user: str):
        nonlocal failures
        if user == "bob" and failures:
            failures -= 1
            raise StoreUnavailable("down for the test")
        return await real_inbox(user)

    async def unreadable_at_connect(user: str):
        raise StoreUnavailable("down for the test")

    monkeypatch.setattr(service.store, "connect_state", unreadable_at_connect)
    monkeypatch.setattr(service.store, "inbox", flaky_inbox)
    bob_sink = MemorySink()
    await service.connect("bob", bob_sink)
    await settle(lambda: bob_sink.of(f.Deliver))
    assert [m.id for m in bob_sink.of(f.Deliver)] == ["waiting"], bob_sink.frames
    assert failures == 0


@pytest.mark.parametrize("failure", [StoreUnavailable("down for the test"), RuntimeError("a bug")])
async def test_an_inbox_over_many_conversations_is_read_in_batches(
    service: ChatService, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    """Forty conversations owing one message each: a few store reads, not forty;
    a batch whose read fails (storage, or a bug) is read again after a pause,
    and nothing is lost or repeated."""
    monkeypatch.setattr(session_module, "DRAIN_RETRY_SECONDS", 0.05)
    senders = [f"user{i:02d}" for i in range(40)]
    for name in senders:
        await service.store.add_user(name, hash_token(name), now_ms())
    await each_sends_bob_one(service, senders)
    real_read = service.store.read_inboxes
    batches: list[int] = []

    async def counted_read(user, reads, budget):
        batches.append(len(reads))
        if len(batches) == 1:
            raise failure
        return await real_read(user, reads, budget)

    monkeypatch.setattr(service.store, "read_inboxes", counted_read)
    bob_sink = MemorySink()
    await service.connect("bob", bob_sink)
    await settle(lambda: len(bob_sink.of(f.Deliver)) >= 40)
    await asyncio.sleep(0.05)
    assert sorted(m.id for m in bob_sink.of(f.Deliver)) == sorted(f"from-{n}" for n in senders)
    assert batches[0] == session_module.DRAIN_BATCH  # the failed one
    assert sum(batches[1:]) == 40 and len(batches) == 3


async def test_a_long_backlog_does_not_hold_back_the_other_conversations(tmp_path: Path) -> None:
    """Bob owes 200 messages in one chat and one in each of ten others, with a
    window of 16: the ten come within the first windows, not after the 200
    (the conversation that took a batch's budget queues behind those it left unread)."""
    store = SqliteStore(tmp_path / "db.sqlite")
    await store.open()
    others = [f"user{i}" for i in range(10)]
    for name in ("alice", "bob", *others):
        await store.add_user(name, hash_token(name), now_ms())
    svc = ChatService(store, MemoryRegistry(), ServiceConfig(rate=0, window=16))
    try:
        alice_sink = MemorySink()
        alice = await svc.connect("alice", alice_sink)
        for i in range(200):
            send(svc, alice, f"a{i}")
        await settle(lambda: len(alice_sink.of(f.SendAck)) == 200)
        svc.disconnect(alice)
        await each_sends_bob_one(svc, others)
        bob_sink = MemorySink()
        bob = await svc.connect("bob", bob_sink)
        acked = 0
        while len(bob_sink.of(f.Deliver)) < 210:  # ack as a device does, window by window
            delivered = bob_sink.of(f.Deliver)
            for m in delivered[acked:]:
                svc.handle(bob, encode(f.DeliveryAck(conv=m.conv, seq=m.seq)))
            acked = len(delivered)
            await asyncio.sleep(0.01)
        order = [m.id for m in bob_sink.of(f.Deliver)]
        positions = sorted(order.index(f"from-{name}") for name in others)
        assert positions[-1] < 48, positions  # within the first three windows
        assert sorted(order) == sorted([f"a{i}" for i in range(200)] + [f"from-{n}" for n in others])
    finally:
        await store.close()


async def test_a_mark_whose_answer_was_lost_still_tells_the_sender(
    service: ChatService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bob's ack commits but its answer is lost (the writer fails after COMMIT):
    the service retries the mark, which now changes nothing. Alice, online the
    whole time, must still get the receipt that the lost commit made pending
    (found by the simulator's writer-crash fault, seeds 91 and 296)."""
    from roost.service import chat
    from roost.store import sqlite as sqlite_store

    monkeypatch.setattr(chat, "MARK_RETRY_SECONDS", 0.05)
    alice_sink, bob_sink = MemorySink(), MemorySink()
    alice = await service.connect("alice", alice_sink)
    bob = await service.connect("bob", bob_sink)
    send(service, alice, "hello")
    await settle(lambda: bob_sink.of(f.Deliver))
    store = service.store
    loop = store._loop  # type: ignore[attr-defined]
    real_call = loop.call_soon_threadsafe
    lost: list[bool] = []

    def lose_the_first_answer(fn, *args):  # type: ignore[no-untyped-def]
        if fn is sqlite_store._resolve and not lost:
            lost.append(True)
            raise OSError("planted: the answer is lost after COMMIT")
        return real_call(fn, *args)

    monkeypatch.setattr(loop, "call_soon_threadsafe", lose_the_first_answer)
    service.handle(bob, encode(f.DeliveryAck(conv="d:alice:bob", seq=1)))
    await settle(lambda: alice_sink.of(f.Receipt))
    assert lost and alice_sink.of(f.Receipt)[-1].marks["bob"].delivered == 1


async def test_a_connection_whose_token_was_revoked_while_it_was_checked_is_closed(
    service: ChatService,
) -> None:
    """Token reset / disable / remove commit, then close the open connection.
    A connection whose token check began before that (and so succeeded)
    registers after the close went out: it is closed when it registers, and
    one checked after the revocation is not affected."""
    import time

    from roost.protocol.errors import CloseCode

    began = time.monotonic()
    assert await service.authenticate("alice") == "alice"  # checked before the revocation
    service.revoke_local("alice", "token reset")  # nothing registered yet: nothing closed
    late = MemorySink()
    await service.connect("alice", late, authenticated_at=began)
    assert late.closed_with == CloseCode.REVOKED

    checked_after = time.monotonic()
    fresh = MemorySink()
    session = await service.connect("alice", fresh, authenticated_at=checked_after)
    assert fresh.closed_with is None
    service.revoke_local("alice", "account disabled")
    assert fresh.closed_with == CloseCode.REVOKED and not session.active
