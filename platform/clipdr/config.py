"""Typed, frozen run configuration: one TOML file per run, overridden by ``--set section.key=value``.

A run's whole configuration is one `Config`; each component reads its own section. Every field carries
its help text in ``metadata["help"]`` so the CLI can list the keys of a section with their defaults.

Loading is strict: an unknown section or key, or a value of the wrong type, raises ``ConfigError`` with
the dotted key, where it came from (file or ``--set``) and what is allowed. A key that moved (`MOVED`, e.g. when
``[train]`` was split into sections) is refused naming its new place; `upgrade` moves such keys in settings stored
before the move.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# Enumerated settings: a value outside these fails at load, naming the key and the valid values.
TrainMode = Literal["reinforced", "clip", "online_distill"]  # `clipdr.train.plan.Mode` says what each means
Precision = Literal["auto", "fp32", "bf16"]
TeacherPrecision = Literal["auto", "bf16"]  # `clipdr.models.teachers.Teacher` says what each computes
Device = Literal["auto", "cuda", "cpu"]
OnnxExporter = Literal["dynamo", "torchscript"]
LrSchedule = Literal["cosine", "const", "const-cooldown"]


class ConfigError(ValueError):
    """A configuration file or override that does not fit the typed config."""


OMIT_DEFAULT = "omit_default"
"""Field metadata: `to_dict` leaves the key out while it holds its default, so a key added to a stored record (a
manifest, a fingerprinted setting) keeps the bytes and fingerprints written before it existed; reading fills it in."""


def _f(default: Any, help: str, omit_default: bool = False) -> Any:
    """A dataclass field with a default and its help text; ``omit_default``: see `OMIT_DEFAULT`."""
    if isinstance(default, list | dict | set):
        raise TypeError("config defaults must be immutable (use tuples)")
    metadata = {"help": help, **({OMIT_DEFAULT: True} if omit_default else {})}
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: default, metadata=metadata)
    return field(default=default, metadata=metadata)


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class NoiseConfig:
    """How the synthetic student corpus' web alt-text goes wrong (every field is a probability)."""

    drop_count: float = _f(0.9, "probability that a noisy caption omits the object count (2-3 objects)")
    drop_size: float = _f(0.85, "probability that a noisy caption omits an object's size")
    drop_position: float = _f(0.9, "probability that a noisy caption omits an object's position")
    drop_background: float = _f(0.85, "probability that a noisy caption omits the background")
    drop_colour: float = _f(0.1, "probability that a noisy caption omits an object's colour")
    drop_shape: float = _f(
        0.1, "probability that a noisy caption says 'shape' (tiles: 'tile') instead of the shape's name (and its fill)"
    )
    drop_object: float = _f(0.4, "probability that a noisy caption omits each object after the first")
    wrong_rate: float = _f(0.15, "probability that each attribute a noisy caption states is wrong")
    filler_rate: float = _f(0.6, "probability of adding web filler ('stock photo', '#design', ...)")
    shuffle_rate: float = _f(0.2, "probability that a noisy caption's words and phrases are reordered")
    irrelevant_rate: float = _f(0.1, "probability that the caption is unrelated to the image ('IMG_4821')")


@dataclass(frozen=True)
class SynthConfig:
    """The built-in synthetic image-text world (the embedded default data).

    Default sizes suit the 15-minute CPU demo: 20k clean teacher samples are ~8 epochs for a teacher
    trained ~1.2k steps at batch 128; 10k noisy student samples; 2k zero-shot images (~31 per class of
    the 64-way object task); 1k retrieval pairs. The whole world renders in well under a minute.
    """

    output: str = _f("data/synth", "where the world is written: a path, file:// or s3:// URI")
    seed: int = _f(0, "seed of the world; every sample is a pure function of (seed, split, index)")
    family: str = _f("shapes", "world family: shapes (the demo's) or tiles (other objects, attributes and captions)")
    image_size: int = _f(64, "side of the square images in pixels (at least 16)")
    formats: tuple[str, ...] = _f(("webdataset",), "source formats of the caption splits: webdataset and/or parquet")
    shard_size: int = _f(1000, "samples per shard")
    num_teacher: int = _f(20000, "samples in the clean teacher corpus")
    num_student: int = _f(10000, "samples in the noisy student corpus")
    num_zeroshot: int = _f(2000, "single-object images in the zero-shot classification split")
    num_retrieval: int = _f(1000, "image-caption pairs in the retrieval split")
    max_objects: int = _f(3, "most objects in an image (1-3)")
    workers: int = _f(1, "processes that render shards in parallel (0: one per CPU)")
    noise: NoiseConfig = _f(NoiseConfig(), "noise of the student corpus' captions")


