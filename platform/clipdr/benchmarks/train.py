"""Training cost by mode: the paper's "no train-time overhead" claim, measured, and the loader against the trainer.

All in one process, on the same rows and at the same torch threads, interleaved round by round after warm-up
(`timing.run_rounds`: every round runs each mode's step and each mode's loader batch once, in a rotated order):

* train step, per mode (``clip``, ``reinforced``, ``online_distill``): forward, loss, backward and the AdamW
  update of the same student on the same batch size. The batches come ready-made from the loader, so the step is
  measured alone. ``reinforced`` reads its targets; ``online_distill`` runs the teachers inside the step.
  Ratio: step seconds of the mode / step seconds of ``clip`` (no distillation at all) in the same round.
* loader, per mode: one pass over the rows (4 batches) of the CPU map stage (`data.ReplayBatch`: decode, replay
  view k at the student's resolution, tokenise, select targets; for ``online_distill`` also render each teacher's
  view and tokens) on one process.
  Ratio: loader processes one trainer needs to never wait = loader seconds a sample / step seconds a sample of
  the same mode in the same round.

Each ratio is computed per round, then reported as median (min-max) over rounds, by wall time and by process
CPU time (all torch threads of this process; it counts only the slices the process ran, so it holds while
neighbours load the machine). One torch thread by default: a team of two spin-waits whenever a neighbour holds
the other core, and that waiting counts as CPU time too.

Rows are a synthetic-world corpus with sampled stored views and random unit teacher embeddings: neither cost
depends on the embedding values, so no teacher has to run to build them.

Bytes read against bytes used (`clipdr.benchmarks.train_io`): the same rows as a shard with ``--io-views`` views and
two teachers ``--io-dim`` wide (K = 30 and 768 by default, DataCompDR's layout), read as the training input reads it.
``--io-only`` measures only that.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
from pathlib import Path

import numpy as np
import torch

from clipdr import augment, records
from clipdr.benchmarks import timing
from clipdr.config import Config, SynthConfig, TeacherConfig, TrainConfig, replace
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
    parser.add_argument(
        "--steps", type=int, default=8, help="measured rounds: one step and one pass of the loader per mode each"
    )
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    parser.add_argument("--views", type=int, default=4, help="K stored views a sample")
    parser.add_argument("--captions", type=int, default=2, help="S synthetic captions a sample")
    parser.add_argument("--image-size", type=int, default=64, help="side of the source images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of steps and loader")
    parser.add_argument("--io-views", type=int, default=30, help="K of the bytes-read measurement")
    parser.add_argument("--io-dim", type=int, default=768, help="D of both teachers of the bytes-read measurement")
    parser.add_argument("--io-captions", type=int, default=5, help="S of the bytes-read measurement")
    parser.add_argument("--io-only", action="store_true", help="measure only bytes read against bytes used")
    parser.add_argument("--output", help="also write the result table (markdown) to this file")


def _table(samples: list[sources.SourceSample], manifest: records.Manifest, rng: np.random.Generator):
    return records.build_table(_record_columns(samples, manifest, rng), manifest)


def _record_columns(samples: list[sources.SourceSample], manifest: records.Manifest, rng: np.random.Generator):
    """The rows' columns as `records.build_table` takes them (sampled views, random unit embeddings)."""
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
    return columns


def bench_manifest(teachers: tuple[records.TeacherSpec, ...], num_views: int, num_captions: int) -> records.Manifest:
    """The manifest of a benchmark's synthetic rows (no source, no captioner ran): ``teachers``, K and S."""
    return records.Manifest(
        teachers=teachers,
        augment=records.AugmentSpec.from_config(Config().augment),
        num_augmentations=num_views,
        num_syn_captions=num_captions,
        source_uri="synthetic://bench",
        source_fingerprint="sha256:0",
        captioner=records.CaptionerSpec(name="bench", kind="synthetic", model="none", pretrained=""),
    )


class _Loader:
    """One mode's replay stage (`data.ReplayBatch`) over the benchmark's rows, in this process."""

    def __init__(self, table, manifest, preprocess, student: str, mode: str, syn: bool, batch_size: int) -> None:
        self.table = table
        self.batch_size = batch_size
        self.replay = data.ReplayBatch(manifest, preprocess, student, seed=0, epoch=0, mode=mode, use_syn_captions=syn)

    def batches(self) -> list[dict]:
        table, n = self.table, self.batch_size
        return [self.replay(table.slice(start, n)) for start in range(0, table.num_rows, n)]


