"""The stream's unit, a *chunk row*, and what turns chunk rows into output shards: packing, routing, the writers.

A chunk is up to ``chunk_rows`` consecutive valid samples of one source shard, packed into one row (`pack_chunk`).
A chunk row carries bookkeeping besides the packed samples: its output shard, its index in the shard, whether it
is the shard's last chunk, and (on the last chunk) the shard's valid-sample and skip counts. Writers are several
actors, each owning the output shards `writer_of` gives it; a writer streams a shard's chunks into a temporary file
as Parquet row groups in chunk order (holding only the chunks that arrive ahead of their turn) and renames it when
the last one is in, so every output shard is either complete or absent, the same bytes whatever order chunks
arrive in.

Nothing here imports torch (nor Ray): the writer actors and routing tasks only move records, and a process that
imports torch holds about 600 MiB more before it holds any data (`tests/unit/test_layout.py` checks the import).
The stages that read, render and embed are `clipdr.reinforce.stages`.

Shape suffixes: N samples.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from clipdr import records, storage

SHARD = "_shard"  # output shard path, relative to the dataset directory
CHUNK = "_chunk"  # the chunk's samples, packed (`pack_chunk`)
CHUNK_INDEX = "_chunk_index"  # position of the chunk in its shard
LAST_CHUNK = "_last_chunk"  # the shard's last chunk: it also carries the two counts below
SHARD_ROWS = "_shard_rows"  # valid samples in the shard (on its last chunk)
SHARD_SKIPPED = "_shard_skipped"  # JSON {reason: count} of the shard (on its last chunk)
SYN_PREFIX = "_syn_"  # synthetic caption j travels as column _syn_<j> (flat strings convert to Arrow cleanly)
SET_PREFIX = "_set_"  # caption j of an added caption set travels as column _set_<set>__<j> (a part pass)
SHARD_METADATA_KEY = records.SHARD_METADATA_KEY  # Parquet footer metadata of an output file: provenance + skip counts


@dataclass(frozen=True)
class ShardTask:
    """One source shard and the output shard it becomes."""

    source: str
    output: str  # relative path in the output directory


def shard_metadata(run_fingerprint: str, source: str, skipped: dict[str, int]) -> dict[bytes, bytes]:
    payload = {"run_fingerprint": run_fingerprint, "source": source, "skipped": skipped}
    return {SHARD_METADATA_KEY: json.dumps(payload, sort_keys=True).encode()}


def read_shard_metadata(schema: pa.Schema) -> dict | None:
    """The provenance a reinforcement job wrote into a shard's footer, or None for foreign files."""
    return records.read_provenance(schema)


def write_output_shard(
    output_dir: str,
    name: str,
    columns: dict,
    manifest: records.Manifest | records.PartLayout,
    metadata: dict[bytes, bytes],
) -> int:
    table = records.build_table(columns, manifest)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    records.write_shard(storage.join(output_dir, name), table)
    return table.num_rows


_SHAPE = b"shape"  # Arrow field metadata of a packed column: the per-sample shape of an n-d array


def pack_chunk(columns: dict[str, np.ndarray]) -> bytes:
    """Packs per-sample columns (equal length N) into Arrow IPC bytes: object arrays of str/bytes as string/binary
    columns, numeric (N, ...) arrays as fixed-size lists of their flattened rows with the row shape recorded."""
    arrays, fields = [], []
    for name, values in columns.items():
        if values.dtype == object:
            array = pa.array(list(values))
            fields.append(pa.field(name, array.type))
        else:
            flat = pa.array(np.ascontiguousarray(values).reshape(-1))
            row_shape = values.shape[1:]
            array = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(row_shape))) if row_shape else flat
            fields.append(pa.field(name, array.type, metadata={_SHAPE: json.dumps(list(row_shape)).encode()}))
        arrays.append(array)
    batch = pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def unpack_chunk(data: bytes) -> dict[str, np.ndarray]:
    """The columns `pack_chunk` packed, with their dtypes and shapes."""
    table = pa.ipc.open_stream(data).read_all()
    columns = {}
    for field, column in zip(table.schema, table.columns, strict=True):
        array = column.combine_chunks()
        if field.metadata is None or _SHAPE not in field.metadata:
            columns[field.name] = np.array(array.to_pylist(), dtype=object)
            continue
        row_shape = tuple(json.loads(field.metadata[_SHAPE]))
        flat = array.flatten() if row_shape else array
        columns[field.name] = flat.to_numpy(zero_copy_only=False).reshape(len(array), *row_shape)
    return columns


