"""What encryption costs the SDK per 1:1 message (CPU, state on disk): seal +
outbox commit, open + message commit, against the same commits without it.

Run: PYTHONPATH=. .venv/bin/python tests/client/measure_crypto.py
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from pathlib import Path

from roost.client import Message
from roost.client.crypto import E2EE_CT
from roost.client.state import ClientState, OutboxItem
from tests.client.test_e2ee_state import start_pair

N = 1000
DM = "d:alice:bob"


def per_message(seconds: float) -> str:
    return f"{seconds / N * 1e6:.0f} us/msg"


async def encrypted() -> None:
    alice, bob = start_pair(Path(tempfile.mkdtemp()))
    wires = []
    t0 = time.process_time()
    for _ in range(N):
        sealed = alice.crypto.seal_now(OutboxItem(uuid.uuid4().hex, "bob", None, "text/plain", b"x" * 100, 0))
        alice.state.outbox_add(sealed)  # one transaction with the session, as send() does
        wires.append(sealed.wire_body)
    t1 = time.process_time()
    for i, wire in enumerate(wires):
        assert wire is not None
        (m,) = bob.crypto.open(Message(DM, i + 1, f"id{i}", "alice", E2EE_CT, wire, 0))
        bob.state.store_message(DM, m.seq, m.id, m.sender, m.ct, m.body, 0)
        bob.state.commit()
    t2 = time.process_time()
    print(
        f"encrypted: seal + outbox commit {per_message(t1 - t0)}; open + store commit {per_message(t2 - t1)}"
    )


def plaintext() -> None:
    state = ClientState(Path(tempfile.mkdtemp()) / "s.state")
    t0 = time.process_time()
    for _ in range(N):
        state.outbox_add(
            OutboxItem(uuid.uuid4().hex, "bob", None, "text/plain", b"x" * 100, 0, E2EE_CT, b"y")
        )
    t1 = time.process_time()
    for i in range(N):
        state.store_message(DM, i + 1, f"id{i}", "alice", "text/plain", b"x" * 100, 0)
        state.commit()
    t2 = time.process_time()
    print(f"without: outbox commit {per_message(t1 - t0)}; store commit {per_message(t2 - t1)}")


if __name__ == "__main__":
    asyncio.run(encrypted())
    plaintext()
