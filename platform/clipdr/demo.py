"""The one-command demo: the whole lifecycle on the embedded default, as a miniature of the paper.

    synthesize the world
    -> train two teachers of different architectures and a CoCa captioner on the clean teacher corpus
    -> reinforce the noisy student corpus with them (stored views, teacher embeddings, synthetic captions)
    -> train the same student per mode (clip, reinforced, ...) for the same samples seen, evaluating as it goes
    -> compare: a table, the samples the reinforced student needs to match the plain one, a learning-curve plot

Every stage is a real job (`synthetic.generate`, `train.run.run` on Ray Train, `reinforce.run.run` on Ray Data)
and caches its product: the world has ``world.json``, a finished training run its result (`clipdr.runstate`), the
reinforced dataset its manifest; a second `run` skips what is done. Every run goes to one MLflow experiment.

The training jobs of a stage run ``demo.parallel_jobs`` at a time, from threads of this process: much of a Ray
Train job's start-up on a small machine is one process waiting for another to start, which a second job fills.
Each run's data order, initialisation and thread count are fixed, so its result does not depend on its neighbour.
Jobs in threads rather than processes share this driver's imports and its Ray job's warm workers; what the library
keeps per process is per call (a stream's Ray Data options live on the stream), and the one process-wide setting
the jobs share, MLflow's tracking URI, is pinned for the whole demo (`tracking.pinned_uri`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipdr import checkpoint, storage
from clipdr.config import Config, replace
from clipdr.train.plan import Mode

CURVE_FILE = "learning_curves.png"
REPORT_FILE = "report.md"
RETRIEVAL_METRIC = "retrieval/mean_recall"  # mean of R@1/5/10 both ways over the retrieval sets


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


def _stage(cfg: Config, train_changes: dict[str, object]) -> Config:
    """``cfg`` with ``train_changes`` (dotted keys of [train]: ``{"schedule.samples": 1024}``)."""
    return replace(cfg, {f"train.{key}": value for key, value in train_changes.items()})


def _train_base(cfg: Config) -> Config:
    """The demo's training settings common to every stage: runs under <demo.output>/runs, one experiment."""
    return _stage(
        cfg, {"output": storage.join(cfg.demo.output, "runs"), "experiment": cfg.demo.experiment, "evaluate": True}
    )


def pretraining_jobs(cfg: Config) -> dict[str, Config]:
    """The teachers' and the captioner's training jobs (name -> config): plain CLIP from scratch on the clean teacher
    corpus (a CoCa adds its caption loss)."""
    demo, base = cfg.demo, _train_base(cfg)
    teacher_corpus = storage.join(cfg.synth.output, "teacher")

    def pretrain(model: str, samples: int, batch_size: int, lr: float, run_name: str, evaluate: bool) -> Config:
        return _stage(
            base,
            {
                "data": teacher_corpus,
                "mode": Mode.CLIP,
                "loss.kd_weight": 0.0,
                "model": model,
                "pretrained": "",
                "schedule.samples": samples,
                "schedule.batch_size": batch_size,
                "optimizer.lr": lr,
                "run_name": run_name,
                "evaluate": evaluate,
                "eval_every": 0,
            },
        )

    jobs = {
        f"teacher-{t.name}": pretrain(
            t.model, demo.teacher_samples, demo.teacher_batch_size, demo.teacher_lr, f"teacher-{t.name}", True
        )
        for t in cfg.reinforce.teachers
    }
    jobs["captioner"] = pretrain(
        cfg.reinforce.captioner.model,
        demo.captioner_samples,
        demo.captioner_batch_size,
        demo.captioner_lr,
        "captioner",
        False,
    )
    return jobs


def student_jobs(cfg: Config) -> dict[str, Config]:
    """The student's training jobs (name -> config), one per mode of ``demo.modes``, on the reinforced dataset."""
    base = _train_base(cfg)
    return {
        f"student-{mode}": _stage(
            base,
            {
                "data": cfg.reinforce.output,
                "mode": mode,
                "loss.kd_weight": cfg.train.loss.kd_weight if Mode(mode).distils else 0.0,
                "run_name": f"student-{mode}",
                "register": cfg.demo.registered_model,
            },
        )
        for mode in cfg.demo.modes
    }


def run(cfg: Config, log: Callable[[str], None] = print) -> dict:
    """Runs the demo (module docstring); returns the comparison (also written to <demo.output>/report)."""
    from clipdr import tracking

    with tracking.pinned_uri(cfg.tracking.uri):
        return _run(cfg, log)


