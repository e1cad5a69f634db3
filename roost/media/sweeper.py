"""Deletes uploads never completed (after ``pending_hours``) and complete blobs
past their retention (``retention_days``).

A blob whose download URL handed out is still valid (``fetch_until``) is not
due; the local store also refuses to delete a blob while a download of it
runs (it answers False, and the next sweep tries again). The metadata row goes
only after the bytes: a crash between leaves a row whose bytes are gone, which
the next sweep deletes again (deleting is idempotent), never bytes no row names.
A sweep first claims a row (state ``deleting``, refused while a URL is valid);
from then on ``blob_get`` hands out no URL for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from roost.media.base import BlobStore
from roost.media.config import MediaLimits
from roost.store.blobmeta import DELETING, BlobRecord

log = logging.getLogger("roost.media")

BATCH = 200  # blobs looked at per store read


class Sweeper:
    def __init__(
        self,
        store: Any,  # a Store with the blob metadata methods (SqliteStore, PostgresStore)
        blobs: BlobStore,
        limits: MediaLimits,
        interval: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.limits = limits
        self.interval = interval
        self.clock = clock
        self.deleted = 0  # statistics
        self.deferred = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="roost-media-sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                log.exception("media sweep failed; trying again later")
            await asyncio.sleep(self.interval)

    async def sweep(self, max_rounds: int = 100) -> int:
        """One pass: delete what is due. Returns how many blobs went."""
        now = self.clock()
        now_ms = int(now * 1000)
        pending_before = int((now - self.limits.pending_hours * 3600) * 1000)
        complete_before = int((now - self.limits.retention_days * 86400) * 1000)
        deleted = 0
        skipped: set[str] = set()
        for _ in range(max_rounds):
            due = await self.store.blobs_due(now_ms, pending_before, complete_before, BATCH + len(skipped))
            due = [rec for rec in due if rec.blob not in skipped]
            if not due:
                break
            for rec in due:
                if await self._delete(rec, now_ms):
                    deleted += 1
                else:
                    skipped.add(rec.blob)
        self.deleted += deleted
        if deleted:
            log.info("media sweep deleted %d blobs", deleted)
        return deleted

    async def _delete(self, rec: BlobRecord, now_ms: int) -> bool:
        """Claim, delete the bytes, then the row. False: not now (a download)."""
        before = await self.store.blob_claim(rec.blob, now_ms)
        if before is None:
            return False  # a download URL was handed out meanwhile
        if not await self.blobs.delete(rec):
            # A download of it is running: give the blob back; the next sweep retries.
            if before != DELETING:
                await self.store.blob_unclaim(rec.blob, before)
            self.deferred += 1
            return False
        await self.store.blob_delete(rec.blob)
        return True
