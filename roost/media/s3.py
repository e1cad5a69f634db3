"""Blobs in any S3-compatible object store, through presigned URLs.

A blob is one multipart upload: the gateway starts it (``create``), hands out
presigned ``UploadPart`` URLs whose signature covers the part's exact
Content-Length, lists the parts for ``blob_status``, checks every part's size
before ``CompleteMultipartUpload``, and hands out presigned GET URLs (Range
requests and cache headers are the store's own). The bytes go from the client
to the store and back, never through a gateway.

Uploads whose gateway died between starting one and recording it are not in
the database: a bucket lifecycle rule ("abort incomplete multipart uploads
after 1 day", docs/deploy.md) removes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from roost.media.base import PartUrl, StoredPart, check_parts
from roost.media.config import S3_MIN_PART, S3Location
from roost.store.blobmeta import COMPLETE, BlobRecord


class S3BlobStore:
    min_part_size = S3_MIN_PART

    def __init__(self, location: S3Location, access_key: str, secret_key: str) -> None:
        self.location = location
        self.access_key = access_key
        self.secret_key = secret_key
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    async def start(self) -> None:
        session = get_session()
        config = AioConfig(
            signature_version="s3v4",
            # Path-style URLs work with every S3-compatible server and need no DNS per bucket.
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
            # Only checksums the operation requires: presigned UploadPart URLs
            # must not demand a checksum header the client cannot know.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client = await self._stack.enter_async_context(
            session.create_client(
                "s3",
                region_name=self.location.region,
                endpoint_url=self.location.endpoint,
                aws_access_key_id=self.access_key or None,
                aws_secret_access_key=self.secret_key or None,
                config=config,
            )
        )

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None

    def _key(self, blob: str) -> str:
        return f"{self.location.prefix}{blob}"

    async def create(self, blob: str) -> str:
        answer = await self._client.create_multipart_upload(
            Bucket=self.location.bucket, Key=self._key(blob), ContentType="application/octet-stream"
        )
        return str(answer["UploadId"])

    async def put_urls(self, rec: BlobRecord, parts: list[int], expires: int) -> list[PartUrl]:
        ttl = max(1, expires - int(time.time()))
        urls = []
        for part in parts:
            url = await self._client.generate_presigned_url(
                "upload_part",
                Params={
                    "Bucket": self.location.bucket,
                    "Key": self._key(rec.blob),
                    "UploadId": rec.upload_id,
                    "PartNumber": part,
                    # Signed: the store refuses a body of any other length.
                    "ContentLength": rec.part_length(part),
                },
                ExpiresIn=ttl,
            )
            urls.append(PartUrl(part, url, {}))
            # Each signature is ~0.2 ms of CPU on the loop the chat shares
            # (botocore signs synchronously): let frames through in between,
            # not after a 100-part request's ~20 ms.
            await asyncio.sleep(0)
        return urls

    async def parts_done(self, rec: BlobRecord) -> dict[int, StoredPart]:
        if rec.state == COMPLETE:
            return {p: StoredPart(p, "", rec.part_length(p)) for p in range(1, rec.parts + 1)}
        found: dict[int, StoredPart] = {}
        marker = 0
        while True:
            try:
                answer = await self._client.list_parts(
                    Bucket=self.location.bucket,
                    Key=self._key(rec.blob),
                    UploadId=rec.upload_id,
                    PartNumberMarker=marker,
                    MaxParts=1000,
                )
            except ClientError as exc:
                if _code(exc) in ("NoSuchUpload", "404"):
                    return found
                raise
            for item in answer.get("Parts", []):
                part = int(item["PartNumber"])
                found[part] = StoredPart(part, str(item["ETag"]).strip('"'), int(item["Size"]))
            if not answer.get("IsTruncated"):
                return found
            marker = int(answer.get("NextPartNumberMarker", 0))

    async def complete(self, rec: BlobRecord, parts: list[tuple[int, str]]) -> None:
        stored = await self.parts_done(rec)
        if not stored and await self._object_size(rec) == rec.size:
            return  # completed by an earlier request (perhaps on another gateway)
        check_parts(rec, stored, parts)
        try:
            await self._client.complete_multipart_upload(
                Bucket=self.location.bucket,
                Key=self._key(rec.blob),
                UploadId=rec.upload_id,
                MultipartUpload={
                    "Parts": [
                        {"PartNumber": p, "ETag": f'"{stored[p].etag}"'} for p in range(1, rec.parts + 1)
                    ]
                },
            )
        except ClientError as exc:
            if _code(exc) == "NoSuchUpload" and await self._object_size(rec) == rec.size:
                return  # another request completed it meanwhile
            raise

    async def _object_size(self, rec: BlobRecord) -> int | None:
        try:
            head = await self._client.head_object(Bucket=self.location.bucket, Key=self._key(rec.blob))
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise
        return int(head["ContentLength"])

    async def get_url(self, rec: BlobRecord, expires: int) -> str:
        url = await self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.location.bucket, "Key": self._key(rec.blob)},
            ExpiresIn=max(1, expires - int(time.time())),
        )
        return str(url)

    async def delete(self, rec: BlobRecord) -> bool:
        if rec.state != COMPLETE and rec.upload_id:
            try:
                await self._client.abort_multipart_upload(
                    Bucket=self.location.bucket, Key=self._key(rec.blob), UploadId=rec.upload_id
                )
            except ClientError as exc:
                if _code(exc) not in ("NoSuchUpload", "404"):
                    raise
        # Also when pending: a completion may have reached the store just before.
        await self._client.delete_object(Bucket=self.location.bucket, Key=self._key(rec.blob))
        return True

    async def raw(self, rec: BlobRecord) -> bytes | None:
        try:
            answer = await self._client.get_object(Bucket=self.location.bucket, Key=self._key(rec.blob))
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return None
            raise
        async with answer["Body"] as body:
            data: bytes = await body.read()
        return data

    async def object_keys(self) -> list[str]:
        """Every object key in the bucket under the prefix (tests and tools)."""
        keys: list[str] = []
        paginator = self._client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.location.bucket, Prefix=self.location.prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return keys


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