class _Trainer:
    """One mode's student, optimiser and step on ready-made batches."""

    def __init__(self, cfg: Config, manifest: records.Manifest, batches: list, device: torch.device) -> None:
        from clipdr.train.loop import Step, build_student, make_optimizer
        from clipdr.train.plan import make_plan

        self.plan = make_plan(cfg, list(manifest.teachers))
        self.model = build_student(self.plan, device)
        self.optimizer = make_optimizer(self.model, self.plan, device)  # the training job's, fused on CUDA
        self.step_fn = Step(self.model, self.plan, device)
        self.batches = [
            {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in b.items()} for b in batches
        ]
        self.steps = 0

    def step(self) -> None:
        """One optimiser step on the next ready-made batch."""
        from clipdr.train.loop import apply_update

        self.step_fn(self.batches[self.steps % len(self.batches)])["loss"].backward()
        apply_update(self.model, self.optimizer, self.plan, self.steps)
        self.steps += 1


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    teacher_cfgs = tuple(
        TeacherConfig(name=f"t{i}", model=name.strip(), logit_scale=100.0)
        for i, name in enumerate(args.teachers.split(","))
    )
    manifest = bench_manifest(tuple(teacher_spec(t, offline=True) for t in teacher_cfgs), args.views, args.captions)
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
    io_lines = _io_lines(args, samples)
    if args.io_only:
        return _write(args, "\n".join(io_lines))
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
        train_cfg = replace(
            TrainConfig(),
            {
                "model": args.student,
                "mode": mode,
                "schedule.batch_size": args.batch_size,
                "loss.use_syn_captions": syn,
                "loss.kd_weight": 1.0 if mode.distils else 0.0,
                "precision": "bf16" if device.type == "cuda" else "fp32",
            },
        )
        trainers[label] = _Trainer(Config(train=train_cfg), manifest, batches, device)

    sync = torch.cuda.synchronize if device.type == "cuda" else None  # a CUDA launch returns before its kernels
    things = {}
    for label in trainers:
        things[f"step {label}"] = timing.timed(trainers[label].step, args.batch_size, sync=sync)
        # The loader's call builds every batch of the table: a single batch takes a few ms, too short to time.
        things[f"loader {label}"] = timing.timed(loaders[label].batches, table.num_rows)
    results = timing.run_rounds(things, rounds=args.steps, warmup=args.warmup)

    lines = [
        f"Student `{args.student}`, teachers {', '.join(f'`{t.model}`' for t in teacher_cfgs)}, batch "
        f"{args.batch_size}, K={args.views}, S={args.captions}, {args.image_size} px sources, device {device}, "
        f"{args.threads} torch threads; median (min-max) of {args.steps} interleaved rounds after {args.warmup} "
        "warm-up; ratios per round. CPU: process CPU time.",
        "",
        "| mode | step vs clip (CPU) | step vs clip (wall) | loader processes per trainer (CPU) | loader processes per "
        "trainer (wall) | train step samples/s (wall) | loader samples/s (wall, 1 process) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label in trainers:
        step, loader, clip = results[f"step {label}"], results[f"loader {label}"], results["step clip"]
        lines.append(
            f"| {label} | {timing.ratio(step, clip, 'cpu').format()} | {timing.ratio(step, clip, 'wall').format()} | "
            f"{timing.ratio(loader, step, 'cpu').format()} | {timing.ratio(loader, step, 'wall').format()} | "
            f"{timing.rate(step, 'wall').format('.1f')} | {timing.rate(loader, 'wall').format('.1f')} |"
        )
    return _write(args, "\n".join([*lines, "", "Bytes read a sample against bytes used:", "", *io_lines]))


def _io_lines(args: argparse.Namespace, samples: list[sources.SourceSample]) -> list[str]:
    """The bytes-read table (`train_io.measure`) of ``samples`` with K = ``--io-views``, two ``--io-dim`` teachers."""
    from clipdr.benchmarks import train_io

    teachers = tuple(
        records.TeacherSpec(
            name=name,
            model="ViT-L-14",
            pretrained="",
            embed_dim=args.io_dim,
            logit_scale=100.0,
            image_size=224,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        )
        for name in ("first", "second")
    )
    manifest = bench_manifest(teachers, args.io_views, args.io_captions)
    lines = train_io.measure(_record_columns(samples, manifest, np.random.default_rng(0)), manifest)
    return [f"{args.image_size} px sources (encoded as the synthetic world writes them); " + lines[0], *lines[1:]]


def _write(args: argparse.Namespace, text: str) -> int:
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        command = "python jobs/benchmark.py train " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
            for k, v in vars(args).items()
            if k != "output" and v is not None and v is not False
        )
        title = "Bytes read a sample against bytes used" if args.io_only else "Training cost by mode"
        Path(args.output).write_text(f"# {title}\n\nMeasured with `{command}`.\n\n{text}\n")
    return 0
