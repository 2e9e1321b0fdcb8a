"""Reinforcement throughput: the Ray Data pipeline against the bound of the work it cannot skip.

Two things are compared, interleaved round by round (`timing.run_rounds`) after a warm-up round, at the same
torch threads on both sides (``--threads``: the bound's process and every model actor's ``cpus_per_actor``):

* bound: what the job must do for each sample, back to back in this process: read and decode the source shard,
  sample K views, generate S captions, render the K views at every teacher's resolution and run every teacher on
  them and on the 1 + S captions. No Ray, no serialisation, no Parquet. CPU clock: this thread's CPU time.
* pipeline: the whole job (`run_pipeline`: read, decode, caption, render, embed, write Parquet, all on Ray) over
  every shard, and over the first shard alone, each into a fresh directory; its cost is the difference, so that
  the fixed cost both runs pay (starting actors, importing torch, loading models) cancels. CPU clock: the CPU time
  of this process and all its descendants (Ray's workers, actors and system processes), read every ``SAMPLE_S``
  along each run, as Ray ends actors before the run returns. Per-shard landing times could not delimit a steady
  state instead: this pipeline may write every shard at the very end of a run.

Ratios are per round, then median (min-max) over rounds:

* CPU efficiency of the actors = bound CPU s a sample / CPU s a sample of the pipeline's actors (the processes
  that run its model stages; with Ray Data's current fusion the read runs inside the captioner's actor). Since
  views are rendered in CPU tasks (`RenderViews`), rendering counts under the pooled task workers, not the actors:
  compare across that change with the all-processes row. At most 1 for
  stages that add nothing to the work; 1 - efficiency is what they spend beyond it (decoding again, transport,
  writing). CPU time counts only the slices each process ran, so it holds on a shared machine: the headline.
* CPU efficiency, all processes = the same over every process of the job, adding the driver, Ray's own processes
  and its pooled task workers. Their CPU follows the run's length and worker start-ups more than its samples,
  so its difference between the two runs is noisy at benchmark sizes.
* wall speed-up = pipeline samples/s / bound samples/s. The pipeline overlaps its stages on several processes,
  so this can exceed 1 (up to the number of model actors given free cores). It rests on the difference of two
  runs' wall times, which moves with the neighbours' load: a secondary number on a shared machine.

Storage: bytes of the stored embedding columns per sample against the fp16 arithmetic (K + 1 + S) x sum(D) x 2.

With ``--sim-rate VIEWS_PER_S`` it measures instead whether the pipeline keeps a device busy, without a device:
two simulated-accelerator teachers (`clipdr.models.sim_accel`: a forward takes ``views / rate`` seconds, its device
work, normalising the uint8 views included, first and the rest slept off the CPU) that share one render, as
DataCompDR's two ViT-L-14 teachers do, and the tiny CoCa (random weights) writing
``--captions`` captions of at most ``--caption-len`` tokens (a job needs S >= 1; keep it short, its CPU competes
with rendering). Interleaved round by round after a warm-up:

* render stage: the pipeline as it is (`RenderViews` CPU tasks feed the teacher actor uint8 views; the actor takes
  two chunks at once, so that one's host work overlaps the other's forwards);
* render in actor: the earlier design (the teacher actor decodes and renders its views before each forward, one
  chunk at a time);
* render CPU: decoding and rendering the first ``--bound-shards`` shards in this process (one thread), the CPU
  a sample that rendering needs.

Busy fraction of a device (a teacher actor) = time inside the simulated forwards (image and text) / wall time from
its first forward's start to its last forward's end. A forward whose work on this CPU outlasts its views' device time
(high rates) takes that long: the share of such forwards is reported, as there the simulation's CPU, not the
pipeline, set the device's pace. Cores per device the recipe needs = render CPU s a sample x the
device's samples/s (rate / (K x teachers)); when that exceeds the cores this machine can give rendering (all but
one, which the driver, Ray and the actor keep busy, times the share of a core the one-process render got: below 1
on a loaded machine), rendering is the limit and the busy fraction says by how much.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import torch

from clipdr import augment, records, storage
from clipdr.benchmarks import timing
from clipdr.config import CaptionerConfig, Config, ReinforceConfig, ReinforceResources, SynthConfig, TeacherConfig
from clipdr.data import sources, synthetic

BOUND_PARTS = ("read + decode", "captioner", "teachers: render + forward")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=int, default=8, help="source shards the pipeline reinforces each round")
    parser.add_argument("--shard-size", type=int, default=64, help="samples a shard")
    parser.add_argument("--bound-shards", type=int, default=2, help="shards the bound processes each round")
    parser.add_argument("--views", type=int, default=5, help="K")
    parser.add_argument("--captions", type=int, default=2, help="S")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--caption-len", type=int, default=12, help="captioner max_len (tokens)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the bound and of each model actor")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    parser.add_argument("--output", help="also write the result table (markdown) to this file")
    parser.add_argument(
        "--sim-rate",
        type=float,
        help="measure the busy fraction of a simulated accelerator of this many views/s instead (see above)",
    )
    parser.add_argument("--sim-size", type=int, default=64, help="input size of the simulated teachers (px)")
    parser.add_argument(
        "--ray-cpus", type=int, help="with --sim-rate: logical CPUs of the local Ray (default: the job's local Ray)"
    )


def _group(proc: psutil.Process) -> str:
    """Which part of the job a process is, from the title Ray gives its workers.

    A model actor's title names the stages it runs, e.g. ``ray::MapWorker(MapBatches(ReadShards)->MapBatches(
    Caption)).submit`` when Ray Data fused the read into the captioner, so the groups follow the pipeline's wiring.
    """
    if proc.pid == os.getpid():
        return "driver (Ray Data executor)"
    title = " ".join(proc.cmdline())
    actor = re.match(r"ray::MapWorker\((.*)\)", title)
    if actor:
        return f"{ACTOR}{actor.group(1)}"
    return "task workers (unfused reads), idle workers" if title.startswith("ray::") else "Ray system processes"


ACTOR = "actor "  # group-name prefix of the pipeline's actors
SAMPLE_S = 0.5  # how often a run's processes are read: a process that ends loses at most its last SAMPLE_S


def _cpu_by_process() -> dict[int, tuple[str, float]]:
    """``{pid: (group, CPU s)}`` of this process and all its descendants."""
    me = psutil.Process()
    snapshot = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            cpu = proc.cpu_times()
            snapshot[proc.pid] = (_group(proc), cpu.user + cpu.system)
        except psutil.Error:  # exited between the listing and the read
            continue
    return snapshot


@dataclasses.dataclass
class _PipelineRound:
    """One round's two job runs, beside the `timing.Measurement` of their difference."""

    cpu_by_group: dict[str, float]  # CPU s of the extra shards by process group
    whole_run_s: float  # wall of the run over every shard, start-up included
    rows: int  # rows of that run


