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
