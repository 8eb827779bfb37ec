"""The store on S3 (AWS, or any server that speaks its API: SeaweedFS, MinIO, ...).

Errors are translated once, at this boundary, into :mod:`hotspare.errors` (as s3fs does):

- ``NoSuchKey`` / 404 -> :class:`NotFound`;
- ``PreconditionFailed`` / 412 and ``ConditionalRequestConflict`` / 409 on a create-only
  write -> :class:`AlreadyExists`;
- throttling (``SlowDown``, 429), 5xx, timeouts, connection errors and truncated bodies ->
  :class:`TransientStoreError`. botocore retries what it can ("standard" mode); idempotent
  calls are then retried again by :func:`~hotspare.store.base.retrying` with capped
  backoff (botocore does not retry a body cut short after the headers arrived);
- any other S3 error -> :class:`StoreError` carrying the S3 code and message.

Every message names the object as ``s3://bucket/prefix/key``.

Terms:
- part: one piece of a multipart upload. S3 wants every part but the last to be between
  5 MiB and 5 GiB, and at most 10,000 parts.
- copy part: a part filled on the server from a range of an existing object
  (``UploadPartCopy``); its bytes never pass through this process.
- data part: a part whose bytes this process sends: new bytes, ranges of existing objects
  too small to be a copy part on their own (downloaded with a ranged GET first), and ranges
  of a local file (:meth:`S3Store.put_file`).
- uploaded bytes: the sum of the data parts' sizes, what :meth:`S3Store.compose` returns.

Atomicity: a multipart upload becomes visible only at ``CompleteMultipartUpload``; any
failure before that aborts it, so a half-done compose or upload never shows an object. (A
process killed mid-way leaves an invisible incomplete upload; a bucket lifecycle rule
``AbortIncompleteMultipartUpload`` reclaims its space.)

Create-only writes send ``If-None-Match: *`` on ``PutObject`` and, for multipart uploads,
on ``CompleteMultipartUpload`` (after a cheap early existence check that spares the upload
work in the common case). SeaweedFS 4.48 honours both (412 when the key exists, the old
object kept; ``tests/test_store.py`` checks it), as AWS S3 does since 2024.

Listing order: AWS lists keys in byte order (``d-z`` < ``d/x``). SeaweedFS 4.48 lists in
directory-tree order instead (``d/x`` before ``d-z``: a "directory" sorts by its bare name),
consistently with its own ``StartAfter``. The two agree whenever no key segment is another's
prefix followed by a byte below ``/`` (such as ``-`` or ``.``) at the same level, e.g.
within one directory of zero-padded names. Where order matters, list one such directory.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import boto3
from botocore import exceptions as bex
from botocore.config import Config

from hotspare.errors import AlreadyExists, NotFound, StoreError, TransientStoreError, UsageError
from hotspare.store.base import (
    CopyRange,
    ObjectInfo,
    PartReceipt,
    Segment,
    Store,
    check_key,
    check_prefix,
    check_receipts,
    retry_delays,
    retrying,
    tell_fault,
)

MiB = 1 << 20
MIN_PART = 5 * MiB  # S3's smallest part (but the last)
MAX_PART = 5 << 30  # S3's largest part
MAX_PARTS = 10_000
# Files up to this size go up in one PutObject; bigger ones as a multipart upload.
SINGLE_PUT_MAX = 64 * MiB
# Data parts are built in memory; this is their usual size (more only when a compose would
# otherwise need over 10,000 parts, see _plan_parts). Memory in use is about
# max_concurrency times this.
DATA_PART = 16 * MiB
# put_file's parts (read from the file into memory, max_concurrency at a time).
FILE_PART = 32 * MiB

_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_CONFLICT_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
_TRANSIENT_CODES = {
    "SlowDown",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "OperationAborted",
}
_TRANSIENT_BOTOCORE = (
    bex.ConnectionError,  # EndpointConnectionError, ConnectionClosedError, ...
    bex.HTTPClientError,  # ReadTimeoutError, ConnectTimeoutError, ...
    bex.IncompleteReadError,
    bex.ResponseStreamingError,
)


def translate(err: BaseException, name: str, *, create_only: bool = False) -> StoreError:
    """The hotspare error for a boto3/botocore error about object ``name``."""
    if isinstance(err, bex.ClientError):
        info = err.response.get("Error", {})
        code = str(info.get("Code", ""))
        message = info.get("Message") or ""
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _NOT_FOUND_CODES or (status == 404 and code not in ("NoSuchBucket", "NoSuchUpload")):
            return NotFound(name)
        if create_only and (code in _CONFLICT_CODES or status == 412):
            taken = AlreadyExists(name)
            # botocore retried a try that failed in transit: that try may have written it
            taken.after_retry = err.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) > 0
            return taken
        reason = f"{code or status}: {message}".rstrip(": ")
        if code in _TRANSIENT_CODES or status == 429 or status >= 500:
            return TransientStoreError(name, reason)
        return StoreError(name, reason)
    if isinstance(err, _TRANSIENT_BOTOCORE):
        return TransientStoreError(name, str(err))
    if isinstance(err, bex.NoCredentialsError | bex.PartialCredentialsError):
        return StoreError(name, f"{err} (set them in the store block or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    return StoreError(name, str(err))


@dataclass(frozen=True)
class _FileRange:
    """``length`` bytes of local file ``path`` from ``offset``: read when its part is sent."""

    path: str
    offset: int
    length: int


Piece = memoryview | CopyRange | _FileRange


@dataclass(frozen=True)
class _CopyPart:
    source: CopyRange


@dataclass(frozen=True)
class _DataPart:
    pieces: tuple[Piece, ...]
    size: int


_Part = _CopyPart | _DataPart


class S3Store(Store):
    """Objects under ``s3://bucket/prefix/``.

    Unset connection settings come from the usual AWS environment and config files
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``...).
    ``max_concurrency`` is how many parts of one upload are sent at once.
    """

    #: Keys per ListObjectsV2 page (S3's maximum is 1000; tests lower it to page often).
    list_page_size: int = 1000

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        max_concurrency: int = 4,
    ) -> None:
        if len(bucket) < 3 or "/" in bucket:
            raise UsageError(f"S3 bucket name {bucket!r} is invalid: it needs at least 3 characters")
        prefix = prefix.strip("/")
        self.bucket = bucket
        self.prefix = prefix + "/" if prefix else ""
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self.endpoint_url = (
            endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        )
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        self._access_key_id = access_key_id
        self._secret_access_key = secret_access_key
        self.max_concurrency = max(1, max_concurrency)
        self._client_lock = threading.Lock()
        self._client_obj: Any = None

    def process_env(self) -> dict[str, str]:
        """The AWS environment that lets another process open this store (e.g. nbdkit
        serving a point): passed in its environment, never on a command line."""
        env = {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_DEFAULT_REGION": self.region,
               "AWS_ACCESS_KEY_ID": self._access_key_id, "AWS_SECRET_ACCESS_KEY": self._secret_access_key}
        return {k: v for k, v in env.items() if v}

    def __repr__(self) -> str:  # never shows credentials
        return f"S3Store({self.url!r}, endpoint_url={self.endpoint_url!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Picklable (Prefect may ship a store to a worker): the client is rebuilt on use.
        state = self.__dict__.copy()
        state["_client_obj"] = None
        del state["_client_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._client_lock = threading.Lock()

    @property
    def _client(self) -> Any:
        # boto3 clients are thread-safe once built, but building one is not.
        with self._client_lock:
            if self._client_obj is None:
                session = boto3.session.Session(
                    aws_access_key_id=self._access_key_id,
                    aws_secret_access_key=self._secret_access_key,
                    region_name=self.region,  # None: the AWS config file may name one
                )
                config = Config(
                    retries={"mode": "standard", "max_attempts": 5},
                    connect_timeout=10,
                    read_timeout=120,
                    max_pool_connections=max(10, self.max_concurrency * 2),
                    # Custom endpoints (SeaweedFS, MinIO) rarely resolve bucket subdomains.
                    s3={"addressing_style": "path" if self.endpoint_url else "auto"},
                )
                self._client_obj = session.client(
                    "s3",
                    endpoint_url=self.endpoint_url,
                    # Signing needs a region; S3-compatible servers accept any.
                    region_name=session.region_name or "us-east-1",
                    config=config,
                )
            return self._client_obj

    def close(self) -> None:
        with self._client_lock:
            if self._client_obj is not None:
                self._client_obj.close()
                self._client_obj = None

    # ----------------------------------------------------------------- helpers

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _name(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    @contextlib.contextmanager
    def _call(self, key: str, *, create_only: bool = False) -> Iterator[None]:
        """The one place boto errors become hotspare errors."""
        try:
            yield
        except (bex.ClientError, bex.BotoCoreError) as err:
            raise translate(err, self._name(key), create_only=create_only) from err

    def _if_none_match(self, create_only: bool) -> dict[str, str]:
        return {"IfNoneMatch": "*"} if create_only else {}

    # --------------------------------------------------------------- interface

    def _put_retrying(self, key: str, create_only: bool, once: Callable[[], None], ours: Callable[[], bool]) -> None:
        """Run the put ``once`` with the store's retries. A create-only put whose earlier try
        failed in transit (it may have landed, its answer lost) and whose retry finds the
        key taken succeeds if the object is ``ours()``: what this put wrote. The earlier try
        is this loop's or botocore's own (seen: a reset after the server stored a pack)."""
        if not create_only:
            retrying(once)
            return
        lost = False
        for delay in (*retry_delays(), None):
            try:
                once()
                return
            except TransientStoreError as err:
                tell_fault(err)
                if delay is None:
                    raise
                lost = True
                time.sleep(delay)
            except AlreadyExists as err:
                if (lost or err.after_retry) and ours():
                    return
                raise

    def _holds(self, key: str, size: int, read: Callable[[int, int], bytes]) -> bool:
        """Whether object ``key`` has ``size`` bytes equal to ``read(offset, length)``'s."""
        try:
            if self.size(key) != size:
                return False
            step = 16 * MiB
            return all(self.get_range(key, at, min(step, size - at)) == read(at, min(step, size - at))
                       for at in range(0, size, step))
        except NotFound:
            return False

    def put(self, key: str, data: bytes | memoryview, *, create_only: bool = False) -> None:
        body = data if isinstance(data, bytes) else bytes(data)  # botocore takes no memoryview

        def once() -> None:
            with self._call(key, create_only=create_only):
                self._client.put_object(
                    Bucket=self.bucket, Key=self._key(key), Body=body, **self._if_none_match(create_only)
                )

        self._put_retrying(key, create_only, once, lambda: self._holds(key, len(body), lambda a, n: body[a:a + n]))

    def put_file(self, key: str, path: str, *, create_only: bool = False) -> None:
        full = self._key(key)
        try:
            size = os.path.getsize(path)
        except OSError as err:
            raise UsageError(f"{path}: cannot read local file ({err.strerror})") from err
        if size <= SINGLE_PUT_MAX:
            def once() -> None:
                try:
                    f = open(path, "rb")  # noqa: SIM115 - closed below
                except OSError as err:
                    raise UsageError(f"{path}: cannot read local file ({err.strerror})") from err
                with f, self._call(key, create_only=create_only):
                    # A file body streams from disk (and is re-read on a retry).
                    self._client.put_object(
                        Bucket=self.bucket, Key=full, Body=f, ContentLength=size,
                        **self._if_none_match(create_only),
                    )

            def read(at: int, n: int) -> bytes:
                with open(path, "rb") as f:
                    return os.pread(f.fileno(), n, at)

            self._put_retrying(key, create_only, once, lambda: self._holds(key, size, read))
            return
        part = max(FILE_PART, -(-size // MAX_PARTS))
        parts: list[_Part] = [
            _DataPart((_FileRange(path, off, min(part, size - off)),), min(part, size - off))
            for off in range(0, size, part)
        ]
        self._multipart(key, parts, create_only)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError(f"invalid byte range: offset={offset} length={length}")
        if length == 0:
            self.size(key)  # still NotFound for a missing object
            return b""
        return retrying(lambda: self._get_range(key, offset, length))

    def _get_range(self, key: str, offset: int, length: int) -> bytes:
        with self._call(key):
            try:
                resp = self._client.get_object(
                    Bucket=self.bucket, Key=self._key(key), Range=f"bytes={offset}-{offset + length - 1}"
                )
            except bex.ClientError as err:
                # 416: the range starts at or past the end, so the object exists.
                if err.response.get("Error", {}).get("Code") in ("InvalidRange", "416"):
                    return b""
                raise
            with contextlib.closing(resp["Body"]) as body:
                return body.read()

    def get(self, key: str) -> bytes:
        return retrying(lambda: self._get(key))

    def _get(self, key: str) -> bytes:
        with self._call(key):
            resp = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            with contextlib.closing(resp["Body"]) as body:
                return body.read()

    def size(self, key: str) -> int:
        return self.stat(key).size

    def stat(self, key: str) -> ObjectInfo:
        return retrying(lambda: self._stat(key))

    def _stat(self, key: str) -> ObjectInfo:
        with self._call(key):
            head = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        return ObjectInfo(key, int(head["ContentLength"]), head.get("LastModified"))

    def list(self, prefix: str, *, start_after: str | None = None) -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        return self._list(prefix, start_after)

    def _list(self, prefix: str, start_after: str | None) -> Iterator[ObjectInfo]:
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + prefix, "MaxKeys": self.list_page_size}
        if start_after:
            args["StartAfter"] = self.prefix + start_after
        cut = len(self.prefix)

        def page() -> dict[str, Any]:
            with self._call(prefix):
                return self._client.list_objects_v2(**args)

        while True:
            got = retrying(page)  # page by page, so a retry never repeats a key
            for obj in got.get("Contents", ()):
                if obj["Key"].endswith("/"):
                    continue  # a "directory marker" some tools create, not an object
                yield ObjectInfo(obj["Key"][cut:], int(obj["Size"]), obj.get("LastModified"))
            if not got.get("IsTruncated") or not got.get("NextContinuationToken"):
                return
            args["ContinuationToken"] = got["NextContinuationToken"]

    def delete(self, key: str) -> None:
        def once() -> None:
            with self._call(key):
                try:
                    self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
                except bex.ClientError as err:
                    if err.response.get("Error", {}).get("Code") not in _NOT_FOUND_CODES:
                        raise

        retrying(once)

    def compose(self, key: str, segments: Sequence[Segment], *, create_only: bool = False) -> int:
        """See :meth:`Store.compose`: a multipart upload where large copied ranges become
        ``UploadPartCopy`` parts. Returns the bytes sent from this process: new bytes plus
        the copied ranges that had to be downloaded to fill a part to S3's 5 MiB minimum."""
        self._key(key)
        items = _coalesce(segments)
        # Check every source range first, so a bad range fails before anything is written.
        sizes: dict[str, int] = {}
        for item in items:
            if isinstance(item, CopyRange):
                if item.key not in sizes:
                    sizes[item.key] = self.size(item.key)
                if item.offset + item.length > sizes[item.key]:
                    raise StoreError(
                        self._name(item.key),
                        f"copy range {item.offset}+{item.length} ends past the object's end "
                        f"({sizes[item.key]} bytes)",
                    )
        return self._multipart(key, _plan_parts(items), create_only)

    # ------------------------------------------------------- staged compose

    def begin_compose(self, key: str) -> str:
        with self._call(key):
            return str(self._client.create_multipart_upload(Bucket=self.bucket, Key=self._key(key))["UploadId"])

    def compose_part(self, key: str, token: str, number: int, offset: int, segments: Sequence[Segment]) -> PartReceipt:
        items = _coalesce(segments)
        if len(items) == 1 and isinstance(items[0], CopyRange):
            part: _Part = _CopyPart(items[0])
            size, uploaded = items[0].length, 0
        else:
            size = sum(i.length if isinstance(i, CopyRange) else len(i) for i in items)
            part = _DataPart(tuple(items), size)
            uploaded = size
        etag = self._send_part(key, token, number, part)
        return PartReceipt(number=number, offset=offset, size=size, etag=etag, uploaded=uploaded)

    def finish_compose(self, key: str, token: str, receipts: Sequence[PartReceipt], *, create_only: bool = False) -> None:
        parts = check_receipts(self._name(key), receipts)
        try:
            with self._call(key, create_only=create_only):
                self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=self._key(key), UploadId=token,
                    MultipartUpload={"Parts": [{"PartNumber": r.number, "ETag": r.etag} for r in parts]},
                    **self._if_none_match(create_only),
                )
        except BaseException:
            self.abort_compose(key, token)
            raise

    def abort_compose(self, key: str, token: str) -> None:
        with contextlib.suppress(Exception):
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=self._key(key), UploadId=token)

    # -------------------------------------------------------------- multipart

    def _multipart(self, key: str, parts: Sequence[_Part], create_only: bool) -> int:
        """Write ``key`` from ``parts``; returns the bytes of its data parts."""
        full = self._key(key)
        cond = self._if_none_match(create_only)
        if not parts or (len(parts) == 1 and isinstance(parts[0], _DataPart)):
            # Empty, or small enough for one request: a plain PutObject is as atomic.
            body = self._materialize(parts[0]) if parts else b""
            with self._call(key, create_only=create_only):
                self._client.put_object(Bucket=self.bucket, Key=full, Body=body, **cond)
            return len(body)
        if create_only and self.exists(key):
            # Cheap early refusal; the If-None-Match at completion is what makes it safe.
            raise AlreadyExists(self._name(key))
        with self._call(key):
            upload_id = self._client.create_multipart_upload(Bucket=self.bucket, Key=full)["UploadId"]
        try:
            with ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="hotspare-s3") as pool:
                futures = [pool.submit(self._send_part, key, upload_id, n, p) for n, p in enumerate(parts, 1)]
                _, pending = wait(futures, return_when=FIRST_EXCEPTION)
                for f in pending:
                    f.cancel()
                # Raise the first failure, in part order, so the error is reproducible.
                etags = [_result(f) for f in futures]
            with self._call(key, create_only=create_only):
                self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=full,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]},
                    **cond,
                )
        except BaseException:
            # The pool has finished (its with-block waits), so no part lands after the abort.
            with contextlib.suppress(Exception):
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
            raise
        return sum(p.size for p in parts if isinstance(p, _DataPart))

    def _send_part(self, key: str, upload_id: str, number: int, part: _Part) -> str:
        # Sending a part number again replaces it: idempotent, so retried.
        return retrying(lambda: self._send_part_once(key, upload_id, number, part))

    def _send_part_once(self, key: str, upload_id: str, number: int, part: _Part) -> str:
        full = self._key(key)
        if isinstance(part, _CopyPart):
            src = part.source
            with self._call(src.key):
                resp = self._client.upload_part_copy(
                    Bucket=self.bucket,
                    Key=full,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource={"Bucket": self.bucket, "Key": self._key(src.key)},
                    CopySourceRange=f"bytes={src.offset}-{src.offset + src.length - 1}",
                )
            return str(resp["CopyPartResult"]["ETag"])
        body = self._materialize(part)
        with self._call(key):
            resp = self._client.upload_part(
                Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=body
            )
        return str(resp["ETag"])

    def _materialize(self, part: _Part) -> bytes:
        """A data part's bytes: new bytes as given, copied ranges downloaded, files read."""
        assert isinstance(part, _DataPart)
        chunks: list[bytes | memoryview] = []
        for piece in part.pieces:
            if isinstance(piece, CopyRange):
                data = self.get_range(piece.key, piece.offset, piece.length)
                if len(data) != piece.length:
                    raise StoreError(self._name(piece.key), "object shrank during compose")
                chunks.append(data)
            elif isinstance(piece, _FileRange):
                try:
                    with open(piece.path, "rb") as f:
                        data = os.pread(f.fileno(), piece.length, piece.offset)
                except OSError as err:
                    raise UsageError(f"{piece.path}: cannot read local file ({err.strerror})") from err
                if len(data) != piece.length:
                    raise StoreError(piece.path, "local file shrank while being stored")
                chunks.append(data)
            else:
                chunks.append(piece)
        return chunks[0] if len(chunks) == 1 and isinstance(chunks[0], bytes) else b"".join(chunks)


