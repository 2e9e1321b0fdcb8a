"""The reinforcement job end to end on a local Ray, with tiny teachers and a tiny CoCa on the synthetic world."""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import shutil

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from clipdr import augment, augparams, records, storage
from clipdr.config import CaptionerConfig, Config, ReinforceConfig, ReinforceResources, SynthConfig, TeacherConfig
from clipdr.data import sources, synthetic
from clipdr.models.captioners import TINY_COCA, build_coca
from clipdr.models.teachers import Teacher
from clipdr.reinforce import pipeline
from clipdr.reinforce.run import ReinforceError, run

from .. import s3_policy

pytestmark = pytest.mark.integration

S3_BUCKET = "clipdr-reinforce-test"
BAD_SKIPS = {"corrupt_image": 1, "empty_caption": 1, "missing_image": 1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small noisy student corpus (3 shards + 1 shard of bad input) and tiny teacher/captioner checkpoints."""
    root = tmp_path_factory.mktemp("reinforce")
    world = SynthConfig(
        output=str(root / "world"), num_teacher=0, num_student=60, num_zeroshot=0, num_retrieval=0, shard_size=20
    )
    synthetic.generate(world)
    source = str(root / "world" / "student")
    good = next(iter(sources.iter_shard(sources.list_shards(source)[0], collections.Counter())))
    jpeg = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(jpeg, "JPEG")
    sources.write_tar_shard(
        storage.join(source, "zz-bad.tar"),
        [
            ("ok-0", {"jpg": jpeg.getvalue(), "txt": b"a red rectangle"}),
            ("bad-corrupt", {"jpg": b"not an image", "txt": b"a caption"}),
            ("bad-empty-caption", {"jpg": good.image_bytes, "txt": b"   "}),
            ("bad-no-image", {"txt": b"a caption without an image"}),
        ],
    )
    checkpoints = {}
    for name, model_name in (("vit", "clipdr-tiny-vit"), ("mci", "clipdr-tiny-mci")):
        torch.manual_seed(len(name))
        from clipdr import models

        model = models.create_model(model_name)
        checkpoints[name] = str(root / f"{name}.pt")
        torch.save(model.state_dict(), checkpoints[name])
    torch.manual_seed(0)
    coca, _ = build_coca(TINY_COCA)
    checkpoints["coca"] = str(root / "coca.pt")
    torch.save(coca.state_dict(), checkpoints["coca"])
    config = Config(
        reinforce=ReinforceConfig(
            source=source,
            output=str(root / "out"),
            num_augmentations=2,
            num_syn_captions=2,
            seed=7,
            teachers=(
                TeacherConfig(name="vit", model="clipdr-tiny-vit", pretrained=checkpoints["vit"], logit_scale=100.0),
                TeacherConfig(name="mci", model="clipdr-tiny-mci", pretrained=checkpoints["mci"], logit_scale=70.0),
            ),
            captioner=CaptionerConfig(model=TINY_COCA, pretrained=checkpoints["coca"], max_len=10),
            resources=ReinforceResources(batch_size=16, cpus_per_actor=1.0),
        ),
    )
    config = dataclasses.replace(
        config, tracking=dataclasses.replace(config.tracking, uri=f"sqlite:///{root}/mlflow.db")
    )
    valid_keys = sorted(s.key for s in sources.iter_source(source, collections.Counter()))
    return config, valid_keys, root


def with_output(config: Config, output: str) -> Config:
    return dataclasses.replace(config, reinforce=dataclasses.replace(config.reinforce, output=output))


@pytest.fixture(scope="module")
def s3_run(setup, ray_local, s3_server):
    """One reinforcement of the corpus onto the S3 emulator (one actor per model stage), into a folder under
    reinforced/ as in the cluster's data bucket; also returns the S3 requests it made."""
    import boto3

    config, _, _ = setup
    boto3.client("s3", endpoint_url=s3_server.endpoint).create_bucket(Bucket=S3_BUCKET)
    config = with_output(config, f"s3://{S3_BUCKET}/reinforced/test-run")
    with s3_policy.recorded_calls(s3_server.endpoint, s3_server.log) as calls:
        manifest = run(config, log=lambda message: None)
    return config, manifest, calls


def test_reinforce_s3_requests_are_allowed_to_the_jobs_role(s3_run):
    """Every S3 request of the reinforcement (driver, readers, model actors and the writer) is one the jobs' IAM role
    may make on the data bucket (infra/terraform/modules/kuberay, tests/s3_policy.py)."""
    _, _, calls = s3_run
    assert any(c.method in ("PUT", "POST") and c.key.endswith(".parquet") for c in calls)  # shards were written
    assert not s3_policy.refused(calls, s3_policy.jobs_policy(S3_BUCKET, "checkpoints"), {S3_BUCKET})


def test_reinforce_to_s3_matches_direct_teacher_forward(setup, s3_run):
    _, valid_keys, _ = setup
    config, manifest, _ = s3_run

    dataset = records.open_dataset(config.reinforce.output, require_teachers=["vit", "mci"], min_syn_captions=2)
    assert dict(manifest.skipped) == BAD_SKIPS
    assert manifest.num_rows == len(valid_keys) == 61
    assert [s.path for s in manifest.shards] == [f"student-0000{i}.parquet" for i in range(3)] + ["zz-bad.parquet"]
    tables = [records.read_shard(uri) for uri in dataset.shard_uris]
    keys = sorted(k for t in tables for k in t.column(records.KEY).to_pylist())
    assert keys == valid_keys  # every valid input key exactly once

    table = tables[0]
    for teacher in ("vit", "mci"):
        for emb in (records.image_embeddings(table, teacher), records.text_embeddings(table, teacher)):
            np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=-1), 1.0, atol=2e-3)
    assert all(
        len(c) == 2 and all(isinstance(s, str) for s in c) for c in table.column(records.SYN_CAPTIONS).to_pylist()
    )

    # Replay consistency end to end: the stored embedding of view k equals a direct forward of the replayed view.
    teacher_cfg = config.reinforce.teachers[1]
    teacher = Teacher(teacher_cfg, torch.device("cpu"), spec=manifest.teacher("mci"))
    views_NKL = records.aug_params(table)
    for row in (0, 5):
        image = sources.decode_rgb(table.column(records.IMAGE)[row].as_py())
        views = augparams.views_from_array(views_NKL[row])
        direct = teacher.embed_views(augment.render_views([image], [views], augment.RenderKey.of(teacher.spec)))[0]
        np.testing.assert_allclose(records.image_embeddings(table, "mci")[row], direct, atol=2e-3)
        captions = [table.column(records.CAPTION)[row].as_py(), *table.column(records.SYN_CAPTIONS)[row].as_py()]
        np.testing.assert_allclose(
            records.text_embeddings(table, "mci")[row], teacher.embed_texts([captions])[0], atol=2e-3
        )

    client = MlflowClient(config.tracking.uri)
    experiment = client.get_experiment_by_name("reinforce")
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.metrics["num_rows"] == 61
    assert mlflow_run.data.metrics["skipped.corrupt_image"] == 1
    assert mlflow_run.data.metrics["duplicate_keys_across_shards"] == 0
    assert mlflow_run.data.metrics["samples_per_s"] > 0
    assert mlflow_run.data.params["reinforce.num_augmentations"] == "2"
    assert {a.path for a in client.list_artifacts(mlflow_run.info.run_id)} >= {"manifest.json", "teachers.json"}
    (source,) = mlflow_run.inputs.dataset_inputs  # the source shards, as the run's input
    manifest = records.read_manifest(config.reinforce.output)
    assert source.tags[0].value == "source" and manifest.source_fingerprint.removeprefix("sha256:").startswith(
        source.dataset.digest
    )


