"""Ray Data wiring of the reinforcement stages; every resource setting of the job is applied here and only here.

    source shards --ReadShards (tasks, CPU, streaming)--> chunks: samples + K sampled views
        --Caption (actor pool)--> + S synthetic captions
        --RenderViews (tasks, CPU, as many as free CPUs allow)--> + uint8 views, once per distinct teacher render
        --Embed (actor pool, GPUs when present)--> + per-teacher image (K x D) and text ((1+S) x D) embeddings
        --RouteChunks (tasks)--> WriteShards (``reinforce.resources.writers`` actors, each owning the output shards
            `chunks.writer_of` gives it; each streams a shard's chunks into its file as row groups, in chunk order)
        --> complete output shards, one per source shard

A stream row is one chunk of ``reinforce.resources.batch_size`` samples of one shard (see `stages`), so every
model forward sees the same samples together whatever the parallelism: the output is a function of the config
and the source alone. Blocks are kept small (`_STREAM_BLOCK_BYTES`): Ray Data otherwise holds a task's output
until it reaches 128 MiB or the task ends, so a read task held a whole shard's chunks and handed none on before the
end (measured in docs/reliability.md).

Failures lose one shard, not the job, and never for ever. A stage whose worker dies (killed for memory, crashed)
is retried ``reinforce.resources.crash_retries`` times (Ray Data's default for actors is without limit: a
hostile shard that kills its worker was retried until someone stopped the job), then its block is dropped; any
other error drops its block at once. A shard with a dropped block never gets all its chunks to the writer, so its
output is not written; `run_pipeline` finishes the other shards and returns the failed ones, and the job exits
naming them. A rerun redoes exactly those, since only complete output shards count as done.

Up to the captioner only encoded image bytes and small arrays travel (the captioner decodes its images itself).
The teachers' views are rendered in a CPU stage of their own, sized by Ray Data's autoscaling apart from the model
actors, and travel to the teacher actor as uint8 (`stages.RenderViews`), so the teacher actor only copies them to
its device, normalises them there, runs its forwards and copies the embeddings back (docs/reinforce.md says why
and what was measured); it takes two chunks at once (`TEACHER_CALLS`), so that the host work of one overlaps the
other's forwards. The captioner runs before the teachers so that a single actor embeds both the views and
the 1+S captions with the teachers loaded once.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Callable, Sequence
from typing import TypeVar

import ray

from clipdr import records, storage
from clipdr.cluster import ensure_ray, storage_runtime_env
from clipdr.config import ReinforceConfig, TeacherConfig
from clipdr.reinforce.chunks import RouteChunks, ShardTask, WriteShards
from clipdr.reinforce.stages import Caption, Embed, EmbedPart, ReadBase, ReadShards, RenderViews

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


_STREAM_BLOCK_BYTES = 1 << 20  # a task hands its output on in blocks of about one chunk (a chunk row is one block)


def configure_stream(ctx: ray.data.DataContext) -> None:
    """The stream's Ray Data settings, on its own context (a dataset's copy, shared by the datasets derived from it):
    small blocks, and a failed block drops its shard instead of aborting every other one."""
    ctx.target_max_block_size = _STREAM_BLOCK_BYTES
    ctx.max_errored_blocks = -1


def task_fault_args(crash_retries: int) -> dict:
    """``map_batches`` arguments of a task stage: a task whose worker died is retried this many times."""
    return {"max_retries": crash_retries}


def actor_fault_args(crash_retries: int) -> dict:
    """``map_batches`` arguments of an actor stage: a dead actor is always replaced, but the call that was running
    when it died is retried only ``crash_retries`` times (Ray Data's default retries it without limit)."""
    return {"max_restarts": -1, "max_task_retries": crash_retries}


TEACHER_CALLS = 2
"""Chunks a teacher actor holds at once, each in a thread of its own (`stages.Embed`): while the device runs one
chunk's forwards, the host unpacks and stages the next and packs the last. Its input is rendered views, fixed in
size by the recipe, not the images a hostile shard could make huge."""


def model_pool(size: int, max_size: int = 0, calls: int = 1) -> ray.data.ActorPoolStrategy:
    """A model stage's actor pool: ``size`` actors, or elastic from ``size`` to ``max_size`` (Ray Data adds actors
    while chunks wait and resources allow, so a job starts with the devices it gets and takes more as nodes join;
    outputs do not depend on the pool's size, as a chunk is fixed by its shard).

    ``calls`` chunks in flight per actor, each run in a thread of the actor as it arrives (the stage itself
    serialises its device work). The chunks in flight on an actor that dies are all retried and charged a try, so a
    hostile chunk that kills its actor again and again also uses up the tries of the chunks beside it: one for a
    stage that decodes images (the captioner), `TEACHER_CALLS` for the teacher stage, whose device would otherwise
    wait through every hand-over (docs/bench/reinforce.md, "Simulated accelerator")."""
    threads = {"max_concurrent_calls_per_actor": calls, "enable_true_multi_threading": True} if calls > 1 else {}
    if max_size <= size:
        return ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=calls, **threads)
    return ray.data.ActorPoolStrategy(min_size=size, max_size=max_size, max_tasks_in_flight_per_actor=calls, **threads)


