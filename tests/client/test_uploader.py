"""The SDK's upload task against a scripted transport: which blob it resumes
after each kind of failure, and what a refusal leaves behind. (The real
transport and server are in tests/e2e/test_media_sdk.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from roost.client.client import ConnectionLost, RoostError
from roost.client.media import Uploader
from roost.client.state import ClientState, OutboxItem


class ScriptedClient:
    """What ``Uploader`` uses of ``Client``; ``upload_blob`` follows ``script``."""

    def __init__(self, path: Path, script: list[BaseException | None]) -> None:
        self.state = ClientState(path)
        self.script = script
        self.new_blobs = 0
        self.uploads: list[str | None] = []
        self.queued: list[OutboxItem] = []
        self.failed: list[tuple[str, str]] = []

    async def wait_connected(self, timeout: float | None = None) -> None:
        return None

    async def _request(self, frame: Any, timeout: float = 30.0) -> Any:
        self.new_blobs += 1
        return type("Slot", (), {"blob": f"blob{self.new_blobs:02d}" + "x" * 16})()

    async def upload_blob(
        self, source: Path, *, kind: str, progress: Any = None, resume: str | None = None
    ) -> str:
        self.uploads.append(resume)
        outcome = self.script.pop(0) if self.script else None
        if outcome is not None:
            raise outcome
        assert resume is not None
        return resume

    def _queue_finished_upload(self, item: OutboxItem) -> None:
        self.state.upload_remove(item.id, commit=False)
        self.state.outbox_add(item)
        self.queued.append(item)

    def _fail_send(self, message_id: str, code: str, message: str) -> None:
        self.failed.append((message_id, code))

    def media_folder(self) -> Path:
        raise AssertionError("not used")


async def run_until(client: ScriptedClient, source: Path, done: Any) -> Uploader:
    uploader = Uploader(client)  # type: ignore[arg-type]
    await uploader.add(source, "bob", None, None, "m1")
    uploader.start()
    for _ in range(400):
        if done():
            break
        await asyncio.sleep(0.01)
    await uploader.stop()
    return uploader


async def test_a_cut_upload_resumes_the_same_blob(tmp_path: Path) -> None:
    source = tmp_path / "f.bin"
    source.write_bytes(b"x" * 1000)
    client = ScriptedClient(tmp_path / "s.sqlite", [ConnectionLost(), RoostError("rate_limited", "slow")])
    await run_until(client, source, lambda: client.queued)
    assert client.new_blobs == 1
    assert client.uploads == ["blob01" + "x" * 16] * 3  # the same blob each time, resumed
    assert [q.id for q in client.queued] == ["m1"]
    assert client.state.uploads() == [] and [o.id for o in client.state.outbox()] == ["m1"]
    assert not list((tmp_path / "s.sqlite.media").glob("*.enc"))


async def test_an_unknown_blob_starts_a_new_one(tmp_path: Path) -> None:
    source = tmp_path / "f.bin"
    source.write_bytes(b"x" * 1000)
    client = ScriptedClient(tmp_path / "s.sqlite", [RoostError("unknown_blob", "swept")])
    await run_until(client, source, lambda: client.queued)
    assert client.new_blobs == 2 and client.uploads == ["blob01" + "x" * 16, "blob02" + "x" * 16]
    assert b"blob02" in client.queued[0].body


async def test_a_refusal_ends_the_send_and_leaves_nothing(tmp_path: Path) -> None:
    source = tmp_path / "f.bin"
    source.write_bytes(b"x" * 1000)
    client = ScriptedClient(tmp_path / "s.sqlite", [RoostError("too_large", "over 16 MiB")])
    await run_until(client, source, lambda: client.failed)
    assert client.failed == [("m1", "too_large")] and client.queued == []
    assert client.state.uploads() == [] and client.state.outbox() == []
    assert not list((tmp_path / "s.sqlite.media").glob("*.enc"))


async def test_a_restarted_uploader_resumes_the_committed_blob(tmp_path: Path) -> None:
    """The blob id is committed before the first byte: a new client on the state resumes it."""
    source = tmp_path / "f.bin"
    source.write_bytes(b"x" * 1000)
    first = ScriptedClient(tmp_path / "s.sqlite", [ConnectionLost()] * 1000)
    await run_until(first, source, lambda: first.uploads)
    (left,) = first.state.uploads()
    assert left.blob == "blob01" + "x" * 16
    first.state.close()
    second = ScriptedClient(tmp_path / "s.sqlite", [])
    uploader = Uploader(second)  # type: ignore[arg-type]
    uploader.start()
    for _ in range(400):
        if second.queued:
            break
        await asyncio.sleep(0.01)
    await uploader.stop()
    assert second.new_blobs == 0 and second.uploads == ["blob01" + "x" * 16]
    assert [q.id for q in second.queued] == ["m1"]
