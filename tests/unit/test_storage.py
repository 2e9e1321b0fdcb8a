import os

import pyarrow.fs as pafs
import pytest

from clipdr import storage


def test_resolve_local_forms(tmp_path):
    for uri in (str(tmp_path / "a"), f"file://{tmp_path}/a"):
        fs, path = storage.resolve(uri)
        assert isinstance(fs, pafs.LocalFileSystem)
        assert path == str(tmp_path / "a")


def test_resolve_rejects_unknown_scheme_and_empty():
    with pytest.raises(ValueError, match="unsupported storage URI 'gs://b/x'"):
        storage.resolve("gs://b/x")
    with pytest.raises(ValueError, match="empty"):
        storage.resolve("")
    with pytest.raises(ValueError, match="names no bucket"):
        storage.resolve("s3://")


def test_resolve_s3_reads_endpoint_from_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    fs, path = storage.resolve("s3://bucket/some/prefix/")
    assert isinstance(fs, pafs.S3FileSystem)
    assert path == "bucket/some/prefix"
    assert fs.region == "eu-west-1"


def test_join_keeps_scheme(tmp_path):
    assert storage.join("s3://b/p", "x", "y.tar") == "s3://b/p/x/y.tar"
    assert storage.join("s3://b/p/", "y") == "s3://b/p/y"
    assert storage.join(str(tmp_path), "y") == str(tmp_path / "y")


def test_atomic_write_publishes_only_complete_files(tmp_path):
    target = str(tmp_path / "sub" / "shard.bin")
    with storage.atomic_write(target) as out:
        out.write(b"abc")
        # Nothing is visible under the final name while the write is in progress.
        assert not os.path.exists(target)
        assert storage.list_files(str(tmp_path / "sub")) == []
    assert storage.read_bytes(target) == b"abc"


def test_atomic_write_failure_leaves_nothing(tmp_path):
    target = str(tmp_path / "shard.bin")
    with pytest.raises(RuntimeError, match="boom"), storage.atomic_write(target) as out:
        out.write(b"partial")
        raise RuntimeError("boom")
    assert not os.path.exists(target)
    assert os.listdir(tmp_path) == []


def test_list_files_filters_hidden_and_suffix(tmp_path):
    for name in ("b.tar", "a.tar", "c.parquet", ".a.tar.tmp-1", "_SUCCESS", "sub/d.tar"):
        storage.write_bytes(str(tmp_path / name), b"x")
    assert storage.list_files(str(tmp_path), (".tar",)) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    assert storage.list_files(str(tmp_path), (".tar",), recursive=True)[-1] == str(tmp_path / "sub" / "d.tar")
    assert storage.list_files(str(tmp_path / "missing")) == []
    assert storage.exists(str(tmp_path / "a.tar"))
    storage.delete(str(tmp_path / "a.tar"))
    storage.delete(str(tmp_path / "a.tar"))  # deleting a missing file is fine
    assert not storage.exists(str(tmp_path / "a.tar"))
