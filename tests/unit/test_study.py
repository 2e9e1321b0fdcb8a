"""The study's pure parts: its runs, its refusals and what its report concludes (no training: test_demo trains)."""

from __future__ import annotations

import pytest

from clipdr import study, sweep
from clipdr.config import Config, StudyConfig, SweepConfig, TrainConfig, TrainLoss, replace


def test_runs_are_modes_times_seeds_the_baseline_without_distillation():
    cfg = Config(
        train=TrainConfig(model="clipdr-tiny-vit", register="student", loss=TrainLoss(kd_weight=0.7)),
        study=StudyConfig(name="pilot", modes=("clip", "reinforced"), seeds=(3, 4)),
    )
    jobs = study.jobs(cfg)
    assert [j.name for j in jobs] == ["pilot-clip", "pilot-clip-seed4", "pilot-reinforced", "pilot-reinforced-seed4"]
    assert [(j.cfg.train.mode, j.cfg.train.seed, j.cfg.train.run_name) for j in jobs] == [
        (j.mode, j.seed, j.name) for j in jobs
    ]
    assert [j.cfg.train.loss.kd_weight for j in jobs] == [0.0, 0.0, 0.7, 0.7]
    assert [j.cfg.train.register for j in jobs] == ["student", "", "student", ""]  # the first seed's runs only
    assert all(j.cfg.train.evaluate for j in jobs)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"study.modes": ("clip",)}, "two or more different modes"),
        ({"study.modes": ("clip", "clip")}, "two or more different modes"),
        ({"study.seeds": ()}, "one or more different seeds"),
        ({"study.bootstrap_resamples": 10}, "bootstrap_resamples must be >= 100"),
        ({"study.confidence": 1.0}, "confidence must lie in"),
        ({"study.parallel_jobs": 0}, "parallel_jobs must be >= 1"),
    ],
)
def test_a_study_that_cannot_compare_is_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        study.check(replace(Config(), changes).study)


def summary(gain_low: float, gain_high: float, ratio: dict | None) -> dict:
    metric = "zeroshot/mean_top1"
    return {
        "name": "pilot",
        "metric": metric,
        "baseline": "clip",
        "modes": ["clip", "reinforced"],
        "seeds": [0, 1, 2],
        "confidence": 0.95,
        "bootstrap_resamples": 1000,
        "model": "clipdr-tiny-vit",
        "data": "data/reinforced",
        "samples": 256,
        "metrics": {
            metric: {
                "clip": {"value": 0.2, "low": 0.18, "high": 0.22},
                "reinforced": {"value": 0.25, "low": 0.2, "high": 0.3},
            }
        },
        "gains": {metric: {"reinforced": {"value": 0.05, "low": gain_low, "high": gain_high}}},
        "sample_ratio": {"reinforced": ratio} if ratio else {},
        "bands": {},
        "runs": [],
    }


def test_the_report_says_when_the_gains_interval_includes_zero():
    ratio = {"point": 2.0, "low": 0.0, "high": 3.1, "unreached": 0.1}
    unsure = study.markdown(summary(-0.01, 0.11, ratio))
    assert "+0.050 [-0.010, +0.110]" in unsure
    assert "the 95% interval includes zero: this study cannot tell reinforced from clip" in unsure
    assert "2.00x fewer samples, interval [0.00x, 3.10x] over seeds (never reached in 10% of resamples)" in unsure
    assert "| reinforced | 0.250 [0.200, 0.300] |" in unsure
    sure = study.markdown(summary(0.01, 0.09, None))
    assert "the 95% interval excludes zero: reinforced beats clip" in sure and "includes zero" not in sure
    behind = study.conclusion(
        summary(-0.09, -0.01, None)
        | {"gains": {"zeroshot/mean_top1": {"reinforced": {"value": -0.05, "low": -0.09, "high": -0.01}}}}
    )
    assert "reinforced trails clip" in behind[0]


