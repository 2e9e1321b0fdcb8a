"""Hostile source input: what `clipdr.data.sources` must survive without losing valid samples or memory.

Each input here once failed a reinforcement job (exit 1 on every rerun) or made the reader allocate what a header
declared. docs/reliability.md ("Hostile input and bounded memory") lists them with the figures measured.
"""

from __future__ import annotations

import io
import tarfile
import time
import tracemalloc
import zlib
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipdr.data.sources import SkipReason, iter_shard, to_rgb, write_parquet_shard


def _jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(out, "JPEG")
    return out.getvalue()


def _members(keys: list[str]) -> list[tuple[str, bytes]]:
    return [(f"{key}.{ext}", data) for key in keys for ext, data in (("jpg", _jpeg()), ("txt", b"a caption"))]


def _tar_bytes(members: list[tuple[str, bytes]], tar_format: int = tarfile.USTAR_FORMAT, end: bool = True) -> bytes:
    """A tar of regular members; names may hold lone surrogates, written as the raw bytes they stand for."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tar_format, encoding="utf-8", errors="surrogateescape") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = out.getvalue()
    return raw if end else raw[: (len(raw.rstrip(b"\0")) + 511) // 512 * 512]


def _read(path) -> tuple[list[str], Counter]:
    skipped: Counter = Counter()
    keys = [s.key for s in iter_shard(str(path), skipped)]
    return keys, skipped


# ----------------------------------------------------------------------------------------------------------
# Keys that are not UTF-8


@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_a_member_name_that_is_not_utf8_is_skipped_and_everything_read_can_be_written(tmp_path, tar_format):
    # tarfile decodes the name b"bad\xe9" with surrogateescape: "bad\udce9", which no writer can encode.
    path = tmp_path / "s.tar"
    path.write_bytes(_tar_bytes(_members(["good0", "bad\udce9", "gööd1"]), tar_format))

    keys, skipped = _read(path)

    assert keys == ["good0", "gööd1"]
    assert skipped == {SkipReason.INVALID_KEY: 1}
    samples = list(iter_shard(str(path), Counter()))
    assert write_parquet_shard(str(tmp_path / "out.parquet"), samples) == 2  # raised UnicodeEncodeError before


@pytest.mark.parametrize("key_type", ["binary", "string"])
def test_a_parquet_key_that_is_not_utf8_is_skipped(tmp_path, key_type):
    keys = pa.array([b"good0", b"bad\xe9", b"good1"], pa.binary())
    if key_type == "string":
        keys = keys.view(pa.string())  # no UTF-8 check on view: what a foreign writer may leave
    table = pa.table({"key": keys, "image": [_jpeg()] * 3, "caption": ["a", "b", "c"]})
    pq.write_table(table, tmp_path / "s.parquet")

    read, skipped = _read(tmp_path / "s.parquet")

    assert read == ["good0", "good1"]
    assert skipped == {SkipReason.INVALID_KEY: 1}


# ----------------------------------------------------------------------------------------------------------
# Extended tar headers: bounded before they are read


def _header(type_: bytes, size: int, name: str = "././@LongLink") -> bytes:
    """One raw 512-byte ustar header whose size field says ``size``, whatever follows."""
    info = tarfile.TarInfo(name)
    info.type, info.size = type_, size
    return info.tobuf(tarfile.USTAR_FORMAT)


@pytest.mark.parametrize(
    "type_",
    [tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE],
    ids=["gnu_longname", "gnu_longlink", "pax", "pax_global"],
)
def test_a_gzipped_header_declaring_512_mib_breaks_the_shard_without_reading_it(tmp_path, type_):
    # Two good samples, then a header declaring a 512 MiB payload; 64 MiB of zeros follow (64 KiB gzipped).
    # tarfile alone reads the payload whole: 2x the zeros there are at peak (1 GiB for the full 512 MiB). What
    # remains is fixed: the 8 MiB read buffer and one 10 KiB read of gzipped zeros decompressed (~10 MiB, twice).
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip
    parts = [compressor.compress(_tar_bytes(_members(["good0", "good1"]), end=False) + _header(type_, 512 << 20))]
    parts += [compressor.compress(bytes(1 << 20)) for _ in range(64)]
    (tmp_path / "bomb.tar.gz").write_bytes(b"".join([*parts, compressor.flush()]))

    tracemalloc.start()
    try:
        keys, skipped = _read(tmp_path / "bomb.tar.gz")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert keys == ["good0"]  # good1 was the sample in progress at the break: it may be incomplete
    assert skipped == {SkipReason.BROKEN_TAR: 1}
    assert peak < 64 << 20, f"{peak / 2**20:.1f} MiB traced at peak"  # 128 MiB before


def test_a_long_chain_of_extended_headers_breaks_the_shard(tmp_path):
    # tarfile follows each GNU long name by recursion: 2,000 of them raised RecursionError out of the reader.
    longname = _header(tarfile.GNUTYPE_LONGNAME, 512) + b"x" * 512
    raw = _tar_bytes(_members(["good0", "good1"]), end=False) + longname * 2000 + _tar_bytes(_members(["good2"]))
    (tmp_path / "s.tar").write_bytes(raw)

    assert _read(tmp_path / "s.tar") == (["good0"], Counter({SkipReason.BROKEN_TAR: 1}))


def test_a_badly_framed_pax_header_breaks_the_shard_in_linear_time(tmp_path):
    # 16 KiB of digits: Python 3.11.7's pax regexes take ~1.4 s on it (70 s on 64 KiB) and then ignore it.
    digits = b"1" * (16 << 10)
    raw = (
        _tar_bytes(_members(["good0", "good1"]), end=False)
        + _header(tarfile.XHDTYPE, len(digits))
        + digits
        + _tar_bytes(_members(["good2"]))
    )
    (tmp_path / "s.tar").write_bytes(raw)

    started = time.process_time()  # CPU time of this process: the regexes' cost, whatever else the machine runs
    result = _read(tmp_path / "s.tar")

    assert result == (["good0"], Counter({SkipReason.BROKEN_TAR: 1}))
    assert time.process_time() - started < 1.0


# ----------------------------------------------------------------------------------------------------------
# Decoded pixels


def test_sixteen_bit_images_convert_in_integers_every_value_as_before():
    # 2048 x 2048 pixels holding every 16-bit value 64 times; float64 conversion took ~26 bytes a pixel at peak
    # (1.6 GiB for a 130 KB PNG at max_pixels), integers take ~8.
    values = np.tile(np.arange(65536, dtype=np.uint16), 64).reshape(2048, 2048)
    image = Image.fromarray(values)
    assert image.mode == "I;16"

    tracemalloc.start()
    try:
        rgb = to_rgb(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    expected = np.rint(values / 257.0).astype(np.uint8)  # the scaling to_rgb documents
    assert np.array_equal(np.asarray(rgb)[..., 0], expected)
    assert peak < 12 * values.size, f"{peak / values.size:.1f} bytes a pixel"
