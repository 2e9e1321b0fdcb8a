"""Source image-text shards: read webdataset tars and parquet files, write both.

Two source layouts are read, from a local path, ``file://`` or ``s3://`` (all IO goes through
:mod:`clipdr.storage`, and tars are streamed, so nothing needs a seekable local file):

- **webdataset tar** (img2dataset / DataComp): ``key.jpg|jpeg|png|webp`` + ``key.txt`` [+ ``key.json``].
  Members are grouped the webdataset way: consecutive members share a sample when their key (the path up
  to the first ``.`` of the basename) is equal; the rest of the basename, lowercased, is the extension.
  Members with other extensions (``.cls``, ...), basenames starting with ``.`` or holding no ``.``, and
  non-file members are ignored.
- **parquet**: one row per sample, columns ``key``, ``image``, ``caption`` [, ``meta``] by default (names
  configurable in :class:`ReaderConfig`). The image column is binary or a Hugging Face style struct
  ``{bytes, path}``; without a key column, keys are ``<file stem>-<row index>``.

Bad input never raises: each skipped sample, and each shard whose bytes are not a tar / parquet file (or
break part-way), is counted by :class:`SkipReason` in a caller's ``collections.Counter``, and reading goes on.
A failing *storage* is not bad input: a transient error (network, timeout, S3 5xx or throttling, ``EIO``) is
retried by :mod:`clipdr.storage` and, if it persists, raised as :class:`ShardReadError`, like any other storage
failure (access denied, a listed shard that is gone), so that the shard fails and a rerun redoes it; recording
it as a skip would lose the shard for good. Mistakes in how the reader is called (an unsupported suffix, a
configured column that a parquet file lacks, a source URI that does not exist) raise ``ValueError`` /
``FileNotFoundError``, since skipping would hide them.

Images are decoded with Pillow restricted to JPEG, PNG and WebP (other decoders, some of which shell out,
are never reached), refused by header size before the pixels are decoded, fully loaded so that truncation
is detected, and converted to RGB (:func:`to_rgb`). The original encoded bytes are kept unchanged in
:attr:`SourceSample.image_bytes`.
"""

from __future__ import annotations

import collections
import functools
import io
import json
import logging
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from clipdr import runstate, storage

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
"""Image member extensions of a webdataset sample, in order of preference when a sample has several."""
CAPTION_EXTENSION = "txt"
META_EXTENSION = "json"
TAR_SUFFIXES: tuple[str, ...] = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES: tuple[str, ...] = (".parquet",)

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # 8192 x 8192
DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_TEXT_BYTES = 1024 * 1024
DEFAULT_MAX_HEADER_BYTES = 64 * 1024  # PATH_MAX is 4096: a real long name or pax block is far smaller

_PIL_FORMATS = ("JPEG", "PNG", "WEBP")  # MPO (multi-picture JPEG) opens through the JPEG entry
_FORMAT_EXTENSION = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
_READ_BUFFER_BYTES = 8 * 1024 * 1024  # one S3 GET per 8 MiB instead of per tar record (10 KiB)
_PARQUET_ROWS_PER_GROUP = 256


class SkipReason(StrEnum):
    """Why a sample or a shard was skipped; the values are the keys of the ``skipped`` counters.

    A sample gets exactly one reason, the first that applies in this order: key, caption, then image
    checks (captions are checked first because they are cheap and the image would be decoded for nothing).
    """

    INVALID_KEY = "invalid_key"
    """The key is not valid UTF-8 (a tar member name, or a parquet key of bytes, that does not decode), so it
    could not be written as a string: skipped rather than renamed, so that two keys never merge into one."""
    DUPLICATE_KEY = "duplicate_key"
    """The key already appeared earlier in the same shard (the first occurrence wins, whether or not it was
    kept), or a tar sample holds the same extension twice."""
    MISSING_CAPTION = "missing_caption"
    """No ``.txt`` member / null caption."""
    CAPTION_TOO_LONG = "caption_too_long"
    """The caption exceeds ``ReaderConfig.max_text_bytes`` (a safety valve, not a tokenizer limit)."""
    UNDECODABLE_CAPTION = "undecodable_caption"
    """The caption bytes are not valid UTF-8."""
    EMPTY_CAPTION = "empty_caption"
    """The caption is empty or whitespace only."""
    MISSING_IMAGE = "missing_image"
    """No image member / null image (a Hugging Face struct with only a ``path`` counts as missing)."""
    EMPTY_IMAGE = "empty_image"
    """Zero image bytes."""
    IMAGE_TOO_LARGE = "image_too_large"
    """More than ``max_pixels`` by its header (or Pillow's own decompression-bomb limit), or more than
    ``max_image_bytes`` encoded."""
    CORRUPT_IMAGE = "corrupt_image"
    """Not readable as JPEG, PNG or WebP: unknown format, garbage header, or a WebP cut short (libwebp
    validates the whole container when opening)."""
    TRUNCATED_IMAGE = "truncated_image"
    """The header is fine but the pixel data is incomplete or fails to decode."""
    UNREADABLE_SHARD = "unreadable_shard"
    """The shard's bytes are not a tar / parquet file at all (empty, garbage, no parquet footer). A shard that
    cannot be read because of the storage (missing, access denied, a network error) is not skipped: see
    :class:`ShardReadError`."""
    BROKEN_TAR = "broken_tar"
    """The tar broke part-way (truncated, garbage header, no end marker, an extended header larger than
    ``ReaderConfig.max_header_bytes`` or badly framed, a sparse member); the samples completed before the break
    are kept, the rest of the shard is lost. Counted once per shard."""
    BROKEN_PARQUET = "broken_parquet"
    """A parquet row group failed to read; the rows before it are kept. Counted once per shard."""


