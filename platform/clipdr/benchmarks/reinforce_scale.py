"""Reinforcement at scale: peak memory of every kind of process against shard count and shard size, and
exactly-once after the job's driver is killed mid-run.

For each layout ``SHARDS x SAMPLES`` (``--layouts``, e.g. ``64x2000,4x20000``) a synthetic world of that layout at
small resolution (``--image-size``) is reinforced by the real pipeline (`run_pipeline`: read, render, embed, route,
parallel writers, Parquet), with simulated-accelerator teachers (`clipdr.models.sim_accel`, a forward that sleeps
off the CPU at ``--sim-rate`` views/s) and no captioner (S = 0), so the work per sample is small and the run is
about the stream, not the models. All the job's processes are read every ``SAMPLE_S`` (psutil) and each one's
resident set size (RSS) is kept at its peak, grouped by what the process is at that moment (Ray titles a worker by
the task or actor it runs; a pooled task worker that ran a read and then a route counts under each):

* driver: the layout's driver, a fresh process started for it (it runs the job's Ray Data executor), so that its
  peak is that layout's alone;
* read + render tasks, route tasks, model actors (teachers), writer actors, idle Ray workers, Ray system processes.

Flat means: the peak of each kind with the most samples per shard within 10% of the peak with the fewest (the
issue's target, from 2k to 20k samples per shard). Every byte of a chunk is bounded by ``--batch-size`` samples, so
only a design that holds a shard (or a growing part of it) somewhere grows with samples per shard.

Kill and resume (layout ``--kill-layout``, by position): a second driver (a child process joined to this Ray)
runs the same job into a fresh directory and kills itself (SIGKILL) once ``--kill-after`` shards have landed; Ray
ends its workers and actors with it, as a lost head node would. Then this process resumes it (`run.plan` keeps the
complete shards, by their footers) and checks exactly-once: every shard present, every key once, the row count of
the uninterrupted run, and every shard byte-identical to that run's.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

from clipdr import records, storage
from clipdr.config import Config, ReinforceConfig, ReinforceResources, SynthConfig, TeacherConfig, from_dict, to_dict

SAMPLE_S = 0.25  # how often every process's RSS is read
FLAT = 1.10  # the target: peak RSS with the most samples per shard / with the fewest, for every kind of process
MIB = 1024 * 1024

KINDS = (  # (kind, words of the Ray process title that make it that kind), first match wins
    ("writer actors", ("WriteShards",)),
    ("model actors (teachers)", ("Embed",)),
    ("route tasks", ("RouteChunks",)),
    ("read + render tasks", ("ReadShards", "RenderViews")),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--layouts", default="64x2000,4x20000", help="comma-separated SHARDSxSAMPLES, fewest samples a shard first"
    )
    parser.add_argument("--image-size", type=int, default=32, help="side of the synthetic images (px)")
    parser.add_argument("--views", type=int, default=2, help="K")
    parser.add_argument("--batch-size", type=int, default=64, help="samples a chunk (reinforce.resources.batch_size)")
    parser.add_argument("--writers", type=int, default=2, help="reinforce.resources.writers")
    parser.add_argument("--sim-rate", type=float, default=1e6, help="views/s of each simulated teacher")
    parser.add_argument("--kill-layout", type=int, default=0, help="the layout (by position) killed and resumed")
    parser.add_argument("--kill-after", type=int, default=2, help="shards landed before the second driver dies")
    parser.add_argument("--ray-cpus", type=int, help="logical CPUs of the benchmark's own local Ray")
    parser.add_argument("--output", help="also write the result (markdown) to this file")


def _layouts(text: str) -> list[tuple[int, int]]:
    layouts = []
    for part in text.split(","):
        shards, _, samples = part.strip().partition("x")
        if not (shards.isdigit() and samples.isdigit() and int(shards) > 0 and int(samples) > 0):
            raise ValueError(f"--layouts: {part!r} is not SHARDSxSAMPLES (e.g. 64x2000)")
        layouts.append((int(shards), int(samples)))
    return layouts


def _kind(proc: psutil.Process, driver_pid: int | None = None) -> str | None:
    """The kind of one of the job's processes; None for this process when it only watches another driver."""
    if proc.pid == driver_pid:
        return "driver"
    if proc.pid == os.getpid():
        return None
    title = " ".join(proc.cmdline())
    if not title.startswith("ray::"):
        return "Ray system processes"
    return next((kind for kind, words in KINDS if any(w in title for w in words)), "idle Ray workers")


class _PeakRss:
    """Reads the RSS of this process's descendants every `SAMPLE_S` while running; keeps each kind's peak (the
    largest single process of that kind). ``driver_pid``: the job's driver, a child process."""

    def __init__(self, driver_pid: int) -> None:
        self.driver_pid = driver_pid
        self.peak: dict[str, int] = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                kind, rss = _kind(proc, self.driver_pid), proc.memory_info().rss
            except psutil.Error:  # ended between the listing and the read
                continue
            if kind is not None:
                self.peak[kind] = max(self.peak[kind], rss)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._sample()

    def __enter__(self) -> _PeakRss:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _config(args: argparse.Namespace, source: str, output: str) -> Config:
    from clipdr.models import sim_accel

    rate = format(args.sim_rate, "f").rstrip("0").rstrip(".")  # the model name takes no exponent
    model = f"{sim_accel.PREFIX}{args.image_size}@{rate}"
    return Config(
        reinforce=ReinforceConfig(
            source=source,
            output=output,
            num_augmentations=args.views,
            num_syn_captions=0,
            teachers=(TeacherConfig(name="sim", model=model),),
            resources=ReinforceResources(batch_size=args.batch_size, writers=args.writers, crash_retries=0),
        )
    )


