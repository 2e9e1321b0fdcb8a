"""The reinforcement stages as plain callables over column batches; `pipeline.py` wires them into Ray Data.

Nothing here imports Ray, so each stage runs (and is tested) on its own. Batches are dicts of numpy arrays.

The unit of the stream is a *chunk*: up to ``chunk_rows`` consecutive valid samples of one source shard, packed
into one row (`pack_chunk`). Model stages run their forward over exactly one chunk at a time, so what a model
computes for a sample depends only on (config, source shard), never on how Ray bundled blocks: numerics of a
batched forward depend on the batch's composition and size, and a stream of single samples would let Ray regroup
them freely. A chunk row carries bookkeeping besides the packed samples: its output shard, its index in the
shard, whether it is the shard's last chunk, and (on the last chunk) the shard's valid-sample and skip counts.
Reading streams: a shard is never held whole, only two chunks of encoded samples and at most two decoded images
(the one being decoded, and the last, until the reader lets go of it). Writers are several actors, each owning
the output shards `writer_of` gives it; a writer streams a shard's chunks into a temporary file as Parquet row
groups in chunk order (holding only the chunks that arrive ahead of their turn) and renames it when the last one is
in, so every output shard is either complete or absent, the same bytes whatever order chunks arrive in.

Views are rendered apart from the model: `RenderViews` (a CPU stage) decodes a chunk's images and renders its
views once per distinct teacher render (`augment.RenderKey`: size and interpolation) as uint8 columns, and `Embed`
(the model stage) only normalises them on its device and runs the teachers, then drops them from the chunk.

Shape suffixes: N samples, K views a sample, L encoded view length, S synthetic captions, D embedding width.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import shutil
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from clipdr import augment, records, storage
from clipdr.config import TeacherConfig
from clipdr.data import sources

SHARD = "_shard"  # output shard path, relative to the dataset directory
CHUNK = "_chunk"  # the chunk's samples, packed (`pack_chunk`)
CHUNK_INDEX = "_chunk_index"  # position of the chunk in its shard
LAST_CHUNK = "_last_chunk"  # the shard's last chunk: it also carries the two counts below
SHARD_ROWS = "_shard_rows"  # valid samples in the shard (on its last chunk)
SHARD_SKIPPED = "_shard_skipped"  # JSON {reason: count} of the shard (on its last chunk)
SYN_PREFIX = "_syn_"  # synthetic caption j travels as column _syn_<j> (flat strings convert to Arrow cleanly)
SET_PREFIX = "_set_"  # caption j of an added caption set travels as column _set_<set>__<j> (a part pass)
VIEWS_PREFIX = "_views_"  # uint8 (N, K, 3, S, S) views of one augment.RenderKey: column _views_<S>_<interpolation>
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


def _stream_row(row: dict[str, object]) -> dict[str, np.ndarray]:
    """A one-row batch (what a Ray Data stage yields) from plain values."""
    return {
        name: np.array([value], dtype=object if isinstance(value, str | bytes) else None) for name, value in row.items()
    }


CHUNK_MAX_PIXELS = 256 * 1024 * 1024
"""A chunk closes early before its images would hold more pixels than this (768 MiB as RGB): the model stages decode
a whole chunk at once, and ``chunk_rows`` images of up to ``max_pixels`` each (64 x 64 Mpx, 12 GiB) fit in a shard
of small PNGs. Real data never reaches it (64 images of 512 x 512 hold 16 Mpx); where it does, the chunks are still
a function of the source shard, so outputs stay deterministic."""


class ReadShards:
    """Source shard -> chunks of validated samples with their K sampled views (CPU stage, streaming).

    A shard whose samples are all invalid has nothing to send down the stream, so this stage writes its
    (empty) output shard itself, carrying the skip counts.
    """

    def __init__(
        self,
        chunk_rows: int,
        output_dir: str,
        manifest: records.Manifest,
        run_fingerprint: str,
        chunk_max_pixels: int = CHUNK_MAX_PIXELS,
    ) -> None:
        self.chunk_rows = chunk_rows
        self.chunk_max_pixels = chunk_max_pixels
        self.output_dir = output_dir
        self.manifest = manifest
        self.run_fingerprint = run_fingerprint

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for source, output in zip(batch["source"], batch["output"], strict=True):
            for row in self.read(ShardTask(str(source), str(output))):
                yield _stream_row(row)

    def _pack(self, chunk: list[tuple[sources.SourceSample, tuple[int, int]]]) -> dict[str, np.ndarray]:
        m = self.manifest  # views are sampled with exactly the settings the dataset records
        views_NKL = np.stack(
            [
                augment.views_to_array(
                    augment.sample_views(size, s.key, m.num_augmentations, m.augment, m.augment_seed)
                )
                for s, size in chunk
            ]
        )
        chunk = [s for s, _ in chunk]
        return {
            records.KEY: np.array([s.key for s in chunk], dtype=object),
            records.IMAGE: np.array([s.image_bytes for s in chunk], dtype=object),
            records.IMAGE_EXT: np.array([s.image_ext for s in chunk], dtype=object),
            records.CAPTION: np.array([s.caption for s in chunk], dtype=object),
            records.AUG_PARAMS: views_NKL,
        }

    def read(self, task: ShardTask) -> Iterator[dict[str, object]]:
        """The shard's chunk rows, holding at most two chunks of samples at a time (one read ahead, so that the last
        chunk is known and carries the shard's counts), without their decoded pixels."""
        skipped: collections.Counter[str] = collections.Counter()
        samples = _without_pixels(sources.iter_shard(task.source, skipped))
        chunks = _chunks(samples, self.chunk_rows, self.chunk_max_pixels)
        current = next(chunks, None)
        if current is None:
            empty = {name: [] for name in self.manifest.record_schema().names}
            metadata = shard_metadata(self.run_fingerprint, task.source, dict(skipped))
            write_output_shard(self.output_dir, task.output, empty, self.manifest, metadata)
            return
        num_rows = 0
        for index in itertools.count():
            following = next(chunks, None)
            num_rows += len(current)
            last = following is None  # the source is exhausted: the skip counts are final
            yield {
                SHARD: task.output,
                CHUNK_INDEX: index,
                CHUNK: pack_chunk(self._pack(current)),
                LAST_CHUNK: last,
                SHARD_ROWS: num_rows if last else -1,
                SHARD_SKIPPED: json.dumps(dict(skipped), sort_keys=True) if last else "",
            }
            if last:
                return
            current = following


