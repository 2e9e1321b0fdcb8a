"""One place that turns a URI into a filesystem, retries transient storage errors, and writes files atomically.

Accepted URIs: a plain path (``/data/x``, ``data/x``), ``file:///data/x`` and ``s3://bucket/prefix``.
S3 endpoint, region and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL``
or ``AWS_ENDPOINT_URL_S3``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, profiles, IRSA), never from code.

**Transient errors** (`is_transient`, the one classification in the project): a dropped or refused
connection, a timeout, an S3 5xx, ``SlowDown`` / throttling, and the local errnos that network and FUSE
filesystems report for the same (``EIO``, ``ETIMEDOUT``, ``ECONNRESET``, ...). Every S3 request is retried
by the AWS SDK first (standard retry mode, ``AWS_MAX_ATTEMPTS`` attempts, default 5; connect timeout 5 s,
request timeout 60 s); `retry` then retries the whole operation with exponential backoff until
``CLIPDR_STORAGE_RETRY_S`` seconds (default 120) have passed, so a job rides out a short outage. An error
that persists is raised as `StorageError` naming the URI and the original error: it fails its unit of work
(a shard), it is never taken for bad data. A non-transient storage error (access denied, ...) is raised at
once, as `StorageError` from the readers; a missing file stays ``FileNotFoundError``.

**Reads** (`open_input`) are retried per range: a break in the middle of a file re-reads only the range
that failed, from the same offset, so a streamed tar shard goes on where it was.

**Writes** (`atomic_write`) make a file appear under its final name only when it is complete:
- locally, into a hidden temporary sibling (``.<name>.tmp-<hex>``) renamed into place at the end; a crash
  leaves at most a hidden temporary file, which listings skip;
- on S3, straight to the final key: up to 16 MiB as one ``PutObject`` sent at the end, larger as a
  multipart upload completed at the end and aborted on an exception, so the key never holds a partial
  object and no ``CopyObject`` is needed (it cannot copy objects over 5 GiB, and a temporary key leaves
  versions behind on a versioned bucket). pyarrow's S3 output stream cannot do this: its ``close()``,
  which ``with`` calls on an exception too, completes the upload with what was written, and pyarrow 25
  exposes no abort. So S3 writes go through boto3, with the same environment and retry settings. A
  process killed mid-upload leaves an incomplete multipart upload, invisible to readers: a bucket
  lifecycle rule (``AbortIncompleteMultipartUpload``) reclaims it.
"""

from __future__ import annotations

import errno
import functools
import io
import logging
import os
import posixpath
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import IO, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

logger = logging.getLogger(__name__)

S3_SCHEME = "s3://"
FILE_SCHEME = "file://"

RETRY_BUDGET_ENV = "CLIPDR_STORAGE_RETRY_S"
"""Seconds `retry` keeps retrying a transient error before giving up (0: no retry beyond the SDK's own)."""
DEFAULT_RETRY_BUDGET_S = 120.0
S3_MAX_ATTEMPTS_ENV = "AWS_MAX_ATTEMPTS"  # the AWS SDKs' own name for it
DEFAULT_S3_MAX_ATTEMPTS = 5
S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 60.0
ENVIRONMENT = (RETRY_BUDGET_ENV, S3_MAX_ATTEMPTS_ENV)
"""Storage settings read from the environment besides the AWS ones: workers of a job need the driver's."""

_FIRST_DELAY_S = 0.5
_MAX_DELAY_S = 15.0
_S3_PART_BYTES = 16 * 1024 * 1024  # grows every 1,000 parts: S3 allows 10,000 (see _S3Upload)

T = TypeVar("T")


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


# ----------------------------------------------------------------------------------------------------------
# Transient errors and retries