def _result(future: Future[str]) -> str:
    if future.cancelled():
        raise StoreError("<multipart upload>", "part cancelled after an earlier part failed")
    return future.result()


# ----------------------------------------------------------------- part planning


def _coalesce(segments: Sequence[Segment]) -> list[CopyRange | memoryview]:
    """Drop empty segments and merge adjacent ranges of the same object (fewer requests)."""
    out: list[CopyRange | memoryview] = []
    for seg in segments:
        if isinstance(seg, CopyRange):
            check_key(seg.key)
            if seg.offset < 0 or seg.length < 0:
                raise ValueError(f"invalid copy range {seg}")
            if seg.length == 0:
                continue
            last = out[-1] if out else None
            if isinstance(last, CopyRange) and last.key == seg.key and last.offset + last.length == seg.offset:
                out[-1] = CopyRange(seg.key, last.offset, last.length + seg.length)
                continue
            out.append(seg)
        else:
            view = memoryview(seg).cast("B")
            if len(view):
                out.append(view)
    return out


def _plan_parts(items: Sequence[CopyRange | memoryview]) -> list[_Part]:
    """Parts for a compose, within S3's limits, copying on the server as much as it can.

    A copy range of at least ``copy_min`` bytes becomes copy parts; everything else goes into
    data parts of about ``data_part`` bytes. A data part shorter than 5 MiB that is followed
    by a large copy takes the copy's head to reach 5 MiB (S3's minimum for all but the last
    part). If that yields more than 10,000 parts, plan again with bigger thresholds: more
    bytes go through this process, but the upload stays valid.
    """
    copy_min, data_part = MIN_PART, DATA_PART
    while True:
        parts = _plan_once(items, copy_min, data_part)
        if len(parts) <= MAX_PARTS:
            return parts
        if copy_min >= MAX_PART and data_part >= MAX_PART:
            raise StoreError("<compose>", f"cannot fit {len(items)} segments into {MAX_PARTS} parts")
        # Grow what overflows: bigger data parts cost memory, a bigger copy_min downloads.
        copies = sum(isinstance(p, _CopyPart) for p in parts)
        if len(parts) - copies > MAX_PARTS // 2:
            data_part = min(data_part * 2, MAX_PART)
        if copies > MAX_PARTS // 2 or data_part >= MAX_PART:
            copy_min = min(copy_min * 2, MAX_PART)


