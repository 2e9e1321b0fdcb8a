"""Bytes the training input reads a sample against the bytes it uses (part of ``jobs/benchmark.py train``).

A reinforced shard of the record schema (`clipdr.records`) is written with K views and teachers of width D, and read
back through a file object that counts every byte pyarrow fetches (footer included), the way the training input
reads it:

* ``whole record``: every column (what a read without a projection fetches);
* ``run's columns``: only the columns the run reads in an epoch (`clipdr.train.pipeline._columns`), for the run
  choices of ``CHOICES``: both teachers with real and synthetic captions, one teacher, real captions only.

Each in both layout versions of the record (`records.SCHEMA_VERSIONS`), written from the same rows: version 1 keeps
each sample's K views and 1 + S text rows in one list column each, version 2 (view-major) one column a view and a
text row, so an epoch's read fetches only its drawn view's and caption's columns.

Bytes *used* are what `data.ReplayBatch` turns into the batch: the key, the image, the real caption (and one
synthetic caption), ONE view's parameters, and per teacher ONE image-embedding row and one text row per caption.

A projection cannot fetch one row of a ``(K, D)`` list column: Parquet reads a column chunk's pages whole, which is
why version 1 reads ~10x what it uses and version 2 exists (docs/reinforce.md, "Reading only the drawn view").
"""

from __future__ import annotations

import dataclasses
import io
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipdr import records
from clipdr.config import Config, TrainConfig, replace
from clipdr.train import pipeline
from clipdr.train.plan import make_plan

CHOICES = (  # (label, teachers used (None: all), synthetic captions used)
    ("run's columns: 2 teachers, real + synthetic captions", None, True),
    ("run's columns: 1 teacher, real + synthetic captions", 1, True),
    ("run's columns: 2 teachers, real captions only", None, False),
)
LAYOUTS = {1: "1 (a list column a value)", 2: "2 (view-major)"}
EPOCH = 0  # the columns of any epoch's draw have the same sizes: every view's row, every text row, is D wide


class CountingFile(io.RawIOBase):
    """A local file whose reads are counted (``bytes_read``)."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 (closed by close(), as a file object's owner does)
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def readinto(self, buffer) -> int:
        n = self._file.readinto(buffer)
        self.bytes_read += n
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def bytes_read(path: str, columns: list[str] | None) -> int:
    """Bytes pyarrow fetches from ``path`` to read ``columns`` (None: all) of every row, footer included."""
    counting = CountingFile(path)
    try:
        pq.read_table(counting, columns=columns)
        return counting.bytes_read
    finally:
        counting.close()


def _mean_len(column: pa.ChunkedArray) -> float:
    return float(np.mean([len(v) for v in column.to_pylist()])) if len(column) else 0.0


def bytes_used(table: pa.Table, manifest: records.Manifest, teachers: list[str], syn: bool) -> float:
    """Bytes a sample of ``table`` that the replay turns into the batch (module docstring)."""
    used = sum(_mean_len(table.column(c)) for c in (records.KEY, records.IMAGE, records.CAPTION))
    used += manifest.aug_param_length * 4  # one view's parameters, float32
    if syn:
        captions = table.column(records.SYN_CAPTIONS).combine_chunks().flatten()
        used += _mean_len(pa.chunked_array([captions]))  # one synthetic caption
    rows = 3 if syn else 2  # image row k, text row 0, text row 1 + j
    return used + sum(rows * manifest.teacher(name).embed_dim * 2 for name in teachers)


def measure(columns: Mapping[str, Any], manifest: records.Manifest) -> list[str]:
    """The markdown lines of the bytes table for ``columns`` (a shard's rows, as `records.build_table` takes them)
    written in each layout version and read back as the training input reads it."""
    used_full = None
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for version in records.SCHEMA_VERSIONS:
            layout = dataclasses.replace(manifest, schema_version=version)
            table = records.build_table(columns, layout)
            rows, all_teachers = table.num_rows, list(layout.teacher_names)
            if used_full is None:
                used_full = bytes_used(table, layout, all_teachers, True)
                lines += [
                    f"{rows} rows, K={layout.num_augmentations}, S={layout.num_syn_captions}, teachers "
                    + ", ".join(f"{t.name} (D={t.embed_dim})" for t in layout.teachers)
                    + "; bytes a sample, footer included; ratio = read / used.",
                    "",
                    "| layout | read | bytes read a sample | bytes used a sample | read / used |",
                    "|---|---|---|---|---|",
                ]
            name = LAYOUTS[version]
            shard = str(Path(tmp) / f"layout-{version}.parquet")
            records.write_shard(shard, table)
            read = bytes_read(shard, None) / rows
            lines.append(f"| {name} | whole record | {read:,.0f} | {used_full:,.0f} | {read / used_full:.2f} |")
            for label, count, syn in CHOICES:
                teachers = all_teachers[:count] if count else all_teachers
                cfg = replace(
                    TrainConfig(),
                    {"model": "x", "data": "d", "teachers": tuple(teachers), "loss.use_syn_captions": syn},
                )
                plan = make_plan(Config(train=cfg), [layout.teacher(n) for n in teachers])
                read = bytes_read(shard, pipeline._columns(plan, layout, EPOCH)) / rows
                used = bytes_used(table, layout, teachers, syn)
                lines.append(f"| {name} | {label} | {read:,.0f} | {used:,.0f} | {read / used:.2f} |")
    return lines
