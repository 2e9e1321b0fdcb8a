"""Reinforcement throughput: the Ray Data pipeline against a bare forward of the same models on the same batches.

Everything is measured in one run on the same samples, so the ratios hold on a noisy shared machine:

* bare teacher forward: the teacher ensemble's forward over pre-rendered views and tokenised captions, one process;
* bare rendering + teachers + captioner: everything the models need done per sample (replaying K views at every
  teacher's resolution, the forward, generating S captions), back to back in one process;
* pipeline: the whole job (read, decode, sample and render views, caption, embed, write Parquet): the wall time
  of a run over all shards minus that of a run over one shard, so that actor start-up and model loading (paid by
  both) cancel out.

Storage: bytes of the stored embedding columns per sample against the fp16 arithmetic (K + 1 + S) x sum(D) x 2.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from clipdr import augment, records, storage
from clipdr.config import CaptionerConfig, Config, ReinforceConfig, ReinforceResources, SynthConfig, TeacherConfig
from clipdr.data import sources, synthetic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=int, default=8, help="source shards")
    parser.add_argument("--shard-size", type=int, default=64, help="samples a shard")
    parser.add_argument("--views", type=int, default=5, help="K")
    parser.add_argument("--captions", type=int, default=2, help="S")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--caption-len", type=int, default=12, help="captioner max_len (tokens)")
    parser.add_argument("--output", help="also write the result table (markdown) to this file")


def _bare_rates(ensemble, captioner, samples, views, num_captions: int, batch_size: int) -> dict[str, float]:
    """Samples/s of the bare model work on decoded inputs: view rendering, teacher forward, caption generation."""
    began = time.perf_counter()
    rendered = {
        t.spec.name: [
            torch.stack(
                [
                    augment.replay(s.image, v, t.spec.image_size, t.spec.mean, t.spec.std, t.spec.interpolation)
                    for v in sample_views
                ]
            )
            for s, sample_views in zip(samples, views, strict=True)
        ]
        for t in ensemble.teachers
    }
    render_s = time.perf_counter() - began
    captions = [[s.caption] * (1 + num_captions) for s in samples]
    tokens = {t.spec.name: t.tokenizer([c for cs in captions for c in cs]) for t in ensemble.teachers}
    teacher_s = 0.0
    caption_s = 0.0
    with torch.inference_mode():
        for start in range(0, len(samples), batch_size):
            stop = min(start + batch_size, len(samples))
            began = time.perf_counter()
            for t in ensemble.teachers:
                t.model.encode_image(torch.cat(rendered[t.spec.name][start:stop]))
                t.model.encode_text(tokens[t.spec.name][start * (1 + num_captions) : stop * (1 + num_captions)])
            teacher_s += time.perf_counter() - began
            began = time.perf_counter()
            captioner.generate(
                [s.image for s in samples[start:stop]], [s.key for s in samples[start:stop]], num_captions
            )
            caption_s += time.perf_counter() - began
    n = len(samples)
    return {
        "teachers": n / teacher_s,
        "render": n / render_s,
        "captioner": n / caption_s,
        "all": n / (render_s + teacher_s + caption_s),
    }


def main(args: argparse.Namespace) -> int:
    from clipdr.cluster import ensure_ray
    from clipdr.models import create_model
    from clipdr.models.captioners import TINY_COCA, build_captioner, build_coca
    from clipdr.models.teachers import TeacherEnsemble
    from clipdr.reinforce.pipeline import run_pipeline
    from clipdr.reinforce.run import plan

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        world = SynthConfig(
            output=str(root / "world"),
            num_teacher=0,
            num_student=args.shards * args.shard_size,
            num_zeroshot=0,
            num_retrieval=0,
            shard_size=args.shard_size,
        )
        synthetic.generate(world)
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
                source=str(root / "world" / "student"),
                output=str(root / "reinforced"),
                num_augmentations=args.views,
                num_syn_captions=args.captions,
                teachers=teachers,
                captioner=captioner_cfg,
                resources=ReinforceResources(batch_size=args.batch_size),
            )
        )
        p = plan(config)

        # Bare forward of the same models on the same samples (one shard's worth, views as the job samples them).
        samples = list(sources.iter_shard(p.tasks[1].source, collections.Counter()))
        views = [augment.sample_views(s.image.size, s.key, args.views, p.manifest.augment, 0) for s in samples]
        ensemble = TeacherEnsemble(teachers)
        captioner = build_captioner(p.manifest.captioner)
        bare = _bare_rates(ensemble, captioner, samples, views, args.captions, args.batch_size)
        del ensemble, captioner

        # The pipeline: a run over one shard and a run over all of them pay the same start-up (actors, model
        # loads), so the difference of their wall times is what the extra shards cost.
        ensure_ray()

        def timed_run(tasks: tuple, output: str) -> tuple[float, int]:
            cfg = dataclasses.replace(config.reinforce, output=output)
            rows: list[int] = []
            began = time.perf_counter()
            run_pipeline(cfg, tasks, p.manifest, p.fingerprint, lambda n, r, t: rows.append(r))
            return time.perf_counter() - began, sum(rows)

        one_s, one_rows = timed_run(p.tasks[:1], str(root / "reinforced-one"))
        all_s, all_rows = timed_run(p.tasks, config.reinforce.output)
        pipeline = (all_rows - one_rows) / (all_s - one_s)

        # Storage: on-disk bytes of the embedding columns against the fp16 arithmetic.
        emb_bytes = rows_total = file_bytes = 0
        for task in p.tasks:
            uri = storage.join(config.reinforce.output, task.output)
            meta = pq.ParquetFile(uri).metadata
            rows_total += meta.num_rows
            file_bytes += Path(uri).stat().st_size
            for rg in range(meta.num_row_groups):
                group = meta.row_group(rg)
                for c in range(group.num_columns):
                    column = group.column(c)
                    if column.path_in_schema.startswith((records.IMAGE_EMB_PREFIX, records.TEXT_EMB_PREFIX)):
                        emb_bytes += column.total_compressed_size
        arithmetic = p.manifest.embedding_bytes_per_sample

    rows = [
        ("bare teacher forward (samples/s)", f"{bare['teachers']:.1f}"),
        ("bare view rendering, K views x each teacher (samples/s)", f"{bare['render']:.1f}"),
        ("bare caption generation (samples/s)", f"{bare['captioner']:.1f}"),
        ("bare rendering + teachers + captioner, one process (samples/s)", f"{bare['all']:.1f}"),
        ("pipeline, start-up excluded (samples/s)", f"{pipeline:.1f}"),
        ("pipeline, whole run incl. start-up (samples/s)", f"{all_rows / all_s:.1f}"),
        ("pipeline / bare teacher forward", f"{pipeline / bare['teachers']:.2f}"),
        ("pipeline / bare rendering + teachers + captioner", f"{pipeline / bare['all']:.2f}"),
        ("stored embedding bytes a sample", f"{emb_bytes / rows_total:,.0f}"),
        ("fp16 arithmetic (K+1+S) x sum(D) x 2", f"{arithmetic:,}"),
        ("stored / arithmetic", f"{emb_bytes / rows_total / arithmetic:.3f}"),
        ("whole shard bytes a sample (images included)", f"{file_bytes / rows_total:,.0f}"),
    ]
    setup = (
        f"{args.shards} shards x {args.shard_size} samples, K={args.views}, S={args.captions}, "
        f"batch {args.batch_size}, teachers clipdr-tiny-vit + clipdr-tiny-mci, captioner {TINY_COCA} "
        f"(max_len {args.caption_len}), CPU, torch threads 2"
    )
    table = "\n".join(
        [
            f"Reinforcement throughput ({setup})",
            "",
            "| measure | value |",
            "|---|---|",
            *(f"| {k} | {v} |" for k, v in rows),
        ]
    )
    print(table)
    if args.output:
        Path(args.output).write_text(table + "\n")
    return 0
