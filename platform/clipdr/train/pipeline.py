"""Ray Data wiring of the training input; every loader resource setting is applied here and only here.

    reinforced Parquet shards (epoch e: shard order permuted by (seed, e))
        --read_parquet (only the columns the run uses: its teachers, its captions, and in a view-major dataset
          only epoch e's drawn view and caption rows)--> ReplayBatch(epoch=e) (CPU tasks)
        --limit to whole global batches--> epoch e's rows
    union over epochs [start_epoch, num_epochs) --> TorchTrainer(datasets={"train": ...}) --> streaming_split
        --> each worker: iter_torch_batches(local batch)

Raw source shards (``clip`` mode on data that was never reinforced) are read one Ray task per shard with the
source readers (`clipdr.data.sources`, so corrupt samples are skipped the same way) and go through
`data.AugmentBatch` instead.

Each epoch's draws (view k, caption j) are fixed by ``(seed, epoch)`` in a view-major dataset (one k and j for
the epoch, so one projection a read: `data.shared_draw`) and by ``(seed, epoch, key)`` in a version 1 dataset,
whatever the block layout; with one loader actor and ``preserve_order`` the row order is fixed too, so a
single-worker run is reproducible end to end.

The map functions go into the stream as `remote` objects (plain data, built where they run), so that Ray's
control-plane processes that unpickle the stream do not import torch and open_clip.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import ray

from clipdr import records, storage
from clipdr.cluster import storage_runtime_env
from clipdr.config import AugmentConfig, to_dict
from clipdr.train import data, remote
from clipdr.train.plan import TrainPlan


@dataclass(frozen=True)
class DataSource:
    """The training data as the driver found it.

    Attributes:
        uri: Where it is.
        files: Its shard files (reinforced Parquet, or raw source shards).
        num_rows: Rows of one epoch.
        manifest: The reinforced dataset's manifest; None for raw source shards.
    """

    uri: str
    files: tuple[str, ...]
    num_rows: int
    manifest: records.Manifest | None


def _epoch_order(files: Sequence[str], seed: int, epoch: int) -> list[str]:
    digest = hashlib.blake2b(f"{seed}:{epoch}".encode(), digest_size=8).digest()
    order = np.random.default_rng(int.from_bytes(digest, "little")).permutation(len(files))
    return [files[i] for i in order]


def _columns(plan: TrainPlan, manifest: records.Manifest, epoch: int) -> list[str]:
    """The columns a run reads in ``epoch`` (`records.drawn_columns`): of the base shards, and of the parts holding
    its caption sets and teachers (the plan's sets; when it names none, the manifest's), and in a view-major dataset
    only the rows of the epoch's drawn view and caption (`data.shared_draw`)."""
    sets = (plan.syn_caption_sets or tuple(manifest.caption_sets)) if plan.use_syn_captions else ()
    teachers = plan.teacher_names if plan.mode.reads_embeddings else ()
    num_syn = (plan.num_syn_captions or sum(manifest.caption_sets[s] for s in sets)) if sets else 0
    view, syn_caption = data.shared_draw(manifest, plan.train.seed, epoch, sets, num_syn)
    return records.drawn_columns(manifest, teachers, sets, view, syn_caption)


def count_source_rows(files: Sequence[str]) -> int:
    """Valid samples in raw source shards: one Ray task a shard reads (and decodes) them and returns only its count.

    Plain tasks, not a Ray Data count: the samples never enter the object store, and no streaming executor starts
    (3-4x less time for the demo's teacher corpus on 2 cores).
    """
    count = ray.remote(num_cpus=1, runtime_env=storage_runtime_env())(remote.count_source_shard)
    return sum(ray.get([count.remote(uri) for uri in files]))


def _source_samples(files: Sequence[str], runtime_env: dict) -> ray.data.Dataset:
    """The valid samples of raw source shards ``files``, in their order: one Ray task a shard."""
    ds = ray.data.from_items([{"uri": f} for f in files], override_num_blocks=len(files))
    return ds.flat_map(remote.read_source_shard, runtime_env=runtime_env)