def _without_pixels(
    samples: Iterator[sources.SourceSample],
) -> Iterator[tuple[sources.SourceSample, tuple[int, int]]]:
    """Each sample without its decoded image, with the image's size (all that view sampling needs). A chunk then
    holds encoded bytes, not ``chunk_rows`` decoded images: within ``max_pixels`` a 260 KB PNG decodes to 192 MiB,
    and two chunks of such PNGs held dozens of GiB."""
    for sample in samples:
        size = sample.image.size
        light = dataclasses.replace(sample, image=None)
        del sample  # not referenced while the next sample decodes
        yield light, size


def _chunks(
    samples: Iterator[tuple[sources.SourceSample, tuple[int, int]]], chunk_rows: int, max_pixels: int
) -> Iterator[list[tuple[sources.SourceSample, tuple[int, int]]]]:
    """Consecutive samples, ``chunk_rows`` a chunk, fewer where the next image would take the chunk past
    ``max_pixels`` (a chunk holds at least one sample)."""
    chunk: list[tuple[sources.SourceSample, tuple[int, int]]] = []
    pixels = 0
    for sample, (width, height) in samples:
        if chunk and (len(chunk) == chunk_rows or pixels + width * height > max_pixels):
            yield chunk
            chunk, pixels = [], 0
        chunk.append((sample, (width, height)))
        pixels += width * height
    if chunk:
        yield chunk


def _decode(images: Sequence[bytes]) -> list:
    return [sources.decode_rgb(bytes(b)) for b in images]


def _map_chunks(batch: dict[str, np.ndarray], fn) -> dict[str, np.ndarray]:
    """Applies ``fn(samples) -> samples`` to every chunk of a stream batch, one chunk at a time."""
    batch[CHUNK] = np.array([pack_chunk(fn(unpack_chunk(bytes(packed)))) for packed in batch[CHUNK]], dtype=object)
    return batch