def _plan_once(items: Sequence[CopyRange | memoryview], copy_min: int, data_part: int) -> list[_Part]:
    parts: list[_Part] = []
    buf: list[Piece] = []
    buf_len = 0

    def flush() -> None:
        nonlocal buf, buf_len
        if buf_len:
            parts.append(_DataPart(tuple(buf), buf_len))
            buf, buf_len = [], 0

    def add(piece: CopyRange | memoryview) -> None:
        """Append to the data part being built, starting a new one at ``data_part`` bytes."""
        nonlocal buf_len
        done = 0
        n = piece.length if isinstance(piece, CopyRange) else len(piece)
        while done < n:
            take = min(n - done, data_part - buf_len)
            if isinstance(piece, CopyRange):
                buf.append(CopyRange(piece.key, piece.offset + done, take))
            else:
                buf.append(piece[done : done + take])
            buf_len += take
            done += take
            if buf_len >= data_part:
                flush()

    for item in items:
        if isinstance(item, memoryview) or item.length < copy_min:
            add(item)
            continue
        offset, length = item.offset, item.length
        if 0 < buf_len < MIN_PART:
            need = MIN_PART - buf_len
            if length - need < copy_min:
                add(item)  # too little would be left to copy on its own: download it all
                continue
            add(CopyRange(item.key, offset, need))
            offset, length = offset + need, length - need
        flush()
        # Even split into parts of at most 5 GiB (each then well above 5 MiB).
        count = -(-length // MAX_PART)
        for i in range(count):
            start = offset + length * i // count
            end = offset + length * (i + 1) // count
            parts.append(_CopyPart(CopyRange(item.key, start, end - start)))
    flush()
    return parts
