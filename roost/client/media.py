"""File sends and downloads for the SDK (``Client.send_file`` / ``Client.download``).

A file send, durable from the moment ``send_file`` returns:

1. the file is probed (kind, dimensions, duration, thumbnail) and encrypted
   with a fresh key into the state's media directory (``STATE.media/``);
2. an *upload* row records the target, the encrypted file and the reference
   (key, digest, size...) in the client state, committed;
3. the uploader (one task per client, in send order) asks the server for a
   blob slot and commits the blob id before the first byte goes out, uploads
   the parts (``upload_blob``, which resumes from ``blob_status``), and only
   after ``blob_complete`` moves the message into the outbox (sealed end to
   end like any message), replacing the upload row in one transaction;
4. from there it is an ordinary outbox message: sent, resent with the same id
   after a reconnect or restart (the server drops duplicates), ✓ on its ack.

A client killed anywhere in this resumes on the next start on the same
state: before step 2 nothing was promised (the caller got no return); in 3
the blob id is known, so the upload resumes from the parts the server has;
after the move, the outbox sends the message once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import msgspec

from roost.client import attachments as att
from roost.client.events import Message
from roost.client.mediainfo import probe, thumbnail
from roost.client.state import OutboxItem, UploadItem
from roost.protocol import frames as f

if TYPE_CHECKING:
    from roost.client.client import Client

log = logging.getLogger("roost.client.media")

Progress = Callable[[int, int], None]
# Refusals that the same upload would get again: the send fails for good.
FINAL_UPLOAD_ERRORS = {"too_large", "quota_exceeded", "bad_request", "forbidden", "invalid"}
UPLOAD_RETRY_CAP = 8.0  # s between attempts after a transient failure
PROGRESS_SAVE_EVERY = 4 << 20  # bytes between progress commits


def media_dir(state_path: str) -> Path:
    """Where a state file keeps encrypted uploads and partial downloads (``STATE.media``)."""
    return Path(state_path + ".media")


def prepare_upload(
    path: Path, folder: Path, message_id: str, to: str | None, conv: str | None, caption: str | None
) -> UploadItem:
    """Probe and encrypt ``path`` (blocking: run it in a thread); the upload row to commit."""
    info = probe(path)
    thumb = thumbnail(path, info)
    temp = folder / f"{message_id}.enc"
    encrypted = att.encrypt_file(path, temp)
    ref = att.AttachmentRef(
        blob="",
        key=att.b64(encrypted.key),
        digest=att.b64(encrypted.digest),
        size=encrypted.plain_size,
        content_type=info.content_type,
        name=att.safe_file_name(path.name),
        kind=info.kind,
        width=info.width,
        height=info.height,
        duration_ms=info.duration_ms,
        thumbnail=None if thumb is None else att.b64(thumb[0]),
        thumbnail_type=None if thumb is None else thumb[1],
        caption=caption or None,
    )
    return UploadItem(
        message_id,
        to,
        conv,
        str(path),
        str(temp),
        info.kind,
        encrypted.size,
        ref.encode(),
        None,
        0,
        int(time.time() * 1000),
    )


async def new_blob(client: Client, size: int, kind: str, plain_size: int | None = None) -> str:
    """A blob slot of ``size`` bytes from the server (``blob_new``); its id.

    ``plain_size``: the attachment's file size, so that the server checks its
    limit against what the user sees (``too_large`` says it in those terms)."""
    if kind not in att.KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(att.KINDS)}")
    frame = f.BlobNew(size=size, kind=cast(f.BlobKind, kind), plain_size=plain_size)
    slot: f.BlobSlot = await client._request(frame)
    return slot.blob


class Uploader:
    """The client's one upload task: pending file sends, oldest first."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.pending: dict[str, UploadItem] = {u.id: u for u in client.state.uploads()}
        self.progress: dict[str, Progress] = {}
        self._running = False  # between the client's connect() and close()
        self._task: asyncio.Task[None] | None = None
        # An in-memory state gets a temporary folder, made on first use, removed on stop.
        self._temporary: tempfile.TemporaryDirectory[str] | None = None
        self._folder = None if client.state.path == ":memory:" else media_dir(client.state.path)
        self._remove_strays()

    @property
    def folder(self) -> Path:
        """The state's media folder (created when first needed)."""
        if self._folder is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="roost-media-")
            self._folder = Path(self._temporary.name)
        self._folder.mkdir(parents=True, exist_ok=True)
        return self._folder

    def _remove_strays(self) -> None:
        """Encrypted files no upload row names: a client stopped between
        encrypting and committing (the caller never got a return)."""
        if self._folder is None or not self._folder.is_dir():
            return
        keep = {Path(u.temp).name for u in self.pending.values()}
        for p in self._folder.glob("*.enc"):
            if p.name not in keep:
                with contextlib.suppress(OSError):
                    p.unlink()

    def start(self) -> None:
        """The client runs: upload what is pending (the task ends when nothing is,
        so an idle client holds no task; ``add`` starts it again)."""
        self._running = True
        self._ensure_task()

    def _ensure_task(self) -> None:
        if self._running and self.pending and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self._running = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None
            self._folder = None

    async def add(
        self, path: Path, to: str | None, conv: str | None, caption: str | None, message_id: str
    ) -> UploadItem:
        item = await asyncio.to_thread(prepare_upload, path, self.folder, message_id, to, conv, caption)
        self.client.state.upload_add(item)
        self.pending[item.id] = item
        self._ensure_task()
        return item

    async def _run(self) -> None:
        attempt = 0
        while self.pending:
            await self.client.wait_connected()
            item = next(iter(self.pending.values()))
            try:
                await self._upload(item)
                attempt = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                code = getattr(exc, "code", None)
                if code in FINAL_UPLOAD_ERRORS:
                    self._fail(item, exc)
                    continue
                attempt += 1
                delay = min(UPLOAD_RETRY_CAP, 0.2 * 2 ** min(attempt, 10))
                log.info("upload of %s interrupted (%s); retrying in %.1f s", item.id, exc, delay)
                await asyncio.sleep(delay)

    async def _upload(self, item: UploadItem) -> None:
        client = self.client
        blob = item.blob
        if blob is None:
            plain_size = msgspec.json.decode(item.ref, type=att.AttachmentRef).size
            blob = await new_blob(client, item.size, item.kind, plain_size)
            client.state.upload_set_blob(item.id, blob)
            item = self.pending[item.id] = _with_blob(item, blob)
        try:
            await client.upload_blob(
                Path(item.temp), kind=item.kind, progress=self._reporter(item), resume=blob
            )
        except Exception as exc:
            if getattr(exc, "code", None) == "unknown_blob":
                # Swept, or never granted: start over with a new blob.
                client.state.upload_set_blob(item.id, None)
                self.pending[item.id] = _with_blob(item, None)
            raise
        self._finish(item, blob)

    def _reporter(self, item: UploadItem) -> Progress:
        callback = self.progress.get(item.id)
        saved = item.uploaded

        def report(done: int, total: int) -> None:
            nonlocal saved
            if done - saved >= PROGRESS_SAVE_EVERY or done == total:
                saved = done
                self.client.state.upload_progress(item.id, done)
            if callback is not None:
                try:
                    callback(done, total)
                except Exception:  # the application's bug must not stop the upload
                    log.exception("progress callback failed")

        return report

    def _finish(self, item: UploadItem, blob: str) -> None:
        """Blob complete: queue the message in place of the upload, send it."""
        ref = msgspec.json.decode(item.ref, type=att.AttachmentRef)
        body = msgspec.structs.replace(ref, blob=blob).encode()
        message = OutboxItem(item.id, item.to, item.conv, att.ATTACHMENT_CT, body, item.created)
        self.client._queue_finished_upload(message)
        del self.pending[item.id]
        self.progress.pop(item.id, None)
        with contextlib.suppress(OSError):
            os.unlink(item.temp)

    def _fail(self, item: UploadItem, exc: Exception) -> None:
        self.client.state.upload_remove(item.id)
        self.pending.pop(item.id, None)
        self.progress.pop(item.id, None)
        with contextlib.suppress(OSError):
            os.unlink(item.temp)
        self.client._fail_send(item.id, getattr(exc, "code", "error"), getattr(exc, "message", str(exc)))


