"""What end-to-end encryption costs: client CPU per message and sender-key redistribution.

Two views side by side:

* ``protocol``: roost.e2ee alone, in this process (CPU time, no I/O): a 1:1
  message in steady state and the first PQXDH message, one sender-key
  encrypt and one member's decrypt in a group, and the redistribution after
  a member leaves a group of ``--members``: the sender's new sender key
  sealed over each remaining member's pairwise session, and each member's
  work to read again (open that message, install the key, decrypt the next
  group message).
* ``sdk``: two SDK clients (``roost.client.Client``) in this process against
  a real server (a separate process): this process's CPU time divided by
  messages, so it holds both ends' SDK work per message (encrypt, the state
  file's transactions, framing, decrypt) beside the protocol's share.
* ``sdk_redistribution``: the redistribution end to end. A group of
  ``--sdk-members`` SDK clients, each with its own state file, against the
  real server: the sender alone in one worker process, the members spread
  over ``--workers`` more. The sender's first message hands its sender key to
  everyone (sessions made then); every member decrypts it; one member leaves;
  the sender's next message needs a new sender key sealed for each of the
  ``N - 2`` members left. Timed from that send: the sender's wall time and CPU
  until the key and the message are sealed and until the server acked them
  all, and each member's send → decrypted time (p50 / p99 / max, and when the
  last one could read), with the members' and the server's CPU meanwhile.
  The bench clients keep ``BENCH_PREKEY_BATCH`` one-time keys instead of a
  phone's 100: uploads are the costly part of starting 1024 clients, and
  the redistribution reuses the sessions the first message made (no bundle
  is fetched after the leave, whatever the batch).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from roost.bench.one_to_one import assign_urls
from roost.bench.pool import WorkerPool, split
from roost.bench.stats import ProcSampler, latency_summary
from roost.bench.target import Target, make_target
from roost.cli.errors import UsageError
from roost.client.keys import DeviceBundle
from roost.core.prekeys import LOW_WATER
from roost.e2ee import LocalKeys, SenderKeyRecord, Session

PAYLOAD = b"x" * 100  # a short chat message
# One-time keys per bench client: above the server's low-water mark, so the
# one bundle the sender takes from each member does not set off a refill upload.
BENCH_PREKEY_BATCH = LOW_WATER + 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--members", type=int, default=1024, help="group size for the redistribution in roost.e2ee alone"
    )
    parser.add_argument("--messages", type=int, default=300, help="messages per protocol timing loop")
    parser.add_argument("--sdk-messages", type=int, default=200, help="1:1 messages through the SDK")
    parser.add_argument("--no-sdk", action="store_true", help="the protocol figures only (no server)")
    parser.add_argument(
        "--sdk-members",
        type=int,
        default=1024,
        help="group size for the redistribution through SDK clients and the server (0: skip)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1200.0,
        help="bound (s) on the SDK redistribution run, setup included",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.sdk_members and not args.no_sdk and args.sdk_members < 3:
        raise UsageError("--sdk-members needs a sender, a member who leaves and a reader (>= 3), or 0")
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    results: dict[str, Any] = {"protocol": protocol_costs(args.messages)}
    results["redistribution"] = redistribution(args.members)
    if not args.no_sdk:
        target = make_target(args)
        target.start()
        try:
            results["sdk"] = asyncio.run(sdk_costs(target, args.sdk_messages))
            if args.sdk_members:
                run = sdk_redistribution(target, args.sdk_members, max(1, args.workers), args.timeout)
                try:
                    results["sdk_redistribution"] = asyncio.run(asyncio.wait_for(run, args.timeout))
                except TimeoutError:
                    # Its workers and temporary state files are gone by now (the
                    # pool and the directory are closed on the way out).
                    raise SystemExit(
                        f"roost bench e2ee: the SDK redistribution did not finish within {args.timeout:g} s"
                    ) from None
            results["target"] = target.describe()
        finally:
            target.stop()
    _print(results)
    return results


# -- the protocol alone ---------------------------------------------------------------


def _publish(local: LocalKeys) -> DeviceBundle:
    signed_id, signed_key, signed_sig = local.new_signed_prekey(0.0)
    prekey_id, prekey_key = local.new_prekeys(1)[0]
    kem_id, kem_key, kem_sig = local.new_kem_prekeys(1)[0]
    return DeviceBundle(
        local.device,
        local.registration,
        signed_id,
        signed_key,
        signed_sig,
        prekey_id,
        prekey_key,
        kem_id,
        kem_key,
        kem_sig,
        False,
    )


def _pair(sender: LocalKeys, member: LocalKeys, name: str) -> tuple[Session, Session]:
    """A pairwise session past its first exchange (both sides have sent)."""
    outgoing = Session.initiate(sender, name, member.identity_public, _publish(member))
    incoming, _ = Session.respond(member, "sender", outgoing.encrypt(b"hi"))
    outgoing.decrypt(incoming.encrypt(b"hello"))
    return outgoing, incoming


def _cpu_us(run: Callable[[], object], rounds: int) -> float:
    """CPU µs per call: the lowest of 3 loops (others on the machine count less)."""
    samples = []
    for _ in range(3):
        start = time.process_time()
        for _ in range(rounds):
            run()
        samples.append((time.process_time() - start) / rounds * 1e6)
    return min(samples)


def protocol_costs(rounds: int) -> dict[str, float]:
    rounds = max(rounds, 10)
    alice, bob = _pair(LocalKeys.generate(), LocalKeys.generate(), "bob")
    own, distribution = SenderKeyRecord.create(uuid.uuid4())
    member = SenderKeyRecord.from_distribution(distribution)
    queued = iter([own.encrypt(PAYLOAD) for _ in range(rounds * 3)])
    firsts = [(LocalKeys.generate(), LocalKeys.generate()) for _ in range(max(rounds // 10, 5) * 3)]
    prepared = iter([(a, b, _publish(b)) for a, b in firsts])

    def first_message() -> None:
        a, b, bundle = next(prepared)
        session = Session.initiate(a, "bob", b.identity_public, bundle)
        Session.respond(b, "alice", session.encrypt(PAYLOAD))

    return {
        "one_to_one_us": _cpu_us(lambda: bob.decrypt(alice.encrypt(PAYLOAD)), rounds),
        "first_pqxdh_us": _cpu_us(first_message, max(rounds // 10, 5)),
        "group_encrypt_us": _cpu_us(lambda: own.encrypt(PAYLOAD), rounds),
        "group_member_decrypt_us": _cpu_us(lambda: member.decrypt(next(queued)), rounds),
    }


def redistribution(members: int) -> dict[str, float]:
    """After a member leaves a group of ``members``: the sender's new sender key
    sealed for each other remaining member (``members - 2`` pairwise
    messages), and each one's work to read again."""
    sender = LocalKeys.generate()
    remaining = members - 2  # the sender and the member who left are not sent to
    setup = time.perf_counter()
    pairs = [_pair(sender, LocalKeys.generate(), f"m{i}") for i in range(remaining)]
    setup_s = time.perf_counter() - setup

    start = time.process_time()
    own, distribution = SenderKeyRecord.create(uuid.uuid4())
    sealed = [outgoing.encrypt(distribution) for outgoing, _ in pairs]
    first = own.encrypt(PAYLOAD)
    sender_s = time.process_time() - start

    start = time.process_time()
    for (_, incoming), message in zip(pairs, sealed, strict=True):
        record = SenderKeyRecord.from_distribution(incoming.decrypt(message))
        record.decrypt(first)
    members_s = time.process_time() - start
    cores = os.cpu_count() or 1
    return {
        "members": members,
        "pairwise_messages": remaining,
        "setup_s": setup_s,
        "sender_cpu_ms": sender_s * 1000,
        "member_cpu_us": members_s / remaining * 1e6,
        "members_cpu_ms": members_s * 1000,
        # Every member reads in parallel on its own device: the sender's
        # work, then one member's (the server's fan-out is not in it).
        "readable_after_ms": (sender_s + members_s / remaining) * 1000,
        # The same members all on this machine's cores (a bench, not a phone).
        "readable_after_ms_here": (sender_s + members_s / cores) * 1000,
        "cores": cores,
    }


