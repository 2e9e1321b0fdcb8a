"""The training plan: what a mode means, the checks a training config must pass, and what every worker does.

The driver (`clipdr.train.run`) checks the config (`check_config`, `check_evaluation`), opens the data, and builds
one `TrainPlan` (`make_plan`): the resolved ``[train]`` and ``[evaluate]`` sections, the run's identity, and the
numbers derived from them (steps, per-worker batch, precision, the teachers' specs). The plan travels to the Ray
Train workers as plain data (`TrainPlan.to_dict`), so every rank and every restart sees the same decisions, and
Ray's control-plane processes that hold it need not import torch.

A mode is a `Mode`; code asks it what it means (``mode.reads_embeddings``) rather than comparing its name, so a
new mode is one member here with its properties.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from clipdr import records, storage
from clipdr.config import Config, EvaluateConfig, TrackingConfig, TrainConfig, fields_dict, from_dict, to_dict


class TrainError(ValueError):
    """A training config or dataset that cannot run; the message says what and where."""


class Mode(enum.StrEnum):
    """A training mode; equal to its config spelling (``train.mode``)."""

    REINFORCED = "reinforced"  # stored teacher embeddings are the distillation targets
    CLIP = "clip"  # plain CLIP baseline: no teacher targets
    ONLINE_DISTILL = "online_distill"  # teachers run inside the train step; no stored embeddings are read

    @property
    def distils(self) -> bool:
        """Whether the loss has teacher targets (``train.loss.kd_weight`` > 0 applies)."""
        return self is not Mode.CLIP

    @property
    def reads_embeddings(self) -> bool:
        """Whether the stored teacher embeddings of a reinforced dataset are read as targets."""
        return self is Mode.REINFORCED

    @property
    def needs_manifest(self) -> bool:
        """Whether the data must be a reinforced dataset; a mode without can also train on raw source shards."""
        return self is not Mode.CLIP

    @property
    def trains_syn_captions(self) -> bool:
        """Whether ``train.loss.use_syn_captions`` applies (the synthetic captions are a reinforcement's)."""
        return self is not Mode.CLIP

    @property
    def runs_teachers_online(self) -> bool:
        """Whether the teachers run inside the train step on the student's views."""
        return self is Mode.ONLINE_DISTILL


MODES: tuple[str, ...] = tuple(Mode)
# The training recipes that ship in jobs/configs (tests/unit/test_recipes.py plans each one).
RECIPES = (
    "mobileclip_s0.toml",
    "mobileclip_s1.toml",
    "mobileclip_s2.toml",
    "mobileclip_b.toml",
    "mobileclip2_s0.toml",
    "finetune_mobileclip2_s0.toml",
)


# --------------------------------------------------------------------------- checks


def require(ok: bool, message: str) -> None:
    """Raises `TrainError` with ``message`` unless ``ok``."""
    if not ok:
        raise TrainError(message)


def check_config(cfg: TrainConfig) -> None:
    """Refuses settings that cannot train, naming the key."""
    require(bool(cfg.data), "train.data is empty: name a reinforced dataset or source shards")
    require(
        bool(cfg.model),
        f"train.model is empty: name the student, or start from a recipe: {', '.join(RECIPES)} "
        "(jobs/configs; the tiny clipdr-tiny-* models are for tests, by name)",
    )
    require(cfg.mode in MODES, f"train.mode {cfg.mode!r} is not one of {', '.join(MODES)}")
    kd_weight = cfg.loss.kd_weight
    require(0.0 <= kd_weight <= 1.0, f"train.loss.kd_weight (lambda) must be in [0, 1], got {kd_weight}")
    if Mode(cfg.mode).distils:
        require(kd_weight > 0, f"train.mode {cfg.mode!r} distils: train.loss.kd_weight must be > 0 (0 is mode clip)")
    res, sched = cfg.resources, cfg.schedule
    require(res.workers >= 1, f"train.resources.workers must be >= 1, got {res.workers}")
    require(sched.batch_size >= 2, f"train.schedule.batch_size must be >= 2 (contrastive), got {sched.batch_size}")
    require(
        sched.batch_size % res.workers == 0,
        f"train.schedule.batch_size {sched.batch_size} must divide evenly over train.resources.workers = {res.workers}",
    )
    require(sched.accum_steps >= 1, f"train.schedule.accum_steps must be >= 1, got {sched.accum_steps}")
    require(
        sched.samples >= sched.batch_size * sched.accum_steps, "train.schedule.samples is less than one optimiser step"
    )
    require(cfg.precision in ("auto", "fp32", "bf16"), f"train.precision must be auto, fp32 or bf16: {cfg.precision}")
    require(cfg.optimizer.lr > 0 and sched.min_lr >= 0, "train.optimizer.lr must be > 0 and train.schedule.min_lr >= 0")
    for key, value in (
        ("log_every", cfg.log_every),
        ("checkpoint.every", cfg.checkpoint.every),
        ("checkpoint.keep", cfg.checkpoint.keep),
    ):
        require(value >= 1, f"train.{key} must be >= 1, got {value}")
    _check_schedule(cfg)
    _check_finetune(cfg)
    max_scale = cfg.loss.max_logit_scale
    require(max_scale > 1, f"train.loss.max_logit_scale must be > 1, got {max_scale}")
    name_ok = not cfg.run_name or re.fullmatch(r"[\w.-]+", cfg.run_name) is not None
    require(name_ok, "train.run_name: use [A-Za-z0-9_.-]")


def _check_schedule(cfg: TrainConfig) -> None:
    sched = cfg.schedule
    samples_per_step = sched.batch_size * sched.accum_steps
    if sched.kind == "const-cooldown":
        require(
            sched.cooldown_samples >= samples_per_step,
            f"train.schedule.kind const-cooldown needs train.schedule.cooldown_samples of at least one optimiser step "
            f"({samples_per_step} samples), got {sched.cooldown_samples}",
        )
        require(
            sched.warmup_samples + sched.cooldown_samples <= sched.samples,
            f"train.schedule: warmup_samples + cooldown_samples ({sched.warmup_samples} + {sched.cooldown_samples}) "
            f"exceed samples ({sched.samples})",
        )
    else:
        require(
            sched.cooldown_samples == 0,
            f"train.schedule.cooldown_samples applies to kind const-cooldown only (kind is {sched.kind!r})",
        )


def _check_finetune(cfg: TrainConfig) -> None:
    ft = cfg.finetune
    require(0 < ft.layer_decay <= 1, f"train.finetune.layer_decay must be in (0, 1] (1: off), got {ft.layer_decay}")
    require(0 <= ft.ema_decay < 1, f"train.finetune.ema_decay must be in [0, 1) (0: off), got {ft.ema_decay}")
    for key, value in (
        ("image_unlocked_groups", ft.image_unlocked_groups),
        ("text_unlocked_groups", ft.text_unlocked_groups),
    ):
        require(value >= 0, f"train.finetune.{key} must be >= 0, got {value}")
    for alpha in (ft.wise_alpha, *ft.eval_alphas):
        require(0 <= alpha <= 1, f"train.finetune WiSE-FT alphas must be in [0, 1], got {alpha}")
    require(
        bool(cfg.pretrained) or (ft.wise_alpha == 1 and not ft.eval_alphas),
        "train.finetune.wise_alpha / eval_alphas interpolate with the start: set train.pretrained",
    )
    require(
        not ft.eval_alphas or cfg.evaluate,
        "train.finetune.eval_alphas are evaluated with the [evaluate] datasets: set train.evaluate = true",
    )


def check_evaluation(cfg: Config) -> None:
    """With train.evaluate, the [evaluate] datasets must exist now, not fail the run at its first evaluation."""
    if not cfg.train.evaluate:
        return
    ev = cfg.evaluate
    require(bool(ev.zeroshot or ev.retrieval), "train.evaluate is set but [evaluate] names no zeroshot/retrieval data")
    for key, uris in (("zeroshot", ev.zeroshot), ("retrieval", ev.retrieval)):
        for uri in uris:
            require(storage.exists(uri), f"evaluate.{key}: {uri} does not exist (train.evaluate is set)")


def uses_syn_captions(cfg: TrainConfig) -> bool:
    """Whether the run trains on synthetic captions: the one place that decides it."""
    return cfg.loss.use_syn_captions and Mode(cfg.mode).trains_syn_captions


NO_SYN_CAPTIONS_NOTE = (
    "the dataset has no synthetic captions (S = 0: an embeddings-only pass): training on real captions only, "
    "without the synthetic-caption loss parts"
)


def syn_captions_used(cfg: TrainConfig, dataset_syn_captions: int) -> tuple[int, str]:
    """``(n, note)``: how many of a dataset's S synthetic captions a sample the run draws from (0: it trains on none),
    and, when the dataset rather than the config turned them off, why (for the run's log).

    ``train.num_syn_captions`` n > 0 takes the first n of S (a `TrainError` when S < n); 0 takes all S. A dataset
    without synthetic captions (S = 0) trains on real captions only whatever ``train.loss.use_syn_captions`` says.
    """
    n = cfg.num_syn_captions
    require(n >= 0, f"train.num_syn_captions must be >= 0 (0: all the dataset has), got {n}")
    if not uses_syn_captions(cfg):
        return 0, ""
    if dataset_syn_captions == 0:
        return 0, NO_SYN_CAPTIONS_NOTE
    require(
        n <= dataset_syn_captions,
        f"train.num_syn_captions = {n}, but the dataset has {dataset_syn_captions} synthetic captions a sample",
    )
    return n or dataset_syn_captions, ""


def caption_sets_used(cfg: TrainConfig, dataset_sets: Mapping[str, int]) -> tuple[tuple[str, ...], int]:
    """``(sets, S)``: the caption sets a run draws its synthetic captions from, in order (``train.syn_caption_sets``;
    empty: every set of ``dataset_sets``, the manifest's `records.Manifest.caption_sets`), and their captions a
    sample together (the S that ``train.num_syn_captions`` takes the first n of)."""
    chosen = tuple(cfg.syn_caption_sets) or tuple(dataset_sets)
    require(len(set(chosen)) == len(chosen), f"train.syn_caption_sets repeats a set: {list(chosen)}")
    unknown = [s for s in chosen if s not in dataset_sets]
    require(
        not unknown,
        f"train.syn_caption_sets names {unknown}, which the dataset lacks: it has {list(dataset_sets)} (add a set "
        "with reinforce.add = 'captions')",
    )
    return chosen, sum(dataset_sets[s] for s in chosen)


def teacher_scales(cfg: TrainConfig, teachers: list[records.TeacherSpec]) -> tuple[float, ...]:
    """Each teacher's a_k this run distils with: ``train.teacher_scales`` when set (one per teacher, in loss order),
    else the ``logit_scale`` the manifest records. a_k is a training choice: stored data does not depend on it."""
    if not cfg.teacher_scales:
        return tuple(t.logit_scale for t in teachers)
    names = [t.name for t in teachers]
    require(
        len(cfg.teacher_scales) == len(teachers),
        f"train.teacher_scales has {len(cfg.teacher_scales)} values for {len(teachers)} teachers {names}: give one "
        "a_k per teacher, in train.teachers order (the manifest's when train.teachers is empty)",
    )
    require(all(a > 0 for a in cfg.teacher_scales), f"train.teacher_scales must be > 0, got {cfg.teacher_scales}")
    return tuple(float(a) for a in cfg.teacher_scales)


def default_run_name(cfg: TrainConfig) -> str:
    data_name = storage.basename(cfg.data.rstrip("/")) or "data"
    return re.sub(r"[^\w.-]+", "-", f"{cfg.model}-{cfg.mode}-{data_name}-{cfg.schedule.samples}")


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class TrainPlan:
    """What every worker of a run does, decided once by the driver.

    Settings are read from the resolved sections (``plan.train.optimizer.lr``); the fields beside them are what the
    driver derived, and win over the section's raw values (``kd_weight`` is 0 and ``use_syn_captions`` false in
    ``clip``).

    Attributes:
        train: The ``[train]`` section with its sub-sections (``schedule``, ``optimizer``, ``loss``, ``checkpoint``,
            ``resources``), paths absolute.
        evaluate: The ``[evaluate]`` section (datasets evaluated on when ``train.evaluate``).
        mode: ``train.mode``.
        teacher_specs: The teachers distilled from, in loss order (from the dataset's manifest), each with the a_k
            this run uses as its ``logit_scale`` (`teacher_scales`); empty unless the mode distils.
        kd_weight: lambda of the loss.
        use_syn_captions: Whether one synthetic caption a sample is trained on (`uses_syn_captions`, and the
            dataset has some: `syn_captions_used`).
        syn_caption_sets: The caption sets whose captions, concatenated, are that S (`caption_sets_used`); empty
            when the run trains on no synthetic captions, or the plan was made without the dataset's sets.
        num_syn_captions: The synthetic captions a sample the draws choose from (the first n of the dataset's S);
            0 when none are used, or when the dataset was not read (the replay then takes all S).
        precision: ``fp32`` or ``bf16`` (``auto`` resolved).
        local_batch: Samples per micro-batch per worker.
        total_steps: Optimiser steps of the whole run.
        warmup_steps: Optimiser steps of linear warmup.
        threads: torch threads per worker.
        run_name: The run's name (Ray Train storage folder and MLflow run name).
        start_batches: Micro-batches per worker that come before the first one the dataset stream delivers.
        resume_from: The newest complete checkpoint of the run's storage when the driver planned it
            (`clipdr.checkpoint.latest`; empty: none), which ``start_batches`` follows: a worker restores it unless
            Ray Train hands it a newer one (`clipdr.train.loop`).
        mlflow_run_id: The run's MLflow run id (reopened by rank 0).
        tracking_uri: Where that run lives.
        tracking: The ``[tracking]`` section (how long rank 0 keeps metrics through a tracking outage).
    """

    train: TrainConfig
    evaluate: EvaluateConfig
    mode: Mode
    teacher_specs: tuple[records.TeacherSpec, ...]
    kd_weight: float
    use_syn_captions: bool
    precision: str
    local_batch: int
    total_steps: int
    warmup_steps: int
    threads: int
    run_name: str
    start_batches: int = 0
    resume_from: str = ""
    mlflow_run_id: str = ""
    tracking_uri: str = ""
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    num_syn_captions: int = 0
    syn_caption_sets: tuple[str, ...] = ()

    @property
    def teacher_names(self) -> list[str]:
        return [t.name for t in self.teacher_specs]

    @property
    def global_batch(self) -> int:
        """Samples per micro-batch over all workers."""
        return self.train.schedule.batch_size

    @property
    def samples_per_step(self) -> int:
        return self.global_batch * self.train.schedule.accum_steps

    @property
    def total_samples(self) -> int:
        return self.total_steps * self.samples_per_step

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain data (what Ray ships to the workers; `from_dict` rebuilds it)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out |= {
            "train": to_dict(self.train),
            "evaluate": to_dict(self.evaluate),
            "tracking": to_dict(self.tracking),
            "mode": str(self.mode),
            "teacher_specs": [fields_dict(t) for t in self.teacher_specs],
        }
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainPlan:
        return cls(
            **raw
            | {
                "train": from_dict(TrainConfig, raw["train"], "train plan"),
                "evaluate": from_dict(EvaluateConfig, raw["evaluate"], "train plan"),
                "tracking": from_dict(TrackingConfig, raw.get("tracking", {}), "train plan"),
                "mode": Mode(raw["mode"]),
                "teacher_specs": tuple(records.TeacherSpec(**t) for t in raw["teacher_specs"]),
                "syn_caption_sets": tuple(raw.get("syn_caption_sets", ())),
            }
        )


def _precision(cfg: TrainConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if cfg.resources.use_gpu else "fp32"


def make_plan(
    cfg: Config,
    teachers: list[records.TeacherSpec],
    *,
    run_name: str = "",
    start_batches: int = 0,
    resume_from: str = "",
    mlflow_run_id: str = "",
    tracking_uri: str = "",
    dataset_syn_captions: int | None = None,
    dataset_caption_sets: Mapping[str, int] | None = None,
) -> TrainPlan:
    """The workers' `TrainPlan` for ``cfg``, distilling from ``teachers`` (in loss order; ignored in clip) with the
    a_k of `teacher_scales`; ``dataset_syn_captions`` is the data's S (None: not read, the config decides), or
    ``dataset_caption_sets`` its caption sets (`records.Manifest.caption_sets`; `caption_sets_used` chooses)."""
    sets: tuple[str, ...] = ()
    if dataset_caption_sets is not None:
        sets, dataset_syn_captions = caption_sets_used(cfg.train, dataset_caption_sets)
    tc = cfg.train
    sched = tc.schedule
    mode = Mode(tc.mode)
    samples_per_step = sched.batch_size * sched.accum_steps
    total_steps = math.ceil(sched.samples / samples_per_step)
    if mode.distils:
        scales = teacher_scales(tc, list(teachers))
        teachers = [dataclasses.replace(t, logit_scale=a) for t, a in zip(teachers, scales, strict=True)]
    if dataset_syn_captions is None:
        use_syn, num_syn = uses_syn_captions(tc), tc.num_syn_captions if uses_syn_captions(tc) else 0
    else:
        num_syn, _ = syn_captions_used(tc, dataset_syn_captions)
        use_syn = num_syn > 0
    sets = sets if use_syn else ()
    return TrainPlan(
        train=tc,
        evaluate=cfg.evaluate,
        mode=mode,
        teacher_specs=tuple(teachers) if mode.distils else (),
        kd_weight=tc.loss.kd_weight if mode.distils else 0.0,
        use_syn_captions=use_syn,
        num_syn_captions=num_syn,
        syn_caption_sets=sets,
        precision=_precision(tc),
        local_batch=sched.batch_size // tc.resources.workers,
        total_steps=total_steps,
        warmup_steps=min(total_steps, sched.warmup_samples // samples_per_step),
        threads=max(1, int(tc.resources.cpus_per_worker)),
        run_name=run_name or default_run_name(tc),
        start_batches=start_batches,
        resume_from=resume_from,
        mlflow_run_id=mlflow_run_id,
        tracking_uri=tracking_uri,
        tracking=cfg.tracking,
    )