class InvalidSampleError(ValueError):
    """A sample that must be skipped; ``reason`` says why."""

    def __init__(self, reason: SkipReason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else str(reason))
        self.reason = reason


@dataclass(frozen=True)
class SourceSample:
    """One image-text pair from a source shard.

    Attributes:
        key: Sample key, unique within its shard.
        image_bytes: The encoded image exactly as stored in the source.
        caption: The caption, stripped of surrounding whitespace.
        meta: JSON metadata (img2dataset's ``key.json``), empty when absent or invalid.
        image_ext: Format of ``image_bytes`` (``jpg``, ``png`` or ``webp``); readers set it from the decoded
            content, not from the member name.
        image: The decoded RGB image, filled by readers; writers ignore it.
    """

    key: str
    image_bytes: bytes
    caption: str
    meta: dict = field(default_factory=dict)
    image_ext: str = "jpg"
    image: Image.Image | None = None


@dataclass(frozen=True)
class ReaderConfig:
    """How source shards are read.

    Attributes:
        key_column: Parquet column of sample keys; optional in the file.
        image_column: Parquet column of encoded images (binary, or a struct with a ``bytes`` field).
        caption_column: Parquet column of captions (string or binary).
        meta_column: Parquet column of JSON metadata strings; optional in the file.
        max_pixels: Images with more pixels (by header) are skipped before their pixels are decoded.
        max_image_bytes: Encoded images larger than this are skipped; tar members are not even read.
        max_text_bytes: Captions larger than this are skipped, larger JSON metadata is dropped.
        max_header_bytes: A tar extended header (GNU long name or link, pax record block; pax global headers
            together) larger than this breaks the shard before it is read: tarfile would hold it whole.
        parquet_batch_rows: Rows per parquet read batch.
    """

    key_column: str = "key"
    image_column: str = "image"
    caption_column: str = "caption"
    meta_column: str = "meta"
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    parquet_batch_rows: int = 64

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_image_bytes", "max_text_bytes", "max_header_bytes", "parquet_batch_rows"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ReaderConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("key_column", "image_column", "caption_column", "meta_column"):
            if not getattr(self, name):
                raise ValueError(f"ReaderConfig.{name} must not be empty")


DEFAULT_READER_CONFIG = ReaderConfig()


# ----------------------------------------------------------------------------------------------------------
# Images


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any Pillow image to 8-bit RGB.

    Transparency (alpha channels, ``tRNS`` palette / gray / RGB keys) is composited onto white. 16-bit and
    32-bit integer images (``I;16*``, ``I``: what 16-bit grayscale PNGs open as) are scaled from 0..65535
    to 0..255, not clipped; float images (``F``) are clipped to 0..255 as Pillow does.

    Args:
        image: A Pillow image in any mode.

    Returns:
        An RGB image; ``image`` itself when it already is plain RGB.
    """
    mode = image.mode
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N, I
        # round(v / 257) in integers, in place: float64 took 26 bytes a pixel at peak (1.6 GiB at max_pixels)
        values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
        values += 128
        values //= 257
        return Image.fromarray(values.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        gray = np.rint(np.clip(values, 0, 255)).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")  # also un-premultiplies RGBa / La and applies tRNS keys
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return image
    return image.convert("RGB")


def _decode(image_bytes: bytes, max_pixels: int) -> tuple[Image.Image, str]:
    """Decodes, validates and converts an image; returns it with the extension of its actual format."""
    if not image_bytes:
        raise InvalidSampleError(SkipReason.EMPTY_IMAGE)
    try:
        image = Image.open(io.BytesIO(image_bytes), formats=_PIL_FORMATS)
    except Image.DecompressionBombError as e:
        raise InvalidSampleError(SkipReason.IMAGE_TOO_LARGE, str(e)) from None
    except MemoryError:
        raise
    except Exception as e:  # Pillow raises many types on garbage: OSError, SyntaxError, struct.error, ...
        raise InvalidSampleError(SkipReason.CORRUPT_IMAGE, f"{type(e).__name__}: {e}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidSampleError(SkipReason.IMAGE_TOO_LARGE, f"{width}x{height} > {max_pixels} pixels")
    try:
        image.load()  # decodes all pixel data: a truncated file fails here, not at open
    except MemoryError:
        raise
    except Exception as e:
        raise InvalidSampleError(SkipReason.TRUNCATED_IMAGE, f"{type(e).__name__}: {e}") from None
    try:
        rgb = to_rgb(image)
    except MemoryError:
        raise
    except Exception as e:  # an exotic mode Pillow cannot convert
        raise InvalidSampleError(SkipReason.CORRUPT_IMAGE, f"mode {image.mode}: {e}") from None
    return rgb, _FORMAT_EXTENSION.get(image.format or "", "jpg")


def decode_rgb(image_bytes: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decodes an encoded JPEG, PNG or WebP image to RGB.

    The size is checked from the header before any pixel is decoded, then the whole image is loaded, so a
    truncated file is an error (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone and must stay False).

    Args:
        image_bytes: The encoded image.
        max_pixels: Images with more pixels than this are refused.

    Returns:
        The image converted with :func:`to_rgb`.

    Raises:
        InvalidSampleError: With ``reason`` one of ``empty_image``, ``image_too_large``, ``corrupt_image``,
            ``truncated_image``.
    """
    return _decode(image_bytes, max_pixels)[0]


