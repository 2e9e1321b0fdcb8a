"""Storage against a real S3 endpoint (a moto server on 127.0.0.1 that the fixture starts and stops)."""

import pytest

from clipdr import storage

from .. import s3_policy

pytestmark = pytest.mark.integration


def test_s3_atomic_write_list_read(s3_bucket):
    uri = storage.join(s3_bucket, "world", "shard-00000.tar")
    with storage.atomic_write(uri) as out:
        out.write(b"hello ")
        out.write(b"s3")
        assert not storage.exists(uri)
    assert storage.read_bytes(uri) == b"hello s3"
    assert storage.list_files(storage.join(s3_bucket, "world"), (".tar",)) == [uri]


def test_s3_failed_write_leaves_no_object(s3_bucket):
    uri = storage.join(s3_bucket, "shard.tar")
    with pytest.raises(RuntimeError), storage.atomic_write(uri) as out:
        out.write(b"partial")
        raise RuntimeError("crash mid-write")
    assert not storage.exists(uri)
    assert storage.list_files(s3_bucket, recursive=True) == []


def test_s3_source_shards_round_trip(s3_bucket):
    """The synthetic world's writers and the source readers over S3, through the same storage code."""
    import collections

    from clipdr.config import SynthConfig
    from clipdr.data import sources, synthetic

    cfg = SynthConfig(
        output=storage.join(s3_bucket, "world"),
        formats=("webdataset", "parquet"),
        num_teacher=0,
        num_student=30,
        num_zeroshot=0,
        num_retrieval=0,
        shard_size=10,
    )
    synthetic.generate(cfg)
    expected = [synthetic.make_sample(cfg, "student", i) for i in range(30)]
    for folder, suffix in (("student", ".tar"), ("student/parquet", ".parquet")):
        skipped = collections.Counter()
        shards = sources.list_shards(storage.join(s3_bucket, "world", folder))
        assert len(shards) == 3 and all(s.endswith(suffix) for s in shards)
        got = [s for shard in shards for s in sources.iter_shard(shard, skipped)]
        assert not skipped
        assert [(s.key, s.caption, s.image_bytes) for s in got] == [(e.key, e.caption, e.image_bytes) for e in expected]
    assert storage.exists(storage.join(s3_bucket, "world", "world.json"))


def test_s3_requests_of_a_job_are_allowed_to_the_jobs_role(s3_server, s3_bucket):
    """Every request `clipdr.storage` makes for a job is one the jobs' IAM role may make (the policy in
    infra/terraform/modules/kuberay, read from the HCL): the bucket stands for the data bucket and the job writes
    under reinforced/, as a reinforcement does."""
    bucket = s3_bucket.removeprefix("s3://")
    run = storage.join(s3_bucket, "reinforced", "run")
    shard, manifest = storage.join(run, "part-0.parquet"), storage.join(run, "meta", "manifest.json")
    with s3_policy.recorded_calls(s3_server.endpoint, s3_server.log) as calls:
        assert not storage.exists(manifest)  # a fresh run: "not found" must be an answer, not a refusal
        assert storage.list_files(run) == []
        storage.write_bytes(shard, b"rows")
        storage.write_bytes(manifest, b"{}")
        with pytest.raises(RuntimeError), storage.atomic_write(storage.join(run, "part-1.parquet")) as out:
            out.write(b"partial")
            raise RuntimeError("crash mid-write")
        assert storage.list_files(run, recursive=True) == [manifest, shard]
        assert storage.read_bytes(shard) == b"rows"
        storage.delete(manifest)
    assert len(calls) > 10
    # S3 has no folders: a write needs no bucket-level question (HeadBucket, refused to prefix-scoped roles).
    assert not [str(c) for c in calls if c.method == "HEAD" and not c.key]
    assert not s3_policy.refused(calls, s3_policy.jobs_policy(bucket, "checkpoints"), {bucket})
