"""The training job end to end on a local Ray: reinforced and online_distill modes (clip: tests/integration/
test_demo.py), resume after a killed driver, a killed worker under FailureConfig, two DDP workers, MLflow tracking
and the registered model."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from clipdr import checkpoint, cli, models, runstate, sweep, tracking
from clipdr.config import (
    CaptionerConfig,
    Config,
    ReinforceConfig,
    ReinforceResources,
    SweepConfig,
    SynthConfig,
    TeacherConfig,
    TrainCheckpoint,
    TrainConfig,
    TrainOptimizer,
    TrainResources,
    TrainSchedule,
    flatten,
)
from clipdr.data import synthetic
from clipdr.models.captioners import TINY_COCA
from clipdr.reinforce.run import run as reinforce
from clipdr.train import data
from clipdr.train.run import REINFORCE_RUN_TAG
from clipdr.train.run import run as train

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STUDENT = "clipdr-tiny-vit"
BATCH = 32
SAMPLES = 16 * BATCH  # 16 optimiser steps


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    """A tiny world at 32 px and its noisy student corpus reinforced by a tiny ViT teacher and a tiny CoCa."""
    root = tmp_path_factory.mktemp("train")
    synthetic.generate(
        SynthConfig(
            output=str(root / "world"),
            image_size=32,
            num_teacher=128,
            num_student=256,
            num_zeroshot=0,
            num_retrieval=0,
            shard_size=64,
        )
    )
    teacher = TeacherConfig(name="vit", model="clipdr-tiny-vit", logit_scale=100.0)
    config = Config(
        reinforce=ReinforceConfig(
            source=str(root / "world" / "student"),
            output=str(root / "reinforced"),
            num_augmentations=2,
            num_syn_captions=2,
            teachers=(teacher,),
            captioner=CaptionerConfig(model=TINY_COCA, pretrained="", max_len=8),
            resources=ReinforceResources(batch_size=32, writers=1),  # outputs do not depend on writers
        )
    )
    config = dataclasses.replace(
        config, tracking=dataclasses.replace(config.tracking, uri=f"sqlite:///{root}/mlflow.db")
    )
    reinforce(config, log=lambda message: None)
    return root, config


def train_config(world, run_name: str, **changes) -> Config:
    root, config = world
    resources = changes.pop("resources", TrainResources(workers=1, cpus_per_worker=1.0, max_failures=0))
    tc = TrainConfig(
        data=str(root / "reinforced"),
        output=str(root / "runs"),
        run_name=run_name,
        experiment="test-train",
        model=STUDENT,
        log_every=2,
        schedule=TrainSchedule(samples=SAMPLES, batch_size=BATCH, warmup_samples=2 * BATCH),
        optimizer=TrainOptimizer(lr=5e-3),
        checkpoint=TrainCheckpoint(every=4),
        resources=resources,
    )
    return dataclasses.replace(config, train=dataclasses.replace(tc, **changes))


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of a metric, in step order; a step logged twice fails (restarts must not re-log)."""
    points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
    steps = [s for s, _ in points]
    assert len(set(steps)) == len(steps), f"{key} logged twice at a step: {steps}"
    return points


def assert_learns(client: MlflowClient, run_id: str) -> None:
    losses = [v for _, v in history(client, run_id, "train/loss")]
    assert len(losses) == 8
    assert np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2]), losses


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    found = checkpoint.latest(str(run_dir))
    assert found is not None
    return checkpoint.load_weights(found[0])


def actors_started(class_name: str) -> int:
    """Actors of ``class_name`` this Ray has started so far, dead ones included."""
    import ray
    from ray.util.state import list_actors

    found = list_actors(
        address=ray.get_runtime_context().gcs_address,
        filters=[("class_name", "=", class_name)],
        limit=10_000,
        raise_on_missing_output=False,
    )
    return len(found)


# Ray Data's Parquet footer pool; Ray Train's per-fit watcher of nodes being drained (never, on one machine).
PROCESSES_OF_NO_USE = ("FooterReader", "PreemptionWatcher")


@pytest.fixture(scope="module")
def straight(world):
    cfg = train_config(world, "straight", register="clipdr-test-student")
    before = {name: actors_started(name) for name in PROCESSES_OF_NO_USE}
    result = train(cfg, log=lambda message: None)
    return cfg, result, {name: actors_started(name) - before[name] for name in PROCESSES_OF_NO_USE}


