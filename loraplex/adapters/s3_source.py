"""The `s3` source: adapter folders as objects under a prefix in an S3 (or S3-compatible) bucket.

An id is `bucket/prefix` (`s3://` is stripped when the ref is parsed); the adapter's files are the
objects directly under `prefix/`. The version is a digest of their names, ETags and sizes, so an
overwritten object gives a new identity. Each object is downloaded with `If-Match` on the ETag that
was resolved, so a file replaced mid-download fails the load instead of mixing two versions.
Credentials come from boto3's standard chain (environment, shared files, instance roles); a
request's token is not used.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loraplex.adapters.ref import AdapterRef
from loraplex.adapters.sources import Resolved, fetch_error_detail
from loraplex.config import AdapterSourceConfig
from loraplex.lora.adapter import (
    BIN_FILE,
    CONFIG_FILE,
    SAFETENSORS_FILE,
    AdapterAccessDenied,
    AdapterError,
    AdapterFetchError,
    AdapterInvalid,
    AdapterNotFound,
)
from loraplex.lora.medusa import MEDUSA_FILES

ADAPTER_FILES = (CONFIG_FILE, SAFETENSORS_FILE, BIN_FILE, *MEDUSA_FILES)
_NOT_FOUND = {"NoSuchBucket", "NoSuchKey", "NotFound", "404"}
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
           "AllAccessDisabled", "401", "403"}
_CHUNK = 1 << 20


class S3Source:
    def __init__(self, config: AdapterSourceConfig) -> None:
        self.endpoint_url = config.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self._client: Any = None
        self._client_lock = threading.Lock()

    def resolve(self, ref: AdapterRef, token: str | None) -> Resolved:
        return Resolved(version=_version(self._list(ref)))

    def fetch(self, ref: AdapterRef, resolved: Resolved, token: str | None, dest: Path) -> None:
        objects = self._list(ref)
        if _version(objects) != resolved.version:
            raise AdapterFetchError(f"adapter {ref}: its objects changed while it was being loaded; retry")
        bucket, _ = _split(ref)
        with _s3_errors(ref):
            for name, obj in objects.items():
                # If-Match: the bytes of exactly the object that was listed, or an error.
                body = self._s3().get_object(Bucket=bucket, Key=obj["Key"], IfMatch=obj["ETag"])["Body"]
                written = 0
                with body, (dest / name).open("wb") as out:
                    while chunk := body.read(_CHUNK):
                        out.write(chunk)
                        written += len(chunk)
                if written != obj["Size"]:
                    raise AdapterFetchError(f"adapter {ref}: s3://{bucket}/{obj['Key']} ended after {written} of "
                                            f"{obj['Size']} bytes")

    def _list(self, ref: AdapterRef) -> dict[str, dict[str, Any]]:
        """Adapter file name → listed object (Key, ETag, Size) for the objects directly under the prefix."""
        if ref.revision is not None:
            raise AdapterInvalid(f"adapter {ref}: s3 adapters have no revisions")
        bucket, prefix = _split(ref)
        found: dict[str, dict[str, Any]] = {}
        with _s3_errors(ref):
            pages = self._s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
            for page in pages:
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(prefix):]
                    if name in ADAPTER_FILES:
                        found[name] = obj
        if not found:
            raise AdapterNotFound(f"adapter {ref}: no adapter files ({', '.join(ADAPTER_FILES)}) under "
                                  f"s3://{bucket}/{prefix}")
        return found

    def _s3(self) -> Any:
        with self._client_lock:  # boto3 clients are thread-safe; creating one (sessions) is not
            if self._client is None:
                import boto3  # imported here: it takes a while and only s3 adapters need it

                self._client = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url)
            return self._client


def _version(objects: dict[str, dict[str, Any]]) -> str:
    entries = sorted((name, obj["ETag"], obj["Size"]) for name, obj in objects.items())
    return "etag-" + hashlib.sha256(repr(entries).encode()).hexdigest()


def _split(ref: AdapterRef) -> tuple[str, str]:
    """(bucket, key prefix ending in '/' or empty) of an s3 id `bucket/prefix`."""
    bucket, _, prefix = ref.id.partition("/")
    if not bucket:
        raise AdapterNotFound(f"adapter {ref}: an s3 id is bucket/prefix, got {ref.id!r}")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


@contextmanager
def _s3_errors(ref: AdapterRef) -> Iterator[None]:
    """botocore's exceptions → the AdapterError family, naming the adapter."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except AdapterError:
        raise
    except ClientError as e:
        error = e.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code in _NOT_FOUND or status == "404":
            raise AdapterNotFound(f"adapter {ref}: S3 says {code}: {error.get('Message', '')}") from e
        if code in _DENIED or status in ("401", "403"):
            raise AdapterAccessDenied(f"adapter {ref}: S3 refused access ({code})") from e
        raise AdapterFetchError(f"adapter {ref}: S3 error {code} (HTTP {status}): {error.get('Message', '')}") from e
    except NoCredentialsError as e:
        raise AdapterAccessDenied(f"adapter {ref}: no AWS credentials found for S3") from e
    except (BotoCoreError, OSError) as e:
        raise AdapterFetchError(f"adapter {ref}: fetching from S3 failed: {fetch_error_detail(e)}") from e