def build_dataset(
    source: DataSource,
    plan: TrainPlan,
    augment_cfg: AugmentConfig,
    preprocess: data.StudentPreprocess,
    rows_per_epoch: int,
    epochs: range,
) -> ray.data.Dataset:
    """The run's input stream: epochs ``epochs`` back to back, each cut to ``rows_per_epoch`` rows."""
    res, seed = plan.train.resources, plan.train.seed
    runtime_env = storage_runtime_env()
    # The map stage runs as pooled tasks: task workers are reused across epochs and runs, where an actor pool per
    # epoch would start (and import torch in) a fresh process for every epoch.
    tasks = {
        "compute": ray.data.TaskPoolStrategy(size=res.loader_tasks),
        "batch_size": res.loader_batch_size,
        "num_cpus": res.cpus_per_loader,
        "batch_format": "pyarrow",
        "runtime_env": runtime_env,
    }
    common = {"preprocess": dataclasses.asdict(preprocess), "tokenizer_name": plan.train.model, "seed": seed}
    if source.manifest is None:
        kind, arguments = remote.AUGMENT, {**common, "augment_cfg": to_dict(augment_cfg)}
    else:
        fs, _ = storage.resolve(source.uri)
        kind, arguments = (
            remote.REPLAY,
            {
                **common,
                "manifest": source.manifest.to_dict(),
                "mode": str(plan.mode),
                "use_syn_captions": plan.use_syn_captions,
                "num_syn_captions": plan.num_syn_captions,
                "teachers": plan.teacher_names,
                "caption_sets": list(plan.syn_caption_sets) or None,
            },
        )
    per_epoch = []
    for epoch in epochs:
        files = _epoch_order(source.files, seed, epoch)
        if source.manifest is None:
            ds = _source_samples(files, runtime_env)
        else:
            columns = _columns(plan, source.manifest, epoch)
            if any(source.manifest.part_of_column(c) for c in columns):
                ds = _read_with_parts(source, files, columns, runtime_env)
            else:
                paths = [storage.resolve(f)[1] for f in files]
                ds = _read_parquet(paths, fs, runtime_env, columns)
        _set_stream_options(ds.context)
        ds = ds.map_batches(remote.BatchTransform(kind, **arguments, epoch=epoch), **tasks)
        per_epoch.append(ds.limit(rows_per_epoch))
    # A union takes a copy of its first input's context, so it carries the same options.
    return per_epoch[0].union(*per_epoch[1:]) if len(per_epoch) > 1 else per_epoch[0]


# Ray Data lists Parquet footers on a pool of FooterReader actors, each a fresh Python process, for every read (so
# every epoch): 32 of them by default whatever the number of files. Its one knob is this variable, read in the
# calling process when `ray.data.read_parquet` builds the read.
FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
FILES_PER_FOOTER_ACTOR = 64
MAX_FOOTER_ACTORS = 32  # Ray Data's default, reached at 2,048 files
_footer_env_lock = threading.Lock()


def footer_actors(num_files: int) -> int:
    """FooterReader actors for one read of ``num_files`` shards: one per `FILES_PER_FOOTER_ACTOR` files, 1 to 32."""
    return max(1, min(MAX_FOOTER_ACTORS, math.ceil(num_files / FILES_PER_FOOTER_ACTOR)))


def _read_parquet(paths: list[str], fs, runtime_env: dict, columns: list[str]) -> ray.data.Dataset:
    """`ray.data.read_parquet` of ``columns`` only, with a footer pool sized to the files (`footer_actors`), unless
    the user set `FOOTER_ACTORS_ENV`. The variable is set for the call only, under a lock (the demo builds streams
    from threads).

    The projection goes into the read itself (Parquet fetches only those column chunks: the other teachers', the
    synthetic captions when unused), rather than a ``select_columns`` after it, which relies on the optimiser to
    push it down."""
    with _footer_env_lock:
        chosen = os.environ.get(FOOTER_ACTORS_ENV)
        os.environ[FOOTER_ACTORS_ENV] = chosen or str(footer_actors(len(paths)))
        try:
            return ray.data.read_parquet(paths, filesystem=fs, columns=columns, runtime_env=runtime_env)
        finally:
            if chosen is None:
                del os.environ[FOOTER_ACTORS_ENV]


def _read_with_parts(
    source: DataSource, files: Sequence[str], columns: list[str], runtime_env: dict
) -> ray.data.Dataset:
    """``columns`` of the shards ``files``, in their order, each shard joined by position with the part files that
    hold some of them (`records.read_shard_with_parts`, which checks the join by key): one Ray task a shard."""
    paths = dict(zip(source.manifest.shard_uris(source.uri), (s.path for s in source.manifest.shards), strict=True))
    ds = ray.data.from_items([{"shard": paths[f]} for f in files], override_num_blocks=len(files))
    read = remote.ReadWithParts(source.uri, source.manifest.to_dict(), columns)
    return ds.map_batches(read, batch_size=1, num_cpus=1, runtime_env=runtime_env)


def data_config() -> ray.train.DataConfig:
    """How Ray Train splits the stream over the workers: Train's default ingest options, in order. Without
    ``preserve_order`` Train's ingest hands blocks on as they finish, so epochs and shards interleave
    (tests/integration/test_train.py::test_train_ingest_keeps_the_stream_order)."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True  # reproducible row order (module docstring)
    return ray.train.DataConfig(execution_options=options)


def _set_stream_options(ctx: ray.data.DataContext) -> None:
    """Ray Data settings of one run's stream, set on the stream's own context: a dataset takes a copy of the
    process's context when it is created, and the datasets derived from it share that copy, so nothing is set on
    the process's context, which other jobs of the same driver use."""
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # per-operator bars flood job logs; the trainer logs throughput to MLflow