def test_reinforced_run_learns_tracks_and_registers(world, straight):
    cfg, result, started = straight
    # Two epochs of 4 shards, one Parquet read each: one footer actor per read, not Ray Data's default of 32; and
    # no preemption watcher on the suite's one-machine Ray (`cluster.start_local`).
    assert 1 <= started["FooterReader"] <= 2 and started["PreemptionWatcher"] == 0, started
    client = MlflowClient(cfg.tracking.uri)
    assert result.steps == 16 and result.samples_seen == SAMPLES
    assert_learns(client, result.mlflow_run_id)

    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "straight"
    assert run.data.params["train.mode"] == "reinforced"
    assert run.data.params["data.fingerprint"].startswith("sha256:")
    assert '"model": "clipdr-tiny-vit"' in run.data.params["teacher.vit"]
    # The choices resolved from the manifest (train-time choices: tests/unit/test_train_choices.py).
    assert run.data.params["distill.a_k.vit"] == "100.0" and run.data.params["distill.syn_captions_used"] == "2"
    for key in ("clip_loss", "kd_loss", "kd_loss_real", "kd_loss_syn", "clip_loss_syn", "lr", "logit_scale"):
        assert f"train/{key}" in run.data.metrics, key
    assert [s for s, _ in history(client, result.mlflow_run_id, "train/loss")] == [2 * BATCH * i for i in range(1, 9)]
    assert history(client, result.mlflow_run_id, "train/samples_per_s")[0][1] > 0
    lrs = [v for _, v in history(client, result.mlflow_run_id, "train/lr")]
    assert lrs[0] == pytest.approx(5e-3, rel=0.05) and lrs[-1] < 1e-4  # warmup done, cosine to ~0
    assert any(k.startswith("system/") for k in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {"config.json", "checkpoint", "data"} <= artifacts

    # Lineage: the data and the source it was reinforced from are the run's inputs (the UI's Datasets column), and
    # the run names the reinforcement run that made its data.
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "reinforced-from"}
    assert inputs["training"].source == json.dumps({"uri": str(world[0] / "reinforced")})
    assert run.data.params["data.fingerprint"].removeprefix("sha256:").startswith(inputs["training"].digest)
    assert json.loads(inputs["training"].profile)["rows"] == 256
    made_by = runstate.read(str(world[0] / "reinforced"), runstate.REINFORCE_STATE).mlflow_run_id
    assert run.data.tags[REINFORCE_RUN_TAG] == made_by and client.get_run(made_by).info.status == "FINISHED"

    # The registered model (safetensors) loads back and embeds exactly like the final checkpoint.
    version = client.get_model_version("clipdr-test-student", result.registered_version)
    assert version.tags["mode"] == "reinforced" and version.tags["student"] == STUDENT
    loaded, metadata = tracking.load_model(
        f"models:/clipdr-test-student/{result.registered_version}", tracking=cfg.tracking.uri
    )
    assert metadata["clipdr_model"] == STUDENT and metadata["samples_seen"] == SAMPLES
    reference = models.create_model(STUDENT).eval()
    reference.load_state_dict(checkpoint.load_weights(result.checkpoint))
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(reference.encode_image(images), dim=-1)
        assert torch.equal(loaded(images), expected)


def test_resubmitted_run_resumes_after_the_driver_is_killed(world, straight, tmp_path):
    """N steps straight == the same run killed after a checkpoint and resubmitted (same MLflow run).

    The driver joins the suite's Ray, as a job's driver joins its cluster under ``ray job submit``: killing it
    leaves the cluster up, and Ray ends the job's actors."""
    import ray

    cfg = train_config(world, "resumed")
    root = world[0]
    run_dir = root / "runs" / "resumed"
    args = [f"--set=train.{k}={v}" for k, v in _overrides(cfg.train).items()]
    env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.tracking.uri, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    driver = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "train.py"), *args, f"--set=tracking.uri={cfg.tracking.uri}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while checkpoint.latest(str(run_dir)) is None:
            assert driver.poll() is None, "the training job exited before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    _wait_until_no_train_worker_is_alive()  # the killed job's worker must not write beside the resubmitted one
    killed_at = checkpoint.latest(str(run_dir))[1]
    assert killed_at.step < 16
    client = MlflowClient(cfg.tracking.uri)
    first_id = killed_at.mlflow_run_id

    result = train(cfg, log=lambda message: None)
    assert result.mlflow_run_id == first_id
    assert result.steps == 16
    runs = client.search_runs(
        [client.get_experiment_by_name("test-train").experiment_id], "attributes.run_name = 'resumed'"
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = {s for s, _ in history(client, first_id, "train/loss")}
    assert steps == {2 * BATCH * i for i in range(1, 9)}  # no gaps across the restart
    resumed, reference = final_weights(run_dir), final_weights(root / "runs" / "straight")
    for name, value in reference.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-4, atol=1e-5, msg=name)


