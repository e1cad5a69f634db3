"""The SDK's encryption state changes only with the message it concerns: a
client that dies before the commit (no COMMIT: SQLite rolls it back) reads
the same ciphertext again as if nothing had happened. No server needed: two
clients' engines exchange ciphertexts by hand."""

from __future__ import annotations

import uuid
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from roost.client import Client, Message
from roost.client.crypto import E2EE_CT
from roost.client.keys import DeviceBundle
from roost.client.state import ClientState, OutboxItem

DM = "d:alice:bob"


def offline_client(path: Path, user: str) -> Client:
    """A client that never connects (no server): its engine and state only."""
    client = Client("http://127.0.0.1:9", f"token-{user}", state_path=path, serve_local=False)
    client.user = user
    return client


def bundle_of(client: Client) -> DeviceBundle:
    keys = client.crypto.keys
    signed_id, signed_key, signed_sig = keys.new_signed_prekey(0.0)
    ((prekey_id, prekey_key),) = keys.new_prekeys(1)
    ((kem_id, kem_key, kem_sig),) = keys.new_kem_prekeys(1)
    client.state.save_e2ee_local_keys(keys.to_bytes())
    client.state.commit()
    return DeviceBundle(
        1, keys.registration, signed_id, signed_key, signed_sig, prekey_id, prekey_key,
        kem_id, kem_key, kem_sig, False,
    )  # fmt: skip


def seal(alice: Client, text: str) -> bytes:
    """What alice's client puts on the wire for ``text`` to bob."""
    item = OutboxItem(uuid.uuid4().hex, "bob", None, "text/plain", text.encode(), 0)
    sealed = alice.crypto.seal_now(item)
    assert sealed.wire_body is not None and sealed.wire_ct == E2EE_CT
    assert len(text) < 8 or text.encode() not in sealed.wire_body  # (2 bytes can occur by chance)
    alice.state.commit()
    return sealed.wire_body


def deliver(bob: Client, seq: int, wire: bytes) -> list[Message]:
    """bob's client receives ``wire`` as seq ``seq`` of the 1:1 chat; the messages it shows."""
    shown: list[Message] = []
    bob._emit = shown.append  # type: ignore[method-assign]
    bob._on_deliver(DM, seq, f"id{seq}", "alice", E2EE_CT, wire, 0)
    return [m for m in shown if isinstance(m, Message)]


def crash(client: Client) -> None:
    """The process dies here: what was not committed is gone."""
    if client.state._in_tx:
        client.state.db.execute("ROLLBACK")
        client.state._in_tx = False
    client.state.db.close()
    client.state.release_lock()


def start_pair(tmp_path: Path) -> tuple[Client, Client]:
    alice = offline_client(tmp_path / "alice.state", "alice")
    bob = offline_client(tmp_path / "bob.state", "bob")
    from roost.e2ee import Session

    session = Session.initiate(alice.crypto.keys, "bob", bob.crypto.keys.identity_public, bundle_of(bob))
    alice.crypto._save_session("bob", session)
    alice.state.commit()
    return alice, bob


async def test_a_crash_before_the_commit_leaves_the_session_where_it_was(tmp_path: Path) -> None:
    alice, bob = start_pair(tmp_path)
    first, second = seal(alice, "first"), seal(alice, "second")
    assert [m.text for m in deliver(bob, 1, first)] == ["first"]
    bob.state.commit()
    # bob decrypts "second" (his ratchet moves on), then dies before the commit.
    assert [m.text for m in deliver(bob, 2, second)] == ["second"]
    crash(bob)
    # The server delivers it again (it was never acked): readable, once.
    bob = offline_client(tmp_path / "bob.state", "bob")
    assert [m.text for m in deliver(bob, 2, second)] == ["second"]
    bob.state.commit()
    assert [row[0] for row in bob.state.db.execute("SELECT body FROM messages ORDER BY seq")] == [
        b"first",
        b"second",
    ]
    crash(bob)
    crash(alice)


async def test_a_crash_after_encrypting_loses_neither_the_message_nor_the_session(tmp_path: Path) -> None:
    alice, bob = start_pair(tmp_path)
    item = OutboxItem("m1", "bob", None, "text/plain", b"kept", 0)
    alice._queue(item)  # sealed and committed with the session that sealed it
    crash(alice)
    alice = offline_client(tmp_path / "alice.state", "alice")
    (kept,) = alice.pending_outbox()
    assert kept.id == "m1" and kept.wire_body is not None
    # The resend is the same bytes, and bob reads it; the next message follows on.
    assert [m.text for m in deliver(bob, 1, kept.wire_body)] == ["kept"]
    assert [m.text for m in deliver(bob, 2, seal(alice, "next"))] == ["next"]
    crash(alice)
    crash(bob)


@settings(max_examples=8, deadline=None)
@given(order=st.permutations(list(range(6))), dup=st.integers(0, 5))
def test_out_of_order_and_duplicated_ciphertexts_each_show_once(tmp_path_factory, order, dup) -> None:
    tmp = tmp_path_factory.mktemp("ooo")
    alice, bob = start_pair(tmp)
    wires = [seal(alice, f"m{i}") for i in range(6)]
    engine = bob.crypto
    shown: list[str] = []
    for i in [*order, order[dup]]:  # the last one is a replay
        shown += [m.text for m in engine.open(Message(DM, i + 1, f"id{i}", "alice", E2EE_CT, wires[i], 0))]
    bob.state.commit()
    assert sorted(shown) == [f"m{i}" for i in range(6)]
    crash(alice)
    crash(bob)


def test_the_state_file_is_owner_only(tmp_path: Path) -> None:
    state = ClientState(tmp_path / "s.state")
    state.set_meta("x", "y")
    try:
        for suffix in ("", "-wal"):
            mode = (tmp_path / f"s.state{suffix}").stat().st_mode & 0o777
            assert mode == 0o600, (suffix, oct(mode))
    finally:
        state.close()