# -- through the SDK -----------------------------------------------------------------


async def sdk_costs(target: Target, messages: int) -> dict[str, Any]:
    from roost.client import Client, Message

    tag = uuid.uuid4().hex[:6]
    names = [f"{tag}a", f"{tag}b"]
    tokens = await target.add_users(names)
    url = target.urls[0]
    with tempfile.TemporaryDirectory(prefix="roost-bench-e2ee-") as root:
        alice = Client(url, tokens[names[0]], state_path=Path(root) / "a.state")
        bob = Client(url, tokens[names[1]], state_path=Path(root) / "b.state")
        async with alice, bob:
            await asyncio.sleep(1.0)  # both publish their keys first (not part of a message)

            async def receive(count: int) -> None:
                got = 0
                while got < count:
                    event = await bob.next_event(timeout=60.0)
                    if isinstance(event, Message) and event.sender == names[0]:
                        assert event.encrypted, "the SDK sent a message in the clear"
                        got += 1

            cpu, wall = time.process_time(), time.perf_counter()
            await alice.send("first", to=names[1])  # fetches bob's bundle: PQXDH
            await receive(1)
            first_cpu, first_wall = time.process_time() - cpu, time.perf_counter() - wall

            cpu, wall = time.process_time(), time.perf_counter()
            for i in range(messages):
                await alice.send(f"message {i}", to=names[1], wait=False)
            await receive(messages)
            steady_cpu, steady_wall = time.process_time() - cpu, time.perf_counter() - wall
    return {
        "messages": messages,
        "first_message_cpu_ms": first_cpu * 1000,
        "first_message_wall_ms": first_wall * 1000,
        "per_message_cpu_us": steady_cpu / messages * 1e6,
        "per_message_wall_ms": steady_wall / messages * 1000,
    }