class Caption:
    """Adds S synthetic captions per sample (model stage: one captioner per actor), one chunk per forward."""

    def __init__(self, spec: records.CaptionerSpec, num_captions: int, device: str, threads: int) -> None:
        import torch

        from clipdr.models.captioners import build_captioner
        from clipdr.models.teachers import seeded_init

        torch.set_num_threads(threads)
        with seeded_init(spec.name):  # a captioner without weights is the same in every actor and rerun
            self.captioner = build_captioner(spec, device=device)
        self.num_captions = num_captions

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _map_chunks(batch, self.caption)

    def caption(self, samples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [str(k) for k in samples[records.KEY]]
        captions = self.captioner.generate(_decode(samples[records.IMAGE]), keys, self.num_captions)
        for j in range(self.num_captions):
            samples[f"{SYN_PREFIX}{j}"] = np.array([sample_captions[j] for sample_captions in captions], dtype=object)
        return samples


def syn_captions(samples: dict[str, np.ndarray], prefix: str = SYN_PREFIX) -> list[list[str]]:
    """The S synthetic captions of each sample (empty lists before the captioner ran); with the prefix of a caption
    set (`set_prefix`), that set's captions."""
    columns = sorted((c for c in samples if c.startswith(prefix)), key=lambda c: int(c[len(prefix) :]))
    num_rows = len(samples[records.KEY])
    return [[str(samples[c][i]) for c in columns] for i in range(num_rows)]


def views_column(key: augment.RenderKey) -> str:
    return f"{VIEWS_PREFIX}{key.image_size}_{key.interpolation}"


def render_chunk(samples: dict[str, np.ndarray], keys: Sequence[augment.RenderKey]) -> dict[str, np.ndarray]:
    """Adds the chunk's uint8 views for each render in ``keys`` (`views_column`), decoding each image once."""
    images = _decode(samples[records.IMAGE])
    views = [augment.views_from_array(views_KL) for views_KL in samples[records.AUG_PARAMS]]
    for key in keys:
        samples[views_column(key)] = augment.render_views(images, views, key)
    return samples


class RenderViews:
    """Decodes each chunk's images and renders its K stored views once per distinct teacher render, as uint8 (CPU
    stage: Ray Data tasks, as many as free CPUs allow, sized apart from the model actors)."""

    def __init__(self, teachers: Sequence[records.TeacherSpec]) -> None:
        self.keys = augment.render_keys(teachers)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        torch.set_num_threads(1)  # a task reserves one CPU; many run side by side
        return _map_chunks(batch, lambda samples: render_chunk(samples, self.keys))


class Embed:
    """Adds every teacher's image embeddings of the K stored views and text embeddings of 1+S captions, one chunk
    per forward. The views arrive rendered (`RenderViews`); with ``render_in_actor`` this stage renders them itself
    before its forwards instead: the earlier design, kept so that the benchmark can compare the two in one run.

    Two calls may run at once, each in a thread of the actor (`clipdr.reinforce.pipeline.TEACHER_CALLS`): a two-deep
    pipeline. The ensemble holds the device only for the device work (`TeacherEnsemble.embed`), so while one chunk's
    forwards run, the other call unpacks its chunk and stages its views (pinned memory, copy to the device), or packs
    the chunk whose forwards just ended. Each call returns its own chunk, whatever the order the two finish in.
    """

    def __init__(
        self, teachers: Sequence[TeacherConfig], device: str, threads: int, render_in_actor: bool = False
    ) -> None:
        import torch

        from clipdr.models.teachers import TeacherEnsemble

        torch.set_num_threads(threads)
        self.ensemble = TeacherEnsemble(teachers, device=device)
        self.keys = augment.render_keys(self.ensemble.specs)
        self.render_in_actor = render_in_actor

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _map_chunks(batch, self.embed)

    def embed(self, samples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.render_in_actor:
            samples = render_chunk(samples, self.keys)
        views = {key: samples.pop(views_column(key)) for key in self.keys}
        captions = [
            [str(real), *syn] for real, syn in zip(samples[records.CAPTION], syn_captions(samples), strict=True)
        ]
        embedded = self.ensemble.embed(views, captions)
        for name, (image_emb_NKD, text_emb_NTD) in embedded.items():
            samples[records.image_emb_column(name)] = image_emb_NKD
            samples[records.text_emb_column(name)] = text_emb_NTD
        return samples


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
        for i, name in enumerate(str(s) for s in batch[SHARD]):
            done += self.add(
                name,
                int(batch[CHUNK_INDEX][i]),
                bytes(batch[CHUNK][i]),
                bool(batch[LAST_CHUNK][i]),
                int(batch[SHARD_ROWS][i]),
                str(batch[SHARD_SKIPPED][i]),
            )
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
        for i, name in enumerate(str(s) for s in batch[SHARD]):
            writer = self.writers[writer_of(name, len(self.writers))]
            args = (
                name,
                int(batch[CHUNK_INDEX][i]),
                bytes(batch[CHUNK][i]),
                bool(batch[LAST_CHUNK][i]),
                int(batch[SHARD_ROWS][i]),
                str(batch[SHARD_SKIPPED][i]),
            )
            calls.append(writer.add(*args) if self.get is None else writer.add.remote(*args))
        results = calls if self.get is None else self.get(calls)
        return written_rows([row for done in results for row in done])


# --------------------------------------------------------------------------- part passes (`reinforce.parts`)


def set_prefix(caption_set: str) -> str:
    """Prefix of the stream columns carrying an added caption set's captions (`syn_captions` reads them)."""
    return f"{SET_PREFIX}{records.validate_caption_set_name(caption_set)}__"


def image_size(image_bytes: bytes) -> tuple[int, int]:
    """An encoded image's size from its header (the size `sources.decode_rgb` gives), without decoding pixels."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(bytes(image_bytes))) as image:
        return image.size


class ReadBase:
    """Base shard -> chunks for a part pass: the base's rows (and the captions of the parts the pass needs), cut into
    chunks exactly as `ReadShards` cut that shard's source, so every model forward sees the samples it would have
    seen in the base's own job (keep ``batch_size``, as when resuming). A base shard without rows gets its (empty)
    part file here.

    Args:
        chunk_rows: ``reinforce.resources.batch_size``.
        dataset_uri: The dataset directory.
        layout: The part being written, and the manifest it extends.
        run_fingerprint: The part's fingerprint (into each file's footer).
        columns: Columns of the dataset the pass reads (`records.read_shard_with_parts`).
    """

    def __init__(
        self,
        chunk_rows: int,
        dataset_uri: str,
        layout: records.PartLayout,
        run_fingerprint: str,
        columns: Sequence[str],
        chunk_max_pixels: int = CHUNK_MAX_PIXELS,
    ) -> None:
        self.chunk_rows = chunk_rows
        self.chunk_max_pixels = chunk_max_pixels
        self.dataset_uri = dataset_uri
        self.layout = layout
        self.run_fingerprint = run_fingerprint
        self.columns = list(columns)

    @property
    def output_dir(self) -> str:
        return storage.join(self.dataset_uri, records.PARTS_DIR, self.layout.part.name)

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for output in batch["output"]:
            for row in self.read(str(output)):
                yield _stream_row(row)

    def _samples(self, table: pa.Table) -> dict[str, np.ndarray]:
        samples = {}
        for name in table.column_names:
            column = table.column(name)
            if records.is_syn_captions_column(name):
                rows = column.to_pylist()
                S = column.type.list_size
                caption_set = name.removeprefix(records.SYN_CAPTIONS_PREFIX)
                prefix = SYN_PREFIX if name == records.SYN_CAPTIONS else set_prefix(caption_set)
                for j in range(S):
                    samples[f"{prefix}{j}"] = np.array([row[j] for row in rows], dtype=object)
            elif pa.types.is_fixed_size_list(column.type):
                samples[name] = np.ascontiguousarray(records.fixed_shape_numpy(column))
            else:
                samples[name] = np.array(column.to_pylist(), dtype=object)
        return samples

    def read(self, shard_path: str) -> Iterator[dict[str, object]]:
        table = records.read_shard_with_parts(self.dataset_uri, self.layout.manifest, shard_path, self.columns)
        metadata = shard_metadata(self.run_fingerprint, shard_path, {})
        if table.num_rows == 0:
            empty = {name: [] for name in self.layout.record_schema().names}
            write_output_shard(self.output_dir, shard_path, empty, self.layout, metadata)
            return
        samples = self._samples(table)
        sizes = [image_size(b) for b in samples[records.IMAGE]]
        chunks = list(_chunks(iter(enumerate(sizes)), self.chunk_rows, self.chunk_max_pixels))
        for index, chunk in enumerate(chunks):
            rows = [i for i, _ in chunk]
            last = index == len(chunks) - 1
            yield {
                SHARD: shard_path,
                CHUNK_INDEX: index,
                CHUNK: pack_chunk({name: values[rows] for name, values in samples.items()}),
                LAST_CHUNK: last,
                SHARD_ROWS: table.num_rows if last else -1,
                SHARD_SKIPPED: "{}" if last else "",
            }


class EmbedPart(Embed):
    """The teachers' embeddings a part adds, one chunk per forward.

    ``captions``: every teacher's text embeddings of the new set (its captions arrive from `Caption`, as a base
    job's synthetic captions do). ``teacher``: the new teacher's image and text embeddings exactly as `Embed` computes
    them in the base's own job (views rendered by `RenderViews`; the real and the default set's captions), then its
    text embeddings of each added caption set.
    """

    def __init__(
        self,
        teachers: Sequence[TeacherConfig],
        device: str,
        threads: int,
        kind: str,
        caption_sets: Sequence[str],
    ) -> None:
        super().__init__(teachers, device, threads)
        self.kind = kind
        self.caption_sets = tuple(caption_sets)

    def embed(self, samples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.kind == "teacher":
            samples = super().embed(samples)
            sets = [(caption_set, syn_captions(samples, set_prefix(caption_set))) for caption_set in self.caption_sets]
        else:
            (caption_set,) = self.caption_sets
            sets = [(caption_set, syn_captions(samples))]
        for caption_set, captions in sets:
            for name, text_emb_NTD in self.ensemble.embed_texts(captions).items():
                samples[records.set_text_emb_column(name, caption_set)] = text_emb_NTD
        return samples