def syn_captions(samples: dict[str, np.ndarray], prefix: str = SYN_PREFIX) -> list[list[str]]:
    """The S synthetic captions of each sample (empty lists before the captioner ran); with the prefix of a caption
    set (`set_prefix`), that set's captions."""
    columns = sorted((c for c in samples if c.startswith(prefix)), key=lambda c: int(c[len(prefix) :]))
    num_rows = len(samples[records.KEY])
    return [[str(samples[c][i]) for c in columns] for i in range(num_rows)]


DEFAULT_WRITER_BUFFER_BYTES = 256 * 1024 * 1024
"""Out-of-order chunks a writer keeps in memory, in bytes, before it spills further ones to local disk."""


def writer_of(shard: str, num_writers: int) -> int:
    """The writer (0 .. ``num_writers`` - 1) that owns an output shard: a stable hash of its name (Python's ``hash``
    of a str differs between processes), so every chunk of a shard meets in one writer whichever task routes it."""
    return zlib.crc32(shard.encode()) % num_writers


@dataclass
class _OpenShard:
    """A shard a writer is writing: its file (opened at its first chunk in order), the chunks that arrived ahead of
    their turn, and what its last chunk said."""

    file: records.ShardStreamWriter | None = None
    next_index: int = 0
    waiting: dict[int, bytes | str] = dataclasses.field(default_factory=dict)  # chunk bytes, or a spill file path
    last: tuple[int, int, str] | None = None  # (last chunk index, rows, skip counts JSON)


