"""What roost.e2ee costs on this machine: `python -m tests.e2ee.measure [rounds]`.

Prints CPU µs per operation (process time, not wall time, so other processes on
the shared machine count less; the lowest of 5 timing loops) and the bytes a
message and a state take.
Not a test: it asserts nothing; the figures go into docs/security.md ("Cost").
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable

from roost.e2ee import LocalKeys, SenderKeyRecord, Session
from tests.e2ee.conftest import publish


def per_call_us(run: Callable[[], object], rounds: int) -> float:
    samples = []
    for _ in range(5):
        start = time.process_time()
        for _ in range(rounds):
            run()
        samples.append((time.process_time() - start) / rounds * 1e6)
    return min(samples)


def talking() -> tuple[Session, Session]:
    alice_keys, bob_keys = LocalKeys.generate(), LocalKeys.generate()
    alice = Session.initiate(alice_keys, "bob", bob_keys.identity_public, publish(bob_keys))
    bob, _ = Session.respond(bob_keys, "alice", alice.encrypt(b"hi"))
    alice.decrypt(bob.encrypt(b"hello"))
    return alice, bob


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    payload = b"x" * 100  # a short chat message
    alice, bob = talking()

    def same_chain() -> None:
        bob.decrypt(alice.encrypt(payload))

    turn = [alice, bob]

    def with_dh_step() -> None:  # the direction flips every message: each decrypt is a DH ratchet step
        sender, receiver = turn
        receiver.decrypt(sender.encrypt(payload))
        turn.reverse()

    own, skdm = SenderKeyRecord.create(uuid.uuid4())
    member = SenderKeyRecord.from_distribution(skdm)

    def sender_key() -> None:
        member.decrypt(own.encrypt(payload))

    sender, skdm2 = SenderKeyRecord.create(uuid.uuid4())
    queued = iter([sender.encrypt(payload) for _ in range(rounds * 5)])
    receiver = SenderKeyRecord.from_distribution(skdm2)

    def persist_session() -> None:
        Session.from_bytes(bob.to_bytes())

    results = {
        "1:1 encrypt+decrypt, same chain": per_call_us(same_chain, rounds),
        "1:1 encrypt+decrypt, DH ratchet step": per_call_us(with_dh_step, rounds),
        "sender key encrypt+decrypt (group)": per_call_us(sender_key, rounds),
        "sender key encrypt only": per_call_us(lambda: own.encrypt(payload), rounds),
        "sender key decrypt only (each group member)": per_call_us(
            lambda: receiver.decrypt(next(queued)), rounds
        ),
        "Session to_bytes+from_bytes (no skipped keys)": per_call_us(persist_session, rounds),
    }

    keys = [(LocalKeys.generate(), LocalKeys.generate()) for _ in range(rounds // 10 + 5)]
    bundles = [publish(bob_keys) for _, bob_keys in keys]
    pairs = iter(list(zip(keys, bundles, strict=True)) * 5)

    def pqxdh() -> None:
        (alice_keys, bob_keys), bundle = next(pairs)
        session = Session.initiate(alice_keys, "bob", bob_keys.identity_public, bundle)
        first = session.encrypt(payload)
        bob_copy = LocalKeys.from_bytes(bob_keys.to_bytes())  # respond consumes keys: keep the original
        Session.respond(bob_copy, "alice", first)

    def copy_only() -> None:
        (_, bob_keys), _ = next(pairs)
        LocalKeys.from_bytes(bob_keys.to_bytes())

    pqxdh_us = per_call_us(pqxdh, len(bundles))
    pairs = iter(list(zip(keys, bundles, strict=True)) * 5)
    results["PQXDH initiate+first message+respond"] = pqxdh_us - per_call_us(copy_only, len(bundles))
    new_kem = keys[0][1].new_kem_prekeys
    results["one-time KEM prekey generation (+signature)"] = per_call_us(lambda: new_kem(1), 50)

    for name, value in results.items():
        print(f"{name:48s} {value:9.1f} µs")
    skipped_alice, skipped_bob = talking()
    for _ in range(2000):
        skipped_alice.encrypt(payload)
    skipped_bob.decrypt(skipped_alice.encrypt(payload))
    print(f"{'1:1 normal message, 100-byte text':48s} {len(alice.encrypt(payload)):6d} bytes")
    fresh = Session.initiate(keys[0][0], "bob", keys[0][1].identity_public, bundles[0])
    print(f"{'1:1 PreKey message, 100-byte text':48s} {len(fresh.encrypt(payload)):6d} bytes")
    print(f"{'sender key message, 100-byte text':48s} {len(own.encrypt(payload)):6d} bytes")
    print(f"{'Session state, no skipped keys':48s} {len(bob.to_bytes()):6d} bytes")
    print(f"{'Session state, 2,000 skipped keys':48s} {len(skipped_bob.to_bytes()):6d} bytes")
    print(f"{'SenderKeyRecord state (member)':48s} {len(member.to_bytes()):6d} bytes")


if __name__ == "__main__":
    main()
