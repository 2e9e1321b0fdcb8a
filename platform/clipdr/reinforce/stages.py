"""The reinforcement stages that read, render and embed, as plain callables over column batches; `pipeline.py`
wires them into Ray Data.

Nothing here imports Ray, so each stage runs (and is tested) on its own. Batches are dicts of numpy arrays.

The unit of the stream is a *chunk* (`clipdr.reinforce.chunks`: the chunk row, its packing, and the writers that
turn chunk rows into shards). Model stages run their forward over exactly one chunk at a time, so what a model
computes for a sample depends only on (config, source shard), never on how Ray bundled blocks: numerics of a
batched forward depend on the batch's composition and size, and a stream of single samples would let Ray regroup
them freely. Reading streams: a shard is never held whole, only two chunks of encoded samples and at most two
decoded images (the one being decoded, and the last, until the reader lets go of it).

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
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from clipdr import augment, augparams, records, storage
from clipdr.config import TeacherConfig
from clipdr.data import sources
from clipdr.reinforce.chunks import (
    CHUNK,
    CHUNK_INDEX,
    LAST_CHUNK,
    SHARD,
    SHARD_ROWS,
    SHARD_SKIPPED,
    SYN_PREFIX,
    ShardTask,
    pack_chunk,
    set_prefix,
    shard_metadata,
    syn_captions,
    unpack_chunk,
    write_output_shard,
)

VIEWS_PREFIX = "_views_"  # uint8 (N, K, 3, S, S) views of one augment.RenderKey: column _views_<S>_<interpolation>


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
                augparams.views_to_array(
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


def views_column(key: augment.RenderKey) -> str:
    return f"{VIEWS_PREFIX}{key.image_size}_{key.interpolation}"


def render_chunk(samples: dict[str, np.ndarray], keys: Sequence[augment.RenderKey]) -> dict[str, np.ndarray]:
    """Adds the chunk's uint8 views for each render in ``keys`` (`views_column`), decoding each image once."""
    images = _decode(samples[records.IMAGE])
    views = [augparams.views_from_array(views_KL) for views_KL in samples[records.AUG_PARAMS]]
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


# --------------------------------------------------------------------------- part passes (`reinforce.parts`)


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
