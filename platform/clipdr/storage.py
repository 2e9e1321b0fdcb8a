"""One place that turns a URI into a pyarrow filesystem, and writes files atomically.

Accepted URIs: a plain path (``/data/x``, ``data/x``), ``file:///data/x`` and ``s3://bucket/prefix``.
S3 endpoint, region and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL``
or ``AWS_ENDPOINT_URL_S3``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, profiles, IRSA), never from code.

Every write goes to a hidden temporary sibling (``.<name>.tmp-<hex>``) and is renamed into place only
after the data is complete, so a crash never leaves a partial file under its final name. Listings skip
hidden and temporary names. On S3 the rename is a server-side copy plus delete: the final key only
ever appears with its full content.
"""

from __future__ import annotations

import functools
import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import pyarrow as pa
import pyarrow.fs as pafs

S3_SCHEME = "s3://"
FILE_SCHEME = "file://"


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict[str, object] = {}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Returns ``(filesystem, path)`` for a URI; the path is what the filesystem's own calls take."""
    if not uri:
        raise ValueError("empty storage URI")
    if is_s3(uri):
        path = uri[len(S3_SCHEME) :].strip("/")
        if not path:
            raise ValueError(f"S3 URI {uri!r} names no bucket")
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return _s3_filesystem(endpoint, region), path
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
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str, suffixes: tuple[str, ...] = (), recursive: bool = False) -> list[str]:
    """Sorted URIs of the files under ``uri`` whose names end with one of ``suffixes``.

    Hidden and temporary names (leading ``.`` or ``_``) are skipped. A missing directory lists as empty.
    """
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    found = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(info.path, path)
        if any(_is_hidden(part) for part in rel.split("/")):
            continue
        if suffixes and not info.base_name.endswith(suffixes):
            continue
        found.append(join(uri, rel))
    return sorted(found)


@contextmanager
def open_input(uri: str) -> Iterator[pa.NativeFile]:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        yield f


def read_bytes(uri: str) -> bytes:
    with open_input(uri) as f:
        return f.read()


@contextmanager
def atomic_write(uri: str) -> Iterator[pa.NativeFile]:
    """Yields a writable stream; the file appears under ``uri`` only if the block completes.

    On an exception the temporary file is removed and the exception propagates; a crash leaves at
    most a hidden temporary file that listings ignore.
    """
    fs, path = resolve(uri)
    parent, name = posixpath.split(path)
    if not isinstance(fs, pafs.S3FileSystem):  # S3 has no folders: making one asks HeadBucket and writes markers
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
    with suppress(FileNotFoundError):
        fs.delete_file(path)
