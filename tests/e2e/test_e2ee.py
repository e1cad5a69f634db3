"""End-to-end encryption through a real server (issue #12): the store holds no
plaintext, a removed member cannot read what follows, a reinstalled peer is a
visible key change, an undecryptable message comes again, a message to a user
without keys waits and goes out once they start a client."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from roost.client import (
    Client,
    DecryptionFailed,
    IdentityChanged,
    Message,
    Pending,
    Sent,
)
from roost.client.crypto import Envelope
from roost.client.state import ClientState
from roost.e2ee import E2eeError, SenderKeyRecord
from tests.e2e.cluster import ClusterServer, run_sync
from tests.e2e.helpers import AnyServer, RawWS, add_users, b64, close_all, connect, wait_for_event


def marker(tag: str) -> str:
    return f"MARK-{tag}-{uuid.uuid4().hex}"


async def published(client: Client, timeout: float = 15.0) -> Client:
    """``client`` once its keys are on the server (others can start sessions)."""
    await asyncio.wait_for(client.crypto.published.wait(), timeout)
    return client


async def texts(client: Client, n: int, timeout: float = 20.0, conv: str | None = None) -> list[str]:
    """The next ``n`` messages' texts (of ``conv`` if given), in the order shown."""
    got: list[str] = []

    async def gather() -> None:
        while len(got) < n:
            event = await client.next_event()
            if isinstance(event, Message) and (conv is None or event.conv == conv):
                got.append(event.text)

    try:
        await asyncio.wait_for(gather(), timeout)
    except TimeoutError:
        raise AssertionError(f"got {len(got)} of {n} messages: {got}") from None
    return got


async def _pg_dump(dsn: str) -> bytes:
    """Every row of every table of the PostgreSQL store, as bytes."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
        out = bytearray()
        for t in tables:
            for row in await conn.fetch(f'SELECT * FROM "{t["table_name"]}"'):
                for value in row.values():
                    out += value if isinstance(value, bytes) else str(value).encode()
                    out += b"\0"
        return bytes(out)
    finally:
        await conn.close()


def store_bytes(srv: AnyServer) -> bytes:
    """All the server keeps: every file of its data directory (the SQLite
    database, its WAL and shared memory), or every PostgreSQL row."""
    if isinstance(srv, ClusterServer):
        return run_sync(lambda: _pg_dump(srv.dsn))
    files = [p for p in srv.data_dir.rglob("*") if p.is_file()]
    assert any(p.name.endswith("-wal") and p.stat().st_size > 0 for p in files), files
    return b"".join(p.read_bytes() for p in files)


async def test_the_store_holds_no_plaintext_of_1to1_or_group_messages(make_server, tmp_path: Path) -> None:
    srv = make_server(start=False)
    tokens = add_users(srv, ["alice", "bob", "carol", "mallory"])
    srv.start()
    alice = await published(await connect(srv, tokens["alice"], tmp_path / "alice.state"))
    bob = await published(await connect(srv, tokens["bob"], tmp_path / "bob.state"))
    carol = await published(await connect(srv, tokens["carol"], tmp_path / "carol.state"))
    try:
        direct = [marker("a2b-1"), marker("a2b-2"), marker("b2a")]
        await alice.send(direct[0], to="bob")
        await alice.send(direct[1], to="bob")
        assert await texts(bob, 2) == direct[:2]
        await bob.send(direct[2], to="alice")
        assert await texts(alice, 1) == direct[2:]

        group = (await alice.create_group("secret", ["bob", "carol"])).group
        said = {name: marker(f"group-{name}") for name in ("alice", "bob", "carol")}
        for name, client in (("alice", alice), ("bob", bob), ("carol", carol)):
            await client.send(said[name], group=group)
            for other_name, other in (("alice", alice), ("bob", bob), ("carol", carol)):
                if other is not client:
                    assert await texts(other, 1, conv=group) == [said[name]], other_name

        # A plaintext body (a raw client, not the SDK) is what the scan would
        # find: the check below can fail.
        control = marker("plaintext-control")
        raw = await RawWS.open(srv, tokens["mallory"])
        try:
            await raw.send({"type": "send", "id": "p1", "to": "bob", "body": b64(control)})
            assert (await raw.recv())["type"] == "ack"
        finally:
            await raw.close()

        stored = store_bytes(srv)
        assert control.encode() in stored
        for m in [*direct, *said.values()]:
            assert m.encode() not in stored, f"{m} is in the server's store"
        # The clients keep their own plaintext copies (the scan can see them).
        bob_state = b"".join(
            p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("bob.state") and p.is_file()
        )
        assert direct[0].encode() in bob_state
    finally:
        await close_all(alice, bob, carol)


class Capturing(Client):
    """A client that also keeps each delivered body as it came off the wire."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wire: dict[tuple[str, int], bytes] = {}

    def _on_deliver(
        self, conv: str, seq: int, message_id: str, sender: str, ct: str, body: bytes, ts: int
    ) -> None:
        self.wire[(conv, seq)] = body
        super()._on_deliver(conv, seq, message_id, sender, ct, body, ts)


