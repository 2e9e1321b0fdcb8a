"""Model lifecycle against a real MLflow SQLite store: candidate -> evaluation -> promotion gate -> champion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from clipdr import lifecycle, models, tracking
from clipdr.cli import main
from clipdr.config import Config, EvaluateConfig, LifecycleConfig, SynthConfig
from clipdr.data import synthetic
from clipdr.evaluate import engine
from clipdr.evaluate import run as evaluate_run

pytestmark = pytest.mark.integration

METRIC = "zeroshot/mean_top1"
NAME = "clipdr-test"  # each test registers its own model: the store is shared (creating one costs seconds)


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(folder)
        yield uri


@pytest.fixture
def store(shared_store, request, monkeypatch):
    monkeypatch.setitem(globals(), "NAME", f"model-{request.node.name.removeprefix('test_')[:40]}")
    return shared_store


def new_version(store: str, value: float | None) -> str:
    """A training run recording ``METRIC`` (unless None) and a registered version of it; returns the version."""
    with tracking.Tracker.start("clipdr-train", "student") as tracker:
        if value is not None:
            tracker.log_metrics({METRIC: value}, step=100)
    client = MlflowClient(store)
    if not client.search_registered_models(f"name = '{NAME}'"):
        client.create_registered_model(NAME)
    mv = client.create_model_version(NAME, source=f"runs:/{tracker.run_id}/model", run_id=tracker.run_id)
    return str(mv.version)


def aliases(store: str) -> dict[str, str]:
    return {alias: str(v) for alias, v in MlflowClient(store).get_registered_model(NAME).aliases.items()}


def test_first_version_is_promoted_and_says_so(store):
    version = new_version(store, 0.5)
    lifecycle.mark_candidate(NAME, version)
    decision = lifecycle.promote(NAME, metric=METRIC)
    assert decision.promoted and decision.version == version and decision.champion_version is None
    assert "no champion yet" in decision.reason and "0.5000" in decision.reason
    assert aliases(store) == {"candidate": version, "champion": version}
    tags = MlflowClient(store).get_model_version(NAME, version).tags
    assert tags["gate.promoted"] == "true" and tags["gate.reason"] == decision.reason


def test_gate_promotes_a_better_candidate_and_keeps_a_worse_one_out(store):
    first = new_version(store, 0.5)
    lifecycle.mark_candidate(NAME, first)
    lifecycle.promote(NAME, metric=METRIC)

    better = new_version(store, 0.625)
    lifecycle.mark_candidate(NAME, better)
    up = lifecycle.promote(NAME, metric=METRIC)
    assert up.promoted and (up.candidate_value, up.champion_version, up.champion_value) == (0.625, first, 0.5)
    assert "0.6250" in up.reason and "0.5000" in up.reason and "+0.1250" in up.reason
    assert aliases(store)["champion"] == better

    worse = new_version(store, 0.55)
    lifecycle.mark_candidate(NAME, worse)
    down = lifecycle.promote(NAME, metric=METRIC)
    assert not down.promoted and (down.candidate_value, down.champion_value) == (0.55, 0.625)
    assert down.reason.startswith("not promoted") and "0.5500" in down.reason and "0.6250" in down.reason
    assert aliases(store) == {"candidate": worse, "champion": better}
    assert MlflowClient(store).get_model_version(NAME, worse).tags["gate.promoted"] == "false"

    # A margin: 0.65 beats 0.625, but not by more than 0.05.
    close = new_version(store, 0.65)
    assert not lifecycle.promote(NAME, close, METRIC, min_delta=0.05).promoted
    assert aliases(store)["champion"] == better


def test_unevaluated_candidate_is_not_promoted(store):
    version = new_version(store, None)
    decision = lifecycle.promote(NAME, version, METRIC)
    assert not decision.promoted and decision.candidate_value is None
    assert "evaluate it first" in decision.reason
    assert "champion" not in aliases(store)


def test_gate_errors_name_what_is_missing(store):
    new_version(store, 0.5)
    with pytest.raises(lifecycle.LifecycleError, match="has no 'candidate' alias"):
        lifecycle.promote(NAME, metric=METRIC)
    with pytest.raises(lifecycle.LifecycleError, match="has no version '9'"):
        lifecycle.promote(NAME, "9", METRIC)
    with pytest.raises(lifecycle.LifecycleError, match="no registered model 'nope'"):
        lifecycle.promote("nope", metric=METRIC)


def test_promote_cli_prints_the_decision(store, capsys):
    first = new_version(store, 0.5)
    second = new_version(store, 0.4)
    assert main(["promote", "--set", f"lifecycle.model={NAME}", "--set", f"lifecycle.version={first}"]) == 0
    assert main(["promote", "--set", f"lifecycle.model={NAME}", "--set", f"lifecycle.version={second}"]) == 0
    out = capsys.readouterr().out
    last = json.loads(out[out.rindex("\n{") :])  # the second decision, after progress lines and the first
    assert last["promoted"] is False and last["candidate_value"] == 0.4 and last["champion_value"] == 0.5
    assert aliases(store) == {"candidate": second, "champion": first}
    assert main(["promote", "--set", "lifecycle.model=nope"]) == 2


def test_logged_model_registered_evaluated_and_promoted(store, tmp_path):
    """The whole cycle with a model logged the way training logs it (`tracking.log_model`, a ClipEmbedder)."""
    world = SynthConfig(output=str(tmp_path / "world"), num_teacher=0, num_student=0, num_zeroshot=16, num_retrieval=8)
    synthetic.generate(world)
    clip = models.create_model("clipdr-tiny-vit").eval()
    embedder = models.ClipEmbedder(clip, "clipdr-tiny-vit").eval()
    with tracking.Tracker.start("clipdr-train", "student") as tracker:
        tracker.log_metrics({"train/loss": 1.0}, step=64)
        logged = tracking.log_model(
            tracker,
            embedder,
            metadata={"clipdr_model": "clipdr-tiny-vit", "mode": "clip", "samples_seen": 64},
        )
    version = lifecycle.register_candidate(logged.uri, NAME)
    assert version.run_id == tracker.run_id and "candidate" in version.aliases

    cfg = Config(
        evaluate=EvaluateConfig(
            model=f"models:/{NAME}@candidate",
            zeroshot=(f"{world.output}/zeroshot",),
            retrieval=(f"{world.output}/retrieval",),
            device="cpu",
        ),
        lifecycle=LifecycleConfig(model=NAME),
    )
    engine.clear_cache()
    result = evaluate_run.run(cfg, log=lambda message: None)
    # Into the training run, at the samples seen training logs its own evaluations at; its status untouched.
    assert (result.run_id, result.step, result.model_name) == (tracker.run_id, 64, "clipdr-tiny-vit")
    client = MlflowClient(store)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics[METRIC] == pytest.approx(result.metrics[METRIC])
    assert [m.step for m in client.get_metric_history(tracker.run_id, METRIC)] == [64]
    assert [a.path for a in client.list_artifacts(tracker.run_id, "evaluation")] == [
        "evaluation/step-000000000064.json"
    ]
    # The version the alias named leads to its evaluation, and the record names the version (an alias moves).
    tags = client.get_model_version(NAME, version.version).tags
    assert tags[evaluate_run.EVALUATION_RUN_TAG] == tracker.run_id
    assert tags[evaluate_run.EVALUATION_ARTIFACT_TAG] == "evaluation/step-000000000064.json"
    record = client.download_artifacts(tracker.run_id, "evaluation/step-000000000064.json", str(tmp_path))
    assert json.loads(Path(record).read_text())["model_version"] == f"{NAME}/{version.version}"

    decision = lifecycle.run(cfg, log=lambda message: None)
    assert decision.promoted and decision.candidate_value == pytest.approx(result.metrics[METRIC])
    assert aliases(store) == {"candidate": version.version, "champion": version.version}


def test_evaluating_a_model_name_opens_a_linked_evaluation_run(store, tmp_path):
    world = SynthConfig(output=str(tmp_path / "world"), num_teacher=0, num_student=0, num_zeroshot=8, num_retrieval=0)
    synthetic.generate(world)
    engine.clear_cache()
    code = main(
        [
            "evaluate",
            "--set",
            "evaluate.model=clipdr-tiny-mci",
            "--set",
            f"evaluate.zeroshot=['{world.output}/zeroshot']",
            "--set",
            "evaluate.tasks=['colour', 'shape']",
            "--set",
            "evaluate.experiment=evals",
        ]
    )
    assert code == 0
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("evals").experiment_id])
    assert run.data.tags[evaluate_run.EVALUATION_TAG] == "clipdr-tiny-mci"
    assert run.data.params["evaluate.max_samples"] == "0"
    assert set(run.data.metrics) == {
        f"zeroshot/{task}/{metric}"
        for task in ("colour", "shape")
        for metric in ("top1", "top5", "mean_per_class_recall")
    } | {f"partial/{METRIC}"}  # a mean over two of the tasks: not the gate's metric
    assert main(["evaluate", "--set", "evaluate.model=no-such-model"]) == 2
