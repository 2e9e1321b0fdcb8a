"""A hyper-parameter sweep (`clipdr sweep`): grid or random search with Ray Tune over any config keys.

    sweep.params: ``key=[values]`` per swept key (any dotted config key: train.optimizer.lr, train.loss.kd_weight,
        train.teacher_scales, ...)
    -> the trials: every combination of the values (``search = "grid"``) or ``num_samples`` different combinations
       drawn at random (``"random"``, seeded by ``sweep.seed``: a trial is never drawn twice)
    -> Ray Tune runs them, ``parallel_trials`` at a time: each trial is one `train.run.run` of the config with its
       values, the training path of `clipdr train`, its MLflow run a nested child of the sweep's parent run; it
       reports ``sweep.metric``, its run's last value
    -> the parent run holds the summary table (markdown, JSON) and a plot of the metric against each swept key, and
       the best trial's values as metrics.

A trial's run is named after its values (``<name>-<digest>``), so a sweep run again finds its finished trials in
their run states (`clipdr.runstate`) and trains only the others. Trials run as Ray Tune's function trainables, each
starting its own Ray Train job; they ask Ray for almost no CPU of their own (`TRIAL_CPUS`: the workers take the CPUs).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipdr import runstate, storage
from clipdr.config import Config, ConfigError, SweepConfig, from_dict, parse_override, replace, to_dict

CURVE_FILE = "sweep.png"
REPORT_FILE = "sweep.md"
SUMMARY_FILE = "sweep.json"
SWEEP_TAG = "clipdr.sweep"
TRIAL_KEY = "values"  # Ray Tune's trial config: {TRIAL_KEY: {config key: value}}
TRIAL_CPUS = 0.01  # a trial only waits on its Ray Train job, whose workers ask for the CPUs; Tune refuses 0


@dataclass(frozen=True)
class SweepResult:
    parent_run_id: str
    trials: list[dict[str, Any]]
    best: dict[str, Any]
    report: str


def space(sc: SweepConfig, cfg: Config) -> dict[str, list[Any]]:
    """The swept keys and their values, each value checked against the config (a `ConfigError` names the key)."""
    found: dict[str, list[Any]] = {}
    for text in sc.params:
        key, values = parse_override(text)
        if not isinstance(values, list) or not values:
            raise ValueError(f"sweep.params {text!r}: expected key=[value, ...] with at least one value")
        if key in found:
            raise ValueError(f"sweep.params names {key!r} twice")
        for value in values:
            try:
                from_dict(Config, to_dict(replace(cfg, {key: value})), "sweep.params")
            except (ConfigError, TypeError, AttributeError) as e:
                raise ValueError(f"sweep.params {key}={value!r}: {e}") from None
        found[key] = values
    if not found:
        raise ValueError("sweep.params is empty: give at least one key=[values], e.g. train.optimizer.lr=[1e-3, 2e-3]")
    return found


def check(sc: SweepConfig) -> None:
    if sc.search not in ("grid", "random"):
        raise ValueError(f"sweep.search must be grid or random, got {sc.search!r}")
    if sc.search == "random" and sc.num_samples < 1:
        raise ValueError(f"sweep.num_samples must be >= 1 for a random search, got {sc.num_samples}")
    if sc.parallel_trials < 1:
        raise ValueError(f"sweep.parallel_trials must be >= 1, got {sc.parallel_trials}")
    if sc.goal not in ("max", "min"):
        raise ValueError(f"sweep.goal must be max or min, got {sc.goal!r}")
    if not sc.name:
        raise ValueError("sweep.name must not be empty")


def trials(sc: SweepConfig, values: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The trials' values: every combination (grid), or ``num_samples`` different ones drawn with ``seed``."""
    import numpy as np

    combos = [dict(zip(values, combo, strict=True)) for combo in itertools.product(*values.values())]
    if sc.search == "grid":
        return combos
    picked = np.random.default_rng(sc.seed).choice(len(combos), size=min(sc.num_samples, len(combos)), replace=False)
    return [combos[i] for i in sorted(picked)]


def trial_name(sweep_name: str, values: dict[str, Any]) -> str:
    """A trial's run name, from its values: the same values find the same (cached) run."""
    return f"{sweep_name}-{runstate.fingerprint(values).removeprefix('sha256:')[:10]}"


def _trial(space: dict[str, Any], base: dict[str, Any], sweep_name: str, parent_run_id: str, metric: str) -> None:
    """One Ray Tune trial: trains the base config with its values and reports ``metric``, its run's last value."""
    from ray import tune

    from clipdr import tracking
    from clipdr.train.run import run as train

    values = space[TRIAL_KEY]
    cfg = from_dict(Config, base, "sweep trial")
    name = trial_name(sweep_name, values)
    cfg = replace(cfg, {**values, "train.run_name": name, "tracking.parent_run_id": parent_run_id})
    with tracking.pinned_uri(cfg.tracking.uri):
        result = train(cfg, log=lambda message: print(f"[{name}] {message}", flush=True))
        metrics = tracking.run_summary(result.mlflow_run_id, uri=cfg.tracking.uri).metrics
    if metric not in metrics:
        raise ValueError(f"trial {name}: metric {metric!r} was not logged; logged: {', '.join(sorted(metrics)[:10])}")
    tracking.open_run(result.mlflow_run_id, uri=cfg.tracking.uri).set_tags({SWEEP_TAG: sweep_name})
    tune.report({metric: metrics[metric], "run_id": result.mlflow_run_id, "run_name": name})


