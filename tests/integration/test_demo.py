"""The demo end to end at toy sizes: every stage runs for real, lands in MLflow, and a second run is all cache."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from clipdr import cli, demo, study
from clipdr.config import (
    CaptionerConfig,
    Config,
    DemoConfig,
    EvaluateConfig,
    ReinforceConfig,
    ReinforceResources,
    StudyConfig,
    SynthConfig,
    TeacherConfig,
    TrackingConfig,
    TrainCheckpoint,
    TrainConfig,
    TrainResources,
    TrainSchedule,
    to_dict,
)
from clipdr.models.captioners import TINY_COCA

pytestmark = pytest.mark.integration


def toy_config(root) -> Config:
    world = root / "world"
    return Config(
        synth=SynthConfig(
            output=str(world),
            image_size=32,
            num_teacher=256,
            num_student=128,
            num_zeroshot=64,
            num_retrieval=32,
            shard_size=128,
        ),
        reinforce=ReinforceConfig(
            source=str(world / "student"),
            output=str(root / "reinforced"),
            num_augmentations=2,
            num_syn_captions=1,
            teachers=(TeacherConfig(name="vit", model="clipdr-tiny-vit", logit_scale=100.0),),
            captioner=CaptionerConfig(model=TINY_COCA, pretrained="", max_len=8),
            resources=ReinforceResources(batch_size=64),
        ),
        train=TrainConfig(
            model="clipdr-tiny-vit",
            log_every=2,
            # One epoch of the 128 student rows in 8 steps: a second epoch is a second read of the data (and its
            # footer actor) per fit, which no claim needs.
            eval_every=64,
            schedule=TrainSchedule(samples=128, batch_size=16, warmup_samples=16),
            checkpoint=TrainCheckpoint(every=8),
            resources=TrainResources(workers=1, max_failures=0),
        ),
        evaluate=EvaluateConfig(zeroshot=(str(world / "zeroshot"),), retrieval=(str(world / "retrieval"),)),
        demo=DemoConfig(
            output=str(root / "demo"),
            teacher_samples=256,
            teacher_batch_size=32,
            captioner_samples=64,
            captioner_batch_size=32,
        ),
        study=StudyConfig(seeds=(0, 1), bootstrap_resamples=200),
        tracking=TrackingConfig(uri=f"sqlite:///{root}/mlflow.db"),
    )


def _toml(table: dict, prefix: str = "") -> str:
    """``table`` (a `to_dict` of config sections) as TOML: enough of it for the sections a stage reads."""
    values = {k: v for k, v in table.items() if not isinstance(v, dict)}
    lines = [f"[{prefix}]"] if prefix and values else []
    lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    for key, sub in table.items():
        if isinstance(sub, dict):
            lines.append(_toml(sub, f"{prefix}.{key}" if prefix else key))
    return "\n".join(lines)


def test_demo_runs_every_stage_into_mlflow_and_caches(tmp_path, ray_local, capsys):
    cfg = toy_config(tmp_path)
    messages: list[str] = []
    report = demo.run(cfg, log=messages.append)

    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.demo.experiment)
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    students = ["student-clip", "student-clip-seed1", "student-reinforced", "student-reinforced-seed1"]
    assert {"teacher-vit", "captioner", *students, "demo-report", "demo-pretraining"} == set(runs)
    assert all(r.info.status == "FINISHED" for r in runs.values())
    # Grouped in the UI: the students nested under the report (the study), the teachers under the pretraining.
    parent = {name: r.data.tags.get("mlflow.parentRunId") for name, r in runs.items()}
    assert {parent[name] for name in students} == {runs["demo-report"].info.run_id}
    assert parent["teacher-vit"] == parent["captioner"] == runs["demo-pretraining"].info.run_id
    for name in students:
        steps = [m.step for m in client.get_metric_history(runs[name].info.run_id, "zeroshot/mean_top1")]
        assert steps == [64, 128]  # evaluated every eval_every samples seen
    for name in ("teacher-vit", *students):  # clip on raw shards: the teacher
        losses = [
            m.value
            for m in sorted(client.get_metric_history(runs[name].info.run_id, "train/loss"), key=lambda m: m.step)
        ]
        assert len(losses) == 4 and min(losses[1:]) < losses[0], (name, losses)
    assert "train/caption_loss" in runs["captioner"].data.metrics
    assert "zeroshot/mean_top1" in runs["teacher-vit"].data.metrics
    metric = cfg.demo.metric
    logged = client.get_run(report["report_run_id"]).data.metrics
    assert logged.keys() >= {f"clip/{metric}", "reinforced/gain", "reinforced/gain/low", "reinforced/gain/high"}
    gain = report["gains"][metric]["reinforced"]
    assert gain["low"] <= gain["value"] <= gain["high"]
    means = report["metrics"][metric]
    assert gain["value"] == pytest.approx(means["reinforced"]["value"] - means["clip"]["value"])
    # The study's own final evaluation (per-sample scores) gives each run's last logged value: same model, same data.
    for row in report["runs"]:
        assert row[metric] == pytest.approx(runs[row["run"]].data.metrics[metric], abs=1e-6), row["run"]
    text = (tmp_path / "demo" / "report" / "report.md").read_text()
    assert ("interval includes zero" in text) == (gain["low"] <= 0 <= gain["high"])
    artifacts = {a.path for a in client.list_artifacts(report["report_run_id"])}
    assert {"learning_curves.png", "report.md", "report.json"} <= artifacts
    assert (tmp_path / "demo" / "report" / "learning_curves.png").stat().st_size > 10_000
    assert any("mlflow ui --backend-store-uri" in m for m in messages)
    # Both students were registered; the gate made one of them champion and said why.
    versions = client.search_model_versions("name = 'clipdr-demo-student'")
    assert len(versions) == 2  # the first seed's runs
    champion = client.get_model_version_by_alias("clipdr-demo-student", "champion")
    assert champion.tags["gate.promoted"] == "true" and champion.tags["gate.reason"]
    assert sum(m.startswith("lifecycle: ") for m in messages) == 2

    # Everything is cached: a second run trains nothing and reinforces nothing, and only adds a report run.
    messages.clear()
    demo.run(cfg, log=messages.append)
    finished = [m for m in messages if "] train: run" in m and "is complete" in m]
    assert len(finished) == 6  # teacher, captioner, four students
    assert any("is already complete: nothing to do" in m for m in messages)  # the reinforced dataset
    # Nor evaluates: each student's per-sample final scores are read back from beside its run.
    assert sum("final evaluation read from" in m for m in messages) == 4
    assert not any("final evaluation kept" in m for m in messages)
    reruns = client.search_runs([experiment.experiment_id])
    assert len(reruns) == len(runs)  # the parents are reopened, not duplicated

    # `clipdr study` on the demo's reinforced data: the same runs (cached), a report of its own.
    students_cfg = demo.student_study(cfg)
    sections = {k: v for k, v in to_dict(students_cfg).items() if k in ("train", "augment", "evaluate", "tracking")}
    (tmp_path / "study.toml").write_text(_toml(sections))
    capsys.readouterr()
    assert cli.main(["study", "--config", str(tmp_path / "study.toml"), *_sets(students_cfg, tmp_path)]) == 0
    assert capsys.readouterr().out.count("final evaluation read from") == 4  # another report folder, the same runs
    found = json.loads((tmp_path / "pilot" / "student" / study.SUMMARY_FILE).read_text())
    assert found["gains"] == report["gains"]  # same runs, same bootstrap seed


def _sets(cfg, root) -> list[str]:
    sc = cfg.study
    values = {
        "study.name": sc.name,
        "study.output": str(root / "pilot"),
        "study.modes": json.dumps(list(sc.modes)),
        "study.seeds": json.dumps(list(sc.seeds)),
        "study.bootstrap_resamples": str(sc.bootstrap_resamples),
    }
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]
