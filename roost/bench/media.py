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
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from roost.bench.one_to_one import assign_urls, run_step
from roost.bench.pool import WorkerPool, split
from roost.bench.target import Target, make_target
from roost.client import Client
from roost.client import attachments as att
from roost.devcluster.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedServer

MIB = 1024 * 1024


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
        weed = SeaweedServer()
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
        return asyncio.run(_run(target, args, work))
    finally:
        target.stop()
        shutil.rmtree(work, ignore_errors=True)
        if weed is not None:
            weed.destroy()


async def _run(target: Target, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    tag = target.user_tag
    uploaders = [f"{tag}up{i}" for i in range(max(1, args.uploaders))]
    tokens = await target.add_users([*uploaders, f"{tag}down"])
    results: dict[str, Any] = {
        "target": target.describe(),
        "backend": "s3" if args.s3 else "local",
        "throughput": await throughput(target, tokens[uploaders[0]], tokens[f"{tag}down"], args, work),
    }
    if not args.skip_chat:
        results["chat"] = await chat_latency(target, [tokens[u] for u in uploaders], args, work)
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
            rows.append(await _one_size(up, down, mib, max(1, args.repeat), work))
            row = rows[-1]
            print(
                f"[media {row['size_mib']:g} MiB] encrypt {row['encrypt_mib_s']:.0f} MiB/s  "
                f"upload {row['upload_mib_s']:.1f} MiB/s  download {row['download_mib_s']:.1f} MiB/s",
                flush=True,
            )
    finally:
        await asyncio.gather(up.close(), down.close())
    return rows


async def _one_size(up: Client, down: Client, mib: float, repeat: int, work: Path) -> dict[str, Any]:
    size = int(mib * MIB)
    plain = random_file(work / "plain.bin", size)
    blob_path = work / "blob.enc"
    t0 = time.perf_counter()
    encrypted = await asyncio.to_thread(att.encrypt_file, plain, blob_path)
    encrypt_s = time.perf_counter() - t0
    uploads: list[float] = []
    downloads: list[float] = []
    for i in range(repeat):
        t0 = time.perf_counter()
        blob = await up.upload_blob(blob_path, kind="file")
        uploads.append(time.perf_counter() - t0)
        dest = work / f"down{i}.enc"
        t0 = time.perf_counter()
        await down.download_blob(blob, dest)
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
    }


async def chat_latency(
    target: Target, uploader_tokens: list[str], args: argparse.Namespace, work: Path
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
    clients = [await _client(target, t, work / f"upl{i}.state") for i, t in enumerate(uploader_tokens)]
    try:
        async with WorkerPool(min(args.workers, len(pairs))) as pool:
            shares = split(pairs, pool.count)
            await pool.all(
                "connect", [{"users": [[n, tokens[n], where[n]] for p in s for n in p]} for s in shares]
            )
            alone = await run_step(target, pool, shares, args.chat_rate, 0, step_args)
            stop = asyncio.Event()
            loads = [asyncio.create_task(_upload_loop(c, blob_path, stop)) for c in clients]
            try:
                busy = await run_step(target, pool, shares, args.chat_rate, 1, step_args)
            finally:
                stop.set()
                done = await asyncio.gather(*loads)
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    uploaded_mib = sum(n for n, _ in done) * os.path.getsize(blob_path) / MIB
    upload_seconds = max((s for _, s in done), default=0.0)
    out = {
        "rate": args.chat_rate,
        "pairs": args.chat_pairs,
        "uploaders": len(clients),
        "alone": _latency(alone),
        "with_uploads": _latency(busy),
        "uploads_done": sum(n for n, _ in done),
        "upload_mib_s_during_chat": round(uploaded_mib / upload_seconds, 1) if upload_seconds else 0.0,
    }
    a, b = out["alone"]["p99_ms"], out["with_uploads"]["p99_ms"]
    out["p99_ratio"] = round(b / a, 2) if a else None
    print(
        f"[media chat] {args.chat_rate:g} msg/s  alone p50 {out['alone']['p50_ms']:.1f} p99 {a:.1f} ms  "
        f"with {len(clients)} uploads p50 {out['with_uploads']['p50_ms']:.1f} p99 {b:.1f} ms  "
        f"({out['uploads_done']} uploads, {out['upload_mib_s_during_chat']} MiB/s)",
        flush=True,
    )
    return out


def _latency(step: dict[str, Any]) -> dict[str, Any]:
    keys = ("rate_achieved", "p50_ms", "p99_ms", "max_ms", "missing", "errors", "server_cpu_pct")
    return {k: step[k] for k in keys} | {"loadgen_saturated": step.get("loadgen_saturated", False)}


async def _upload_loop(client: Client, blob_path: Path, stop: asyncio.Event) -> tuple[int, float]:
    """Upload ``blob_path`` again and again until ``stop``; (uploads finished, seconds)."""
    t0 = time.perf_counter()
    count = 0
    while not stop.is_set():
        await client.upload_blob(blob_path, kind="video")
        count += 1
    return count, time.perf_counter() - t0
