"""Ray Data wiring of the reinforcement stages; every resource setting of the job is applied here and only here.

    source shards --ReadShards (tasks, CPU, streaming)--> chunks: samples + K sampled views
        --Caption (actor pool)--> + S synthetic captions
        --Embed (actor pool, GPUs when present)--> + per-teacher image (K x D) and text ((1+S) x D) embeddings
        --WriteShards (one actor)--> complete output shards, one per source shard

A stream row is one chunk of ``reinforce.resources.batch_size`` samples of one shard (see `stages`), so every
model forward sees the same samples together whatever the parallelism: the output is a function of the config
and the source alone. Only encoded image bytes and small arrays travel between stages: model stages decode the
bytes themselves and render the views they need, so no pixel tensor goes through the object store. The captioner
runs before the teachers so that a single actor embeds both the views and the 1+S captions with the teachers
loaded once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import ray

from clipdr import records
from clipdr.cluster import ensure_ray, storage_runtime_env
from clipdr.config import ReinforceConfig
from clipdr.reinforce.stages import Caption, Embed, ReadShards, ShardTask, WriteShards

T = TypeVar("T")
R = TypeVar("R")


def _apply(fn: Callable[[T], R], item: T) -> R:
    return fn(item)


def map_shards_on_ray(fn: Callable[[T], R], items: list[T]) -> list[R]:
    """Runs ``fn`` over ``items`` as one Ray task each (one task owns one shard); results in input order.

    ``fn`` may be any picklable callable, a `functools.partial` included: ``ray.remote`` accepts only functions
    and classes, so the task is a plain function that receives ``fn``, put in the object store once for all tasks.
    """
    ensure_ray()
    task = ray.remote(_apply).options(num_cpus=1, runtime_env=storage_runtime_env())
    fn_ref = ray.put(fn)
    return ray.get([task.remote(fn_ref, item) for item in items])


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"reinforce.resources.device must be auto, cpu or cuda, got {requested!r}")
    return requested


def run_pipeline(
    cfg: ReinforceConfig,
    tasks: Sequence[ShardTask],
    manifest: records.Manifest,
    run_fingerprint: str,
    on_shard: Callable[[str, int, float], None],
) -> None:
    """Reinforces ``tasks`` into ``cfg.output``; calls ``on_shard(name, rows, written_at)`` as each output shard
    lands (``written_at``: the writer's ``time.time()`` when the file was complete)."""
    res = cfg.resources
    device = resolve_device(res.device)
    threads = max(1, int(res.cpus_per_actor))
    gpus = res.gpus_per_actor if device == "cuda" else 0
    runtime_env = storage_runtime_env()
    model_actor = {
        "num_cpus": res.cpus_per_actor,
        "num_gpus": gpus,
        "batch_size": 1,  # one chunk (res.batch_size samples of one shard) a call
        "runtime_env": runtime_env,
    }

    ds = ray.data.from_items([{"source": t.source, "output": t.output} for t in tasks], override_num_blocks=len(tasks))
    read = ReadShards(res.batch_size, cfg.output, manifest, run_fingerprint)
    ds = ds.map_batches(read, batch_size=1, num_cpus=1, runtime_env=runtime_env)  # an instance: run as tasks
    if cfg.num_syn_captions > 0:
        ds = ds.map_batches(
            Caption,
            fn_constructor_args=(manifest.captioner, cfg.num_syn_captions, device, threads),
            compute=ray.data.ActorPoolStrategy(size=res.captioner_actors),
            **model_actor,
        )
    ds = ds.map_batches(
        Embed,
        fn_constructor_args=(cfg.teachers, device, threads),
        compute=ray.data.ActorPoolStrategy(size=res.teacher_actors),
        **model_actor,
    )
    ds = ds.map_batches(
        WriteShards,
        batch_size=1,  # one chunk a call: otherwise Ray bundles small blocks and shards land late
        fn_constructor_args=(cfg.output, manifest, run_fingerprint, {t.output: t.source for t in tasks}),
        # One writer: all rows of a shard must meet in the same process.
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.5,
        runtime_env=runtime_env,
    )
    for row in ds.iter_rows():
        on_shard(str(row["shard"]), int(row["num_rows"]), float(row["written_at"]))