async def test_a_removed_member_cannot_decrypt_what_is_sent_after(make_server, tmp_path: Path) -> None:
    srv = make_server(start=False)
    tokens = add_users(srv, ["alice", "bob", "carol"])
    srv.start()
    alice = await published(await connect(srv, tokens["alice"], tmp_path / "alice.state"))
    bob = Capturing(srv.url, tokens["bob"], state_path=tmp_path / "bob.state")
    await bob.connect(10)
    await published(bob)
    carol = await published(await connect(srv, tokens["carol"], tmp_path / "carol.state"))
    try:
        group = (await alice.create_group("team", ["bob", "carol"])).group
        before = await alice.send("before the removal", group=group)
        assert await texts(carol, 1, conv=group) == ["before the removal"]
        assert await texts(bob, 1, conv=group) == ["before the removal"]

        await alice.remove_members(group, ["carol"])
        await asyncio.sleep(0.3)  # alice's client sees the membership event
        after = await alice.send("after the removal", group=group)
        assert await texts(bob, 1, conv=group) == ["after the removal"]
    finally:
        await close_all(alice, bob, carol)

    old = Envelope(**_fields(bob.wire[(group, before.seq)]))
    new = Envelope(**_fields(bob.wire[(group, after.seq)]))
    assert old.dist != new.dist, "no new sender key after the removal"
    state = ClientState(tmp_path / "carol.state")
    try:
        records = state.db.execute(
            "SELECT dist, record FROM e2ee_sender_keys WHERE conv=? AND sender='alice'", (group,)
        ).fetchall()
    finally:
        state.close()
    assert [d for d, _ in records] == [old.dist]  # carol had alice's key from before
    for _dist, raw in records:
        with pytest.raises(E2eeError):
            SenderKeyRecord.from_bytes(bytes(raw)).decrypt(new.data)


def _fields(body: bytes) -> dict[str, Any]:
    import msgspec

    envelope = msgspec.msgpack.decode(body, type=Envelope)
    return {f: getattr(envelope, f) for f in Envelope.__struct_fields__}


@pytest.mark.embedded_only
async def test_a_reinstalled_peer_is_a_visible_key_change_and_nothing_is_lost(
    make_server, tmp_path: Path
) -> None:
    srv = make_server(start=False)
    tokens = add_users(srv, ["alice", "bob"])
    srv.start()
    alice = await published(await connect(srv, tokens["alice"], tmp_path / "alice.state"))
    bob = await published(await connect(srv, tokens["bob"], tmp_path / "bob.state"))
    try:
        await alice.send("hello", to="bob")
        assert await texts(bob, 1) == ["hello"]
        first = await alice.safety_number("bob")
        alice.mark_verified("bob")
        await close_all(bob)
        # bob reinstalls: a new state, a new identity key.
        bob = await published(await connect(srv, tokens["bob"], tmp_path / "bob-reinstalled.state"))
        await bob.send("it's me, reinstalled", to="alice")
        event, _ = await wait_for_event(alice, lambda e: isinstance(e, IdentityChanged), 15)
        assert isinstance(event, IdentityChanged)
        assert event.user == "bob" and event.was_verified
        assert await texts(alice, 1) == ["it's me, reinstalled"]
        now = await alice.safety_number("bob")
        assert now.digits != first.digits and now.changed and not now.verified
        # alice's old session is gone for good: her next message reaches the new bob.
        await alice.send("welcome back", to="bob")
        got = await texts(bob, 2)
        assert "welcome back" in got and "hello" in got  # the old one came again too (retry)
    finally:
        await close_all(alice, bob)


