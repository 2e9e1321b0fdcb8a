import errno
import math
import os
import tarfile
import zlib

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


# ----------------------------------------------------------------------------------------------------------
# Transient errors: one classification, retries, and what a reader raises


def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), True),
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), True),
        (TimeoutError("timed out"), True),
        (OSError(errno.EIO, "Input/output error"), True),
        # pyarrow's S3 errors, as it words them
        (
            OSError(
                "When reading information for key 'x.tar' in bucket 'b': AWS Error NETWORK_CONNECTION during "
                "HeadObject operation: curlCode: 7, Could not connect to server"
            ),
            True,
        ),
        (OSError("AWS Error UNKNOWN (HTTP status 503) during GetObject operation: Slow Down"), True),
        (OSError("AWS Error SLOW_DOWN during PutObject operation: Please reduce your request rate."), True),
        (OSError("AWS Error INTERNAL_FAILURE during GetObject operation"), True),
        (_client_error("SlowDown", 503), True),
        (_client_error("InternalError", 500), True),
        (_client_error("AccessDenied", 403), False),
        (OSError("AWS Error ACCESS_DENIED during GetObject operation: Access Denied"), False),
        (FileNotFoundError(errno.ENOENT, "No such file or directory"), False),
        (PermissionError(errno.EACCES, "Permission denied"), False),
        (OSError("Couldn't deserialize thrift: TProtocolException: Invalid data"), False),  # a corrupt parquet file
        (tarfile.ReadError("bad tar header"), False),
        (zlib.error("invalid stored block lengths"), False),
        (ValueError("not an image"), False),
        (storage.StorageError("gave up", transient=True), True),
    ],
)
def test_is_transient(error, transient):
    assert storage.is_transient(error) is transient


def test_transient_error_mid_read_is_retried_from_the_same_offset(tmp_path, monkeypatch):
    from tests.conftest import FlakyFileSystem

    data = os.urandom(100_000)
    (tmp_path / "f.bin").write_bytes(data)
    flaky = FlakyFileSystem(lambda: ConnectionResetError(errno.ECONNRESET, "reset"), read_failures=2, fail_at=50_000)
    monkeypatch.setattr(storage, "resolve", lambda uri: (flaky, uri))
    monkeypatch.setenv(storage.RETRY_BUDGET_ENV, "10")
    monkeypatch.setattr(storage, "_FIRST_DELAY_S", 0.01)  # backoff 10 ms, 20 ms, ...

    with storage.open_input(str(tmp_path / "f.bin"), buffer_size=16_384) as f:
        assert f.read() == data

    assert flaky.failed_reads == 2 and flaky.opens == 3  # reopened before each new attempt


def test_persistent_transient_error_raises_after_the_budget(tmp_path, monkeypatch):
    from tests.conftest import FlakyFileSystem

    (tmp_path / "f.bin").write_bytes(b"x" * 1000)
    flaky = FlakyFileSystem(lambda: OSError(errno.EIO, "Input/output error"), open_failures=math.inf)
    monkeypatch.setattr(storage, "resolve", lambda uri: (flaky, uri))
    monkeypatch.setenv(storage.RETRY_BUDGET_ENV, "0.1")
    monkeypatch.setattr(storage, "_FIRST_DELAY_S", 0.01)

    with pytest.raises(storage.StorageError, match=r"open .*f\.bin: OSError: \[Errno 5\].*still failing") as info:
        storage.read_bytes(str(tmp_path / "f.bin"))

    assert info.value.transient and isinstance(info.value.__cause__, OSError)
    assert flaky.opens >= 2  # retried


def test_non_transient_storage_error_is_not_retried(tmp_path, monkeypatch):
    from tests.conftest import FlakyFileSystem

    with pytest.raises(FileNotFoundError):  # a missing file stays what it is
        storage.read_bytes(str(tmp_path / "missing.bin"))
    flaky = FlakyFileSystem(lambda: PermissionError(errno.EACCES, "Permission denied"), open_failures=math.inf)
    monkeypatch.setattr(storage, "resolve", lambda uri: (flaky, uri))
    with pytest.raises(storage.StorageError, match="Permission denied") as info:
        storage.read_bytes(str(tmp_path / "f.bin"))
    assert not info.value.transient and flaky.opens == 1
