"""The GPU check: the real reinforcement job at real sizes on one CUDA device, unattended, in phases.

``jobs/gpu_check.sh`` runs the phases, each in its own process under its own time limit; they hand on through files
in a working directory (``--work``: the world, the reinforced output, the MLflow store), and only the results go to
``--out`` (``gpu_check.json``, ``gpu_check.md`` and nvidia-smi's samples: a device tool brings back a few files):

1. ``env``: CUDA is there (else it fails at once, saying so), and which device (its peak: `accelerators.PEAK_TFLOPS`).
2. ``data``: a synthetic world of ``--samples`` images at 224 px (the teachers' input size), in 8 webdataset shards.
3. ``reinforce``: `clipdr.reinforce.run.run` (what ``clipdr reinforce`` and ``jobs/reinforce.py`` call) on a local
   Ray, with ``jobs/configs/gpu_check.toml``: two ViT-B-16 teachers and the CoCa ViT-L-14 captioner, random
   weights (nothing can be downloaded on the machine; the FLOPs and the speed do not depend on the values), bf16 on
   CUDA, the DataCompDR recipe's K = 30 and S = 5. ``nvidia-smi`` samples the GPU's utilisation every 200 ms.
4. ``report``: views/s and samples/s, MFU = FLOPs a sample (`clipdr.reinforce.cost`, as the dry run counts them)
   x samples / seconds / the device's dense bf16 peak, the GPU busy fraction (mean ``utilization.gpu``), and the
   DataCompDR-12M projection at that MFU. Written as `cost.Measurement` (``gpu_check.json``, which
   ``reinforce.cost.measured`` reads) and ``gpu_check.md`` (what docs/reinforce.md quotes).

The rates are taken over the steady window when there is one: from the first output shard landing to the last,
counting the samples of every shard but the first (start-up, model loads and the first shard's pipeline fill
excluded); else over the job's whole wall time. The report says which. ``--smoke`` runs the same phases on the CPU
at tiny sizes (tiny models, a few samples), so that the path stays tested where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

CONFIG = "jobs/configs/gpu_check.toml"
PHASES = ("env", "data", "stages", "train", "compile", "reinforce", "report")
JOB_MODULES = ("ray", "mlflow")  # the Ray job's; the direct phases (`gpu_direct`) need neither
SMOKE_OVERRIDES = (  # tiny twins of the check's models, a few views and captions, on the CPU
    "reinforce.teachers=[{name = 'vit_a', model = 'clipdr-tiny-vit'}, {name = 'vit_b', model = 'clipdr-tiny-vit'}]",
    "reinforce.captioner.model=clipdr-tiny-coca",
    "reinforce.captioner.max_len=8",
    "reinforce.num_augmentations=2",
    "reinforce.num_syn_captions=1",
    "reinforce.resources.device=cpu",
    "reinforce.resources.batch_size=4",
    "reinforce.resources.cpus_per_actor=1",
)
_ENV, _DATA, _RUN, _GPU_LOG = "env.json", "data.json", "reinforce.json", "gpu_utilization.csv"
SAMPLE_MS = 200


class GpuCheckError(RuntimeError):
    """The check cannot run here (no CUDA, missing packages) or its job failed; the message says why."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--phase", choices=PHASES, required=True, help="the phase to run (jobs/gpu_check.sh: all)")
    parser.add_argument("--out", default="gpu-check-out", help="where the results go (gpu_check.json and .md)")
    parser.add_argument(
        "--work", default="", help="working files (world, reinforced output, MLflow store); default: OUT/work"
    )
    parser.add_argument("--samples", type=int, default=512, help="synthetic samples to reinforce")
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few samples, on the CPU (tests)")


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if args.phase == "report":
            report(work, out, args.smoke)
        else:
            phases = {
                "env": check_env,
                "data": make_data,
                "stages": stages,
                "train": train,
                "compile": compile_step,
                "reinforce": reinforce,
            }
            phases[args.phase](work, args.samples, args.smoke)
    except GpuCheckError as e:
        print(f"gpu check, phase {args.phase}: {e}", file=sys.stderr)
        return 1
    return 0


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _read(work: Path, name: str) -> dict:
    path = work / name
    if not path.exists():
        raise GpuCheckError(f"{path} is missing: run the phases in order (jobs/gpu_check.sh)")
    return json.loads(path.read_text())