def _run(cfg: Config, log: Callable[[str], None]) -> dict:
    from clipdr import lifecycle
    from clipdr.cluster import ensure_ray
    from clipdr.data import synthetic
    from clipdr.reinforce.run import run as reinforce
    from clipdr.train.run import run as train

    demo = cfg.demo
    if demo.parallel_jobs < 1:
        raise ValueError(f"demo.parallel_jobs must be >= 1, got {demo.parallel_jobs}")
    started = time.monotonic()
    step = iter(range(1, 6))

    def stage(message: str) -> None:
        log(f"demo {next(step)}/5 [{time.monotonic() - started:5.0f} s]: {message}")

    def train_all(jobs: dict[str, Config]) -> dict[str, Any]:
        """Trains ``jobs`` (name -> config), ``demo.parallel_jobs`` at a time; every log line names its job."""

        def one(name: str) -> Any:
            return train(jobs[name], log=lambda message: log(f"[{name}] {message}"))

        with concurrent.futures.ThreadPoolExecutor(demo.parallel_jobs, thread_name_prefix="demo-job") as pool:
            return dict(zip(jobs, pool.map(one, jobs), strict=True))

    stage(f"synthetic world -> {cfg.synth.output}")
    synthetic.generate(cfg.synth, progress=log)
    ensure_ray()
    jobs = pretraining_jobs(cfg)
    captioner = cfg.reinforce.captioner
    names = ", ".join(f"{t.name!r} ({t.model})" for t in cfg.reinforce.teachers)
    stage(
        f"teachers {names} (plain CLIP) and the captioner ({captioner.model}, CoCa: + caption loss) on the clean "
        f"teacher corpus, {demo.parallel_jobs} jobs at a time"
    )
    pretrained = train_all(jobs)
    results = {f"teacher {t.name} ({t.model})": pretrained[f"teacher-{t.name}"] for t in cfg.reinforce.teachers}
    reinforce_cfg = dataclasses.replace(
        cfg.reinforce,
        teachers=tuple(
            dataclasses.replace(t, pretrained=checkpoint.model_file(pretrained[f"teacher-{t.name}"].checkpoint))
            for t in cfg.reinforce.teachers
        ),
        captioner=dataclasses.replace(captioner, pretrained=checkpoint.model_file(pretrained["captioner"].checkpoint)),
    )

    stage(f"reinforce the noisy student corpus -> {reinforce_cfg.output}")
    reinforce(dataclasses.replace(cfg, reinforce=reinforce_cfg), log=log)

    stage(
        f"student {cfg.train.model!r}, modes {', '.join(demo.modes)}, {cfg.train.schedule.samples} samples each, "
        f"{demo.parallel_jobs} jobs at a time"
    )
    students = train_all(student_jobs(cfg))
    for mode in demo.modes:  # in mode order, so that the gate's decisions do not depend on which job ended first
        result = students[f"student-{mode}"]
        results[f"student {mode}"] = result
        if demo.registered_model and result.registered_version:
            # Each new student version is the candidate; the gate makes it champion only if it beats the champion.
            decision = lifecycle.promote(
                demo.registered_model, result.registered_version, demo.metric, uri=cfg.tracking.uri
            )
            log(f"lifecycle: {decision.reason}")

    stage("compare")
    report = compare(cfg, results, log)
    log(f"demo finished in {time.monotonic() - started:.0f} s")
    return report