# ----------------------------------------------------------------------------------------------------------
# Sample validation shared by both formats


class TooLarge:
    """Stands in for a tar member that was not read because of its size."""

    def __init__(self, num_bytes: int) -> None:
        self.num_bytes = num_bytes


def _check_caption(raw: bytes | TooLarge | None, max_text_bytes: int) -> str:
    if raw is None:
        raise InvalidSampleError(SkipReason.MISSING_CAPTION)
    if isinstance(raw, TooLarge):
        raise InvalidSampleError(SkipReason.CAPTION_TOO_LONG, f"{raw.num_bytes} bytes")
    if len(raw) > max_text_bytes:
        raise InvalidSampleError(SkipReason.CAPTION_TOO_LONG, f"{len(raw)} bytes")
    try:
        caption = raw.decode("utf-8-sig")  # -sig: drop a byte-order mark some tools write
    except UnicodeDecodeError as e:
        raise InvalidSampleError(SkipReason.UNDECODABLE_CAPTION, str(e)) from None
    caption = caption.strip()
    if not caption:
        raise InvalidSampleError(SkipReason.EMPTY_CAPTION)
    return caption


def _parse_meta(raw: object, max_text_bytes: int) -> dict:
    """JSON metadata as a dict; anything else (invalid or oversized JSON, not an object) is dropped: it is only
    metadata."""
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, bytes | str) or len(raw) > max_text_bytes:
        return {}
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _check_key(key: str) -> None:
    """Readers decode undecodable key bytes with ``surrogateescape`` (as ``tarfile`` does member names); such a key
    cannot be encoded back to UTF-8, so no writer could store it."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidSampleError(SkipReason.INVALID_KEY, f"{key!r} is not valid UTF-8") from None


def build_sample(
    key: str,
    image_bytes: bytes | TooLarge | None,
    caption_raw: bytes | TooLarge | None,
    meta_raw: object,
    config: ReaderConfig,
) -> SourceSample:
    _check_key(key)
    caption = _check_caption(caption_raw, config.max_text_bytes)
    if image_bytes is None:
        raise InvalidSampleError(SkipReason.MISSING_IMAGE)
    if isinstance(image_bytes, TooLarge) or len(image_bytes) > config.max_image_bytes:
        num_bytes = image_bytes.num_bytes if isinstance(image_bytes, TooLarge) else len(image_bytes)
        raise InvalidSampleError(SkipReason.IMAGE_TOO_LARGE, f"{num_bytes} encoded bytes")
    image, image_ext = _decode(image_bytes, config.max_pixels)
    return SourceSample(
        key=key,
        image_bytes=image_bytes,
        caption=caption,
        meta=_parse_meta(meta_raw, config.max_text_bytes),
        image_ext=image_ext,
        image=image,
    )


# ----------------------------------------------------------------------------------------------------------
# Webdataset tar


class UnreadableShardError(Exception):
    pass


class BrokenShardError(Exception):
    pass


class ShardReadError(OSError):
    """Reading a shard failed in the storage, not in its data (`storage.StorageError`, or the shard is missing):
    raised, never counted as a skip, so the shard's unit of work fails and a rerun redoes it."""

    def __init__(self, uri: str, cause: BaseException) -> None:
        super().__init__(f"cannot read source shard {uri}: {cause}")
        self.uri = uri
        self.transient = storage.is_transient(cause)