def _world(root: Path, shards: int, samples: int, image_size: int) -> str:
    from clipdr.data import synthetic

    out = root / f"world-{shards}x{samples}"
    synthetic.generate(
        SynthConfig(
            output=str(out),
            num_teacher=0,
            num_student=shards * samples,
            num_zeroshot=0,
            num_retrieval=0,
            shard_size=samples,
            image_size=image_size,
        )
    )
    return str(out / "student")


def _run(config: Config, on_shard=None) -> tuple[float, int]:
    """Wall s and rows of the job's pipeline over what ``config`` has left to do (`run.plan`)."""
    from clipdr.reinforce.pipeline import run_pipeline
    from clipdr.reinforce.run import ShardsFailedError, plan

    p = plan(config)
    rows: list[int] = []

    def landed(name: str, num_rows: int, written_at: float) -> None:
        rows.append(num_rows)
        if on_shard is not None:
            on_shard(len(rows))

    began = time.perf_counter()
    failed = run_pipeline(config.reinforce, p.pending, p.manifest, p.fingerprint, landed)
    if failed:
        raise ShardsFailedError(failed, len(p.tasks), config.reinforce.resources.crash_retries)
    return time.perf_counter() - began, sum(rows)


def driver_run(config_json: str, result_path: str) -> None:
    """A layout's driver, a fresh process (its peak RSS is this layout's alone): runs the job, writes wall s and
    rows as JSON to ``result_path``."""
    from clipdr.cluster import ensure_ray

    ensure_ray()  # joins the benchmark's Ray (RAY_ADDRESS)
    wall_s, rows = _run(from_dict(Config, json.loads(config_json)))
    Path(result_path).write_text(json.dumps({"wall_s": wall_s, "rows": rows}))


def _driver(function: str, *args: str) -> subprocess.Popen:
    """A second driver joined to this process's Ray, running ``function(*args)`` of this module."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    code = f"import sys; from clipdr.benchmarks import reinforce_scale as b; b.{function}(*sys.argv[1:])"
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env)


def _measured_run(config: Config, root: Path) -> tuple[tuple[float, int], dict[str, int]]:
    result = root / "driver-result.json"
    child = _driver("driver_run", json.dumps(to_dict(config)), str(result))
    with _PeakRss(child.pid) as rss:
        code = child.wait()
    if code != 0:
        raise RuntimeError(f"the layout's driver exited with {code}")
    out = json.loads(result.read_text())
    return (out["wall_s"], out["rows"]), dict(rss.peak)


def killed_run(config_json: str, kill_after: str) -> None:
    """The second driver: runs the job and kills itself (SIGKILL, no clean-up) when ``kill_after`` shards landed."""
    from clipdr.cluster import ensure_ray

    config = from_dict(Config, json.loads(config_json))
    ensure_ray()  # joins the benchmark's Ray (RAY_ADDRESS)

    def on_shard(landed: int) -> None:
        if landed >= int(kill_after):
            os.kill(os.getpid(), signal.SIGKILL)

    _run(config, on_shard)
    raise SystemExit("the job finished before it was killed")


def _shard_files(output: str) -> list[str]:
    prefix = storage.join(output, "")
    return sorted(uri[len(prefix) :] for uri in storage.list_files(output, (records.SHARD_SUFFIX,), recursive=True))


def _wait_for_writers_to_end(deadline_s: float = 60.0) -> None:
    """Until Ray has ended the killed driver's writer actors (a late commit would race the resume)."""
    end = time.monotonic() + deadline_s
    me = psutil.Process()
    while time.monotonic() < end:
        alive = []
        for proc in me.children(recursive=True):
            try:
                alive.append(_kind(proc) == "writer actors")
            except psutil.Error:
                continue
        if not any(alive):
            return
        time.sleep(0.5)


