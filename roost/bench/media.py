"""media: file upload/download throughput, and 1:1 chat latency while large uploads run.

Throughput: for each of ``--sizes`` (MiB), a file of random bytes is
encrypted as an attachment (its own figure: the client's CPU), uploaded
through the blob transport (``upload_blob``: slot, parts, complete) and
downloaded back (``download_blob``), ``--repeat`` times; MiB/s of the blob
bytes, median of the repeats. The blobs go to the server's media store: its
data dir (default) or S3 (``--s3 s3://bucket?endpoint=...``, credentials
from ROOST_S3_ACCESS_KEY / ROOST_S3_SECRET_KEY, as ``roost serve --media``).

Chat latency: ``--chat-pairs`` pairs exchange messages at ``--chat-rate``
msg/s for ``--chat-seconds`` (the one-to-one machinery: worker processes,
send → shown latency), once alone and once while ``--uploaders`` clients
upload ``--upload-size`` MiB files back to back. Media never takes the chat
path, so p99 should stay within noise; the report gives both and their ratio.

The uploading clients run in a process of their own (``roost.bench.media_uploader``).
``--upload-priority idle`` runs it, and with ``--s3 seaweed`` SeaweedFS too,
under SCHED_IDLE (``nice``: nice 19): the upload side then takes only the CPU
that the gateway and the chat load generator leave, as when phones and the
object store are other machines, so that a slower chat shows the gateway
disturbed, not a crowded machine. The report gives the policy each of them
really ran at (read back from /proc) and the gateway's CPU time in both chat
phases: ``server_cpu_ms_per_upload_mib`` is its extra CPU per MiB uploaded.
Throughput rows give the gateway's CPU time per MiB moved (all its threads,
and its event loop alone): with S3 the bytes never reach it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

from roost.bench import priority
from roost.bench.one_to_one import assign_urls, run_step
from roost.bench.pool import WorkerPool, split
from roost.bench.stats import cpu_seconds, thread_cpu_seconds
from roost.bench.target import Target, make_target
from roost.client import Client
from roost.client import attachments as att
from roost.devcluster.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedServer

MIB = 1024 * 1024
T = TypeVar("T")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="1,10,100", help="file sizes in MiB (comma-separated)")
    parser.add_argument("--repeat", type=int, default=3, help="uploads and downloads per size")
    parser.add_argument(
        "--s3",
        default=None,
        metavar="URL",
        help="media on S3: s3://bucket?endpoint=http://...&region=... (credentials from ROOST_S3_ACCESS_KEY"
        " / ROOST_S3_SECRET_KEY), or 'seaweed': a throwaway SeaweedFS started for the run",
    )
    parser.add_argument("--chat-pairs", type=int, default=20)
    parser.add_argument("--chat-rate", type=float, default=500.0, help="msg/s, all pairs together")
    parser.add_argument("--chat-seconds", type=float, default=10.0)
    parser.add_argument("--uploaders", type=int, default=2, help="clients uploading during the chat phase")
    parser.add_argument("--upload-size", type=float, default=100.0, help="MiB per upload in the chat phase")
    parser.add_argument("--skip-chat", action="store_true", help="throughput only")
    parser.add_argument(
        "--upload-priority",
        choices=priority.PRIORITIES,
        default="normal",
        help="CPU priority of the chat phase's uploading clients and of --s3 seaweed: idle (SCHED_IDLE: "
        "only CPU nobody else wants, as if on other machines) or nice (nice 19)",
    )


def parse_sizes(text: str) -> list[float]:
    sizes = [float(s) for s in text.split(",") if s.strip()]
    if not sizes or any(s <= 0 for s in sizes):
        raise ValueError("--sizes: positive MiB values, e.g. 1,10,100")
    return sizes


# A load generator is not a phone: the per-user upload rate, quota and size
# limits must not be what is measured (a 100 MiB file is a blob of 100 MiB + 64 bytes).
MEDIA_SERVER_FLAGS = [
    *("--media-uploads-per-minute", "0", "--media-quota", "0"),
    *("--media-max-file", "4GiB", "--media-max-video", "4GiB"),
]


def run(args: argparse.Namespace) -> dict[str, Any]:
    weed: SeaweedServer | None = None
    media_flags = list(MEDIA_SERVER_FLAGS)
    if args.s3 == "seaweed":
        weed = SeaweedServer(prefix=priority.wrap(args.upload_priority))
        weed.start()
        media_flags += [
            "--media",
            weed.media_url,
            "--s3-access-key",
            ACCESS_KEY,
            "--s3-secret-key",
            SECRET_KEY,
        ]
    elif args.s3:
        media_flags += ["--media", args.s3]
    args.server_arg = [*(args.server_arg or []), *media_flags]
    target = make_target(args)
    work = Path(tempfile.mkdtemp(prefix="roost-bench-media-"))
    try:
        target.start()
        return asyncio.run(_run(target, args, work, weed))
    finally:
        target.stop()
        shutil.rmtree(work, ignore_errors=True)
        if weed is not None:
            weed.destroy()


async def _run(
    target: Target, args: argparse.Namespace, work: Path, weed: SeaweedServer | None = None
) -> dict[str, Any]:
    tag = target.user_tag
    uploaders = [f"{tag}up{i}" for i in range(max(1, args.uploaders))]
    tokens = await target.add_users([*uploaders, f"{tag}down"])
    results: dict[str, Any] = {
        "target": target.describe(),
        "backend": "s3" if args.s3 else "local",
        "throughput": await throughput(target, tokens[uploaders[0]], tokens[f"{tag}down"], args, work),
    }
    if not args.skip_chat:
        weed_pid = weed.process.pid if weed is not None and weed.process is not None else None
        results["chat"] = await chat_latency(target, [tokens[u] for u in uploaders], args, work, weed_pid)
    return results


def random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 4 * MIB))
            f.write(chunk)
            left -= len(chunk)
    return path


async def _client(target: Target, token: str, state: Path) -> Client:
    client = Client(target.urls[0], token, state_path=state, serve_local=False)
    await client.connect()
    return client


async def throughput(
    target: Target, up_token: str, down_token: str, args: argparse.Namespace, work: Path
) -> list[dict[str, Any]]:
    up = await _client(target, up_token, work / "up.state")
    down = await _client(target, down_token, work / "down.state")
    rows: list[dict[str, Any]] = []
    try:
        for mib in parse_sizes(args.sizes):
            rows.append(await _one_size(target, up, down, mib, max(1, args.repeat), work))
            row = rows[-1]
            print(
                f"[media {row['size_mib']:g} MiB] encrypt {row['encrypt_mib_s']:.0f} MiB/s  "
                f"upload {row['upload_mib_s']:.1f} MiB/s  download {row['download_mib_s']:.1f} MiB/s  "
                f"gateway CPU ms/MiB up {row['upload_server_ms_per_mib']} "
                f"down {row['download_server_ms_per_mib']}",
                flush=True,
            )
    finally:
        await asyncio.gather(up.close(), down.close())
    return rows


class ServerCpu:
    """CPU seconds the gateway processes used: all threads, and their main thread (the event loop)."""

    def __init__(self, target: Target) -> None:
        self.pids = target.server_pids()
        self.total = 0.0
        self.loop = 0.0

    @staticmethod
    def _now(pids: list[int]) -> tuple[float, float]:
        total = loop = 0.0
        for pid in pids:
            try:
                total += cpu_seconds(pid)
            except (OSError, ValueError, IndexError):
                continue
            loop += thread_cpu_seconds(pid).get(pid, 0.0)
        return total, loop

    async def measure(self, work: Awaitable[T]) -> T:
        """Await ``work``, adding the gateways' CPU time meanwhile; its result."""
        total, loop = self._now(self.pids)
        try:
            return await work
        finally:
            total2, loop2 = self._now(self.pids)
            self.total += total2 - total
            self.loop += loop2 - loop


