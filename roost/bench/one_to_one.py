"""one-to-one: P connected pairs message each other at stepped aggregate rates.

Each step sends at a fixed aggregate rate (open loop: a message is sent when
it is due, whatever came back) for ``--step-seconds``, then waits up to
``--drain-timeout`` for every message, ✓ and ✓✓. Steps go up until p99
passes ``--max-p99-ms`` or a message errs or goes missing. Per step:
offered and achieved rate, send → shown latency p50/p99/p99.9/max, ✓ (ack)
and ✓✓ (receipt) latency, server and load-generator CPU.

A step is *sustained* when achieved ≥ 95% of offered, p99 ≤ 50 ms and
nothing erred or went missing; ``max_sustained_rate`` is the achieved rate of
the highest sustained step. ``--with-baseline`` first runs the same steps
with the same clients against the bare relay (``roost.bench.relay``) and
reports ``baseline_ratio`` = Roost's max sustained rate / the relay's.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

from roost.bench.pool import WorkerPool, loadgen_figures, split
from roost.bench.stats import ProcSampler, cdf_points, latency_summary
from roost.bench.target import Target, make_target

SUSTAINED_P99_MS = 50.0
SUSTAINED_SHARE = 0.95


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_step_arguments(parser)
    parser.add_argument(
        "--with-baseline", action="store_true", help="run the bare relay first, same clients and steps"
    )


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared with ``baseline``: the same steps and clients."""
    parser.add_argument("--pairs", type=int, default=100, help="connected pairs (2 connections each)")
    parser.add_argument(
        "--rates", default="1000,2000,5000,10000,15000,20000,30000", help="msg/s per step, ascending"
    )
    parser.add_argument("--step-seconds", type=float, default=10.0)
    parser.add_argument("--drain-timeout", type=float, default=10.0, help="wait for stragglers after a step")
    parser.add_argument("--body-size", type=int, default=64, help="message body bytes")
    parser.add_argument("--max-p99-ms", type=float, default=500.0, help="stop stepping past this p99")


def parse_rates(text: str) -> list[float]:
    return [float(r) for r in text.split(",") if r.strip()]


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if args.with_baseline:
        from roost.bench.relay import RelayTarget

        results["baseline"] = run_steps(RelayTarget(), args)
    results.update(run_steps(make_target(args), args))
    if args.with_baseline:
        base = results["baseline"]["max_sustained_rate"]
        results["baseline_ratio"] = round(results["max_sustained_rate"] / base, 3) if base else None
        results.update(cpu_ratio(results["steps"], results["baseline"]["steps"]))
    return results


def cpu_ratio(roost: list[dict[str, Any]], relay: list[dict[str, Any]]) -> dict[str, Any]:
    """Relay CPU per message ÷ Roost's, at the highest rate both kept up with.

    Less sensitive than rates to a shared, busy machine: CPU time is only
    counted while a process runs.
    """
    relay_at = {
        s["rate_offered"]: s for s in relay if s["rate_achieved"] >= SUSTAINED_SHARE * s["rate_offered"]
    }
    both = [
        (s["rate_offered"], relay_at[s["rate_offered"]]["server_cpu_us_per_msg"] / s["server_cpu_us_per_msg"])
        for s in roost
        if s["rate_offered"] in relay_at
        and s["rate_achieved"] >= SUSTAINED_SHARE * s["rate_offered"]
        and s["server_cpu_us_per_msg"] > 0
    ]
    if not both:
        return {"baseline_cpu_ratio": None}
    rate, ratio = both[-1]
    return {"baseline_cpu_ratio": round(ratio, 3), "baseline_cpu_ratio_at": rate}


