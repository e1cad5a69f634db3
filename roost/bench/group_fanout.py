"""group-fanout: one member posts to a group of 64 / 256 / 1024; time until every member has it.

All members are connected (spread over the worker processes) and ack what
they get, as the SDK does. Per group size: ``--posts`` posts, one at a
time (the next goes ``--interval`` s after the previous one reached every
member, so each post is timed alone, not behind a queue of earlier ones); a
post's *time to all* is the latest of its members' send → shown latencies;
p50 / p99 / max over the posts. Then every second member
disconnects, the same number of posts go out, and time to all is measured
over the members still online; then the offline half reconnects and the run
checks that each of them gets every post it missed.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from roost.bench.one_to_one import assign_urls
from roost.bench.pool import WorkerPool, loadgen_figures, split
from roost.bench.stats import ProcSampler, cdf_points, latency_summary
from roost.bench.target import Target, make_target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="64,256,1024", help="group sizes (members, the poster included)")
    parser.add_argument("--posts", type=int, default=100, help="posts per size and phase")
    parser.add_argument(
        "--interval", type=float, default=0.05, help="pause after a post reached everyone, before the next"
    )
    parser.add_argument("--body-size", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=30.0, help="wait this long for a phase's posts")
    parser.add_argument("--no-offline", action="store_true", help="skip the half-offline phase")


def run(args: argparse.Namespace) -> dict[str, Any]:
    target = make_target(args)
    target.start()
    try:
        return asyncio.run(_run(target, args))
    finally:
        target.stop()


class Members:
    """Which worker holds which user, and who is online."""

    def __init__(self, names: list[str], workers: int, tokens: dict[str, str], where: dict[str, str]) -> None:
        self.shares = split(names, workers)
        self.owner = {n: i for i, share in enumerate(self.shares) for n in share}
        self.tokens = tokens
        self.where = where
        self.offline: set[str] = set()
        self.sender = names[0]  # posts to every group (its creator)

    def spec(self, name: str) -> list[str]:
        return [name, self.tokens[name], self.where[name]]

    def per_worker(self, names: list[str]) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in self.shares]
        for name in names:
            out[self.owner[name]].append(name)
        return out


async def _run(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    names = [f"{target.user_tag}u{i}" for i in range(max(sizes))]
    tokens = await target.add_users(names)
    members = Members(names, args.workers, tokens, assign_urls(names, target.urls))
    groups: list[dict[str, Any]] = []
    async with WorkerPool(args.workers) as pool:
        connects = await pool.all(
            "connect", [{"users": [members.spec(n) for n in s]} for s in members.shares]
        )
        failed = sum(c["failed"] for c in connects)
        if failed:
            raise RuntimeError(f"{failed} connections failed")
        await pool.all("collect_start")
        for size in sizes:
            groups += await run_size(target, pool, members, names[:size], args)
    return {"target": target.describe(), "posts": args.posts, "groups": groups}


async def run_size(
    target: Target, pool: WorkerPool, members: Members, group_members: list[str], args: argparse.Namespace
) -> list[dict[str, Any]]:
    size = len(group_members)
    created = await pool.call(
        members.owner[members.sender],
        "group_create",
        admin=members.sender,
        name=f"bench-{size}",
        members=group_members[1:],
    )
    group = created["group"]
    await asyncio.sleep(0.5)  # let the "created" event reach everyone before timing posts
    receivers = group_members[1:]
    phases = [await post_phase(target, pool, members, group, receivers, f"g{size}-on", args)]
    phases[-1].update(size=size, label=f"{size} all online")
    print(_line(phases[-1]), flush=True)
    if not args.no_offline:
        offline = receivers[::2]
        await pool.all("disconnect", [{"names": n} for n in members.per_worker(offline)])
        members.offline.update(offline)
        phase = await post_phase(target, pool, members, group, receivers, f"g{size}-off", args)
        phase.update(size=size, label=f"{size} half offline", offline_members=len(offline))
        phase.update(await reconnect(pool, members, offline, receivers, f"g{size}-off", args))
        phases.append(phase)
        print(_line(phase), flush=True)
    return phases


async def post_phase(
    target: Target,
    pool: WorkerPool,
    members: Members,
    group: str,
    receivers: list[str],
    prefix: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Post ``args.posts`` times; time to all members online now, per post."""
    online = [n for n in receivers if n not in members.offline]
    ids = [f"{members.sender}/{prefix}-{i}" for i in range(args.posts)]
    sampler = ProcSampler(target.server_pids() + target.backend_pids()).start()
    await pool.all("cpu_mark")
    expected = [{"expected_per_id": len(n), "timeout": args.timeout} for n in members.per_worker(online)]
    replies: list[dict[str, Any]] = []
    for i, post_id in enumerate(ids):
        # One post at a time: its time to all, not the queue behind the previous ones.
        await pool.call(
            members.owner[members.sender], "group_post", sender=members.sender, group=group, first=i, count=1,
            interval=0.0, prefix=prefix, body_size=args.body_size,
        )  # fmt: skip
        replies = await pool.all("collect_wait", [{**e, "ids": [post_id]} for e in expected])
        await asyncio.sleep(args.interval)
    replies = await pool.all("collect_wait", [{**e, "ids": ids, "timeout": 0.0} for e in expected])
    server = sampler.stop()
    counts = {i: sum(r["per_id"][i][0] for r in replies) for i in ids}
    time_to_all = [max(r["per_id"][i][1] for r in replies) / 1000.0 for i in ids if counts[i] >= len(online)]
    return {
        "members": len(receivers) + 1,
        "online_receivers": len(online),
        "posts": len(ids),
        "posts_complete": len(time_to_all),
        "deliveries": sum(counts.values()),
        **latency_summary(time_to_all),
        "duplicates": sum(r["duplicates"] for r in replies),
        "errors": sum(r["errors"] for r in replies),
        "server_cpu_pct": server["cpu_avg_pct"],
        # server CPU per message put on a member's screen (includes its dack, receipt and rack)
        "server_cpu_us_per_delivery": round(1e6 * server["cpu_seconds"] / max(1, sum(counts.values())), 1),
        "machine_busy_pct": server["machine_busy_pct"],
        "server_loop_cpu_pct": server["main_thread_cpu_pct"],
        "server_threads_cpu_pct": server["other_threads_cpu_pct"],
        **loadgen_figures(replies),
        "cdf": cdf_points(time_to_all),
    }