class _StrictTarInfo(tarfile.TarInfo):
    """Makes a bad header an error; plain ``tarfile`` silently ends the archive at one, or trusts it too far.

    ``TarFile.next`` treats a garbage, partial or missing header after the first member as the end of the
    archive, so a tar cut or corrupted at a header would lose its tail without a trace. Only the all-zero
    end-of-archive block is a clean end.

    Extended headers are bounded before they are read. ``tarfile`` reads a GNU long name / long link or a pax
    record block whole into memory, however large its header says it is (a 0.5 MB ``.tar.gz`` declaring a 512 MiB
    long name made the reader allocate 1 GiB), follows a chain of them by recursion, and parses pax records with
    regular expressions that are quadratic in runs of digits in Python 3.11.7 (a 64 KiB block took 70 s; the
    stdlib's own fix, CVE-2024-6232, came in 3.11.10). So a longer header than ``max_header_bytes`` (pax global
    headers counted together, as ``tarfile`` accumulates them), a chain of more than
    ``_MAX_EXTENDED_HEADERS``, a badly framed pax record and a sparse member (whose maps ``tarfile`` also reads
    unbounded) each raise ``tarfile.ReadError``: the shard is broken there. Pax records are parsed here in one
    linear pass, as Python 3.12 does.
    """

    max_header_bytes = DEFAULT_MAX_HEADER_BYTES  # set per reader config by `_tarinfo_class`

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as e:
            raise tarfile.ReadError(f"bad tar header at offset {tarfile_.offset}: {e}") from None

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type not in _EXTENDED_HEADER_TYPES:
            tarfile_.clipdr_extended_headers = 0
            if self.type == tarfile.GNUTYPE_SPARSE:
                raise tarfile.ReadError(f"sparse member {self.name!r} at offset {self.offset}: not supported")
            return super()._proc_member(tarfile_)
        chain = getattr(tarfile_, "clipdr_extended_headers", 0) + 1
        tarfile_.clipdr_extended_headers = chain
        if chain > _MAX_EXTENDED_HEADERS:
            raise tarfile.ReadError(f"more than {_MAX_EXTENDED_HEADERS} extended headers in a row at {self.offset}")
        size = self.size
        if self.type == tarfile.XGLTYPE:  # global records accumulate over the archive
            size += sum(len(k) + len(v) for k, v in tarfile_.pax_headers.items())
        if size > self.max_header_bytes:
            raise tarfile.ReadError(
                f"extended tar header of type {self.type!r} at offset {self.offset} declares {size} bytes, more than "
                f"max_header_bytes={self.max_header_bytes}"
            )
        return super()._proc_member(tarfile_)

    def _proc_pax(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        """The stdlib's pax header processing with a linear record parser, and sparse maps refused."""
        buf = tarfile_.fileobj.read(self._block(self.size))
        if len(buf) < self.size:
            raise tarfile.ReadError(f"pax header at offset {self.offset} ends after {len(buf)} of {self.size} bytes")
        records = _parse_pax_records(buf[: self.size], self.offset)
        pax_headers = tarfile_.pax_headers if self.type == tarfile.XGLTYPE else tarfile_.pax_headers.copy()
        charset = next((value for keyword, value in records if keyword == b"hdrcharset"), None)
        if charset is not None:
            pax_headers["hdrcharset"] = charset.decode("utf-8", "replace")
        name_encoding = tarfile_.encoding if pax_headers.get("hdrcharset") == "BINARY" else "utf-8"
        for raw_keyword, raw_value in records:
            keyword = self._decode_pax_field(raw_keyword, "utf-8", "utf-8", tarfile_.errors)
            encoding = name_encoding if keyword in tarfile.PAX_NAME_FIELDS else "utf-8"
            pax_headers[keyword] = self._decode_pax_field(raw_value, encoding, tarfile_.encoding, tarfile_.errors)
        if any(keyword.startswith("GNU.sparse.") for keyword in pax_headers):
            raise tarfile.ReadError(f"sparse member at offset {self.offset}: not supported")
        try:
            member = self.fromtarfile(tarfile_)
        except tarfile.HeaderError as e:
            raise tarfile.SubsequentHeaderError(str(e)) from None
        if self.type != tarfile.XGLTYPE:  # extended header: patch the member that follows
            member._apply_pax_info(pax_headers, tarfile_.encoding, tarfile_.errors)
            member.offset = self.offset
            if "size" in pax_headers:  # the next header starts after the data of the size the record gives
                offset = member.offset_data
                if member.isreg() or member.type not in tarfile.SUPPORTED_TYPES:
                    offset += member._block(member.size)
                tarfile_.offset = offset
        return member


_EXTENDED_HEADER_TYPES = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)
_MAX_EXTENDED_HEADERS = 8  # before one member: GNU tar and pax writers use at most a few
_PAX_LENGTH = re.compile(rb"([0-9]{1,20}) ")


def _parse_pax_records(buf: bytes, offset: int) -> list[tuple[bytes, bytes]]:
    """``(keyword, value)`` of each ``"<length> <keyword>=<value>\\n"`` record, checking the framing of each."""
    records, pos = [], 0
    while pos < len(buf) and buf[pos] != 0:
        match = _PAX_LENGTH.match(buf, pos)
        length = int(match.group(1)) if match else 0
        end = pos + length
        if not match or length < 5 or end > len(buf) or buf[end - 1] != 0x0A:
            raise tarfile.ReadError(f"badly framed pax record at offset {offset} + {pos}")
        keyword, equals, value = buf[match.end() : end - 1].partition(b"=")
        if not keyword or not equals:
            raise tarfile.ReadError(f"pax record without a keyword at offset {offset} + {pos}")
        records.append((keyword, value))
        pos = end
    return records


