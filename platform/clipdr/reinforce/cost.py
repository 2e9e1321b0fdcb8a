"""What a reinforcement costs an accelerator: FLOPs a sample, the floor in accelerator-hours, the projected hours.

The dry run (`reinforce.dry_run`) prints this without loading a weight. Per sample, each teacher encodes K views
and 1 + S texts (the real caption and the synthetic ones); the captioner encodes the image once and writes S
captions of at most ``max_len`` tokens with a KV cache (`clipdr.models.flops` says what is counted). The floor is
the FLOPs of the whole dataset over a device's dense bf16 peak; the projection divides it by an efficiency (MFU),
either measured by the GPU check (`Measurement`, the file `jobs/gpu_check.sh` writes) or assumed
(``reinforce.cost.mfu``). Every printed efficiency says which.

This module owns the GPU check's result file (`Measurement`: its name and fields); the check writes it through
`Measurement.write`, the dry run reads it through `Measurement.read`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from clipdr.accelerators import PEAK_TFLOPS, AcceleratorError, peak_flops
from clipdr.config import Config

RESULT_NAME = "gpu_check.json"  # the GPU check's result file, in its output directory


class CostError(AcceleratorError):
    """A projection setting that cannot be used (an MFU out of range, an unreadable result file); an unknown device
    is its base, `AcceleratorError`."""


@dataclass(frozen=True)
class Measurement:
    """What the GPU check measured (its result file). ``mfu`` is achieved FLOP/s over ``device``'s peak."""

    device: str  # a PEAK_TFLOPS key
    device_name: str  # as CUDA reports it
    mfu: float | None  # None: a CPU smoke run (no peak to compare with)
    views_per_s: float
    samples_per_s: float
    busy_fraction: float | None  # of the GPU over the measured window (nvidia-smi utilization.gpu); None: unread
    flops_per_sample: float
    num_samples: int
    measured_at: str
    config: str  # what ran: teachers, captioner, K, S, batch size

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / RESULT_NAME
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, path: str | Path) -> Measurement:
        file = Path(path)
        if file.is_dir():
            file = file / RESULT_NAME
        try:
            data = json.loads(file.read_text())
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CostError(
                f"reinforce.cost.measured: cannot read a GPU check result from {str(path)!r}: {e}"
            ) from None


@dataclass(frozen=True)
class Part:
    """FLOPs a sample of one model of the job, and how they add up."""

    name: str
    flops: int
    detail: str


@dataclass(frozen=True)
class Estimate:
    """The dry run's cost figures."""

    parts: tuple[Part, ...]
    notes: tuple[str, ...]
    num_samples: int | None
    samples_from: str
    device: str
    mfu: float
    mfu_from: str  # "measured (...)" or "assumed (reinforce.cost.mfu)"

    @property
    def flops_per_sample(self) -> int:
        return sum(p.flops for p in self.parts)

    @property
    def total_flops(self) -> float | None:
        return None if self.num_samples is None else float(self.flops_per_sample) * self.num_samples

    @property
    def floor_hours(self) -> float | None:
        total = self.total_flops
        return None if total is None else total / peak_flops(self.device) / 3600

    @property
    def projected_hours(self) -> float | None:
        floor = self.floor_hours
        return None if floor is None else floor / self.mfu

    def describe(self) -> str:
        lines = [f"flops         {p.name}: {p.flops / 1e9:,.1f} GFLOP a sample ({p.detail})" for p in self.parts] + [
            f"flops         total: {self.flops_per_sample / 1e9:,.1f} GFLOP a sample"
        ]
        if self.num_samples is None:
            lines.append(f"hours         no sample count ({self.samples_from}): set reinforce.cost.samples=N")
        else:
            peak = PEAK_TFLOPS[self.device.lower()]
            lines += [
                f"dataset       {self.num_samples:,} samples ({self.samples_from}): {self.total_flops:.4g} FLOP ("
                + ", ".join(f"{p.name} {p.flops * self.num_samples:.4g}" for p in self.parts)
                + ")",
                f"floor         {self.floor_hours:,.1f} {self.device}-hours at its dense bf16 peak of {peak:g} TFLOP/s",
                f"projected     {self.projected_hours:,.1f} {self.device}-hours at MFU {self.mfu:.2f}, {self.mfu_from}",
            ]
        return "\n".join(lines + [f"note          {n}" for n in self.notes])