def run(cfg: Config, log: Callable[[str], None] = print) -> SweepResult:
    """Runs the sweep of ``cfg.sweep`` on ``cfg.train`` (module docstring)."""
    from ray import tune

    from clipdr import study, tracking
    from clipdr.cluster import ensure_ray
    from clipdr.train.run import resolve_paths

    sc = cfg.sweep
    check(sc)
    values = space(sc, cfg)
    # Trials run in Ray's processes, in other working directories: every path and the tracking URI made absolute.
    cfg = replace(resolve_paths(cfg), {"tracking.uri": tracking.tracking_uri(cfg.tracking.uri)})
    directory = storage.absolute(storage.join(sc.output, sc.name))
    params = {f"sweep.{k}": v for k, v in to_dict(sc).items()} | {"train.model": cfg.train.model}
    with tracking.pinned_uri(cfg.tracking.uri):
        ensure_ray()
        tags = {"clipdr.job": "sweep", SWEEP_TAG: sc.name}
        parent = study.parent_run(cfg, directory, sc.name, tags, params, cfg.train.experiment)
        log(f"sweep {sc.name!r}: {sc.search} over {', '.join(values)}, MLflow parent run {parent.run_id}")
        try:
            chosen = trials(sc, values)
            log(f"sweep: {len(chosen)} trials, {sc.parallel_trials} at a time")
            trainable = tune.with_resources(
                tune.with_parameters(
                    _trial, base=to_dict(cfg), sweep_name=sc.name, parent_run_id=parent.run_id, metric=sc.metric
                ),
                {"CPU": TRIAL_CPUS},
            )
            tuner = tune.Tuner(
                trainable,
                param_space={TRIAL_KEY: tune.grid_search(chosen)},
                tune_config=tune.TuneConfig(max_concurrent_trials=sc.parallel_trials),
                run_config=tune.RunConfig(name="tune", storage_path=directory, verbose=0),
            )
            grid = tuner.fit()
            errors = [r.error for r in grid if r.error is not None]
            if errors:
                raise RuntimeError(f"{len(errors)} of {len(grid)} sweep trials failed; the first: {errors[0]}")
            found = [
                {**r.config[TRIAL_KEY], sc.metric: r.metrics[sc.metric], "run_id": r.metrics["run_id"]}
                | {"run": r.metrics["run_name"]}
                for r in grid
            ]
            found.sort(key=lambda t: t[sc.metric], reverse=sc.goal == "max")
            best = found[0]
            text = markdown(sc, list(values), found)
            parent.log_metrics({f"best/{sc.metric}": best[sc.metric]})
            parent.set_tags({"clipdr.sweep.best_run": best["run_id"]})
            study.log_report(
                parent,
                directory,
                {
                    CURVE_FILE: lambda path: plot(sc, list(values), found, path),
                    REPORT_FILE: text,
                    SUMMARY_FILE: json.dumps({"best": best, "trials": found}, indent=2, default=str),
                },
            )
        except BaseException:
            parent.finish_failed()
            raise
        parent.finish("FINISHED")
    log(text)
    return SweepResult(parent.run_id, found, best, text)


def markdown(sc: SweepConfig, keys: list[str], trials: list[dict[str, Any]]) -> str:
    best = "highest" if sc.goal == "max" else "lowest"
    lines = [f"# Sweep {sc.name!r}: {sc.metric} ({sc.search}, {len(trials)} trials, {best} first)", ""]
    lines += ["| run | " + " | ".join(keys) + f" | {sc.metric} |", "|---|" + "---|" * (len(keys) + 1)]
    for t in trials:
        lines.append(f"| {t['run']} | " + " | ".join(json.dumps(t[k]) for k in keys) + f" | {t[sc.metric]:.4f} |")
    return "\n".join(lines) + "\n"


def plot(sc: SweepConfig, keys: list[str], trials: list[dict[str, Any]], path: Path) -> None:
    """One panel per swept key: each trial's metric against its value of that key (categories for non-numbers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        xs = [t[key] for t in trials]
        numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs)
        if not numeric:
            labels = sorted({json.dumps(x) for x in xs})
            xs = [labels.index(json.dumps(x)) for x in xs]
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
        elif all(x > 0 for x in xs) and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        ax.scatter(xs, [t[sc.metric] for t in trials])
        ax.set_xlabel(key)
        ax.set_ylabel(sc.metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"sweep {sc.name}: {sc.metric} per trial")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
