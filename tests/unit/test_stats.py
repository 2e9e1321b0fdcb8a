"""The study's bootstrap (`clipdr.stats`) against cases with a closed-form answer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clipdr import stats

R = 20_000
# The standard deviation of a bootstrap distribution estimated from R draws has a relative standard error of
# about 1 / sqrt(2 (R - 1)); 5 of them is the tolerance.
STD_TOLERANCE = 5 / math.sqrt(2 * (R - 1))


def one_per_unit(values, group="task") -> stats.SampleScores:
    values = np.asarray(values, dtype=np.float64)
    return stats.SampleScores(group, values, np.arange(len(values)), len(values))


def test_resampling_samples_of_one_run_has_the_binomial_standard_error():
    hits = np.array([1] * 30 + [0] * 70)  # p = 0.3 over n = 100 samples
    draws = stats.bootstrap_modes({"clip": [{"top1": one_per_unit(hits)}]}, {"top1": 1.0}, R, seed=0)["clip"]
    # The bootstrap distribution of a mean has the plug-in variance p (1 - p) / n (one seed: no seed draw).
    assert draws.std() == pytest.approx(math.sqrt(0.3 * 0.7 / 100), rel=STD_TOLERANCE)
    assert draws.mean() == pytest.approx(0.3, abs=5 * math.sqrt(0.21 / 100 / R))


def test_resampling_seeds_has_the_standard_error_of_their_mean():
    finals = np.array([0.20, 0.22, 0.25, 0.19, 0.30, 0.21, 0.24, 0.26])
    runs = [{"top1": one_per_unit([v])} for v in finals]  # one sample each: only the seed draw varies
    draws = stats.bootstrap_modes({"clip": runs}, {"top1": 1.0}, R, seed=1)["clip"]
    assert draws.std() == pytest.approx(finals.std() / math.sqrt(len(finals)), rel=STD_TOLERANCE)
    assert stats.seed_bootstrap(finals, R, seed=1).std() == pytest.approx(
        finals.std() / math.sqrt(len(finals)), rel=STD_TOLERANCE
    )


def test_several_scores_of_one_image_are_resampled_together():
    # Image 0 has two captions, both found; image 1 one caption, missed. Drawing images {0,0}, {0,1}, {1,1} with
    # probabilities 1/4, 1/2, 1/4 gives recalls 1, 2/3 (captions pooled, not 1/2 as a mean of image means), 0.
    captions = stats.SampleScores("pairs", np.array([1.0, 1.0, 0.0]), np.array([0, 0, 1]), 2)
    draws = stats.bootstrap_modes({"clip": [{"t2i": captions}]}, {"t2i": 1.0}, R, seed=2)["clip"]
    values, counts = np.unique(draws.round(12), return_counts=True)
    assert values.tolist() == pytest.approx([0.0, 2 / 3, 1.0])
    assert counts / R == pytest.approx([0.25, 0.5, 0.25], abs=5 * math.sqrt(0.25 / R))


def test_modes_are_paired_on_the_evaluation_samples():
    rng = np.random.default_rng(0)
    runs = [{"top1": one_per_unit(rng.integers(0, 2, 200))} for _ in range(3)]
    # The same runs under two names: equal per resample, whatever samples and seeds were drawn.
    copy = [{"top1": one_per_unit(r["top1"].values)} for r in runs]
    draws = stats.bootstrap_modes({"a": runs, "b": runs}, {"top1": 1.0}, 500, seed=3)
    assert np.ptp(draws["a"]) > 0
    same = stats.bootstrap_modes({"a": runs, "b": runs}, {"top1": 1.0}, 500, seed=3)
    assert np.array_equal(same["a"], draws["a"])  # seeded: equal arguments, equal draws
    single = stats.bootstrap_modes({"a": [runs[0]], "b": [copy[0]]}, {"top1": 1.0}, 500, seed=4)
    assert np.array_equal(single["a"], single["b"])  # one seed each: only the shared sample draw


def test_a_weighted_metric_combines_its_parts():
    a, b = one_per_unit([1, 1, 0, 0], "x"), one_per_unit([1, 0, 0, 0, 0], "y")
    assert stats.metric_of({"a": a, "b": b}, {"a": 0.5, "b": 0.5}) == pytest.approx(0.5 * 0.5 + 0.5 * 0.2)
    draws = stats.bootstrap_modes({"m": [{"a": a, "b": b}]}, {"a": 0.5, "b": 0.5}, 4000, seed=0)["m"]
    assert draws.mean() == pytest.approx(0.35, abs=0.02)
    with pytest.raises(ValueError, match="no per-sample scores"):
        stats.bootstrap_modes({"m": [{"a": a}]}, {"a": 0.5, "b": 0.5}, 10, seed=0)


def test_percentile_interval():
    assert stats.percentile_interval(np.arange(101.0), 0.9) == pytest.approx((5.0, 95.0))
    assert stats.percentile_interval(np.array([np.nan, 1.0, 1.0])) == (1.0, 1.0)


def test_samples_to_match_and_bands():
    base = [stats.Curve((100, 200, 300), (0.2, 0.3, 0.4))] * 3
    better = [stats.Curve((100, 200, 300), (0.3, 0.5, 0.6))] * 3
    ratio = stats.samples_to_match(base, better, 200, seed=0)
    # better reaches 0.4 halfway between 100 (0.3) and 200 (0.5): at 150 samples, 300 / 150 = 2x; identical seeds.
    assert (ratio.point, ratio.low, ratio.high, ratio.unreached) == pytest.approx((2.0, 2.0, 2.0, 0.0))
    never = stats.samples_to_match(better, base, 200, seed=0)
    assert never.point is None and never.unreached == 1.0 and (never.low, never.high) == (0.0, 0.0)
    band = stats.curve_band([stats.Curve((1, 2), (0.1, 0.2)), stats.Curve((1, 2), (0.3, 0.4))], 2000, seed=0)
    assert band.mean == pytest.approx((0.2, 0.3))
    assert band.low[0] == pytest.approx(0.1) and band.high[1] == pytest.approx(0.4)  # 1 in 4 draws takes a seed twice
    with pytest.raises(ValueError, match="different samples seen"):
        stats.curve_band([stats.Curve((1, 2), (0, 0)), stats.Curve((1, 3), (0, 0))], 10, seed=0)


def test_sample_ratio_interpolates_between_evaluations():
    curve = stats.Curve(samples=(100, 200, 300), values=(0.2, 0.4, 0.5))
    assert curve.samples_to_reach(0.3) == pytest.approx(150)
    assert curve.samples_to_reach(0.1) == 100
    assert curve.samples_to_reach(0.6) is None