def test_resume_after_crash_is_exactly_once_and_deterministic(setup, s3_run, tmp_path, monkeypatch):
    """A crashed run left one complete shard (the S3 run's, byte for byte), a partial temporary file and no manifest;
    its reruns finish it exactly once. They use other parallelism than the S3 run (two captioner actors, an elastic
    teacher pool of one to two), so Ray bundles the stream differently: every shard they write must still be the S3
    run's, byte for byte (an output shard is a function of the config and its source shard alone)."""
    config, valid_keys, _ = setup
    s3_config, s3_manifest, _ = s3_run
    wide = dataclasses.replace(config.reinforce.resources, teacher_actors=1, teacher_actors_max=2, captioner_actors=2)
    config = with_output(config, str(tmp_path / "out"))
    config = dataclasses.replace(config, reinforce=dataclasses.replace(config.reinforce, resources=wide))
    out = config.reinforce.output

    def s3_bytes(shard: str) -> bytes:
        return storage.read_bytes(storage.join(s3_config.reinforce.output, shard))

    # The crash: of the four output shards one was written, one was being written, and there is no manifest.
    os.makedirs(out)
    (tmp_path / "out" / "student-00000.parquet").write_bytes(s3_bytes("student-00000.parquet"))
    with open(os.path.join(out, ".student-00001.parquet.tmp-dead"), "wb") as f:
        f.write(b"PAR1 partial")
    messages = []

    # The rerun meets a storage fault after planning: every read of source shard student-00001.tar fails with EIO
    # (the kernel's own, from reading /proc/self/mem at offset 0) for longer than the retries last. The job writes
    # the other two missing shards, then fails naming that shard and the error, and writes nothing for it: no output
    # shard, no manifest, no skip recorded.
    source_shard = os.path.join(config.reinforce.source, "student-00001.tar")
    real_run_pipeline = pipeline.run_pipeline

    def run_pipeline_during_an_outage(*args, **kwargs):
        os.rename(source_shard, f"{source_shard}.away")
        os.symlink("/proc/self/mem", source_shard)
        try:
            return real_run_pipeline(*args, **kwargs)
        finally:
            os.remove(source_shard)
            os.rename(f"{source_shard}.away", source_shard)

    with monkeypatch.context() as outage:
        outage.setattr(pipeline, "run_pipeline", run_pipeline_during_an_outage)
        outage.setenv(storage.RETRY_BUDGET_ENV, "1")  # forwarded to the Ray workers
        with pytest.raises(Exception, match=r"(?s)student-00001\.tar.*Errno 5"):
            run(config, log=messages.append)
    assert any("1/4 shards done" in m for m in messages)  # the plan kept the complete shard
    assert not os.path.exists(os.path.join(out, "student-00001.parquet"))
    assert not os.path.exists(os.path.join(out, records.MANIFEST_NAME))
    assert "3/4 shards complete" in messages[-1] and "rerun" in messages[-1]
    before = {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in os.listdir(out) if p.endswith(".parquet")}
    assert sorted(before) == ["student-00000.parquet", "student-00002.parquet", "zz-bad.parquet"]

    # The outage is over: the rerun redoes that shard.
    messages.clear()
    resumed = run(config, log=messages.append)

    assert any("3/4 shards done" in m for m in messages)  # the plan saw three complete shards
    after = {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in os.listdir(out) if p.endswith(".parquet")}
    assert {p: t for p, t in after.items() if p != "student-00001.parquet"} == before  # complete ones not redone
    assert dataclasses.replace(resumed, created_at=s3_manifest.created_at) == s3_manifest
    keys = sorted(k for uri in records.open_dataset(out).shard_uris for k in records.read_shard(uri)["key"].to_pylist())
    assert keys == valid_keys
    # Same config and seed, other parallelism: every shard is the S3 run's, byte for byte.
    for shard in s3_manifest.shards:
        assert (tmp_path / "out" / shard.path).read_bytes() == s3_bytes(shard.path), shard.path

    # A complete dataset is left alone; other settings on the same output are refused.
    assert run(config, log=messages.append).num_rows == s3_manifest.num_rows
    assert "already complete" in messages[-1]
    other = dataclasses.replace(config, reinforce=dataclasses.replace(config.reinforce, num_augmentations=3))
    with pytest.raises(ReinforceError, match=r"other settings.*num_augmentations"):
        run(other, log=lambda message: None)
    shutil.rmtree(out)
