"""Training cost by mode: the paper's "no train-time overhead" claim, measured, and the loader against the trainer.

All in one process and one run, on the same rows, so the ratios hold on a noisy shared machine:

* train step, per mode (``clip``, ``reinforced``, ``online_distill``): forward, loss, backward and the AdamW
  update of the same student on the same batch size, timed over ``--steps`` steps after ``--warmup`` steps. The
  batches come ready-made from the loader, so the step is measured alone. ``reinforced`` reads its targets;
  ``online_distill`` runs the teachers inside the step. Ratios are against ``clip`` (no distillation at all).
* loader, per mode (interleaved with the steps): the CPU map stage (`data.ReplayBatch`: decode, replay view k at
  the student's resolution, tokenise, select targets; for ``online_distill`` also render each teacher's view and
  tokens) in samples/s on one process, and the loader processes one trainer needs to never wait: trainer
  samples/s / loader samples/s.

Rows are a synthetic-world corpus with sampled stored views and random unit teacher embeddings: neither cost
depends on the embedding values, so no teacher has to run to build them.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clipdr import augment, records
from clipdr.config import Config, SynthConfig, TeacherConfig, TrainConfig
from clipdr.data import sources, synthetic
from clipdr.models.teachers import teacher_spec
from clipdr.train import data
from clipdr.train.plan import Mode


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--student", default="clipdr-demo-mci", help="student model name")
    parser.add_argument(
        "--teachers", default="clipdr-demo-vit,clipdr-demo-mci", help="comma-separated teacher model names"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode (interleaved across modes)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per mode")
    parser.add_argument("--views", type=int, default=4, help="K stored views a sample")
    parser.add_argument("--captions", type=int, default=2, help="S synthetic captions a sample")
    parser.add_argument("--image-size", type=int, default=64, help="side of the source images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--output", help="also write the result table (markdown) to this file")


def _table(samples: list[sources.SourceSample], manifest: records.Manifest, rng: np.random.Generator):
    n, K, S = len(samples), manifest.num_augmentations, manifest.num_syn_captions
    columns = {
        records.KEY: [s.key for s in samples],
        records.IMAGE: [s.image_bytes for s in samples],
        records.IMAGE_EXT: [s.image_ext for s in samples],
        records.CAPTION: [s.caption for s in samples],
        records.SYN_CAPTIONS: [[f"{s.caption} variant {j}" for j in range(S)] for s in samples],
        records.AUG_PARAMS: [augment.sample_views(s.image.size, s.key, K, manifest.augment) for s in samples],
    }
    for spec in manifest.teachers:
        for column, count in ((records.image_emb_column(spec.name), K), (records.text_emb_column(spec.name), 1 + S)):
            x = rng.standard_normal((n, count, spec.embed_dim)).astype(np.float32)
            columns[column] = x / np.linalg.norm(x, axis=-1, keepdims=True)
    return records.build_table(columns, manifest)


class _Loader:
    """One mode's replay stage (`data.ReplayBatch`) over the benchmark's rows, in this process."""

    def __init__(self, table, manifest, preprocess, student: str, mode: str, syn: bool, batch_size: int) -> None:
        self.table = table
        self.batch_size = batch_size
        self.replay = data.ReplayBatch(manifest, preprocess, student, seed=0, epoch=0, mode=mode, use_syn_captions=syn)

    def batches(self) -> list[dict]:
        table, n = self.table, self.batch_size
        return [self.replay(table.slice(start, n)) for start in range(0, table.num_rows, n)]

    def time_batch(self) -> float:
        """Seconds to build one batch."""
        began = time.perf_counter()
        self.replay(self.table.slice(0, self.batch_size))
        return time.perf_counter() - began


class _Trainer:
    """One mode's student, optimiser and step on ready-made batches."""

    def __init__(self, cfg: Config, manifest: records.Manifest, batches: list, device: torch.device) -> None:
        from clipdr.train.loop import Step, build_student, param_groups
        from clipdr.train.plan import make_plan

        self.plan = make_plan(cfg, list(manifest.teachers))
        self.model = build_student(self.plan, device)
        tc = self.plan.train
        self.optimizer = torch.optim.AdamW(param_groups(self.model, tc.weight_decay), lr=tc.lr)
        self.step_fn = Step(self.model, self.plan, device)
        self.device = device
        self.batches = [
            {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in b.items()} for b in batches
        ]
        self.steps = 0

    def time_steps(self, n: int) -> float:
        """Seconds of ``n`` optimiser steps."""
        from clipdr.train.loop import apply_update

        if self.device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(n):
            self.step_fn(self.batches[self.steps % len(self.batches)])["loss"].backward()
            apply_update(self.model, self.optimizer, self.plan, self.steps)
            self.steps += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - began


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    teacher_cfgs = tuple(
        TeacherConfig(name=f"t{i}", model=name.strip(), logit_scale=100.0)
        for i, name in enumerate(args.teachers.split(","))
    )
    manifest = records.Manifest(
        teachers=tuple(teacher_spec(t, offline=True) for t in teacher_cfgs),
        augment=Config().augment,
        num_augmentations=args.views,
        num_syn_captions=args.captions,
        source_uri="synthetic://bench",
        source_fingerprint="sha256:0",
        captioner=records.CaptionerSpec(name="bench", kind="synthetic", model="none", pretrained=""),
    )
    rows = args.batch_size * 4
    with tempfile.TemporaryDirectory() as tmp:
        synthetic.generate(
            SynthConfig(
                output=str(Path(tmp) / "world"),
                image_size=args.image_size,
                num_teacher=0,
                num_student=rows,
                num_zeroshot=0,
                num_retrieval=0,
                shard_size=rows,
            )
        )
        samples = list(sources.iter_source(str(Path(tmp) / "world" / "student"), collections.Counter()))
    table = _table(samples, manifest, np.random.default_rng(0))
    preprocess = data.student_preprocess(args.student)

    # (label, mode, synthetic captions): "reinforced, real captions" isolates the distillation from the extra
    # text forward of the synthetic captions.
    variants = [
        ("clip", Mode.CLIP, False),
        ("reinforced, real captions only", Mode.REINFORCED, False),
        ("reinforced", Mode.REINFORCED, True),
        ("online_distill", Mode.ONLINE_DISTILL, True),
    ]
    trainers, loaders = {}, {}
    for label, mode, syn in variants:
        loaders[label] = _Loader(table, manifest, preprocess, args.student, mode, syn, args.batch_size)
        batches = loaders[label].batches()  # also the loader's warm-up
        train_cfg = dataclasses.replace(
            TrainConfig(),
            model=args.student,
            mode=mode,
            batch_size=args.batch_size,
            use_syn_captions=syn,
            kd_weight=1.0 if mode.distils else 0.0,
            precision="bf16" if device.type == "cuda" else "fp32",
        )
        trainers[label] = _Trainer(Config(train=train_cfg), manifest, batches, device)
        trainers[label].time_steps(args.warmup)
    # Modes take turns, one step and one loader batch each per round, so drift in the machine's load hits them alike.
    seconds = {label: [] for label in trainers}
    loader_seconds = {label: [] for label in trainers}
    for _ in range(args.steps):
        for label, trainer in trainers.items():
            seconds[label].append(trainer.time_steps(1))
            loader_seconds[label].append(loaders[label].time_batch())
    results = {
        label: (
            args.batch_size / float(np.median(seconds[label])),
            args.batch_size / float(np.median(loader_seconds[label])),
        )
        for label in trainers
    }

    clip_step = results["clip"][0]
    lines = [
        f"Student `{args.student}`, teachers {', '.join(f'`{t.model}`' for t in teacher_cfgs)}, batch "
        f"{args.batch_size}, K={args.views}, S={args.captions}, {args.image_size} px sources, device {device}, "
        f"{args.threads} torch threads; median of {args.steps} interleaved steps after {args.warmup} per mode.",
        "",
        "| mode | train step (samples/s) | step time vs clip | loader (samples/s, 1 process) | loader processes "
        "per trainer |",
        "|---|---|---|---|---|",
    ]
    for label, (step, loader) in results.items():
        lines.append(f"| {label} | {step:.1f} | {clip_step / step:.2f}x | {loader:.1f} | {step / loader:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        command = "python jobs/benchmark.py train " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "output" and v is not None
        )
        Path(args.output).write_text(f"# Training cost by mode\n\nMeasured with `{command}`.\n\n{text}\n")
    return 0
