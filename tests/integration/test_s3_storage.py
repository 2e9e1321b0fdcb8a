"""Storage against a real S3 endpoint (a moto server on 127.0.0.1 that the fixture starts and stops)."""

import pytest

from clipdr import storage

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