class _Pipeline:
    """The job, run twice a call: over the first shard only, then over every shard, each into a fresh directory.

    Both runs pay the same fixed cost (starting actors, importing torch, loading models), so the difference of
    their CPU times is what the extra shards cost. CPU time, unlike wall time, hardly moves with the neighbours'
    load, so the difference stays small-noise.
    """

    def __init__(self, config: Config, p, root: Path) -> None:
        self.config, self.plan, self.root = config, p, root
        self.runs = 0
        self.rounds: list[_PipelineRound] = []
        self.last_output = ""

    def _run(self, tasks) -> tuple[float, dict[str, float], int]:
        """Wall s, CPU s by process group, and rows of one job run over ``tasks``."""
        from clipdr.reinforce.pipeline import run_pipeline

        self.runs += 1
        self.last_output = str(self.root / f"reinforced-{self.runs}")
        cfg = dataclasses.replace(self.config.reinforce, output=self.last_output)
        rows: list[int] = []

        def on_shard(name: str, num_rows: int, written_at: float) -> None:
            rows.append(num_rows)

        # Ray Data ends an operator's actors as soon as that operator is done, before the run returns, and Ray
        # reaps them without adding their CPU time to any parent's: so the processes are read all along the run,
        # and an ended one counts with its last reading.
        seen = _cpu_by_process()
        start = dict(seen)
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(SAMPLE_S):
                seen.update(_cpu_by_process())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        began = time.perf_counter()
        try:
            run_pipeline(cfg, tasks, self.plan.manifest, self.plan.fingerprint, on_shard)
        finally:
            stop.set()
            sampler.join()
        wall_s = time.perf_counter() - began
        seen.update(_cpu_by_process())
        cpu_by_group: dict[str, float] = collections.Counter()
        for pid, (group, cpu_s) in seen.items():
            cpu_by_group[group] += cpu_s - (start[pid][1] if pid in start else 0.0)  # new processes count from 0
        return wall_s, cpu_by_group, sum(rows)

    def __call__(self) -> timing.Measurement:
        one_s, one_cpu, one_rows = self._run(self.plan.tasks[:1])
        all_s, all_cpu, all_rows = self._run(self.plan.tasks)
        extra_cpu = {group: all_cpu[group] - one_cpu.get(group, 0.0) for group in all_cpu}
        self.rounds.append(_PipelineRound(extra_cpu, all_s, all_rows))
        return timing.Measurement(all_s - one_s, sum(extra_cpu.values()), all_rows - one_rows)