def _with_blob(item: UploadItem, blob: str | None) -> UploadItem:
    return UploadItem(
        item.id,
        item.to,
        item.conv,
        item.source,
        item.temp,
        item.kind,
        item.size,
        item.ref,
        blob,
        0,
        item.created,
    )


def attachment_of(message: Message) -> att.AttachmentRef:
    """The attachment a message refers to; ``InvalidAttachment`` if it is none or not a valid one."""
    if message.ct != att.ATTACHMENT_CT:
        raise att.InvalidAttachment(f"a {message.ct} message is not an attachment")
    return att.parse_reference(message.body)


async def download(
    client: Client, message: Message, dest_dir: Path, progress: Progress | None = None
) -> Path:
    """Fetch, check and decrypt ``message``'s attachment into ``dest_dir``; the path written.

    The encrypted blob is kept under the state's media dir while it comes in,
    so a cut download resumes (Range) on the next call. ``BlobTampered`` if
    the blob fails the digest or MAC check: then nothing is written to ``dest_dir``
    and the blob is dropped (the next call fetches it afresh)."""
    ref = attachment_of(message)
    dest_dir.mkdir(parents=True, exist_ok=True)
    folder = client.media_folder() / "downloads"
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"{ref.blob}.{ref.digest_bytes.hex()[:16]}.part"
    # A network failure leaves the partial blob for the next call to resume.
    await client.download_blob(ref.blob, partial, progress=progress)
    try:
        size = partial.stat().st_size
        if size != ref.blob_size:
            raise att.BlobTampered(f"the blob is {size} bytes, its reference says {ref.blob_size}")
        saved = await asyncio.to_thread(
            att.decrypt_file,
            partial,
            dest_dir,
            att.safe_file_name(ref.name),
            key=ref.key_bytes,
            digest=ref.digest_bytes,
            plain_size=ref.size,
        )
    except att.BlobTampered:
        partial.unlink(missing_ok=True)
        raise
    partial.unlink(missing_ok=True)
    return saved
