"""The demo end to end at toy sizes: every stage runs for real, lands in MLflow, and a second run is all cache."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from clipdr import demo
from clipdr.config import (
    CaptionerConfig,
    Config,
    DemoConfig,
    EvaluateConfig,
    ReinforceConfig,
    ReinforceResources,
    SynthConfig,
    TeacherConfig,
    TrackingConfig,
    TrainCheckpoint,
    TrainConfig,
    TrainResources,
    TrainSchedule,
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
            eval_every=128,
            schedule=TrainSchedule(samples=256, batch_size=32, warmup_samples=32),
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
        tracking=TrackingConfig(uri=f"sqlite:///{root}/mlflow.db"),
    )


def test_demo_runs_every_stage_into_mlflow_and_caches(tmp_path, ray_local):
    cfg = toy_config(tmp_path)
    messages: list[str] = []
    report = demo.run(cfg, log=messages.append)

    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.demo.experiment)
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert {"teacher-vit", "captioner", "student-clip", "student-reinforced", "demo-report"} <= set(runs)
    assert all(r.info.status == "FINISHED" for r in runs.values())
    for name in ("student-clip", "student-reinforced"):
        steps = [m.step for m in client.get_metric_history(runs[name].info.run_id, "zeroshot/mean_top1")]
        assert steps == [128, 256]  # evaluated every eval_every samples seen
    for name in ("teacher-vit", "student-clip", "student-reinforced"):  # clip on raw shards: the teacher
        losses = [
            m.value
            for m in sorted(client.get_metric_history(runs[name].info.run_id, "train/loss"), key=lambda m: m.step)
        ]
        assert len(losses) == 4 and min(losses[1:]) < losses[0], (name, losses)
    assert "train/caption_loss" in runs["captioner"].data.metrics
    assert "zeroshot/mean_top1" in runs["teacher-vit"].data.metrics
    assert client.get_run(report["report_run_id"]).data.metrics.keys() >= {"clip_final", "reinforced_final", "gain"}
    artifacts = {a.path for a in client.list_artifacts(report["report_run_id"])}
    assert {"learning_curves.png", "report.md", "report.json"} <= artifacts
    assert (tmp_path / "demo" / "report" / "learning_curves.png").stat().st_size > 10_000
    assert any("mlflow ui --backend-store-uri" in m for m in messages)
    # Both students were registered; the gate made one of them champion and said why.
    versions = client.search_model_versions("name = 'clipdr-demo-student'")
    assert len(versions) == 2
    champion = client.get_model_version_by_alias("clipdr-demo-student", "champion")
    assert champion.tags["gate.promoted"] == "true" and champion.tags["gate.reason"]
    assert sum(m.startswith("lifecycle: ") for m in messages) == 2

    # Everything is cached: a second run trains nothing and reinforces nothing, and only adds a report run.
    messages.clear()
    demo.run(cfg, log=messages.append)
    finished = [m for m in messages if "] train: run" in m and "is complete" in m]
    assert len(finished) == 4  # teacher, captioner, two students
    assert any("is already complete: nothing to do" in m for m in messages)  # the reinforced dataset
    reruns = client.search_runs([experiment.experiment_id])
    assert len(reruns) == len(runs) + 1


def test_sample_ratio_interpolates_between_evaluations():
    curve = demo.Curve(samples=(100, 200, 300), values=(0.2, 0.4, 0.5))
    assert curve.samples_to_reach(0.3) == pytest.approx(150)
    assert curve.samples_to_reach(0.1) == 100
    assert curve.samples_to_reach(0.6) is None