class _Bound:
    """The work the job cannot skip for ``tasks``' samples, in this process, one call per round."""

    def __init__(self, config: Config, tasks, ensemble, captioner, cpu_clock: Callable[[], float]) -> None:
        self.cfg = config.reinforce
        self.augment_spec = records.AugmentSpec.from_config(config.augment)
        self.tasks = tasks
        self.ensemble, self.captioner = ensemble, captioner
        self.render_keys = augment.render_keys(ensemble.specs)
        self.cpu_clock = cpu_clock
        self.parts: list[dict[str, float]] = []  # CPU s of each of BOUND_PARTS, per call

    def __call__(self) -> timing.Measurement:
        cfg, clock = self.cfg, self.cpu_clock
        parts = dict.fromkeys(BOUND_PARTS, 0.0)
        num_samples = 0
        wall = time.perf_counter()
        for task in self.tasks:
            cpu = clock()
            samples = list(sources.iter_shard(task.source, collections.Counter()))
            parts["read + decode"] += clock() - cpu
            num_samples += len(samples)
            for start in range(0, len(samples), cfg.resources.batch_size):
                chunk = samples[start : start + cfg.resources.batch_size]
                images, keys = [s.image for s in chunk], [s.key for s in chunk]
                cpu = clock()
                syn = self.captioner.generate(images, keys, cfg.num_syn_captions)
                parts["captioner"] += clock() - cpu
                cpu = clock()
                views = [
                    augment.sample_views(s.image.size, s.key, cfg.num_augmentations, self.augment_spec, cfg.seed)
                    for s in chunk
                ]
                rendered = {key: augment.render_views(images, views, key) for key in self.render_keys}
                self.ensemble.embed(rendered, [[s.caption, *c] for s, c in zip(chunk, syn, strict=True)])
                parts["teachers: render + forward"] += clock() - cpu
        wall_s = time.perf_counter() - wall
        self.parts.append(parts)
        return timing.Measurement(wall_s, sum(parts.values()), num_samples)


def _storage(output: str, p) -> tuple[float, float]:
    """(stored embedding bytes a sample, whole shard bytes a sample) of a reinforced output."""
    emb_bytes = rows_total = file_bytes = 0
    for task in p.tasks:
        uri = storage.join(output, task.output)
        meta = pq.ParquetFile(uri).metadata
        rows_total += meta.num_rows
        file_bytes += Path(uri).stat().st_size
        for rg in range(meta.num_row_groups):
            group = meta.row_group(rg)
            for c in range(group.num_columns):
                column = group.column(c)
                if column.path_in_schema.startswith((records.IMAGE_EMB_PREFIX, records.TEXT_EMB_PREFIX)):
                    emb_bytes += column.total_compressed_size
    return emb_bytes / rows_total, file_bytes / rows_total


