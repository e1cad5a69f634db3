"""Faults with real processes: kill -9 of the server, crashed clients, reconnect storms.

What every test checks in the end is the design's promise: nothing that got
✓ is lost, nothing is shown twice, one sender's messages appear in order.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

from roost.client import Client, Message
from tests.e2e.helpers import collect, publish_keys
from tests.e2e.server import ServerProcess
from tests.e2e.users import add_users


def assert_exactly_once_in_order(got: list[Message], sent_ids: list[str]) -> None:
    ids = [m.id for m in got]
    assert len(ids) == len(set(ids)), "a message was shown twice"
    assert set(ids) == set(sent_ids), f"missing: {len(set(sent_ids) - set(ids))}"
    assert ids == sent_ids, "sender order not kept"
    seqs = [m.seq for m in got]
    assert seqs == sorted(seqs)


async def test_kill9_mid_stream_loses_nothing_acked(server: ServerProcess, tmp_path: Path) -> None:
    a_token, b_token = server.add_user("alice"), server.add_user("bob")
    alice = Client(server.url, a_token, state_path=tmp_path / "a.state", backoff_cap=0.5)
    bob = Client(server.url, b_token, state_path=tmp_path / "b.state", backoff_cap=0.5)
    await alice.connect()
    await bob.connect()
    n = 1500
    sent_ids = [f"m-{i}" for i in range(n)]
    sends = [asyncio.ensure_future(alice.send(mid, to="bob", message_id=mid)) for mid in sent_ids]
    # Let part of the stream commit, then kill the server hard.
    while sum(s.done() for s in sends) < n // 3:
        await asyncio.sleep(0.005)
    acked_before = {s.result().message_id: s.result().seq for s in sends if s.done()}
    server.kill9()
    server.start()
    results = await asyncio.wait_for(asyncio.gather(*sends), 60)
    by_id = {r.message_id: r.seq for r in results}
    # ✓ meant durable: what was acked before the crash kept its seq.
    for message_id, seq in acked_before.items():
        assert by_id[message_id] == seq
    assert sorted(by_id.values()) == list(range(1, n + 1)), "seqs not contiguous"
    got = await collect(bob, n, 60)
    assert_exactly_once_in_order(got, sent_ids)
    await alice.close()
    await bob.close()


async def test_every_ack_survives_immediate_kill9(server: ServerProcess, tmp_path: Path) -> None:
    a_token, b_token = server.add_user("alice"), server.add_user("bob")
    await publish_keys(server, {"bob": (b_token, tmp_path / "b.state")})  # so alice's sends go at once
    acked: dict[str, int] = {}
    for round_ in range(3):
        alice = Client(server.url, a_token, state_path=tmp_path / "a.state", reconnect=False)
        await alice.connect()
        result = await alice.send(f"round {round_}", to="bob")
        acked[result.message_id] = result.seq
        server.kill9()  # right after ✓
        await alice.close()
        server.start()
    bob = Client(server.url, b_token, state_path=tmp_path / "b.state")
    await bob.connect()
    got = await collect(bob, 3, 20)
    assert {m.id: m.seq for m in got} == acked
    await bob.close()


CRASHING_CLIENT = textwrap.dedent(
    """
    import asyncio, json, os, signal, sys
    from roost.client import Client

    async def main():
        url, token, state, n, connect = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
        client = Client(url, token, state_path=state)
        if connect == "yes":
            await client.connect()
        ids = []
        for i in range(n):
            ids.append(await client.send(f"crash {i}", to="bob", wait=False))
        print(json.dumps(ids), flush=True)
        if connect == "yes":
            await asyncio.sleep(0.01)  # some frames leave, most acks do not arrive
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
    """
)


async def test_client_crash_with_unsent_outbox(server: ServerProcess, tmp_path: Path) -> None:
    a_token, b_token = server.add_user("alice"), server.add_user("bob")
    script = tmp_path / "crash.py"
    script.write_text(CRASHING_CLIENT)
    state = tmp_path / "alice.state"
    all_ids: list[str] = []
    for connect in ("no", "yes"):
        proc = subprocess.run(
            [sys.executable, str(script), server.url, a_token, str(state), "200", connect],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert proc.returncode == -9, proc.stderr
        all_ids += json.loads(proc.stdout.strip().splitlines()[-1])
    # The restarted client resends its outbox with the same ids.
    alice = Client(server.url, a_token, state_path=state)
    assert {item.id for item in alice.pending_outbox()} <= set(all_ids)
    await alice.connect()
    bob = Client(server.url, b_token, state_path=tmp_path / "b.state")
    await bob.connect()
    got = await collect(bob, len(all_ids), 30)
    assert_exactly_once_in_order(got, all_ids)
    for _ in range(200):
        if not alice.pending_outbox():
            break
        await asyncio.sleep(0.05)
    assert alice.pending_outbox() == []
    await alice.close()
    await bob.close()


async def test_many_clients_reconnect_after_restart(server: ServerProcess, tmp_path: Path) -> None:
    n = 150
    tokens = {f"u{i}": server.add_user(f"u{i}") for i in range(2)}
    tokens.update(await add_users(server, [f"p{i}" for i in range(n)]))
    clients = [
        Client(server.url, tokens[f"p{i}"], state_path=tmp_path / f"p{i}.state", backoff_cap=2.0)
        for i in range(n)
    ]
    await asyncio.gather(*(c.connect() for c in clients))
    sender = Client(server.url, tokens["u0"], state_path=tmp_path / "u0.state", backoff_cap=0.5)
    await sender.connect()
    # Each of them starts the encrypted session with u0 (one key fetch each:
    # the directory limits how many bundles one requester fetches a minute).
    await asyncio.wait_for(sender.crypto.published.wait(), 30)
    await asyncio.gather(*(c.send("hi u0", to="u0") for c in clients))
    assert len(await collect(sender, n, 60, Message)) == n
    server.kill9()
    # Sent while the server is down: kept in the sender's outbox.
    pending = [asyncio.ensure_future(sender.send(f"to p{i}", to=f"p{i}")) for i in range(n)]
    await asyncio.sleep(0.3)
    server.start()
    await asyncio.wait_for(asyncio.gather(*pending), 60)
    firsts = await asyncio.gather(*(collect(c, 1, 60) for c in clients))
    for i, got in enumerate(firsts):
        assert [m.text for m in got] == [f"to p{i}"]
    assert all(c.connections >= 2 for c in clients)
    await asyncio.gather(*(c.close() for c in clients))
    await sender.close()