class StorageError(OSError):
    """The storage failed, not the data: ``transient`` says whether the cause was transient (then retries were
    spent on it). The original error is chained (``__cause__``) and named in the message."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


_TRANSIENT_ERRNOS = frozenset(
    {
        errno.EIO,  # what NFS, FUSE (s3fs, gcsfuse) and flaky disks report for a failed read or write
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.ENETRESET,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.EAGAIN,
        errno.ESTALE,  # an NFS handle that went stale: reopening fixes it
    }
)
# pyarrow's S3 errors are OSErrors whose message is "AWS Error <KIND> during <Operation> operation: ...", with
# "UNKNOWN (HTTP status <code>)" for a kind the SDK does not name.
_TRANSIENT_MESSAGE = re.compile(
    r"AWS Error (NETWORK_CONNECTION|SLOW_DOWN|THROTTLING|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|REQUEST_TIMEOUT)"
    r"|HTTP status (5\d\d|429)|HTTP response code: (5\d\d|429)"
    r"|\b(SlowDown|Throttl\w*|RequestTimeout|ServiceUnavailable|InternalError)\b"
)
_TRANSIENT_S3_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable", "InternalError"}
)


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error may go away by itself (network, timeout, throttling, a server error): such an
    error is retried and, if it persists, fails its unit of work; it is never a property of the data."""
    if isinstance(exc, StorageError):
        return exc.transient
    if isinstance(exc, TimeoutError | ConnectionError):  # socket timeouts, ECONNRESET, ECONNREFUSED, EPIPE, ...
        return True
    if isinstance(exc, OSError):
        return exc.errno in _TRANSIENT_ERRNOS or bool(_TRANSIENT_MESSAGE.search(str(exc)))
    module = type(exc).__module__ or ""
    if module.startswith(("botocore", "urllib3")):
        from botocore import exceptions as boto_errors

        if isinstance(exc, boto_errors.ConnectionError | boto_errors.HTTPClientError):
            return True  # refused, reset, closed, connect and read timeouts
        if isinstance(exc, boto_errors.ClientError):
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return status >= 500 or status == 429 or exc.response.get("Error", {}).get("Code") in _TRANSIENT_S3_CODES
    return False


def _env_number(name: str, parse: Callable[[str], T], default: T, minimum: T, meaning: str) -> T:
    """The environment's ``name`` parsed with ``parse`` and raised to ``minimum``; ``default`` when unset."""
    raw = os.environ.get(name, "")
    try:
        return max(minimum, parse(raw)) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not {meaning}") from None


def retry_budget_s() -> float:
    """Seconds to keep retrying a transient error (``CLIPDR_STORAGE_RETRY_S``, default 120)."""
    return _env_number(RETRY_BUDGET_ENV, float, DEFAULT_RETRY_BUDGET_S, 0.0, "a number of seconds")


def retry(fn: Callable[[], T], what: str, on_retry: Callable[[], None] | None = None) -> T:
    """``fn()``, retried with exponential backoff while it raises a transient error, for `retry_budget_s`.

    A non-transient error is raised as it is, at once. A transient error that outlasts the budget is raised as
    `StorageError` (``transient=True``) naming ``what``, the attempts and the original error.

    Args:
        fn: The operation; it must be safe to repeat.
        what: What it does, for messages (``read 8388608 bytes at 0 of s3://b/x.tar``).
        on_retry: Called before each new attempt (e.g. to reopen a broken stream); its own errors count as the
            attempt's.
    """
    budget = retry_budget_s()
    started = time.monotonic()
    delay = _FIRST_DELAY_S
    attempt = 1
    while True:
        try:
            if attempt > 1 and on_retry is not None:
                on_retry()
            return fn()
        except Exception as e:
            if not is_transient(e) or isinstance(e, StorageError):
                raise
            left = budget - (time.monotonic() - started)
            if left <= 0:
                raise StorageError(
                    f"{what}: {type(e).__name__}: {e} (a transient error; still failing after {attempt} attempts "
                    f"in {time.monotonic() - started:.1f} s, {RETRY_BUDGET_ENV}={budget:g})",
                    transient=True,
                ) from e
            pause = min(delay * random.uniform(0.5, 1.0), left)
            logger.warning("%s: %s: %s; retrying in %.1f s", what, type(e).__name__, e, pause)
            time.sleep(pause)
            delay = min(2 * delay, _MAX_DELAY_S)
            attempt += 1


# ----------------------------------------------------------------------------------------------------------
# URIs and filesystems


def _s3_max_attempts() -> int:
    return _env_number(S3_MAX_ATTEMPTS_ENV, int, DEFAULT_S3_MAX_ATTEMPTS, 1, "a whole number")


def _s3_settings() -> tuple[str | None, str | None, int]:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return endpoint, region, _s3_max_attempts()


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None, max_attempts: int) -> pafs.S3FileSystem:
    kwargs: dict[str, object] = {
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts),
        "connect_timeout": S3_CONNECT_TIMEOUT_S,
        "request_timeout": S3_REQUEST_TIMEOUT_S,
    }
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


@functools.lru_cache(maxsize=8)
def _s3_client(endpoint: str | None, region: str | None, max_attempts: int):
    """A boto3 S3 client with the settings of `_s3_filesystem` (writes only: see the module docstring)."""
    import boto3
    from botocore.config import Config as BotoConfig

    config = BotoConfig(
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        read_timeout=S3_REQUEST_TIMEOUT_S,
    )
    # A session of its own: boto3's default session is not safe to create clients from several threads.
    return boto3.session.Session().client("s3", endpoint_url=endpoint or None, region_name=region, config=config)


