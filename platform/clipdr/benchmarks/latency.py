"""Image- and text-encoder latency of every variant, re-parameterised and not, against a ViT-B/16 CLIP.

Timings are medians over ``iters`` calls after ``warmup`` calls, in inference mode, on random images at each
model's native resolution and real tokenized captions. The reference model (open_clip ``ViT-B-16``) is timed
at the start and at the end of the run; ratios use the mean of both, and the drift between the two shows how
much the machine's speed moved during the run.

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
        warmup: Untimed calls before timing.
        iters: Timed calls; the median is reported.
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
    """Median latencies (ms) of one model at one batch size."""

    model: str
    reparameterized: bool
    batch_size: int
    image_ms: float
    text_ms: float


@dataclass
class LatencyReport:
    """All rows of a run, plus the reference model's rows from the start and the end of the run."""

    cfg: LatencyCfg
    rows: list[LatencyRow] = field(default_factory=list)
    reference_start: list[LatencyRow] = field(default_factory=list)
    reference_end: list[LatencyRow] = field(default_factory=list)
    wall_s: float = 0.0

    def reference_ms(self, batch_size: int) -> tuple[float, float]:
        """(image, text) reference latency at ``batch_size``: the mean of the start and end measurements."""
        both = [r for r in self.reference_start + self.reference_end if r.batch_size == batch_size]
        return statistics.mean(r.image_ms for r in both), statistics.mean(r.text_ms for r in both)

    def drift(self) -> float:
        """Largest relative change of a reference timing between the start and the end of the run."""
        pairs = zip(self.reference_start, self.reference_end, strict=True)
        return max(abs(b.image_ms / a.image_ms - 1) for a, b in pairs) if self.reference_end else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(
    fn: Callable[[], object], warmup: int, iters: int, device: torch.device, clock: Callable[[], float]
) -> float:
    """Median time of ``fn()`` in milliseconds, read from ``clock`` (seconds)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        start = clock()
        fn()
        _sync(device)  # a CUDA launch returns before the kernels finish
        times.append((clock() - start) * 1e3)
    return statistics.median(times)


def time_model(
    name: str, model: torch.nn.Module, reparameterized: bool, cfg: LatencyCfg, device: torch.device
) -> list[LatencyRow]:
    """Times ``model``'s image and text encoders at every batch size of ``cfg``."""
    clock = time.process_time if cfg.resolved_clock == "cpu" else time.perf_counter
    size = models.image_size(name)
    tokenizer = models.get_tokenizer(name)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch_size in cfg.batch_sizes:
        images = torch.rand(batch_size, 3, size, size, generator=generator).to(device)
        text = tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)]).to(device)
        with torch.inference_mode():
            image_ms = median_ms(lambda: model.encode_image(images), cfg.warmup, cfg.iters, device, clock)  # noqa: B023
            text_ms = median_ms(lambda: model.encode_text(text), cfg.warmup, cfg.iters, device, clock)  # noqa: B023
        rows.append(LatencyRow(name, reparameterized, batch_size, image_ms, text_ms))
    return rows


def _time_variant(name: str, cfg: LatencyCfg, device: torch.device, fuse: bool) -> list[LatencyRow]:
    model = models.create_model(name, pretrained=None, device=device).eval()
    rows = time_model(name, model, False, cfg, device)
    if fuse:
        model = models.reparameterize(model, inplace=True)  # in place: no second copy of S4 / L-14 in memory
        rows += time_model(name, model, True, cfg, device)
    del model
    gc.collect()
    return rows


def run(cfg: LatencyCfg, progress: Callable[[str], None] = print) -> LatencyReport:
    """Times every variant of ``cfg`` and the reference; writes ``cfg.output`` if set."""
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is visible")
    torch.set_num_threads(cfg.num_threads)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns "initialized randomly" for every model
    start = time.perf_counter()
    report = LatencyReport(cfg)
    progress(f"reference {cfg.reference} (start)")
    report.reference_start = _time_variant(cfg.reference, cfg, device, fuse=False)
    for i, name in enumerate(cfg.variant_names, 1):
        progress(f"[{i}/{len(cfg.variant_names)}] {name}")
        report.rows += _time_variant(name, cfg, device, fuse=True)
    progress(f"reference {cfg.reference} (end)")
    report.reference_end = _time_variant(cfg.reference, cfg, device, fuse=False)
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
        f"Device: {_machine(cfg)}; torch {torch.__version__}; {cfg.resolved_clock} clock, median of {cfg.iters} "
        f"calls after {cfg.warmup} warm-up calls; fp32; random weights; run took {report.wall_s:.0f} s; reference "
        f"drift between start and end of the run {report.drift():.0%}.",
        "",
        f"| model | fused | batch | image ms | text ms | image / {ref} | text / {ref} | iPhone 12 Pro Max ms (paper) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for batch_size in cfg.batch_sizes:
        ref_image, ref_text = report.reference_ms(batch_size)
        lines.append(f"| {ref} (reference) | - | {batch_size} | {ref_image:.1f} | {ref_text:.1f} | 1.00 | 1.00 | |")
    for row in sorted(report.rows, key=lambda r: (r.batch_size, cfg.variant_names.index(r.model), r.reparameterized)):
        ref_image, ref_text = report.reference_ms(row.batch_size)
        paper = models.get_variant(row.model).paper_iphone_ms
        paper_cell = f"{paper[0]} + {paper[1]}" if paper and row.batch_size == 1 else ""
        lines.append(
            f"| {row.model} | {'yes' if row.reparameterized else 'no'} | {row.batch_size} | {row.image_ms:.1f} | "
            f"{row.text_ms:.1f} | {row.image_ms / ref_image:.2f} | {row.text_ms / ref_text:.2f} | {paper_cell} |"
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
    parser.add_argument("--warmup", type=int, default=default.warmup, help="untimed calls (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=default.iters, help="timed calls (default: %(default)s)")
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