def check_env(work: Path, samples: int, smoke: bool) -> None:
    """Fails at once without CUDA (unless ``smoke``); records the device and its peak."""
    import torch

    from clipdr import accelerators

    if smoke:
        _write(work / _ENV, {"device": "cpu", "device_name": "cpu (smoke)", "torch": torch.__version__})
        return
    if not torch.cuda.is_available():
        raise GpuCheckError(
            f"no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda}): the GPU check needs "
            "one; `jobs/gpu_check.sh smoke` runs its CPU smoke mode"
        )
    name = torch.cuda.get_device_name(0)
    try:
        device = accelerators.device_of(name)
    except accelerators.AcceleratorError as e:
        raise GpuCheckError(str(e)) from None
    _write(work / _ENV, {"device": device, "device_name": name, "torch": torch.__version__})
    print(f"device {name}: dense bf16 peak {accelerators.PEAK_TFLOPS[device]:g} TFLOP/s")


def make_data(work: Path, samples: int, smoke: bool) -> None:
    """The synthetic world's student split: ``samples`` images in 8 shards (224 px; 32 px in smoke mode)."""
    from clipdr.config import SynthConfig
    from clipdr.data import synthetic

    num_shards, image_size = (2, 32) if smoke else (8, 224)
    cfg = SynthConfig(
        output=str(work / f"world-{samples}x{image_size}px"),  # kept for a rerun; one per size
        image_size=image_size,
        shard_size=max(1, -(-samples // num_shards)),
        num_teacher=0,
        num_student=samples,
        num_zeroshot=0,
        num_retrieval=0,
        workers=1 if smoke else 0,
    )
    started = time.monotonic()
    synthetic.generate(cfg)
    _write(work / _DATA, {"source": str(Path(cfg.output) / "student"), "samples": samples, "image_size": image_size})
    print(f"{samples} samples at {cfg.image_size}px in {time.monotonic() - started:.1f} s")


def _direct(work: Path, smoke: bool, measure, result_name: str) -> None:
    """Runs a direct phase, ``measure(world, device, peak)``, on the device the env phase found (the CPU in smoke
    mode) and keeps its figures in ``work / result_name`` for the report."""
    from clipdr import accelerators

    device, peak = ("cpu", None) if smoke else ("cuda", accelerators.peak_flops(_read(work, _ENV)["device"]))
    result = measure(_read(work, _DATA)["source"], device, peak)
    _write(work / result_name, result)
    print(json.dumps(result, indent=2))


def stages(work: Path, samples: int, smoke: bool) -> None:
    """The reinforcement stages at the DataCompDR-12M recipe on the device, without Ray (`gpu_direct.run_stages`)."""
    from clipdr.benchmarks import gpu_direct

    run = lambda world, device, peak: gpu_direct.run_stages(world, work, device, peak, smoke)  # noqa: E731
    _direct(work, smoke, run, gpu_direct.STAGES)


def train(work: Path, samples: int, smoke: bool) -> None:
    """The MobileCLIP-S0 recipe's training step on the device, without Ray (`gpu_direct.run_train`)."""
    from clipdr.benchmarks import gpu_direct

    _direct(work, smoke, lambda world, device, peak: gpu_direct.run_train(world, device, peak, smoke), gpu_direct.TRAIN)


def compile_step(work: Path, samples: int, smoke: bool) -> None:
    """The training step compiled (`gpu_direct.run_compile`); not in smoke mode, where compiling takes minutes."""
    from clipdr.benchmarks import gpu_direct

    if smoke:
        print("compile: skipped in smoke mode (inductor takes minutes on a CPU; the unit tests cover the option)")
        return
    _direct(work, smoke, gpu_direct.run_compile, gpu_direct.COMPILE)


def job_config(work: Path, smoke: bool):
    """The check's reinforcement config: `CONFIG`, with the source and outputs in ``work`` (and tiny in smoke)."""
    from clipdr.config import load_config

    source = _read(work, _DATA)["source"]
    overrides = [
        f"reinforce.source={source}",
        f"reinforce.output={work / 'reinforced'}",
        f"tracking.uri=sqlite:///{(work / 'mlflow.db').resolve()}",
        *(SMOKE_OVERRIDES if smoke else ()),
    ]
    return load_config(CONFIG, overrides)


class _GpuSampler:
    """``nvidia-smi`` writing the GPU's utilisation every `SAMPLE_MS` to a CSV (absent without nvidia-smi)."""

    def __init__(self, path: Path) -> None:
        self.proc = None
        if shutil.which("nvidia-smi"):
            query = ["--query-gpu=timestamp,utilization.gpu", "--format=csv,noheader,nounits", "-lms", str(SAMPLE_MS)]
            with path.open("w") as sink:
                self.proc = subprocess.Popen(["nvidia-smi", "-i", "0", *query], stdout=sink)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def reinforce(work: Path, samples: int, smoke: bool) -> None:
    """Runs the reinforcement job, timing it and sampling the GPU; records why not where Ray or MLflow is missing
    (a bare accelerator image: the direct phases have measured the device already)."""
    import importlib.util

    missing = [m for m in JOB_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        _write(work / _RUN, {"skipped": f"this Python lacks {' and '.join(missing)}: the Ray job did not run"})
        print(f"reinforce: skipped, this Python lacks {' and '.join(missing)}")
        return
    from clipdr.reinforce import run

    config = job_config(work, smoke)
    shutil.rmtree(config.reinforce.output, ignore_errors=True)  # a fresh run each time: no resume
    sampler = _GpuSampler(work / _GPU_LOG)
    started = time.time()
    try:
        manifest = run.run(config, log=lambda line: print(line, flush=True))
    finally:
        ended = time.time()
        sampler.stop()
    _write(work / _RUN, {"started": started, "ended": ended, "num_rows": manifest.num_rows})


def _steady_window(output: str) -> tuple[float, float, int] | None:
    """(first landing, last landing, samples after the first shard) from the output shards' modification times."""
    from clipdr import records, storage

    landed = sorted(
        (os.stat(storage.resolve(uri)[1]).st_mtime, records.read_shard_footer(uri)[0])
        for uri in storage.list_files(output, (records.SHARD_SUFFIX,), recursive=True)
    )
    if len(landed) < 2 or landed[-1][0] <= landed[0][0]:
        return None
    return landed[0][0], landed[-1][0], sum(rows for _, rows in landed[1:])


def _gpu_samples(path: Path) -> list[tuple[float, float]]:
    """(time, ``utilization.gpu`` %) of every sample nvidia-smi wrote (its timestamps are local time)."""
    samples = []
    for line in path.read_text().splitlines() if path.exists() else ():
        stamp, _, value = line.rpartition(",")
        try:  # a naive datetime's timestamp() reads it as local time, as nvidia-smi writes it
            samples.append((datetime.strptime(stamp.strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp(), float(value)))
        except ValueError:
            continue
    return samples


def _window(job: dict, output: str, gpu: list[tuple[float, float]]) -> tuple[float, float, int, str]:
    """(start, end, samples, which) of the interval the rates are taken over: the output shards' landings when they
    spread over at least a fifth of the job (a pipeline that lands every shard at its end has no steady window), else
    the GPU's first to last busy sample, else the whole job."""
    whole = job["ended"] - job["started"]
    steady = _steady_window(output)
    if steady is not None and steady[1] - steady[0] >= 0.2 * whole:
        return (*steady, "steady: first to last output shard landing, samples after the first shard")
    busy = [at for at, value in gpu if value > 0]
    if len(busy) >= 2 and busy[-1] > busy[0]:
        return busy[0], busy[-1], job["num_rows"], "GPU active: first to last busy nvidia-smi sample"
    return job["started"], job["ended"], job["num_rows"], "whole job (start-up and model loads included)"


def _busy_fraction(gpu: list[tuple[float, float]], start: float, end: float) -> float | None:
    """Mean ``utilization.gpu`` / 100 of the samples in [start, end]; None without samples there."""
    in_window = [value for at, value in gpu if start <= at <= end]
    return sum(in_window) / len(in_window) / 100 if in_window else None


def _table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| measure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def _pct(value: float | None) -> str:
    return "n/a (smoke)" if value is None else f"{value:.3f}"


def _stage_rows(st: dict) -> list[tuple[str, str]]:
    hours = st.get("dataset_device_hours")
    return [
        ("what ran", st["config"]),
        ("samples", f"{st['num_samples']} (the first chunk of each device stage is its warm-up, not timed)"),
        (
            "captioner",
            f"{st['caption_samples_per_s']:.1f} samples/s, {st['captions_per_s']:.1f} captions/s, "
            f"MFU {_pct(st.get('caption_mfu'))}",
        ),
        (
            "teachers",
            f"{st['embed_samples_per_s']:.1f} samples/s, {st['teacher_views_per_s']:.0f} views/s, "
            f"MFU {_pct(st.get('embed_mfu'))}",
        ),
        ("one device, both stages", f"{st['device_samples_per_s']:.1f} samples/s, MFU {_pct(st.get('device_mfu'))}"),
        (
            "FLOPs a sample",
            f"teachers {st['teacher_flops_per_sample'] / 1e9:,.0f} + captioner "
            f"{st['caption_flops_per_sample'] / 1e9:,.0f} GFLOP (clipdr.reinforce.cost)",
        ),
        (
            "render, CPU",
            f"{st['render_cpu_s_per_sample'] * 1e3:.1f} ms a sample on one core; "
            f"{st['render_pool_samples_per_s']:.1f} samples/s over {st['render_pool_processes']} processes "
            "(pool start-up included)",
        ),
        ("cores a device needs to render", f"{st['cores_per_device']:.1f}"),
        (
            "DataCompDR-12M",
            "n/a (smoke)"
            if hours is None
            else f"{hours:,.1f} device-hours at this rate (floor {st['dataset_floor_hours']:,.1f} at peak, "
            f"{st['dataset_samples']:,} samples)",
        ),
    ]


def _train_table(tr: dict, compiled: dict | None) -> str:
    """The training variants side by side, and the loader."""
    variants = dict(tr["variants"])
    if compiled is not None:
        variants[
            f"compiled ({', '.join(c.split('=')[0].removeprefix('train.') for c in compiled['changes'])}); first "
            f"steps {compiled['first_steps_s']:.0f} s"
        ] = compiled
    lines = [
        "| variant | samples/s, median (min-max) | MFU | peak memory | dry-run estimate | S0 recipe, device-hours "
        "| host syncs a step |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in variants.items():
        low, high = v["samples_per_s_range"]
        peak = "n/a (CPU)" if v["peak_bytes"] is None else f"{v['peak_bytes'] / 2**30:.2f} GiB"
        syncs = v.get("host_syncs_per_step")
        lines.append(
            f"| {name} | {v['samples_per_s']:,.0f} ({low:,.0f}-{high:,.0f}) | {_pct(v['mfu'])} | {peak} | "
            f"{v['estimated_bytes'] / 2**30:.2f} GiB | {v['recipe_device_hours']:,.1f} | "
            f"{'n/a (CPU)' if syncs is None else syncs} |"
        )
    messages = {n: v["host_sync_messages"] for n, v in variants.items() if v.get("host_sync_messages")}
    if messages:
        lines.append("")
        lines += [f"Host syncs of {n}, the first: {'; '.join(m)}" for n, m in messages.items()]
    cores = ", ".join(f"{n}: {c:.1f}" for n, c in tr["loader_cores_per_device"].items())
    loader = (
        f"Loader (`ReplayBatch`: decode, replay the drawn view at the student's size, tokenise; one core): "
        f"{tr['loader_samples_per_s_per_core']:.0f} samples/s; cores a device needs: {cores}."
    )
    return f"{tr['config']}.\n\n" + "\n".join(lines) + f"\n\n{loader}"


def _precision_rows(st: dict) -> list[tuple[str, str]]:
    return [(f"teacher forward, {name}", f"{rate:,.0f} views/s") for name, rate in st["teacher_precision_ab"].items()]


def _stage_measurement(env: dict, st: dict, k: int, num_teachers: int):
    """The direct stages' figures as a `cost.Measurement`: the device's own rate, an upper bound of the job's."""
    from clipdr.reinforce import cost

    return cost.Measurement(
        device=env["device"],
        device_name=env["device_name"],
        mfu=st.get("device_mfu"),
        views_per_s=st["device_samples_per_s"] * k * num_teachers,
        samples_per_s=st["device_samples_per_s"],
        busy_fraction=None,
        flops_per_sample=float(st["flops_per_sample"]),
        num_samples=st["num_samples"],
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        config=f"{st['config']}; model stages alone on the device, without Ray (an upper bound of the job's MFU)",
    )


def _job_rows(work: Path, env: dict, job: dict, smoke: bool):
    """(rows, measurement) of the Ray job."""
    from clipdr import accelerators
    from clipdr.reinforce import cost

    config = job_config(work, smoke)
    cfg = config.reinforce
    flops_per_sample = cost.estimate(config).flops_per_sample
    gpu = _gpu_samples(work / _GPU_LOG)
    start, end, num_samples, which = _window(job, cfg.output, gpu)
    seconds = max(end - start, 1e-9)
    samples_per_s = num_samples / seconds
    views_per_s = samples_per_s * cfg.num_augmentations * len(cfg.teachers)
    mfu = None if smoke else flops_per_sample * samples_per_s / accelerators.peak_flops(env["device"])
    busy = _busy_fraction(gpu, start, end)
    models = f"{' + '.join(t.model for t in cfg.teachers)}, captioner {cfg.captioner.model}"
    measured = cost.Measurement(
        device=env["device"],
        device_name=env["device_name"],
        mfu=mfu,
        views_per_s=views_per_s,
        samples_per_s=samples_per_s,
        busy_fraction=busy,
        flops_per_sample=float(flops_per_sample),
        num_samples=job["num_rows"],
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(job["ended"])),
        config=f"{models}, K={cfg.num_augmentations}, S={cfg.num_syn_captions}, batch {cfg.resources.batch_size}",
    )
    rows = [
        ("what ran", measured.config),
        ("samples reinforced", f"{job['num_rows']} in {job['ended'] - job['started']:.1f} s (whole job)"),
        ("window", f"{which}: {num_samples} samples in {seconds:.1f} s"),
        ("samples/s", f"{samples_per_s:.1f}"),
        ("teacher views/s", f"{views_per_s:.1f}"),
        ("FLOPs a sample", f"{flops_per_sample / 1e9:,.1f} GFLOP (clipdr.reinforce.cost)"),
        (
            "MFU (measured)",
            "n/a (smoke)" if mfu is None else f"{mfu:.3f} of {accelerators.PEAK_TFLOPS[env['device']]:g} TFLOP/s",
        ),
        ("GPU busy fraction (measured)", "n/a (no nvidia-smi)" if busy is None else f"{busy:.2f}"),
    ]
    return rows, measured


def report(work: Path, out: Path, smoke: bool) -> None:
    """The tables of every phase that ran (``gpu_check.md``) and the measurement the cost projection reads
    (``gpu_check.json``: the Ray job's when it ran, else the direct stages'), in ``out``."""
    from clipdr.benchmarks import gpu_direct
    from clipdr.config import load_config
    from clipdr.reinforce import cost

    env = _read(work, _ENV)
    job = _read(work, _RUN) if (work / _RUN).exists() else {"skipped": "the reinforce phase did not finish (its log)"}
    sections = [("Device", _table([("device", f"{env['device_name']} (torch {env['torch']})")]))]
    measured = None
    if (work / gpu_direct.STAGES).exists():
        st = _read(work, gpu_direct.STAGES)
        rows = _stage_rows(st) + _precision_rows(st)
        sections.append(("Reinforcement stages on the device, DataCompDR-12M recipe, no Ray", _table(rows)))
        recipe = gpu_direct.stages_config("", "", smoke).reinforce
        measured = _stage_measurement(env, st, recipe.num_augmentations, len(recipe.teachers))
    if (work / gpu_direct.TRAIN).exists():
        compiled = _read(work, gpu_direct.COMPILE) if (work / gpu_direct.COMPILE).exists() else None
        table = _train_table(_read(work, gpu_direct.TRAIN), compiled)
        sections.append(("Training step, MobileCLIP-S0 recipe, no Ray", table))
    job_rows = None
    if "skipped" in job:
        sections.append(("Reinforcement job (Ray)", f"Not run: {job['skipped']}."))
    else:
        job_rows, measured = _job_rows(work, env, job, smoke)
    if measured is None:
        raise GpuCheckError("no phase measured anything: run the phases in order (jobs/gpu_check.sh)")
    result = measured.write(out)
    if job_rows is not None:
        if measured.mfu is not None:
            recipe = load_config(
                gpu_direct.DATACOMPDR12M,
                [f"reinforce.cost.measured={result}", f"reinforce.cost.device={env['device']}"],
            )
            estimate = cost.estimate(recipe, source_readable=False)
            projection = (
                f"{estimate.projected_hours:,.1f} {env['device']}-hours at the measured MFU (floor "
                f"{estimate.floor_hours:,.1f} at peak, {estimate.num_samples:,} samples)"
            )
            job_rows.append(("DataCompDR-12M projection", projection))
        sections.append(("Reinforcement job (Ray), jobs/configs/gpu_check.toml", _table(job_rows)))
    if (work / _GPU_LOG).exists():
        shutil.copy(work / _GPU_LOG, out / _GPU_LOG)
    command = "jobs/gpu_check.sh smoke" if smoke else "jobs/gpu_check.sh"
    body = "\n\n".join(f"## {title}\n\n{text}" for title, text in sections)
    (out / "gpu_check.md").write_text(f"# GPU check ({measured.measured_at})\n\n`{command}`\n\n{body}\n")
    print(body)
