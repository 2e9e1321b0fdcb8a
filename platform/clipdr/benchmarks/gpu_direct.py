"""The GPU check's direct phases: what the device does for the real recipes, measured without Ray or MLflow.

The Ray job (`gpu_check`'s ``reinforce`` phase) measures the pipeline's MFU; these phases measure what bounds it
from above, each model stage and the training step alone on the device, so that a machine whose Python has no Ray
(a bare accelerator image) still yields the numbers the docs and the cost projections need:

* ``stages``: the reinforcement stages of `clipdr.reinforce.stages` (the very callables the Ray job's actors and
  tasks run) over the check's world at the DataCompDR-12M recipe (`DATACOMPDR12M`: two ViT-L-14 teachers that share
  one render, K = 30, S = 5, CoCa ViT-L-14 with 30-token captions; random weights, as nothing can be downloaded):
  `ReadShards` -> `Caption` on the device -> `RenderViews` on CPU processes -> `Embed` on the device. Each device
  stage is timed chunk by chunk after one warm-up chunk (its output is numpy: the device has finished). Reported:
  samples/s of each device stage and of both back to back (what one device sustains when it runs the whole job),
  their MFU over the FLOPs `clipdr.reinforce.cost` counts, the render's CPU seconds a sample on one core (thread
  CPU time) and its rate over a pool of processes, so the cores a device needs; the DataCompDR-12M projection.
* ``train``: the training step (`clipdr.train.loop.Step` + `apply_update`, fused AdamW, bf16 autocast) of the
  MobileCLIP-S0 recipe's student in ``reinforced`` mode distilling from two 768-wide teachers, on batches the
  training loader (`clipdr.train.data.ReplayBatch`) built; samples/s and MFU over `clipdr.train.estimate`'s FLOPs, the
  device's peak memory against the dry run's estimate, and the loader's samples/s on one core.

``smoke`` runs both on the CPU with tiny models, so the path stays tested where no GPU is.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np

DATACOMPDR12M = "jobs/configs/datacompdr12m.toml"
MOBILECLIP_S0 = "jobs/configs/mobileclip_s0.toml"
STAGES, TRAIN, COMPILE = "stages.json", "train.json", "compile.json"
SMOKE_STAGES = (
    "reinforce.teachers=[{name = 'vit_a', model = 'clipdr-tiny-vit'}, {name = 'vit_b', model = 'clipdr-tiny-vit'}]",
    "reinforce.captioner.model=clipdr-tiny-coca",
    "reinforce.captioner.max_len=8",
    "reinforce.num_augmentations=2",
    "reinforce.num_syn_captions=1",
    "reinforce.resources.batch_size=4",
)
TRAIN_STEPS, TRAIN_WARMUP = 18, 2
SMOKE_TRAIN = (  # the tiny twins, fp32 on the CPU; a micro-batch of 8
    "train.model=clipdr-tiny-vit",
    "train.precision=fp32",
    "train.grad_checkpointing=false",
    "train.schedule.batch_size=8",
)


def stages_config(world: str, output: str, smoke: bool):
    """The DataCompDR-12M recipe's reinforcement over ``world``, with random weights (tiny models in smoke mode)."""
    from clipdr.config import load_config, replace

    overrides = [f"reinforce.source={world}", f"reinforce.output={output}", *(SMOKE_STAGES if smoke else ())]
    config = load_config(DATACOMPDR12M, overrides)
    cfg = config.reinforce
    random_weights = {
        "teachers": tuple(replace(t, {"pretrained": ""}) for t in cfg.teachers),
        "captioner.pretrained": "",
        "resources.device": "cpu" if smoke else "cuda",
    }
    return replace(config, {f"reinforce.{k}": v for k, v in random_weights.items()})


def _batch(row: dict) -> dict:
    from clipdr.reinforce import chunks

    return {chunks.CHUNK: np.array([row[chunks.CHUNK]], dtype=object)}


def _render(args: tuple[list, list]) -> list:
    """Renders stream batches in a pool process (one torch thread, as a Ray task has)."""
    from clipdr.reinforce import stages

    specs, batches = args
    render = stages.RenderViews(specs)
    return [render(batch) for batch in batches]