def _overrides(tc: TrainConfig) -> dict[str, str]:
    """``--set`` values (TOML) of every key of ``tc`` that differs from the default, sections included."""
    default = flatten(TrainConfig())
    return {key: json.dumps(value) for key, value in flatten(tc).items() if value != default[key]}


def _wait_until_no_train_worker_is_alive(timeout_s: float = 60.0) -> None:
    import ray
    from ray.util.state import list_actors

    deadline = time.monotonic() + timeout_s
    alive = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    while list_actors(address=ray.get_runtime_context().gcs_address, filters=alive):
        assert time.monotonic() < deadline, "the killed driver's Train worker is still alive"
        time.sleep(0.2)


def _kill_a_worker_after_first_checkpoint(run_dir: Path, killed: list[int]) -> None:
    """SIGKILLs a Train worker of this test's Ray (a descendant of this process) once a checkpoint exists."""
    import psutil

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if checkpoint.latest(str(run_dir)) is not None:
            for proc in psutil.Process().children(recursive=True):
                try:
                    if " ".join(proc.cmdline()).startswith("ray::RayTrainWorker"):
                        proc.kill()
                        killed.append(proc.pid)
                        return
                except psutil.Error:
                    continue
        time.sleep(0.2)


def test_online_distill_on_two_ddp_workers_survives_a_killed_worker(world):
    """Teachers inside the step, 2 DDP workers; one worker is SIGKILLed mid-run and FailureConfig restarts the
    group from the last checkpoint. (Plain CLIP on raw shards is the demo test's teachers.)"""
    root = world[0]
    cfg = train_config(
        world,
        "online-ddp",
        mode="online_distill",
        resources=TrainResources(workers=2, cpus_per_worker=1.0, max_failures=1),
    )
    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint, args=(root / "runs" / "online-ddp", killed))
    killer.start()
    try:
        result = train(cfg, log=lambda message: None)
    finally:
        killer.join()
    assert killed, "no worker was killed"
    assert result.steps == 16 and result.samples_seen == SAMPLES
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert "train/kd_loss_syn" in run.data.metrics
    assert_learns(client, result.mlflow_run_id)  # every step logged exactly once across the restart
    assert checkpoint.CheckpointMeta.read(result.checkpoint).mode == "online_distill"


