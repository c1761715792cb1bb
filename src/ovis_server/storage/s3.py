"""Output files in an S3-compatible bucket, handed out as presigned GET URLs.

Endpoint, region and credentials come from the usual AWS settings (``AWS_ENDPOINT_URL``,
``AWS_REGION``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, instance roles),
or ``--s3-endpoint-url`` for MinIO, Ceph, R2 and the like.
"""

from __future__ import annotations

import errno
import logging
from typing import Any
from urllib.parse import urlparse

from ovis_server.storage.base import WRITE_CHECK_NAME, check_key, check_request_id

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_SECONDS = 5
READ_TIMEOUT_SECONDS = 60
MAX_ATTEMPTS = 3  # botocore's tries per call, with its backoff between them
BUCKET_REFUSED = "the bucket refused the write or could not be reached"


class S3FileStore:
    def __init__(self, bucket: str, prefix: str, client: Any) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client

    @classmethod
    def from_url(cls, url: str, endpoint_url: str | None = None) -> S3FileStore:
        """``s3://bucket`` or ``s3://bucket/prefix``."""
        parts = urlparse(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"--storage {url!r}: expected s3://BUCKET or s3://BUCKET/PREFIX")
        try:
            import boto3
        except ImportError as exc:
            raise ValueError("--storage s3://… needs boto3: pip install 'ovis-server[s3]'") from exc
        from botocore.config import Config

        # A bucket that cannot be reached fails a call within seconds (the worker keeps
        # the job, a delete is tried again later) rather than after botocore's minutes.
        config = Config(
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            read_timeout=READ_TIMEOUT_SECONDS,
            retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
        )
        client = boto3.client("s3", endpoint_url=endpoint_url or None, config=config)
        return cls(parts.netloc, parts.path, client)

    def _object(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, media_type: str) -> None:
        self._write(self._object(key), data, media_type)

    def check_writable(self) -> None:
        """Write and remove a small object, as a test that the bucket takes writes."""
        probe = f"{self.prefix}/{WRITE_CHECK_NAME}" if self.prefix else WRITE_CHECK_NAME
        self._write(probe, b"ok", "text/plain")
        self.client.delete_object(Bucket=self.bucket, Key=probe)

    def _write(self, name: str, data: bytes, media_type: str) -> None:
        """put_object; a bucket that refuses the write (or cannot be reached) raises
        OSError, like a local disk that is full, so that the worker keeps the job."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=name, Body=data, ContentType=media_type)
        except (BotoCoreError, ClientError) as exc:
            # The details (endpoint, bucket, key) go to the log; the error's own words,
            # which the worker reports and /readyz shows, name none of them.
            logger.warning("the bucket %r refused the write of %s: %s", self.bucket, name, exc)
            raise OSError(errno.EIO, BUCKET_REFUSED) from exc

    def read(self, key: str) -> bytes:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self._object(key))
        except self.client.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(key) from exc
        data: bytes = answer["Body"].read()
        return data

    def url(self, key: str, *, base_url: str, expires_in: int) -> str:
        # S3 presigned URLs live at most 7 days (SigV4).
        url: str = self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._object(key)},
            ExpiresIn=min(expires_in, 7 * 24 * 3600),
        )
        return url

    def delete_request(self, request_id: str) -> int:
        folder = check_request_id(request_id) + "/"
        prefix = f"{self.prefix}/{folder}" if self.prefix else folder
        listing = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        objects = [{"Key": item["Key"]} for item in listing.get("Contents", [])]
        if objects:
            answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects})
            if answer.get("Errors"):
                # Some objects stay: the caller tries again (jobs/deletions.py).
                first = answer["Errors"][0]
                raise OSError(
                    errno.EIO,
                    f"the bucket kept {len(answer['Errors'])} object(s) of {request_id}: "
                    f"{first.get('Code')} {first.get('Message')}",
                )
        return len(objects)