def _timed_stage(stage, batches: list[dict], sizes: list[int], sync) -> tuple[list[dict], float, int]:
    """(outputs, seconds, samples) of ``stage`` over ``batches`` (of ``sizes`` samples), timing all but the first (the
    warm-up)."""
    outputs = [stage(batches[0])]
    sync()
    started = time.perf_counter()
    outputs += [stage(batch) for batch in batches[1:]]
    sync()
    seconds = time.perf_counter() - started
    return outputs, seconds, sum(sizes[1:])


def _teacher_precision_ab(embed, rendered: dict, sync, num_views: int = 1024, rounds: int = 3) -> dict:
    """Views/s of the first teacher's image forward on ``num_views`` of a chunk's views in each of its precisions
    (`config.TeacherPrecision`): ``auto`` (fp32 weights under bf16 autocast) and ``bf16`` (bf16 weights, no casts),
    interleaved round by round after a warm-up; the median round of each. The recipe chooses one; this measures
    both, whichever it chose."""
    import copy
    import statistics

    import torch

    from clipdr import augment
    from clipdr.models.teachers import _autocast
    from clipdr.reinforce import chunks, stages

    teacher = embed.ensemble.teachers[0]
    views = chunks.unpack_chunk(bytes(rendered[chunks.CHUNK][0]))[
        stages.views_column(augment.RenderKey.of(teacher.spec))
    ]
    views_BCHW = torch.from_numpy(np.ascontiguousarray(views)).flatten(0, 1)[:num_views].to(teacher.device)
    x = augment.normalize(views_BCHW, teacher.spec.mean, teacher.spec.std)
    on_device = teacher.device.type == "cuda"
    own = teacher.spec.precision
    auto_model = teacher.model if own == "auto" else copy.deepcopy(teacher.model).float()
    bf16_model = (
        teacher.model if own == "bf16" else (copy.deepcopy(teacher.model).to(torch.bfloat16) if on_device else None)
    )

    def autocast() -> None:
        with _autocast(teacher.device, "auto"):
            auto_model.encode_image(x)

    def weights() -> None:
        bf16_model.encode_image(x.to(torch.bfloat16))

    variants = {
        f"auto: bf16 autocast{' (the recipe)' if own == 'auto' else ''}": autocast,
        **({f"bf16 weights{' (the recipe)' if own == 'bf16' else ''}": weights} if on_device else {}),
    }
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for r in range(rounds + 1):
            for name, fn in variants.items():
                sync()
                started = time.perf_counter()
                fn()
                sync()
                if r:  # round 0 warms up
                    seconds[name].append(time.perf_counter() - started)
    return {name: len(x) / statistics.median(values) for name, values in seconds.items()}


PROFILE = "profile.txt"