# -- the redistribution through SDK clients and the server ---------------------------


class _Group:
    """Who is where: the sender alone in worker 0, the members round-robin over the rest."""

    def __init__(self, names: list[str], workers: int) -> None:
        self.sender, self.leaver = names[0], names[1]
        self.shares = [[self.sender], *split(names[1:], workers)]
        self.owner = {n: i for i, share in enumerate(self.shares) for n in share}

    def readers(self, *, without: str | None = None) -> list[dict[str, Any] | None]:
        """Per worker, the members expected to read (None: the sender's worker)."""
        return [None, *({"names": [n for n in s if n != without]} for s in self.shares[1:])]


async def sdk_redistribution(target: Target, members: int, workers: int, timeout: float) -> dict[str, Any]:
    names = [f"{target.user_tag}r{i}" for i in range(members)]
    tokens = await target.add_users(names)
    where = assign_urls(names, target.urls)
    group = _Group(names, workers)
    with tempfile.TemporaryDirectory(prefix="roost-bench-redist-") as root:
        async with WorkerPool(workers + 1, module="roost.bench.sdk_worker") as pool:
            t0 = time.perf_counter()
            starts = await pool.all(
                "start",
                [
                    {"users": [[n, tokens[n], where[n]] for n in share], "root": root,
                     "prekey_batch": BENCH_PREKEY_BATCH, "timeout": timeout}
                    for share in group.shares
                ],
            )  # fmt: skip
            setup = {"clients_started_s": round(time.perf_counter() - t0, 1)}
            setup["clients_cpu_s"] = round(sum(s["cpu_s"] for s in starts), 1)
            created = await pool.call(
                0, "create_group", admin=group.sender, name=f"redist-{members}", members=names[1:]
            )
            conv = created["group"]
            first = await _send_and_read(target, pool, group, conv, "first", timeout)
            await pool.call(group.owner[group.leaver], "leave", name=group.leaver, group=conv)
            # The sender's SDK must have applied the leave (dropped its sender
            # key) before it sends: that is what a real sender's next send meets.
            await pool.call(
                0, "wait_membership", name=group.sender, group=conv, action="left", user=group.leaver,
                timeout=timeout,
            )  # fmt: skip
            after = await _send_and_read(target, pool, group, conv, "after-leave", timeout, left=group.leaver)
    return {
        "members": members,
        "pairwise_messages": after["handed_to"],
        "member_workers": workers,
        "prekey_batch": BENCH_PREKEY_BATCH,
        **setup,
        "new_sender_key": after.pop("sender_key") != first.pop("sender_key"),
        "first_message": first,
        **after,
    }