SIM_TEACHERS = 2  # like DataCompDR's two ViT-L-14 teachers: one render feeds both


def _sim_rate(config: Config) -> float:
    """The views/s of the simulated teachers of ``config`` (all the same model)."""
    from clipdr.models import sim_accel

    (rate,) = {sim_accel.parse(t.model).views_per_s for t in config.reinforce.teachers}
    return rate


class _SimPipeline:
    """The job over every shard with simulated-accelerator teachers, one design; per call, the devices' mean busy
    fraction (kept in ``busy``) and a `timing.Measurement` of the busy window (wall: first forward's start to last
    forward's end, cpu: time inside forwards, items: samples)."""

    def __init__(self, config: Config, p, root: Path, trace_dir: Path, render_in_actor: bool) -> None:
        self.config, self.plan, self.root, self.trace_dir = config, p, root, trace_dir
        self.render_in_actor = render_in_actor
        self.name = "actor" if render_in_actor else "stage"
        self.runs = 0
        self.busy: list[float] = []
        self.devices: list[int] = []
        self.overran: list[float] = []  # share of image forwards whose work outlasted their views' device time
        self.rate = _sim_rate(config)

    def __call__(self) -> timing.Measurement:
        from clipdr.models import sim_accel
        from clipdr.reinforce.pipeline import run_pipeline

        self.runs += 1
        cfg = dataclasses.replace(self.config.reinforce, output=str(self.root / f"sim-{self.name}-{self.runs}"))
        rows: list[int] = []
        for stale in self.trace_dir.glob("*.trace"):
            stale.unlink()
        run_pipeline(
            cfg,
            self.plan.tasks,
            self.plan.manifest,
            self.plan.fingerprint,
            lambda name, num_rows, written_at: rows.append(num_rows),
            render_in_actor=self.render_in_actor,
        )
        devices = sim_accel.read_traces(self.trace_dir)
        if not devices:
            raise RuntimeError(f"no simulated forwards were traced: was Ray started with {sim_accel.TRACE_DIR_ENV}?")
        fractions = [sim_accel.busy_fraction([(f.start, f.end) for f in forwards]) for forwards in devices.values()]
        self.busy.append(sum(fractions) / len(fractions))
        self.devices.append(len(devices))
        images = [f for forwards in devices.values() for f in forwards if f.views]
        self.overran.append(sum(f.work_s > f.views / self.rate for f in images) / len(images))
        starts = [f.start for forwards in devices.values() for f in forwards]
        ends = [f.end for forwards in devices.values() for f in forwards]
        inside = sum(f.end - f.start for forwards in devices.values() for f in forwards)
        return timing.Measurement(max(ends) - min(starts), inside, sum(rows))


class _RenderCost:
    """Decoding and rendering ``tasks``' chunks in this process, one thread: the CPU a sample rendering needs."""

    def __init__(self, config: Config, p, tasks, root: Path) -> None:
        from clipdr.reinforce import stages

        self.read = stages.ReadShards(config.reinforce.resources.batch_size, str(root / "unused"), p.manifest, "")
        self.keys = augment.render_keys(p.manifest.teachers)
        self.tasks = tasks

    def __call__(self) -> timing.Measurement:
        from clipdr.reinforce import chunks, stages

        unpacked = [chunks.unpack_chunk(row[chunks.CHUNK]) for task in self.tasks for row in self.read.read(task)]
        wall, cpu = time.perf_counter(), time.thread_time()
        for chunk in unpacked:
            stages.render_chunk(chunk, self.keys)
        return timing.Measurement(
            time.perf_counter() - wall, time.thread_time() - cpu, sum(len(c[records.KEY]) for c in unpacked)
        )