@dataclass(frozen=True)
class AugmentConfig:
    """The stored augmentations: RandomResizedCrop, then RandAugment, optional horizontal flip."""

    scale: tuple[float, float] = _f((0.08, 1.0), "RandomResizedCrop range of the crop's area fraction")
    ratio: tuple[float, float] = _f((3 / 4, 4 / 3), "RandomResizedCrop range of the crop's aspect ratio")
    num_ops: int = _f(2, "RandAugment operations per view")
    magnitude: int = _f(9, "RandAugment magnitude bin")
    num_magnitude_bins: int = _f(31, "RandAugment magnitude bins")
    hflip: float = _f(0.0, "probability of a horizontal flip")


@dataclass(frozen=True)
class TeacherConfig:
    """One CLIP teacher of the ensemble (an open_clip model)."""

    name: str = _f("", "short id used in column names: lowercase letters, digits, single underscores")
    model: str = _f("", "open_clip architecture, e.g. ViT-L-14")
    pretrained: str = _f("", "open_clip tag, hf-hub:org/name, or a local checkpoint file; empty: random init")
    logit_scale: float = _f(100.0, "the teacher's inverse temperature a_k in the distillation targets")
    precision: TeacherPrecision = _f(
        "auto",
        "auto: fp32 weights, under bf16 autocast on CUDA; bf16: bf16 weights and activations on every device (no "
        "casts; other rounding, so the dataset records it)",
        omit_default=True,
    )


@dataclass(frozen=True)
class CaptionerConfig:
    """The model that writes synthetic captions."""

    kind: str = _f("coca", "captioner kind (registry name)")
    model: str = _f("coca_ViT-L-14", "open_clip CoCa architecture")
    pretrained: str = _f("mscoco_finetuned_laion2b_s13b_b90k", "open_clip tag, hf-hub id, or local checkpoint file")
    top_p: float = _f(0.9, "nucleus sampling: keep the smallest token set with this probability mass")
    temperature: float = _f(1.0, "sampling temperature")
    max_len: int = _f(30, "most tokens a synthetic caption may have")


@dataclass(frozen=True)
class ReinforceResources:
    """Where reinforcement runs and how wide; set here, applied in reinforce/pipeline.py only."""

    device: Device = _f("auto", "auto (cuda when the cluster has GPUs), cuda or cpu")
    batch_size: int = _f(
        64, "samples per model forward: a fixed chunk of one shard, so outputs do not depend on scheduling"
    )
    teacher_actors: int = _f(1, "actors running the teacher ensemble (the least: the job starts with these)")
    captioner_actors: int = _f(1, "actors running the captioner (the least: the job starts with these)")
    teacher_actors_max: int = _f(
        0, "most teacher actors: the pool grows to it as devices join (autoscaling, spot); 0: teacher_actors, fixed"
    )
    captioner_actors_max: int = _f(0, "most captioner actors, as teacher_actors_max; 0: captioner_actors, fixed")
    cpus_per_actor: float = _f(1.0, "CPUs reserved per model actor (also its torch threads)")
    gpus_per_actor: float = _f(1.0, "GPUs per model actor when device is cuda")
    writers: int = _f(
        2,
        "writer actors; output shards are split among them (a stable hash of the shard name), each streaming its "
        "shards to storage a chunk at a time; outputs do not depend on it",
    )
    crash_retries: int = _f(
        2,
        "times a stage's work is retried after its worker process died (killed for memory, crashed) before that "
        "source shard fails: the job finishes the other shards, then exits naming it; a rerun redoes it",
    )


@dataclass(frozen=True)
class ReinforceCost:
    """What a dry run's projection of accelerator-hours assumes (`clipdr.reinforce.cost`); changes no output."""

    samples: int = _f(
        0, "source samples the projection counts when the dry run cannot count them (webdataset tars, object storage)"
    )
    device: str = _f("h200", "accelerator whose dense bf16 peak the floor uses: h100-sxm, h200, a100 or l4")
    mfu: float = _f(0.5, "assumed model FLOPs utilisation (achieved / peak) of the job's accelerators")
    measured: str = _f("", "a GPU check's result file (jobs/gpu_check.sh, gpu_check.json): its measured MFU is used")


@dataclass(frozen=True)
class ReinforceConfig:
    """Reinforcement: source shards -> teacher embeddings of K stored views + S synthetic captions."""

    source: str = _f("", "source shards: a directory or shard file (webdataset tar or Parquet), path or s3://")
    output: str = _f("", "reinforced dataset directory, path or s3://")
    num_augmentations: int = _f(10, "K, stored augmented views per image")
    num_syn_captions: int = _f(5, "S, synthetic captions per image")
    seed: int = _f(0, "seed of view sampling and caption sampling")
    teachers: tuple[TeacherConfig, ...] = _f((), "the teacher ensemble, as [[reinforce.teachers]] tables")
    captioner: CaptionerConfig = _f(CaptionerConfig(), "the captioner")
    resources: ReinforceResources = _f(ReinforceResources(), "devices and parallelism")
    dry_run: bool = _f(
        False, "validate the config and source, print the plan and its accelerator-hours; load no model, write nothing"
    )
    cost: ReinforceCost = _f(ReinforceCost(), "what the dry run's accelerator-hour projection assumes")
    add: str = _f(
        "",
        "a pass adding a part to the complete dataset at output, rewriting nothing: 'captions' (the caption set "
        "caption_set: S = num_syn_captions captions a sample from [reinforce.captioner], and every teacher's text "
        "embeddings of it) or 'teacher' (the one teacher of [[reinforce.teachers]] the dataset lacks); empty: the "
        "base job (docs/reinforce.md)",
    )
    caption_set: str = _f("", "name of the caption set a 'captions' pass adds (a lowercase identifier)")


