"""Benchmarks by name: ``python jobs/benchmark.py NAME [options]`` or ``clipdr bench NAME [options]``.

Each benchmark is a module with ``add_arguments(parser)`` and ``main(args) -> int``. It is imported only when
chosen, so listing benchmarks (and ``clipdr --help``) does not import torch. All of them measure through
`timing`: warm-up, interleaved rounds, medians with their range, ratios paired by round.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module, one-line summary).
BENCHMARKS: dict[str, tuple[str, str]] = {
    "captioner": ("clipdr.benchmarks.captioner", "KV-cached caption generation against the uncached loop: FLOPs, time"),
    "latency": ("clipdr.benchmarks.latency", "image/text encoder latency of every variant, fused and not"),
    "reinforce": ("clipdr.benchmarks.reinforce", "reinforcement pipeline cost against the work it cannot skip"),
    "gpu_check": (
        "clipdr.benchmarks.gpu_check",
        "the reinforcement job at real sizes on a CUDA device (jobs/gpu_check.sh)",
    ),
    "finetune": (
        "clipdr.benchmarks.finetune",
        "forgetting guard: fine-tune on a held-out shape; full, LiT, EMA, layer decay, WiSE-FT zero-shot",
    ),
    "quantized": (
        "clipdr.benchmarks.quantized",
        "ONNX encoders fp32 vs fp16 vs int8: accuracy delta on evaluation sets, file size, CPU latency",
    ),
    "serve": (
        "clipdr.benchmarks.serve",
        "load test of `clipdr serve` on 127.0.0.1: requests/s, p50/p99 latency, no failures, 4xx for malformed",
    ),
    "train": ("clipdr.benchmarks.train", "train step cost of reinforced / clip / online_distill, loader vs trainer"),
}


def _listing() -> str:
    return "\n".join(f"  {name:<10} {summary}" for name, (_, summary) in BENCHMARKS.items())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``NAME [options...]`` to a parser that dispatches to ``main`` (the ``clipdr bench`` stage)."""
    parser.add_argument("benchmark", metavar="NAME", help=f"one of: {', '.join(BENCHMARKS)}")
    parser.add_argument(
        "benchmark_args", nargs=argparse.REMAINDER, metavar="...", help="the benchmark's options (NAME --help)"
    )


def main(argv: Sequence[str] | None = None, prog: str = "benchmark") -> int:
    """Runs the benchmark named by ``argv[0]`` with the remaining arguments.

    Args:
        argv: ``[NAME, *options]``; defaults to ``sys.argv[1:]``.
        prog: Program name shown in usage messages.

    Returns:
        The process exit code (2 for an unknown benchmark or bad options).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHMARKS:
        problem = f"unknown benchmark {argv[0]!r}" if argv and not argv[0].startswith("-") else "no benchmark named"
        print(f"usage: {prog} NAME [options]\n{prog}: {problem}; benchmarks:\n{_listing()}", file=sys.stderr)
        return 2
    name = argv[0]
    module_name, summary = BENCHMARKS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"{prog} {name}", description=module.__doc__ or summary)
    module.add_arguments(parser)
    return module.main(parser.parse_args(argv[1:]))