def _world(args: argparse.Namespace, root: Path) -> str:
    world = SynthConfig(
        output=str(root / "world"),
        num_teacher=0,
        num_student=args.shards * args.shard_size,
        num_zeroshot=0,
        num_retrieval=0,
        shard_size=args.shard_size,
    )
    synthetic.generate(world)
    return str(root / "world" / "student")


def main_sim(args: argparse.Namespace) -> int:
    import ray

    from clipdr.cluster import ensure_ray, start_local
    from clipdr.models import sim_accel
    from clipdr.models.captioners import TINY_COCA
    from clipdr.reinforce.run import plan

    torch.set_num_threads(1)
    progress = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    if ray.is_initialized():
        print("reinforce --sim-rate: needs a Ray of its own (its workers must inherit the trace dir)", file=sys.stderr)
        return 2
    model = f"{sim_accel.PREFIX}{args.sim_size}@{args.sim_rate:g}"
    teachers = tuple(TeacherConfig(name=f"sim{i}", model=model) for i in range(SIM_TEACHERS))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        trace_dir = root / "traces"
        trace_dir.mkdir()
        config = Config(
            reinforce=ReinforceConfig(
                source=_world(args, root),
                output=str(root / "reinforced"),
                num_augmentations=args.views,
                num_syn_captions=args.captions,
                teachers=teachers,
                captioner=CaptionerConfig(model=TINY_COCA, pretrained="", max_len=args.caption_len),
                resources=ReinforceResources(batch_size=args.batch_size, cpus_per_actor=args.threads),
            )
        )
        p = plan(config)
        things = {
            "render stage": _SimPipeline(config, p, root, trace_dir, render_in_actor=False),
            "render in actor": _SimPipeline(config, p, root, trace_dir, render_in_actor=True),
            "render CPU": _RenderCost(config, p, p.tasks[: args.bound_shards], root),
        }
        saved = os.environ.get(sim_accel.TRACE_DIR_ENV)
        os.environ[sim_accel.TRACE_DIR_ENV] = str(trace_dir)  # the local Ray's processes inherit it
        try:
            if args.ray_cpus:
                start_local(num_cpus=args.ray_cpus)
            else:
                ensure_ray()
            ray_cpus = ray.cluster_resources().get("CPU", 0)
            results = timing.run_rounds(things, args.rounds, args.warmup, progress=progress)
        finally:
            ray.shutdown()
            os.environ.pop(sim_accel.TRACE_DIR_ENV)
            if saved is not None:
                os.environ[sim_accel.TRACE_DIR_ENV] = saved

    kept = slice(args.warmup, None)
    stage, in_actor = things["render stage"], things["render in actor"]
    busy_stage, busy_actor = stage.busy[kept], in_actor.busy[kept]
    render_s = timing.per_item(results["render CPU"], "cpu")
    device_sps = args.sim_rate / (args.views * SIM_TEACHERS)
    cores_needed = render_s.median * device_sps
    cores = os.cpu_count() or 1
    share = timing.summarize([m.cpu_s / m.wall_s for m in results["render CPU"]])
    cores_for_render = max(1, cores - 1) * min(1.0, share.median)  # a loaded machine gives each process less
    limit = (
        f"rendering is the limit: the recipe needs {cores_needed:.2f} cores per device, this machine gives "
        f"rendering about {cores_for_render:.2f} ({cores} cores, all but one, x the share of a core a process got)"
        if cores_needed > cores_for_render
        else f"CPU for rendering suffices: {cores_needed:.2f} cores per device needed, about {cores_for_render:.2f} "
        "here"
    )
    rows = [
        ("**busy fraction, render stage (this design)**", timing.summarize(busy_stage).format()),
        ("busy fraction, render in actor (earlier design)", timing.summarize(busy_actor).format()),
        (
            "busy fraction ratio, stage / in actor (paired by round)",
            timing.summarize([a / b for a, b in zip(busy_stage, busy_actor, strict=True)]).format(),
        ),
        ("samples/s in the busy window, render stage", timing.rate(results["render stage"], "wall").format(".1f")),
        (
            "samples/s in the busy window, render in actor",
            timing.rate(results["render in actor"], "wall").format(".1f"),
        ),
        ("device samples/s at full busy: rate / (K x teachers)", f"{device_sps:.1f}"),
        ("render CPU ms a sample (decode + render once for both teachers)", render_s.scaled(1e3).format(".2f")),
        ("cores per device needed: render CPU s a sample x device samples/s", f"{cores_needed:.2f}"),
        (
            "share of a core the one-process render got (CPU s / wall s: < 1 on a loaded machine)",
            share.format(),
        ),
        ("devices (teacher actors) traced per run", ", ".join(str(n) for n in stage.devices[kept])),
        (
            "share of image forwards whose simulated work (on this CPU) outlasted their device time, render stage",
            timing.summarize(stage.overran[kept]).format(),
        ),
        ("verdict", limit),
    ]
    setup = (
        f"{args.shards} shards x {args.shard_size} samples, K={args.views}, batch {args.batch_size}, "
        f"{SIM_TEACHERS} teachers {model} ({args.sim_rate:g} views/s each, one render shared), "
        f"captioner {TINY_COCA} (S={args.captions}, max_len {args.caption_len}), "
        f"{cores} cores, Ray CPUs {ray_cpus:g}, load average at the end {os.getloadavg()[0]:.1f}; median (min-max) "
        f"of {args.rounds} interleaved rounds after {args.warmup} warm-up"
    )
    _report(args, f"Simulated accelerator busy fraction ({setup})", rows)
    return 0


