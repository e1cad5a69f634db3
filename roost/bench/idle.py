"""idle-connections: server memory per idle authenticated connection, and heartbeat CPU at rest.

N light clients (``roost.bench.conn_worker``, at most ``--per-process``
sockets per load-generator process) connect, authenticate and then idle,
answering the server's WebSocket pings and pinging it as the SDK does. They
connect in ``--steps`` steps; after each one the gateways' RSS is sampled, which
gives the memory-vs-connections series (``samples``) and the cost per
connection: ``(RSS at N - RSS at 0) / N`` (``kib_per_connection``) and the slope
of a line fitted through the samples (``kib_per_connection_slope``, free of
one-time costs). Then everything idles for ``--idle-seconds``: the gateways'
CPU over that window is the price of heartbeats at rest.

A process holds at most ~20,000 open files here: past ``--per-gateway``
connections per gateway, run a cluster (``--cluster N``) with more gateways.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
import urllib.request
from typing import Any

from roost.bench.cli import SATURATED_PCT
from roost.bench.conn_worker import WorkerProcess, split_evenly, start_workers, stop_workers
from roost.bench.stats import ProcSampler, rss_kib
from roost.bench.target import Target, make_target
from roost.cli.errors import UsageError

MAX_SOCKETS_PER_PROCESS = 19_000  # ~20,000 open files per process, minus files every process needs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connections", type=int, default=15_000, help="idle connections to hold")
    parser.add_argument("--steps", type=int, default=5, help="memory samples between 0 and N connections")
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="CPU is measured over this window")
    parser.add_argument(
        "--per-process", type=int, default=MAX_SOCKETS_PER_PROCESS, help="sockets per load-generator process"
    )
    parser.add_argument(
        "--per-gateway", type=int, default=MAX_SOCKETS_PER_PROCESS, help="refuse more connections per gateway"
    )
    parser.add_argument(
        "--client-ping", type=float, default=20.0, help="client ping interval, s (the SDK's; 0: off)"
    )
    parser.add_argument(
        "--connect-concurrency", type=int, default=200, help="handshakes in flight per process"
    )
    parser.add_argument("--settle", type=float, default=2.0, help="seconds to wait before each RSS sample")


def run(args: argparse.Namespace) -> dict[str, Any]:
    target = make_target(args)
    gateways = len(target.urls) or max(1, getattr(args, "cluster", 0) or len(getattr(args, "url", []) or []))
    needed = math.ceil(args.connections / args.per_gateway)
    if needed > gateways:
        raise UsageError(
            f"idle-connections: {args.connections} connections need at least {needed} "
            f"gateway processes (at most {args.per_gateway} each): use --cluster {needed}"
        )
    target.start()
    try:
        return asyncio.run(measure(args, target))
    finally:
        target.stop()


def healthz_connections(url: str) -> int:
    """The gateway's own count of open WebSocket connections."""
    with urllib.request.urlopen(url + "/healthz", timeout=10) as resp:
        return int(json.loads(resp.read())["connections"])


def total_rss(pids: list[int]) -> int:
    return sum(rss_kib(pid) for pid in pids)


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``y`` over ``x``."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else 0.0


def plan_connections(
    users: list[str], tokens: dict[str, str], urls: list[str]
) -> tuple[list[list[str]], list[list[Any]]]:
    """Connection ``i`` goes to gateway ``i % G``; its reconnect list is that gateway, then the others."""
    url_lists = [[urls[g], *urls[g + 1 :], *urls[:g]] for g in range(len(urls))]
    conns = [[user, tokens[user], i % len(urls)] for i, user in enumerate(users)]
    return url_lists, conns