def _kill_and_resume(args: argparse.Namespace, config: Config, reference: str, root: Path) -> dict[str, object]:
    """Kills a driver mid-run, resumes, and checks exactly-once against the uninterrupted run ``reference``."""
    output = str(root / "killed")
    killed = dataclasses.replace(config, reinforce=dataclasses.replace(config.reinforce, output=output))
    child = _driver("killed_run", json.dumps(to_dict(killed)), str(args.kill_after))
    child.wait()
    if child.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the second driver was to kill itself, but exited with {child.returncode}")
    _wait_for_writers_to_end()
    before, expected = _shard_files(output), _shard_files(reference)
    if len(before) == len(expected):
        raise RuntimeError(
            f"the killed driver's writers completed all {len(before)} shards before they ended: nothing was left to "
            "resume; kill earlier (--kill-after) or give the layout more shards"
        )
    resume_s, redone_rows = _run(killed)
    after = _shard_files(output)
    keys = collections.Counter()
    for name in after:
        keys.update(pq.read_table(storage.join(output, name), columns=[records.KEY]).column(0).to_pylist())
    identical = [
        name
        for name in expected
        if name in after and Path(output, name).read_bytes() == Path(reference, name).read_bytes()
    ]
    reference_rows = sum(pq.read_metadata(storage.join(reference, n)).num_rows for n in expected)
    return {
        "shards complete when killed": f"{len(before)} of {len(expected)}",
        "shards redone by the resume": len(after) - len(before),
        "rows redone by the resume": redone_rows,
        "resume wall s": round(resume_s, 1),
        "every shard present": after == expected,
        "keys seen more than once": sum(1 for c in keys.values() if c > 1),
        "rows: resumed / uninterrupted": f"{sum(keys.values())} / {reference_rows}",
        "shards byte-identical to the uninterrupted run": f"{len(identical)} of {len(expected)}",
        "exactly once": (
            0 < len(before) < len(expected)
            and after == expected
            and all(c == 1 for c in keys.values())
            and sum(keys.values()) == reference_rows
            and len(identical) == len(expected)
        ),
    }


def main(args: argparse.Namespace) -> int:
    import ray

    from clipdr.cluster import ensure_ray, start_local

    layouts = _layouts(args.layouts)
    if not 0 <= args.kill_layout < len(layouts) or args.kill_after >= layouts[args.kill_layout][0]:
        raise ValueError("--kill-layout must name a layout with more shards than --kill-after")
    progress = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    own_ray = not ray.is_initialized()
    if own_ray and args.ray_cpus:
        start_local(num_cpus=args.ray_cpus)
    else:
        ensure_ray()
    peaks: list[dict[str, int]] = []
    runs: list[tuple[float, int]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="clipdr-scale-") as tmp:
            root = Path(tmp)
            for i, (shards, samples) in enumerate(layouts):
                progress(f"layout {shards} x {samples}: generating the source")
                source = _world(root, shards, samples, args.image_size)
                config = _config(args, source, str(root / f"out-{i}"))
                progress(f"layout {shards} x {samples}: reinforcing")
                run, peak = _measured_run(config, root)
                runs.append(run)
                peaks.append(peak)
                progress(f"layout {shards} x {samples}: {runs[-1][1]} rows in {runs[-1][0]:.1f} s")
                if i == args.kill_layout:
                    progress(f"layout {shards} x {samples}: kill after {args.kill_after} shards, then resume")
                    resume = _kill_and_resume(args, config, config.reinforce.output, root)
                for done in (Path(source).parent, root / f"out-{i}", root / "killed"):  # disk: a layout at a time
                    shutil.rmtree(done, ignore_errors=True)
    finally:
        if own_ray:
            ray.shutdown()
    return _report(args, layouts, peaks, runs, resume)


def _report(args, layouts, peaks, runs, resume) -> int:
    kinds = ["driver", *(k for k, _ in KINDS), "idle Ray workers", "Ray system processes"]
    by_size = sorted(range(len(layouts)), key=lambda i: layouts[i][1])
    low, high = by_size[0], by_size[-1]
    header = " | ".join(f"{s} x {n}" for s, n in layouts)
    lines = [
        f"Peak RSS (MiB) per process kind, sim-accel teacher ({args.sim_rate:g} views/s), K={args.views}, S=0, "
        f"{args.image_size} px, batch {args.batch_size}, {args.writers} writers, {os.cpu_count()} cores, load "
        f"average at the end {os.getloadavg()[0]:.1f}",
        "",
        f"| process kind | {header} | most / fewest samples a shard |",
        "|---|" + "---|" * len(layouts) + "---|",
    ]
    flat = True
    for kind in kinds:
        if not any(kind in p for p in peaks):
            continue
        values = [p.get(kind, 0) for p in peaks]
        ratio = values[high] / values[low] if values[low] else float("nan")
        flat = flat and ratio <= FLAT
        cells = " | ".join(f"{v / MIB:.0f}" for v in values)
        lines.append(f"| {kind} | {cells} | {ratio:.2f} |")
    lines.append(
        "| wall s (samples/s) | " + " | ".join(f"{wall:.0f} ({rows / wall:.0f})" for wall, rows in runs) + " | |"
    )
    lines += [
        "",
        f"flat (every kind within {FLAT - 1:.0%} from {layouts[low][1]} to {layouts[high][1]} samples a shard): "
        f"{'yes' if flat else 'NO'}",
        "",
        f"Kill and resume, layout {layouts[args.kill_layout][0]} x {layouts[args.kill_layout][1]}:",
        "",
        "| measure | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in resume.items()),
    ]
    text = "\n".join(lines)
    print(text)
    if args.output:
        command = "python jobs/benchmark.py reinforce_scale " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "output" and v is not None
        )
        Path(args.output).write_text(f"Measured with `{command}`.\n\n{text}\n")
    return 0 if resume["exactly once"] else 1
