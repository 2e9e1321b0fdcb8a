"""Source readers and writers: a bad-input corpus with exact skip counts, RGB conversion, round trips."""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import struct
import tarfile
import zlib
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipdr import storage
from clipdr.data import sources
from clipdr.data.sources import (
    InvalidSampleError,
    ReaderConfig,
    SkipReason,
    SourceSample,
    decode_rgb,
    describe_shards,
    fingerprint,
    iter_shard,
    iter_source,
    list_shards,
    to_rgb,
    write_parquet_shard,
    write_tar_shard,
    write_webdataset_shard,
)

# ----------------------------------------------------------------------------------------------------------
# Image builders


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _noise_rgb(size: int = 16, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` but holds no pixel data: cheap to build, huge to decode."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _palette_with_transparency() -> bytes:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (0, 0, 4, 8))  # left half index 1 (blue), right half index 0 (red, transparent)
    return _encode(image, "PNG", transparency=0)


def _good_images() -> dict[str, tuple[bytes, str]]:
    """``key -> (encoded bytes, member extension)``: one good image per colour mode and format."""
    rgb = _noise_rgb()
    gray16 = Image.fromarray((np.arange(64, dtype=np.uint32).reshape(8, 8) * 1000).astype(np.uint16))
    assert gray16.mode == "I;16"
    return {
        "rgb_jpg": (_encode(rgb, "JPEG"), "jpg"),
        "rgb_jpeg_ext": (_encode(rgb, "JPEG"), "jpeg"),
        "gray_l": (_encode(rgb.convert("L"), "PNG"), "png"),
        "bilevel_1": (_encode(rgb.convert("1"), "PNG"), "png"),
        "palette_p": (_encode(rgb.convert("P"), "PNG"), "png"),
        "palette_trns": (_palette_with_transparency(), "png"),
        "rgba": (_encode(rgb.convert("RGBA"), "PNG"), "png"),
        "gray_la": (_encode(rgb.convert("LA"), "PNG"), "png"),
        "cmyk_jpg": (_encode(rgb.convert("CMYK"), "JPEG"), "jpg"),
        "gray16_png": (_encode(gray16, "PNG"), "png"),
        "rgb_webp": (_encode(rgb, "WEBP"), "webp"),
        "png_named_jpg": (_encode(rgb, "PNG"), "jpg"),  # content wins: image_ext becomes png
    }


GOOD_EXT = {
    "rgb_jpg": "jpg",
    "rgb_jpeg_ext": "jpg",
    "gray_l": "png",
    "bilevel_1": "png",
    "palette_p": "png",
    "palette_trns": "png",
    "rgba": "png",
    "gray_la": "png",
    "cmyk_jpg": "jpg",
    "gray16_png": "png",
    "rgb_webp": "webp",
    "png_named_jpg": "png",
}


def _bad_images() -> dict[str, bytes]:
    big = _noise_rgb(64, seed=1)
    jpg, png, webp = _encode(big, "JPEG"), _encode(big, "PNG"), _encode(big, "WEBP")
    return {
        "corrupt_bytes": np.random.default_rng(2).integers(0, 256, 2000, dtype=np.uint8).tobytes(),
        "gif_bytes": _encode(big.convert("P"), "GIF"),  # a real image, but not an accepted format
        "truncated_webp": webp[: len(webp) // 2],
        "zero_bytes": b"",
        "truncated_jpg": jpg[: len(jpg) // 2],
        "truncated_png": png[: len(png) // 2],
        "over_max_pixels": _png_header_only(9000, 9000),  # 81 M > 64 Mi pixels: refused by our check
        "decompression_bomb": _png_header_only(100_000, 100_000),  # refused by Pillow's own check at open
    }


BAD_IMAGE_REASONS = {
    "corrupt_bytes": SkipReason.CORRUPT_IMAGE,
    "gif_bytes": SkipReason.CORRUPT_IMAGE,
    "truncated_webp": SkipReason.CORRUPT_IMAGE,
    "zero_bytes": SkipReason.EMPTY_IMAGE,
    "truncated_jpg": SkipReason.TRUNCATED_IMAGE,
    "truncated_png": SkipReason.TRUNCATED_IMAGE,
    "over_max_pixels": SkipReason.IMAGE_TOO_LARGE,
    "decompression_bomb": SkipReason.IMAGE_TOO_LARGE,
}

# ----------------------------------------------------------------------------------------------------------
# The bad-input corpus, as (key, image bytes | None, caption bytes | None, meta bytes | None) rows

META = {"url": "https://example.com/a.jpg", "width": 16}
GOOD_CAPTION = b"a photo of noise"


def _corpus_rows() -> list[tuple[str, bytes | None, bytes | None, bytes | None]]:
    good_jpg = _good_images()["rgb_jpg"][0]
    rows = [(key, data, GOOD_CAPTION, json.dumps(META).encode()) for key, (data, _) in _good_images().items()]
    rows += [
        ("invalid_json", good_jpg, b"  kept despite its json  \n", b"{not json"),
        ("json_not_object", good_jpg, b"kept, meta dropped", b"[1, 2]"),
        ("no_json", good_jpg, "caf\u00e9 unicode \u2713".encode(), None),
    ]
    rows += [(key, data, GOOD_CAPTION, None) for key, data in _bad_images().items()]
    rows += [
        ("no_image", None, GOOD_CAPTION, None),
        ("no_caption", good_jpg, None, None),
        ("empty_caption", good_jpg, b"", None),
        ("whitespace_caption", good_jpg, b" \n\t ", None),
        ("latin1_caption", good_jpg, "caf\u00e9".encode("latin-1"), None),
        ("rgb_jpg", good_jpg, b"second sample with a key seen before", None),  # duplicate_key
    ]
    return rows


EXPECTED_KEPT = [*GOOD_EXT, "invalid_json", "json_not_object", "no_json"]
EXPECTED_SKIPPED = Counter(
    {
        SkipReason.CORRUPT_IMAGE: 3,
        SkipReason.EMPTY_IMAGE: 1,
        SkipReason.TRUNCATED_IMAGE: 2,
        SkipReason.IMAGE_TOO_LARGE: 2,
        SkipReason.MISSING_IMAGE: 1,
        SkipReason.MISSING_CAPTION: 1,
        SkipReason.EMPTY_CAPTION: 2,
        SkipReason.UNDECODABLE_CAPTION: 1,
        SkipReason.DUPLICATE_KEY: 1,
    }
)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_corpus_tar(path: str) -> None:
    """The corpus as a tar, plus members every reader must ignore; built with tarfile (the writer refuses
    duplicate keys)."""
    with tarfile.open(path, "w") as tar:
        directory = tarfile.TarInfo("somedir")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        _add_member(tar, "README", b"no extension: ignored")
        _add_member(tar, "._rgb_jpg.jpg", b"AppleDouble junk: ignored")
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "rgb_jpg.jpg"
        tar.addfile(link)
        good = _good_images()
        for key, image, caption, meta in _corpus_rows():
            ext = good[key][1] if key in good else "jpg"
            if image is not None:
                _add_member(tar, f"{key}.{ext}", image)
            if caption is not None:
                _add_member(tar, f"{key}.txt", caption)
            if meta is not None:
                _add_member(tar, f"{key}.json", meta)
            if key == "no_json":
                _add_member(tar, f"{key}.cls", b"7")  # unknown extension: ignored, sample kept


def _write_corpus_parquet(path: str) -> None:
    rows = _corpus_rows()
    captions = pa.array([r[2] for r in rows], pa.binary()).view(pa.string())  # no UTF-8 check on view
    table = pa.table(
        {
            "key": [r[0] for r in rows],
            "image": pa.array([r[1] for r in rows], pa.binary()),
            "caption": captions,
            "meta": pa.array([r[3] for r in rows], pa.binary()).view(pa.string()),
        }
    )
    pq.write_table(table, path, row_group_size=7)


def _read(uri: str, **kwargs: object) -> tuple[list[SourceSample], Counter]:
    skipped: Counter = Counter()
    samples = list(iter_shard(uri, skipped, **kwargs))
    return samples, skipped


# ----------------------------------------------------------------------------------------------------------
# Corpus tests


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_corpus_exact_skips_and_kept_keys(tmp_path, fmt):
    path = str(tmp_path / f"corpus.{fmt}")
    (_write_corpus_tar if fmt == "tar" else _write_corpus_parquet)(path)

    samples, skipped = _read(path)

    assert [s.key for s in samples] == EXPECTED_KEPT
    assert skipped == EXPECTED_SKIPPED
    by_key = {s.key: s for s in samples}
    for key, ext in GOOD_EXT.items():
        sample = by_key[key]
        assert sample.image is not None and sample.image.mode == "RGB"
        assert sample.image_ext == ext
        assert sample.image_bytes == _good_images()[key][0]
        assert sample.caption == GOOD_CAPTION.decode()
        assert sample.meta == META
    assert by_key["invalid_json"].meta == {}
    assert by_key["invalid_json"].caption == "kept despite its json"
    assert by_key["json_not_object"].meta == {}
    assert by_key["no_json"].meta == {}
    assert by_key["no_json"].caption == "caf\u00e9 unicode \u2713"
    assert by_key["rgb_jpg"].caption == GOOD_CAPTION.decode()  # the first occurrence wins


def test_file_uri_and_iter_source_on_a_directory(tmp_path):
    _write_corpus_tar(str(tmp_path / "00000.tar"))
    _write_corpus_parquet(str(tmp_path / "00000.parquet"))  # an img2dataset-style sidecar: not a shard

    skipped: Counter = Counter()
    keys = [s.key for s in iter_source(f"file://{tmp_path}", skipped)]

    assert keys == EXPECTED_KEPT
    assert skipped == EXPECTED_SKIPPED


@pytest.mark.parametrize("reason", sorted(set(BAD_IMAGE_REASONS.values())))
def test_decode_rgb_raises_with_reason(reason):
    for key, data in _bad_images().items():
        if BAD_IMAGE_REASONS[key] == reason:
            with pytest.raises(InvalidSampleError) as info:
                decode_rgb(data)
            assert info.value.reason == reason, key


def test_max_pixels_is_configurable(tmp_path):
    path = str(tmp_path / "s.tar")
    small, big = _encode(_noise_rgb(8), "PNG"), _encode(_noise_rgb(40), "PNG")
    write_tar_shard(path, [("small", {"png": small, "txt": b"a"}), ("big", {"png": big, "txt": b"a"})])

    samples, skipped = _read(path, config=ReaderConfig(max_pixels=32 * 32))

    assert [s.key for s in samples] == ["small"]
    assert skipped == {SkipReason.IMAGE_TOO_LARGE: 1}
    with pytest.raises(InvalidSampleError, match="image_too_large"):
        decode_rgb(big, max_pixels=32 * 32)


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_byte_limits(tmp_path, fmt):
    image = _encode(_noise_rgb(16), "PNG")
    samples = [
        SourceSample("ok", image, "short", meta={"a": 1}, image_ext="png"),
        SourceSample("long_caption", image, "x" * 100, image_ext="png"),
        SourceSample("big_meta", image, "short", meta={"a": "y" * 100}, image_ext="png"),
        SourceSample("big_image", image + b"\0" * 10_000, "short", image_ext="png"),
    ]
    path = str(tmp_path / f"s.{fmt}")
    (write_webdataset_shard if fmt == "tar" else write_parquet_shard)(path, samples)

    config = ReaderConfig(max_text_bytes=64, max_image_bytes=len(image) + 100)
    kept, skipped = _read(path, config=config)

    assert [(s.key, s.meta) for s in kept] == [("ok", {"a": 1}), ("big_meta", {})]
    assert skipped == {SkipReason.CAPTION_TOO_LONG: 1, SkipReason.IMAGE_TOO_LARGE: 1}


# ----------------------------------------------------------------------------------------------------------
# RGB conversion


def _pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def test_sixteen_bit_gray_is_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 32896 = 128 * 257
    rgb = _pixels(decode_rgb(_encode(Image.fromarray(values), "PNG")))
    assert rgb[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_int32_and_float_modes():
    int32 = Image.fromarray(np.array([[0, 32896, 65535, 70000, -5]], dtype=np.int32), "I")
    assert _pixels(to_rgb(int32))[0, :, 0].tolist() == [0, 128, 255, 255, 0]
    floats = Image.fromarray(np.array([[-3.0, 0.0, 128.4, 300.0, np.nan]], dtype=np.float32), "F")
    assert _pixels(to_rgb(floats))[0, :, 0].tolist() == [0, 0, 128, 255, 0]


def test_alpha_is_composited_on_white():
    rgba = np.zeros((1, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)  # fully transparent -> white
    rgba[0, 1] = (200, 0, 0, 255)  # opaque red stays red
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black -> mid gray
    rgb = _pixels(decode_rgb(_encode(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[0, 1].tolist() == [200, 0, 0]
    assert rgb[0, 2].tolist() == [127, 127, 127]

    la = Image.fromarray(np.array([[[0, 0], [50, 255]]], dtype=np.uint8), "LA")
    assert _pixels(decode_rgb(_encode(la, "PNG")))[0].tolist() == [[255, 255, 255], [50, 50, 50]]


def test_palette_with_and_without_transparency():
    rgb = _pixels(decode_rgb(_palette_with_transparency()))
    assert rgb[0, 0].tolist() == [0, 0, 255]  # index 1: opaque blue
    assert rgb[0, 7].tolist() == [255, 255, 255]  # index 0: transparent -> white
    opaque = Image.new("P", (2, 1), 0)
    opaque.putpalette([255, 0, 0] + [0] * 765)
    assert _pixels(decode_rgb(_encode(opaque, "PNG")))[0, 0].tolist() == [255, 0, 0]


def test_gray_key_transparency_bilevel_and_cmyk():
    gray = Image.fromarray(np.array([[7, 100]], dtype=np.uint8), "L")
    assert _pixels(decode_rgb(_encode(gray, "PNG", transparency=7)))[0].tolist() == [[255] * 3, [100] * 3]
    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    assert _pixels(decode_rgb(_encode(bilevel, "PNG")))[0].tolist() == [[0] * 3, [255] * 3]
    white, black = Image.new("CMYK", (8, 8), (0, 0, 0, 0)), Image.new("CMYK", (8, 8), (0, 0, 0, 255))
    assert _pixels(decode_rgb(_encode(white, "JPEG", quality=95))).min() >= 250
    assert _pixels(decode_rgb(_encode(black, "JPEG", quality=95))).max() <= 5


def test_plain_rgb_passes_through():
    image = _noise_rgb(4)
    assert to_rgb(image) is image
    assert np.array_equal(_pixels(decode_rgb(_encode(image, "PNG"))), np.asarray(image))


# ----------------------------------------------------------------------------------------------------------
# Round trips and writers


def _samples(n: int, size: int = 16) -> list[SourceSample]:
    formats = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")]
    out = []
    for i in range(n):
        fmt, ext = formats[i % 3]
        meta = {"index": i, "url": f"https://example.com/{i}"} if i % 2 else {}
        out.append(SourceSample(f"{i:06d}", _encode(_noise_rgb(size, seed=i), fmt), f"caption {i} \u00e9", meta, ext))
    return out


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_round_trip(tmp_path, fmt):
    written = _samples(7)
    path = str(tmp_path / "out" / f"00000.{fmt}")
    writer = write_webdataset_shard if fmt == "tar" else write_parquet_shard
    assert writer(path, iter(written)) == 7

    read, skipped = _read(path)

    assert not skipped
    assert [(s.key, s.image_bytes, s.caption, s.meta, s.image_ext) for s in read] == [
        (s.key, s.image_bytes, s.caption, s.meta, s.image_ext) for s in written
    ]
    assert read[1].image.size == (16, 16)
    assert np.array_equal(np.asarray(read[1].image), np.asarray(_noise_rgb(16, seed=1)))  # png: lossless
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"00000.{fmt}"]  # no temporary left


def test_parquet_writer_spans_row_groups(tmp_path):
    path = str(tmp_path / "s.parquet")
    written = _samples(sources._PARQUET_ROWS_PER_GROUP + 3, size=2)
    write_parquet_shard(path, written)
    assert pq.ParquetFile(path).metadata.num_row_groups == 2
    read, skipped = _read(path)
    assert [s.key for s in read] == [s.key for s in written] and not skipped


def test_empty_shards_round_trip(tmp_path):
    assert write_webdataset_shard(str(tmp_path / "e.tar"), []) == 0
    assert write_parquet_shard(str(tmp_path / "e.parquet"), []) == 0
    assert _read(str(tmp_path / "e.tar")) == ([], Counter())
    assert _read(str(tmp_path / "e.parquet")) == ([], Counter())


def test_tar_writer_is_reproducible_and_generic(tmp_path):
    members = [("a/000001", {"jpg": b"x", "txt": b"cap", "cls": b"3"}), ("a/000002", {"txt": b"y"})]
    assert write_tar_shard(str(tmp_path / "1.tar"), members) == 2
    write_tar_shard(str(tmp_path / "2.tar"), members)
    assert (tmp_path / "1.tar").read_bytes() == (tmp_path / "2.tar").read_bytes()
    with tarfile.open(tmp_path / "1.tar") as tar:
        assert tar.getnames() == ["a/000001.jpg", "a/000001.txt", "a/000001.cls", "a/000002.txt"]
        assert {m.mtime for m in tar.getmembers()} == {0}


@pytest.mark.parametrize(
    "members",
    [
        [("k", {"txt": b"a"}), ("k", {"txt": b"b"})],
        [("k.v", {"txt": b"a"})],
        [("", {"txt": b"a"})],
        [("k", {"TXT": b"a"})],
        [("k", {".txt": b"a"})],
    ],
)
def test_tar_writer_rejects_bad_members_atomically(tmp_path, members):
    with pytest.raises(ValueError):
        write_tar_shard(str(tmp_path / "bad.tar"), members)
    assert list(tmp_path.iterdir()) == []


def test_writers_reject_bad_samples(tmp_path):
    with pytest.raises(ValueError, match="image_ext"):
        write_webdataset_shard(str(tmp_path / "x.tar"), [SourceSample("k", b"x", "c", image_ext="gif")])
    duplicate = [SourceSample("k", b"x", "c"), SourceSample("k", b"y", "d")]
    with pytest.raises(ValueError, match="duplicate"):
        write_parquet_shard(str(tmp_path / "x.parquet"), duplicate)
    assert list(tmp_path.iterdir()) == []


def test_reads_gzipped_tar(tmp_path):
    plain = tmp_path / "s.tar"
    write_webdataset_shard(str(plain), _samples(3))
    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(plain.read_bytes()))
    read, skipped = _read(str(tmp_path / "s.tar.gz"))
    assert [s.key for s in read] == ["000000", "000001", "000002"] and not skipped


# ----------------------------------------------------------------------------------------------------------
# Broken and unreadable shards


def _member_offsets(path: str, name: str) -> tuple[int, int]:
    """(header offset, data offset) of a tar member."""
    with tarfile.open(path) as tar:
        member = tar.getmember(name)
        return member.offset, member.offset_data


@pytest.mark.parametrize(
    ("damage", "expected_kept"),
    [
        ("cut_in_data", 5),  # the break is inside sample 5: samples 0-4 are complete
        ("cut_at_header", 4),  # a break at a header: the sample in progress (4) might be incomplete
        ("cut_in_header", 4),
        ("garbage_header", 4),  # plain tarfile would silently end the archive here
    ],
)
def test_tar_broken_halfway(tmp_path, damage, expected_kept):
    path = str(tmp_path / "s.tar")
    write_webdataset_shard(path, _samples(10, size=32))
    header, data = _member_offsets(path, "000005.webp")
    raw = bytearray((tmp_path / "s.tar").read_bytes())
    if damage == "cut_in_data":
        raw = raw[: data + 100]
    elif damage == "cut_at_header":
        raw = raw[:header]
    elif damage == "cut_in_header":
        raw = raw[: header + 100]
    else:
        raw[header : header + 512] = b"garbage!" * 64
    (tmp_path / "s.tar").write_bytes(bytes(raw))

    read, skipped = _read(path)

    assert [s.key for s in read] == [f"{i:06d}" for i in range(expected_kept)]
    assert skipped == {SkipReason.BROKEN_TAR: 1}


def test_tar_without_end_marker_is_broken(tmp_path):
    path = tmp_path / "s.tar"
    write_webdataset_shard(str(path), _samples(3))
    raw = path.read_bytes()
    end = len(raw.rstrip(b"\0"))
    path.write_bytes(raw[: (end + 511) // 512 * 512])  # keep the last data block, drop the zero blocks
    read, skipped = _read(str(path))
    assert [s.key for s in read] == ["000000", "000001"]
    assert skipped == {SkipReason.BROKEN_TAR: 1}


def test_parquet_broken_halfway(tmp_path):
    path = tmp_path / "s.parquet"
    samples = _samples(12, size=8)
    table = pa.table({"key": [s.key for s in samples], "image": [s.image_bytes for s in samples]})
    table = table.append_column("caption", pa.array([s.caption for s in samples]))
    pq.write_table(table, path, row_group_size=4)
    column = pq.ParquetFile(path).metadata.row_group(1).column(1)  # the image column of rows 4-7
    raw = bytearray(path.read_bytes())
    start = column.dictionary_page_offset or column.data_page_offset
    raw[start : start + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    path.write_bytes(bytes(raw))

    read, skipped = _read(str(path), config=ReaderConfig(parquet_batch_rows=4))

    assert [s.key for s in read] == ["000000", "000001", "000002", "000003"]
    assert skipped == {SkipReason.BROKEN_PARQUET: 1}


@pytest.mark.parametrize("name", ["garbage.tar", "empty.tar", "garbage.parquet", "empty.parquet"])
def test_unreadable_shard(tmp_path, name):
    if name.startswith("garbage"):
        (tmp_path / name).write_bytes(b"this is not a shard at all" * 100)
    elif name.startswith("empty"):
        (tmp_path / name).write_bytes(b"")
    assert _read(str(tmp_path / name)) == ([], Counter({SkipReason.UNREADABLE_SHARD: 1}))


def test_iter_source_continues_after_bad_shards(tmp_path, monkeypatch):
    write_webdataset_shard(str(tmp_path / "0.tar"), _samples(2))
    (tmp_path / "1.tar").write_bytes(b"not a tar" * 200)
    write_webdataset_shard(str(tmp_path / "3.tar"), _samples(3)[2:])
    shards = list_shards(str(tmp_path))
    assert shards == [str(tmp_path / "0.tar"), str(tmp_path / "1.tar"), str(tmp_path / "3.tar")]

    skipped: Counter = Counter()
    keys = [s.key for s in iter_source(str(tmp_path), skipped)]

    assert keys == ["000000", "000001", "000002"]
    assert skipped == {SkipReason.UNREADABLE_SHARD: 1}

    # A listed shard that vanished before it was read is no bad data: the source changed under the reader.
    monkeypatch.setattr(sources, "list_shards", lambda uri: [*shards[:2], str(tmp_path / "2.tar"), shards[2]])
    skipped.clear()
    with pytest.raises(sources.ShardReadError, match=r"2\.tar.*No such file"):
        list(iter_source(str(tmp_path), skipped))
    assert skipped == {SkipReason.UNREADABLE_SHARD: 1}  # the garbage shard only


# ----------------------------------------------------------------------------------------------------------
# A failing storage is not bad data: the shard fails (raises), nothing is counted as skipped


def _shard(tmp_path, fmt: str, num: int = 8) -> str:
    path = str(tmp_path / f"s.{fmt}")
    (write_webdataset_shard if fmt == "tar" else write_parquet_shard)(path, _samples(num, size=32))
    return path


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_transient_error_at_open_is_retried_then_fails_the_shard(tmp_path, monkeypatch, fmt):
    from tests.conftest import FlakyFileSystem

    path = _shard(tmp_path, fmt)
    refused = FlakyFileSystem(lambda: ConnectionRefusedError(111, "Connection refused"), open_failures=math.inf)
    monkeypatch.setattr(storage, "resolve", lambda uri: (refused, uri))
    monkeypatch.setenv(storage.RETRY_BUDGET_ENV, "0.1")
    monkeypatch.setattr(storage, "_FIRST_DELAY_S", 0.01)
    skipped: Counter = Counter()

    with pytest.raises(sources.ShardReadError, match=rf"s\.{fmt}.*Connection refused") as info:
        list(iter_shard(path, skipped))

    assert info.value.transient and refused.opens >= 2  # retried, then raised
    assert not skipped  # never recorded as an unreadable shard


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_transient_error_mid_read_fails_the_shard_or_recovers(tmp_path, monkeypatch, fmt):
    from tests.conftest import FlakyFileSystem

    path = _shard(tmp_path, fmt)
    expected = [s.key for s in _read(path)[0]]
    monkeypatch.setenv(storage.RETRY_BUDGET_ENV, "0.1")
    monkeypatch.setattr(storage, "_FIRST_DELAY_S", 0.01)
    monkeypatch.setattr(sources, "_READ_BUFFER_BYTES", 4096)  # several reads a shard
    half = os.path.getsize(path) // 2

    def reset() -> OSError:
        return ConnectionResetError(104, "Connection reset by peer")

    persistent = FlakyFileSystem(reset, read_failures=math.inf, fail_at=half)
    monkeypatch.setattr(storage, "resolve", lambda uri: (persistent, uri))
    skipped: Counter = Counter()
    read = []
    with pytest.raises(sources.ShardReadError, match="Connection reset"):
        read.extend(s.key for s in iter_shard(path, skipped))
    assert not skipped  # not a broken tar / parquet: the data is fine
    assert read == expected[: len(read)]

    # A break that heals within the retries: the read goes on from where it was, every sample exactly once.
    monkeypatch.setenv(storage.RETRY_BUDGET_ENV, "10")
    monkeypatch.setattr(storage, "_FIRST_DELAY_S", 0.01)  # backoff 10 ms, 20 ms, ...
    brief = FlakyFileSystem(reset, read_failures=2, fail_at=half)
    monkeypatch.setattr(storage, "resolve", lambda uri: (brief, uri))
    assert [s.key for s in iter_shard(path, skipped)] == expected and not skipped
    assert brief.failed_reads == 2


def test_local_io_error_fails_the_shard(tmp_path, monkeypatch):
    """A real EIO from the kernel (reading /proc/self/mem at offset 0), not an injected one."""
    os.symlink("/proc/self/mem", tmp_path / "eio.tar")
    monkeypatch.setenv(storage.RETRY_BUDGET_ENV, "0")
    skipped: Counter = Counter()
    with pytest.raises(sources.ShardReadError, match=r"eio\.tar.*Errno 5") as info:
        list(iter_shard(str(tmp_path / "eio.tar"), skipped))
    assert info.value.transient and not skipped


def test_storage_error_that_is_not_transient_fails_the_shard_at_once(tmp_path, monkeypatch):
    from tests.conftest import FlakyFileSystem

    path = _shard(tmp_path, "tar")
    denied = FlakyFileSystem(lambda: PermissionError(13, "Permission denied"), open_failures=math.inf)
    monkeypatch.setattr(storage, "resolve", lambda uri: (denied, uri))
    skipped: Counter = Counter()
    with pytest.raises(sources.ShardReadError, match="Permission denied") as info:
        list(iter_shard(path, skipped))
    assert not info.value.transient and denied.opens == 1 and not skipped


# ----------------------------------------------------------------------------------------------------------
# Parquet variants


def test_parquet_hf_struct_image_custom_columns_and_no_key(tmp_path):
    image = _encode(_noise_rgb(8), "PNG")
    struct_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "jpg": pa.array(
                [{"bytes": image, "path": "a.png"}, {"bytes": None, "path": "b.png"}, None, {"bytes": image}],
                struct_type,
            ),
            "text": ["first", "path only", "null struct", "fourth"],
        }
    )
    path = str(tmp_path / "hf-00000.parquet")
    pq.write_table(table, path)

    read, skipped = _read(path, config=ReaderConfig(image_column="jpg", caption_column="text"))

    assert [(s.key, s.caption, s.image_ext) for s in read] == [
        ("hf-00000-000000", "first", "png"),
        ("hf-00000-000003", "fourth", "png"),
    ]
    assert skipped == {SkipReason.MISSING_IMAGE: 2}


def test_parquet_integer_keys_and_null_keys(tmp_path):
    image = _encode(_noise_rgb(8), "JPEG")
    path = str(tmp_path / "s.parquet")
    pq.write_table(pa.table({"key": [5, None, 5], "image": [image] * 3, "caption": ["a", "b", "c"]}), path)
    read, skipped = _read(path)
    assert [s.key for s in read] == ["5", "s-000001"]
    assert skipped == {SkipReason.DUPLICATE_KEY: 1}


@pytest.mark.parametrize(
    ("table", "match"),
    [
        (pa.table({"key": ["a"], "caption": ["c"]}), "no column 'image'"),
        (pa.table({"image": [b"x"], "text": ["c"]}), "no column 'caption'"),
        (pa.table({"image": ["not binary"], "caption": ["c"]}), "expected binary"),
        (pa.table({"image": [b"x"], "caption": [3]}), "expected string"),
    ],
)
def test_parquet_schema_mistakes_raise(tmp_path, table, match):
    path = str(tmp_path / "s.parquet")
    pq.write_table(table, path)
    with pytest.raises(ValueError, match=match):
        _read(path)


# ----------------------------------------------------------------------------------------------------------
# Listing


def test_list_shards(tmp_path):
    (tmp_path / "nested").mkdir()
    for name in ["00001.tar", "00000.tar", "00000.parquet", "nested/00002.tar", ".00003.tar.tmp-x", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    assert list_shards(str(tmp_path)) == [str(tmp_path / n) for n in ["00000.tar", "00001.tar", "nested/00002.tar"]]
    assert list_shards(f"file://{tmp_path}/00001.tar") == [f"file://{tmp_path}/00001.tar"]

    parquet_only = tmp_path / "pq"
    parquet_only.mkdir()
    (parquet_only / "b.parquet").write_bytes(b"")
    (parquet_only / "a.parquet").write_bytes(b"")
    assert list_shards(str(parquet_only)) == [str(parquet_only / "a.parquet"), str(parquet_only / "b.parquet")]

    with pytest.raises(FileNotFoundError):
        list_shards(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unsupported"):
        list_shards(str(tmp_path / "notes.txt"))
    (tmp_path / "empty").mkdir()
    assert list_shards(str(tmp_path / "empty")) == []
    with pytest.raises(ValueError, match="no source shards"):
        list(iter_source(str(tmp_path / "empty"), Counter()))
    with pytest.raises(ValueError, match="unsupported"):
        list(iter_shard(str(tmp_path / "notes.txt"), Counter()))


def test_reader_config_validation():
    with pytest.raises(ValueError, match="max_pixels"):
        ReaderConfig(max_pixels=0)
    with pytest.raises(ValueError, match="image_column"):
        ReaderConfig(image_column="")


def test_skip_reasons_are_plain_strings():
    counter = Counter({SkipReason.EMPTY_IMAGE: 2})
    assert counter["empty_image"] == 2
    assert json.loads(json.dumps(counter)) == {"empty_image": 2}


def test_describe_shards_paths_sizes_and_fingerprint(tmp_path):
    sample = SourceSample(key="a", image_bytes=_encode(_noise_rgb(), "JPEG"), caption="a caption")
    write_webdataset_shard(str(tmp_path / "sub" / "x-0.tar"), [sample])
    write_webdataset_shard(str(tmp_path / "x-1.tar"), [sample])
    shards = describe_shards(str(tmp_path))
    assert [s.path for s in shards] == ["sub/x-0.tar", "x-1.tar"]
    assert [s.output_path for s in shards] == ["sub/x-0.parquet", "x-1.parquet"]
    assert all(s.size == (tmp_path / s.path).stat().st_size for s in shards)
    before = fingerprint(shards)
    assert before == fingerprint(list(reversed(shards)))
    more = [SourceSample(f"k{i}", _encode(_noise_rgb(64, seed=i), "JPEG"), "another") for i in range(4)]
    write_webdataset_shard(str(tmp_path / "x-1.tar"), more)  # another size: shard names + sizes are what count
    assert fingerprint(describe_shards(str(tmp_path))) != before