def _count_source_samples(source: str) -> int | None:
    """Rows of a source made of Parquet shards (footers only); None when it holds tars (counting means reading)."""
    import pyarrow.parquet as pq

    from clipdr import storage
    from clipdr.data import sources

    shards = sources.list_shards(source)
    if not shards or not all(uri.endswith(".parquet") for uri in shards):
        return None
    total = 0
    for uri in shards:
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def estimate(config: Config, source_readable: bool = True) -> Estimate:
    """The cost figures of a reinforcement config; reads configs (and, when readable, Parquet source footers) only.

    Args:
        config: The run config; ``reinforce.cost`` says what the projection assumes.
        source_readable: Whether the source may be listed (a dry run leaves object storage alone).
    """
    from clipdr.models import flops

    cfg = config.reinforce
    k, s = cfg.num_augmentations, cfg.num_syn_captions
    parts, notes = [], []
    for teacher in cfg.teachers:
        if teacher.model.startswith("hf-hub:"):
            notes.append(f"teacher {teacher.name}: {teacher.model} keeps its config on the hub; not counted")
            continue
        count = flops.clip_flops(teacher.model)
        parts.append(
            Part(
                f"teacher {teacher.name}",
                k * count.image + (1 + s) * count.text,
                f"{k} views x {count.image / 1e9:.2f} at {count.image_size}px + {1 + s} texts x "
                f"{count.text / 1e9:.2f}, {count.how}",
            )
        )
    captioner = cfg.captioner
    if s == 0:
        notes.append("no captioner: S = 0, an embeddings-only pass")
    elif captioner.kind == "coca" and not captioner.model.startswith("hf-hub:"):
        image = flops.coca_image_flops(captioner.model)
        image_kv = flops.coca_image_kv_flops(captioner.model)
        caption = flops.coca_caption_flops(captioner.model, captioner.max_len)
        parts.append(
            Part(
                f"captioner {captioner.model}",
                image + image_kv + s * caption,
                f"image {image / 1e9:.2f} + its cross-attention keys/values {image_kv / 1e9:.2f} + {s} captions x "
                f"{caption / 1e9:.2f} ({captioner.max_len} tokens, KV cache)",
            )
        )
    else:
        notes.append(f"captioner {captioner.kind} {captioner.model}: not counted")

    counted = _count_source_samples(cfg.source) if source_readable else None
    if counted is not None:
        num_samples, samples_from = counted, "counted: the source's Parquet footers"
    elif cfg.cost.samples > 0:
        num_samples, samples_from = cfg.cost.samples, "assumed: reinforce.cost.samples"
    else:
        num_samples, samples_from = None, "the source's samples cannot be counted without reading it"

    peak_flops(cfg.cost.device)  # refuse an unknown device before anything is printed
    if cfg.cost.measured:
        measured = Measurement.read(cfg.cost.measured)
        if measured.mfu is None:
            raise CostError(f"reinforce.cost.measured: {cfg.cost.measured!r} holds no MFU (a CPU smoke run)")
        mfu = measured.mfu
        mfu_from = f"measured by the GPU check on {measured.device_name} ({measured.measured_at}; {measured.config})"
        if measured.device != cfg.cost.device.lower():
            notes.append(f"the MFU was measured on {measured.device}, the floor is for {cfg.cost.device}")
    else:
        mfu, mfu_from = cfg.cost.mfu, "assumed (reinforce.cost.mfu)"
    if not 0 < mfu <= 1:
        raise CostError(f"MFU must be in (0, 1], got {mfu} ({mfu_from})")
    return Estimate(tuple(parts), tuple(notes), num_samples, samples_from, cfg.cost.device, mfu, mfu_from)
