"""Bootstrap statistics of a study (`clipdr.study`): pure numpy, no model, no MLflow.

A study trains the same student in several modes, each for several seeds, and evaluates every run's final model
on the same evaluation samples. Two sources of chance make its numbers vary: which seeds were run (initialisation,
data order, views) and which evaluation samples were drawn. `bootstrap_modes` resamples both at once, a two-level
(hierarchical) bootstrap: per resample it draws the evaluation samples of each dataset with replacement, by
unit (one dataset image with everything scored about it: its label, or all its captions), shared by every mode and
seed (all runs are scored on the same draw, so a difference between modes is paired on the samples), and per mode
draws the seeds with replacement. A resample's value of a mode is the mean over its drawn seeds of the metric
recomputed on the drawn samples. Intervals are percentile intervals of those values (`percentile_interval`).

Shape suffixes: R resamples, S seeds, U units (dataset images), M scored samples (images or captions).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SampleScores:
    """The per-sample scores of one metric that is their mean (a task's top-1 hits, a retrieval set's recalls).

    Attributes:
        group: The dataset they come from; scores of one group are resampled together, by unit.
        values: ``(M,)`` each sample's score (0/1 hits).
        units: ``(M,)`` the unit (index of the dataset's image, in ``[0, num_units)``) each score belongs to: an
            image-to-text hit is its image's, a text-to-image hit its caption's image's.
        num_units: Images of the dataset.
    """

    group: str
    values: np.ndarray
    units: np.ndarray
    num_units: int

    def __post_init__(self) -> None:
        if self.values.shape != self.units.shape or self.values.ndim != 1:
            raise ValueError(f"values {self.values.shape} and units {self.units.shape} must be equal 1-d shapes")
        if len(self.units) and (self.units.min() < 0 or self.units.max() >= self.num_units):
            raise ValueError(f"units must lie in [0, {self.num_units})")

    @property
    def mean(self) -> float:
        return float(self.values.mean())

    def unit_sums(self) -> np.ndarray:
        """``(U,)`` the sum of each unit's scores."""
        return np.bincount(self.units, weights=self.values, minlength=self.num_units)

    def unit_counts(self) -> np.ndarray:
        """``(U,)`` how many scores each unit has."""
        return np.bincount(self.units, minlength=self.num_units).astype(np.float64)


Run = Mapping[str, SampleScores]  # one trained model's per-sample scores, by metric name


def metric_of(run: Run, weights: Mapping[str, float]) -> float:
    """The metric ``weights`` combines (``{leaf metric: weight}``, a weighted sum of means) on all samples."""
    return sum(w * run[leaf].mean for leaf, w in weights.items())


def _check(runs: Mapping[str, Sequence[Run]], weights: Mapping[str, float]) -> dict[str, int]:
    if not runs or any(not seeds for seeds in runs.values()):
        raise ValueError("every mode needs at least one run")
    if not weights:
        raise ValueError("no metric to resample (empty weights)")
    units: dict[str, int] = {}
    for seeds in runs.values():
        for run in seeds:
            missing = [leaf for leaf in weights if leaf not in run]
            if missing:
                raise ValueError(f"a run has no per-sample scores of {missing}")
            for leaf in weights:
                scores = run[leaf]
                if units.setdefault(scores.group, scores.num_units) != scores.num_units:
                    raise ValueError(f"runs scored different samples of {scores.group!r}: they must share them")
    return units


def bootstrap_modes(
    runs: Mapping[str, Sequence[Run]], weights: Mapping[str, float], num_resamples: int, seed: int
) -> dict[str, np.ndarray]:
    """The bootstrap distribution of each mode's seed-mean metric, resampling evaluation samples and seeds.

    Args:
        runs: Mode -> its runs (one per seed) -> per-sample scores by metric name.
        weights: The metric as a weighted sum of per-sample means (`clipdr.evaluate.engine.sample_mean_weights`).
        num_resamples: R.
        seed: Seed of the draws: equal arguments give equal distributions.

    Returns:
        Mode -> ``(R,)`` values, drawn on the same evaluation samples for every mode (so ``a - b`` of two modes'
        arrays is the distribution of their difference, paired on samples).
    """
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    num_units = _check(runs, weights)
    rng = np.random.default_rng(seed)
    # Each dataset's draw: how often each unit is taken (a multinomial of U draws of U units), one row a resample.
    counts_RU = {
        group: rng.multinomial(n, np.full(n, 1.0 / n), size=num_resamples).astype(np.float64)
        for group, n in sorted(num_units.items())
    }
    out = {}
    for mode, seeds in runs.items():
        metric_RS = np.zeros((num_resamples, len(seeds)))
        for leaf, weight in weights.items():
            group = seeds[0][leaf].group
            sums_SU = np.stack([run[leaf].unit_sums() for run in seeds])
            denominator_R = counts_RU[group] @ seeds[0][leaf].unit_counts()
            with np.errstate(invalid="ignore", divide="ignore"):  # a draw without any of the leaf's samples: NaN
                metric_RS += weight * (counts_RU[group] @ sums_SU.T) / denominator_R[:, None]
        pick_RS = rng.integers(0, len(seeds), size=(num_resamples, len(seeds)))
        out[mode] = np.take_along_axis(metric_RS, pick_RS, axis=1).mean(axis=1)
    return out


def percentile_interval(values_R: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of a bootstrap distribution (NaN resamples left out)."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(values_R, [tail, 100 - tail])
    return float(low), float(high)


def seed_bootstrap(values_S: np.ndarray, num_resamples: int, seed: int) -> np.ndarray:
    """``(R, ...)`` means of ``values_S`` (seeds first; any further axes kept) over seeds drawn with replacement."""
    values_S = np.asarray(values_S, dtype=np.float64)
    rng = np.random.default_rng(seed)
    pick_RS = rng.integers(0, len(values_S), size=(num_resamples, len(values_S)))
    return values_S[pick_RS].mean(axis=1)


# --------------------------------------------------------------------------- learning curves


@dataclass(frozen=True)
class Curve:
    """A metric against samples seen, from a run's MLflow history."""

    samples: tuple[int, ...]
    values: tuple[float, ...]

    def samples_to_reach(self, target: float) -> float | None:
        """Samples seen at which the curve first reaches ``target`` (linear between evaluations); None if never."""
        previous = (0, None)
        for x, y in zip(self.samples, self.values, strict=True):
            if y >= target:
                x0, y0 = previous
                if y0 is None or y == y0:
                    return float(x)
                return x0 + (target - y0) * (x - x0) / (y - y0)
            previous = (x, y)
        return None


def _stacked(curves: Sequence[Curve]) -> tuple[tuple[int, ...], np.ndarray]:
    """The seeds' common evaluation points and their values ``(S, points)``."""
    if not curves:
        raise ValueError("no curves")
    samples = curves[0].samples
    if any(c.samples != samples for c in curves):
        raise ValueError("the seeds' curves were evaluated at different samples seen; a study evaluates all alike")
    return samples, np.array([c.values for c in curves], dtype=np.float64).reshape(len(curves), len(samples))


@dataclass(frozen=True)
class Band:
    """A mode's learning curve over seeds: the mean and a seed-bootstrap interval at every evaluation."""

    samples: tuple[int, ...]
    mean: tuple[float, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]


def curve_band(curves: Sequence[Curve], num_resamples: int, seed: int, level: float = 0.95) -> Band:
    """The seeds' mean curve with the percentile interval of its seed bootstrap at each point."""
    samples, values_SP = _stacked(curves)
    draws_RP = seed_bootstrap(values_SP, num_resamples, seed)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(draws_RP, [tail, 100 - tail], axis=0) if samples else (np.array([]), np.array([]))
    return Band(samples, tuple(values_SP.mean(axis=0)), tuple(low), tuple(high))


@dataclass(frozen=True)
class SampleRatio:
    """How many times fewer samples a mode needs to reach the baseline's final value (``budget / reached``).

    Attributes:
        point: Of the seed-mean curves; None when the mode's mean curve never reaches it.
        low, high: The seed-bootstrap percentile interval; a resample in which the mode never reaches the
            baseline's final counts as ratio 0 (it needs more than the whole budget), so ``low == 0`` says that
            it does not reach it in a fair share of resamples.
        unreached: Fraction of resamples in which it never reaches it.
    """

    point: float | None
    low: float
    high: float
    unreached: float


def _ratio(baseline_P: np.ndarray, better_P: np.ndarray, samples: tuple[int, ...]) -> float | None:
    reached = Curve(samples, tuple(better_P)).samples_to_reach(float(baseline_P[-1]))
    return samples[-1] / reached if reached else None


def samples_to_match(
    baseline: Sequence[Curve], better: Sequence[Curve], num_resamples: int, seed: int, level: float = 0.95
) -> SampleRatio:
    """The samples-to-match ratio of ``better``'s seeds against ``baseline``'s final, with its seed bootstrap.

    Curves have no per-sample scores before the final evaluation, so only seeds are resampled here.
    """
    samples, base_SP = _stacked(baseline)
    better_samples, better_SP = _stacked(better)
    if better_samples != samples or not samples:
        raise ValueError("baseline and better curves must be evaluated at the same, non-empty, samples seen")
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(num_resamples):
        base = base_SP[rng.integers(0, len(base_SP), len(base_SP))].mean(axis=0)
        mine = better_SP[rng.integers(0, len(better_SP), len(better_SP))].mean(axis=0)
        ratios.append(_ratio(base, mine, samples) or 0.0)
    ratios_R = np.array(ratios)
    low, high = percentile_interval(ratios_R, level)
    point = _ratio(base_SP.mean(axis=0), better_SP.mean(axis=0), samples)
    return SampleRatio(point, low, high, float((ratios_R == 0).mean()))
