"""Image- and text-encoder latency of every variant, re-parameterised and not, against a ViT-B/16 CLIP.

Each variant is compared with the reference model (open_clip ``ViT-B-16``, built once and kept) in rounds
(`timing.run_rounds`): after ``warmup`` rounds, each of ``iters`` rounds calls every encoder once (reference,
variant, fused variant; image and text towers; every batch size) in a rotated order, in inference mode, on random
images at each model's native resolution and real tokenized captions. Latencies are medians over rounds; a ratio
"image / ViT-B-16" is the variant's call divided by the reference's call in the same round, reported as the
median (min-max) over rounds, so a change in the machine's speed reaches both sides of it. The reference's own
medians differ between variants' rounds by the drift reported with the table.

On a CPU with one thread the default clock is the process's CPU time, not wall time: a core shared with other
jobs is time-sliced, and CPU time counts only the slices this process ran, so the numbers stay comparable while
neighbours come and go (wall-clock medians of identical towers varied 3x on the shared 2-core machine).
"""

from __future__ import annotations

import argparse
import gc
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from clipdr import models
from clipdr.benchmarks import timing

CAPTIONS = ("a photo of a small dog playing on the beach", "a red car parked next to a tall building at night")


@dataclass(frozen=True)
class LatencyCfg:
    """What to time.

    Attributes:
        variants: Variants to time; empty means every paper variant (``MobileCLIP`` and ``MobileCLIP2`` families).
        batch_sizes: Batch sizes to time.
        num_threads: CPU threads torch may use (fixed, so runs compare). One by default: on a small machine shared
            with other jobs, OpenMP teams of two or more stall whenever a neighbour holds a core, and one thread
            allows the CPU-time clock.
        warmup: Unmeasured rounds first.
        iters: Measured rounds (one call of every encoder each); medians over them are reported.
        reference: open_clip model every latency is divided by.
        device: ``cpu`` or ``cuda``.
        clock: ``wall``, ``cpu`` (process CPU time; one CPU thread only) or ``auto`` (``cpu`` for one CPU thread,
            ``wall`` otherwise).
        output: Markdown file to write the table to, if set.
    """

    variants: tuple[str, ...] = ()
    batch_sizes: tuple[int, ...] = (1, 8)
    num_threads: int = 1
    warmup: int = 2
    iters: int = 10
    reference: str = "ViT-B-16"
    device: str = "cpu"
    clock: str = "auto"
    output: str | None = None

    def __post_init__(self) -> None:
        for name in self.variants:
            models.get_variant(name)  # unknown names fail here, listing the valid ones
        if self.iters < 1 or self.warmup < 0 or not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError("need iters >= 1, warmup >= 0 and positive batch sizes")
        if self.clock not in CLOCKS:
            raise ValueError(f"unknown clock {self.clock!r}; valid clocks: {', '.join(CLOCKS)}")
        if self.clock == "cpu" and (self.device != "cpu" or self.num_threads != 1):
            raise ValueError("the cpu clock measures latency only on device cpu with one thread")

    @property
    def resolved_clock(self) -> str:
        if self.clock != "auto":
            return self.clock
        return "cpu" if self.device == "cpu" and self.num_threads == 1 else "wall"

    @property
    def variant_names(self) -> tuple[str, ...]:
        if self.variants:
            return self.variants
        return tuple(models.list_variants("MobileCLIP") + models.list_variants("MobileCLIP2"))


QUICK = {"batch_sizes": (1, 4), "warmup": 1, "iters": 3}
CLOCKS = ("auto", "wall", "cpu")


@dataclass(frozen=True)
class LatencyRow:
    """Median latencies (ms) of one model at one batch size, and its per-round ratios to the reference."""

    model: str
    reparameterized: bool
    batch_size: int
    image_ms: float
    text_ms: float
    image_ratio: timing.Summary
    text_ratio: timing.Summary


