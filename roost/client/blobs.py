"""Blob transport of the SDK: upload a file's bytes in parts, download with resume.

The bytes are taken as they are: encrypting them (and checking the digest of
a download) is the caller's job. Uploads ask the server for a slot
(``blob_new``), then for signed URLs of the parts (``blob_put_urls``), PUT each
part, and finish with ``blob_complete``. An upload cut off (connection, crash)
is resumed by passing its blob id: ``blob_status`` names the parts the store
already holds, with their etags, and only the others are sent again.
Downloads resume a partial destination file with a Range request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from roost.protocol import frames as f

if TYPE_CHECKING:
    from roost.client.client import Client

log = logging.getLogger("roost.client")

Progress = Callable[[int, int], None]
PARALLEL_PARTS = 3  # parts in flight at once
PART_TRIES = 4  # attempts per part (a fresh URL after a refusal)
DOWNLOAD_TRIES = 4
CHUNK = 256 * 1024
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=60)


class BlobTransferError(Exception):
    """An upload or download failed after its retries (HTTP status or connection)."""


def http_base(url: str) -> str:
    """``ws://host:port/v1/ws`` -> ``http://host:port``: where relative media URLs point."""
    parts = urllib.parse.urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return f"{scheme}://{parts.netloc}"


def _absolute(client: Client, url: str) -> str:
    if "://" in url:
        return url
    base = client.connected_url or client.urls[0]
    return urllib.parse.urljoin(http_base(base) + "/", url.lstrip("/"))


