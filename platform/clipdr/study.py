"""The pilot study (`clipdr study`): does reinforcement pay on this data, and by how much, with intervals.

    for each mode of study.modes and seed of study.seeds: `train.run.run` of the [train] student (train.seed = the
        seed), a nested MLflow child of the study's parent run, ``study.parallel_jobs`` at a time
    -> evaluate each run's final model once more, here, keeping every evaluation sample's score
       (`clipdr.evaluate.engine.evaluate(per_sample=True)`: the same model and datasets as training's final evaluation)
    -> `clipdr.stats`: per mode the seed mean of each metric with its bootstrap interval over evaluation samples and
       seeds, each mode's gain over the first (the baseline) with its interval, the samples-to-match ratio with its
       interval (over seeds: the curves' earlier points have no per-sample scores), learning curves with bands
    -> the parent run holds the report (markdown table, JSON) and the plot; the children are one click apart in the
       MLflow UI (select them, Compare).

Every training run is cached as `clipdr train` caches it (`clipdr.runstate`): a second study trains only runs it has
not finished, evaluates none it has evaluated with the same [evaluate] settings (each run's per-sample scores are kept
beside it), and the parent run is reopened (its id is kept beside the report). The demo's student stage is a study
(`clipdr.demo`).
"""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipdr import runstate, stats, storage
from clipdr.config import Config, StudyConfig, replace, to_dict
from clipdr.train.plan import Mode

CURVE_FILE = "learning_curves.png"
REPORT_FILE = "report.md"
SUMMARY_FILE = "report.json"
RETRIEVAL_METRIC = "retrieval/mean_recall"  # drawn beside the headline metric when the study evaluates retrieval
STUDY_TAG = "clipdr.study"  # on the parent run and on every child: the study's name


@dataclass(frozen=True)
class Job:
    """One training run of a study."""

    name: str
    mode: str
    seed: int
    cfg: Config


@dataclass(frozen=True)
class Estimate:
    """A value with its bootstrap interval."""

    value: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def text(self, digits: int = 3, sign: bool = False) -> str:
        f = f"{'+' if sign else ''}.{digits}f"
        return f"{self.value:{f}} [{self.low:{f}}, {self.high:{f}}]"


@dataclass
class StudyResult:
    """What a study found (``summary`` is also ``report.json``) and where it is."""

    parent_run_id: str
    summary: dict[str, Any]
    results: dict[str, Any] = field(default_factory=dict)  # job name -> `clipdr.train.run.TrainResult`
    report: str = ""


def check(sc: StudyConfig) -> None:
    """Refuses a study that cannot compare anything, before any run starts."""
    if len(sc.modes) < 2 or len(set(sc.modes)) != len(sc.modes):
        raise ValueError(f"study.modes must name two or more different modes (the first is the baseline): {sc.modes}")
    if not sc.seeds or len(set(sc.seeds)) != len(sc.seeds):
        raise ValueError(f"study.seeds must be one or more different seeds, got {list(sc.seeds)}")
    if sc.parallel_jobs < 1:
        raise ValueError(f"study.parallel_jobs must be >= 1, got {sc.parallel_jobs}")
    if sc.bootstrap_resamples < 100:
        raise ValueError(f"study.bootstrap_resamples must be >= 100 for a 95% interval, got {sc.bootstrap_resamples}")
    if not 0.5 <= sc.confidence < 1:
        raise ValueError(f"study.confidence must lie in [0.5, 1), got {sc.confidence}")
    if not sc.name:
        raise ValueError("study.name must not be empty: it names the parent run and the runs")