def _s3_path(uri: str) -> str:
    path = uri[len(S3_SCHEME) :].strip("/")
    if not path:
        raise ValueError(f"S3 URI {uri!r} names no bucket")
    return path


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Returns ``(filesystem, path)`` for a URI; the path is what the filesystem's own calls take."""
    if not uri:
        raise ValueError("empty storage URI")
    if is_s3(uri):
        path = _s3_path(uri)
        return _s3_filesystem(*_s3_settings()), path
    if uri.startswith(FILE_SCHEME):
        uri = uri[len(FILE_SCHEME) :]
    elif "://" in uri:
        raise ValueError(f"unsupported storage URI {uri!r}: use a path, file:// or s3://")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    """Joins path parts onto a URI, keeping its scheme."""
    if is_s3(uri) or uri.startswith(FILE_SCHEME):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def absolute(uri: str) -> str:
    """``uri`` with a relative local path made absolute (S3 and ``file://`` URIs unchanged, "" stays ""): for
    settings read by processes whose working directory is not the submitter's (Ray Train workers)."""
    if not uri or is_s3(uri) or uri.startswith(FILE_SCHEME):
        return uri
    return os.path.abspath(uri)


def basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/"))


def _is_hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return retry(lambda: fs.get_file_info(path).type != pafs.FileType.NotFound, f"look up {uri}")


def list_files(uri: str, suffixes: tuple[str, ...] = (), recursive: bool = False) -> list[str]:
    """Sorted URIs of the files under ``uri`` whose names end with one of ``suffixes``.

    Hidden and temporary names (leading ``.`` or ``_``) are skipped. A missing directory lists as empty.
    """
    fs, path = resolve(uri)

    def listing() -> list[pafs.FileInfo]:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return []
        return fs.get_file_info(pafs.FileSelector(path, recursive=recursive))

    found = []
    for info in retry(listing, f"list {uri}"):
        if info.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(info.path, path)
        if any(_is_hidden(part) for part in rel.split("/")):
            continue
        if suffixes and not info.base_name.endswith(suffixes):
            continue
        found.append(join(uri, rel))
    return sorted(found)


# ----------------------------------------------------------------------------------------------------------
# Reading


class _RetryingReader(io.RawIOBase):
    """A seekable binary file whose every read is one positioned read, retried (file reopened) on transient
    errors. Filesystem errors other than a missing file are raised as `StorageError`."""

    def __init__(self, uri: str) -> None:
        super().__init__()
        self.uri = uri
        self._fs, self._path = resolve(uri)
        self._file: pa.NativeFile | None = None
        self._size: int | None = None
        self._pos = 0
        self._call(self._open, "open")

    def _open(self) -> None:
        if self._file is not None:
            with suppress(Exception):
                self._file.close()
            self._file = None
        self._file = self._fs.open_input_file(self._path)

    def _call(self, fn: Callable[[], T], what: str) -> T:
        try:
            return retry(fn, f"{what} {self.uri}", on_retry=None if fn == self._open else self._open)
        except (StorageError, FileNotFoundError):
            raise
        except OSError as e:
            raise StorageError(f"{what} {self.uri}: {type(e).__name__}: {e}", transient=False) from e

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def size(self) -> int:
        if self._size is None:
            self._size = self._call(lambda: self._file.size(), "size of")
        return self._size

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos}.get(whence)
        self._pos = max(0, offset + (self.size() if base is None else base))
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        if not len(view):
            return 0
        position = self._pos
        # A positioned read, so a retry re-reads exactly this range; 0 bytes means the end of the file.
        data = self._call(lambda: self._file.read_at(len(view), position), f"read {len(view)} bytes at {position} of")
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def readall(self) -> bytes:
        """The rest of the file in one positioned read (one GET on S3), not in buffer-sized pieces."""
        position = self._pos
        data = self._call(lambda: self._file.read_at(max(0, self.size() - position), position), "read all of")
        self._pos += len(data)
        return data + super().readall()  # the file may have grown since its size was read

    def close(self) -> None:
        if self._file is not None:
            with suppress(Exception):
                self._file.close()
            self._file = None
        super().close()


@contextmanager
def open_input(uri: str, buffer_size: int = io.DEFAULT_BUFFER_SIZE) -> Iterator[IO[bytes]]:
    """A buffered, seekable binary file over ``uri`` whose reads are retried on transient errors.

    Each refill of the buffer is one positioned read (one ranged GET on S3) of ``buffer_size`` bytes or of what
    the caller asked for if more. Raises ``FileNotFoundError`` for a missing file and `StorageError` for any other
    storage failure (a transient one after `retry`'s budget): never a parsing error, so callers can tell a broken
    storage from broken data.
    """
    with io.BufferedReader(_RetryingReader(uri), buffer_size=buffer_size) as f:
        yield f


