"""Server CPU per authenticated login.

``python -m roost.bench.login_cost URL STORE PID[,PID...] [-n N] [--concurrency C] [--workers W] [--hold S]``
measures a running server: it creates N fresh users in STORE (the server's data dir, or its PostgreSQL
DSN), then opens N WebSocket connections to URL with the light clients of
``roost.bench.conn_worker`` (upgrade, ``auth``, wait for ``welcome``; at most
C handshakes in flight per worker process, W processes) and keeps them open
until all are in (then ``--hold`` seconds more, e.g. to stop an instruction
counter before the disconnects). It reads the CPU time (utime + stime, all threads) of the
given server processes from ``/proc`` before and after the logins and prints
one JSON line: logins/s, server CPU µs per login, the server's CPU share
during the logins, and the load generator's.

Fresh users have nothing in their inbox and no pending receipts: the figure
is the cost of the login itself (the upgrade, the token check, the
connect-time reads and the registration), as in a reconnect storm where
most devices owe nothing. Pin the server (``taskset -c 0``) and run this on
the other CPU(s).

``taskset -c 1 python -m roost.bench.login_cost --own embedded|cluster [-n N] [--runs R]``
starts its own server first, the gateway pinned to CPU 0: an embedded one
(SQLite), or the bench's cluster (PostgreSQL + Redis + one gateway; the
database and Redis stay on this process's CPUs, and their CPU per login is
reported too). It makes 500 warm-up logins, then R measured runs of N, one
JSON line each, and stops everything. docs/performance.md, "Issue 16: the
login path", has the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import time

from roost.bench.conn_worker import split_evenly, start_workers, stop_workers
from roost.bench.stats import cpu_seconds
from roost.store.accounts import add_users

_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def _split(pids: list[int]) -> dict[str, float]:
    """CPU seconds of the servers' event-loop threads, their other threads, and
    the system time of all of them (``/proc/PID/task/TID/stat``)."""
    out = {"loop": 0.0, "threads": 0.0, "system": 0.0}
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue  # the thread ended
            fields = stat[stat.rindex(b")") + 2 :].split()
            user, system = int(fields[11]) / _TICKS, int(fields[12]) / _TICKS
            out["loop" if int(tid) == pid else "threads"] += user + system
            out["system"] += system
    return out


async def run(
    url: str, store: str, pids: list[int], n: int, concurrency: int, processes: int, hold: float = 0.0
) -> dict[str, object]:
    tag = secrets.token_hex(3)
    users = [f"login{tag}x{i:06d}" for i in range(n)]
    tokens = await add_users(store, users)
    workers = await start_workers(processes)
    try:
        parts = split_evenly([[u, tokens[u], 0] for u in users], processes)
        policy = {"jitter": True, "base": 0.25, "cap": 8.0, "reconnect": False}
        split0 = _split(pids)
        cpu0, loadgen0, t0 = _cpu(pids), _cpu([w.pid for w in workers]), time.monotonic()
        replies = await asyncio.gather(
            *(
                w.request("connect", conns=part, url_lists=[[url]], policy=policy, concurrency=concurrency)
                for w, part in zip(workers, parts, strict=True)
            )
        )
        seconds = time.monotonic() - t0
        cpu = _cpu(pids) - cpu0
        loadgen = _cpu([w.pid for w in workers]) - loadgen0
        split = {k: v - split0[k] for k, v in _split(pids).items()}
        if hold > 0:
            print("DONE", flush=True)
            await asyncio.sleep(hold)
    finally:
        await stop_workers(workers)
    connected = sum(r["connected"] for r in replies)
    errors: dict[str, int] = {}
    for reply in replies:
        for kind, count in reply.get("errors", {}).items():
            errors[kind] = errors.get(kind, 0) + count
    return {
        "logins": connected,
        "failed": sum(r["failed"] for r in replies),
        "errors": errors,
        "seconds": round(seconds, 3),
        "logins_per_s": round(connected / seconds, 1),
        "server_cpu_us_per_login": round(1e6 * cpu / max(1, connected), 1),
        # Of which: the event loop's thread, the other threads (store readers,
        # writer), and kernel time (all threads).
        **{f"{k}_us_per_login": round(1e6 * v / max(1, connected), 1) for k, v in split.items()},
        "server_cpu_pct": round(100 * cpu / seconds, 1),
        "loadgen_cpu_pct": round(100 * loadgen / seconds, 1),
    }


def own_server(kind: str, n: int, runs: int, concurrency: int, workers: int) -> None:
    """Start a pinned server (``embedded`` or ``cluster``; with the bench's
    flags: no rate limit, no admission caps), warm it up, print ``runs`` results."""
    import subprocess

    from roost.bench.target import ClusterTarget, EmbeddedTarget
    from roost.devcluster.embedded import SERVER_CPUS_ENV

    target: EmbeddedTarget | ClusterTarget
    if kind == "embedded":
        os.environ[SERVER_CPUS_ENV] = GATEWAY_CPU
        target = EmbeddedTarget()
    else:
        target = ClusterTarget(1)
    target.start()
    try:
        pids = target.server_pids()
        for pid in pids:  # all threads; the database and Redis keep this process's CPUs
            subprocess.run(["taskset", "-acp", GATEWAY_CPU, str(pid)], check=True, capture_output=True)
        store = str(target.server.data_dir) if isinstance(target, EmbeddedTarget) else target.cluster.dsn
        backend = target.backend_pids()
        asyncio.run(run(target.urls[0], store, pids, 500, concurrency, workers))
        for _ in range(runs):
            before = _cpu(backend)
            result = asyncio.run(run(target.urls[0], store, pids, n, concurrency, workers))
            if backend:
                result["backend_cpu_us_per_login"] = round(1e6 * (_cpu(backend) - before) / max(1, n), 1)
            print(json.dumps(result), flush=True)
    finally:
        target.stop()


GATEWAY_CPU = "0"


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m roost.bench.login_cost", description=__doc__.split("\n")[0]
    )
    parser.add_argument("url", nargs="?")
    parser.add_argument(
        "store", nargs="?", help="the server's data dir or PostgreSQL DSN (users are created there)"
    )
    parser.add_argument("pids", nargs="?", help="server process ids, comma-separated (their CPU is measured)")
    parser.add_argument("--own", choices=("embedded", "cluster"), help="start a pinned server of this kind")
    parser.add_argument("--runs", type=int, default=3, help="with --own: measured runs")
    parser.add_argument("-n", type=int, default=5000, help="logins (fresh users)")
    parser.add_argument("--concurrency", type=int, default=200, help="handshakes in flight per worker")
    parser.add_argument("--workers", type=int, default=1, help="load-generator processes")
    parser.add_argument("--hold", type=float, default=0.0, help="seconds to keep the connections after")
    args = parser.parse_args()
    if args.own:
        own_server(args.own, args.n, args.runs, args.concurrency, args.workers)
        return
    if not (args.url and args.store and args.pids):
        parser.error("URL STORE PIDS, or --own embedded|cluster")
    pids = [int(p) for p in args.pids.split(",")]
    result = asyncio.run(run(args.url, args.store, pids, args.n, args.concurrency, args.workers, args.hold))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
