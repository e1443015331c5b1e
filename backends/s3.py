"""S3 (and S3-compatible) object storage through boto3.

``s3://bucket/prefix``. Endpoint, region and credentials come from boto3's standard chain
(``AWS_ENDPOINT_URL``, profiles, environment) unless given as options; credentials are never
logged or written anywhere by ckptstore.

- Large objects: multipart upload, parts uploaded in parallel (``part_bytes``, ``concurrency``,
  ``inflight_bytes``);
  an upload that fails is aborted, so no orphaned parts are left behind.
- Reads: ranged GETs; a body cut short is retried, so a truncated read never passes.
- Retries with backoff and jitter on 503 SlowDown, 500s, throttling and connection errors
  (botocore's ``standard`` mode, bounded by ``max_attempts``).
- Commit without rename: ``write_if_absent`` is ``PutObject`` with ``If-None-Match: *``; two
  writers of one key can never both succeed.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ckptstore.backends.base import ByteRange, ObjectInfo, PendingUpload, Store, StoreWriter
from ckptstore.backends.s3_body import read_body_into
from ckptstore.backends.throttle import Throttle
from ckptstore.errors import KeyExistsError, KeyNotFoundError, StoreAccessError, StoreError

_MiB = 1 << 20


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None)  # only botocore ClientErrors carry one
    if not isinstance(response, dict):
        return ""
    return str(response.get("Error", {}).get("Code", ""))


_ACCESS_PROBLEMS = {  # error codes a retry cannot fix -> what to tell the user
    "AccessDenied": "access denied (the credentials lack permission)",
    "403": "access denied (HTTP 403: the credentials lack permission, or are wrong)",
    "AllAccessDisabled": "all access to this bucket is disabled",
    "InvalidAccessKeyId": "the access key id is not known to the server",
    "SignatureDoesNotMatch": "the secret access key is wrong (the signature does not match)",
    "InvalidToken": "the session token is malformed or invalid",
    "ExpiredToken": "the session token has expired",
    "NoSuchBucket": "the bucket does not exist",
    "InvalidBucketName": "the bucket name is not valid",
}
_NO_CREDENTIALS = (
    "no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
    "or storage_options={'aws_access_key_id': ..., 'aws_secret_access_key': ...})"
)


def access_problem(exc: BaseException) -> str | None:
    """Why a request failed, when no retry can help (else None)."""
    if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return _NO_CREDENTIALS
    return _ACCESS_PROBLEMS.get(_code(exc))  # type: ignore[arg-type]


def _failure(url: str, what: str, exc: BaseException) -> StoreError:
    """The typed error for a failed request: :class:`StoreAccessError` (one line: the URL
    and the cause) when no retry can fix it, else a :class:`StoreError`."""
    problem = access_problem(exc)
    if problem is not None:
        return StoreAccessError(f"{url}: {problem} ({what})")
    return StoreError(f"{url}: {what} failed: {exc}")


class _MultipartWriter(StoreWriter):
    """Buffers ``part_bytes`` at a time; parts go up in parallel; visible only on commit."""

    def __init__(self, store: S3Store, key: str) -> None:
        self._store, self._key = store, store._key(key)
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: dict[int, str] = {}
        self._futures: list[Any] = []
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        part = self._store.part_bytes
        if self._buf:  # top up the partial part first
            take = min(part - len(self._buf), len(view))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) == part:
                self._submit(bytes(self._buf))
                self._buf = bytearray()
        while len(view) >= part:  # whole parts straight from the caller's memory: one copy
            self._submit(bytes(view[:part]))
            view = view[part:]
        if view:
            self._buf += view

    def _submit(self, chunk: bytes) -> None:
        s = self._store
        if self._upload_id is None:
            try:
                reply = s.client.create_multipart_upload(Bucket=s.bucket, Key=self._key)
            except Exception as exc:
                raise _failure(s.url, f"starting the upload of {self._key!r}", exc) from None
            self._upload_id = reply["UploadId"]
            self._pool = ThreadPoolExecutor(s.concurrency, thread_name_prefix="ckptstore-s3-upload")
        number = len(self._futures) + 1
        assert self._pool is not None
        # Bound memory: at most ``inflight_parts`` parts queued or uploading.
        while sum(not f.done() for f in self._futures) >= s.inflight_parts:
            time.sleep(0.001)
        self._futures.append(self._pool.submit(self._upload_part, number, chunk))

    def _upload_part(self, number: int, chunk: bytes) -> None:
        s = self._store
        with s.throttle.request(len(chunk)):
            reply = s.client.upload_part(
                Bucket=s.bucket,
                Key=self._key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=chunk,
            )
        with self._lock:
            self._parts[number] = reply["ETag"]

    def commit(self) -> None:
        s = self._store
        try:
            if self._upload_id is None:  # small object: one PUT
                with s.throttle.request(len(self._buf)):
                    s.client.put_object(Bucket=s.bucket, Key=self._key, Body=bytes(self._buf))
                return
            if self._buf:
                self._submit(bytes(self._buf))
                self._buf = bytearray()
            for f in self._futures:
                f.result()
            parts = [{"PartNumber": n, "ETag": self._parts[n]} for n in sorted(self._parts)]
            s.client.complete_multipart_upload(
                Bucket=s.bucket,
                Key=self._key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": parts},
            )
        except Exception as exc:
            self.abort()
            raise _failure(s.url, f"upload of {self._key!r}", exc) from None
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def abort(self) -> None:
        s = self._store
        self._buf = bytearray()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._upload_id is not None:
            with contextlib.suppress(Exception):  # best effort: a lifecycle rule catches the rest
                s.client.abort_multipart_upload(
                    Bucket=s.bucket, Key=self._key, UploadId=self._upload_id
                )
            self._upload_id = None


_CLIENTS: dict[tuple, Any] = {}
_CLIENTS_LOCK = threading.Lock()


def _shared_client(
    endpoint_url: str | None,
    region_name: str,
    access_key: str | None,
    secret_key: str | None,
    max_attempts: int,
    pool: int,
) -> Any:
    """One boto3 client per configuration and process: creating a client costs tens of
    milliseconds, and a shared one keeps its connections open between checkpoints.
    (boto3 clients are thread-safe; the key holds the credentials only in memory.)"""
    import os

    import boto3
    from botocore.config import Config

    key = (
        endpoint_url,
        region_name,
        access_key,
        secret_key,
        max_attempts,
        pool,
        os.environ.get("AWS_ENDPOINT_URL"),
        os.environ.get("AWS_ACCESS_KEY_ID"),
        os.environ.get("AWS_SECRET_ACCESS_KEY"),  # held in memory only, like the client
        os.environ.get("AWS_SESSION_TOKEN"),
        os.environ.get("AWS_PROFILE"),
        os.getpid(),
    )
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            config = Config(
                retries={"max_attempts": max_attempts, "mode": "standard"},
                max_pool_connections=pool,
                connect_timeout=10,
                read_timeout=60,
            )
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=endpoint_url,
                region_name=region_name,
                aws_access_key_id=access_key,
                aws_secret_access_key=secret_key,
                config=config,
            )
            _CLIENTS[key] = client
        return client


class S3Store(Store):
    """Objects under ``s3://bucket/prefix``.

    Args:
        location: ``bucket/prefix`` (the part after ``s3://``).
        endpoint_url, region_name, aws_access_key_id, aws_secret_access_key: override boto3's
            standard configuration chain.
        part_bytes: multipart part size (default 64 MiB: a 16k-rank save of 4 TB is ~60 k
            parts, not ~500 k; parts in flight per writer are bounded by ``inflight_bytes``).
        range_bytes: bytes per ranged GET (default 8 MiB); a read is cut into ranges fetched
            in parallel.
        inflight_bytes: most bytes of parts a writer holds at once, queued or uploading
            (default 256 MiB; at least one part).
        concurrency: parallel part uploads / ranged GETs per writer or reader (default 8).
        max_attempts: attempts per request, with exponential backoff and jitter (default 8).
        create_bucket: create the bucket if it does not exist (for tests and demos).
        max_concurrent_uploads: burst control -- at most this many PUT requests in flight
            from this store at once (all its writers together).
        max_upload_bytes_per_second: burst control -- average upload bandwidth cap.
    """

    def __init__(
        self,
        location: str,
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        part_bytes: int = 64 * _MiB,
        range_bytes: int = 8 * _MiB,
        inflight_bytes: int = 256 * _MiB,
        concurrency: int = 8,
        max_attempts: int = 8,
        create_bucket: bool = False,
        max_concurrent_uploads: int | None = None,
        max_upload_bytes_per_second: float | None = None,
        client: Any = None,
    ) -> None:
        bucket, _, prefix = location.partition("/")
        if not bucket:
            raise StoreError(f"s3://{location}: no bucket name")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.part_bytes = max(5 * _MiB, part_bytes)
        self.range_bytes = max(1 * _MiB, range_bytes)
        self.inflight_parts = max(1, min(2 * concurrency, inflight_bytes // self.part_bytes))
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.read_window_bytes = self.range_bytes * max(1, concurrency)
        self.throttle = Throttle(max_concurrent_uploads, max_upload_bytes_per_second)
        if client is None:
            client = _shared_client(
                endpoint_url,
                region_name or "us-east-1",
                aws_access_key_id,
                aws_secret_access_key,
                max_attempts,
                max(10, 2 * concurrency),
            )
        self.client = client
        if create_bucket:
            try:
                self.client.head_bucket(Bucket=bucket)
            except Exception:
                try:
                    self.client.create_bucket(Bucket=bucket)
                except Exception as exc:  # another rank may have created it meanwhile
                    code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code")
                    if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _get(self, key: str, byte_range: ByteRange | None, into: memoryview | None) -> Any:
        """One GET with retries, body errors included (a cut connection, a short body).

        With ``into`` the body is read straight into it (no intermediate bytes object) and
        the number of bytes is returned; otherwise the bytes.
        """
        full = self._key(key)
        delay = 0.05
        for attempt in range(self.max_attempts):
            try:
                kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": full}
                if byte_range is not None:
                    if byte_range.length == 0:
                        return 0 if into is not None else b""
                    kwargs["Range"] = f"bytes={byte_range.start}-{byte_range.end - 1}"
                reply = self.client.get_object(**kwargs)
                expected = reply.get("ContentLength")
                body = reply["Body"]
                if into is None:
                    data = body.read()
                    got = len(data)
                else:
                    if expected is not None and expected > len(into):
                        raise StoreError(f"{expected} bytes do not fit in {len(into)}")
                    got = read_body_into(body, into)
                if expected is not None and got != expected:
                    raise StoreError(f"short body: {got} of {expected} bytes")
                return got if into is not None else data
            except Exception as exc:
                if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                    raise KeyNotFoundError(f"{self.url}: no such key {key!r}") from None
                if _code(exc) == "InvalidRange":
                    return 0 if into is not None else b""
                if access_problem(exc) is not None:
                    raise _failure(self.url, f"reading {key!r}", exc) from None
                if attempt == self.max_attempts - 1:
                    raise StoreError(
                        f"{self.url}: reading {key!r} failed after {self.max_attempts} attempts: {exc}"
                    ) from exc
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    def read(self, key: str, byte_range: ByteRange | None = None) -> bytes:
        return self._get(key, byte_range, None)

    def read_into(self, key: str, offset: int, out: memoryview) -> None:
        view = memoryview(out).cast("B")
        n = len(view)
        step = self.range_bytes
        spans = [(lo, min(lo + step, n)) for lo in range(0, n, step)]

        def fetch(span: tuple[int, int]) -> None:
            lo, hi = span
            got = self._get(key, ByteRange(offset + lo, offset + hi), view[lo:hi])
            if got != hi - lo:
                raise StoreError(
                    f"{self.url}/{key}: wanted {hi - lo} bytes at {offset + lo}, got {got}"
                )

        if len(spans) <= 1:
            for span in spans:
                fetch(span)
            return
        with ThreadPoolExecutor(
            min(self.concurrency, len(spans)), thread_name_prefix="ckptstore-s3-get"
        ) as pool:
            list(pool.map(fetch, spans))

    def open_writer(self, key: str) -> StoreWriter:
        return _MultipartWriter(self, key)

    def write_if_absent(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=bytes(data), IfNoneMatch="*"
            )
        except Exception as exc:
            if _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise KeyExistsError(f"{self.url}: {key!r} already exists") from None
            raise _failure(self.url, f"conditional put of {key!r}", exc) from None

    def size(self, key: str) -> int:
        try:
            return int(
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"]
            )
        except Exception as exc:
            if _code(exc) in ("404", "NoSuchKey", "NotFound"):
                raise KeyNotFoundError(f"{self.url}: no such key {key!r}") from None
            raise _failure(self.url, f"HEAD {key!r}", self._diagnosed(exc)) from None

    def _diagnosed(self, exc: Exception) -> Exception:
        """A HEAD refused with a bare 403 carries no reason (HEAD has no body): one listing
        request, on this error path only, gets the server's code (a wrong secret, an
        unknown key id, or access denied)."""
        if _code(exc) != "403":
            return exc
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._key(""), MaxKeys=1)
        except Exception as reason:
            return reason if access_problem(reason) is not None else exc
        return exc

    def _listing(self, prefix: str, delimiter: bool = False) -> Iterator[dict[str, Any]]:
        """Pages of ``list_objects_v2`` under ``prefix`` (one level with ``delimiter``)."""
        extra = {"Delimiter": "/"} if delimiter else {}
        yield from self._pages("list_objects_v2", prefix, **extra)

    def _pages(self, operation: str, prefix: str, **extra: Any) -> Iterator[dict[str, Any]]:
        """Pages of a paginated listing under ``prefix``; a failure is a StoreError
        (botocore's own exception types never leave the backend)."""
        paginator = self.client.get_paginator(operation)
        pages = iter(paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix), **extra))
        while True:
            try:
                page = next(pages, None)
            except Exception as exc:
                raise _failure(self.url, f"listing {prefix!r}", exc) from None
            if page is None:
                return
            yield page

    def list(self, prefix: str = "") -> Iterator[str]:
        for info in self.list_details(prefix):
            yield info.key

    def list_children(self, prefix: str = "") -> Iterator[str]:
        cut = len(self._key(prefix))
        for page in self._listing(prefix, delimiter=True):
            for common in page.get("CommonPrefixes", []):
                yield common["Prefix"][cut:]
            for obj in page.get("Contents", []):
                yield obj["Key"][cut:]

    def list_details(self, prefix: str = "") -> Iterator[ObjectInfo]:
        cut = len(self._key(""))
        for page in self._listing(prefix):
            for obj in page.get("Contents", []):
                modified = obj.get("LastModified")
                yield ObjectInfo(
                    obj["Key"][cut:],
                    int(obj.get("Size", 0)),
                    modified.timestamp() if modified is not None else None,
                )

    def list_uploads(self, prefix: str = "") -> Iterator[PendingUpload]:
        cut = len(self._key(""))
        for page in self._pages("list_multipart_uploads", prefix):
            for up in page.get("Uploads", []):
                started = up.get("Initiated")
                yield PendingUpload(
                    up["Key"][cut:],
                    up["UploadId"],
                    started.timestamp() if started is not None else None,
                )

    def abort_upload(self, upload: PendingUpload) -> None:
        try:
            self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=self._key(upload.key), UploadId=upload.upload_id
            )
        except Exception as exc:
            if _code(exc) != "NoSuchUpload":
                raise StoreError(
                    f"{self.url}: aborting the upload of {upload.key!r}: {exc}"
                ) from exc

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            raise _failure(self.url, f"DELETE {key!r}", exc) from None

    def delete_prefix(self, prefix: str) -> int:
        keys = list(self.list(prefix))
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self._key(k)} for k in keys[i : i + 1000]]
            try:
                self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            except Exception as exc:
                raise _failure(self.url, f"deleting under {prefix!r}", exc) from None
        return len(keys)
