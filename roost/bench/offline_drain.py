"""offline-drain: messages queued for offline users, then they all connect at once.

``--senders`` connections pipeline ``--messages`` 1:1 messages through the
server (real sends, each acked only once durable) to ``--recipients`` users
who never connected: sender ``i``'s ``j``-th message goes to recipient
``(i + j) % R``, so every inbox holds many conversations. The senders leave,
then every recipient connects at the same moment and acks what it gets, as
the SDK does. Figures: time from the connect to the last message, messages/s,
and the count of unique messages received against the count sent.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from typing import Any

from roost.bench.one_to_one import assign_urls
from roost.bench.pool import WorkerPool, loadgen_figures, split
from roost.bench.stats import ProcSampler
from roost.bench.target import Target, make_target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--recipients", type=int, default=100, help="offline users the messages go to")
    parser.add_argument("--senders", type=int, default=100)
    parser.add_argument("--body-size", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=120.0, help="give up draining after this long")


def run(args: argparse.Namespace) -> dict[str, Any]:
    target = make_target(args)
    target.start()
    try:
        return asyncio.run(_run(target, args))
    finally:
        target.stop()


def plan(messages: int, senders: list[str], recipients: list[str]) -> list[list[Any]]:
    """``[[sender, recipient, count], ...]``: sender i's j-th message goes to recipient (i + j) % R."""
    counts: Counter[tuple[int, int]] = Counter()
    for k in range(messages):
        i, j = k % len(senders), k // len(senders)
        counts[(i, (i + j) % len(recipients))] += 1
    return [[senders[i], recipients[r], n] for (i, r), n in sorted(counts.items())]


async def _run(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    senders = [f"{target.user_tag}s{i}" for i in range(args.senders)]
    recipients = [f"{target.user_tag}r{i}" for i in range(args.recipients)]
    tokens = await target.add_users(senders + recipients)
    where = assign_urls(senders + recipients, target.urls)
    sends = plan(args.messages, senders, recipients)
    expected = Counter[str]()
    for _, to, n in sends:
        expected[to] += n
    async with WorkerPool(args.workers) as pool:
        queued = await queue_messages(pool, senders, sends, tokens, where, args.body_size)
        drained = await drain(target, pool, recipients, expected, tokens, where, args.timeout)
    return {"target": target.describe(), **queued, **drained}


async def queue_messages(
    pool: WorkerPool,
    senders: list[str],
    sends: list[list[Any]],
    tokens: dict[str, str],
    where: dict[str, str],
    body_size: int,
) -> dict[str, Any]:
    shares = split(senders, pool.count)
    await pool.all("connect", [{"users": [[n, tokens[n], where[n]] for n in share]} for share in shares])
    await pool.all("collect_start")
    owner = {name: i for i, share in enumerate(shares) for name in share}
    per_worker: list[list[list[Any]]] = [[] for _ in shares]
    for send in sends:
        per_worker[owner[send[0]]].append(send)
    t0 = time.monotonic()
    replies = await pool.all(
        "send_bulk", [{"sends": s, "prefix": "q", "body_size": body_size} for s in per_worker]
    )
    seconds = time.monotonic() - t0
    await pool.all("disconnect", [{"names": share} for share in shares])
    sent = sum(r["sent"] for r in replies)
    return {
        "messages": sent,
        "acked": sum(r["acked"] for r in replies),
        "queue_seconds": round(seconds, 3),
        "queue_rate": round(sent / seconds, 1),
        "queue_errors": sum(r["errors"] for r in replies),
        "queue_loadgen_cpu_pct": loadgen_figures(replies)["loadgen_cpu_pct"],
    }


async def drain(
    target: Target,
    pool: WorkerPool,
    recipients: list[str],
    expected: Counter[str],
    tokens: dict[str, str],
    where: dict[str, str],
    timeout: float,
) -> dict[str, Any]:
    shares = split(recipients, pool.count)
    start_at = time.monotonic() + 0.5
    sampler = ProcSampler(target.server_pids() + target.backend_pids(), interval=0.2).start()
    replies = await pool.all(
        "drain",
        [
            {
                "users": [[n, tokens[n], where[n]] for n in share],
                "start_at": start_at,
                "expected": sum(expected[n] for n in share),
                "timeout": timeout,
            }
            for share in shares
        ],
    )
    server = sampler.stop()
    received = sum(r["received"] for r in replies)
    per_device: Counter[str] = Counter()
    for reply in replies:
        per_device.update(reply["per_device"])
    seconds = max(r["last_msg"] for r in replies) - start_at if received else timeout
    short = {n: expected[n] - per_device[n] for n in expected if per_device[n] != expected[n]}
    return {
        "recipients": len(recipients),
        "connected": sum(r["connected"] for r in replies),
        "connect_seconds": round(max(r["all_connected"] for r in replies) - start_at, 3),
        "drain_seconds": round(seconds, 3),
        "rate_achieved": round(received / seconds, 1) if seconds > 0 else 0.0,
        "received": received,
        "missing": sum(expected.values()) - received,
        "recipients_short": len(short),
        "duplicates": sum(r["duplicates"] for r in replies),
        "errors": sum(r["errors"] for r in replies),
        "server_cpu_pct": server["cpu_avg_pct"],
        "server_cpu_us_per_msg": round(1e6 * server["cpu_seconds"] / max(1, received), 1),
        "server_cpu_peak_pct": server["cpu_peak_pct"],
        "server_rss_peak_kib": server["rss_peak_kib"],
        "machine_busy_pct": server["machine_busy_pct"],
        "server_loop_cpu_pct": server["main_thread_cpu_pct"],
        "server_threads_cpu_pct": server["other_threads_cpu_pct"],
        **loadgen_figures(replies),
    }