@dataclass
class LatencyReport:
    """All rows of a run, plus the reference's median latencies (ms) per variant whose rounds it ran in."""

    cfg: LatencyCfg
    rows: list[LatencyRow] = field(default_factory=list)
    reference: list[dict[tuple[str, int], float]] = field(default_factory=list)  # {(tower, batch): ms} a variant
    wall_s: float = 0.0

    def reference_ms(self, batch_size: int) -> tuple[float, float]:
        """(image, text) reference latency at ``batch_size``: the median over the whole run's variants."""
        return tuple(statistics.median(r[(tower, batch_size)] for r in self.reference) for tower in TOWERS)

    def drift(self) -> float:
        """Largest relative spread (max / min - 1) of a reference latency between variants' rounds."""
        spreads = [max(r[k] for r in self.reference) / min(r[k] for r in self.reference) - 1 for k in self.reference[0]]
        return max(spreads) if spreads else 0.0


TOWERS = ("image", "text")


def _encoders(name: str, model: torch.nn.Module, cfg: LatencyCfg, device: torch.device) -> dict:
    """``{(tower, batch_size): fn}``: one call of ``model``'s encoder on fixed inputs, in inference mode."""
    size = models.image_size(name)
    tokenizer = models.get_tokenizer(name)
    generator = torch.Generator().manual_seed(0)
    calls = {}
    for batch_size in cfg.batch_sizes:
        images = torch.rand(batch_size, 3, size, size, generator=generator).to(device)
        text = tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)]).to(device)
        for tower, encode, inputs in (("image", model.encode_image, images), ("text", model.encode_text, text)):

            def call(encode=encode, inputs=inputs) -> None:
                with torch.inference_mode():
                    encode(inputs)

            calls[(tower, batch_size)] = call
    return calls


def _time_variant(
    name: str, reference: dict, cfg: LatencyCfg, device: torch.device
) -> tuple[list[LatencyRow], dict[tuple[str, int], float]]:
    """Rounds of the reference's, the variant's and the fused variant's encoders; rows and the reference's ms."""
    model = models.create_model(name, pretrained=None, device=device).eval()
    fused = models.reparameterize(model)  # a copy: rounds alternate between the two
    clock = cfg.resolved_clock
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    roles = {"reference": reference, "unfused": _encoders(name, model, cfg, device)}
    roles["fused"] = _encoders(name, fused, cfg, device)
    things = {}
    for role, calls in roles.items():
        for (tower, batch_size), call in calls.items():
            things[f"{role} {tower} {batch_size}"] = timing.timed(call, cpu_clock=time.process_time, sync=sync)
    results = timing.run_rounds(things, cfg.iters, cfg.warmup)
    del model, fused
    gc.collect()

    def ms(key: str) -> float:
        return timing.per_item(results[key], clock).median * 1e3

    rows = []
    for reparameterized, role in ((False, "unfused"), (True, "fused")):
        for batch_size in cfg.batch_sizes:
            image, text = (f"{role} {tower} {batch_size}" for tower in TOWERS)
            ref_image, ref_text = (f"reference {tower} {batch_size}" for tower in TOWERS)
            rows.append(
                LatencyRow(
                    name,
                    reparameterized,
                    batch_size,
                    ms(image),
                    ms(text),
                    timing.ratio(results[image], results[ref_image], clock),
                    timing.ratio(results[text], results[ref_text], clock),
                )
            )
    return rows, {(tower, b): ms(f"reference {tower} {b}") for tower in TOWERS for b in cfg.batch_sizes}


def run(cfg: LatencyCfg, progress: Callable[[str], None] = print) -> LatencyReport:
    """Times every variant of ``cfg`` against the reference; writes ``cfg.output`` if set."""
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is visible")
    torch.set_num_threads(cfg.num_threads)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns "initialized randomly" for every model
    start = time.perf_counter()
    report = LatencyReport(cfg)
    reference_model = models.create_model(cfg.reference, pretrained=None, device=device).eval()
    reference = _encoders(cfg.reference, reference_model, cfg, device)
    for i, name in enumerate(cfg.variant_names, 1):
        progress(f"[{i}/{len(cfg.variant_names)}] {name} against {cfg.reference}")
        rows, reference_ms = _time_variant(name, reference, cfg, device)
        report.rows += rows
        report.reference.append(reference_ms)
    report.wall_s = time.perf_counter() - start
    if cfg.output:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).write_text(to_markdown(report))
    return report