def _profile(
    captioner, embed, batch: dict, rendered: dict, path: Path, num_captions: int, num_samples: int = 64
) -> None:
    """torch.profiler tables (top ops by device time and by host time) of the captioner writing S captions for
    ``num_samples`` images and of the teachers embedding a chunk, to ``path``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from clipdr import records
    from clipdr.reinforce import chunks, stages

    samples = chunks.unpack_chunk(bytes(batch[chunks.CHUNK][0]))
    images = stages._decode(samples[records.IMAGE][:num_samples])
    keys = [str(k) for k in samples[records.KEY][:num_samples]]
    tables = []
    for name, fn in (
        (f"captioner, {num_samples} images", lambda: captioner.generate(images, keys, num_captions)),
        ("teachers, one chunk", lambda: embed.embed(chunks.unpack_chunk(bytes(rendered[chunks.CHUNK][0])))),
    ):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        averages = prof.key_averages()
        for sort in ("self_cuda_time_total", "self_cpu_time_total"):
            tables.append(
                f"## {name}: by {sort}\n{averages.table(sort_by=sort, row_limit=15, max_name_column_width=60)}"
            )
    path.write_text("\n\n".join(tables))


def run_stages(world: str, work: Path, device: str, peak: float | None, smoke: bool) -> dict:
    """The reinforcement stages at the recipe, directly; returns (and the caller stores) their figures."""
    import torch

    from clipdr import records
    from clipdr.reinforce import chunks, cost, run, stages

    config = stages_config(world, str(work / "stages-out"), smoke)
    cfg = config.reinforce
    p = run.plan(config)
    reader = stages.ReadShards(cfg.resources.batch_size, cfg.output, p.manifest, p.fingerprint)
    batches = [_batch(row) for task in p.tasks for row in reader.read(task)]
    if len(batches) < 2:
        raise ValueError(f"the stages need at least 2 chunks of {cfg.resources.batch_size} samples; got {len(batches)}")
    sizes = [len(chunks.unpack_chunk(bytes(b[chunks.CHUNK][0]))[records.KEY]) for b in batches]  # samples a chunk
    specs = list(p.manifest.teachers)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    # Rendering, CPU: one core first (thread CPU time of one chunk), then every chunk over a pool of processes.
    cpu = time.thread_time()
    torch.set_num_threads(1)
    _render((specs, [dict(batches[0])]))  # a copy: a stage replaces its batch's chunk, the original stays unrendered
    render_cpu_s = (time.thread_time() - cpu) / sizes[0]
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))

    # Captions first (the job's order), on unrendered chunks; the Caption stage decodes its own images.
    caption = stages.Caption(p.manifest.captioner, cfg.num_syn_captions, device, threads=torch.get_num_threads())
    captioned, caption_s, caption_n = _timed_stage(caption, batches, sizes, sync)
    caption_model = caption.captioner

    # Every chunk over a pool of processes, one a core but this one's (one process alone: rendered here instead).
    workers = min(len(captioned), (os.cpu_count() or 2) - 1)
    started = time.perf_counter()
    if workers < 2:
        rendered = _render((specs, captioned))
    else:
        parts = [captioned[i::workers] for i in range(workers)]
        ctx = multiprocessing.get_context("spawn")  # the device is initialised in this process: never fork it
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            rendered_parts = list(pool.map(_render, [(specs, part) for part in parts]))
        rendered = [None] * len(captioned)
        for i, part in enumerate(rendered_parts):
            rendered[i::workers] = part
    render_pool_s = time.perf_counter() - started  # includes the pool's start-up: a lower bound of its rate

    probe = {chunks.CHUNK: rendered[-1][chunks.CHUNK].copy()}  # the stages replace a batch's chunks in place
    embed = stages.Embed(cfg.teachers, device, threads=torch.get_num_threads())
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _, embed_s, embed_n = _timed_stage(embed, rendered, sizes, sync)
    embed_peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    precision_ab = _teacher_precision_ab(embed, probe, sync)
    if device == "cuda":  # where the device time goes: the top kernels and host ops of each model stage
        _profile(caption_model, embed, batches[-1], probe, work / PROFILE, cfg.num_syn_captions)

    estimate = cost.estimate(config, source_readable=False)
    teacher_flops = sum(part.flops for part in estimate.parts if part.name.startswith("teacher "))
    caption_flops = estimate.flops_per_sample - teacher_flops
    embed_rate, caption_rate = embed_n / embed_s, caption_n / caption_s
    both_rate = 1 / (1 / embed_rate + 1 / caption_rate)  # one device running both stages, back to back
    result = {
        "config": f"{' + '.join(f'{t.model} ({t.precision})' for t in cfg.teachers)} (one shared render), captioner "
        f"{cfg.captioner.model} ({cfg.captioner.max_len} tokens, KV cache), K={cfg.num_augmentations}, "
        f"S={cfg.num_syn_captions}, chunks of {cfg.resources.batch_size}, random weights",
        "num_samples": sum(sizes),
        "embed_samples_per_s": embed_rate,
        "teacher_views_per_s": embed_rate * cfg.num_augmentations * len(cfg.teachers),
        "caption_samples_per_s": caption_rate,
        "captions_per_s": caption_rate * cfg.num_syn_captions,
        "device_samples_per_s": both_rate,
        "teacher_flops_per_sample": teacher_flops,
        "caption_flops_per_sample": caption_flops,
        "flops_per_sample": estimate.flops_per_sample,
        "render_cpu_s_per_sample": render_cpu_s,
        "render_pool_samples_per_s": sum(sizes) / render_pool_s,
        "render_pool_processes": max(1, workers),
        "cores_per_device": render_cpu_s * both_rate,
        "embed_peak_bytes": embed_peak,
        "dataset_samples": estimate.num_samples,
        "teacher_precision_ab": precision_ab,
    }
    if peak is not None:
        result |= {
            "embed_mfu": teacher_flops * embed_rate / peak,
            "caption_mfu": caption_flops * caption_rate / peak,
            "device_mfu": estimate.flops_per_sample * both_rate / peak,
        }
        if estimate.num_samples:
            result["dataset_device_hours"] = estimate.num_samples / both_rate / 3600
            result["dataset_floor_hours"] = estimate.floor_hours
    return result


def train_config(smoke: bool, changes: tuple[str, ...] = ()):
    """One device's share of the MobileCLIP-S0 recipe: its micro-batch (8,192 over 32 workers = 256), on one worker,
    with ``changes`` (``--set`` overrides)."""
    from clipdr.config import load_config

    recipe = load_config(MOBILECLIP_S0)
    local = recipe.train.schedule.batch_size // recipe.train.resources.workers
    overrides = [f"train.schedule.batch_size={local}", "train.resources.workers=1", *(SMOKE_TRAIN if smoke else ())]
    return load_config(MOBILECLIP_S0, [*overrides, *changes])


# The recipe's step, the same step in mode clip (no distillation: what the teachers' targets cost), and the speed
# knobs, compared round by round (channels_last is a CUDA option: not in smoke).
TRAIN_VARIANTS = {
    "recipe (grad checkpointing)": (),
    "mode clip (no distillation)": ("train.mode=clip",),
    "channels_last": ("train.channels_last=true",),
    "no grad checkpointing": ("train.grad_checkpointing=false",),
    "no grad checkpointing, channels_last": ("train.grad_checkpointing=false", "train.channels_last=true"),
}
COMPILED = ("train.grad_checkpointing=false", "train.channels_last=true", "train.compile=true")
TRAIN_ROUNDS = 3


def _train_inputs(world: str, smoke: bool):
    """(manifest, loader batches, loader CPU s a sample on one core) for the recipe's student over ``world``."""
    import collections

    import torch

    from clipdr.benchmarks.train import _Loader, _table, bench_manifest
    from clipdr.config import load_config
    from clipdr.data import sources
    from clipdr.models.teachers import teacher_spec
    from clipdr.train import data

    tc = train_config(smoke).train
    teachers = stages_config(world, "", smoke).reinforce.teachers  # the recipe's data: DataCompDR's teachers
    recipe = load_config(DATACOMPDR12M)
    # The recipe's S; K = 2, as the step reads one drawn view's embeddings (K does not change its cost).
    specs = tuple(teacher_spec(t, offline=True) for t in teachers)
    manifest = bench_manifest(specs, 2, recipe.reinforce.num_syn_captions)
    batch = tc.schedule.batch_size
    samples = list(sources.iter_source(world, collections.Counter()))
    repeats = -(-2 * batch // len(samples))  # two batches, repeating a small world under new keys
    samples = [dataclasses.replace(s, key=f"{s.key}.{r}") for r in range(repeats) for s in samples][: 2 * batch]
    table = _table(samples, manifest, np.random.default_rng(0))
    torch.set_num_threads(1)
    loader = _Loader(table, manifest, data.student_preprocess(tc.model), tc.model, tc.mode, True, batch)
    cpu = time.thread_time()
    batches = loader.batches()
    loader_cpu_s = (time.thread_time() - cpu) / table.num_rows
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    return manifest, batches, loader_cpu_s


def _variant(config, manifest, rates: list[float], peaks: list[int], peak: float | None) -> dict:
    import statistics

    from clipdr.train import estimate

    plan = estimate.estimate(config, list(manifest.teachers), None, "synthetic")
    rate = statistics.median(rates)
    params = plan.size.image_params + plan.size.text_params
    return {
        "samples_per_s": rate,
        "samples_per_s_range": [min(rates), max(rates)],
        "flops_per_sample": plan.flops_per_sample,
        "mfu": None if peak is None else plan.flops_per_sample * rate / peak,
        "peak_bytes": max(peaks) if peaks else None,
        "estimated_bytes": plan.activation_bytes + params * estimate.BYTES_PER_PARAM,
        "recipe_device_hours": plan.plan.total_samples / rate / 3600,
        "recipe_samples": plan.plan.total_samples,
    }


def _state_bytes(trainer) -> int:
    """Device bytes of a trainer's own weights, gradients and optimiser state."""
    tensors = [p for p in trainer.model.parameters()]
    tensors += [p.grad for p in trainer.model.parameters() if p.grad is not None]
    tensors += [t for state in trainer.optimizer.state.values() for t in state.values() if hasattr(t, "element_size")]
    return sum(t.numel() * t.element_size() for t in tensors)


def _steps(trainer, num_steps: int, device: str) -> tuple[float, int | None]:
    """(samples/s, peak device bytes of this trainer alone) of ``num_steps`` optimiser steps: the peak less what the
    other trainers keep on the device (everything allocated before the steps but this trainer's own state)."""
    import torch

    others = 0
    if device == "cuda":
        torch.cuda.synchronize()
        others = torch.cuda.memory_allocated() - _state_bytes(trainer)
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(num_steps):
        trainer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() - others if device == "cuda" else None
    return num_steps * trainer.plan.train.schedule.batch_size / seconds, peak


def _host_syncs(trainer, device: str) -> tuple[int, list[str]] | None:
    """The host syncs one optimiser step makes (``torch.cuda.set_sync_debug_mode`` warns at each), and the first
    few messages; None off CUDA, where nothing waits for a device."""
    import warnings

    import torch

    if device != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    return len(syncs), syncs[:3]


def run_train(world: str, device: str, peak: float | None, smoke: bool) -> dict:
    """The recipe's training step and its speed knobs on ``device``, interleaved round by round after warm-up, over
    batches the recipe's loader built from ``world``; their figures."""
    import torch

    from clipdr.benchmarks.train import _Trainer

    manifest, batches, loader_cpu_s = _train_inputs(world, smoke)
    variants = dict(list(TRAIN_VARIANTS.items())[:2]) if smoke else TRAIN_VARIANTS  # smoke: both modes, once
    configs = {name: train_config(smoke, changes) for name, changes in variants.items()}
    trainers = {name: _Trainer(config, manifest, batches, torch.device(device)) for name, config in configs.items()}
    steps, warmup, rounds = (1, 1, 1) if smoke else (TRAIN_STEPS // TRAIN_ROUNDS, TRAIN_WARMUP, TRAIN_ROUNDS)
    for trainer in trainers.values():
        _steps(trainer, warmup, device)
    syncs = {name: _host_syncs(trainer, device) for name, trainer in trainers.items()}
    rates: dict[str, list[float]] = {name: [] for name in trainers}
    peaks: dict[str, list[int]] = {name: [] for name in trainers}
    for r in range(rounds):
        for name in list(trainers)[r % len(trainers) :] + list(trainers)[: r % len(trainers)]:  # rotated order
            rate, used = _steps(trainers[name], steps, device)
            rates[name].append(rate)
            peaks[name] += [used] if used is not None else []
    results = {name: _variant(configs[name], manifest, rates[name], peaks[name], peak) for name in trainers}
    for name, counted in syncs.items():
        results[name]["host_syncs_per_step"] = None if counted is None else counted[0]
        results[name]["host_sync_messages"] = None if counted is None else counted[1]
    recipe = next(iter(results.values()))
    tc = configs[next(iter(configs))].train
    return {
        "config": f"{tc.model}, {tc.mode}, {tc.precision}, micro-batch {tc.schedule.batch_size}, "
        f"{len(manifest.teachers)} teachers of width {manifest.teachers[0].embed_dim}; {rounds} rounds of {steps} "
        f"steps a variant after {warmup} warm-up",
        "variants": results,
        "samples_per_s": recipe["samples_per_s"],
        "loader_cpu_s_per_sample": loader_cpu_s,
        "loader_samples_per_s_per_core": 1 / loader_cpu_s,
        "loader_cores_per_device": {name: loader_cpu_s * v["samples_per_s"] for name, v in results.items()},
    }


def run_compile(world: str, device: str, peak: float | None) -> dict:
    """The fastest eager variant, compiled (`COMPILED`): the compile's seconds (its first steps) and its rate."""
    import torch

    from clipdr.benchmarks.train import _Trainer

    manifest, batches, _ = _train_inputs(world, smoke=False)
    config = train_config(False, COMPILED)
    trainer = _Trainer(config, manifest, batches, torch.device(device))
    started = time.perf_counter()
    _steps(trainer, TRAIN_WARMUP, device)
    compile_s = time.perf_counter() - started
    rates, peaks = [], []
    for _ in range(TRAIN_ROUNDS):
        rate, used = _steps(trainer, TRAIN_STEPS // TRAIN_ROUNDS, device)
        rates.append(rate)
        peaks.append(used)
    return {
        "changes": list(COMPILED),
        "first_steps_s": compile_s,
        **_variant(config, manifest, rates, peaks, peak),
    }