def run_steps(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """Start ``target``, run every step against it, stop it."""
    target.start()
    try:
        return asyncio.run(_run_steps(target, args))
    finally:
        target.stop()


def assign_urls(names: list[str], urls: list[str], seed: int = 1) -> dict[str, str]:
    """Each user on a gateway drawn at random (seeded), as a load balancer would."""
    rng = random.Random(seed)
    return {name: rng.choice(urls) for name in names}


async def _run_steps(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    tag = target.user_tag
    pairs = [(f"{tag}p{i}a", f"{tag}p{i}b") for i in range(args.pairs)]
    names = [n for pair in pairs for n in pair]
    tokens = await target.add_users(names)
    where = assign_urls(names, target.urls)
    async with WorkerPool(min(args.workers, len(pairs))) as pool:
        shares = split(pairs, pool.count)
        connects = await pool.all(
            "connect", [{"users": [[n, tokens[n], where[n]] for p in s for n in p]} for s in shares]
        )
        failed = sum(c["failed"] for c in connects)
        if failed:
            raise RuntimeError(f"{failed} connections failed: {[c['failures'] for c in connects]}")
        steps: list[dict[str, Any]] = []
        for number, rate in enumerate(parse_rates(args.rates)):
            step = await run_step(target, pool, shares, rate, number, args)
            steps.append(step)
            print(_step_line(target.name, step), flush=True)
            if step["p99_ms"] > args.max_p99_ms or step["errors"] or step["missing"]:
                break
    return {"target": target.describe(), "pairs": args.pairs, "steps": steps, **sustained(steps)}


async def run_step(
    target: Target,
    pool: WorkerPool,
    shares: list[list[tuple[str, str]]],
    rate: float,
    number: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    total_pairs = sum(len(s) for s in shares)
    start_at = time.monotonic() + 0.3
    gateways = ProcSampler(target.server_pids()).start()
    backend = ProcSampler(target.backend_pids()).start()
    replies = await pool.all(
        "traffic",
        [
            {
                "pairs": share, "rate": rate * len(share) / total_pairs, "duration": args.step_seconds,
                "start_at": start_at, "drain_timeout": args.drain_timeout, "body_size": args.body_size,
                "step": number,
            }
            for share in shares
        ],
    )  # fmt: skip
    server = gateways.stop()
    server["backend_cpu_pct"] = backend.stop()["cpu_avg_pct"]
    return step_figures(rate, start_at, replies, server)


def step_figures(
    rate: float, start_at: float, replies: list[dict[str, Any]], server: dict[str, float]
) -> dict[str, Any]:
    """One step's report; ``server`` is the gateways' ``ProcSampler`` summary (+ ``backend_cpu_pct``)."""
    sent = sum(r["sent"] for r in replies)
    received = sum(r["received"] for r in replies)
    end = max(max(r["last_msg"] for r in replies), max(r["stop_sending"] for r in replies))
    msg_ms = [us / 1000.0 for r in replies for us in r["msg_us"]]
    ack_ms = [us / 1000.0 for r in replies for us in r["ack_us"]]
    receipt_ms = [us / 1000.0 for r in replies for us in r["receipt_us"]]
    return {
        "rate_offered": rate,
        "rate_achieved": round(received / max(end - start_at, 1e-9), 1),
        "sent": sent,
        "received": received,
        "missing": sent - received,
        "duplicates": sum(r["duplicates"] for r in replies),
        "acked": sum(r["acked"] for r in replies),
        "receipts": sum(r["receipts"] for r in replies),
        "errors": sum(r["errors"] for r in replies),
        **latency_summary(msg_ms),
        **latency_summary(ack_ms, "ack_"),
        **latency_summary(receipt_ms, "receipt_"),
        # how late the load generator sent against its schedule (should stay ~2 ms)
        "send_lag_p99_ms": latency_summary([us / 1000.0 for r in replies for us in r["lag_us"]])["p99_ms"],
        "server_cpu_pct": server["cpu_avg_pct"],  # the gateway processes
        "backend_cpu_pct": server.get("backend_cpu_pct", 0.0),  # PostgreSQL + Redis in cluster mode
        # the gateways' event loops vs their other threads (SQLite writer and readers)
        "server_loop_cpu_pct": server["main_thread_cpu_pct"],
        "server_threads_cpu_pct": server["other_threads_cpu_pct"],
        # CPU time per delivered message: comparable across runs on a noisy machine
        "server_cpu_us_per_msg": round(1e6 * server["cpu_seconds"] / received, 1) if received else 0.0,
        "server_rss_peak_kib": server["rss_peak_kib"],
        "machine_busy_pct": server["machine_busy_pct"],
        **loadgen_figures(replies),
        "cdf": cdf_points(msg_ms),
    }


def is_sustained(step: dict[str, Any]) -> bool:
    return (
        step["rate_achieved"] >= SUSTAINED_SHARE * step["rate_offered"]
        and step["p99_ms"] <= SUSTAINED_P99_MS
        and not step["errors"]
        and not step["missing"]
    )


def sustained(steps: list[dict[str, Any]]) -> dict[str, Any]:
    good = [s for s in steps if is_sustained(s)]
    best = max(good, key=lambda s: s["rate_offered"], default=None)
    return {
        "max_sustained_rate": best["rate_achieved"] if best else 0.0,
        "max_sustained_offered": best["rate_offered"] if best else 0.0,
        "max_rate_achieved": max((s["rate_achieved"] for s in steps), default=0.0),
    }


def _step_line(kind: str, step: dict[str, Any]) -> str:
    flag = " LOADGEN SATURATED" if step["loadgen_saturated"] else ""
    return (
        f"[{kind}] offered {step['rate_offered']:,.0f}/s achieved {step['rate_achieved']:,.0f}/s "
        f"p50 {step['p50_ms']:.1f} p99 {step['p99_ms']:.1f} max {step['max_ms']:.1f} ms  "
        f"✓ p99 {step['ack_p99_ms']:.1f}  ✓✓ p99 {step['receipt_p99_ms']:.1f}  "
        f"missing {step['missing']} errors {step['errors']}  "
        f"server {step['server_cpu_pct']:.0f}% loadgen {step['loadgen_cpu_pct']:.0f}%{flag}"
    )
