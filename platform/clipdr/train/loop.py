"""The training loop one Ray Train worker runs (one DDP rank): model, optimiser, the step, checkpoints.

Everything a worker needs arrives in a `plan.TrainPlan` (built once by the driver, `clipdr.train.run`), so every rank
and every restart sees the same decisions. The loop:

1. builds the student (same seed on every rank; DDP broadcasts rank 0's weights anyway) from its start
   (``train.pretrained``) with the towers ``[train.finetune]`` locks frozen (`clipdr.train.finetune`), AdamW with
   decay only on weight matrices (and layer-wise lr multipliers), warmup then ``train.schedule.kind`` on the optimizer
   step, and the loss (`losses.DistillationLoss`, plus the
   captioning loss when the student is a CoCa);
2. restores the newer of the checkpoint Ray Train hands it (``ray.train.get_checkpoint()``) and the driver's
   (`TrainPlan.resume_from`, `_restore`): weights, optimiser,
   scheduler, step, samples seen, micro-batches consumed, RNG state; then skips the micro-batches its dataset
   stream has already delivered (the driver starts the stream at the checkpoint's epoch, so at most one epoch);
3. steps through ``get_dataset_shard("train").iter_torch_batches`` with gradient accumulation, clipping,
   bf16 autocast on GPU, and the logit-scale clamp after every optimiser step;
4. every ``log_every`` steps rank 0 logs the loss parts, learning rate, logit scale and throughput to the run's
   MLflow run (reopened by id, so restarts continue it); every ``checkpoint.every`` steps and at the end every
   rank calls ``ray.train.report`` and rank 0 attaches the checkpoint (with the weights' EMA when one is kept);
5. evaluates what `Published` says the run publishes: the EMA when on, WiSE-FT interpolated with the start.

MLflow steps are samples seen, the unit of training length, so runs of different batch sizes line up.

Checkpoints (files, metadata, commit, loading) are `clipdr.checkpoint`'s.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from clipdr import augment, checkpoint, losses, records, wiseft
from clipdr import progress as progress_lines
from clipdr.config import TeacherConfig
from clipdr.train import data, finetune
from clipdr.train.plan import TrainPlan

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- building blocks


def cooldown_steps(plan: TrainPlan) -> int:
    """Optimiser steps of the final linear decay of the ``const-cooldown`` schedule (0 for the other kinds)."""
    sched = plan.train.schedule
    if sched.kind != "const-cooldown":
        return 0
    return max(1, min(plan.total_steps - plan.warmup_steps, sched.cooldown_samples // plan.samples_per_step))


def lr_at(step: int, plan: TrainPlan) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warmup, then ``train.schedule.kind``: a cosine
    down to ``min_lr``, the peak (``const``), or the peak then a linear decay to ``min_lr`` over the last
    `cooldown_steps` (``const-cooldown``, open_clip's ``const_lr_cooldown`` with power 1)."""
    lr, min_lr = plan.train.optimizer.lr, plan.train.schedule.min_lr
    if plan.warmup_steps and step < plan.warmup_steps:
        return lr * (step + 1) / plan.warmup_steps
    kind = plan.train.schedule.kind
    if kind == "const":
        return lr
    if kind == "const-cooldown":
        cooldown = cooldown_steps(plan)
        start = plan.total_steps - cooldown
        if step < start:
            return lr
        return min_lr + (lr - min_lr) * (1 - min(1.0, (step - start) / cooldown))
    span = max(1, plan.total_steps - plan.warmup_steps)
    progress = min(1.0, (step - plan.warmup_steps) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


_NO_DECAY_NAMES = ("bias", "logit_scale", "logit_bias", "embedding", "pos_embed", "cls_token", "norm", "ln_", "bn")


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weight matrices and kernels only, not on norms, biases, embeddings or the
    logit scale (open_clip's rule, with embeddings and position/class tokens added); frozen parameters left out.
    With ``layer_decay`` < 1 the groups are split further by lr multiplier (``lr_scale``,
    `clipdr.train.finetune.lr_scales`)."""
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    decays = {name: not (p.ndim < 2 or any(part in name.lower() for part in _NO_DECAY_NAMES)) for name, p in named}
    if layer_decay != 1.0:
        return finetune.param_groups(named, weight_decay, decays, finetune.lr_scales(model, layer_decay))
    # Always these two groups, in this order: the optimiser state of checkpoints written before layer decay loads.
    decay = [p for name, p in named if decays[name]]
    no_decay = [p for name, p in named if not decays[name]]
    return [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
    ]


def build_student(plan: TrainPlan, device: torch.device) -> nn.Module:
    """The student in train mode on ``device``: initialised from ``plan.train.seed``, or from ``train.pretrained``
    (`clipdr.wiseft.create_start`), with the towers ``[train.finetune]`` locks frozen."""
    from open_clip import CoCa

    tc = plan.train
    model = wiseft.create_start(tc.model, tc.pretrained, tc.seed, device, plan.tracking_uri)
    if isinstance(model, CoCa) and not tc.pretrained:
        from clipdr.models.captioners import init_coca_decoder

        init_coca_decoder(model)
    ft = tc.finetune
    finetune.lock_towers(
        model, tc.model, ft.lock_image, ft.image_unlocked_groups, ft.lock_text, ft.text_unlocked_groups
    )
    if tc.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if plan.train.channels_last:
        if device.type != "cuda":  # where NHWC pays (cuDNN); torch 2.14.1's CPU backward of MCi towers segfaults in it
            raise ValueError("train.channels_last is a CUDA option (cuDNN's NHWC convolutions); set it false on CPU")
        model = model.to(memory_format=torch.channels_last)  # 4-D weights only: convolutions read NHWC
    return model.train()


class OnlineTeachers(nn.Module):
    """The teacher ensemble run inside the step (``online_distill``), frozen, on the student's views."""

    def __init__(self, specs: list[records.TeacherSpec], device: torch.device) -> None:
        from clipdr.models.teachers import Teacher

        super().__init__()
        self.names = [s.name for s in specs]
        self.norms = [(s.mean, s.std) for s in specs]
        self.teachers = nn.ModuleList()
        for spec in specs:
            cfg = TeacherConfig(name=spec.name, model=spec.model, pretrained=spec.pretrained, logit_scale=1.0)
            teacher = Teacher(cfg, device, spec).model.eval().requires_grad_(False)
            self.teachers.append(teacher)

    @torch.no_grad()
    def forward(self, batch: dict[str, Tensor], use_syn: bool) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        img, txt, syn = [], [], []
        for name, teacher, (mean, std) in zip(self.names, self.teachers, self.norms, strict=True):
            dtype = next(teacher.parameters()).dtype
            view = augment.normalize(batch[data.teacher_view_column(name)], mean, std, dtype)
            tokens = batch[data.teacher_tokens_column(name)]
            img.append(F.normalize(_at_least_fp32(teacher.encode_image(view)), dim=-1))
            txt.append(F.normalize(_at_least_fp32(teacher.encode_text(tokens)), dim=-1))
            if use_syn:
                syn_tokens = batch[data.teacher_syn_tokens_column(name)]
                syn.append(F.normalize(_at_least_fp32(teacher.encode_text(syn_tokens)), dim=-1))
        return img, txt, syn


def _at_least_fp32(x: Tensor) -> Tensor:
    """Upcasts bf16/fp16 outputs of an autocast region to float32; float64 stays float64 (the DDP-equivalence test
    trains in float64 so that it compares the algorithm, not float32 summation order)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def make_loss(plan: TrainPlan) -> losses.DistillationLoss:
    """The run's loss: lambda, each teacher's a_k (the plan's, `plan.teacher_scales`) and the caption sets."""
    with_teachers = plan.mode.distils and plan.kd_weight > 0
    return losses.DistillationLoss(
        plan.kd_weight if with_teachers else 0.0,
        [s.logit_scale for s in plan.teacher_specs] if with_teachers else (),
        use_syn_captions=plan.use_syn_captions,
        max_logit_scale=plan.train.loss.max_logit_scale,
        local_loss=plan.train.loss.local_loss,
    )


class Step:
    """The forward and loss of one micro-batch, for any mode: student features -> `DistillationLoss` (+ caption)."""

    def __init__(self, model: nn.Module, plan: TrainPlan, device: torch.device) -> None:
        from open_clip import CoCa

        self.model = model
        self.plan = plan
        self.device = device
        self.is_coca = isinstance(_unwrap(model), CoCa)
        specs = list(plan.teacher_specs)
        self.teacher_names = plan.teacher_names
        with_teachers = plan.mode.distils and plan.kd_weight > 0
        self.loss = make_loss(plan)
        self.online = OnlineTeachers(specs, device) if plan.mode.runs_teachers_online and with_teachers else None
        self.with_teachers = with_teachers
        # Views arrive as uint8 (`data`): normalised here, on the device, in the model's dtype.
        self.preprocess = data.student_preprocess(plan.train.model)
        self.dtype = next(model.parameters()).dtype
        self.memory_format = torch.channels_last if plan.train.channels_last else torch.contiguous_format
        # The compiled forward shares the model's parameters: optimiser, DDP and checkpoints see the model itself.
        self.forward = torch.compile(model) if plan.train.compile else model

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        plan = self.plan
        pre = self.preprocess
        image = augment.normalize(batch[data.IMAGE], pre.mean, pre.std, self.dtype)
        image, text = image.contiguous(memory_format=self.memory_format), batch[data.TEXT]
        B = text.shape[0]
        # One forward over the real and synthetic captions together: DDP sees one graph per step.
        tokens = torch.cat([text, batch[data.SYN_TEXT]]) if plan.use_syn_captions else text
        if self.is_coca and plan.use_syn_captions:
            # CoCa's decoder pairs every caption with its image: both caption sets need the image.
            image = torch.cat([image, image])
        with _autocast(self.device, plan.precision):
            out = self.forward(image, tokens)
        if not isinstance(out, dict):
            out = {"image_features": out[0], "text_features": out[1], "logit_scale": out[2]}
        img_BD = _at_least_fp32(out["image_features"])[:B]
        txt_2BD = _at_least_fp32(out["text_features"])
        txt_BD, syn_BD = (txt_2BD[:B], txt_2BD[B:]) if plan.use_syn_captions else (txt_2BD, None)

        t_img = t_txt = t_syn = None
        if self.online is not None:
            with _autocast(self.device, plan.precision):
                t_img, t_txt, t_syn = self.online(batch, plan.use_syn_captions)
        elif self.with_teachers:
            t_img = [batch[data.teacher_image_column(n)] for n in self.teacher_names]
            t_txt = [batch[data.teacher_text_column(n)] for n in self.teacher_names]
            if plan.use_syn_captions:
                t_syn = [batch[data.teacher_syn_text_column(n)] for n in self.teacher_names]
        parts = self.loss(img_BD, txt_BD, out["logit_scale"], syn_BD, t_img, t_txt, t_syn or None)

        if self.is_coca:
            logits_BTV = _at_least_fp32(out["logits"])
            labels_BT = out["labels"]
            caption = F.cross_entropy(logits_BTV.permute(0, 2, 1), labels_BT, ignore_index=0)
            parts["caption_loss"] = caption.detach()
            parts["loss"] = parts["loss"] + plan.train.loss.caption_loss_weight * caption
        return parts


def apply_update(model: nn.Module, optimizer: torch.optim.Optimizer, plan: TrainPlan, step: int) -> Tensor:
    """The optimiser step ``step`` (0-based) on the accumulated gradients: set its learning rate, clip the global
    gradient norm, AdamW, zero the gradients, clamp the logit scale. Returns the norm before clipping."""
    lr = lr_at(step, plan)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    grad_clip = plan.train.optimizer.grad_clip
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        _unwrap(model).logit_scale.clamp_(0, math.log(plan.train.loss.max_logit_scale))
    return grad_norm


# --------------------------------------------------------------------------- state


@dataclass
class Progress:
    step: int = 0
    samples_seen: int = 0
    batches: int = 0


def _restore(
    model: nn.Module, optimizer: torch.optim.Optimizer, plan: TrainPlan, ema: finetune.WeightEma | None
) -> Progress:
    """Restores the newest of two checkpoints: the one Ray Train hands this worker (``ray.train.get_checkpoint()``:
    this fit's latest, after a worker restart) and the one the driver resumed from (`TrainPlan.resume_from`, where
    the data stream starts). At a resubmission they are the same, unless the killed job's worker wrote a checkpoint
    that its killed controller never registered: then Ray Train hands the older one, the driver found the newer on
    storage and started the stream after it, and only restoring the newer one lets the run go on."""
    import ray.train

    found = ray.train.get_checkpoint()
    if found is not None:
        with found.as_directory() as directory:
            meta = checkpoint.CheckpointMeta.read(directory)
            if not plan.resume_from or meta.step >= checkpoint.CheckpointMeta.read(plan.resume_from).step:
                return _load_checkpoint(directory, str(found.path), meta, model, optimizer, plan, ema)
    if plan.resume_from:
        meta = checkpoint.CheckpointMeta.read(plan.resume_from)
        return _load_checkpoint(plan.resume_from, plan.resume_from, meta, model, optimizer, plan, ema)
    return Progress()


def _load_checkpoint(
    directory: str,
    where: str,
    meta: checkpoint.CheckpointMeta,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    plan: TrainPlan,
    ema: finetune.WeightEma | None,
) -> Progress:
    if meta.model != plan.train.model or meta.total_steps != plan.total_steps:
        raise RuntimeError(
            f"checkpoint {where} is of model {meta.model!r} with {meta.total_steps} steps; this run "
            f"trains {plan.train.model!r} for {plan.total_steps}: use another run_name, or the same settings"
        )
    _unwrap(model).load_state_dict(checkpoint.load_weights(directory))
    checkpoint.load_train_state(directory, optimizer)
    if ema is not None:
        saved = checkpoint.load_ema(directory)
        if saved is None:
            raise RuntimeError(f"checkpoint {where} holds no weight EMA, and this run keeps one")
        ema.load(saved)
    return Progress(meta.step, meta.samples_seen, meta.batches)


# --------------------------------------------------------------------------- the loop


class LossSums:
    """Running sums of the loss parts between two logs, kept on the device: reading a value back (``float``) waits
    for the device to finish, so the loop reads them once per log (`read`), not once per part and micro-batch."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}

    def add(self, parts: dict[str, Tensor], weight: float) -> None:
        for name, value in parts.items():
            term = value.detach() * weight
            self._sums[name] = self._sums[name] + term if name in self._sums else term

    def read(self, world_size: int = 1) -> dict[str, float]:
        """The sums as Python floats, in one device-to-host copy. With several ranks, each sum is the mean of the
        ranks' (one all-reduce, so every rank calls it at the same step): a rank's share of a local loss, or its
        own caption loss, is then logged as the global value."""
        if not self._sums:
            return {}
        stacked = torch.stack([v.to(torch.float64) for v in self._sums.values()])
        if world_size > 1:
            dist.all_reduce(stacked, op=dist.ReduceOp.SUM)  # gloo has no AVG
            stacked = stacked / world_size
        return dict(zip(self._sums, stacked.tolist(), strict=True))


def progress_line(progress: Progress, plan: TrainPlan, metrics: dict[str, float], eta: float | None) -> str:
    """The job log's line at a log step (`clipdr.progress`): step, samples seen, the loss and its parts, lr, pace."""
    losses = " ".join(
        f"{key.removeprefix('train/')} {value:.4f}"
        for key, value in metrics.items()
        if key.removeprefix("train/").endswith("loss") or "loss_" in key
    )
    fields = [
        f"{progress.samples_seen} samples",
        losses,
        f"lr {metrics['train/lr']:.2e}",
        f"{metrics['train/samples_per_s']:.1f} samples/s",
    ]
    return progress_lines.line("train", "step", progress.step, plan.total_steps, fields, eta)


def make_optimizer(model: nn.Module, plan: TrainPlan, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `param_groups`; on CUDA its fused kernel (one launch for every parameter, the same update)."""
    opt = plan.train.optimizer
    groups = param_groups(model, opt.weight_decay, plan.train.finetune.layer_decay)
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps, **fused)


def _batches(plan: TrainPlan, device: torch.device, skip: int) -> Iterator[dict[str, Tensor]]:
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    # On CUDA, batches are staged in pinned host memory, so their copies to the device do not block the step.
    stream = shard.iter_torch_batches(
        batch_size=plan.local_batch, drop_last=True, device=device, pin_memory=device.type == "cuda"
    )
    for i, batch in enumerate(stream):
        if i >= skip:
            yield batch


class Published:
    """The weights a run evaluates and logs: the model's (or their EMA's, with ``finetune.ema_decay``), WiSE-FT
    interpolated with the start at ``finetune.wise_alpha``; evaluated also at each of ``finetune.eval_alphas``.

    Args:
        model: The trained model (DDP-wrapped or not), right after it was built: its state now is the start.
        plan: The run's plan.
    """

    def __init__(self, model: nn.Module, plan: TrainPlan) -> None:
        ft = plan.train.finetune
        raw = _unwrap(model)
        self.plan = plan
        self.ema = finetune.WeightEma(raw, ft.ema_decay) if ft.ema_decay > 0 else None
        interpolates = ft.wise_alpha != 1.0 or ft.eval_alphas
        self.start = {k: v.detach().clone() for k, v in raw.state_dict().items()} if interpolates else None
        self._copy: nn.Module | None = None

    def finetuned(self, model: nn.Module) -> dict[str, Tensor]:
        """The fine-tuned weights before WiSE-FT: the EMA's when on, else the model's."""
        return self.ema.state if self.ema is not None else _unwrap(model).state_dict()

    def weights(self, model: nn.Module, alpha: float) -> dict[str, Tensor]:
        tuned = self.finetuned(model)
        return tuned if alpha == 1.0 or self.start is None else wiseft.wise_ft(self.start, tuned, alpha)

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Metrics of the published weights, then ``wise_ft/alpha_<a>/<metric>`` at every ``eval_alphas``."""
        from clipdr import evaluate

        raw = _unwrap(model)
        ft = self.plan.train.finetune
        results: dict[str, float] = {}
        for alpha, prefix in ((ft.wise_alpha, ""), *((a, wiseft.alpha_label(a) + "/") for a in ft.eval_alphas)):
            if self.ema is None and alpha == 1.0:
                target = raw  # the model itself: no copy
            else:
                if self._copy is None:
                    import copy

                    self._copy = copy.deepcopy(raw)
                self._copy.load_state_dict(self.weights(model, alpha))
                target = self._copy
            mode = target.training
            target.eval()
            try:
                metrics = evaluate.evaluate_model(target, self.plan.train.model, self.plan.evaluate, device)
            finally:
                target.train(mode)
            results |= {prefix + k: v for k, v in metrics.items()}
        return results


def system_metrics_node(local_rank: int, node_rank: int, num_nodes: int) -> tuple[bool, str | None]:
    """Whether this worker samples its node's system metrics (CPU, memory, GPU) into the run, and under which node
    id: the first worker of every node; unprefixed on one node (as runs always were), ``node<rank>`` on several."""
    if local_rank != 0:
        return False, None
    return True, (None if num_nodes == 1 else f"node{node_rank}")


def _node_system_metrics(plan: TrainPlan, context: Any, tracker: Any) -> Any:
    """The node's system-metrics sampler (`system_metrics_node`), or None. Rank 0 samples through its own run
    handle; another node's first worker opens the run too, best effort: a node whose sampler cannot start trains
    on, with a warning (its metrics are missing, nothing else)."""
    from clipdr import tracking

    num_nodes = max(1, context.get_world_size() // max(1, context.get_local_world_size()))
    samples, node_id = system_metrics_node(context.get_local_rank(), context.get_node_rank(), num_nodes)
    if not samples:
        return None
    if tracker is not None:
        return tracker.tracker.start_system_metrics(node_id=node_id)
    try:
        return tracking.open_run(plan.mlflow_run_id, uri=plan.tracking_uri).start_system_metrics(node_id=node_id)
    except Exception as e:  # system metrics never stop training
        log.warning("system metrics of %s not sampled: %s", node_id, e)
        return None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``config = {"plan": TrainPlan.to_dict()}``."""
    import ray.train
    import ray.train.torch

    plan = TrainPlan.from_dict(config["plan"])
    torch.set_num_threads(plan.threads)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    if device.type == "cuda":  # TF32 for what runs in fp32 (the loss, norms): bf16 autocast covers the rest
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build_student(plan, device)
    published = Published(model, plan)
    optimizer = make_optimizer(model, plan, device)
    progress = _restore(model, optimizer, plan, published.ema)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})

    tracker = None
    if rank == 0:
        from clipdr.tracking import MetricLogger

        # Metrics go through a buffer that rides out a tracking outage (up to tracking.outage_limit_s); checkpoints
        # never wait on it.
        tracker = MetricLogger.open(
            plan.mlflow_run_id, uri=plan.tracking_uri, outage_limit_s=plan.tracking.outage_limit_s
        )
    monitor = _node_system_metrics(plan, context, tracker)
    failed = True
    try:
        _train(plan, model, optimizer, progress, published, tracker, rank, world_size, device)
        failed = False
    finally:
        try:
            if tracker is not None:
                tracker.close(raise_errors=not failed)  # sends what an outage held back, or fails with its error
        finally:
            if monitor is not None:
                monitor.finish()


def _train(
    plan: TrainPlan,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: Progress,
    published: Published,
    tracker: Any,
    rank: int,
    world_size: int,
    device: torch.device,
) -> None:
    import ray.train

    step_fn = Step(model, plan, device)
    raw = _unwrap(model)
    # Steps redone after a restart (between the checkpoint and the crash) were logged already: not twice.
    logged_until = (tracker.last_step("train/loss") if tracker is not None else None) or -1

    def report() -> None:
        metrics = {"step": progress.step, "samples_seen": progress.samples_seen}
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            meta = checkpoint.CheckpointMeta(
                model=plan.train.model,
                mode=str(plan.mode),
                run_name=plan.run_name,
                mlflow_run_id=plan.mlflow_run_id,
                step=progress.step,
                samples_seen=progress.samples_seen,
                batches=progress.batches,
                total_steps=plan.total_steps,
            )
            ema = published.ema.state if published.ema is not None else None
            checkpoint.save(Path(tmp), raw.state_dict(), meta, optimizer.state_dict(), ema_state=ema)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    eval_every = plan.train.eval_every
    next_eval = (progress.samples_seen // eval_every + 1) * eval_every if eval_every else 0
    if progress.step >= plan.total_steps:
        report()
        return

    skip = progress.batches - plan.start_batches
    if skip < 0:
        raise RuntimeError(
            f"the data stream starts at micro-batch {plan.start_batches}, after this worker's checkpoint "
            f"({progress.batches}): resubmit the job so the driver restarts the stream from the checkpoint"
        )
    window_start, window_samples, window_steps = time.perf_counter(), 0, 0
    started, first_step = window_start, progress.step
    sums = LossSums()
    micro = 0
    for batch in _batches(plan, device, skip):
        last_micro = micro == plan.train.schedule.accum_steps - 1
        sync = contextlib.nullcontext() if last_micro or world_size == 1 else model.no_sync()
        with sync:
            parts = step_fn(batch)
            (parts["loss"] / plan.train.schedule.accum_steps).backward()
        sums.add(parts, 1.0 / plan.train.schedule.accum_steps)
        progress.batches += 1
        progress.samples_seen += plan.global_batch
        window_samples += plan.global_batch
        micro += 1
        if not last_micro:
            continue

        micro = 0
        grad_norm = apply_update(model, optimizer, plan, progress.step)
        if published.ema is not None:
            published.ema.update(raw)
        progress.step += 1
        window_steps += 1
        done = progress.step >= plan.total_steps

        if progress.step % plan.train.log_every == 0 or done:
            sums_read = sums.read(world_size)  # on every rank (a collective); the one host sync of the window
            if tracker is not None and progress.samples_seen > logged_until:
                now = time.perf_counter()
                means = {name: value / window_steps for name, value in sums_read.items()}
                metrics = {f"train/{name}": value for name, value in means.items()}
                metrics |= {
                    "train/lr": lr_at(progress.step - 1, plan),
                    "train/logit_scale": float(raw.logit_scale.detach().exp()),
                    "train/grad_norm": float(grad_norm),
                    "train/samples_per_s": window_samples / max(now - window_start, 1e-9),
                    "train/samples_seen": progress.samples_seen,
                    "train/step": progress.step,
                }
                tracker.log_metrics(metrics, step=progress.samples_seen)
                eta = progress_lines.eta_s(now - started, progress.step - first_step, plan.total_steps - progress.step)
                # Straight to stdout, which Ray forwards to the job's log: Ray Train's patched `print` would also
                # log it, and the line would show twice.
                sys.stdout.write(progress_line(progress, plan, metrics, eta) + "\n")
                sys.stdout.flush()
            sums, window_start, window_samples, window_steps = LossSums(), time.perf_counter(), 0, 0

        evaluate_now = done or (next_eval and progress.samples_seen >= next_eval)
        if plan.train.evaluate and tracker is not None and evaluate_now and progress.samples_seen > logged_until:
            tracker.log_metrics(published.evaluate(model, device), step=progress.samples_seen)
            while next_eval and next_eval <= progress.samples_seen:
                next_eval += eval_every
        if done or progress.step % plan.train.checkpoint.every == 0:
            report()
        if done:
            break
    if progress.step < plan.total_steps:
        raise RuntimeError(
            f"the data stream ended at step {progress.step} of {plan.total_steps}: the driver planned too few epochs"
        )