def test_what_ray_ships_loads_without_torch(world):
    """Ray Train's controller, its dataset manager and Ray Data's split coordinator unpickle the input stream, the
    train function and its config (the plan) in fresh processes before the first step: none of it may import torch
    or open_clip."""
    import ray

    from clipdr.train import pipeline, remote
    from clipdr.train.plan import make_plan
    from clipdr.train.run import open_data, resolve_paths

    root, _ = world
    cfg = resolve_paths(train_config(world, "shipped"))
    uri, dataset, files = open_data(cfg.train)
    preprocess = data.student_preprocess(STUDENT)
    source = pipeline.DataSource(uri, tuple(files), 256, dataset.manifest)
    plan = make_plan(cfg, [dataset.manifest.teacher("vit")])
    reinforced = pipeline.build_dataset(source, plan, cfg.augment, preprocess, 256, range(2))
    raw_cfg = dataclasses.replace(cfg.train, data=str(root / "world" / "teacher"), mode="clip")
    raw_uri, _, raw_files = open_data(raw_cfg)
    assert pipeline.count_source_rows(raw_files) == 128  # the world's teacher corpus, counted by Ray tasks
    raw_plan = make_plan(dataclasses.replace(cfg, train=raw_cfg), [])
    raw = pipeline.build_dataset(
        pipeline.DataSource(raw_uri, tuple(raw_files), 128, None), raw_plan, cfg.augment, preprocess, 128, range(2)
    )
    blob = ray.cloudpickle.dumps((reinforced, raw, remote.train_loop, {"plan": plan.to_dict()}))

    def load(payload: bytes) -> list[str]:
        import pickle
        import sys

        pickle.loads(payload)
        return sorted(m for m in ("torch", "open_clip", "clipdr.train.data", "clipdr.train.loop") if m in sys.modules)

    # Its own runtime_env gives the task a fresh worker process (not one a loader task has already warmed).
    fresh = {"env_vars": {"CLIPDR_TEST_FRESH_WORKER": str(time.time_ns())}}
    assert ray.get(ray.remote(load).options(num_cpus=0, runtime_env=fresh).remote(blob)) == []
    # The stream itself still yields the student batches.
    batch = next(iter(reinforced.iter_batches(batch_size=8, batch_format="numpy")))
    assert batch[data.IMAGE].shape == (8, 3, 32, 32) and batch[data.teacher_image_column("vit")].shape[0] == 8


def test_train_ingest_keeps_the_stream_order(ray_local, tmp_path):
    """Ray Train's ingest (`pipeline.data_config`) delivers the stream in the order planned without Ray: epochs
    back to back, each epoch's shards in `pipeline._epoch_order`, rows in shard order. Several shards and two
    epochs, so that an ingest that hands blocks on as they finish interleaves them (data of one block cannot)."""
    from clipdr import records
    from clipdr.config import AugmentConfig
    from clipdr.train import pipeline
    from clipdr.train.plan import make_plan
    from tests.unit import test_train_data as fixtures

    uri, manifest = fixtures.write_dataset(tmp_path, num_shards=4)
    files = tuple(records.open_dataset(uri).shard_uris)
    rows, epochs = 4 * fixtures.NUM_ROWS, range(2)
    tc = TrainConfig(data=uri, model=fixtures.STUDENT, seed=3, resources=TrainResources(loader_tasks=2))
    plan = make_plan(Config(train=tc), list(manifest.teachers))
    preprocess = data.student_preprocess(fixtures.STUDENT)
    reference = [
        data.ReplayBatch(manifest, preprocess, fixtures.STUDENT, tc.seed, epoch)(records.read_shard(f))[data.TEXT]
        for epoch in epochs
        for f in pipeline._epoch_order(files, tc.seed, epoch)
    ]

    stream = pipeline.build_dataset(
        pipeline.DataSource(uri, files, rows, manifest), plan, AugmentConfig(), preprocess, rows, epochs
    )
    shard = pipeline.data_config().configure({"train": stream}, 1, worker_handles=None, worker_node_ids=None)[0]
    seen = [batch[data.TEXT] for batch in shard["train"].iter_batches(batch_size=8, batch_format="numpy")]
    np.testing.assert_array_equal(np.concatenate(seen), np.concatenate(reference))


