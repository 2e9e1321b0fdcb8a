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


# ----------------------------------------------------------------------------------------------------------
# Writes go to the final key only; outages fail loudly and lose nothing


def _versioned_bucket(s3_endpoint: str) -> tuple[object, str]:
    import uuid

    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    name = f"clipdr-versioned-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return client, name


def _history(client, bucket: str) -> dict[str, list]:
    """Every version and delete marker ever made in the bucket, and the multipart uploads still open."""
    versions = client.list_object_versions(Bucket=bucket)
    return {
        "versions": sorted(v["Key"] for v in versions.get("Versions", [])),
        "delete_markers": sorted(m["Key"] for m in versions.get("DeleteMarkers", [])),
        "uploads": [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])],
    }


def test_s3_write_leaves_one_version_of_the_final_key_and_nothing_on_failure(s3_endpoint, monkeypatch):
    """No temporary key, so no CopyObject (limited to 5 GiB) and no leftover versions; an exception mid-write, small
    (one PutObject) or large (multipart), publishes nothing and leaves no open upload."""
    monkeypatch.setattr(storage, "_S3_PART_BYTES", 5 * 1024 * 1024)  # S3's smallest part: a multipart upload here
    client, bucket = _versioned_bucket(s3_endpoint)
    chunk = b"0123456789abcdef" * 65536  # 1 MiB
    written: list[str] = []
    for name, num_chunks in (("small.bin", 1), ("large.bin", 12)):
        uri = f"s3://{bucket}/out/{name}"
        with pytest.raises(RuntimeError, match="crash"), storage.atomic_write(uri) as out:
            for _ in range(num_chunks):
                out.write(chunk)
            raise RuntimeError("crash mid-write")
        assert _history(client, bucket) == {"versions": written, "delete_markers": [], "uploads": []}
        with storage.atomic_write(uri) as out:
            for _ in range(num_chunks):
                out.write(chunk)
        assert storage.read_bytes(uri) == chunk * num_chunks
        written = sorted([*written, f"out/{name}"])
        assert _history(client, bucket) == {"versions": written, "delete_markers": [], "uploads": []}


def test_s3_outage_mid_read_fails_the_shard_and_a_reread_gets_it_all(s3_bucket, s3_outage, monkeypatch):
    import collections

    from clipdr.data import sources

    uri = storage.join(s3_bucket, "shard.tar")
    members = [(f"{i:04d}", {"txt": f"caption {i}".encode(), "json": b"{}" * 2000}) for i in range(20)]
    sources.write_tar_shard(uri, members)
    monkeypatch.setattr(sources, "_READ_BUFFER_BYTES", 4096)  # one ranged GET per tar block
    monkeypatch.setenv(storage.RETRY_BUDGET_ENV, "0.5")

    groups = sources.iter_tar_groups(uri, sources.DEFAULT_READER_CONFIG)
    keys = [next(groups)[0]]
    s3_outage.cut()
    with pytest.raises(sources.ShardReadError, match=r"shard\.tar.*NETWORK_CONNECTION") as info:
        keys += [key for key, _ in groups]
    assert info.value.transient

    s3_outage.restore()
    skipped = collections.Counter()
    assert [key for key, _ in sources.iter_tar_groups(uri, sources.DEFAULT_READER_CONFIG)] == [k for k, _ in members]
    assert not skipped


def test_s3_outage_at_write_raises_and_publishes_nothing(s3_bucket, s3_outage, monkeypatch):
    monkeypatch.setenv(storage.RETRY_BUDGET_ENV, "0.5")
    uri = storage.join(s3_bucket, "out", "shard.parquet")
    s3_outage.cut()
    with pytest.raises(storage.StorageError, match=r"put s3://.*shard\.parquet") as info:
        storage.write_bytes(uri, b"data")
    assert info.value.transient
    s3_outage.restore()
    assert storage.list_files(s3_bucket, recursive=True) == []