@dataclass(frozen=True)
class DataCompDRConfig:
    """Import of Apple's released DataCompDR (joined with its images) into clipdr's reinforced format."""

    source: str = _f("", "DataCompDR webdataset tars joined with images (jpg/txt), path or s3://")
    output: str = _f("", "reinforced dataset directory to write, path or s3://")
    num_augmentations: int = _f(30, "K stored in the source: 30 for DataCompDR-12M, 10 for DataCompDR-1B")
    reference_max_side: int = _f(
        512, "longest image side the crop windows refer to (DataComp's img2dataset resize); 0: use images as they are"
    )
    caption_sets: tuple[str, ...] = _f(
        (),
        "the source's caption sets to import, by syn.json key: 'syn_text' becomes the set 'default', "
        "'syn_text_<tag>' the set <tag> (docs/reinforce.md); empty: every set the source has",
    )


@dataclass(frozen=True)
class TrainResources:
    """How wide training runs (Ray Train scaling and the replay loader)."""

    workers: int = _f(1, "Ray Train workers (DDP ranks)")
    use_gpu: bool = _f(False, "one or more GPUs per worker (bf16 autocast); false trains in fp32 on CPU")
    cpus_per_worker: float = _f(1.0, "CPUs reserved per worker (also its torch threads)")
    gpus_per_worker: float = _f(1.0, "GPUs per worker when use_gpu")
    loader_tasks: int = _f(1, "concurrent Ray Data tasks replaying views and tokenising (the CPU map stage)")
    loader_batch_size: int = _f(64, "rows a replay actor processes at once")
    cpus_per_loader: float = _f(1.0, "CPUs reserved per replay actor")
    max_failures: int = _f(2, "worker failures survived by restarting from the last checkpoint")


@dataclass(frozen=True)
class TrainSchedule:
    """How long a run is, in what batches, and the learning-rate curve (linear warmup, then `kind`)."""

    samples: int = _f(100_000, "training length in samples seen")
    batch_size: int = _f(256, "global batch size (over all workers, before accumulation)")
    accum_steps: int = _f(1, "gradient accumulation: optimizer steps every accum_steps batches")
    warmup_samples: int = _f(10_000, "samples of linear learning-rate warmup")
    min_lr: float = _f(0.0, "learning rate at the end of the cosine or of the cooldown")
    kind: LrSchedule = _f(
        "cosine",
        "the curve after warmup: cosine (down to min_lr), const (the peak lr to the end), const-cooldown (the peak, "
        "then linearly down to min_lr over the last cooldown_samples)",
    )
    cooldown_samples: int = _f(0, "const-cooldown: samples of the final linear decay to min_lr")