def _read_part(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as src:
        src.seek(offset)
        data = src.read(length)
    if len(data) != length:
        raise BlobTransferError(f"{path} changed while uploading: it is shorter than its slot")
    return data


def _plan(size: int, part_size: int) -> list[tuple[int, int, int]]:
    """(part, offset, length) of every part of a ``size``-byte blob."""
    count = max(1, -(-size // part_size))
    return [(p, (p - 1) * part_size, min(part_size, size - (p - 1) * part_size)) for p in range(1, count + 1)]


async def upload_blob(
    client: Client,
    source: Path,
    *,
    kind: str,
    progress: Progress | None = None,
    resume: str | None = None,
    on_slot: Callable[[str], None] | None = None,
) -> str:
    source = Path(source)
    size = source.stat().st_size
    etags: dict[int, str] = {}
    if resume is not None:
        state: f.BlobState = await client._request(f.BlobStatus(blob=resume))
        if state.size != size:
            raise BlobTransferError(f"blob {resume} has {state.size} bytes, {source} has {size}")
        if state.complete:
            if progress is not None:
                progress(size, size)
            return resume
        blob, part_size = resume, state.part_size
        etags = dict(zip(state.parts_done, state.etags, strict=False))
    else:
        slot: f.BlobSlot = await client._request(f.BlobNew(size=size, kind=kind))  # type: ignore[arg-type]
        blob, part_size = slot.blob, slot.part_size
        if on_slot is not None:
            on_slot(blob)  # before any byte moves: a caller that records it can resume after a crash
    plan = _plan(size, part_size)
    todo = [item for item in plan if item[0] not in etags]
    sent = sum(length for part, _, length in plan if part in etags)
    if progress is not None:
        progress(sent, size)

    def advanced(n: int) -> None:
        nonlocal sent
        sent += n
        if progress is not None:
            progress(sent, size)

    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        for start in range(0, len(todo), f.MAX_URLS_PER_FRAME):
            batch = todo[start : start + f.MAX_URLS_PER_FRAME]
            etags.update(await _upload_batch(client, http, blob, source, batch, advanced))
    done: f.BlobState = await client._request(
        f.BlobComplete(blob=blob, parts=[(p, etags[p]) for p, _, _ in plan])
    )
    if not done.complete:
        raise BlobTransferError(f"blob {blob} is not complete")
    return blob


async def _upload_batch(
    client: Client,
    http: aiohttp.ClientSession,
    blob: str,
    source: Path,
    batch: Sequence[tuple[int, int, int]],
    advanced: Callable[[int], None],
) -> dict[int, str]:
    urls = await _put_urls(client, blob, [p for p, _, _ in batch])
    limit = asyncio.Semaphore(PARALLEL_PARTS)
    etags: dict[int, str] = {}

    async def one(part: int, offset: int, length: int) -> None:
        async with limit:
            data = await asyncio.to_thread(_read_part, source, offset, length)
            for attempt in range(PART_TRIES):
                if attempt:
                    await asyncio.sleep(0.2 * 2**attempt)
                    urls.update(await _put_urls(client, blob, [part]))  # may have expired
                url, headers = urls[part]
                try:
                    async with http.put(url, data=data, headers=headers, ssl=_ssl(client, url)) as resp:
                        await resp.read()
                        if resp.status == 200:
                            etags[part] = resp.headers.get("ETag", "").strip('"')
                            advanced(length)
                            return
                        problem = f"HTTP {resp.status}"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    problem = str(exc) or type(exc).__name__
                log.info("part %d of %s failed (%s); retrying", part, blob, problem)
            raise BlobTransferError(f"part {part} of blob {blob} failed: {problem}")

    tasks = [asyncio.ensure_future(one(*item)) for item in batch]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        # One part failed (or the caller gave up): stop the others, leave no
        # upload running behind the caller's back; a resume finishes the blob.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return etags


async def _put_urls(client: Client, blob: str, parts: list[int]) -> dict[int, tuple[str, dict[str, str]]]:
    answer: f.BlobUrls = await client._request(f.BlobPutUrls(blob=blob, parts=parts))
    return {part: (_absolute(client, url), headers) for part, url, headers in answer.urls}


def _ssl(client: Client, url: str) -> ssl.SSLContext | bool:
    return client.tls if url.startswith("https://") else False


async def download_blob(client: Client, blob: str, dest: Path, *, progress: Progress | None = None) -> None:
    dest = Path(dest)
    info: f.BlobUrl = await client._request(f.BlobGet(blob=blob))
    problem = ""
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT, auto_decompress=False) as http:
        for attempt in range(DOWNLOAD_TRIES):
            if attempt:
                await asyncio.sleep(0.2 * 2**attempt)
                info = await client._request(f.BlobGet(blob=blob))  # the URL may have expired
            try:
                outcome = await _fetch(client, http, info, dest, progress)
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = str(exc) or type(exc).__name__
                continue
            if outcome is None:
                return
            problem = outcome
    raise BlobTransferError(f"download of blob {blob} failed: {problem}")


async def _fetch(
    client: Client,
    http: aiohttp.ClientSession,
    info: f.BlobUrl,
    dest: Path,
    progress: Progress | None,
) -> str | None:
    """One GET, resuming what ``dest`` holds. None when complete, else why not."""
    have = dest.stat().st_size if dest.exists() else 0
    if have > info.size:
        have = 0  # not a prefix of this blob
    if have == info.size and info.size > 0:
        if progress is not None:
            progress(have, info.size)
        return None
    url = _absolute(client, info.url)
    headers = {"Range": f"bytes={have}-"} if have else {}
    async with http.get(url, headers=headers, ssl=_ssl(client, url)) as resp:
        if resp.status == 200:
            have = 0  # the whole blob, from the start
        elif resp.status != 206:
            await resp.read()
            return f"HTTP {resp.status}"
        mode = "r+b" if have and dest.exists() else "wb"
        with open(dest, mode) as out:
            out.seek(have)
            out.truncate()
            async for chunk in resp.content.iter_chunked(CHUNK):
                out.write(chunk)
                have += len(chunk)
                if progress is not None:
                    progress(have, info.size)
            out.flush()
            await asyncio.to_thread(os.fsync, out.fileno())
    if have != info.size:
        return f"got {have} of {info.size} bytes"
    return None
