"""A simulated accelerator: a teacher model whose image forward costs a fixed wall time per view, spent off the CPU.

It stands in for a device so that the reinforcement pipeline's feeding can be measured without one. A forward over
B views occupies the simulated device for ``B / views_per_s`` seconds (`SimAccel.forward_time`): the work a device
would do inside it (in a `clipdr.models.teachers.Teacher` forward: normalising the uint8 views, the image
projection, the L2 normalisation and the copy back) runs first, on this process's CPU as the stand-in for the device,
and the rest of the time is slept (``time.sleep`` releases the GIL and uses no CPU, as a process waiting on a GPU
kernel does). The embedding is a fixed random projection of the views' pixels, cheap and deterministic. Text
embeddings are a fixed random projection of the token ids; a text forward takes no device time of its own beyond its
work (a teacher's text pass is small next to K image views), but it too runs inside `SimAccel.forward_time`, as on
a device. When the work inside a forward takes longer than its views' device time (the simulation's CPU is slower
than the device it stands for, at high rates), the forward takes that long, and its trace line says so.

Model names: ``clipdr-sim-accel-<size>`` (``size`` px square input, `DEFAULT_VIEWS_PER_S`) or
``clipdr-sim-accel-<size>@<views/s>``, e.g. ``clipdr-sim-accel-64@2000``. A name is a whole description, so no
config file is needed and the rate is part of the teacher's recorded model name.

Busy accounting: every model records the wall interval of each forward in `SimAccel.busy`; when the environment
variable `TRACE_DIR_ENV` names a directory, each forward also appends ``start end views work_s`` (``time.time()``
seconds; ``work_s``: the time its work took before the sleep) to a file of its own there, so a benchmark can read
the forwards of models that ran in Ray actors (`read_traces`). `busy_fraction` turns intervals into time inside
forwards / wall time since the first forward began.

Shape suffixes: B views, C/H/W channels and pixels, L tokens, D embedding width.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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


class Forward(NamedTuple):
    """One traced forward: its wall interval (``time.time()`` s), its views (0: a text forward) and the time its work
    took before the sleep (above ``views / views_per_s``: the simulation's CPU, not the device, set its length)."""

    start: float
    end: float
    views: int
    work_s: float


def read_traces(trace_dir: str | Path) -> dict[str, list[Forward]]:
    """``{process id: [Forward, ...]}`` of the forwards traced in ``trace_dir``, in start order.

    One process is one device: the models of a teacher actor run their forwards one after another (its stage holds
    the device for them, `clipdr.models.teachers.TeacherEnsemble`), so a device's busy time is the sum of its
    models' forwards.
    """
    by_process: dict[str, list[Forward]] = {}
    for path in sorted(Path(trace_dir).glob("*.trace")):
        forwards = by_process.setdefault(path.name.split("-")[0], [])
        forwards += [
            Forward(float(a), float(b), int(n), float(w))
            for a, b, n, w in (line.split() for line in path.read_text().splitlines())
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
        self._forwards_open = 0

    @contextlib.contextmanager
    def forward_time(self, num_views: int) -> Iterator[None]:
        """One forward on the simulated device: the work inside runs, then the forward sleeps what is left of
        ``num_views / views_per_s`` seconds. A forward that raises takes no further time and is not recorded."""
        start = time.time()
        self._forwards_open += 1
        try:
            yield
        finally:
            self._forwards_open -= 1
        work_s = time.time() - start
        time.sleep(max(0.0, num_views / self.spec.views_per_s - work_s))
        end = time.time()
        self.busy.append((start, end))
        if self.trace is not None:
            with self.trace.open("a") as f:
                f.write(f"{start:.6f} {end:.6f} {num_views} {work_s:.6f}\n")

    def encode_image(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        if not self._forwards_open:  # called on its own, not inside a teacher's forward: a forward of its own
            with self.forward_time(len(images_BCHW)):
                return self.encode_image(images_BCHW)
        pooled_BCHW = torch.nn.functional.adaptive_avg_pool2d(images_BCHW.to(self.image_proj.dtype), self.pooled)
        return pooled_BCHW.flatten(1) @ self.image_proj

    def encode_text(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        counts_BV = torch.zeros(
            len(tokens_BL), self.text_proj.shape[0], dtype=self.text_proj.dtype, device=tokens_BL.device
        )
        counts_BV.scatter_add_(1, tokens_BL, torch.ones_like(tokens_BL, dtype=counts_BV.dtype))
        return counts_BV @ self.text_proj
