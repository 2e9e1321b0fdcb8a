"""The memory figures of docs/reliability.md ("Hostile input and bounded memory"); not a test, a measurement.

    PYTHONPATH=platform:. .venv/bin/python -m tests.memory_figures header-bomb [--payload-mib 512]
    PYTHONPATH=platform:. .venv/bin/python -m tests.memory_figures read-shard --images 400 [--hold chunk|whole]
    PYTHONPATH=platform:. .venv/bin/python -m tests.memory_figures read-shard --images 48 --png-side 4096
    PYTHONPATH=platform:. .venv/bin/python -m tests.memory_figures ray-read --images 1600 [--block-mib 128]
    PYTHONPATH=platform:. .venv/bin/python -m tests.memory_figures decode --mode I;16

Each measures one thing in this fresh process (peak RSS is a process's high-water mark) and prints one line.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import multiprocessing
import os
import re
import resource
import tarfile
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image

from clipdr.data import sources


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _private_mib() -> float:
    """Private resident memory; unlike the peak it leaves out object-store pages a Ray worker maps."""
    with open("/proc/self/status") as f:
        return int(re.search(r"RssAnon:\s+(\d+)", f.read()).group(1)) / 1024


def _shard(path: str, num_images: int, png_side: int = 0) -> str:
    """JPEGs of noise, 256x256; or, with ``png_side``, one-colour PNGs of that side (tiny files, large pixels)."""
    if not os.path.exists(path):
        rng = np.random.default_rng(0)

        def members():
            for i in range(num_images):
                out = io.BytesIO()
                if png_side:
                    Image.new("RGB", (png_side, png_side), (i % 256, 0, 0)).save(out, "PNG")
                else:
                    noise = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
                    Image.fromarray(noise).save(out, "JPEG", quality=90)
                yield f"{i:06d}", {"png" if png_side else "jpg": out.getvalue(), "txt": b"a photo"}

        sources.write_tar_shard(path, members())
    return path


def header_bomb(args: argparse.Namespace, tmp: str) -> None:
    """Two samples, then a GNU long-name header declaring 512 MiB, then ``payload_mib`` of zeros, gzipped."""
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(jpeg, "JPEG")
    good = io.BytesIO()
    with tarfile.open(fileobj=good, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key in ("good0", "good1"):
            for ext, data in (("jpg", jpeg.getvalue()), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    head = good.getvalue()[: (len(good.getvalue().rstrip(b"\0")) + 511) // 512 * 512]
    bomb = tarfile.TarInfo("././@LongLink")
    bomb.type, bomb.size = tarfile.GNUTYPE_LONGNAME, 512 << 20
    path = os.path.join(tmp, "bomb.tar.gz")
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    with open(path, "wb") as f:
        f.write(compressor.compress(head + bomb.tobuf(tarfile.USTAR_FORMAT)))
        for _ in range(args.payload_mib):
            f.write(compressor.compress(bytes(1 << 20)))
        f.write(compressor.flush())
    skipped: collections.Counter = collections.Counter()
    before = _peak_mib()
    keys = [s.key for s in sources.iter_shard(path, skipped)]
    print(
        f"header bomb ({os.path.getsize(path):,} bytes gzipped, header declares 512 MiB, {args.payload_mib} MiB "
        f"follow): peak RSS {before:.0f} -> {_peak_mib():.0f} MiB; kept {keys}, skipped {dict(skipped)}"
    )


def read_shard(args: argparse.Namespace, tmp: str) -> None:
    """One shard through `ReadShards.read`: its first chunk row only, every chunk row (each dropped when the next
    comes), or (``--hold whole``) every sample of the shard kept in a list."""
    from clipdr.reinforce import chunks, stages
    from tests.unit.test_records import make_manifest

    read = stages.ReadShards(16, os.path.join(tmp, "out"), make_manifest(), "fingerprint")
    warm = _shard(os.path.join(tmp, "warm.tar"), 2)  # imports and codecs loaded before the baseline
    next(read.read(chunks.ShardTask(warm, "w.parquet")))
    shard = _shard(os.path.join(tmp, "shard.tar"), args.images, args.png_side)
    before = _peak_mib()
    if args.hold == "whole":
        held = list(sources.iter_shard(shard, collections.Counter()))
    elif args.hold == "stream":
        held = [len(row[chunks.CHUNK]) for row in read.read(chunks.ShardTask(shard, "s.parquet"))]
    else:
        held = next(read.read(chunks.ShardTask(shard, "s.parquet")))
    what = f"PNGs {args.png_side}x{args.png_side}" if args.png_side else "JPEGs 256x256"
    size = os.path.getsize(shard) / 2**20
    del held
    print(
        f"{args.images} {what} ({size:.1f} MiB), chunks of 16, {args.hold}: peak RSS {before:.0f} -> "
        f"{_peak_mib():.0f} MiB (+{_peak_mib() - before:.0f})"
    )


def ray_read(args: argparse.Namespace, tmp: str) -> None:
    """The read stage alone as a Ray Data task, as `reinforce.pipeline` runs it (``--block-mib 128``: Ray's default)."""
    import ray

    from clipdr.reinforce import pipeline, stages
    from tests.unit.test_records import make_manifest

    shard = _shard(os.path.join(tmp, "shard.tar"), args.images)
    report = os.path.join(tmp, "worker.json")

    class Measured(stages.ReadShards):
        def __call__(self, batch):
            start = peak = _private_mib()
            for row in super().__call__(batch):
                yield row
                peak = max(peak, _private_mib())
            with open(report, "w") as f:
                json.dump({"start": start, "peak": peak, "end": time.time()}, f)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.from_items([{"source": shard, "output": "s.parquet"}], override_num_blocks=1)
        pipeline.configure_stream(ds.context)
        if args.block_mib:
            ds.context.target_max_block_size = int(args.block_mib * 2**20)
        ds = ds.map_batches(Measured(16, os.path.join(tmp, "out"), make_manifest(), "fp"), batch_size=1, num_cpus=1)
        arrivals = [time.time() for _ in ds.iter_rows()]
    finally:
        ray.shutdown()
    with open(report) as f:
        worker = json.load(f)
    early = sum(a < worker["end"] for a in arrivals)
    print(
        f"Ray read task, {args.images} JPEGs, blocks of {args.block_mib or pipeline._STREAM_BLOCK_BYTES / 2**20:g} "
        f"MiB: private memory {worker['start']:.0f} -> peak {worker['peak']:.0f} MiB "
        f"(+{worker['peak'] - worker['start']:.0f}); {early} of {len(arrivals)} chunk rows reached the driver before "
        "the task ended"
    )


def _png(mode: str) -> bytes:
    image = Image.fromarray(np.zeros((8192, 8192), np.uint16)) if mode == "I;16" else Image.new(mode, (8192, 8192))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def decode(args: argparse.Namespace, tmp: str) -> None:
    """A small PNG at the default pixel limit (8192 x 8192), decoded to RGB; made in another process, so that making
    it does not set this one's peak."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        data = pool.submit(_png, args.mode).result()
    before = _peak_mib()
    sources.decode_rgb(data)
    print(f"{len(data):,}-byte {args.mode} PNG of 8192x8192: peak RSS {before:.0f} -> {_peak_mib():.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figure", choices=["header-bomb", "read-shard", "ray-read", "decode"])
    parser.add_argument("--payload-mib", type=int, default=512)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--png-side", type=int, default=0, help="read-shard: one-colour PNGs of this side")
    parser.add_argument("--hold", choices=["chunk", "stream", "whole"], default="stream", help="read-shard")
    parser.add_argument("--block-mib", type=float, default=0.0, help="0: the pipeline's own block size")
    parser.add_argument("--mode", default="RGBA")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        {"header-bomb": header_bomb, "read-shard": read_shard, "ray-read": ray_read, "decode": decode}[args.figure](
            args, tmp
        )


if __name__ == "__main__":
    main()
