"""The media frames: upload slots, signed URLs, completion, downloads.

None of this is on the message path: a ``blob_*`` frame costs a store read or
write and a call to the blob store, on its own task, and its answer (or typed
error) carries the frame's ``ref``. The bytes never pass through here.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from roost.core.blobsize import blob_size, human_size
from roost.core.ratelimit import TokenBucket
from roost.media.base import BlobStore
from roost.media.config import MediaConfig, part_size_for
from roost.protocol import frames as f
from roost.protocol.codec import encode
from roost.protocol.errors import ErrorCode, ProtocolError
from roost.service.session import Session
from roost.store.base import StoreUnavailable
from roost.store.blobmeta import COMPLETE, PENDING, BlobRecord

log = logging.getLogger("roost.media")

# Upload-rate buckets of users idle this long are forgotten.
BUCKET_IDLE_SECONDS = 600.0


def _error(code: ErrorCode, message: str, ref: str) -> bytes:
    return encode(f.Error(code=code.value, message=message, ref=ref))


def check_size(frame: f.BlobNew, limit: int) -> None:
    """Refuse a ``blob_new`` over its kind's ``limit`` (file bytes, as users
    read it): the blob may be at most the blob of a file at the limit, and a
    stated ``plain_size`` is checked exactly (one blob size stands for 16
    file sizes). ``too_large`` says the limit in file bytes."""
    most = blob_size(limit)
    human = human_size(limit)
    exact = "" if human.endswith(" bytes") else f" ({limit:,} bytes)"
    stated = f"a {frame.kind} may be {human}{exact} at most"
    if frame.plain_size is not None:
        if blob_size(frame.plain_size) != frame.size:
            raise ProtocolError(
                ErrorCode.INVALID,
                f"size {frame.size:,} is not the blob of a {frame.plain_size:,}-byte file "
                f"({blob_size(frame.plain_size):,})",
                frame.ref,
            )
        if frame.plain_size > limit:
            raise ProtocolError(
                ErrorCode.TOO_LARGE, f"{stated}; this one is {frame.plain_size:,} bytes", frame.ref
            )
    if frame.size > most:
        raise ProtocolError(
            ErrorCode.TOO_LARGE,
            f"{stated}; this blob of {frame.size:,} bytes is over the {most:,} "
            "of an encrypted file at the limit",
            frame.ref,
        )


class MediaService:
    def __init__(
        self,
        store: Any,  # SqliteStore or PostgresStore (the blob_* metadata methods)
        blobs: BlobStore,
        config: MediaConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.config = config
        self.clock = clock
        self.part_size = max(config.part_size, blobs.min_part_size)
        self._uploads: dict[str, TokenBucket] = {}
        # blob -> (lock, requests using it): one blob_complete per blob at a time
        self._completing: dict[str, tuple[asyncio.Lock, int]] = {}
        self._background: set[asyncio.Future[Any]] = set()

    def handlers(self) -> dict[type, Callable[[Session, Any], None]]:
        return {
            f.BlobNew: self._on_new,
            f.BlobPutUrls: self._on_put_urls,
            f.BlobStatus: self._on_status,
            f.BlobComplete: self._on_complete,
            f.BlobGet: self._on_get,
        }

    async def stop(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def _spawn(self, session: Session, ref: str, work: Awaitable[f.Frame]) -> None:
        fut = asyncio.ensure_future(self._answer(session, ref, work))
        self._background.add(fut)
        fut.add_done_callback(self._background.discard)

    async def _answer(self, session: Session, ref: str, work: Awaitable[f.Frame]) -> None:
        try:
            frame = await work
        except ProtocolError as exc:
            session.push_frame(_error(exc.code, exc.message, ref))
        except StoreUnavailable as exc:
            session.push_frame(_error(ErrorCode.UNAVAILABLE, str(exc), ref))
        except Exception:
            log.exception("media request of %s failed", session.user)
            session.push_frame(_error(ErrorCode.UNAVAILABLE, "the blob store failed; try again", ref))
        else:
            session.push_frame(encode(frame))

    def _expiry(self) -> int:
        return int(self.clock()) + self.config.url_ttl

    def _download_expiry(self) -> int:
        """``url_ttl`` from now, rounded up to a step of a quarter of it: everyone
        fetching a blob within one step gets the same URL, so a CDN or an
        nginx cache in front (keyed on the whole URL) serves the repeats."""
        ttl = self.config.url_ttl
        step = max(1, ttl // 4)
        return -(-(int(self.clock()) + ttl) // step) * step

    # -- blob_new ---------------------------------------------------------------

    def _on_new(self, session: Session, frame: f.BlobNew) -> None:
        check_size(frame, self.config.limits.max_bytes(frame.kind))
        if not self._may_upload(session.user):
            raise ProtocolError(ErrorCode.RATE_LIMITED, "too many uploads; try again in a minute", frame.ref)
        self._spawn(session, frame.ref, self._new(session.user, frame))

    def _may_upload(self, user: str) -> bool:
        per_minute = self.config.limits.uploads_per_minute
        if per_minute <= 0:
            return True
        now = time.monotonic()
        if len(self._uploads) > 10_000:
            self._uploads = {u: b for u, b in self._uploads.items() if now - b.updated < BUCKET_IDLE_SECONDS}
        bucket = self._uploads.get(user)
        if bucket is None:
            bucket = self._uploads[user] = TokenBucket(per_minute / 60.0, per_minute, now)
        return bucket.take(now) == 0.0

    async def _new(self, user: str, frame: f.BlobNew) -> f.BlobSlot:
        blob = secrets.token_hex(16)
        part_size = part_size_for(frame.size, self.part_size, f.MAX_BLOB_PARTS)
        now = self.clock()
        upload_id = await self.blobs.create(blob)
        rec = BlobRecord(blob, user, frame.kind, frame.size, part_size, PENDING, int(now * 1000), upload_id)
        try:
            await self.store.blob_create(rec, self.config.limits.quota_bytes)
        except BaseException:
            await self.blobs.delete(rec)
            raise
        expires = int(now + self.config.limits.pending_hours * 3600)
        return f.BlobSlot(ref=frame.ref, blob=blob, part_size=part_size, parts=rec.parts, expires=expires)

    # -- the uploader's frames -------------------------------------------------------

    async def _own(self, user: str, blob: str, ref: str) -> BlobRecord:
        rec: BlobRecord | None = await self.store.blob_get(blob)
        if rec is None or rec.state not in (PENDING, COMPLETE):
            raise ProtocolError(ErrorCode.UNKNOWN_BLOB, f"no blob {blob}", ref)
        if rec.owner != user:
            raise ProtocolError(ErrorCode.NOT_OWNER, "only the uploader may do this", ref)
        return rec

    def _on_put_urls(self, session: Session, frame: f.BlobPutUrls) -> None:
        self._spawn(session, frame.ref, self._put_urls(session.user, frame))

    async def _put_urls(self, user: str, frame: f.BlobPutUrls) -> f.BlobUrls:
        rec = await self._own(user, frame.blob, frame.ref)
        if rec.state != PENDING:
            raise ProtocolError(ErrorCode.INVALID, "the blob is complete already", frame.ref)
        wrong = [p for p in frame.parts if p > rec.parts]
        if wrong:
            raise ProtocolError(
                ErrorCode.INVALID, f"the blob has {rec.parts} parts, not {wrong[0]}", frame.ref
            )
        expires = self._expiry()
        urls = await self.blobs.put_urls(rec, list(dict.fromkeys(frame.parts)), expires)
        return f.BlobUrls(
            ref=frame.ref, blob=rec.blob, urls=[(u.part, u.url, u.headers) for u in urls], expires=expires
        )

    def _on_status(self, session: Session, frame: f.BlobStatus) -> None:
        self._spawn(session, frame.ref, self._status(session.user, frame))

    async def _status(self, user: str, frame: f.BlobStatus) -> f.BlobState:
        rec = await self._own(user, frame.blob, frame.ref)
        complete = rec.state == COMPLETE
        if complete:
            done, etags = list(range(1, rec.parts + 1)), []
        else:
            stored = await self.blobs.parts_done(rec)
            good = sorted(p for p, s in stored.items() if p <= rec.parts and s.size == rec.part_length(p))
            done, etags = good, [stored[p].etag for p in good]
        return f.BlobState(
            ref=frame.ref,
            blob=rec.blob,
            size=rec.size,
            parts_done=done,
            complete=complete,
            part_size=rec.part_size,
            etags=etags,
        )

    def _on_complete(self, session: Session, frame: f.BlobComplete) -> None:
        self._spawn(session, frame.ref, self._complete(session.user, frame))

    async def _complete(self, user: str, frame: f.BlobComplete) -> f.BlobState:
        lock, users = self._completing.get(frame.blob) or (asyncio.Lock(), 0)
        self._completing[frame.blob] = (lock, users + 1)
        try:
            async with lock:  # a repeat waits for the first, then finds the blob complete
                rec = await self._finish(user, frame)
        finally:
            lock, users = self._completing[frame.blob]
            if users > 1:
                self._completing[frame.blob] = (lock, users - 1)
            else:
                del self._completing[frame.blob]
        done = list(range(1, rec.parts + 1))
        return f.BlobState(
            ref=frame.ref,
            blob=rec.blob,
            size=rec.size,
            parts_done=done,
            complete=True,
            part_size=rec.part_size,
        )

    async def _finish(self, user: str, frame: f.BlobComplete) -> BlobRecord:
        rec = await self._own(user, frame.blob, frame.ref)
        if rec.state == PENDING:
            try:
                await self.blobs.complete(rec, [(p, e) for p, e in frame.parts])
            except ProtocolError as exc:
                exc.ref = frame.ref
                raise
            await self.store.blob_complete(rec.blob, int(self.clock() * 1000))
        return rec

    # -- blob_get ---------------------------------------------------------------------

    def _on_get(self, session: Session, frame: f.BlobGet) -> None:
        self._spawn(session, frame.ref, self._get(frame))

    async def _get(self, frame: f.BlobGet) -> f.BlobUrl:
        # Anyone authenticated who knows the id may fetch it: ids are 128
        # random bits, handed out only inside (end-to-end encrypted) messages,
        # and the bytes are ciphertext.
        rec: BlobRecord | None = await self.store.blob_get(frame.blob)
        unknown = ProtocolError(ErrorCode.UNKNOWN_BLOB, f"no complete blob {frame.blob}", frame.ref)
        if rec is None or rec.state != COMPLETE:
            raise unknown
        expires = self._download_expiry()
        # Recorded before the URL leaves: a sweep does not delete the blob while it is valid.
        if not await self.store.blob_fetching(rec.blob, expires * 1000):
            raise unknown
        url = await self.blobs.get_url(rec, expires)
        return f.BlobUrl(ref=frame.ref, blob=rec.blob, url=url, size=rec.size, expires=expires)
