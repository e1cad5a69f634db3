"""The blob store a gateway's settings name."""

from __future__ import annotations

from pathlib import Path

from roost.media.base import BlobStore
from roost.media.config import MediaConfig, check_location, parse_s3
from roost.media.local import LocalBlobStore


def make_blob_store(config: MediaConfig, data_dir: Path) -> BlobStore:
    """``config.location``: None (``<data_dir>/media``), a directory, or ``s3://...``."""
    location = config.location
    if location is not None and location.startswith("s3://"):
        from roost.media.s3 import S3BlobStore

        return S3BlobStore(parse_s3(location), config.s3_access_key, config.s3_secret_key)
    check_location(location)
    root = Path(location) if location else data_dir / "media"
    return LocalBlobStore(root, config.secret_file or data_dir / "media.key", config.public_url)