def _report(args: argparse.Namespace, title: str, rows: list[tuple[str, str]]) -> None:
    table = "\n".join([title, "", "| measure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    print(table)
    if args.output:
        command = "python jobs/benchmark.py reinforce " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "output" and v is not None
        )
        Path(args.output).write_text(f"Measured with `{command}`.\n\n{table}\n")


def main(args: argparse.Namespace) -> int:
    if args.sim_rate is not None:
        return main_sim(args)
    import ray

    from clipdr.cluster import ensure_ray
    from clipdr.models import create_model
    from clipdr.models.captioners import TINY_COCA, build_captioner, build_coca
    from clipdr.models.teachers import TeacherEnsemble
    from clipdr.reinforce.run import plan

    if args.shards < 2 or not 1 <= args.bound_shards <= args.shards:
        print("reinforce: need --shards >= 2 and 1 <= --bound-shards <= --shards", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    progress = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = _world(args, root)
        torch.manual_seed(0)
        for name in ("clipdr-tiny-vit", "clipdr-tiny-mci"):
            torch.save(create_model(name).state_dict(), root / f"{name}.pt")
        torch.save(build_coca(TINY_COCA)[0].state_dict(), root / "coca.pt")
        teachers = (
            TeacherConfig(name="vit", model="clipdr-tiny-vit", pretrained=str(root / "clipdr-tiny-vit.pt")),
            TeacherConfig(name="mci", model="clipdr-tiny-mci", pretrained=str(root / "clipdr-tiny-mci.pt")),
        )
        captioner_cfg = CaptionerConfig(model=TINY_COCA, pretrained=str(root / "coca.pt"), max_len=args.caption_len)
        config = Config(
            reinforce=ReinforceConfig(
                source=source,
                output=str(root / "reinforced"),
                num_augmentations=args.views,
                num_syn_captions=args.captions,
                teachers=teachers,
                captioner=captioner_cfg,
                resources=ReinforceResources(batch_size=args.batch_size, cpus_per_actor=args.threads),
            )
        )
        p = plan(config)
        # One torch thread runs inside the calling thread, so its CPU time is exact and excludes Ray's threads in
        # this process; more threads need the whole process's.
        cpu_clock = time.thread_time if args.threads == 1 else time.process_time
        bound = _Bound(
            config,
            p.tasks[: args.bound_shards],
            TeacherEnsemble(teachers),
            build_captioner(p.manifest.captioner),
            cpu_clock,
        )
        pipeline = _Pipeline(config, p, root)
        owns_ray = not ray.is_initialized()  # a Ray this process already joined is left running
        ensure_ray()
        try:
            results = timing.run_rounds(
                {"bound": bound, "pipeline": pipeline}, args.rounds, args.warmup, progress=progress
            )
            emb_per_sample, file_per_sample = _storage(pipeline.last_output, p)
        finally:
            if owns_ray:
                ray.shutdown()

    kept = slice(args.warmup, None)
    bound_parts = bound.parts[kept]
    pipeline_rounds = pipeline.rounds[kept]
    groups = sorted({g for r in pipeline_rounds for g in r.cpu_by_group})
    items = [m.items for m in results["pipeline"]]
    actors_cpu = [
        timing.Measurement(m.wall_s, sum(v for g, v in r.cpu_by_group.items() if g.startswith(ACTOR)), m.items)
        for m, r in zip(results["pipeline"], pipeline_rounds, strict=True)
    ]

    def ms(values: list[float]) -> str:
        return timing.summarize(values).scaled(1e3).format(".1f")

    arithmetic = p.manifest.embedding_bytes_per_sample
    rows = [
        (
            "**CPU efficiency of the actors: bound CPU s / actors' CPU s a sample**",
            timing.ratio(results["bound"], actors_cpu, "cpu").format(),
        ),
        (
            "CPU efficiency, all processes: bound CPU s / pipeline CPU s a sample",
            timing.ratio(results["bound"], results["pipeline"], "cpu").format(),
        ),
        (
            "wall speed-up: pipeline samples/s / bound samples/s",
            timing.ratio(results["bound"], results["pipeline"], "wall").format(),
        ),
        ("bound CPU ms a sample", timing.per_item(results["bound"], "cpu").scaled(1e3).format(".1f")),
        *(
            (f"&nbsp;&nbsp;{part}", ms([parts[part] / results["bound"][0].items for parts in bound_parts]))
            for part in BOUND_PARTS
        ),
        ("pipeline actors' CPU ms a sample", timing.per_item(actors_cpu, "cpu").scaled(1e3).format(".1f")),
        (
            "pipeline CPU ms a sample, all processes",
            timing.per_item(results["pipeline"], "cpu").scaled(1e3).format(".1f"),
        ),
        *(
            (
                f"&nbsp;&nbsp;{group}",
                ms([r.cpu_by_group.get(group, 0.0) / n for r, n in zip(pipeline_rounds, items, strict=True)]),
            )
            for group in groups
        ),
        ("bound samples/s (wall, one process)", timing.rate(results["bound"], "wall").format(".1f")),
        (
            "pipeline samples/s (wall, all-shard run minus one-shard run)",
            timing.rate(results["pipeline"], "wall").format(".1f"),
        ),
        (
            "pipeline samples/s (wall, whole run incl. start-up)",
            timing.summarize([r.rows / r.whole_run_s for r in pipeline_rounds]).format(".1f"),
        ),
        ("stored embedding bytes a sample", f"{emb_per_sample:,.0f}"),
        ("fp16 arithmetic (K+1+S) x sum(D) x 2", f"{arithmetic:,}"),
        ("stored / arithmetic", f"{emb_per_sample / arithmetic:.3f}"),
        ("whole shard bytes a sample (images included)", f"{file_per_sample:,.0f}"),
    ]
    setup = (
        f"{args.shards} shards x {args.shard_size} samples (bound: {args.bound_shards} shards), K={args.views}, "
        f"S={args.captions}, batch {args.batch_size}, teachers clipdr-tiny-vit + clipdr-tiny-mci, captioner "
        f"{TINY_COCA} (max_len {args.caption_len}), CPU, {args.threads} torch thread(s) in the bound and in each "
        f"model actor; median (min-max) of {args.rounds} interleaved rounds after {args.warmup} warm-up"
    )
    _report(args, f"Reinforcement throughput ({setup})", rows)
    return 0
