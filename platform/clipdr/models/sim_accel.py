"""A simulated accelerator: a teacher model whose image forward costs a fixed wall time per view, spent off the CPU.

It stands in for a device so that the reinforcement pipeline's feeding can be measured without one: a forward over
B views sleeps ``B / views_per_s`` seconds (``time.sleep`` releases the GIL and uses no CPU, as a process waiting on
a GPU kernel does) and returns a fixed random projection of the views' pixels, cheap and deterministic. Text
embeddings are a fixed random projection of the token ids, with no sleep (a teacher's text pass is small next to K
image views).

Model names: ``clipdr-sim-accel-<size>`` (``size`` px square input, `DEFAULT_VIEWS_PER_S`) or
``clipdr-sim-accel-<size>@<views/s>``, e.g. ``clipdr-sim-accel-64@2000``. A name is a whole description, so no
config file is needed and the rate is part of the teacher's recorded model name.

Busy accounting: every model records the wall interval of each image forward in `SimAccel.busy`;
when the environment variable `TRACE_DIR_ENV` names a directory, each forward also appends ``start end views``
(``time.time()`` seconds) to a file of its own there, so a benchmark can read the intervals of models that ran in
Ray actors. `busy_fraction` turns intervals into time inside forward / wall time since the first forward began.

Shape suffixes: B views, C/H/W channels and pixels, L tokens, D embedding width.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

PREFIX = "clipdr-sim-accel-"
DEFAULT_VIEWS_PER_S = 1000.0
EMBED_DIM = 64
TRACE_DIR_ENV = "CLIPDR_SIM_ACCEL_TRACE_DIR"
_NAME = re.compile(rf"^{re.escape(PREFIX)}(\d+)(?:@(\d+(?:\.\d+)?))?$")
_POOL = 8  # views are average-pooled to at most 8 x 8 before the projection: the projection stays cheap


@dataclass(frozen=True)
class SimSpec:
    image_size: int
    views_per_s: float


def is_sim(model: str) -> bool:
    return model.startswith(PREFIX)


def parse(model: str) -> SimSpec:
    """The size and rate a ``clipdr-sim-accel-...`` model name describes; ValueError naming the format otherwise."""
    match = _NAME.match(model)
    size = int(match.group(1)) if match else 0
    rate = float(match.group(2)) if match and match.group(2) else DEFAULT_VIEWS_PER_S
    if not match or size < 1 or rate <= 0:
        raise ValueError(
            f"simulated accelerator {model!r}: expected {PREFIX}<size px>[@<views/s>], e.g. {PREFIX}64@2000"
        )
    return SimSpec(size, rate)


def busy_fraction(intervals: Sequence[tuple[float, float]]) -> float:
    """Time inside forward / wall time from the first forward's start to the last one's end (0 without forwards)."""
    if not intervals:
        return 0.0
    wall = max(end for _, end in intervals) - min(start for start, _ in intervals)
    inside = sum(end - start for start, end in intervals)
    return inside / wall if wall > 0 else 1.0


def read_traces(trace_dir: str | Path) -> dict[str, list[tuple[float, float, int]]]:
    """``{process id: [(start, end, views), ...]}`` of the forwards traced in ``trace_dir``, in start order.

    One process is one device: the models of a teacher actor run their forwards one after another, so a device's
    busy time is the sum of its models' forwards.
    """
    by_process: dict[str, list[tuple[float, float, int]]] = {}
    for path in sorted(Path(trace_dir).glob("*.trace")):
        forwards = by_process.setdefault(path.name.split("-")[0], [])
        forwards += [
            (float(a), float(b), int(n)) for a, b, n in (line.split() for line in path.read_text().splitlines())
        ]
    return {pid: sorted(forwards) for pid, forwards in by_process.items()}


class SimAccel(torch.nn.Module):
    """open_clip's ``encode_image`` / ``encode_text`` interface over a sleep and two fixed projections."""

    def __init__(self, spec: SimSpec, vocab_size: int, context_length: int) -> None:
        super().__init__()
        self.spec = spec
        generator = torch.Generator().manual_seed(0)  # the same model in every process, whatever the torch RNG
        pooled = min(_POOL, spec.image_size)
        self.pooled = pooled
        self.image_proj = torch.nn.Parameter(torch.randn(3 * pooled * pooled, EMBED_DIM, generator=generator))
        self.text_proj = torch.nn.Parameter(torch.randn(vocab_size, EMBED_DIM, generator=generator))
        self.context_length = context_length
        self.busy: list[tuple[float, float]] = []
        trace_dir = os.environ.get(TRACE_DIR_ENV)
        self.trace = Path(trace_dir) / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.trace" if trace_dir else None

    def encode_image(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        start = time.time()
        time.sleep(len(images_BCHW) / self.spec.views_per_s)
        pooled_BCHW = torch.nn.functional.adaptive_avg_pool2d(images_BCHW.float(), self.pooled)
        emb_BD = pooled_BCHW.flatten(1) @ self.image_proj
        end = time.time()
        self.busy.append((start, end))
        if self.trace is not None:
            with self.trace.open("a") as f:
                f.write(f"{start:.6f} {end:.6f} {len(images_BCHW)}\n")
        return emb_BD

    def encode_text(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        counts_BV = torch.zeros(len(tokens_BL), self.text_proj.shape[0], device=tokens_BL.device)
        counts_BV.scatter_add_(1, tokens_BL, torch.ones_like(tokens_BL, dtype=counts_BV.dtype))
        return counts_BV @ self.text_proj