@functools.cache
def _tarinfo_class(max_header_bytes: int) -> type[_StrictTarInfo]:
    """`_StrictTarInfo` with a header limit; ``tarfile`` takes a class, and reads the first member while opening."""
    return type("_StrictTarInfo", (_StrictTarInfo,), {"max_header_bytes": max_header_bytes})


_TAR_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, ValueError)
# Raised by the storage under a reader (the OSErrors above are the data's): they propagate, never count as skips.
_STORAGE_ERRORS = (storage.StorageError, FileNotFoundError)


def _split_member_name(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` by webdataset's rule, or None for names that hold no sample part."""
    while name.startswith("./"):
        name = name[2:]
    directory, base = posixpath.split(name)
    if base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def iter_tar_groups(
    uri: str,
    config: ReaderConfig,
    wanted: frozenset[str] | None = None,
    large_extensions: frozenset[str] | tuple[str, ...] = IMAGE_EXTENSIONS,
) -> Iterator[tuple[str, dict[str | None, Any]]]:
    """Yields ``(key, {extension: bytes | TooLarge})`` per run of consecutive members with one key.

    ``wanted`` are the member extensions kept (default: images, caption, json); members whose extension is in
    ``large_extensions`` may be up to ``config.max_image_bytes``, the others up to ``config.max_text_bytes``.

    A group is yielded as soon as the header of a member with another key has been read, so a break inside
    that member loses nothing before it. A repeated extension within a group is recorded under the ``None``
    key, which marks the group as a duplicate. Raises ``UnreadableShardError`` if the tar cannot be opened
    and ``BrokenShardError`` if it breaks later; the group in progress at a break is dropped, since it may
    be incomplete. A storage failure raises `ShardReadError` (see `iter_shard`).
    """
    wanted = wanted or frozenset({*IMAGE_EXTENSIONS, CAPTION_EXTENSION, META_EXTENSION})
    with _open_shard(uri, _READ_BUFFER_BYTES) as stream:
        try:
            tarinfo = _tarinfo_class(config.max_header_bytes)
            archive = tarfile.open(fileobj=stream, mode="r|*", tarinfo=tarinfo)  # noqa: SIM115 - entered below
        except _STORAGE_ERRORS:
            raise
        except _TAR_READ_ERRORS as e:
            raise UnreadableShardError(f"{type(e).__name__}: {e}") from None
        with archive:
            key: str | None = None
            group: dict[str | None, Any] = {}
            while True:
                try:
                    member = archive.next()
                except _STORAGE_ERRORS:
                    raise
                except _TAR_READ_ERRORS as e:
                    raise BrokenShardError(f"{type(e).__name__}: {e}") from None
                if member is None:
                    break
                archive.members.clear()  # a stream needs no index of past members; it would grow with the shard
                parsed = _split_member_name(member.name) if member.isfile() else None
                if parsed is None or parsed[1] not in wanted:
                    continue
                member_key, ext = parsed
                if member_key != key:
                    if key is not None:
                        yield key, group
                    key, group = member_key, {}
                limit = config.max_image_bytes if ext in large_extensions else config.max_text_bytes
                try:
                    data = TooLarge(member.size) if member.size > limit else _read_member(archive, member)
                except _STORAGE_ERRORS:
                    raise
                except _TAR_READ_ERRORS as e:
                    raise BrokenShardError(f"{type(e).__name__}: {e}") from None
                group[None if ext in group else ext] = data
            if key is not None:
                yield key, group


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    member_file = archive.extractfile(member)
    assert member_file is not None, "regular files always have data"
    data = member_file.read()
    if len(data) != member.size:
        raise tarfile.ReadError(f"member {member.name} ends after {len(data)} of {member.size} bytes")
    return data


@contextmanager
def _open_shard(uri: str, buffer_size: int = io.DEFAULT_BUFFER_SIZE) -> Iterator[IO[bytes]]:
    """A buffered stream over a shard (`storage.open_input`: transient errors are retried in it).

    A storage failure is not bad data: it raises `ShardReadError` naming the shard and the original error, at open
    or at any later read, so that the shard fails and a rerun redoes it instead of recording a skip. A listed shard
    that is missing is such a failure too: the source changed under the job.
    """
    try:
        with storage.open_input(uri, buffer_size) as stream:
            yield stream
    except (storage.StorageError, FileNotFoundError) as e:
        raise ShardReadError(uri, e) from e


def _iter_tar_samples(uri: str, skipped: collections.Counter, config: ReaderConfig) -> Iterator[SourceSample]:
    seen: set[str] = set()
    for key, group in iter_tar_groups(uri, config):
        try:
            duplicate = key in seen or None in group
            seen.add(key)
            if duplicate:
                raise InvalidSampleError(SkipReason.DUPLICATE_KEY, key)
            image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in group), None)
            image = group[image_ext] if image_ext else None
            sample = build_sample(key, image, group.get(CAPTION_EXTENSION), group.get(META_EXTENSION), config)
        except InvalidSampleError as e:
            skipped[e.reason] += 1
            logger.debug("skipping %s in %s: %s", key, uri, e)
            continue
        yield sample


# ----------------------------------------------------------------------------------------------------------
# Parquet


def _column_as_pylist(column: pa.Array | pa.ChunkedArray) -> list:
    """Python values of a column; strings come back as bytes so that invalid UTF-8 is caught per row."""
    if pa.types.is_string(column.type):
        column = column.cast(pa.binary())
    elif pa.types.is_large_string(column.type):
        column = column.cast(pa.large_binary())
    return column.to_pylist()


_TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)


def _key_str(key: object) -> str:
    """A key as text. Bytes that are not UTF-8 are decoded as ``tarfile`` decodes member names (surrogateescape),
    so that `build_sample` skips both alike; ``backslashreplace`` would turn the byte 0xE9 into the four characters
    of another sample's valid key."""
    return key.decode("utf-8", "surrogateescape") if isinstance(key, bytes) else str(key)


def _image_column_bytes(column: pa.Array) -> list[bytes | None]:
    if pa.types.is_struct(column.type):
        return [None if value is None else value.get("bytes") for value in column.to_pylist()]
    return column.to_pylist()


def _check_parquet_schema(schema: pa.Schema, uri: str, config: ReaderConfig) -> None:
    for name in (config.image_column, config.caption_column):
        if name not in schema.names:
            raise ValueError(
                f"parquet shard {uri} has no column {name!r} (columns: {', '.join(schema.names)}); "
                "set the column names in the reader config"
            )
    image_type = schema.field(config.image_column).type
    image_ok = pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)
    if pa.types.is_struct(image_type):
        image_ok = image_type.get_field_index("bytes") >= 0
    if not image_ok:
        raise ValueError(
            f"parquet column {config.image_column!r} of {uri} is {image_type}: expected binary or a struct with "
            "a 'bytes' field"
        )
    caption_type = schema.field(config.caption_column).type
    if not any(is_type(caption_type) for is_type in _TEXT_TYPES):
        raise ValueError(
            f"parquet column {config.caption_column!r} of {uri} is {caption_type}: expected string or binary"
        )


def _iter_parquet_rows(uri: str, config: ReaderConfig) -> Iterator[tuple[str, Any, Any, Any]]:
    """Yields ``(key, image, caption, meta)`` raw values per row; raises the private shard errors."""
    with _open_shard(uri) as source:
        try:
            parquet_file = pq.ParquetFile(source)
            schema = parquet_file.schema_arrow
        except _STORAGE_ERRORS:
            raise
        except (OSError, ValueError, pa.ArrowException) as e:
            raise UnreadableShardError(f"{type(e).__name__}: {e}") from None
        _check_parquet_schema(schema, uri, config)
        has_key = config.key_column in schema.names
        has_meta = config.meta_column in schema.names
        columns = [config.image_column, config.caption_column]
        columns += [config.key_column] if has_key else []
        columns += [config.meta_column] if has_meta else []
        stem = storage.basename(uri).removesuffix(".parquet")
        batches = parquet_file.iter_batches(batch_size=config.parquet_batch_rows, columns=columns)
        row_index = 0
        while True:
            try:
                batch = next(batches, None)
                if batch is None:
                    break
                images = _image_column_bytes(batch.column(config.image_column))
                captions = _column_as_pylist(batch.column(config.caption_column))
                keys = _column_as_pylist(batch.column(config.key_column)) if has_key else [None] * batch.num_rows
                metas = _column_as_pylist(batch.column(config.meta_column)) if has_meta else [None] * batch.num_rows
            except _STORAGE_ERRORS:
                raise
            except (OSError, ValueError, pa.ArrowException) as e:
                raise BrokenShardError(f"{type(e).__name__}: {e}") from None
            for key, image, caption, meta in zip(keys, images, captions, metas, strict=True):
                yield (f"{stem}-{row_index:06d}" if key is None else _key_str(key)), image, caption, meta
                row_index += 1


def _iter_parquet_samples(uri: str, skipped: collections.Counter, config: ReaderConfig) -> Iterator[SourceSample]:
    seen: set[str] = set()
    for key, image, caption, meta in _iter_parquet_rows(uri, config):
        try:
            if key in seen:
                raise InvalidSampleError(SkipReason.DUPLICATE_KEY, key)
            seen.add(key)
            sample = build_sample(key, image, caption, meta, config)
        except InvalidSampleError as e:
            skipped[e.reason] += 1
            logger.debug("skipping %s in %s: %s", key, uri, e)
            continue
        yield sample


# ----------------------------------------------------------------------------------------------------------
# Reading: shards and sources


def _is_tar(uri: str) -> bool:
    return uri.lower().endswith(TAR_SUFFIXES)


def _is_parquet(uri: str) -> bool:
    return uri.lower().endswith(PARQUET_SUFFIXES)


def iter_shard(
    uri: str, skipped: collections.Counter, *, config: ReaderConfig = DEFAULT_READER_CONFIG
) -> Iterator[SourceSample]:
    """Streams the valid samples of one source shard, counting what it skips.

    Args:
        uri: A ``.tar`` (``.tar.gz``, ``.tgz``) or ``.parquet`` shard.
        skipped: Incremented by :class:`SkipReason` for every skipped sample, unreadable or broken shard.
        config: Column names and limits.

    Yields:
        Samples in shard order, with ``image`` decoded to RGB.

    Raises:
        ValueError: The suffix is not a supported shard format, or a parquet shard lacks a configured column.
        ShardReadError: The storage failed (after retries for a transient error), or the shard is missing; the
            samples yielded before it are all valid, but the shard is incomplete.
    """
    if _is_tar(uri):
        samples, broken = _iter_tar_samples(uri, skipped, config), SkipReason.BROKEN_TAR
    elif _is_parquet(uri):
        samples, broken = _iter_parquet_samples(uri, skipped, config), SkipReason.BROKEN_PARQUET
    else:
        raise ValueError(
            f"unsupported source shard {uri!r}: expected one of {', '.join(TAR_SUFFIXES + PARQUET_SUFFIXES)}"
        )
    try:
        yield from samples
    except UnreadableShardError as e:
        skipped[SkipReason.UNREADABLE_SHARD] += 1
        logger.warning("skipping unreadable source shard %s: %s", uri, e)
    except BrokenShardError as e:
        skipped[broken] += 1
        logger.warning("source shard %s is broken, keeping the samples before the break: %s", uri, e)


def list_shards(uri: str) -> list[str]:
    """Source shard URIs under a directory (recursively), sorted; ``[uri]`` when ``uri`` is one shard.

    A source is one format: when a directory holds tar shards, its parquet files are taken to be
    img2dataset's per-shard metadata sidecars (``00000.parquet`` beside ``00000.tar``) and are not listed.

    Args:
        uri: A directory (prefix) or a single shard file.

    Returns:
        Shard URIs; empty when the directory holds none.

    Raises:
        FileNotFoundError: Nothing exists at ``uri``.
        ValueError: ``uri`` is a file that is not a supported shard.
    """
    fs, path = storage.resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"source {uri!r} does not exist")
    if info.type == pafs.FileType.File:
        if not (_is_tar(uri) or _is_parquet(uri)):
            raise ValueError(
                f"unsupported source shard {uri!r}: expected one of {', '.join(TAR_SUFFIXES + PARQUET_SUFFIXES)}"
            )
        return [uri]
    files = storage.list_files(uri, recursive=True)
    tars = [f for f in files if _is_tar(f)]
    return tars or [f for f in files if _is_parquet(f)]


@dataclass(frozen=True)
class SourceShard:
    """One source shard and where its reinforced counterpart goes.

    Attributes:
        uri: Its URI.
        path: Its path relative to the source directory (``/``-separated); its name for a single-shard source.
        size: Its size in bytes.
    """

    uri: str
    path: str
    size: int

    @property
    def output_path(self) -> str:
        """Relative path of the shard a job derives from it: the same path, ending in ``.parquet``."""
        lower = self.path.lower()
        stem = next((self.path[: -len(s)] for s in TAR_SUFFIXES + PARQUET_SUFFIXES if lower.endswith(s)), self.path)
        return stem + ".parquet"


def describe_shards(uri: str) -> list[SourceShard]:
    """`list_shards` with each shard's relative path and size (one listing call), sorted by path.

    Raises:
        FileNotFoundError: Nothing exists at ``uri``.
        ValueError: ``uri`` is a file that is not a supported shard.
    """
    uris = list_shards(uri)
    if not uris:
        return []
    fs, _ = storage.resolve(uri)
    infos = fs.get_file_info([storage.resolve(u)[1] for u in uris])
    prefix = storage.join(uri, "")
    shards = [
        SourceShard(uri=u, path=u[len(prefix) :] if u.startswith(prefix) else storage.basename(u), size=int(i.size))
        for u, i in zip(uris, infos, strict=True)
    ]
    return sorted(shards, key=lambda s: s.path)


def fingerprint(shards: Sequence[SourceShard]) -> str:
    """``sha256:<hex>`` of the sorted shard paths and sizes: cheap (a listing) and stable across machines."""
    return runstate.fingerprint(sorted([s.path, s.size] for s in shards))


def iter_source(
    uri: str, skipped: collections.Counter, *, config: ReaderConfig = DEFAULT_READER_CONFIG
) -> Iterator[SourceSample]:
    """Streams the valid samples of every shard of a source, in shard order (see :func:`iter_shard`).

    Keys are unique within a shard only. An unreadable or broken shard is counted and reading goes on with
    the next one; a storage failure raises `ShardReadError`.

    Args:
        uri: A directory of shards or a single shard.
        skipped: Incremented by :class:`SkipReason`.
        config: Column names and limits.

    Raises:
        FileNotFoundError: Nothing exists at ``uri``.
        ValueError: ``uri`` holds no shards.
    """
    shards = list_shards(uri)
    if not shards:
        raise ValueError(f"no source shards ({', '.join(TAR_SUFFIXES + PARQUET_SUFFIXES)}) under {uri!r}")
    for shard in shards:
        yield from iter_shard(shard, skipped, config=config)


# ----------------------------------------------------------------------------------------------------------
# Writing


def _check_member_name(key: str, ext: str) -> None:
    if not key or key.startswith(("/", "./")) or key.endswith("/"):
        raise ValueError(f"invalid sample key {key!r}")
    base = posixpath.basename(key)
    if "." in base:
        raise ValueError(f"sample key {key!r} has a '.' in its basename: readers would split it differently")
    if not ext or "/" in ext or ext != ext.lower() or ext.startswith("."):
        raise ValueError(f"invalid member extension {ext!r} for key {key!r}: use a lowercase name without '.'/'/'")


def write_tar_shard(uri: str, members: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Writes a webdataset tar shard atomically, with reproducible member headers.

    Args:
        uri: Destination; the file appears only once complete.
        members: ``(key, {extension: bytes})`` per sample, e.g. ``("000001", {"jpg": ..., "txt": ...})``.

    Returns:
        The number of samples written.

    Raises:
        ValueError: A key repeats or contains a ``.`` in its basename, or an extension is not lowercase.
    """
    num_samples = 0
    seen: set[str] = set()
    with storage.atomic_write(uri) as out, tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for key, parts in members:
            if key in seen:
                raise ValueError(f"duplicate sample key {key!r} in {uri}")
            seen.add(key)
            for ext, data in parts.items():
                _check_member_name(key, ext)
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
            num_samples += 1
    return num_samples


def _check_image_ext(sample: SourceSample) -> str:
    if sample.image_ext not in IMAGE_EXTENSIONS:
        raise ValueError(
            f"sample {sample.key!r} has image_ext {sample.image_ext!r}; expected one of {IMAGE_EXTENSIONS}"
        )
    return sample.image_ext


def write_webdataset_shard(uri: str, samples: Iterable[SourceSample]) -> int:
    """Writes samples in the img2dataset / DataComp layout: ``key.<image_ext>``, ``key.txt``, ``key.json``.

    Args:
        uri: Destination ``.tar``.
        samples: Samples to write; ``image`` is ignored.

    Returns:
        The number of samples written.
    """
    members = (
        (
            sample.key,
            {
                _check_image_ext(sample): sample.image_bytes,
                CAPTION_EXTENSION: sample.caption.encode("utf-8"),
                META_EXTENSION: json.dumps(sample.meta, ensure_ascii=False).encode("utf-8"),
            },
        )
        for sample in samples
    )
    return write_tar_shard(uri, members)


PARQUET_SOURCE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("meta", pa.string(), nullable=False),
    ]
)
"""Schema written by :func:`write_parquet_shard` and read by the default :class:`ReaderConfig`."""


def write_parquet_shard(uri: str, samples: Iterable[SourceSample]) -> int:
    """Writes samples as a parquet source shard (:data:`PARQUET_SOURCE_SCHEMA`), atomically.

    Args:
        uri: Destination ``.parquet``.
        samples: Samples to write; ``image`` and ``image_ext`` are ignored (readers detect the format).

    Returns:
        The number of samples written.

    Raises:
        ValueError: A key repeats.
    """
    num_samples = 0
    seen: set[str] = set()
    rows: dict[str, list] = {name: [] for name in PARQUET_SOURCE_SCHEMA.names}

    def flush(writer: pq.ParquetWriter) -> None:
        if rows["key"]:
            writer.write_table(pa.table(rows, schema=PARQUET_SOURCE_SCHEMA))
            for values in rows.values():
                values.clear()

    with storage.atomic_write(uri) as out, pq.ParquetWriter(out, PARQUET_SOURCE_SCHEMA) as writer:
        for sample in samples:
            if sample.key in seen:
                raise ValueError(f"duplicate sample key {sample.key!r} in {uri}")
            seen.add(sample.key)
            rows["key"].append(sample.key)
            rows["image"].append(bytes(sample.image_bytes))
            rows["caption"].append(sample.caption)
            rows["meta"].append(json.dumps(sample.meta, ensure_ascii=False))
            num_samples += 1
            if len(rows["key"]) >= _PARQUET_ROWS_PER_GROUP:
                flush(writer)
        flush(writer)
    return num_samples
