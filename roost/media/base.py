"""The blob store interface both backends implement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from roost.protocol.errors import ErrorCode, ProtocolError
from roost.store.blobmeta import BlobRecord


@dataclass(slots=True, frozen=True)
class PartUrl:
    part: int
    url: str
    headers: dict[str, str]


@dataclass(slots=True, frozen=True)
class StoredPart:
    part: int
    etag: str  # without quotes
    size: int


def incomplete(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INCOMPLETE_UPLOAD, message)


def check_parts(rec: BlobRecord, stored: dict[int, StoredPart], given: list[tuple[int, str]]) -> None:
    """Raise ``incomplete_upload`` unless ``given`` names every part of ``rec``
    once, each stored with its exact size and the etag its upload answered."""
    numbers = [part for part, _ in given]
    if sorted(numbers) != list(range(1, rec.parts + 1)):
        raise incomplete(f"name each of the {rec.parts} parts once")
    for part, etag in given:
        have = stored.get(part)
        if have is None:
            raise incomplete(f"part {part} is not uploaded")
        if have.size != rec.part_length(part):
            raise incomplete(f"part {part} has {have.size} bytes, not {rec.part_length(part)}")
        if have.etag != etag.strip('"'):
            raise incomplete(f"part {part} has another etag than {etag}")


class BlobStore(Protocol):
    """Where the (already encrypted) bytes of blobs live."""

    # Parts smaller than this are refused by the store (but the last).
    min_part_size: int

    async def start(self) -> None: ...
    async def close(self) -> None: ...

    async def create(self, blob: str) -> str:
        """Prepare an upload; returns its upload id ("" if the store needs none)."""
        ...

    async def put_urls(self, rec: BlobRecord, parts: list[int], expires: int) -> list[PartUrl]: ...
    async def parts_done(self, rec: BlobRecord) -> dict[int, StoredPart]: ...

    async def complete(self, rec: BlobRecord, parts: list[tuple[int, str]]) -> None:
        """Join the parts into the blob; ``incomplete_upload`` if one is missing or wrong."""
        ...

    async def get_url(self, rec: BlobRecord, expires: int) -> str: ...

    async def delete(self, rec: BlobRecord) -> bool:
        """Delete the blob or upload; False when it must wait (a download is running)."""
        ...

    async def raw(self, rec: BlobRecord) -> bytes | None:
        """The stored bytes of a complete blob (tests and tools; never on a request path)."""
        ...