def _machine(cfg: LatencyCfg) -> str:
    if cfg.device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(cfg.device))
    threads = f"{cfg.num_threads} thread{'s' if cfg.num_threads != 1 else ''}"
    return f"{platform.processor() or platform.machine()} CPU, {threads}"


def to_markdown(report: LatencyReport) -> str:
    """The report as a markdown table, one row per (variant, fused, batch), with the paper's iPhone numbers."""
    cfg = report.cfg
    ref = cfg.reference
    lines = [
        f"Device: {_machine(cfg)}; torch {torch.__version__}; {cfg.resolved_clock} clock; {cfg.iters} rounds after "
        f"{cfg.warmup} warm-up, each variant interleaved with the reference; ms: median over rounds; ratios: "
        f"median (min-max) of per-round ratios; fp32; random weights; run took {report.wall_s:.0f} s; reference "
        f"medians drift {report.drift():.0%} between variants.",
        "",
        f"| model | fused | batch | image ms | text ms | image / {ref} | text / {ref} | iPhone 12 Pro Max ms (paper) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for batch_size in cfg.batch_sizes:
        ref_image, ref_text = report.reference_ms(batch_size)
        lines.append(f"| {ref} (reference) | - | {batch_size} | {ref_image:.1f} | {ref_text:.1f} | 1.00 | 1.00 | |")
    for row in sorted(report.rows, key=lambda r: (r.batch_size, cfg.variant_names.index(r.model), r.reparameterized)):
        paper = models.get_variant(row.model).paper_iphone_ms
        paper_cell = f"{paper[0]} + {paper[1]}" if paper and row.batch_size == 1 else ""
        lines.append(
            f"| {row.model} | {'yes' if row.reparameterized else 'no'} | {row.batch_size} | {row.image_ms:.1f} | "
            f"{row.text_ms:.1f} | {row.image_ratio.format()} | {row.text_ratio.format()} | {paper_cell} |"
        )
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds this benchmark's options to ``parser``."""
    default = LatencyCfg()
    parser.add_argument(
        "--variants", nargs="+", default=[], metavar="NAME", help="variants to time (default: all paper variants)"
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=list(default.batch_sizes), metavar="N")
    parser.add_argument("--threads", type=int, default=default.num_threads, help="CPU threads (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=default.warmup, help="unmeasured rounds (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=default.iters, help="measured rounds (default: %(default)s)")
    parser.add_argument("--reference", default=default.reference, help="reference model (default: %(default)s)")
    parser.add_argument("--device", default=default.device, help="cpu or cuda (default: %(default)s)")
    parser.add_argument(
        "--clock", choices=CLOCKS, default=default.clock, help="cpu: process CPU time, one thread (default: auto)"
    )
    parser.add_argument("--output", metavar="PATH", help="also write the table as markdown to PATH")
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke-test settings: {', '.join(f'{k}={v}' for k, v in QUICK.items())}"
    )


def cfg_from_args(args: argparse.Namespace) -> LatencyCfg:
    """The config the parsed arguments describe (``--quick`` overrides batch sizes, warm-up and iterations)."""
    cfg = LatencyCfg(
        variants=tuple(args.variants),
        batch_sizes=tuple(args.batch_sizes),
        num_threads=args.threads,
        warmup=args.warmup,
        iters=args.iters,
        reference=args.reference,
        device=args.device,
        clock=args.clock,
        output=args.output,
    )
    return replace(cfg, **QUICK) if args.quick else cfg


def main(args: argparse.Namespace) -> int:
    """Runs the benchmark from parsed arguments and prints the table."""
    try:
        cfg = cfg_from_args(args)
    except ValueError as e:
        print(f"latency: {e}", file=sys.stderr)
        return 2
    report = run(cfg, progress=lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True))
    print(to_markdown(report))
    return 0


__all__ = ["LatencyCfg", "LatencyReport", "LatencyRow", "add_arguments", "cfg_from_args", "main", "run", "to_markdown"]