def _ms_per_mib(seconds: float, mib: float) -> float:
    return round(1000.0 * seconds / mib, 2) if mib > 0 else 0.0


async def _one_size(
    target: Target, up: Client, down: Client, mib: float, repeat: int, work: Path
) -> dict[str, Any]:
    size = int(mib * MIB)
    plain = random_file(work / "plain.bin", size)
    blob_path = work / "blob.enc"
    t0 = time.perf_counter()
    encrypted = await asyncio.to_thread(att.encrypt_file, plain, blob_path)
    encrypt_s = time.perf_counter() - t0
    uploads: list[float] = []
    downloads: list[float] = []
    up_cpu, down_cpu = ServerCpu(target), ServerCpu(target)
    for i in range(repeat):
        t0 = time.perf_counter()
        blob = await up_cpu.measure(up.upload_blob(blob_path, kind="file"))
        uploads.append(time.perf_counter() - t0)
        dest = work / f"down{i}.enc"
        t0 = time.perf_counter()
        await down_cpu.measure(down.download_blob(blob, dest))
        downloads.append(time.perf_counter() - t0)
        if dest.stat().st_size != encrypted.size:
            raise RuntimeError(f"downloaded {dest.stat().st_size} bytes of {encrypted.size}")
        dest.unlink()
    plain.unlink()
    blob_path.unlink()
    blob_mib = encrypted.size / MIB
    return {
        "size_mib": mib,
        "repeat": repeat,
        "encrypt_mib_s": round(mib / encrypt_s, 1),
        "upload_mib_s": round(blob_mib / statistics.median(uploads), 1),
        "download_mib_s": round(blob_mib / statistics.median(downloads), 1),
        "upload_s": [round(s, 3) for s in uploads],
        "download_s": [round(s, 3) for s in downloads],
        # the gateway's CPU time (not wall) per MiB of blob moved: all threads, and the event loop
        "upload_server_ms_per_mib": _ms_per_mib(up_cpu.total, blob_mib * repeat),
        "upload_loop_ms_per_mib": _ms_per_mib(up_cpu.loop, blob_mib * repeat),
        "download_server_ms_per_mib": _ms_per_mib(down_cpu.total, blob_mib * repeat),
        "download_loop_ms_per_mib": _ms_per_mib(down_cpu.loop, blob_mib * repeat),
    }