async def connect_step(
    workers: list[WorkerProcess], conns: list[list[Any]], url_lists: list[list[str]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    parts = split_evenly(conns, len(workers))
    return list(
        await asyncio.gather(
            *(
                w.request(
                    "connect",
                    conns=part,
                    url_lists=url_lists,
                    ping_interval=args.client_ping,
                    concurrency=args.connect_concurrency,
                    policy={"jitter": True, "base": 0.25, "cap": 8.0, "reconnect": True},
                )
                for w, part in zip(workers, parts, strict=True)
                if part
            )
        )
    )


def merge_counts(replies: list[dict[str, Any]], key: str) -> dict[str, int]:
    merged: dict[str, int] = {}
    for reply in replies:
        for kind, n in reply.get(key, {}).items():
            merged[kind] = merged.get(kind, 0) + n
    return merged


async def measure(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    n = args.connections
    users = [f"idle{i:05d}" for i in range(n)]
    began = time.monotonic()
    tokens = await target.add_users(users)
    users_seconds = time.monotonic() - began
    gateway_pids = target.server_pids()
    backend_pids = target.backend_pids()
    url_lists, conns = plan_connections(users, tokens, target.urls)
    processes = max(args.workers, math.ceil(n / args.per_process))
    workers = await start_workers(processes)
    try:
        return await _measure(args, target, workers, url_lists, conns, gateway_pids, backend_pids) | {
            "users_seconds": round(users_seconds, 2)
        }
    finally:
        await stop_workers(workers)


async def _measure(
    args: argparse.Namespace,
    target: Target,
    workers: list[WorkerProcess],
    url_lists: list[list[str]],
    conns: list[list[Any]],
    gateway_pids: list[int],
    backend_pids: list[int],
) -> dict[str, Any]:
    n = len(conns)
    await asyncio.sleep(args.settle)
    rss0 = total_rss(gateway_pids) if gateway_pids else 0
    backend0 = total_rss(backend_pids) if backend_pids else 0
    samples: list[dict[str, int]] = [{"connections": 0, "rss_kib": rss0}]
    loadgen = ProcSampler([w.pid for w in workers], interval=0.5).start()
    connect_seconds = 0.0
    replies: list[dict[str, Any]] = []
    done = 0
    for step in range(1, args.steps + 1):
        upto = n * step // args.steps
        began = time.monotonic()
        replies = await connect_step(workers, conns[done:upto], url_lists, args)
        connect_seconds += time.monotonic() - began
        done = upto
        await asyncio.sleep(args.settle)
        if gateway_pids:
            samples.append({"connections": done, "rss_kib": total_rss(gateway_pids)})
    connect_load = loadgen.stop()
    per_gateway = [await asyncio.to_thread(healthz_connections, url) for url in target.urls]
    idle = await idle_phase(args, workers, gateway_pids, backend_pids)
    rss_n = samples[-1]["rss_kib"] if gateway_pids else 0
    connected = sum(per_gateway)
    results: dict[str, Any] = {
        "target": target.describe(),
        "connections": n,
        "connected": connected,
        "gateways": len(target.urls),
        "connections_per_gateway": max(per_gateway),
        "connections_by_gateway": per_gateway,
        "client_processes": len(workers),
        "connect_seconds": round(connect_seconds, 2),
        "connect_rate": round(n / connect_seconds, 1) if connect_seconds else 0.0,
        "connect_failed": sum(r["failed"] for r in replies),
        "connect_errors": merge_counts(replies, "errors"),
        "loadgen_connect_cpu_peak_pct": connect_load["cpu_peak_pct"],
        **idle,
    }
    if gateway_pids:
        results |= {
            "kib_per_connection": round((rss_n - rss0) / max(1, connected), 2),
            "kib_per_connection_slope": round(slope([(s["connections"], s["rss_kib"]) for s in samples]), 2),
            "rss_baseline_kib": rss0,
            "rss_kib": rss_n,
            "samples": samples,
        }
    if backend_pids:
        backend_n = total_rss(backend_pids)
        results["backend_kib_per_connection"] = round((backend_n - backend0) / max(1, connected), 2)
    return results


async def idle_phase(
    args: argparse.Namespace, workers: list[WorkerProcess], gateway_pids: list[int], backend_pids: list[int]
) -> dict[str, Any]:
    """Everything connected and silent but for heartbeats: what does that cost per second?"""
    before = await asyncio.gather(*(w.request("status") for w in workers))
    gateways = ProcSampler(gateway_pids, interval=1.0).start()
    backend = ProcSampler(backend_pids, interval=1.0).start()
    loadgen = ProcSampler([w.pid for w in workers], interval=1.0).start()
    await asyncio.sleep(args.idle_seconds)
    gw, be, lg = gateways.stop(), backend.stop(), loadgen.stop()
    after = await asyncio.gather(*(w.request("status") for w in workers))
    open_now = sum(s["open"] for s in after)
    dropped = sum(sum(s["disconnects"].values()) for s in after) - sum(
        sum(s["disconnects"].values()) for s in before
    )
    heartbeat = max(s["server_heartbeat"] for s in after)
    figures: dict[str, Any] = {
        "open_after_idle": open_now,
        "dropped_during_idle": dropped,
        "heartbeat_s": heartbeat,
        "client_ping_s": args.client_ping,
        "idle_seconds": args.idle_seconds,
        "loadgen_cpu_pct": lg["cpu_peak_pct"],
        "loadgen_saturated": any(
            s.cpu_peak_pct > SATURATED_PCT for s in loadgen.stats.values()
        ),  # per process: one core each
    }
    if gateway_pids:
        figures |= {
            "heartbeat_cpu_pct": gw["cpu_avg_pct"],
            "heartbeat_cpu_peak_pct": gw["cpu_peak_pct"],
            "heartbeat_cpu_us_per_conn_s": round(
                1e6 * gw["cpu_seconds"] / args.idle_seconds / max(1, open_now), 3
            ),
        }
    if backend_pids:
        figures["backend_idle_cpu_pct"] = be["cpu_avg_pct"]
    return figures
