"""The one-command demo: the whole lifecycle on the embedded default, as a miniature of the paper.

    synthesize the world
    -> train two teachers of different architectures and a CoCa captioner on the clean teacher corpus
    -> reinforce the noisy student corpus with them (stored views, teacher embeddings, synthetic captions)
    -> a study (`clipdr.study`): the same student per mode (clip, reinforced, ...) and seed (study.seeds) for the
       same samples seen, evaluating as it goes; the seed means with bootstrap intervals, the gain with its interval
       (the report says when it includes zero), the samples the reinforced student needs to match the plain one, and
       learning curves with bands

Every stage is a real job (`synthetic.generate`, `train.run.run` on Ray Train, `reinforce.run.run` on Ray Data)
and caches its product: the world has ``world.json``, a finished training run its result (`clipdr.runstate`), the
reinforced dataset its manifest; a second `run` skips what is done. Every run goes to one MLflow experiment, the
teachers and the captioner nested under a parent run ``demo-pretraining``, the students under ``demo-report`` (the
study's parent, which holds the report).

The training jobs of a stage run ``demo.parallel_jobs`` at a time, from threads of this process: much of a Ray
Train job's start-up on a small machine is one process waiting for another to start, which a second job fills.
Each run's data order, initialisation and thread count are fixed, so its result does not depend on its neighbour.
Jobs in threads rather than processes share this driver's imports and its Ray job's warm workers; what the library
keeps per process is per call (a stream's Ray Data options live on the stream), and the one process-wide setting
the jobs share, MLflow's tracking URI, is pinned for the whole demo (`tracking.pinned_uri`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from clipdr import checkpoint, storage, study
from clipdr.config import Config, replace
from clipdr.train.plan import Mode

STUDENT = "student"  # the student study's name: its runs are student-<mode>[-seed<s>]
PRETRAINING = "demo-pretraining"  # the parent run of the teachers and the captioner
REPORT_RUN = "demo-report"  # the parent run of the students: the study, with the report


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


def student_study(cfg: Config) -> Config:
    """The student stage as a study (`clipdr.study`): the [train] student on the reinforced dataset, in each mode of
    ``demo.modes`` for each seed of ``study.seeds``, the first seed's runs registered as ``demo.registered_model``."""
    base = _stage(_train_base(cfg), {"data": cfg.reinforce.output, "register": cfg.demo.registered_model})
    demo = cfg.demo
    return replace(
        base,
        {
            "study.name": STUDENT,
            "study.modes": list(demo.modes),
            "study.metric": demo.metric,
            "study.parallel_jobs": demo.parallel_jobs,
        },
    )


def student_jobs(cfg: Config) -> dict[str, Config]:
    """The student's training jobs (name -> config): ``student-<mode>`` for the first seed, ``-seed<s>`` after."""
    return {job.name: job.cfg for job in study.jobs(student_study(cfg))}


def run(cfg: Config, log: Callable[[str], None] = print) -> dict:
    """Runs the demo (module docstring); returns the comparison (also written to <demo.output>/report)."""
    from clipdr import tracking

    with tracking.pinned_uri(cfg.tracking.uri):
        return _run(cfg, log)


def _run(cfg: Config, log: Callable[[str], None]) -> dict:
    from clipdr import lifecycle, tracking
    from clipdr.cluster import ensure_ray
    from clipdr.data import synthetic
    from clipdr.reinforce.run import run as reinforce

    demo = cfg.demo
    if demo.parallel_jobs < 1:
        raise ValueError(f"demo.parallel_jobs must be >= 1, got {demo.parallel_jobs}")
    students = student_study(cfg)
    study.check(students.study)  # before an hour of work, not after
    started = time.monotonic()
    step = iter(range(1, 5))

    def stage(message: str) -> None:
        log(f"demo {next(step)}/4 [{time.monotonic() - started:5.0f} s]: {message}")

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
    parent = study.parent_run(
        cfg,
        storage.join(demo.output, "runs"),
        PRETRAINING,
        {"clipdr.job": "demo"},
        {"jobs": list(jobs)},
        demo.experiment,
    )
    try:
        pretrained = study.train_all(jobs, demo.parallel_jobs, log, parent.run_id)
    except BaseException:
        parent.finish_failed()
        raise
    parent.finish("FINISHED")
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

    sc = students.study
    stage(
        f"student {cfg.train.model!r}: a study of modes {', '.join(sc.modes)} x seeds {list(sc.seeds)}, "
        f"{cfg.train.schedule.samples} samples each, {demo.parallel_jobs} jobs at a time"
    )
    uri = tracking.tracking_uri(cfg.tracking.uri)
    teachers = []
    for t in cfg.reinforce.teachers:
        result = pretrained[f"teacher-{t.name}"]
        metrics = tracking.run_summary(result.mlflow_run_id, uri=uri).metrics
        teachers.append({"run": f"teacher {t.name} ({t.model})", "run_id": result.mlflow_run_id, **metrics})
    found = study.run_study(
        students,
        log,
        reference_rows=teachers,
        title="Demo",
        directory=storage.join(demo.output, "report"),
        parent_name=REPORT_RUN,
    )
    for mode in sc.modes:  # in mode order, so that the gate's decisions do not depend on which job ended first
        result = found.results[f"{STUDENT}-{mode}"]
        if demo.registered_model and result.registered_version:
            # Each new student version is the candidate; the gate makes it champion only if it beats the champion.
            decision = lifecycle.promote(
                demo.registered_model, result.registered_version, demo.metric, uri=cfg.tracking.uri
            )
            log(f"lifecycle: {decision.reason}")
    experiment_id = tracking.experiment_id(demo.experiment, uri=uri)
    log(
        f"demo finished in {time.monotonic() - started:.0f} s\n"
        f"open the runs in the MLflow UI (then http://127.0.0.1:5000/#/experiments/{experiment_id}; the student runs "
        f"are nested under {REPORT_RUN!r}: expand it, select them, Compare):\n"
        f"  .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000"
    )
    return {**found.summary, "report_run_id": found.parent_run_id, "teachers": teachers}