async def chat_latency(
    target: Target,
    uploader_tokens: list[str],
    args: argparse.Namespace,
    work: Path,
    weed_pid: int | None = None,
) -> dict[str, Any]:
    tag = target.user_tag
    pairs = [(f"{tag}c{i}a", f"{tag}c{i}b") for i in range(args.chat_pairs)]
    names = [n for pair in pairs for n in pair]
    tokens = await target.add_users(names)
    where = assign_urls(names, target.urls)
    step_args = argparse.Namespace(step_seconds=args.chat_seconds, drain_timeout=10.0, body_size=64)
    big = random_file(work / "big.bin", int(args.upload_size * MIB))
    blob_path = work / "big.enc"
    await asyncio.to_thread(att.encrypt_file, big, blob_path)
    big.unlink()
    phases: dict[str, tuple[dict[str, Any], float, float]] = {}  # phase -> (step, server CPU s, wall s)
    async with WorkerPool(
        1, module="roost.bench.media_uploader", prefix=priority.wrap(args.upload_priority)
    ) as uploaders:
        connected = await uploaders.call(
            0, "connect", url=target.urls[0], tokens=uploader_tokens, state_dir=str(work)
        )
        async with WorkerPool(min(args.workers, len(pairs))) as pool:
            shares = split(pairs, pool.count)
            await pool.all(
                "connect", [{"users": [[n, tokens[n], where[n]] for p in s for n in p]} for s in shares]
            )
            phases["alone"] = await _phase(
                target, run_step(target, pool, shares, args.chat_rate, 0, step_args)
            )
            await uploaders.call(0, "start", blob=str(blob_path))
            try:
                phases["with_uploads"] = await _phase(
                    target, run_step(target, pool, shares, args.chat_rate, 1, step_args)
                )
            finally:
                # read while the upload side is still busy (a thread of each is still running)
                ran_at: dict[str, priority.Observed] = {"uploaders": priority.observed(connected["pid"])}
                if weed_pid is not None:
                    ran_at["seaweed"] = priority.observed(weed_pid)
                done = await uploaders.call(0, "stop")
    uploads_done = sum(done["uploads"])
    uploaded_mib = uploads_done * os.path.getsize(blob_path) / MIB
    upload_seconds = max(done["seconds"], default=0.0)
    upload_mib_s = uploaded_mib / upload_seconds if upload_seconds else 0.0
    out: dict[str, Any] = {
        "rate": args.chat_rate,
        "pairs": args.chat_pairs,
        "uploaders": connected["clients"],
        "upload_priority": args.upload_priority,
        "upload_ran_at": ran_at,
    }
    for name, (step, cpu, wall) in phases.items():
        out[name] = _latency(step) | {"server_cpu_s": round(cpu, 3), "wall_s": round(wall, 3)}
    out["uploads_done"] = uploads_done
    out["upload_mib_s_during_chat"] = round(upload_mib_s, 1)
    # the gateway's own extra CPU while uploads run (cores: 1.0 = one core busy), per MiB/s uploaded
    (_, cpu_a, wall_a), (_, cpu_b, wall_b) = phases["alone"], phases["with_uploads"]
    extra = cpu_b / wall_b - cpu_a / wall_a
    out["server_cpu_extra_pct"] = round(100.0 * extra, 1)
    out["server_cpu_ms_per_upload_mib"] = round(1000.0 * extra / upload_mib_s, 3) if upload_mib_s else None
    a, b = out["alone"]["p99_ms"], out["with_uploads"]["p99_ms"]
    out["p99_ratio"] = round(b / a, 2) if a else None
    policies = "/".join(ran_at["uploaders"]["policies"])
    print(
        f"[media chat] {args.chat_rate:g} msg/s  alone p50 {out['alone']['p50_ms']:.1f} p99 {a:.1f} ms  "
        f"with {out['uploaders']} uploads ({policies}) p50 {out['with_uploads']['p50_ms']:.1f} "
        f"p99 {b:.1f} ms  ({uploads_done} uploads, {out['upload_mib_s_during_chat']} MiB/s; gateway CPU "
        f"+{out['server_cpu_extra_pct']}% of a core, {out['server_cpu_ms_per_upload_mib']} ms per MiB)",
        flush=True,
    )
    return out


async def _phase(target: Target, step: Awaitable[dict[str, Any]]) -> tuple[dict[str, Any], float, float]:
    """(the step's figures, the gateways' CPU seconds during it, its wall seconds)."""
    cpu = ServerCpu(target)
    t0 = time.monotonic()
    result = await cpu.measure(step)
    return result, cpu.total, time.monotonic() - t0


def _latency(step: dict[str, Any]) -> dict[str, Any]:
    keys = ("rate_achieved", "p50_ms", "p99_ms", "max_ms", "missing", "errors", "server_cpu_pct")
    return {k: step[k] for k in keys} | {"loadgen_saturated": step.get("loadgen_saturated", False)}