async def reconnect(
    pool: WorkerPool,
    members: Members,
    offline: list[str],
    receivers: list[str],
    prefix: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Bring the offline half back; every receiver must then hold every post of the phase."""
    ids = [f"{members.sender}/{prefix}-{i}" for i in range(args.posts)]
    t0 = time.monotonic()
    await pool.all(
        "connect", [{"users": [members.spec(n) for n in share]} for share in members.per_worker(offline)]
    )
    members.offline.difference_update(offline)
    replies = await pool.all(
        "collect_wait",
        [
            {"expected_per_id": len(n), "ids": ids, "timeout": args.timeout}
            for n in members.per_worker(receivers)
        ],
    )
    seconds = time.monotonic() - t0
    delivered = sum(r["per_id"][i][0] for r in replies for i in ids)
    return {
        "reconnect_drain_seconds": round(seconds, 3),
        "offline_received_all": delivered == len(receivers) * len(ids),
        "missing": len(receivers) * len(ids) - delivered,
    }


def _line(phase: dict[str, Any]) -> str:
    return (
        f"[{phase['label']}] posts {phase['posts_complete']}/{phase['posts']} complete; time to all "
        f"p50 {phase['p50_ms']:.1f} p99 {phase['p99_ms']:.1f} max {phase['max_ms']:.1f} ms; "
        f"server {phase['server_cpu_pct']:.0f}%"
    )