async def _send_and_read(
    target: Target,
    pool: WorkerPool,
    group: _Group,
    conv: str,
    tag: str,
    timeout: float,
    left: str | None = None,
) -> dict[str, Any]:
    """The sender's next group message, timed at the sender and at every member who should read it."""
    sampler = ProcSampler(target.server_pids() + target.backend_pids()).start()
    await pool.all("cpu_mark")
    expected = [
        None if a is None else {**a, "tag": tag, "timeout": timeout} for a in group.readers(without=left)
    ]
    reading = asyncio.ensure_future(pool.all("wait_read", expected))
    try:
        sent = await pool.call(0, "send", sender=group.sender, group=conv, tag=tag, timeout=timeout)
        replies = await reading
    finally:
        reading.cancel()
        server = sampler.stop()
    read = [ms for r in replies for ms in r["read_ms"].values()]
    members_cpu = sum(r["cpu_s"] for r in replies)
    return {
        "handed_to": sent["handed_to"],
        "sender_key": sent["sender_key"],
        "sender_sealed_ms": round(sent["sealed_ms"], 1),
        "sender_acked_ms": round(sent["acked_ms"], 1),
        "sender_cpu_ms": round(sent["cpu_ms"], 1),
        "members_read": len(read),
        "all_read_ms": round(max(read, default=0.0), 3),
        **latency_summary(read, prefix="read_"),
        # every member process's CPU from the send until its last member read, per member
        "member_cpu_ms": round(members_cpu / max(1, len(read)) * 1000, 2),
        "left_member_read": any(left in r["others"] for r in replies) if left else False,
        "decryption_failures": sum(sum(r["decryption_failures"].values()) for r in replies),
        "server_cpu_s": server["cpu_seconds"],
        "machine_busy_pct": server["machine_busy_pct"],
    }


def _print(results: dict[str, Any]) -> None:
    p = results["protocol"]
    print("roost.e2ee alone (CPU per message, encrypt + decrypt):")
    print(f"  1:1 steady state              {p['one_to_one_us']:9.1f} µs")
    print(f"  1:1 first message (PQXDH)     {p['first_pqxdh_us']:9.1f} µs")
    print(f"  group: sender-key encrypt     {p['group_encrypt_us']:9.1f} µs (once per message)")
    print(f"  group: decrypt, each member   {p['group_member_decrypt_us']:9.1f} µs")
    r = results["redistribution"]
    print(f"sender-key redistribution after a member leaves a group of {r['members']}:")
    print(f"  sender CPU for {r['pairwise_messages']} pairwise messages {r['sender_cpu_ms']:9.1f} ms")
    print(f"  each member to read again     {r['member_cpu_us']:9.1f} µs CPU")
    print(f"  readable again after (devices in parallel) {r['readable_after_ms']:9.1f} ms of CPU")
    print(f"  readable again after (all on {r['cores']} cores here) {r['readable_after_ms_here']:9.1f} ms")
    if "sdk" in results:
        s = results["sdk"]
        print(f"through the SDK, 2 clients in one process, {s['messages']} messages:")
        print(f"  CPU per 1:1 message, both ends {s['per_message_cpu_us']:9.1f} µs")
        print(f"  first message (bundle fetch, PQXDH) {s['first_message_cpu_ms']:9.1f} ms CPU")
    if "sdk_redistribution" in results:
        d = results["sdk_redistribution"]
        print(
            f"redistribution through {d['members']} SDK clients and the server "
            f"({d['pairwise_messages']} pairwise messages):"
        )
        print(
            f"  sender: sealed after {d['sender_sealed_ms']:.1f} ms, all acked {d['sender_acked_ms']:.1f} ms"
        )
        print(f"  sender CPU                    {d['sender_cpu_ms']:9.1f} ms")
        print(
            f"  members read: p50 {d['read_p50_ms']:.1f} p99 {d['read_p99_ms']:.1f} "
            f"all {d['members_read']} after {d['all_read_ms']:.1f} ms"
        )
        print(f"  CPU per member {d['member_cpu_ms']:.2f} ms; server CPU {d['server_cpu_s']:.2f} s")