@pytest.mark.embedded_only
async def test_an_undecryptable_message_is_asked_for_again_and_arrives(make_server, tmp_path: Path) -> None:
    srv = make_server(start=False)
    tokens = add_users(srv, ["alice", "bob"])
    srv.start()
    alice = await published(await connect(srv, tokens["alice"], tmp_path / "alice.state"))
    bob = await published(await connect(srv, tokens["bob"], tmp_path / "bob.state"))
    try:
        await alice.send("one", to="bob")
        await bob.send("two", to="alice")
        assert await texts(bob, 1) == ["one"]
        assert await texts(alice, 1) == ["two"]
        await close_all(bob)
        # bob's session with alice is lost (say, a restore from an old backup).
        state = ClientState(tmp_path / "bob.state")
        state.drop_sessions("alice")
        state.close()
        await alice.send("three", to="bob")
        await alice.send("four", to="bob")
        bob = await connect(srv, tokens["bob"], tmp_path / "bob.state")
        failed, _ = await wait_for_event(bob, lambda e: isinstance(e, DecryptionFailed), 10)
        assert isinstance(failed, DecryptionFailed) and failed.sender == "alice"
        # The retry request made alice send them again, in a fresh session, in order.
        assert await texts(bob, 2, timeout=30) == ["three", "four"]
        await alice.send("five", to="bob")
        assert await texts(bob, 1) == ["five"]
    finally:
        await close_all(alice, bob)


async def test_a_message_to_a_user_without_keys_waits_then_goes(make_server, tmp_path: Path) -> None:
    srv = make_server(start=False)
    tokens = add_users(srv, ["alice", "bob"])
    srv.start()
    alice = await published(await connect(srv, tokens["alice"], tmp_path / "alice.state"))
    bob: Client | None = None
    try:
        mid = await alice.send("before bob ever ran a client", to="bob", wait=False)
        event, _ = await wait_for_event(alice, lambda e: isinstance(e, Pending), 10)
        assert isinstance(event, Pending) and event.message_id == mid and "bob" in event.reason
        assert [i.pending for i in alice.pending_outbox()] == [event.reason]
        bob = await connect(srv, tokens["bob"], tmp_path / "bob.state")
        assert await texts(bob, 1, timeout=40) == ["before bob ever ran a client"]
        await wait_for_event(alice, lambda e: isinstance(e, Sent) and e.message_id == mid, 10)
        assert alice.pending_outbox() == []
    finally:
        await close_all(alice, bob)


async def test_a_group_message_before_its_sender_key_is_held_then_shown_in_order(
    make_server, tmp_path: Path
) -> None:
    srv = make_server(start=False)
    tokens = add_users(srv, ["alice", "bob", "carol"])
    srv.start()
    alice = await published(await connect(srv, tokens["alice"], tmp_path / "alice.state"))
    carol = await published(await connect(srv, tokens["carol"], tmp_path / "carol.state"))
    bob = await published(await connect(srv, tokens["bob"], tmp_path / "bob.state"))
    await close_all(bob)
    try:
        group = (await alice.create_group("g", ["bob", "carol"])).group
        for i in range(3):
            await alice.send(f"alice {i}", group=group)
        await carol.send("carol 0", group=group)
        assert await texts(carol, 3, conv=group) == ["alice 0", "alice 1", "alice 2"]
        bob = await connect(srv, tokens["bob"], tmp_path / "bob.state")
        assert await texts(bob, 4, conv=group) == ["alice 0", "alice 1", "alice 2", "carol 0"]
    finally:
        await close_all(alice, bob, carol)
