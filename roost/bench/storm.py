"""reconnect-storm: kill -9 a gateway holding N connections; time until all are back elsewhere and drained.

A cluster (``--cluster 2`` or more). Every client (``roost.bench.conn_worker``)
connects to the victim gateway with a URL list ``[victim, survivors...]``
(the survivors in a different order per client, so they spread), and uses the
SDK's reconnect policy: exponential backoff with full jitter, or, for
contrast, the same backoff without jitter (everyone retries at the same
instant). Right after the ``kill -9``, sender connections on the survivors
send ``--messages`` messages to clients that are reconnecting, so those land
in inboxes. The run ends when every client is connected again and every
acked message has been received (each client counts distinct ``(conv, seq)``
of the run's messages, so the count proves none missing), or at ``--timeout``.

Figures per run: time until all reconnected (and p50/p99 per client), time
until all reconnected *and* drained, lost messages (acked but never
received), errors by kind (failed attempts, error frames, close codes), peak
CPU of the surviving gateways and of PostgreSQL/Redis, the load generator's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import time
from pathlib import Path
from typing import Any

from roost.bench.cli import SATURATED_PCT
from roost.bench.conn_worker import WorkerProcess, split_evenly, start_workers, stop_workers
from roost.bench.idle import MAX_SOCKETS_PER_PROCESS, healthz_connections, merge_counts
from roost.bench.stats import cpu_seconds, percentile
from roost.bench.target import ClusterTarget, Target, make_target
from roost.cli.errors import UsageError

POLL_SECONDS = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connections", type=int, default=15_000, help="connections on the killed gateway")
    parser.add_argument(
        "--messages",
        type=int,
        default=None,
        help="messages sent to reconnecting clients after the kill (default: a third of --connections)",
    )
    parser.add_argument("--senders", type=int, default=10, help="sender connections (on the survivors)")
    parser.add_argument(
        "--jitter", choices=("on", "off", "both"), default="both", help="reconnect with full jitter or not"
    )
    parser.add_argument("--backoff-base", type=float, default=0.25, help="the SDK's default")
    parser.add_argument("--backoff-cap", type=float, default=8.0, help="the SDK's default")
    parser.add_argument("--timeout", type=float, default=90.0, help="give up waiting for convergence after")
    parser.add_argument(
        "--per-process", type=int, default=MAX_SOCKETS_PER_PROCESS, help="sockets per load-generator process"
    )
    parser.add_argument(
        "--connect-concurrency", type=int, default=200, help="handshakes in flight per process (setup)"
    )
    parser.add_argument("--keep-logs", default=None, metavar="DIR", help="copy the gateways' logs here")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if getattr(args, "url", None) or getattr(args, "cluster", 0) < 2:
        raise UsageError("reconnect-storm needs a cluster it owns: --cluster 2 (or more)")
    if args.connections > MAX_SOCKETS_PER_PROCESS:
        raise UsageError(f"reconnect-storm: one gateway holds at most {MAX_SOCKETS_PER_PROCESS} connections")
    target = make_target(args)
    target.start()
    try:
        return asyncio.run(storms(args, target))
    finally:
        if args.keep_logs and isinstance(target, ClusterTarget):
            keep_logs(target, Path(args.keep_logs))
        target.stop()


def keep_logs(target: ClusterTarget, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    for log in target.cluster.root.glob("gw*.log"):
        shutil.copy(log, into / log.name)


async def storms(args: argparse.Namespace, target: Target) -> dict[str, Any]:
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.jitter]
    # Fresh accounts per run: no inbox, route or receipt state carries over from the run before.
    users = [[f"storm{k}x{i:05d}" for i in range(args.connections)] for k in range(len(modes))]
    senders = [[f"stormsender{k}x{i}" for i in range(args.senders)] for k in range(len(modes))]
    tokens = await target.add_users([name for names in users + senders for name in names])
    results: dict[str, Any] = {
        "target": target.describe(),
        "connections": args.connections,
        "gateways": len(target.urls),
    }
    for k, jitter in enumerate(modes):
        if k:
            await asyncio.to_thread(target.restart_gateway, 0)
        figures = await one_storm(args, target, users[k], senders[k], tokens, jitter, tag=f"r{k}.")
        results["jitter" if jitter else "no_jitter"] = figures
    headline = results.get("jitter") or results["no_jitter"]
    for key in ("reconnect_all_s", "drained_all_s", "lost", "errors_total", "peak_server_cpu_pct"):
        results[key] = headline[key]
    results["loadgen_saturated"] = any(
        results[m]["loadgen_saturated"] for m in ("jitter", "no_jitter") if m in results
    )
    return results


def recipients_plan(n: int, messages: int) -> dict[int, int]:
    """Connection index -> messages for it: spread evenly, at most one more to some than to others."""
    if messages <= 0 or n <= 0:
        return {}
    if messages <= n:
        step = n / messages
        return {int(i * step): 1 for i in range(messages)}
    per, extra = divmod(messages, n)
    return {i: per + (1 if i < extra else 0) for i in range(n)}


class CpuTimeline:
    """Total CPU% (100 = one core) of a set of processes, sampled every ``interval`` s."""

    def __init__(self, pids: list[int], interval: float = 0.25) -> None:
        self.pids = pids
        self.interval = interval
        self.points: list[tuple[float, float]] = []  # (monotonic time, CPU% since the previous sample)
        self.cpu_seconds = 0.0  # used between start and the last sample
        self._task: asyncio.Task[None] | None = None
        self._first_cpu = self._last_cpu = self._last_t = 0.0
        self._window = (0.0, 0.0)  # (time, CPU seconds) where the last point's window began

    def _total(self) -> float:
        total = 0.0
        for pid in self.pids:
            try:
                total += cpu_seconds(pid)
            except (OSError, ValueError, IndexError):
                continue  # exited: it adds nothing any more
        return total

    def _sample(self) -> None:
        now, cpu = time.monotonic(), self._total()
        if self.points and now - self._last_t < self.interval / 2:
            # Too short a window to rate on its own (CPU time ticks in 10 ms): widen the last one.
            self.points.pop()
            self._last_t, self._last_cpu = self._window
        self._window = (self._last_t, self._last_cpu)
        # A process that exited drops out of the total: never count that as negative use.
        self.points.append((now, max(0.0, 100.0 * (cpu - self._last_cpu) / max(1e-9, now - self._last_t))))
        self.cpu_seconds = max(self.cpu_seconds, cpu - self._first_cpu)
        self._last_t, self._last_cpu = now, cpu

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self._sample()

    def start(self) -> CpuTimeline:
        self._last_t, self._last_cpu = time.monotonic(), self._total()
        self._first_cpu = self._last_cpu
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return self

    def stop(self) -> float:
        """Peak CPU% seen, including the stretch since the last periodic sample.

        A storm shorter than one interval would otherwise report no CPU at all.
        """
        if self._task is not None:
            self._task.cancel()
            self._task = None
            self._sample()
        return round(max((p for _, p in self.points), default=0.0), 1)


async def connect_all(
    workers: list[WorkerProcess],
    conns: list[list[Any]],
    url_lists: list[list[str]],
    policy: dict[str, Any],
    args: argparse.Namespace,
) -> list[list[list[Any]]]:
    """Each worker connects its contiguous share; returns the shares (worker-local index order)."""
    parts = split_evenly(conns, len(workers))
    replies = await asyncio.gather(
        *(
            w.request(
                "connect",
                conns=part,
                url_lists=url_lists,
                policy=policy,
                ping_interval=20.0,
                concurrency=args.connect_concurrency,
            )
            for w, part in zip(workers, parts, strict=True)
        )
    )
    failed = sum(r["failed"] for r in replies)
    if failed:
        raise RuntimeError(f"reconnect-storm: {failed} connections could not be set up: {replies}")
    return parts


async def one_storm(
    args: argparse.Namespace,
    target: Target,
    users: list[str],
    senders: list[str],
    tokens: dict[str, str],
    jitter: bool,
    tag: str,
) -> dict[str, Any]:
    victim, survivors = target.urls[0], target.urls[1:]
    url_lists = [[victim, *survivors[r:], *survivors[:r]] for r in range(len(survivors))]
    conns = [[u, tokens[u], i % len(url_lists)] for i, u in enumerate(users)]
    policy = {"jitter": jitter, "base": args.backoff_base, "cap": args.backoff_cap, "reconnect": True}
    processes = max(args.workers, math.ceil(len(users) / args.per_process))
    workers = await start_workers(processes + 1)
    clients, sender = workers[:-1], workers[-1]
    try:
        await connect_all(clients, conns, url_lists, policy, args)
        sender_lists = [[*survivors[r:], *survivors[:r]] for r in range(len(survivors))]
        await connect_all(
            [sender],
            [[s, tokens[s], i % len(sender_lists)] for i, s in enumerate(senders)],
            sender_lists,
            policy,
            args,
        )
        held = await asyncio.to_thread(healthz_connections, victim)
        return await kill_and_measure(args, target, clients, sender, users, senders, held, tag) | {
            "jitter": jitter,
            "held_by_victim": held,
        }
    finally:
        await stop_workers(workers)


async def kill_and_measure(
    args: argparse.Namespace,
    target: Target,
    clients: list[WorkerProcess],
    sender: WorkerProcess,
    users: list[str],
    senders: list[str],
    held: int,
    tag: str,
) -> dict[str, Any]:
    messages = args.messages if args.messages is not None else len(users) // 3
    plan = recipients_plan(len(users), messages)
    shares = split_evenly(range(len(users)), len(clients))
    for worker, share in zip(clients, shares, strict=True):
        first = share[0] if share else 0
        expect = {str(i - first): plan[i] for i in share if i in plan}
        await worker.request("arm", tag=tag, expect=expect)
    send_plan = [[j % len(senders), users[i], count] for j, (i, count) in enumerate(plan.items())]
    server = CpuTimeline(target.server_pids()[1:]).start()
    backend = CpuTimeline(target.backend_pids()).start()
    loadgen = [CpuTimeline([w.pid]).start() for w in [*clients, sender]]

    t_kill = time.monotonic()
    await asyncio.to_thread(target.kill_gateway, 0)
    send = asyncio.ensure_future(sender.request("send", plan=send_plan, tag=tag, timeout=args.timeout))
    timeline, converged = await wait_converged(clients, len(users), held, send, t_kill, args.timeout)
    sent = await send
    peaks = {
        "server": server.stop(),
        "server_cpu_s": server.cpu_seconds,
        "backend": backend.stop(),
        "backend_cpu_s": backend.cpu_seconds,
        "loadgen": [t.stop() for t in loadgen],
    }
    reports = await asyncio.gather(*(w.request("report") for w in clients))
    return summarize(reports, shares, users, plan, sent, t_kill, peaks, timeline, converged, held)


async def wait_converged(
    clients: list[WorkerProcess], n: int, held: int, send: asyncio.Future[Any], t_kill: float, timeout: float
) -> tuple[list[list[float]], bool]:
    """Poll until every client is back and nothing is missing (or timeout); returns the timeline.

    Back: each of the ``held`` connections the victim had was lost, each lost one was
    reconnected, and all ``n`` clients are connected now."""
    timeline: list[list[float]] = []
    while True:
        await asyncio.sleep(POLL_SECONDS)
        statuses = await asyncio.gather(*(w.request("status") for w in clients))
        now = time.monotonic() - t_kill
        reconnected = sum(s["reconnected"] for s in statuses)
        lost = sum(s["lost"] for s in statuses)
        connected = sum(s["open"] for s in statuses)
        missing = sum(s["missing"] for s in statuses)
        timeline.append([round(now, 2), reconnected, missing])
        if send.done() and lost >= held and reconnected >= lost and connected >= n and missing == 0:
            return timeline, True
        if now > timeout:
            return timeline, False


def summarize(
    reports: list[dict[str, Any]],
    shares: list[list[int]],
    users: list[str],
    plan: dict[int, int],
    sent: dict[str, Any],
    t_kill: float,
    peaks: dict[str, Any],
    timeline: list[list[float]],
    converged: bool,
    held: int,
) -> dict[str, Any]:
    reconnect_s: list[float] = []
    done_at: list[float] = []
    lost_connection = 0
    received = missing_back = missing_away = 0
    acked: dict[str, int] = sent["acked"]
    for report, share in zip(reports, shares, strict=True):
        for local, i in enumerate(share):
            back = report["reconnected_at"][local]
            lost_connection += bool(report["lost_at"][local])
            if back:
                reconnect_s.append(back - t_kill)
                done_at.append(back - t_kill)
            got = report["received"][local]
            received += got
            if i in plan:
                # Acked but not received (yet): by clients that are back, and by the others.
                missing = max(0, acked.get(users[i], 0) - got)
                if back:
                    missing_back += missing
                else:
                    missing_away += missing
                if report["last_new_at"][local]:
                    done_at.append(report["last_new_at"][local] - t_kill)
    reconnect_s.sort()
    errors = merge_counts(reports, "errors")
    close_codes = merge_counts(reports, "close_codes")
    unexpected_closes = {c: k for c, k in close_codes.items() if c not in ("1000", "1001")}
    loadgen_peak = max(peaks["loadgen"], default=0.0)
    return {
        "converged": converged,
        "lost_connection": lost_connection,
        "reconnected": len(reconnect_s),
        "not_reconnected": lost_connection - len(reconnect_s),
        "reconnect_all_s": round(reconnect_s[-1], 3) if converged and reconnect_s else None,
        "reconnect_p50_s": round(percentile(reconnect_s, 50), 3),
        "reconnect_p99_s": round(percentile(reconnect_s, 99), 3),
        "drained_all_s": round(max(done_at), 3) if converged and done_at else None,
        "messages_planned": sent["planned"],
        "messages_acked": sent["acked_total"],
        "messages_unacked": sent["unacked"],
        "send_seconds": sent["seconds"],
        "messages_received": received,
        # Converged means every acked message was received: the count proves none lost. Otherwise the
        # run cannot tell lost from not yet delivered; the two counts below say where they were missing.
        "lost": 0 if converged else None,
        "missing_reconnected": missing_back,
        "missing_not_reconnected": missing_away,
        "duplicates_redelivered": sum(r["dups"] for r in reports),
        "gaps": sum(r["gaps"] for r in reports),
        "errors": errors,
        "errors_total": sum(errors.values()) + sum(unexpected_closes.values()),
        "close_codes": close_codes,
        "disconnects": merge_counts(reports, "disconnects"),
        "peak_server_cpu_pct": peaks["server"],
        "peak_backend_cpu_pct": peaks["backend"],
        "server_cpu_s": round(peaks["server_cpu_s"], 2),
        "server_cpu_ms_per_reconnect": round(1000 * peaks["server_cpu_s"] / max(1, len(reconnect_s)), 3),
        "backend_cpu_s": round(peaks["backend_cpu_s"], 2),
        "loadgen_cpu_pct": loadgen_peak,
        "loadgen_saturated": loadgen_peak > SATURATED_PCT,
        "timeline": timeline,
    }