def compare(cfg: Config, results: dict, log: Callable[[str], None] = print) -> dict:
    """The comparison table, sample-efficiency ratio and learning-curve plot, logged to a ``demo-report`` run."""
    from clipdr import tracking

    demo = cfg.demo
    uri = tracking.tracking_uri(cfg.tracking.uri)
    metric = demo.metric
    rows = []
    curves: dict[str, Curve] = {}
    retrieval_curves: dict[str, Curve] = {}
    for label, result in results.items():
        metrics = tracking.run_summary(result.mlflow_run_id, uri=uri).metrics
        rows.append(
            {
                "run": label,
                "run_id": result.mlflow_run_id,
                "samples_seen": result.samples_seen,
                **{k: v for k, v in sorted(metrics.items()) if k.startswith(("zeroshot/", "retrieval/"))},
            }
        )
        if label.startswith("student"):
            mode = label.removeprefix("student ")
            for key in (metric, RETRIEVAL_METRIC):
                history = tracking.metric_history(result.mlflow_run_id, key, uri=uri)
                curve = Curve(tuple(s for s, _ in history), tuple(v for _, v in history))
                (curves if key == metric else retrieval_curves)[mode] = curve

    summary: dict = {"metric": metric, "rows": rows}
    if Mode.CLIP in curves and Mode.REINFORCED in curves and curves[Mode.CLIP].values:
        clip_final = curves[Mode.CLIP].values[-1]
        reinforced_final = curves[Mode.REINFORCED].values[-1]
        reached = curves[Mode.REINFORCED].samples_to_reach(clip_final)
        summary |= {
            "clip_final": clip_final,
            "reinforced_final": reinforced_final,
            "gain": reinforced_final - clip_final,
            "reinforced_samples_to_clip_final": reached,
            "sample_ratio": (curves["clip"].samples[-1] / reached) if reached else None,
        }

    out_dir = Path(storage.join(demo.output, "report"))
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot({metric: curves, RETRIEVAL_METRIC: retrieval_curves}, rows, out_dir / CURVE_FILE)
    text = _markdown(summary, curves)
    (out_dir / REPORT_FILE).write_text(text)
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2, default=str))

    with tracking.Tracker.start(demo.experiment, "demo-report", uri=cfg.tracking.uri, tags={"clipdr.job": "demo"}) as t:
        if "gain" in summary:
            t.log_metrics({k: summary[k] for k in ("clip_final", "reinforced_final", "gain") if summary[k] is not None})
        for name in (CURVE_FILE, REPORT_FILE, "report.json"):
            t.log_artifact(out_dir / name)
        summary["report_run_id"] = t.run_id
    log(text)
    experiment_id = tracking.experiment_id(demo.experiment, uri=uri)
    log(
        f"report: {out_dir / REPORT_FILE}, plot: {out_dir / CURVE_FILE}\n"
        f"open the runs in the MLflow UI (then http://127.0.0.1:5000/#/experiments/{experiment_id}):\n"
        f"  .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000"
    )
    return summary


def _markdown(summary: dict, curves: dict[str, Curve]) -> str:
    metric = summary["metric"]
    rows = summary["rows"]
    found = sorted({k for row in rows for k in row})
    keys = [k for k in found if k.startswith("zeroshot/") and k.endswith("top1")]
    keys += [k for k in found if k.startswith("retrieval/") and k.endswith("_R1")]
    lines = [f"# Demo: {metric} at equal samples seen", ""]
    if "gain" in summary:
        reached = summary["reinforced_samples_to_clip_final"]
        lines += [
            f"- plain CLIP student, final: {summary['clip_final']:.3f}",
            f"- reinforced student, final: {summary['reinforced_final']:.3f} "
            f"({summary['gain']:+.3f}, {summary['gain'] / max(summary['clip_final'], 1e-9):+.0%})",
            (
                f"- the reinforced student reached the plain student's final {metric} after {reached:,.0f} samples: "
                f"{summary['sample_ratio']:.1f}x fewer"
                if reached
                else f"- the reinforced student never reached the plain student's final {metric}"
            ),
            "",
        ]
    short = [k.removeprefix("zeroshot/").removesuffix("/top1").removeprefix("retrieval/") for k in keys]
    lines += ["| run | samples | " + " | ".join(short) + " |", "|---|---|" + "---|" * len(keys)]
    for row in rows:
        values = " | ".join(f"{row[k]:.3f}" if k in row else "-" for k in keys)
        lines.append(f"| {row['run']} | {row['samples_seen']:,} | {values} |")
    lines += ["", f"Learning curves ({metric} vs samples seen): " + CURVE_FILE]
    for mode, curve in curves.items():
        points = ", ".join(f"{s:,}: {v:.3f}" for s, v in zip(curve.samples, curve.values, strict=True))
        lines.append(f"- {mode}: {points}")
    return "\n".join(lines) + "\n"


def _plot(panels: dict[str, dict[str, Curve]], rows: list[dict], path: Path) -> None:
    """One panel per metric: each student mode's curve against samples seen, the teachers' final values dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (metric, curves) in zip(axes[0], panels.items(), strict=True):
        for mode, curve in curves.items():
            ax.plot(curve.samples, curve.values, marker="o", label=f"student, {mode}")
        for row in rows:
            if row["run"].startswith("teacher") and metric in row:
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
    fig.suptitle("clipdr demo: reinforced vs plain CLIP student at equal samples seen")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