class _DroppedBlocks(logging.Handler):
    """Collects the errors Ray Data logs as it drops a failed block (``max_errored_blocks``), for the job's message."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not record.exc_info or record.exc_info[1] is None:
            return
        # Ray wraps the stage's error (and may fail to deserialize it): the last exception line of the formatted
        # chain that is not Ray's own is the stage's error as it was raised in the worker.
        text = "".join(traceback.format_exception(record.exc_info[1]))
        raised = [line.strip() for line in text.splitlines() if _EXCEPTION_LINE.match(line.strip())]
        ours = [line for line in raised if not line.startswith("ray.")]
        summary = (ours or raised or [str(record.exc_info[1]).strip().splitlines()[0]])[-1]
        self.errors.append(summary[:400])


_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Exit|Interrupt)\b(: |$)")


def drain(
    ds: ray.data.Dataset, tasks: Sequence[ShardTask], output_dir: str, on_shard: Callable[[str, int, float], None]
) -> dict[str, str]:
    """Runs the stream to its end, calling ``on_shard`` per written shard row; returns ``{source shard: why}`` for
    each task whose output shard is absent at the end (empty when every shard was written)."""
    dropped = _DroppedBlocks()
    ray_data_logger = logging.getLogger("ray.data")
    ray_data_logger.addHandler(dropped)
    try:
        for row in ds.iter_rows():
            on_shard(str(row["shard"]), int(row["num_rows"]), float(row["written_at"]))
    finally:
        ray_data_logger.removeHandler(dropped)
    prefix = storage.join(output_dir, "")
    written = {uri[len(prefix) :] for uri in storage.list_files(output_dir, (records.SHARD_SUFFIX,), recursive=True)}
    errors = sorted(set(dropped.errors))
    why = "a stage failed on it: " + " | ".join(errors) if errors else "a stage failed on it (see the Ray Data log)"
    return {t.source: why for t in tasks if t.output not in written}


def run_pipeline(
    cfg: ReinforceConfig,
    tasks: Sequence[ShardTask],
    manifest: records.Manifest,
    run_fingerprint: str,
    on_shard: Callable[[str, int, float], None],
    render_in_actor: bool = False,
) -> dict[str, str]:
    """Reinforces ``tasks`` into ``cfg.output``; calls ``on_shard(name, rows, written_at)`` as each output shard
    lands (``written_at``: the writer's ``time.time()`` when the file was complete). ``render_in_actor`` runs the
    earlier design, the teacher actor rendering its views itself (same output bytes), for the benchmark.

    Returns:
        ``{source shard: why}`` for the shards that failed (see the module docstring); empty when all were written.
    """
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
        **actor_fault_args(res.crash_retries),
    }

    ds = ray.data.from_items([{"source": t.source, "output": t.output} for t in tasks], override_num_blocks=len(tasks))
    configure_stream(ds.context)
    read = ReadShards(res.batch_size, cfg.output, manifest, run_fingerprint)
    # An instance: run as tasks (Ray Data may fuse them into the next actor stage, whose fault arguments then apply).
    ds = ds.map_batches(read, batch_size=1, num_cpus=1, runtime_env=runtime_env, **task_fault_args(res.crash_retries))
    if cfg.num_syn_captions > 0:
        ds = ds.map_batches(
            Caption,
            fn_constructor_args=(manifest.captioner, cfg.num_syn_captions, device, threads),
            compute=model_pool(res.captioner_actors, res.captioner_actors_max),
            **model_actor,
        )
    if not render_in_actor:
        # Tasks, not actors: Ray Data runs as many as free CPUs allow. Its remote arguments differ from the teacher
        # actor's, so Ray Data does not fuse it into that actor.
        ds = ds.map_batches(
            RenderViews(manifest.teachers),
            batch_size=1,
            num_cpus=1,
            runtime_env=runtime_env,
            **task_fault_args(res.crash_retries),
        )
    ds = ds.map_batches(
        Embed,
        fn_constructor_args=(cfg.teachers, device, threads, render_in_actor),
        # The earlier design renders in the actor, one chunk at a time, as it did.
        compute=model_pool(res.teacher_actors, res.teacher_actors_max, 1 if render_in_actor else TEACHER_CALLS),
        **model_actor,
    )
    return write_and_drain(ds, cfg, cfg.output, manifest, run_fingerprint, tasks, on_shard)


def run_part_pipeline(
    cfg: ReinforceConfig,
    tasks: Sequence[ShardTask],
    layout: records.PartLayout,
    run_fingerprint: str,
    teachers: Sequence[TeacherConfig],
    columns: Sequence[str],
    on_shard: Callable[[str, int, float], None],
) -> dict[str, str]:
    """Writes ``layout.part``'s files for ``tasks`` (base shards) under the dataset ``cfg.output``: the base's rows
    cut into the chunks of its own job (`ReadBase`), then the captioner (a captions part) or the views rendered for
    the new teacher (a teacher part), then `EmbedPart` with ``teachers``, then the same writer as the base job's.
    Returns the failed shards as `run_pipeline` does."""
    res, part = cfg.resources, layout.part
    device = resolve_device(res.device)
    threads = max(1, int(res.cpus_per_actor))
    runtime_env = storage_runtime_env()
    model_actor = {
        "num_cpus": res.cpus_per_actor,
        "num_gpus": res.gpus_per_actor if device == "cuda" else 0,
        "batch_size": 1,
        "runtime_env": runtime_env,
        **actor_fault_args(res.crash_retries),
    }
    output_dir = storage.join(cfg.output, records.PARTS_DIR, part.name)
    ds = ray.data.from_items([{"source": t.source, "output": t.output} for t in tasks], override_num_blocks=len(tasks))
    configure_stream(ds.context)
    read = ReadBase(res.batch_size, cfg.output, layout, run_fingerprint, columns)
    ds = ds.map_batches(read, batch_size=1, num_cpus=1, runtime_env=runtime_env, **task_fault_args(res.crash_retries))
    if part.kind == "captions":
        ds = ds.map_batches(
            Caption,
            fn_constructor_args=(part.captioner, part.num_syn_captions, device, threads),
            compute=model_pool(res.captioner_actors, res.captioner_actors_max),
            **model_actor,
        )
        sets = (part.caption_set,)
    else:
        renders = RenderViews((part.teacher,))
        ds = ds.map_batches(
            renders, batch_size=1, num_cpus=1, runtime_env=runtime_env, **task_fault_args(res.crash_retries)
        )
        sets = part.caption_sets
    ds = ds.map_batches(
        EmbedPart,
        fn_constructor_args=(tuple(teachers), device, threads, part.kind, sets),
        compute=model_pool(res.teacher_actors, res.teacher_actors_max, TEACHER_CALLS),
        **model_actor,
    )
    return write_and_drain(ds, cfg, output_dir, layout, run_fingerprint, tasks, on_shard)


def write_and_drain(
    ds: ray.data.Dataset,
    cfg: ReinforceConfig,
    output_dir: str,
    layout: records.Manifest | records.PartLayout,
    run_fingerprint: str,
    tasks: Sequence[ShardTask],
    on_shard: Callable[[str, int, float], None],
) -> dict[str, str]:
    """The end of a stream, the base job's (its shards) and a part pass's (one part's files): each chunk routed to
    the writer that owns its shard, the stream drained; returns the failed shards as `drain` does."""
    writers = start_writers(cfg, output_dir, layout, run_fingerprint, tasks)
    try:
        ds = ds.map_batches(
            RouteChunks(writers, ray.get),
            batch_size=1,  # one chunk a call: otherwise Ray bundles small blocks and shards land late
            num_cpus=_ROUTE_CPUS,
            # A writer takes one call at a time: more routing tasks than two a writer would only wait, holding
            # chunks and Ray Data's CPU budget, which the reads and renders need.
            compute=ray.data.TaskPoolStrategy(size=2 * len(writers)),
            runtime_env=storage_runtime_env(),
            **task_fault_args(cfg.resources.crash_retries),
        )
        return drain(ds, tasks, output_dir, on_shard)
    finally:
        stop_writers(writers)


_WRITER_CPUS = 0.25  # a writer encodes Parquet and waits on storage; `writers` of them share a CPU or so
_ROUTE_CPUS = 0.1  # a routing task hands a chunk on and waits for its writer


def start_writers(
    cfg: ReinforceConfig,
    output_dir: str,
    layout: records.Manifest | records.PartLayout,
    run_fingerprint: str,
    tasks: Sequence[ShardTask],
) -> list:
    """The writer actors (`chunks.WriteShards`), ``reinforce.resources.writers`` of them but never more than the
    shards to write (`num_writers`: one more would own none and only cost a process start); a chunk goes to the one
    that owns its shard (`chunks.writer_of`), so several shards are written at once, each by one process.

    Plain actors, not a Ray Data actor stage: Ray Data hands a block to whichever actor of a pool is free, and every
    chunk of a shard must meet in the same writer. A writer that dies is restarted and the call that was running is
    retried ``crash_retries`` times, as a stage's worker is; the shards it was writing lose their open files, never
    complete, and the job names them as failed (a rerun redoes them)."""
    res = cfg.resources
    actor = ray.remote(WriteShards).options(
        num_cpus=_WRITER_CPUS,
        runtime_env=storage_runtime_env(),
        max_restarts=-1,
        max_task_retries=res.crash_retries,
    )
    sources_by_output = {t.output: t.source for t in tasks}
    count = num_writers(res.writers, len(tasks))
    return [actor.remote(output_dir, layout, run_fingerprint, sources_by_output) for _ in range(count)]


def num_writers(configured: int, num_shards: int) -> int:
    """Writer actors a job starts: ``reinforce.resources.writers``, at most one a shard to write (at least one)."""
    return max(1, min(configured, num_shards))


def stop_writers(writers: list) -> None:
    """Discards what the writers hold of shards that did not complete (their temporary files), then ends them."""
    try:
        ray.get([w.close.remote() for w in writers], timeout=_WRITER_CLOSE_S)
    except (ray.exceptions.RayError, TimeoutError):  # a writer that cannot close leaves hidden temporary files only
        logging.getLogger(__name__).warning("a shard writer did not close; hidden temporary files may remain")
    finally:
        for w in writers:
            ray.kill(w)


_WRITER_CLOSE_S = 60.0
