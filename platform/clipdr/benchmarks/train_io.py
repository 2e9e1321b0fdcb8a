"""Bytes the training input reads a sample against the bytes it uses (part of ``jobs/benchmark.py train``).

A reinforced shard of the record schema (`clipdr.records`) is written with K views and teachers of width D, and read
back through a file object that counts every byte pyarrow fetches (footer included), the way the training input
reads it:

* ``whole record``: every column (what a read without a projection fetches);
* ``projected``: only the columns the run uses (`clipdr.train.pipeline._columns`), for the run choices of
  ``CHOICES``: both teachers with real and synthetic captions, one teacher, real captions only.

Bytes *used* are what `data.ReplayBatch` turns into the batch: the key, the image, the real caption (and one
synthetic caption), ONE view's parameters, and per teacher ONE image-embedding row and one text row per caption.

A projection cannot fetch one row of a ``(K, D)`` list column: Parquet reads a column chunk's pages whole. The
``view-major (prototype)`` line measures the layout that would (docs/reinforce.md, "Reading only the drawn view"):
one column per view for the view parameters and each teacher's image embeddings, one per text row for the text
embeddings, so a read of one drawn (view, caption) fetches exactly those columns. It is a prototype written here
only, not the record schema.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipdr import records
from clipdr.config import Config, TrainConfig, replace
from clipdr.train import pipeline
from clipdr.train.plan import make_plan

CHOICES = (  # (label, teachers used (None: all), synthetic captions used)
    ("projected: 2 teachers, real + synthetic captions", None, True),
    ("projected: 1 teacher, real + synthetic captions", 1, True),
    ("projected: 2 teachers, real captions only", None, False),
)


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


def view_major(table: pa.Table, manifest: records.Manifest) -> pa.Table:
    """The prototype layout: each (K, X) or (1+S, D) list column split into one column per row."""
    arrays, names = [], []
    for name in table.column_names:
        column = table.column(name)
        if name == records.AUG_PARAMS or name.startswith((records.IMAGE_EMB_PREFIX, records.TEXT_EMB_PREFIX)):
            values = records.fixed_shape_numpy(column)
            for row in range(values.shape[1]):
                arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(values[:, row].ravel()), values.shape[2]))
                names.append(f"{name}__{row}")
        else:
            arrays.append(column)
            names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


def measure(table: pa.Table, manifest: records.Manifest) -> list[str]:
    """The markdown lines of the bytes table for ``table`` (a shard's rows) written as a shard and read back."""
    rows = table.num_rows
    all_teachers = list(manifest.teacher_names)
    lines = [
        f"{rows} rows, K={manifest.num_augmentations}, S={manifest.num_syn_captions}, teachers "
        + ", ".join(f"{t.name} (D={t.embed_dim})" for t in manifest.teachers)
        + "; bytes a sample, footer included; ratio = read / used.",
        "",
        "| read | bytes read a sample | bytes used a sample | read / used |",
        "|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        shard = str(Path(tmp) / "shard.parquet")
        records.write_shard(shard, table)
        used_full = bytes_used(table, manifest, all_teachers, True)
        read = bytes_read(shard, None) / rows
        lines.append(f"| whole record | {read:,.0f} | {used_full:,.0f} | {read / used_full:.2f} |")
        for label, count, syn in CHOICES:
            teachers = all_teachers[:count] if count else all_teachers
            cfg = replace(
                TrainConfig(),
                {"model": "x", "data": "d", "teachers": tuple(teachers), "loss.use_syn_captions": syn},
            )
            plan = make_plan(Config(train=cfg), [manifest.teacher(n) for n in teachers])
            read = bytes_read(shard, pipeline._columns(plan)) / rows
            used = bytes_used(table, manifest, teachers, syn)
            lines.append(f"| {label} | {read:,.0f} | {used:,.0f} | {read / used:.2f} |")
        prototype = str(Path(tmp) / "view-major.parquet")
        records.write_shard(prototype, view_major(table, manifest))
        k, j = manifest.num_augmentations - 1, 1  # any drawn view and synthetic caption: every one reads the same
        columns = [records.KEY, records.IMAGE, records.CAPTION, records.SYN_CAPTIONS, f"{records.AUG_PARAMS}__{k}"]
        for name in all_teachers:
            text = records.text_emb_column(name)
            columns += [f"{records.image_emb_column(name)}__{k}", f"{text}__0", f"{text}__{j}"]
        read = bytes_read(prototype, columns) / rows
        lines.append(
            f"| view-major (prototype): 2 teachers, real + synthetic captions | {read:,.0f} | {used_full:,.0f} | "
            f"{read / used_full:.2f} |"
        )
    return lines