def read_bytes(uri: str) -> bytes:
    with open_input(uri) as f:
        return f.read()


# ----------------------------------------------------------------------------------------------------------
# Writing


class _S3Upload(io.RawIOBase):
    """Writes one S3 object: one PutObject at `commit` if it is small, else a multipart upload that `commit`
    completes and `abort` aborts. Nothing is visible under the key before `commit` returns."""

    def __init__(self, uri: str) -> None:
        super().__init__()
        self.uri = uri
        self.bucket, _, self.key = _s3_path(uri).partition("/")
        if not self.key:
            raise ValueError(f"S3 URI {uri!r} names a bucket, not an object")
        self._client = _s3_client(*_s3_settings())
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict] = []
        self._committed = False

    def writable(self) -> bool:
        return True

    def _part_bytes(self) -> int:
        # 16 MiB parts, 32 MiB from part 1,001, ...: 10,000 parts hold 880 GiB.
        return _S3_PART_BYTES * (1 + len(self._parts) // 1000)

    def write(self, data) -> int:
        self._buffer += data
        while len(self._buffer) >= self._part_bytes():
            size = self._part_bytes()
            self._upload_part(bytes(self._buffer[:size]))
            del self._buffer[:size]
        return memoryview(data).nbytes

    def _call(self, fn: Callable[[], T], what: str) -> T:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return retry(fn, f"{what} {self.uri}")
        except StorageError:
            raise
        except (BotoCoreError, ClientError) as e:
            raise StorageError(f"{what} {self.uri}: {type(e).__name__}: {e}", transient=False) from e

    def _upload_part(self, body: bytes) -> None:
        c, b, k = self._client, self.bucket, self.key
        if self._upload_id is None:
            created = self._call(lambda: c.create_multipart_upload(Bucket=b, Key=k), "start the upload of")
            self._upload_id = created["UploadId"]
        number, upload_id = len(self._parts) + 1, self._upload_id
        done = self._call(
            lambda: c.upload_part(Bucket=b, Key=k, UploadId=upload_id, PartNumber=number, Body=body),
            f"upload part {number} of",
        )
        self._parts.append({"PartNumber": number, "ETag": done["ETag"]})

    def commit(self) -> None:
        c, b, k = self._client, self.bucket, self.key
        if self._upload_id is None:
            body = bytes(self._buffer)
            self._call(lambda: c.put_object(Bucket=b, Key=k, Body=body), "put")
        else:
            if self._buffer:
                self._upload_part(bytes(self._buffer))
            upload = {"Parts": list(self._parts)}
            self._call(
                lambda: c.complete_multipart_upload(Bucket=b, Key=k, UploadId=self._upload_id, MultipartUpload=upload),
                "complete the upload of",
            )
        self._buffer.clear()
        self._committed = True

    def abort(self) -> None:
        self._buffer.clear()
        if self._upload_id is not None and not self._committed:
            upload_id, self._upload_id = self._upload_id, None
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=upload_id)
            except Exception as e:  # the upload stays invisible; a lifecycle rule reclaims its parts
                logger.warning("could not abort the multipart upload of %s: %s", self.uri, e)


@contextmanager
def atomic_write(uri: str) -> Iterator[pa.NativeFile]:
    """Yields a writable stream; the file appears under ``uri`` only if the block completes.

    On an exception nothing appears and the exception propagates (locally the temporary file is removed, on S3
    the multipart upload is aborted); a crash leaves at most a hidden temporary file that listings ignore, or an
    incomplete, invisible multipart upload. S3 requests are retried (`retry`); a failure raises `StorageError`.
    """
    if is_s3(uri):
        upload = _S3Upload(uri)
        try:
            # Closing the stream, which writers may do, never commits: only the end of the block does.
            yield pa.PythonFile(upload, mode="w")
            upload.commit()
        except BaseException:
            upload.abort()
            raise
        return
    fs, path = resolve(uri)
    parent, name = posixpath.split(path)
    fs.create_dir(parent, recursive=True)
    tmp_path = f"{parent}/.{name}.tmp-{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(tmp_path) as out:
            yield out
        fs.move(tmp_path, path)
    except BaseException:
        with suppress(OSError):  # FileNotFoundError included: the temporary file may never have been created
            fs.delete_file(tmp_path)
        raise


def write_bytes(uri: str, data: bytes) -> None:
    with atomic_write(uri) as out:
        out.write(data)


def delete(uri: str) -> None:
    """Deletes a file; missing files are fine."""
    fs, path = resolve(uri)

    def delete_file() -> None:
        with suppress(FileNotFoundError):
            fs.delete_file(path)

    retry(delete_file, f"delete {uri}")