def test_a_sweeps_trials_are_the_grid_or_distinct_random_draws_of_it():
    params = ("train.optimizer.lr=[1e-3, 2e-3, 4e-3]", "train.loss.kd_weight=[0.5, 1.0]")
    values = sweep.space(SweepConfig(params=params), Config())
    grid = sweep.trials(SweepConfig(params=params), values)
    assert {tuple(t.values()) for t in grid} == {(a, b) for a in (1e-3, 2e-3, 4e-3) for b in (0.5, 1)}
    assert len(grid) == 6
    drawn = sweep.trials(SweepConfig(params=params, search="random", num_samples=4, seed=1), values)
    assert len({tuple(t.values()) for t in drawn}) == 4 and all(t in grid for t in drawn)  # never twice
    assert drawn == sweep.trials(SweepConfig(params=params, search="random", num_samples=4, seed=1), values)
    assert len(sweep.trials(SweepConfig(params=params, search="random", num_samples=50), values)) == 6
    assert sweep.trial_name("s", grid[0]) == sweep.trial_name("s", dict(grid[0])) != sweep.trial_name("s", grid[1])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (("train.optimizer.lr=1e-3",), r"expected key=\[value, ...\]"),
        (("train.optimizer.lr=[1e-3]", "train.optimizer.lr=[2e-3]"), "names 'train.optimizer.lr' twice"),
        (('train.mode=["clip", "plain"]',), "sweep.params train.mode='plain'"),
        ((), "sweep.params is empty"),
    ],
)
def test_a_sweeps_values_are_checked_before_any_trial(params, message):
    with pytest.raises(ValueError, match=message):
        sweep.space(SweepConfig(params=params), Config())


def test_a_runs_final_scores_read_back_only_under_their_fingerprint(tmp_path):
    """What a study keeps beside a run (`study.write_scores`) reads back as the same report, and not at all for
    another model or other [evaluate] settings (another fingerprint)."""
    import numpy as np

    from clipdr import stats
    from clipdr.evaluate import engine

    hits = stats.SampleScores("zeroshot/a", np.array([1.0, 0.0, 1.0]), np.array([0, 1, 2]), 3)
    recalls = stats.SampleScores("retrieval/b", np.array([0.0, 1.0]), np.array([1, 1]), 4)
    report = engine.EvalReport(
        {"zeroshot/a/top1": 2 / 3, "retrieval/b/image_to_text_R@1": 0.5},
        [{"kind": "zeroshot", "name": "a", "num_samples": 3}],
        {"zeroshot/a/top1": hits, "retrieval/b/image_to_text_R@1": recalls},
    )
    uri = str(tmp_path / "run" / "scores.json")
    study.write_scores(uri, "sha256:one", report)
    back = study.read_scores(uri, "sha256:one")
    assert back.metrics == report.metrics and back.datasets == report.datasets
    assert back.per_sample.keys() == report.per_sample.keys()
    for name, scores in report.per_sample.items():
        got = back.per_sample[name]
        assert (got.group, got.num_units) == (scores.group, scores.num_units)
        np.testing.assert_array_equal(got.values, scores.values)
        np.testing.assert_array_equal(got.units, scores.units)
        assert got.units.dtype.kind == "i" and got.values.dtype == np.float64
    assert study.read_scores(uri, "sha256:other") is None
    assert study.read_scores(str(tmp_path / "none.json"), "sha256:one") is None


def test_the_final_scores_key_sees_the_evaluation_files(tmp_path):
    """Evaluation sets rewritten in place (same [evaluate] settings, other files) make cached scores stale: the
    listing the key is made of changes with a file's size or a new file."""
    from clipdr.config import EvaluateConfig

    task = tmp_path / "zeroshot" / "shapes"
    (task / "test").mkdir(parents=True)
    (task / "classnames.txt").write_text("circle\nsquare\n")
    (task / "test" / "0.tar").write_bytes(b"x" * 10)
    ev = EvaluateConfig(zeroshot=(str(tmp_path / "zeroshot"),))
    before = study._evaluation_files(ev)
    assert [size for _, size in before] == [len("circle\nsquare\n"), 10]
    assert study._evaluation_files(ev) == before
    (task / "test" / "0.tar").write_bytes(b"x" * 11)
    assert study._evaluation_files(ev) != before
