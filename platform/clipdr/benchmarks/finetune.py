"""The forgetting guard on the embedded default: fine-tune a pre-trained model on a shifted slice of the synthetic
world and measure what it forgets, for full fine-tuning, a locked image tower (LiT), weight EMA and WiSE-FT.

1. **Pre-train** a student with the plain CLIP loss on clean captions of scenes that never show the slice's shape
   (``--slice``, default ``star``: one object group of the world), ``--pretrain-steps`` steps.
2. **Fine-tune** that model (the start) on single-object scenes of the slice only, with each recipe of
   ``[train.finetune]`` for ``--finetune-steps`` steps, the same data and batches in the same order: ``full``,
   ``lock-image`` (LiT), ``ema`` (full fine-tuning, the weight EMA evaluated) and ``layer-decay``; WiSE-FT then
   interpolates the full fine-tune with the start at each ``--alphas``.
3. **Evaluate** zero-shot (the world's tasks, class names and templates of `clipdr.data.synthetic`) on the zero-shot
   split's single-object images: the *original tasks* are the mean top-1 over the world's seven tasks, and the object,
   shape and colour tasks, on the images without the slice's shape; the *new slice* is the 64-way object task and
   the 8-way shape task on the slice's images.

Everything runs in one process in plain torch through the training loop's own parts (`clipdr.train.loop.Step`,
`make_optimizer`, `apply_update`; `clipdr.train.finetune` for the locks, EMA and WiSE-FT): no Ray, no files. Images
are rendered at the student's input size (no resize), without augmentation.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipdr import augment, models, wiseft
from clipdr.config import (
    Config,
    SynthConfig,
    TrainConfig,
    TrainFinetune,
    TrainLoss,
    TrainOptimizer,
    TrainSchedule,
)
from clipdr.data import synthetic
from clipdr.evaluate import metrics
from clipdr.train import data, finetune, loop
from clipdr.train.plan import TrainPlan, check_config, make_plan

_CPU = torch.device("cpu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="clipdr-demo-vit", help="student model name")
    parser.add_argument("--slice", default="star", choices=synthetic.SHAPES, help="the shape held out, then tuned on")
    parser.add_argument("--pretrain-samples", type=int, default=6000, help="distinct pre-training scenes")
    parser.add_argument("--pretrain-steps", type=int, default=500)
    parser.add_argument("--finetune-samples", type=int, default=1000, help="distinct scenes of the slice")
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3, help="pre-training peak lr (cosine)")
    parser.add_argument("--finetune-lr", type=float, default=5e-4, help="fine-tuning peak lr (const-cooldown)")
    parser.add_argument("--ema-decay", type=float, default=0.98)
    parser.add_argument("--layer-decay", type=float, default=0.5)
    parser.add_argument("--alphas", default="0.25,0.5,0.75", help="WiSE-FT alphas (comma-separated)")
    parser.add_argument("--eval-per-class", type=int, default=8, help="zero-shot images per object class (64)")
    parser.add_argument(
        "--templates", type=int, default=0, help="prompt templates a class: the first N of each task's (0: all)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--start",
        help="pre-trained weights file: loaded when it exists (pre-training skipped), else written after pre-training "
        "(to compare fine-tuning settings on one start)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (0: torch's default; a shared machine runs 1 faster)"
    )
    parser.add_argument("--output", help="also write the result table (markdown) to this file")


# --------------------------------------------------------------------------- data


def _uint8(image) -> Tensor:
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)


def _corpus(scenes: list[tuple[synthetic.Scene, str]], size: int, tokenizer: Callable) -> tuple[Tensor, Tensor]:
    images = torch.stack([_uint8(synthetic.render_scene(scene, size)) for scene, _ in scenes]).permute(0, 3, 1, 2)
    return images.contiguous(), tokenizer([caption for _, caption in scenes])


def pretrain_scenes(seed: int, count: int, held_out: str) -> list[tuple[synthetic.Scene, str]]:
    """Clean-caption scenes of the teacher split that show no ``held_out`` shape (the first ``count`` of them)."""
    out, index = [], 0
    while len(out) < count:
        rng = synthetic.sample_rng(seed, "teacher", index)
        scene = synthetic.sample_scene(rng, 3)
        index += 1
        if all(o.shape != held_out for o in scene.objects):
            out.append((scene, synthetic.clean_caption(scene, rng)))
    return out


def slice_scenes(seed: int, count: int, shape: str) -> list[tuple[synthetic.Scene, str]]:
    """Single-object scenes of ``shape`` with clean captions (drawn from the student split's streams)."""
    out = []
    for index in range(count):
        rng = synthetic.sample_rng(seed, "student", index)
        scene = synthetic.sample_scene(rng, num_objects=1, shape=shape)
        out.append((scene, synthetic.clean_caption(scene, rng)))
    return out


def eval_set(seed: int, per_class: int, size: int) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """The zero-shot split's first ``64 * per_class`` images (balanced over the object classes) at ``size``:
    ``(images uint8 NCHW, task -> labels, shape labels)``."""
    num = len(synthetic.COLOURS) * len(synthetic.SHAPES) * per_class
    world = SynthConfig(seed=seed, image_size=size)
    samples = [synthetic.make_sample(world, "zeroshot", i) for i in range(num)]
    images = torch.stack([_uint8(s.image) for s in samples]).permute(0, 3, 1, 2).contiguous()
    labels = {task: torch.tensor([s.meta["labels"][task] for s in samples]) for task in synthetic.TASKS}
    return images, labels, labels["shape"]


# --------------------------------------------------------------------------- training and evaluation


def plan_for(model_name: str, steps: int, batch: int, lr: float, kind: str, ft: TrainFinetune) -> TrainPlan:
    """A plain-CLIP plan of ``steps`` optimiser steps (5% warmup; const-cooldown cools down over the last 20%)."""
    samples = steps * batch
    cooldown = max(1, steps // 5) * batch if kind == "const-cooldown" else 0
    train = TrainConfig(
        data="(in memory)",
        model=model_name,
        mode="clip",
        pretrained="(the pre-trained start)" if ft.wise_alpha != 1 else "",
        schedule=TrainSchedule(
            samples=samples,
            batch_size=batch,
            warmup_samples=(steps // 20) * batch,
            kind=kind,
            cooldown_samples=cooldown,
        ),
        optimizer=TrainOptimizer(lr=lr, weight_decay=0.1),
        loss=TrainLoss(kd_weight=0.0, use_syn_captions=False),
        finetune=ft,
    )
    check_config(train)
    return make_plan(Config(train=train), [])


def train(
    model: nn.Module, plan: TrainPlan, images: Tensor, tokens: Tensor, seed: int, ema: finetune.WeightEma | None
) -> None:
    """``plan.total_steps`` steps of the training loop's step and update on random batches of the corpus (the same
    batches for the same ``seed``); updates ``ema`` after every step."""
    step_fn = loop.Step(model, plan, _CPU)
    optimizer = loop.make_optimizer(model, plan, _CPU)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(plan.total_steps):
        rows = torch.randint(len(images), (plan.global_batch,), generator=generator)
        parts = step_fn({data.IMAGE: images[rows], data.TEXT: tokens[rows]})
        parts["loss"].backward()
        loop.apply_update(model, optimizer, plan, step)
        if ema is not None:
            ema.update(model)


def class_prompts(tokenizer: Callable, num_templates: int = 0) -> dict[str, Tensor]:
    """Tokens of every (class, template) prompt of every task of the world, classes major; with ``num_templates``
    only each task's first templates."""
    templates = {task: synthetic.ZEROSHOT_TEMPLATES[task][: num_templates or None] for task in synthetic.TASKS}
    return {
        task: tokenizer([t.format(c=c) for c in classnames for t in templates[task]])
        for task, classnames in synthetic.zeroshot_tasks().items()
    }


@torch.no_grad()
def classifiers(model: nn.Module, prompts: dict[str, Tensor]) -> dict[str, Tensor]:
    """The zero-shot classifier (class embeddings, `metrics.classifier_weights`) of every task."""
    model.eval()
    out = {}
    for task, tokens in prompts.items():
        num_classes = len(synthetic.zeroshot_tasks()[task])
        text_emb_CTD = model.encode_text(tokens).float().view(num_classes, len(tokens) // num_classes, -1)
        out[task] = metrics.classifier_weights(text_emb_CTD)
    return out


@torch.no_grad()
def zeroshot(
    model: nn.Module, pre: data.StudentPreprocess, weights: dict[str, Tensor], images: Tensor, labels: dict[str, Tensor]
) -> dict[str, float]:
    """Top-1 of every task of the world on ``images``, with the task ``weights`` of `classifiers`."""
    model.eval()
    image_emb_ND = F.normalize(model.encode_image(augment.normalize(images, pre.mean, pre.std)).float(), dim=-1)
    return {
        task: metrics.zeroshot_metrics(image_emb_ND @ classifier_CD.T, labels[task])["top1"]
        for task, classifier_CD in weights.items()
    }


def _select(labels: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
    return {task: values[mask] for task, values in labels.items()}


# --------------------------------------------------------------------------- the benchmark


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    name = args.model
    size = models.image_size(name)
    tokenizer = models.get_tokenizer(name)
    slice_index = synthetic.SHAPES.index(args.slice)
    alphas = [float(a) for a in args.alphas.split(",") if a.strip()]

    pre_images, pre_tokens = _corpus(pretrain_scenes(args.seed, args.pretrain_samples, args.slice), size, tokenizer)
    ft_images, ft_tokens = _corpus(slice_scenes(args.seed, args.finetune_samples, args.slice), size, tokenizer)
    eval_images, eval_labels, shapes = eval_set(args.seed, args.eval_per_class, size)
    is_slice = shapes == slice_index
    original = (eval_images[~is_slice], _select(eval_labels, ~is_slice))
    new_slice = (eval_images[is_slice], _select(eval_labels, is_slice))
    print(f"finetune: data rendered in {time.perf_counter() - started:.1f} s", flush=True)

    pre, prompts = data.student_preprocess(name), class_prompts(tokenizer, args.templates)

    def measure(model: nn.Module) -> tuple[float, ...]:
        weights = classifiers(model, prompts)
        orig = zeroshot(model, pre, weights, *original)
        new = zeroshot(model, pre, weights, *new_slice)
        return (
            sum(orig.values()) / len(orig),
            orig["object"],
            orig["shape"],
            orig["colour"],
            new["object"],
            new["shape"],
        )

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    pretrained = models.create_model(name)
    model = pretrained
    if args.start and Path(args.start).exists():
        model.load_state_dict(torch.load(args.start, map_location="cpu", weights_only=True))
        print(f"finetune: pre-trained weights read from {args.start}", flush=True)
    else:
        train(model, plan_for(name, args.pretrain_steps, args.batch_size, args.lr, "cosine", TrainFinetune()),
              pre_images, pre_tokens, args.seed, None)  # fmt: skip
        if args.start:
            torch.save(model.state_dict(), args.start)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    timings = {"pre-training": time.perf_counter() - t0}
    rows: list[tuple[str, tuple[float, ...]]] = [("start (pre-trained, alpha 0)", measure(model))]
    print(f"finetune: pre-trained in {timings['pre-training']:.1f} s", flush=True)

    recipes = {
        "full fine-tuning": TrainFinetune(),
        "locked image tower (LiT)": TrainFinetune(lock_image=True),
        f"full + EMA {args.ema_decay}": TrainFinetune(ema_decay=args.ema_decay),
        f"full + layer decay {args.layer_decay}": TrainFinetune(layer_decay=args.layer_decay),
    }
    tuned_full: dict[str, Tensor] = {}
    for label, ft in recipes.items():
        t0 = time.perf_counter()
        model = copy.deepcopy(pretrained)
        model.load_state_dict(start)
        finetune.lock_towers(model, name, ft.lock_image, ft.image_unlocked_groups, False, 0)
        ema = finetune.WeightEma(model, ft.ema_decay) if ft.ema_decay else None
        plan = plan_for(name, args.finetune_steps, args.batch_size, args.finetune_lr, "const-cooldown", ft)
        train(model, plan, ft_images, ft_tokens, args.seed + 1, ema)
        if ema is not None:
            model.load_state_dict(ema.state)
        if not tuned_full:
            tuned_full = {k: v.detach().clone() for k, v in model.state_dict().items()}
        rows.append((label, measure(model)))
        timings[label] = time.perf_counter() - t0
        print(f"finetune: {label} in {timings[label]:.1f} s", flush=True)
    for alpha in alphas:
        model.load_state_dict(wiseft.wise_ft(start, tuned_full, alpha))
        rows.append((f"WiSE-FT of full, alpha {alpha:g}", measure(model)))

    table = [
        f"Student {name}; slice: the {args.slice} shape ({int(is_slice.sum())} zero-shot images; "
        f"{int((~is_slice).sum())} without it). Pre-training: {args.pretrain_steps} steps x {args.batch_size} on "
        f"{args.pretrain_samples} scenes without it; fine-tuning: {args.finetune_steps} steps x {args.batch_size} on "
        f"{args.finetune_samples} single-{args.slice} scenes, lr {args.finetune_lr:g} const-cooldown. Zero-shot top-1.",
        "",
        "| model | original: mean of 7 tasks | original: object | original: shape | original: colour "
        "| new slice: object | new slice: shape |",
        "|---|---|---|---|---|---|---|",
        *(f"| {label} | " + " | ".join(f"{v:.3f}" for v in values) + " |" for label, values in rows),
        "",
        "Wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
        + f"; total {time.perf_counter() - started:.1f} s.",
    ]  # fmt: skip
    text = "\n".join(table)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0
