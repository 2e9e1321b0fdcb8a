"""Measuring on a noisy shared machine: warm-up, interleaved rounds, medians with their spread, per-round ratios.

Every benchmark compares things (a model against a reference, one mode against another, a pipeline against the
bound of its work). Timing each once, one after the other, lets a neighbour's burst land on one side only, so:

* ``run_rounds`` first runs every thing ``warmup`` times (caches, allocators, lazy initialisation), then
  ``rounds`` rounds in which every thing runs once, in an order rotated by one each round, so that no thing
  always follows the same one and drift in the machine's load reaches all of them alike;
* each run yields a `Measurement`: wall seconds and CPU seconds (CPU time counts only the slices the measured
  code ran, so it stays comparable while neighbours come and go), and the number of items it processed;
* ratios are taken within a round (both sides measured moments apart) and then summarised: median and min-max
  over the rounds, never a ratio of two separately summarised medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Measurement:
    """One run of one thing.

    Attributes:
        wall_s: Wall-clock seconds.
        cpu_s: CPU seconds spent on it (the clock is the caller's: thread, process or several processes).
        items: Units of work it did (samples, calls), for per-item rates.
    """

    wall_s: float
    cpu_s: float
    items: int = 1

    def per_item(self, clock: str) -> float:
        """Seconds an item by ``clock`` (``wall`` or ``cpu``)."""
        return (self.wall_s if clock == "wall" else self.cpu_s) / self.items


@dataclass(frozen=True)
class Summary:
    """Median and range of a few values."""

    median: float
    low: float
    high: float

    def format(self, spec: str = ".2f") -> str:
        return f"{self.median:{spec}} ({self.low:{spec}}-{self.high:{spec}})"

    def scaled(self, factor: float) -> Summary:
        return Summary(self.median * factor, self.low * factor, self.high * factor)


def summarize(values: Sequence[float]) -> Summary:
    """Median and min-max of ``values`` (with the few rounds a benchmark affords, quartiles say no more)."""
    if not values:
        raise ValueError("nothing to summarise")
    return Summary(statistics.median(values), min(values), max(values))


def timed(
    fn: Callable[[], object],
    items: int = 1,
    cpu_clock: Callable[[], float] = time.process_time,
    sync: Callable[[], None] | None = None,
) -> Callable[[], Measurement]:
    """Wraps ``fn`` into a thing for `run_rounds` that measures each call.

    Args:
        fn: The work.
        items: Units of work one call does.
        cpu_clock: ``time.process_time`` counts all threads of this process (torch's intra-op threads included);
            ``time.thread_time`` only the calling thread, which is exact for one torch thread in a process whose
            other threads (Ray's) are busy with other things.
        sync: Called before reading the clocks, e.g. ``torch.cuda.synchronize`` (a CUDA launch returns before its
            kernels finish).
    """

    def measure() -> Measurement:
        if sync:
            sync()
        wall, cpu = time.perf_counter(), cpu_clock()
        fn()
        if sync:
            sync()
        return Measurement(time.perf_counter() - wall, cpu_clock() - cpu, items)

    return measure


def rotation(names: Sequence[str], round_index: int) -> list[str]:
    """The order of round ``round_index``: ``names`` rotated left by ``round_index``."""
    shift = round_index % len(names)
    return [*names[shift:], *names[:shift]]


def run_rounds(
    things: Mapping[str, Callable[[], Measurement]],
    rounds: int,
    warmup: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, list[Measurement]]:
    """Runs every thing ``warmup`` times unrecorded, then ``rounds`` times recorded, interleaved round by round.

    Returns:
        ``{name: [measurement of round 0, round 1, ...]}`` (the measurements of a round stay at the same index
        whatever order the round ran them in, so ratios can be paired by round).
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    names = list(things)
    results: dict[str, list[Measurement]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        if progress:
            progress(f"round {r + 1}/{warmup + rounds}{' (warm-up)' if r < warmup else ''}")
        for name in rotation(names, r):
            measurement = things[name]()
            if r >= warmup:
                results[name].append(measurement)
    return results


def per_item(measurements: Sequence[Measurement], clock: str) -> Summary:
    """Seconds an item by ``clock``, summarised over rounds."""
    return summarize([m.per_item(clock) for m in measurements])


def rate(measurements: Sequence[Measurement], clock: str) -> Summary:
    """Items a second by ``clock``, summarised over rounds."""
    return summarize([1 / m.per_item(clock) for m in measurements])


def ratio(numerator: Sequence[Measurement], denominator: Sequence[Measurement], clock: str) -> Summary:
    """Per-round ratio of seconds an item, ``numerator / denominator``, summarised over rounds."""
    if len(numerator) != len(denominator):
        raise ValueError(f"rounds differ: {len(numerator)} against {len(denominator)}")
    return summarize([n.per_item(clock) / d.per_item(clock) for n, d in zip(numerator, denominator, strict=True)])