def jobs(cfg: Config) -> list[Job]:
    """The study's training runs, mode-major: ``<name>-<mode>`` for the first seed (so a one-seed study's runs are
    a plain comparison's), ``<name>-<mode>-seed<s>`` for the others. A mode that does not distil trains with no
    distillation weight (the plain baseline); registering (train.register) is for the first seed's runs only."""
    sc = cfg.study
    found = []
    for mode in sc.modes:
        for i, seed in enumerate(sc.seeds):
            name = f"{sc.name}-{mode}" + (f"-seed{seed}" if i else "")
            changes = {
                "train.mode": mode,
                "train.seed": seed,
                "train.run_name": name,
                "train.evaluate": True,
                "train.loss.kd_weight": cfg.train.loss.kd_weight if Mode(mode).distils else 0.0,
                "train.register": cfg.train.register if i == 0 else "",
            }
            found.append(Job(name, mode, seed, replace(cfg, changes)))
    return found


def report_dir(sc: StudyConfig) -> str:
    return storage.join(sc.output, sc.name)


def parent_run(
    cfg: Config, directory: str, name: str, tags: Mapping[str, str], params: Mapping[str, Any], experiment: str
) -> Any:
    """The parent MLflow run of a group of runs (a study, a sweep, the demo's pretraining): the one recorded in
    ``directory`` (`runstate.PARENT_STATE`) with the same ``params``, reopened; else a new one with ``params``,
    recorded there (MLflow's params cannot change, so other settings are another parent run)."""
    from clipdr import tracking

    state = runstate.read(directory, runstate.PARENT_STATE)
    if state is not None and runstate.matches(state.fingerprint, runstate.fingerprint(params)):
        try:
            tracking.run_summary(state.mlflow_run_id, uri=cfg.tracking.uri)
        except tracking.RegistryError:  # recorded in another tracking store: a new parent in this one
            pass
        else:
            return tracking.Tracker.start(experiment, run_id=state.mlflow_run_id, uri=cfg.tracking.uri)
    tracker = tracking.Tracker.start(experiment, name, uri=cfg.tracking.uri, tags=dict(tags))
    tracker.log_params(params)
    Path(directory).mkdir(parents=True, exist_ok=True)
    runstate.write(directory, runstate.PARENT_STATE, runstate.RunState(tracker.run_id, runstate.fingerprint(params)))
    return tracker


