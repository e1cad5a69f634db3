"""Media: blob stores for encrypted attachments (docs/architecture.md, "Media").

The chat path carries only a small message naming a blob; the bytes go to a
``BlobStore``: ``LocalBlobStore`` (files under the data directory, served by
the gateway with signed URLs) or ``S3BlobStore`` (any S3-compatible store,
through presigned URLs: the bytes never pass through a gateway).
"""
