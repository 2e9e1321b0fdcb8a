"""The reinforcement stages as plain callables over column batches; `pipeline.py` wires them into Ray Data.

Nothing here imports Ray, so each stage runs (and is tested) on its own. Batches are dicts of numpy arrays.

The stream between stages carries, per sample, the record's own columns (`records.KEY`, ...) plus three
bookkeeping columns: the output shard the sample belongs to, how many valid samples that shard has, and its
skip counts. The writer collects a shard's rows until it has all of them, then writes the shard in one
atomic file, so every output shard is either complete or absent, whatever order batches arrive in.

Shape suffixes: N samples, K views a sample, L encoded view length, S synthetic captions, D embedding width.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from clipdr import augment, records, storage
from clipdr.config import AugmentConfig, TeacherConfig
from clipdr.data import sources

SHARD = "_shard"  # output shard path, relative to the dataset directory
SHARD_ROWS = "_shard_rows"  # valid samples in that shard
SHARD_SKIPPED = "_shard_skipped"  # JSON {reason: count} of that shard
SYN_PREFIX = "_syn_"  # synthetic caption j travels as column _syn_<j> (flat strings convert to Arrow cleanly)
SHARD_METADATA_KEY = b"clipdr.reinforce"  # Parquet footer metadata of an output shard: provenance + skip counts


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
    raw = (schema.metadata or {}).get(SHARD_METADATA_KEY)
    return json.loads(raw) if raw else None


def write_output_shard(
    output_dir: str, name: str, columns: dict, manifest: records.Manifest, metadata: dict[bytes, bytes]
) -> int:
    table = records.build_table(columns, manifest)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    records.write_shard(storage.join(output_dir, name), table)
    return table.num_rows


class ReadShards:
    """Source shard -> validated samples with their K sampled views (CPU stage).

    A shard whose samples are all invalid has nothing to send down the stream, so this stage writes its
    (empty) output shard itself, carrying the skip counts.
    """

    def __init__(
        self,
        augment_cfg: AugmentConfig,
        num_views: int,
        seed: int,
        chunk_rows: int,
        output_dir: str,
        manifest: records.Manifest,
        run_fingerprint: str,
    ) -> None:
        self.augment_cfg = augment_cfg
        self.num_views = num_views
        self.seed = seed
        self.chunk_rows = chunk_rows
        self.output_dir = output_dir
        self.manifest = manifest
        self.run_fingerprint = run_fingerprint

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for source, output in zip(batch["source"], batch["output"], strict=True):
            yield from self.read(ShardTask(str(source), str(output)))

    def read(self, task: ShardTask) -> Iterator[dict[str, np.ndarray]]:
        skipped: collections.Counter[str] = collections.Counter()
        samples = list(sources.iter_shard(task.source, skipped))
        skipped_json = json.dumps(dict(skipped), sort_keys=True)
        if not samples:
            empty = {name: [] for name in self.manifest.schema().names}
            write_output_shard(
                self.output_dir,
                task.output,
                empty,
                self.manifest,
                shard_metadata(self.run_fingerprint, task.source, dict(skipped)),
            )
            return
        for start in range(0, len(samples), self.chunk_rows):
            chunk = samples[start : start + self.chunk_rows]
            views_NKL = np.stack(
                [
                    augment.views_to_array(
                        augment.sample_views(s.image.size, s.key, self.num_views, self.augment_cfg, self.seed)
                    )
                    for s in chunk
                ]
            )
            yield {
                records.KEY: np.array([s.key for s in chunk], dtype=object),
                records.IMAGE: np.array([s.image_bytes for s in chunk], dtype=object),
                records.IMAGE_EXT: np.array([s.image_ext for s in chunk], dtype=object),
                records.CAPTION: np.array([s.caption for s in chunk], dtype=object),
                records.AUG_PARAMS: views_NKL,
                SHARD: np.array([task.output] * len(chunk), dtype=object),
                SHARD_ROWS: np.full(len(chunk), len(samples), dtype=np.int64),
                SHARD_SKIPPED: np.array([skipped_json] * len(chunk), dtype=object),
            }


def _decode(images: Sequence[bytes]) -> list:
    return [sources.decode_rgb(bytes(b)) for b in images]


class Caption:
    """Adds S synthetic captions per sample (model stage: one captioner per actor)."""

    def __init__(self, spec: records.CaptionerSpec, num_captions: int, device: str, threads: int) -> None:
        import torch

        from clipdr.models.captioners import build_captioner
        from clipdr.models.teachers import seeded_init

        torch.set_num_threads(threads)
        with seeded_init(spec.name):  # a captioner without weights is the same in every actor and rerun
            self.captioner = build_captioner(spec, device=device)
        self.num_captions = num_captions

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [str(k) for k in batch[records.KEY]]
        captions = self.captioner.generate(_decode(batch[records.IMAGE]), keys, self.num_captions)
        for j in range(self.num_captions):
            batch[f"{SYN_PREFIX}{j}"] = np.array([sample_captions[j] for sample_captions in captions], dtype=object)
        return batch


def syn_captions(batch: dict[str, np.ndarray]) -> list[list[str]]:
    """The S synthetic captions of each row of a batch (empty lists before the captioner ran)."""
    columns = sorted((c for c in batch if c.startswith(SYN_PREFIX)), key=lambda c: int(c[len(SYN_PREFIX) :]))
    num_rows = len(batch[records.KEY])
    return [[str(batch[c][i]) for c in columns] for i in range(num_rows)]


class Embed:
    """Adds every teacher's image embeddings of the K stored views and text embeddings of 1+S captions."""

    def __init__(self, teachers: Sequence[TeacherConfig], device: str, threads: int) -> None:
        import torch

        from clipdr.models.teachers import TeacherEnsemble

        torch.set_num_threads(threads)
        self.ensemble = TeacherEnsemble(teachers, device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        views = [augment.views_from_array(views_KL) for views_KL in batch[records.AUG_PARAMS]]
        captions = [[str(real), *syn] for real, syn in zip(batch[records.CAPTION], syn_captions(batch), strict=True)]
        embedded = self.ensemble.embed(_decode(batch[records.IMAGE]), views, captions)
        for name, (image_emb_NKD, text_emb_NTD) in embedded.items():
            batch[records.image_emb_column(name)] = image_emb_NKD
            batch[records.text_emb_column(name)] = text_emb_NTD
        return batch


class WriteShards:
    """Collects each output shard's rows and writes the shard once all of them arrived (one actor only).

    Emits one row per completed shard: its name, row count and the time it was written.
    """

    def __init__(
        self, output_dir: str, manifest: records.Manifest, run_fingerprint: str, sources_by_output: dict[str, str]
    ) -> None:
        self.output_dir = output_dir
        self.manifest = manifest
        self.run_fingerprint = run_fingerprint
        self.sources_by_output = sources_by_output
        self.columns = manifest.schema().names
        self.pending: dict[str, list[dict[str, np.ndarray]]] = collections.defaultdict(list)
        self.counts: collections.Counter[str] = collections.Counter()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done_names: list[str] = []
        done_rows: list[int] = []
        done_at: list[float] = []
        shards = batch[SHARD]
        for name in dict.fromkeys(str(s) for s in shards):
            rows = np.flatnonzero(shards == name)
            part = {
                c: batch[c][rows] for c in batch if c in self.columns or c.startswith(SYN_PREFIX) or c == SHARD_SKIPPED
            }
            self.pending[name].append(part)
            self.counts[name] += len(rows)
            expected = int(batch[SHARD_ROWS][rows[0]])
            if self.counts[name] == expected:
                done_names.append(name)
                done_rows.append(self._write(name))
                done_at.append(time.time())
            assert self.counts[name] <= expected, f"shard {name} got {self.counts[name]} rows, expected {expected}"
        return {
            "shard": np.array(done_names, dtype=object),
            "num_rows": np.array(done_rows, dtype=np.int64),
            "written_at": np.array(done_at, dtype=np.float64),
        }

    def _write(self, name: str) -> int:
        parts = self.pending.pop(name)
        del self.counts[name]
        merged = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
        columns = {c: merged[c] for c in self.columns if c != records.SYN_CAPTIONS}
        if records.SYN_CAPTIONS in self.columns:
            columns[records.SYN_CAPTIONS] = syn_captions(merged)
        skipped = json.loads(str(parts[0][SHARD_SKIPPED][0]))
        metadata = shard_metadata(self.run_fingerprint, self.sources_by_output[name], skipped)
        return write_output_shard(self.output_dir, name, columns, self.manifest, metadata)