@dataclass(frozen=True)
class TrainOptimizer:
    """AdamW and the update it makes."""

    lr: float = _f(1e-3, "peak learning rate (reached after train.schedule.warmup_samples)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-6, "AdamW epsilon")
    weight_decay: float = _f(0.2, "AdamW weight decay (not on norms, biases, embeddings, logit scale)")
    grad_clip: float = _f(1.0, "global gradient norm clip; 0: off")


@dataclass(frozen=True)
class TrainLoss:
    """The loss: (1 - kd_weight) * CLIP + kd_weight * KD, over the real and a synthetic caption (`clipdr.losses`)."""

    kd_weight: float = _f(1.0, "lambda: loss = (1 - lambda) * clip + lambda * kd (0 with mode clip)")
    use_syn_captions: bool = _f(True, "also train on one drawn synthetic caption a sample (0 with mode clip)")
    caption_loss_weight: float = _f(2.0, "weight of the captioning loss when the model is a CoCa")
    local_loss: bool = _f(
        True,
        "with more than one worker, each rank computes only its own rows of the similarity matrices (B x G memory "
        "and FLOPs, not G x G), with the gradients of the full matrices; one worker computes the full matrices "
        "either way. A memory knob: a resubmission may change it",
    )
    max_logit_scale: float = _f(100.0, "clamp of the student's logit scale in the loss and after every step")


@dataclass(frozen=True)
class TrainFinetune:
    """Fine-tuning without forgetting (`clipdr.train.finetune`; docs/finetune.md). The start is ``train.pretrained``."""

    lock_image: bool = _f(False, "LiT: freeze the image tower (open_clip's lock_image_tower)")
    image_unlocked_groups: int = _f(0, "with lock_image: leave the tower's last N layer groups trainable")
    lock_text: bool = _f(False, "freeze the text tower (open_clip's lock_text_tower)")
    text_unlocked_groups: int = _f(0, "with lock_text: leave the tower's last N layers trainable")
    layer_decay: float = _f(
        1.0, "layer-wise lr decay: lr x layer_decay ** (top depth - depth) per tower (docs/finetune.md); 1: off"
    )
    ema_decay: float = _f(
        0.0, "weight EMA decay (e.g. 0.999): the average is what is evaluated and logged, and is checkpointed; 0: off"
    )
    wise_alpha: float = _f(
        1.0,
        "WiSE-FT: evaluate and log start + alpha x (fine-tuned - start) (train.pretrained is the start); 1: the "
        "fine-tuned (or EMA) weights, 0: the start",
    )
    eval_alphas: tuple[float, ...] = _f(
        (), "also evaluate at these WiSE-FT alphas, logged as wise_ft/alpha_<a>/<metric> (e.g. [0.25, 0.5, 0.75])"
    )


@dataclass(frozen=True)
class TrainCheckpoint:
    """When checkpoints are written and how many are kept (a resubmission may change these)."""

    every: int = _f(100, "optimizer steps between checkpoints (one is always written at the end)")
    keep: int = _f(2, "checkpoints kept on storage")


@dataclass(frozen=True)
class TrainCost:
    """What the dry run's projection of accelerator-hours assumes (`clipdr.train.estimate`); changes no training."""

    device: str = _f("h200", "accelerator whose dense bf16 peak the floor uses: h100-sxm, h200, a100 or l4")
    mfu: float = _f(0.4, "assumed model FLOPs utilisation (achieved / peak) of the training step")


@dataclass(frozen=True)
class TrainConfig:
    """Training a student: reinforced distillation, or a baseline, on Ray Train.

    The top level is the run: what trains on what, where it is stored and tracked, how it is evaluated. The
    sections are the recipe's parts (`schedule`, `optimizer`, `loss`), the checkpoint cadence (`checkpoint`) and
    the scaling (`resources`). Training length is counted in samples seen (`schedule.samples`), so runs with
    different batch sizes or worker counts compare at equal data. A job resubmitted with the same `output` and
    `run_name` resumes from its last checkpoint and continues the same MLflow run.
    """

    data: str = _f("", "training data: a reinforced dataset directory, or raw source shards (mode clip only)")
    output: str = _f("runs", "storage for checkpoints: <output>/<run_name>/..., path or s3://")
    run_name: str = _f("", "run name (Ray Train and MLflow); resubmitting the same name resumes; empty: derived")
    experiment: str = _f("clipdr-train", "MLflow experiment")
    mode: TrainMode = _f("reinforced", "reinforced (stored teacher targets), clip (plain baseline) or online_distill")
    model: str = _f("", "student: an open_clip model name (MobileCLIP2-S0, ...) or a clipdr config; required")
    pretrained: str = _f(
        "",
        "start from: an open_clip tag, hf-hub id or weights file, a clipdr checkpoint or run folder, or an MLflow "
        "model (runs:/<id>/model, models:/<name>/<version>); empty: random init (docs/finetune.md)",
    )
    teachers: tuple[str, ...] = _f((), "teachers of the dataset to distil from; empty: all the manifest lists")
    teacher_scales: tuple[float, ...] = _f(
        (),
        "a_k, each teacher's inverse temperature in the distillation targets, one per teacher in train.teachers order "
        "(the manifest's order when that is empty); empty: the logit_scale each teacher has in the manifest",
    )
    num_syn_captions: int = _f(
        0, "draw each sample's synthetic caption from the first n of the dataset's S; 0: all S (needs S >= n)"
    )
    syn_caption_sets: tuple[str, ...] = _f(
        (),
        "caption sets the synthetic captions are drawn from, their captions concatenated in this order ('default': the "
        "base shards' own; others added by reinforce.add = 'captions'); empty: every set the manifest lists",
    )
    seed: int = _f(0, "seed of initialisation and of the per-epoch view/caption draws")
    precision: Precision = _f("auto", "auto (bf16 autocast on GPU, fp32 on CPU), fp32 or bf16")
    grad_checkpointing: bool = _f(False, "activation checkpointing of the towers (less memory, more compute)")
    channels_last: bool = _f(
        False, "the student and its images in channels-last memory format (faster convolutions on GPUs: MCi towers)"
    )
    compile: bool = _f(False, "torch.compile the student's forward (its first steps pay the compile)")
    log_every: int = _f(10, "optimizer steps between metric logs")
    evaluate: bool = _f(False, "evaluate on the [evaluate] datasets during and after training")
    eval_every: int = _f(0, "samples seen between evaluations on the [evaluate] datasets; 0: only at the end")
    register: str = _f("", "registered model name for the final model; empty: log it without registering")
    dry_run: bool = _f(
        False, "check the config and print the plan (size, FLOPs, memory, hours); load no weight, train nothing"
    )
    schedule: TrainSchedule = _f(TrainSchedule(), "length, batches and the learning-rate curve")
    optimizer: TrainOptimizer = _f(TrainOptimizer(), "AdamW")
    loss: TrainLoss = _f(TrainLoss(), "the distillation loss")
    finetune: TrainFinetune = _f(TrainFinetune(), "fine-tuning: tower locks, layer-wise lr decay, EMA, WiSE-FT")
    checkpoint: TrainCheckpoint = _f(TrainCheckpoint(), "checkpoint cadence")
    resources: TrainResources = _f(TrainResources(), "workers, devices and the replay loader")
    cost: TrainCost = _f(TrainCost(), "what the dry run's accelerator-hours assume")


# Keys that moved, old -> new (dotted from the top of `Config`). Loading refuses an old key and names the new one;
# `upgrade` moves them in settings stored before the move (a training run's recipe), so those runs still resume.
MOVED: dict[str, str] = {
    **{f"train.{k}": f"train.schedule.{k}" for k in ("samples", "batch_size", "accum_steps", "warmup_samples")},
    "train.min_lr": "train.schedule.min_lr",
    **{f"train.{k}": f"train.optimizer.{k}" for k in ("lr", "beta1", "beta2", "eps", "weight_decay", "grad_clip")},
    **{
        f"train.{k}": f"train.loss.{k}"
        for k in ("kd_weight", "use_syn_captions", "caption_loss_weight", "local_loss", "max_logit_scale")
    },
    "train.checkpoint_every": "train.checkpoint.every",
    "train.keep_checkpoints": "train.checkpoint.keep",
}


# evaluate.wise_alpha / export.wise_alpha when WiSE-FT is off: the model as named.
WISE_OFF = -1.0
_WISE_ALPHA_HELP = (
    "WiSE-FT of a fine-tuned model: start + alpha x (fine-tuned - start) in [0, 1], the start being what its training "
    "run recorded (train.pretrained) and the fine-tuned weights its checkpoint's, before the run's own "
    "train.finetune.wise_alpha (docs/finetune.md); -1: the model as named"
)


@dataclass(frozen=True)
class EvaluateConfig:
    """Zero-shot classification and image-text retrieval (`clipdr evaluate`, and evaluation during training).

    Datasets are in clip_benchmark's webdataset layout, so real benchmarks exported that way plug in unchanged;
    the synthetic world's ``zeroshot`` and ``retrieval`` folders are in it too. Metrics are fractions in [0, 1].
    """

    zeroshot: tuple[str, ...] = _f(
        (),
        "zero-shot classification datasets: a clip_benchmark task folder (classnames.txt, "
        "zeroshot_classification_templates.txt, test/*.tar of image + cls) or a folder of them (the world's "
        "zeroshot/); path or s3://",
    )
    retrieval: tuple[str, ...] = _f(
        (),
        "image-text retrieval datasets: a folder of webdataset tars of image + txt (one caption a line) or "
        "json captions, clip_benchmark's <name>/test/*.tar included (the world's retrieval/); path or s3://",
    )
    suite: str = _f(
        "",
        "task suite file (TOML: clip_benchmark datasets with their roots and the metric each adds): its datasets are "
        "evaluated too and the mean of their metrics is logged as suite/<name>/mean; see clipdr.evaluate.suite",
    )
    tasks: tuple[str, ...] = _f((), "evaluate only these datasets (zero-shot task or retrieval names); empty: all")
    batch_size: int = _f(256, "images or texts per forward pass")
    max_samples: int = _f(
        0, "evaluate a seeded subset of this many samples of each dataset, stratified by class (zero-shot); 0: all"
    )
    seed: int = _f(0, "seed of the max_samples subset")
    model: str = _f(
        "",
        "model to evaluate: runs:/<run id>/model, models:/<name>@<alias>, models:/<name>/<version>, a training "
        "checkpoint folder (model.pt + meta.json), or an open_clip model name",
    )
    pretrained: str = _f("", "with an open_clip name: pretrained tag, hf-hub id or local file; empty: random init")
    wise_alpha: float = _f(WISE_OFF, _WISE_ALPHA_HELP + "; metrics are then logged as wise_ft/alpha_<a>/<metric>")
    allow_pickle: bool = _f(
        False,
        "also load an MLflow model logged as a pickle (before clipdr logged safetensors): unpickling runs any code "
        "it holds, so only for a tracking server you trust",
    )
    run_id: str = _f("", "MLflow run to log to; empty: the model's training run when known, else a new run")
    experiment: str = _f("clipdr-train", "MLflow experiment of new evaluation runs (beside training runs, to compare)")
    step: int = _f(-1, "metric step; -1: the model's samples seen (training's eval step), else the run's last step")
    device: Device = _f("auto", "auto (cuda when available), cuda or cpu; bf16 autocast on cuda")


@dataclass(frozen=True)
class ExportConfig:
    """Export of a trained model: open_clip-loadable weights, the fused (re-parameterised) model, ONNX encoders."""

    model: str = _f("", "model to export: same forms as evaluate.model")
    pretrained: str = _f("", "with an open_clip name: pretrained tag, hf-hub id or local file; empty: random init")
    wise_alpha: float = _f(WISE_OFF, _WISE_ALPHA_HELP)
    allow_pickle: bool = _f(False, "as evaluate.allow_pickle: also load an MLflow model logged as a pickle")
    output: str = _f("export", "folder the export is written to, path or s3://")
    onnx: bool = _f(
        True,
        "also export ONNX image and text encoders (of the fused model; fp32, fp16, int8), checked with onnxruntime",
    )
    onnx_exporter: OnnxExporter = _f(
        "dynamo", "torch.onnx exporter: dynamo (torch.export based) or torchscript (legacy)"
    )
    coreml: bool = _f(
        False,
        "also export Core ML image and text encoders (image_encoder.mlpackage, text_encoder.mlpackage; of the fused "
        "model, fp16 compute): needs the extra clipdr[coreml] (coremltools)",
    )
    tolerance: float = _f(1e-4, "largest abs difference of embeddings allowed between exported and trained model")
    log_artifacts: bool = _f(True, "also log the export folder to the model's MLflow run, when it has one")


@dataclass(frozen=True)
class LifecycleConfig:
    """Model lifecycle in the MLflow registry: alias `candidate`, promoted to `champion` by an evaluation gate."""

    model: str = _f("", "registered model name")
    version: int = _f(0, "version to gate (it becomes the candidate); 0: the version with alias candidate")
    metric: str = _f("zeroshot/mean_top1", "evaluation metric that decides (higher is better), read from each run")
    min_delta: float = _f(0.0, "the candidate must beat the champion by more than this")


@dataclass(frozen=True)
class ServeConfig:
    """`clipdr serve`: a Ray Serve deployment of a registered model's alias, with image and text endpoints."""

    model: str = _f("", "registered model name; the version its alias points at when the server starts is served")
    alias: str = _f("champion", "registry alias whose version is served")
    host: str = _f("127.0.0.1", "address the HTTP proxy listens on (0.0.0.0: every interface)")
    port: int = _f(8000, "port the HTTP proxy listens on")
    replicas: int = _f(1, "replicas of the model, each an actor holding one copy")
    cpus_per_replica: float = _f(1.0, "CPUs reserved per replica (also its torch threads)")
    max_ongoing_requests: int = _f(8, "requests a replica works on at once; more wait in the proxy's queue")
    max_items: int = _f(64, "most images or texts in one request (more: HTTP 413)")
    max_body_mb: float = _f(32.0, "largest request body in MiB (larger: HTTP 413)")


@dataclass(frozen=True)
class DemoConfig:
    """The one-command demo on the embedded default: the paper in miniature.

    [synth] makes the world; each of [reinforce]'s teachers (its `model`) and its captioner are first trained
    here with plain CLIP (the captioner with its caption loss) on the clean teacher corpus; [reinforce] then
    reinforces the noisy student corpus with them; the [train] student is trained once per mode in `modes` and
    seed of [study] `seeds` (a study: `clipdr.study`), on the same data for the same samples seen, evaluated on
    [evaluate] every train.eval_every samples.
    """

    output: str = _f("data/demo", "where runs (<output>/runs) and the report (<output>/report) go")
    experiment: str = _f("clipdr-demo", "MLflow experiment of all the demo's runs")
    teacher_samples: int = _f(60_000, "samples seen by each teacher")
    teacher_batch_size: int = _f(128, "teachers' global batch size")
    teacher_lr: float = _f(2e-3, "teachers' peak learning rate")
    captioner_samples: int = _f(30_000, "samples seen by the captioner")
    captioner_batch_size: int = _f(64, "captioner's global batch size")
    captioner_lr: float = _f(2e-3, "captioner's peak learning rate")
    modes: tuple[TrainMode, ...] = _f(("clip", "reinforced"), "student training modes compared, at equal samples seen")
    parallel_jobs: int = _f(
        2, "training jobs run at once (the teachers and captioner; the students): Ray Train start-up overlaps"
    )
    metric: str = _f("zeroshot/mean_top1", "the headline metric of the comparison, and of the promotion gate")
    registered_model: str = _f(
        "clipdr-demo-student",
        "registry name of the students of the first seed (each version candidate, gated to champion); empty: none",
    )


@dataclass(frozen=True)
class StudyConfig:
    """A pilot study (`clipdr study`): does reinforcement pay on this data, and by how much?

    The [train] student is trained once per mode and seed on train.data for train.schedule.samples samples (the
    same training path as `clipdr train`; fewer samples for a quicker pilot), each run a nested MLflow child of
    one parent run that holds the report: per-mode means of the metrics with bootstrap intervals over evaluation
    samples and seeds, the gain of each mode over the first, the samples-to-match ratio, learning curves with bands.
    """

    name: str = _f("study", "the parent MLflow run's name and its runs' prefix: <name>-<mode>[-seed<s>]")
    output: str = _f("study", "where the report goes (<output>/<name>/), path")
    modes: tuple[TrainMode, ...] = _f(("clip", "reinforced"), "modes compared; the first is the baseline")
    seeds: tuple[int, ...] = _f((0, 1, 2), "train.seed of each mode's runs")
    metric: str = _f(
        "zeroshot/mean_top1",
        "the headline metric (higher is better): a mean over evaluation samples (a task's top1/top5, a recall, "
        "zeroshot/mean_top1, retrieval/mean_recall)",
    )
    parallel_jobs: int = _f(1, "training runs at once (threads of the study's process)")
    bootstrap_resamples: int = _f(2000, "bootstrap resamples of the intervals")
    bootstrap_seed: int = _f(0, "seed of the bootstrap draws")
    confidence: float = _f(0.95, "confidence level of the intervals")


@dataclass(frozen=True)
class SweepConfig:
    """A hyper-parameter sweep (`clipdr sweep`): Ray Tune trials of the [train] run over any config keys.

    Each trial trains the [train] config with its values through the same path as `clipdr train`, as a nested
    MLflow child of one parent run that holds the summary table and a plot of the metric against each key.
    """

    name: str = _f("sweep", "the parent MLflow run's name and its trials' prefix: <name>-<digest of the values>")
    output: str = _f("sweep", "where the summary and Ray Tune's state go (<output>/<name>/), path")
    params: tuple[str, ...] = _f(
        (), "swept keys, each key=[values] in TOML, e.g. train.optimizer.lr=[1e-3, 2e-3], train.loss.kd_weight=[0.5, 1]"
    )
    search: Literal["grid", "random"] = _f(
        "grid", "grid: every combination of the values; random: num_samples different combinations drawn at random"
    )
    num_samples: int = _f(4, "trials of a random search (at most the number of combinations)")
    metric: str = _f(
        "zeroshot/mean_top1", "the metric each trial reports: its run's last value (evaluation needs train.evaluate)"
    )
    goal: Literal["max", "min"] = _f("max", "whether the best trial has the highest or the lowest metric")
    parallel_trials: int = _f(1, "trials at once (each its own Ray Train job)")
    seed: int = _f(0, "seed of a random search's draws")


@dataclass(frozen=True)
class TrackingConfig:
    """Where runs are recorded (MLflow). MLFLOW_TRACKING_URI in the environment wins."""

    uri: str = _f("", "MLflow tracking URI; empty: sqlite file mlflow.db in the working directory")
    parent_run_id: str = _f(
        "", "MLflow run a new job run is nested under (tag mlflow.parentRunId; studies and sweeps set it); empty: none"
    )
    outage_limit_s: float = _f(
        600.0,
        "how long training keeps its metrics while the tracking server does not answer, sending them once it does; "
        "a longer outage fails the job with the server's error",
    )


@dataclass(frozen=True)
class Config:
    """A whole run. Jobs read the sections they need."""

    synth: SynthConfig = _f(SynthConfig(), "the synthetic world")
    augment: AugmentConfig = _f(AugmentConfig(), "the stored augmentations")
    reinforce: ReinforceConfig = _f(ReinforceConfig(), "the reinforcement job")
    datacompdr: DataCompDRConfig = _f(DataCompDRConfig(), "DataCompDR import")
    train: TrainConfig = _f(TrainConfig(), "training a student")
    demo: DemoConfig = _f(DemoConfig(), "the one-command demo")
    study: StudyConfig = _f(StudyConfig(), "a pilot study: modes x seeds with bootstrap intervals")
    sweep: SweepConfig = _f(SweepConfig(), "a hyper-parameter sweep with Ray Tune")
    evaluate: EvaluateConfig = _f(EvaluateConfig(), "zero-shot classification and retrieval evaluation")
    export: ExportConfig = _f(ExportConfig(), "exporting a model (open_clip weights, fused model, ONNX)")
    lifecycle: LifecycleConfig = _f(LifecycleConfig(), "registry aliases and the promotion gate")
    serve: ServeConfig = _f(ServeConfig(), "serving a registered model over HTTP (Ray Serve)")
    tracking: TrackingConfig = _f(TrackingConfig(), "experiment tracking")


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Checks ``value`` against the annotation ``tp``; returns it in the dataclass' own form."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def fail(expected: str) -> typing.NoReturn:
        raise ConfigError(f"{key}: expected {expected}, got {type(value).__name__} {value!r} ({where})")

    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail(f"a table of {tp.__name__} keys")
        return _build(tp, value, key, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as e:
                errors.append(str(e))
        fail(" or ".join(_type_name(a) for a in args))
    if origin is typing.Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            fail(f"one of {', '.join(map(repr, args))}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            fail(f"a list ({_type_name(tp)})")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value))
        if len(value) != len(args):
            fail(f"a list of {len(args)} items")
        return tuple(_coerce(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            fail("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    raise TypeError(f"{key}: unsupported config annotation {tp!r}")  # an internal bug, not a user error


def _build(cls: type, table: dict[str, Any], prefix: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in table.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in allowed:
            if key in MOVED:
                section, _, leaf = MOVED[key].rpartition(".")
                raise ConfigError(
                    f"config key {key!r} ({where}) has moved: it is now {MOVED[key]!r} ({leaf} in [{section}])"
                )
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r} ({where}){hint}; allowed: {', '.join(allowed)}")
        kwargs[name] = _coerce(value, hints[name], key, where)
    return cls(**kwargs)


def _merge(base: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = base
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parses ``section.key=value``; the value is read as TOML, or taken as a bare string."""
    dotted, sep, raw = text.partition("=")
    dotted = dotted.strip()
    if not sep or not dotted or any(not part for part in dotted.split(".")):
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return dotted, value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Reads a TOML run file (or the defaults when ``path`` is None) and applies ``--set`` overrides."""
    table: dict[str, Any] = {}
    if path is not None:
        try:
            table = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    where = f"in {path}" if path is not None else "defaults"
    _build(Config, table, "", where)  # so that a bad file key is reported against the file
    for text in overrides:
        dotted, value = parse_override(text)
        single: dict[str, Any] = {}
        _merge(single, dotted, value)
        # Validate the override on its own so its error names --set, then apply it on top of the file.
        _build(Config, single, "", f"--set {text}")
        _merge(table, dotted, value)
    return _build(Config, table, "", where if not overrides else f"{where} + --set")


def _written(value: Any, f: dataclasses.Field) -> bool:
    return not (f.metadata.get(OMIT_DEFAULT) and getattr(value, f.name) == f.default)


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain TOML/JSON-able data (tuples become lists; `OMIT_DEFAULT` keys only when set)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if _written(value, f)}
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return plain(config)


def fields_dict(value: Any) -> dict[str, Any]:
    """A flat dataclass's fields by name, values as they are (as ``dataclasses.asdict`` gives them, tuples kept),
    without `OMIT_DEFAULT` keys at their defaults."""
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if _written(value, f)}


def from_dict(cls: type, data: dict[str, Any], where: str = "stored config") -> Any:
    """Rebuilds a config dataclass from `to_dict` output, with the same strict checks."""
    return _build(cls, data, "", where)


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """Settings stored before keys moved (nested dicts from the top of `Config`, like `to_dict`'s), with every
    `MOVED` key at its new place; a copy, what is current is left as it is."""

    def copy(node: Any) -> Any:
        return {k: copy(v) for k, v in node.items()} if isinstance(node, dict) else node

    out = copy(data)
    for old, new in MOVED.items():
        *parents, leaf = old.split(".")
        node = out
        for part in parents:
            node = node.get(part)
            if not isinstance(node, dict):
                break
        else:
            if leaf in node:
                value = node.pop(leaf)
                *new_parents, new_leaf = new.split(".")
                target = out
                for part in new_parents:
                    target = target.setdefault(part, {})
                assert new_leaf not in target, f"{old} and {new} are both set"
                target[new_leaf] = value
    return out


def replace(config: Any, changes: typing.Mapping[str, Any]) -> Any:
    """``config`` (a config dataclass) with ``changes`` applied, keyed by dotted paths below it
    (``replace(cfg.train, {"mode": "clip", "loss.kd_weight": 0.0})``); the sections on the way are copied."""
    own: dict[str, Any] = {}
    below: dict[str, dict[str, Any]] = {}
    for dotted, value in changes.items():
        name, _, rest = dotted.partition(".")
        if rest:
            below.setdefault(name, {})[rest] = value
        else:
            own[name] = value
    for name, sub in below.items():
        own[name] = replace(own.get(name, getattr(config, name)), sub)
    return dataclasses.replace(config, **own)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"section.key": value}`` for every leaf of a config (or a nested dict), as trackers want params."""
    if dataclasses.is_dataclass(data):
        data = to_dict(data)
    flat: dict[str, Any] = {}
    for name, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(dotted key, default, help)`` for every leaf of a config dataclass, for ``--help``."""
    rows = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            rows.extend(describe(type(default), f"{key}."))
        else:
            shown = to_dict(default) if isinstance(default, tuple) else default
            rows.append((key, repr(shown) if isinstance(shown, str) else str(shown), f.metadata.get("help", "")))
    return rows
