"""What a training run will cost, before it starts: the plan `train.dry_run` prints, with no weight loaded.

- **Student size**: parameters of each tower, counted on the model built on the ``meta`` device.
- **FLOPs a sample** (`clipdr.models.flops`): the student's forward (one image and, per caption set trained on, one
  text) times 3 for forward and backward, plus one more forward with grad checkpointing (each block is recomputed);
  in ``online_distill`` each teacher's forward on the same image and texts. ``reinforced`` reads its teachers'
  embeddings and adds nothing.
- **Memory a device**: the tensors the student's forward saves for its backward, counted on the meta device (an
  upper bound: the meta device runs PyTorch's math attention, which keeps the attention matrix that fused kernels
  do not), times the micro-batch, halved for bf16 autocast; plus weights, gradients and AdamW's two moments in
  fp32 (16 bytes a parameter).
- **Hours**: the run's FLOPs over a device's dense bf16 peak (`clipdr.accelerators.PEAK_TFLOPS`, the one table),
  the floor; divided by an assumed MFU (``train.cost.mfu``), the projection, summed over devices and per worker.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from clipdr import records
from clipdr.config import Config
from clipdr.train.plan import TrainPlan, make_plan

BYTES_PER_PARAM = 16  # fp32 weight + gradient + AdamW's two moments


@dataclass(frozen=True)
class StudentSize:
    """A student's parameters and the bytes its forward saves for backward, per sample, at fp32."""

    image_params: int
    text_params: int
    saved_bytes: int


@functools.lru_cache(maxsize=16)
def student_size(name: str, grad_checkpointing: bool) -> StudentSize:
    """Counted over the model built on the ``meta`` device (no memory, no weights) for one image and one text."""
    import torch

    from clipdr import models
    from clipdr.models import flops

    model = flops.meta_model(name)
    model.set_grad_checkpointing(grad_checkpointing)
    model.train()
    size = models.model_config(name)["vision_cfg"].get("image_size", 224)
    size = size if isinstance(size, int) else size[0]
    saved: dict[int, torch.Tensor] = {}  # by identity: an op that saves a tensor another op saved adds nothing

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.setdefault(id(t), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.encode_image(torch.empty(1, 3, size, size, device="meta"))
        model.encode_text(torch.zeros(1, model.context_length, dtype=torch.long, device="meta"))
    image_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("visual."))
    text_params = sum(p.numel() for p in model.parameters()) - image_params
    return StudentSize(image_params, text_params, sum(t.numel() * t.element_size() for t in saved.values()))


@dataclass(frozen=True)
class TrainEstimate:
    plan: TrainPlan
    size: StudentSize
    student_flops: int  # training FLOPs a sample (forward and backward)
    student_detail: str
    teacher_flops: tuple[tuple[str, int], ...]  # online_distill: each teacher's forward FLOPs a sample
    data_rows: int | None
    data_from: str
    device: str
    peak: float  # FLOP/s
    mfu: float
    notes: tuple[str, ...]

    @property
    def flops_per_sample(self) -> int:
        return self.student_flops + sum(f for _, f in self.teacher_flops)

    @property
    def floor_hours(self) -> float:
        return self.flops_per_sample * self.plan.total_samples / self.peak / 3600

    @property
    def activation_bytes(self) -> float:
        """Saved activations of one micro-batch on one device."""
        return self.size.saved_bytes * self.plan.local_batch * (0.5 if self.plan.precision == "bf16" else 1.0)

    def describe(self) -> str:
        p, tc = self.plan, self.plan.train
        params = self.size.image_params + self.size.text_params
        workers = tc.resources.workers
        epochs = f", {p.total_samples / self.data_rows:.1f} epochs" if self.data_rows else ""
        lines = [
            f"student       {tc.model}: {params / 1e6:.1f}M parameters (image {self.size.image_params / 1e6:.1f}M, "
            f"text {self.size.text_params / 1e6:.1f}M), {p.precision}"
            + (", grad checkpointing" if tc.grad_checkpointing else ""),
            f"schedule      {p.total_steps:,} steps of {p.samples_per_step:,} samples "
            f"(global batch {p.global_batch:,} = {workers} workers x {p.local_batch}, accumulation "
            f"{tc.schedule.accum_steps}), {p.warmup_steps:,} warmup steps: {p.total_samples:,} samples seen{epochs}",
            f"data          {self.data_rows:,} rows ({self.data_from})"
            if self.data_rows
            else f"data          {self.data_from}",
            f"flops         student: {self.student_flops / 1e9:,.2f} GFLOP a sample ({self.student_detail})",
            *(f"flops         teacher {n} (online): {f / 1e9:,.2f} GFLOP a sample" for n, f in self.teacher_flops),
            f"memory        {self.activation_bytes / 2**30:,.2f} GiB of activations a device for a micro-batch of "
            f"{p.local_batch} (upper bound) + {params * BYTES_PER_PARAM / 2**30:,.2f} GiB of weights, gradients "
            "and AdamW state",
            f"floor         {self.floor_hours:,.2f} {self.device}-hours at its dense bf16 peak of "
            f"{self.peak / 1e12:g} TFLOP/s",
            f"projected     {self.floor_hours / self.mfu:,.2f} {self.device}-hours at MFU {self.mfu:.2f}, assumed "
            f"(train.cost.mfu): {self.floor_hours / self.mfu / workers:,.2f} hours on {workers} devices",
        ]
        return "\n".join(lines + [f"note          {n}" for n in self.notes])


def estimate(
    cfg: Config,
    teachers: list[records.TeacherSpec],
    data_rows: int | None,
    data_from: str,
    dataset_syn_captions: int | None = None,
) -> TrainEstimate:
    """The dry run's figures for ``cfg`` distilling from ``teachers`` (online_distill counts them); the dataset's S
    when it was read (an embeddings-only dataset trains on real captions only)."""
    from clipdr import models
    from clipdr.accelerators import peak_flops
    from clipdr.models import flops

    tc = cfg.train
    plan = make_plan(cfg, teachers, dataset_syn_captions=dataset_syn_captions)
    peak = peak_flops(tc.cost.device)
    notes = []
    count = flops.clip_flops(tc.model)
    texts = 2 if plan.use_syn_captions else 1
    passes = 4 if tc.grad_checkpointing else 3
    student = passes * (count.image + texts * count.text)
    detail = (
        f"{passes} x (image {count.image / 1e9:.2f} at {count.image_size}px + {texts} texts x "
        f"{count.text / 1e9:.2f}), {count.how}"
    )
    if "multimodal_cfg" in models.model_config(tc.model):
        notes.append("a CoCa student's caption decoder is not counted")
    teacher_flops = []
    if plan.mode.runs_teachers_online:
        for spec in plan.teacher_specs:
            t = flops.clip_flops(spec.model)
            teacher_flops.append((spec.name, t.image + texts * t.text))
        if not teachers:
            notes.append("online_distill: the teachers come from the dataset's manifest, which was not read")
    return TrainEstimate(
        plan,
        student_size(tc.model, tc.grad_checkpointing),
        student,
        detail,
        tuple(teacher_flops),
        data_rows,
        data_from,
        tc.cost.device,
        peak,
        tc.cost.mfu,
        tuple(notes),
    )