class WriteShards:
    """Writes the output shards routed to it, streaming: a shard's chunks become Parquet row groups in chunk order as
    soon as each is next (`records.ShardStreamWriter`), and the file appears (atomically) when its last chunk is
    written. Only chunks that arrive ahead of their turn wait, in memory up to ``buffer_bytes`` and on local disk
    beyond, so a writer's memory does not grow with samples per shard. One of ``reinforce.resources.writers``
    actors; `writer_of` says which shards are its own. The bytes of a shard do not depend on arrival order.
    """

    def __init__(
        self,
        output_dir: str,
        manifest: records.Manifest,
        run_fingerprint: str,
        sources_by_output: dict[str, str],
        buffer_bytes: int = DEFAULT_WRITER_BUFFER_BYTES,
    ) -> None:
        self.output_dir = output_dir
        self.manifest = manifest
        self.run_fingerprint = run_fingerprint
        self.sources_by_output = sources_by_output
        self.buffer_bytes = buffer_bytes
        self.schema = manifest.schema()
        self.columns = manifest.record_schema().names  # what `records.build_table` takes, whatever the layout
        self.open: dict[str, _OpenShard] = {}
        self.failed: set[str] = set()  # shards that met an error here: their further chunks are dropped
        self.buffered = 0  # bytes of out-of-order chunks held in memory
        self._spill_dir: str | None = None

    def add(
        self, name: str, index: int, chunk: bytes, last: bool, shard_rows: int, skipped_json: str
    ) -> list[tuple[str, int, float]]:
        """Takes chunk ``index`` of shard ``name``; returns ``(name, rows, written_at)`` if that completed it.

        An error fails the shard: its file is discarded, its later chunks are dropped, and the error propagates
        (the stream drops the block, so the job names the shard as failed).
        """
        if name in self.failed:
            return []
        shard = self.open.setdefault(name, _OpenShard())
        try:
            assert index >= shard.next_index and index not in shard.waiting, f"shard {name} got chunk {index} twice"
            if last:
                shard.last = (index, shard_rows, skipped_json)
            if index == shard.next_index:
                self._write(name, shard, chunk)
            else:
                self._hold(shard, index, chunk)
            while shard.next_index in shard.waiting:
                self._write(name, shard, self._take(shard, shard.next_index))
            if shard.last is None or shard.next_index <= shard.last[0]:
                return []
            rows = self._commit(name, shard)
            return [(name, rows, time.time())]
        except BaseException:
            self._discard(name)
            self.failed.add(name)
            raise

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A stream batch of chunk rows in, a row per completed shard out: its name, row count and write time."""
        done = []
        for i in range(len(batch[SHARD])):
            done += self.add(*_add_args(batch, i))
        return written_rows(done)

    def close(self) -> None:
        """Discards every shard not complete (its temporary file and held chunks): the stream has ended."""
        for name in list(self.open):
            self._discard(name)
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None

    def _write(self, name: str, shard: _OpenShard, chunk: bytes) -> None:
        if shard.file is None:
            shard.file = records.ShardStreamWriter(storage.join(self.output_dir, name), self.schema)
        samples = unpack_chunk(chunk)
        del chunk
        columns = {c: samples[c] for c in self.columns if not records.is_syn_captions_column(c)}
        for c in filter(records.is_syn_captions_column, self.columns):  # a shard's, or the set a captions part adds
            columns[c] = syn_captions(samples)
        shard.file.write(records.build_table(columns, self.manifest))
        shard.next_index += 1

    def _hold(self, shard: _OpenShard, index: int, chunk: bytes) -> None:
        if self.buffered + len(chunk) <= self.buffer_bytes:
            shard.waiting[index] = chunk
            self.buffered += len(chunk)
            return
        if self._spill_dir is None:
            self._spill_dir = tempfile.mkdtemp(prefix="clipdr-writer-")
        path = os.path.join(self._spill_dir, uuid.uuid4().hex)
        with open(path, "wb") as f:
            f.write(chunk)
        shard.waiting[index] = path

    def _take(self, shard: _OpenShard, index: int) -> bytes:
        held = shard.waiting.pop(index)
        if isinstance(held, bytes):
            self.buffered -= len(held)
            return held
        with open(held, "rb") as f:
            chunk = f.read()
        os.remove(held)
        return chunk

    def _commit(self, name: str, shard: _OpenShard) -> int:
        _, expected_rows, skipped_json = shard.last
        assert shard.file.num_rows == expected_rows, f"shard {name}: {shard.file.num_rows} rows, {expected_rows} read"
        metadata = shard_metadata(self.run_fingerprint, self.sources_by_output[name], json.loads(skipped_json))
        shard.file.commit(metadata)
        del self.open[name]
        return expected_rows

    def _discard(self, name: str) -> None:
        shard = self.open.pop(name, None)
        if shard is None:
            return
        for index in list(shard.waiting):
            self._take(shard, index)
        if shard.file is not None:
            shard.file.abort()


def _add_args(batch: dict[str, np.ndarray], i: int) -> tuple[str, int, bytes, bool, int, str]:
    """Row ``i`` of a stream batch of chunk rows as the arguments of `WriteShards.add`."""
    return (
        str(batch[SHARD][i]),
        int(batch[CHUNK_INDEX][i]),
        bytes(batch[CHUNK][i]),
        bool(batch[LAST_CHUNK][i]),
        int(batch[SHARD_ROWS][i]),
        str(batch[SHARD_SKIPPED][i]),
    )


def written_rows(done: Sequence[tuple[str, int, float]]) -> dict[str, np.ndarray]:
    """The stream's output batch: a row per completed shard (name, rows, the writer's time when it was complete)."""
    return {
        "shard": np.array([name for name, _, _ in done], dtype=object),
        "num_rows": np.array([rows for _, rows, _ in done], dtype=np.int64),
        "written_at": np.array([at for _, _, at in done], dtype=np.float64),
    }


class RouteChunks:
    """Hands each chunk row to the writer actor that owns its shard (`writer_of`) and passes on the rows of the shards
    that completed (stream stage: tasks; the writers are Ray actor handles, or in-process `WriteShards` in tests)."""

    def __init__(self, writers: Sequence, get=None) -> None:
        self.writers = list(writers)
        self.get = get  # ray.get for actor handles; None calls in-process writers directly

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls = []
        for i in range(len(batch[SHARD])):
            args = _add_args(batch, i)
            writer = self.writers[writer_of(args[0], len(self.writers))]
            calls.append(writer.add(*args) if self.get is None else writer.add.remote(*args))
        results = calls if self.get is None else self.get(calls)
        return written_rows([row for done in results for row in done])


def set_prefix(caption_set: str) -> str:
    """Prefix of the stream columns carrying an added caption set's captions (`syn_captions` reads them)."""
    return f"{SET_PREFIX}{records.validate_caption_set_name(caption_set)}__"