def log_report(parent: Any, directory: str, files: Mapping[str, str | Callable[[Path], None]]) -> None:
    """Writes each of ``files`` into ``directory`` (text as is, or a function that draws into the path) and logs it
    as an artifact of the ``parent`` run: the report of a study or a sweep."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = out / name
        if callable(content):
            content(path)
        else:
            path.write_text(content)
        parent.log_artifact(path)


def train_all(
    configs: Mapping[str, Config], parallel_jobs: int, log: Callable[[str], None], parent_run_id: str = ""
) -> dict[str, Any]:
    """Trains ``configs`` (name -> config), ``parallel_jobs`` at a time from threads, each nested under
    ``parent_run_id``; every log line names its job. Each run's data order, initialisation and threads are fixed,
    so its result does not depend on its neighbour (`clipdr.demo`)."""
    from clipdr.train.run import run as train

    def one(name: str) -> Any:
        cfg = replace(configs[name], {"tracking.parent_run_id": parent_run_id}) if parent_run_id else configs[name]
        return train(cfg, log=lambda message: log(f"[{name}] {message}"))

    with concurrent.futures.ThreadPoolExecutor(parallel_jobs, thread_name_prefix="clipdr-job") as pool:
        return dict(zip(configs, pool.map(one, configs), strict=True))


def run(cfg: Config, log: Callable[[str], None] = print) -> StudyResult:
    """Runs the study of ``cfg.study`` on ``cfg.train`` (module docstring)."""
    from clipdr import tracking
    from clipdr.cluster import ensure_ray

    with tracking.pinned_uri(cfg.tracking.uri):
        ensure_ray()
        return run_study(cfg, log)


def run_study(
    cfg: Config,
    log: Callable[[str], None],
    reference_rows: Sequence[dict[str, Any]] = (),
    title: str = "",
    directory: str = "",
    parent_name: str = "",
) -> StudyResult:
    """The study, in a process whose tracking URI is pinned and that has joined Ray (`run`; the demo calls this).

    ``reference_rows`` (``{"run": label, metric: value, ...}``, e.g. the demo's teachers) are added to the table
    and drawn as dashed lines; ``directory`` (default `report_dir`) receives the report, ``parent_name`` (default
    study.name) names the parent run.
    """
    from clipdr import tracking

    sc = cfg.study
    check(sc)
    study_jobs = jobs(cfg)
    experiment = cfg.train.experiment
    directory = directory or report_dir(sc)
    params = {f"study.{k}": v for k, v in to_dict(sc).items()} | {"train.data": cfg.train.data}
    params |= {"train.model": cfg.train.model, "train.schedule.samples": cfg.train.schedule.samples}
    tags = {"clipdr.job": "study", STUDY_TAG: sc.name}
    parent = parent_run(cfg, directory, parent_name or sc.name, tags, params, experiment)
    log(
        f"study {sc.name!r}: {cfg.train.model} on {cfg.train.data}, modes {', '.join(sc.modes)} x seeds "
        f"{list(sc.seeds)} ({len(study_jobs)} runs, {sc.parallel_jobs} at a time), MLflow parent run {parent.run_id}"
    )
    try:
        results = train_all({j.name: j.cfg for j in study_jobs}, sc.parallel_jobs, log, parent.run_id)
        for job in study_jobs:  # a run found cached from another study joins this one: its report covers it
            child = tracking.open_run(results[job.name].mlflow_run_id, uri=cfg.tracking.uri)
            child.set_tags({STUDY_TAG: sc.name, tracking.PARENT_RUN_TAG: parent.run_id})
        scores = {job.name: _final_scores(cfg, results[job.name], log) for job in study_jobs}
        summary = summarize(cfg, study_jobs, results, scores)
        text = markdown(summary, reference_rows, title)
        parent.log_metrics(_parent_metrics(summary))
        log_report(
            parent,
            directory,
            {
                CURVE_FILE: lambda path: plot(summary, reference_rows, path),
                REPORT_FILE: text,
                SUMMARY_FILE: json.dumps(summary, indent=2, default=str),
            },
        )
    except BaseException:
        parent.finish_failed()
        raise
    parent.finish("FINISHED")
    log(text)
    out = Path(directory)
    log(f"study: report {out / REPORT_FILE}, plot {out / CURVE_FILE}, MLflow parent run {parent.run_id}")
    return StudyResult(parent.run_id, summary, results, text)


def _final_scores(cfg: Config, result: Any, log: Callable[[str], None]) -> Any:
    """The per-sample evaluation of a run's final model: the MLflow model it logged, the weights its final
    evaluation evaluated (the EMA, WiSE-FT applied). Kept beside the run (`runstate.FINAL_SCORES`) under the
    fingerprint of the model, the [evaluate] settings and the evaluation files (`_evaluation_files`): a later study
    of the same finished run reads it back instead of loading and evaluating the model again."""
    from clipdr.evaluate import engine, loading
    from clipdr.train.run import resolve_paths, run_dir

    resolved = resolve_paths(cfg)
    uri = storage.join(run_dir(resolved.train, result.run_name), runstate.FINAL_SCORES)
    evaluated = {"model": result.model_uri, "evaluate": to_dict(resolved.evaluate)}
    key = runstate.fingerprint(evaluated | {"files": _evaluation_files(resolved.evaluate)})
    report = read_scores(uri, key)
    if report is not None:
        log(f"study: {result.run_name}: final evaluation read from {uri}")
        return report
    device = engine.resolve_device(cfg.evaluate.device)
    loaded = loading.load(result.model_uri, device=device, tracking_uri=cfg.tracking.uri)
    report = engine.evaluate(loaded.model, loaded.name, cfg.evaluate, device, per_sample=True)
    write_scores(uri, key, report)
    log(f"study: {result.run_name}: final evaluation kept {len(report.per_sample)} per-sample metrics")
    return report


def _evaluation_files(ev: Any) -> list[list[Any]]:
    """What the evaluation reads, cheaply (listings, no reads but the suite file's): every file under each of
    [evaluate]'s zero-shot and retrieval folders with its size, and the suite file's fingerprint."""
    found: list[list[Any]] = []
    for folder in (*ev.zeroshot, *ev.retrieval):
        files = storage.list_files(folder, recursive=True)
        fs, _ = storage.resolve(folder)
        infos = fs.get_file_info([storage.resolve(f)[1] for f in files]) if files else []
        found += [[f, info.size] for f, info in zip(files, infos, strict=True)]
    if ev.suite:
        found.append([ev.suite, runstate.fingerprint(storage.read_bytes(ev.suite).decode())])
    return found


def write_scores(uri: str, key: str, report: Any) -> None:
    """Writes ``report`` (an `clipdr.evaluate.engine.EvalReport` with its per-sample scores) to ``uri`` as JSON,
    under the fingerprint ``key``."""
    per_sample = {
        name: {"group": s.group, "values": s.values.tolist(), "units": s.units.tolist(), "num_units": s.num_units}
        for name, s in report.per_sample.items()
    }
    payload = {"fingerprint": key, "metrics": report.metrics, "datasets": report.datasets, "per_sample": per_sample}
    storage.write_bytes(uri, json.dumps(payload).encode())


def read_scores(uri: str, key: str) -> Any:
    """The report `write_scores` wrote to ``uri`` under the fingerprint ``key``; None when there is none, or it was
    written for another model or other evaluation settings."""
    from clipdr.evaluate import engine

    if not storage.exists(uri):
        return None
    payload = json.loads(storage.read_bytes(uri))
    if payload.get("fingerprint") != key:
        return None
    per_sample = {
        name: stats.SampleScores(
            s["group"],
            np.asarray(s["values"], dtype=np.float64),
            np.asarray(s["units"], dtype=np.int64),
            s["num_units"],
        )
        for name, s in payload["per_sample"].items()
    }
    return engine.EvalReport(payload["metrics"], payload["datasets"], per_sample)


# --------------------------------------------------------------------------- statistics


def summarize(cfg: Config, study_jobs: Sequence[Job], results: Mapping[str, Any], reports: Mapping[str, Any]) -> dict:
    """The study's numbers (JSON-able): per mode and metric the seed mean and interval, gains over the baseline,
    the samples-to-match ratio, the curves' bands, and every run."""
    from clipdr import tracking
    from clipdr.evaluate import engine

    sc = cfg.study
    uri = tracking.tracking_uri(cfg.tracking.uri)
    by_mode: dict[str, list[Job]] = {mode: [j for j in study_jobs if j.mode == mode] for mode in sc.modes}
    first = reports[study_jobs[0].name]
    names = list(first.per_sample)
    weights = {sc.metric: engine.sample_mean_weights(sc.metric, names)}  # ValueError for an unknown metric
    partial = "partial/" if names and all(n.startswith("partial/") for n in names) else ""
    # Besides the headline: the means over tasks and over sets, and each task's top-1 (clip_benchmark's acc1).
    tasks = sorted(n for n in names if n.endswith("/top1"))
    for candidate in (f"{partial}zeroshot/mean_top1", f"{partial}{RETRIEVAL_METRIC}", *tasks):
        if candidate not in weights:
            try:
                weights[candidate] = engine.sample_mean_weights(candidate, names)
            except ValueError:  # no such datasets in this evaluation
                continue
    metric_list = list(weights)
    runs = {mode: [reports[j.name].per_sample for j in js] for mode, js in by_mode.items()}
    baseline = sc.modes[0]
    level, resamples = sc.confidence, sc.bootstrap_resamples

    metrics_out: dict[str, dict] = {}
    gains: dict[str, dict] = {}
    for i, metric in enumerate(metric_list):
        draws = stats.bootstrap_modes(runs, weights[metric], resamples, sc.bootstrap_seed + i)
        point = {mode: float(np.mean([stats.metric_of(r, weights[metric]) for r in rs])) for mode, rs in runs.items()}
        metrics_out[metric] = {
            mode: vars(Estimate(point[mode], *stats.percentile_interval(draws[mode], level))) for mode in sc.modes
        }
        gains[metric] = {}
        for mode in sc.modes[1:]:
            interval = stats.percentile_interval(draws[mode] - draws[baseline], level)  # paired on the samples
            gains[metric][mode] = vars(Estimate(point[mode] - point[baseline], *interval))

    curves: dict[str, dict[str, list[stats.Curve]]] = {}
    for key in dict.fromkeys((sc.metric, RETRIEVAL_METRIC)):
        if key != sc.metric and key not in first.metrics:
            continue
        curves[key] = {
            mode: [_curve(results[j.name].mlflow_run_id, key, uri) for j in js] for mode, js in by_mode.items()
        }
    bands = {
        key: {
            mode: vars(stats.curve_band(cs, resamples, sc.bootstrap_seed, level)) for mode, cs in per_mode.items() if cs
        }
        for key, per_mode in curves.items()
    }
    ratios = {}
    headline = curves[sc.metric]
    if all(c.samples for cs in headline.values() for c in cs):
        for mode in sc.modes[1:]:
            ratio = stats.samples_to_match(headline[baseline], headline[mode], resamples, sc.bootstrap_seed, level)
            ratios[mode] = vars(ratio)

    return {
        "name": sc.name,
        "metric": sc.metric,
        "baseline": baseline,
        "modes": list(sc.modes),
        "seeds": list(sc.seeds),
        "confidence": level,
        "bootstrap_resamples": resamples,
        "model": cfg.train.model,
        "data": cfg.train.data,
        "samples": cfg.train.schedule.samples,
        "metrics": metrics_out,
        "gains": gains,
        "sample_ratio": ratios,
        "bands": bands,
        "runs": [
            {
                "run": j.name,
                "mode": j.mode,
                "seed": j.seed,
                "run_id": results[j.name].mlflow_run_id,
                "samples_seen": results[j.name].samples_seen,
                **{m: stats.metric_of(reports[j.name].per_sample, weights[m]) for m in metric_list},
            }
            for j in study_jobs
        ],
    }


def _curve(run_id: str, key: str, uri: str) -> stats.Curve:
    from clipdr import tracking

    history = tracking.metric_history(run_id, key, uri=uri)
    return stats.Curve(tuple(s for s, _ in history), tuple(v for _, v in history))


def _parent_metrics(summary: dict) -> dict[str, float]:
    """The parent run's metrics: the headline's per-mode mean and interval, the gains and ratios."""
    metric = summary["metric"]
    out = {}
    for mode, e in summary["metrics"][metric].items():
        out |= {f"{mode}/{metric}": e["value"], f"{mode}/{metric}/low": e["low"], f"{mode}/{metric}/high": e["high"]}
    for mode, e in summary["gains"][metric].items():
        out |= {f"{mode}/gain": e["value"], f"{mode}/gain/low": e["low"], f"{mode}/gain/high": e["high"]}
    for mode, r in summary["sample_ratio"].items():
        out |= {f"{mode}/sample_ratio/low": r["low"], f"{mode}/sample_ratio/high": r["high"]}
        if r["point"] is not None:
            out[f"{mode}/sample_ratio"] = r["point"]
    return out


# --------------------------------------------------------------------------- report


def _pct(level: float) -> str:
    return f"{level:.0%}"


def conclusion(summary: dict) -> list[str]:
    """The headline sentences: each mode's gain over the baseline, whether its interval includes zero, its ratio."""
    metric, baseline, level = summary["metric"], summary["baseline"], summary["confidence"]
    seeds = len(summary["seeds"])
    lines = []
    for mode, g in summary["gains"][metric].items():
        gain = Estimate(**g)
        verdict = (
            f"the {_pct(level)} interval excludes zero: {mode} {'beats' if gain.value > 0 else 'trails'} {baseline}"
            if gain.excludes_zero
            else f"the {_pct(level)} interval includes zero: this study cannot tell {mode} from {baseline}"
        )
        lines.append(f"- {mode} - {baseline}, {metric}: {gain.text(sign=True)} ({verdict}; {seeds} seeds)")
        ratio = summary["sample_ratio"].get(mode)
        if ratio is not None:
            interval = f"[{ratio['low']:.2f}x, {ratio['high']:.2f}x]"
            if ratio["point"] is None:
                lines.append(f"- {mode} never reached {baseline}'s final {metric} (seed means); interval {interval}")
            else:
                lines.append(
                    f"- samples-to-match: {mode} reached {baseline}'s final {metric} with {ratio['point']:.2f}x fewer "
                    f"samples, interval {interval} over seeds"
                    + (f" (never reached in {ratio['unreached']:.0%} of resamples)" if ratio["unreached"] else "")
                )
    return lines


def markdown(summary: dict, reference_rows: Sequence[dict[str, Any]] = (), title: str = "") -> str:
    metric, level = summary["metric"], summary["confidence"]
    lines = [
        f"# {title or 'Study ' + repr(summary['name'])}: {metric} at equal samples seen",
        "",
        f"{summary['model']} on {summary['data']}, {summary['samples']:,} samples per run, modes "
        f"{', '.join(summary['modes'])} x seeds {summary['seeds']}. Means over seeds with {_pct(level)} bootstrap "
        f"intervals ({summary['bootstrap_resamples']:,} resamples of the evaluation samples and the seeds).",
        "",
        *conclusion(summary),
        "",
    ]
    metrics = list(summary["metrics"])
    short = [m.removeprefix("partial/").removeprefix("zeroshot/").removesuffix("/top1") for m in metrics]
    lines += ["| mode | " + " | ".join(short) + " |", "|---|" + "---|" * len(metrics)]
    for mode in summary["modes"]:
        cells = [Estimate(**summary["metrics"][m][mode]).text() for m in metrics]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    for row in reference_rows:
        lines.append(f"| {row['run']} | " + " | ".join(f"{row[m]:.3f}" if m in row else "-" for m in metrics) + " |")
    lines += ["", "Runs (final evaluation):", "", "| run | mode | seed | " + " | ".join(short) + " |"]
    lines += ["|---|---|---|" + "---|" * len(metrics)]
    for row in summary["runs"]:
        cells = " | ".join(f"{row[m]:.3f}" for m in metrics)
        lines.append(f"| {row['run']} | {row['mode']} | {row['seed']} | {cells} |")
    band_text = f"seed mean [{_pct(level)} band over seeds]"
    lines += ["", f"Learning curves ({metric} vs samples seen, {band_text}): {CURVE_FILE}"]
    for mode, band in summary["bands"].get(metric, {}).items():
        points = ", ".join(
            f"{s:,}: {m:.3f} [{lo:.3f}, {hi:.3f}]"
            for s, m, lo, hi in zip(band["samples"], band["mean"], band["low"], band["high"], strict=True)
        )
        lines.append(f"- {mode}: {points}")
    return "\n".join(lines) + "\n"


def plot(summary: dict, reference_rows: Sequence[dict[str, Any]], path: Path) -> None:
    """One panel per curve metric: each mode's seed-mean curve with its band, reference rows dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = summary["bands"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (metric, bands) in zip(axes[0], panels.items(), strict=True):
        for mode, band in bands.items():
            label = f"{mode} ({len(summary['seeds'])} seeds)"
            (line,) = ax.plot(band["samples"], band["mean"], marker="o", label=label)
            ax.fill_between(band["samples"], band["low"], band["high"], color=line.get_color(), alpha=0.2)
        for row in reference_rows:
            if metric in row:
                ax.axhline(row[metric], linestyle="--", linewidth=1, color="grey")
                ax.annotate(
                    row["run"],
                    (0.99, row[metric]),
                    xycoords=("axes fraction", "data"),
                    ha="right",
                    va="bottom",
                    fontsize=7,
                    color="grey",
                )
        ax.set_xlabel("samples seen")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    fig.suptitle(f"{summary['name']}: seed mean, {_pct(summary['confidence'])} band over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