def test_a_sweep_trains_one_nested_run_per_trial_and_summarises(world, tmp_path, capsys):
    """`clipdr sweep` at toy size: a grid of two learning rates, each trial a Ray Tune trial training a nested run."""
    # Two steps a trial, one logged loss: the metric the sweep ranks by.
    cfg = train_config(world, "", schedule=TrainSchedule(samples=2 * BATCH, batch_size=BATCH, warmup_samples=BATCH))
    sweep_cfg = SweepConfig(
        name="lr",
        output=str(tmp_path),
        params=("train.optimizer.lr=[1e-3, 5e-3]",),
        metric="train/loss",
        goal="min",
        parallel_trials=2,  # side by side, as the demo trains its jobs
    )
    settings = {**flatten(cfg.train, "train."), **flatten(cfg.tracking, "tracking."), **flatten(sweep_cfg, "sweep.")}
    sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    assert cli.main(["sweep", *sets]) == 0
    out = capsys.readouterr().out
    shown = json.loads(out[out.rindex("\n{") + 1 :])  # what the stage prints last: the parent run and the best trial

    client = MlflowClient(cfg.tracking.uri)
    parent = client.get_run(shown["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(float(r.data.params["train.optimizer.lr"]) for r in children) == [1e-3, 5e-3]
    assert all(r.info.status == "FINISHED" for r in [*children, parent])
    losses = {r.info.run_id: r.data.metrics["train/loss"] for r in children}
    assert shown["best"]["run_id"] == min(losses, key=losses.get)  # goal min: the lowest final loss
    assert parent.data.metrics["best/train/loss"] == min(losses.values())
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {sweep.CURVE_FILE, sweep.REPORT_FILE, sweep.SUMMARY_FILE} <= artifacts
    assert (tmp_path / "lr" / sweep.REPORT_FILE).read_text().count("| lr-") == 2
    with pytest.raises(ValueError, match=r"sweep\.params train\.optimizer\.nope"):
        sweep.space(SweepConfig(params=("train.optimizer.nope=[1]",)), cfg)


def test_a_caption_set_added_on_ray_feeds_the_training_input(world, tmp_path, capsys):
    """The growing dataset of docs/reinforce.md, every command as documented, on Ray: an embeddings-only base pass
    over half the world's student corpus, `reinforce.add=captions` (the set ``beam``), `reinforce.add=teacher` (a
    tiny MCi), `clipdr inspect`, then `clipdr train` in reinforced mode picking both teachers with their own a_k and
    the set ``beam``. No pass rewrites a file; the training input (Ray Data, parts joined by position) draws the
    set's captions and targets (the train step it feeds is set-agnostic: tests/unit/test_train_choices.py)."""
    import hashlib
    import shutil

    from clipdr import records
    from clipdr.config import AugmentConfig
    from clipdr.train import pipeline
    from clipdr.train.plan import make_plan

    root, config = world
    source = tmp_path / "student"
    source.mkdir()
    for shard in sorted((root / "world" / "student").glob("*.tar"))[:1]:  # 64 samples: the flow, not the volume
        shutil.copy(shard, source)
    dataset = tmp_path / "grown"
    (teacher,) = config.reinforce.teachers
    vit = f'{{name = "{teacher.name}", model = "{teacher.model}", logit_scale = 100.0}}'
    mci = '{name = "mci", model = "clipdr-tiny-mci", logit_scale = 50.0}'

    def reinforce_cli(**settings: str) -> None:
        """`clipdr reinforce --set ...` in this process (on the suite's Ray), with the world's captioner."""
        common = {
            "reinforce.output": str(dataset),
            "reinforce.num_augmentations": "2",
            "reinforce.captioner.model": TINY_COCA,
            "reinforce.captioner.pretrained": '""',
            "reinforce.captioner.max_len": "8",
            "reinforce.resources.batch_size": "32",
            "tracking.uri": config.tracking.uri,
        }
        argv = ["reinforce", *(a for k, v in {**common, **settings}.items() for a in ("--set", f"{k}={v}"))]
        assert cli.main(argv) == 0

    def digests() -> dict[Path, str]:
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in dataset.rglob("*.parquet")}

    # 1. The base: embeddings only (S = 0), one teacher.
    reinforce_cli(
        **{"reinforce.source": str(source), "reinforce.num_syn_captions": "0", "reinforce.teachers": f"[{vit}]"}
    )
    base = records.read_manifest(str(dataset))
    assert (base.num_syn_captions, base.captioner, base.caption_sets, base.num_rows) == (0, None, {}, 64)
    before = digests()

    # 2. A caption set, with the dataset's teacher's text embeddings of it; a second run has nothing to do.
    captions = {
        "reinforce.add": "captions",
        "reinforce.caption_set": "beam",
        "reinforce.num_syn_captions": "1",
        "reinforce.teachers": f"[{vit}]",
        "reinforce.captioner.top_p": "0.5",
    }
    reinforce_cli(**captions)
    listed = (dataset / records.MANIFEST_NAME).read_bytes()
    reinforce_cli(**captions)
    assert (dataset / records.MANIFEST_NAME).read_bytes() == listed  # complete: nothing to do

    # 3. A teacher: the one of reinforce.teachers the dataset lacks, embedding the views and every set present.
    reinforce_cli(**{"reinforce.add": "teacher", "reinforce.teachers": f"[{vit}, {mci}]"})
    manifest = records.read_manifest(str(dataset))
    assert {p: h for p, h in digests().items() if p in before} == before  # no pass rewrote a base file
    assert manifest.teacher_names == ("vit", "mci") and manifest.caption_sets == {"beam": 1}
    assert manifest.part("captions__beam").captioner.top_p == 0.5
    assert manifest.part("teacher__mci").caption_sets == ("beam",) and len(digests()) == 3 * len(before)

    # 4. What it holds.
    capsys.readouterr()
    assert cli.main(["inspect", str(dataset), "--samples", "1", "--sheet", str(tmp_path / "views.png")]) == 0
    shown = capsys.readouterr().out
    assert "S=0: an embeddings-only pass" in shown and "part          captions__beam: caption set 'beam'" in shown
    assert (
        "part          teacher__mci: teacher mci: clipdr-tiny-mci" in shown
        and "text embeddings of caption sets beam" in shown
    )

    # 5. The training input of a run picking the set, on Ray Data: the set's captions and targets, each once.
    cfg = train_config(world, "grown", data=str(dataset), syn_caption_sets=("beam",), teachers=("mci", "vit"))
    plan = make_plan(cfg, [manifest.teacher(n) for n in ("mci", "vit")], dataset_caption_sets=manifest.caption_sets)
    assert plan.syn_caption_sets == ("beam",) and plan.num_syn_captions == 1
    files = records.open_dataset(str(dataset)).shard_uris
    source_data = pipeline.DataSource(str(dataset), files, manifest.num_rows, manifest)
    preprocess = data.student_preprocess(STUDENT)
    stream = pipeline.build_dataset(source_data, plan, AugmentConfig(), preprocess, manifest.num_rows, range(1))
    batches = list(stream.iter_batches(batch_size=64, batch_format="numpy"))
    stored = [
        records.read_shard_with_parts(
            str(dataset), manifest, s.path, ["syn_captions__beam", "text_emb__vit__beam", "text_emb__mci__beam"]
        )
        for s in manifest.shards
    ]
    assert np.concatenate([b[data.SYN_INDEX] for b in batches]).tolist() == [0] * manifest.num_rows
    for column, name in ((1, "vit"), (2, "mci")):
        got_NC = np.concatenate([b[data.teacher_syn_text_column(name)] for b in batches])
        want_NC = np.concatenate([records.fixed_shape_numpy(t.column(column))[:, 0].astype(np.float32) for t in stored])
        assert np.array_equal(np.unique(got_NC, axis=0), np.unique(want_NC, axis=0))
    captions_N = [c[0] for t in stored for c in t.column(0).to_pylist()]
    tokens = data._tokenize(data._tokenizer(STUDENT, preprocess.context_length), captions_N, preprocess.context_length)
    got_tokens = np.concatenate([b[data.SYN_TEXT] for b in batches])
    assert np.array_equal(np.unique(got_tokens, axis=0), np.unique(tokens, axis=0))

    # 6. `clipdr train` in reinforced mode on it, as documented (toy schedule): the choices reach the run.
    run = {
        "train.data": str(dataset),
        "train.mode": "reinforced",
        "train.teachers": '["mci", "vit"]',
        "train.teacher_scales": "[40.0, 90.0]",
        "train.syn_caption_sets": '["beam"]',
        "train.run_name": "grown",
        "train.output": str(tmp_path / "runs"),
        "train.model": STUDENT,
        "train.experiment": "test-train",
        "train.schedule.samples": "64",
        "train.schedule.batch_size": "32",
        "train.schedule.warmup_samples": "32",
        "tracking.uri": config.tracking.uri,
    }
    assert cli.main(["train", *(a for k, v in run.items() for a in ("--set", f"{k}={v}"))]) == 0
    run_id = runstate.read(str(tmp_path / "runs" / "grown"), runstate.TRAIN_STATE).mlflow_run_id
    params = MlflowClient(config.tracking.uri).get_run(run_id).data.params
    assert {k: params[k] for k in ("distill.a_k.mci", "distill.a_k.vit", "distill.syn_caption_sets")} == {
        "distill.a_k.mci": "40.0",
        "distill.a_k.vit": "90.0",
        "distill.syn_caption_sets": "beam",
    }
