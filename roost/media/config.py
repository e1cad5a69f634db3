"""Media settings: where blobs go, their limits, how long they are kept."""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1024 * 1024
GiB = 1024 * MiB
S3_MIN_PART = 5 * MiB  # S3 refuses smaller parts (but the last)
LOCAL_MIN_PART = 64 * 1024


@dataclass(slots=True)
class MediaLimits:
    image_bytes: int = 16 * MiB
    video_bytes: int = 100 * MiB
    audio_bytes: int = 100 * MiB
    file_bytes: int = 100 * MiB
    quota_bytes: int = 2 * GiB  # per user: pending and complete blobs together (0: none)
    uploads_per_minute: float = 30.0  # blob_new per user and gateway (0: no limit)
    retention_days: float = 30.0  # complete blobs are deleted this long after completion
    pending_hours: float = 24.0  # uploads not completed are deleted after this

    def max_bytes(self, kind: str) -> int:
        return {
            "image": self.image_bytes,
            "video": self.video_bytes,
            "audio": self.audio_bytes,
        }.get(kind, self.file_bytes)


@dataclass(slots=True)
class MediaConfig:
    # None: <data-dir>/media; a path; or s3://bucket?endpoint=http://...&region=...
    location: str | None = None
    # The local store's URL-signing key (32 random bytes, made at first start,
    # mode 0600). Default: <data-dir>/media.key. Gateways sharing one media
    # directory need the same key.
    secret_file: Path | None = None
    part_size: int = 8 * MiB
    url_ttl: int = 3600  # seconds a signed URL stays valid
    public_url: str = ""  # local: absolute base of the /media URLs ("": relative to the server's)
    s3_access_key: str = ""
    s3_secret_key: str = ""
    sweep_interval: float = 600.0  # seconds between sweeps
    limits: MediaLimits = field(default_factory=MediaLimits)

    @property
    def is_s3(self) -> bool:
        return self.location is not None and self.location.startswith("s3://")


@dataclass(slots=True, frozen=True)
class S3Location:
    bucket: str
    endpoint: str | None
    region: str
    prefix: str


def parse_s3(location: str) -> S3Location:
    """``s3://bucket[/prefix]?endpoint=http://host:port&region=us-east-1``."""
    parts = urllib.parse.urlsplit(location)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an s3://bucket URL: {location!r}")
    query = dict(urllib.parse.parse_qsl(parts.query))
    unknown = set(query) - {"endpoint", "region"}
    if unknown:
        raise ValueError(f"unknown --media parameter(s) {sorted(unknown)}: use endpoint= and region=")
    prefix = parts.path.strip("/")
    return S3Location(
        bucket=parts.netloc,
        endpoint=query.get("endpoint") or None,
        region=query.get("region") or "us-east-1",
        prefix=prefix + "/" if prefix else "",
    )


def check_location(location: str | None) -> None:
    """Raise ValueError unless ``location`` is None, a directory path or a valid s3:// URL."""
    if location is None or "://" not in location:
        return
    if not location.startswith("s3://"):
        raise ValueError(f"unsupported {location!r}: a directory or s3://bucket?endpoint=...")
    parse_s3(location)


_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def byte_size(text: str) -> int:
    """``16MiB``, ``100M``, ``2GiB``, ``65536`` -> bytes (binary units)."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (e.g. 16MiB, 2GiB, 65536)")
    number, unit = int(match.group(1)), match.group(2).lower()
    return number * 1024 ** "_kmgt".index(unit) if unit else number


def part_size_for(size: int, configured: int, max_parts: int) -> int:
    """The part size of a ``size``-byte blob: the configured one, grown so
    that the blob has at most ``max_parts`` parts."""
    needed = -(-size // max_parts)
    return max(configured, needed)
