"""Shared fixtures: services the tests start themselves (an S3 emulator on 127.0.0.1) and stop afterwards."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from clipdr.cluster import free_port

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before serving {url}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answers (e.g. 401 from a server that wants a token): it is up
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout_s} s")


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    log: Path  # the server's request log, one line a request (tests/s3_policy.py reads it)


@pytest.fixture(scope="session")
def s3_endpoint(s3_server: S3Server) -> str:
    return s3_server.endpoint


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1, reached through the standard AWS environment variables."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = Path(tmp_path_factory.mktemp("moto")) / "moto.log"
    moto_server = Path(sys.executable).with_name("moto_server")
    with log.open("wb") as log_f:
        proc = subprocess.Popen(
            [str(moto_server), "-H", "127.0.0.1", "-p", str(port)], stdout=log_f, stderr=subprocess.STDOUT
        )
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in [*env, "AWS_REGION", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"]}
    try:
        wait_http(f"{endpoint}/moto-api/", proc)
        for k in ("AWS_REGION", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
            os.environ.pop(k, None)
        os.environ.update(env)
        yield S3Server(endpoint, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on the emulator, as an ``s3://`` URI."""
    import boto3

    name = f"clipdr-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray for the whole session (start-up costs seconds); more logical CPUs than cores so that
    model actors, read tasks and Train workers cannot starve each other on a 2-core machine.

    Its processes (Ray Train's controller among them) poll a fit's workers every 0.5 s, not Ray's 2 s: the end of
    each of the suite's ~15 toy fits, and a killed worker, is seen ~1 s sooner on average. A poll that misses is
    tolerated (Ray fails a worker only after 10 minutes of them)."""
    import ray

    from clipdr.cluster import start_local

    with pytest.MonkeyPatch.context() as patch:  # inherited by the local Ray's processes only
        patch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        start_local(num_cpus=6, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


class FlakyFileSystem:
    """The local filesystem with injected storage faults, for `storage.resolve` to return in unit tests.

    The first ``open_failures`` opens raise ``error()``; then the first ``read_failures`` reads that reach past byte
    ``fail_at`` do (``math.inf`` for a fault that persists). ``opens`` and ``failed_reads`` count what happened.
    """

    def __init__(self, error, open_failures: float = 0, read_failures: float = 0, fail_at: int = 0) -> None:
        import pyarrow.fs as pafs

        self.local = pafs.LocalFileSystem()
        self.error = error
        self.open_failures, self.read_failures, self.fail_at = open_failures, read_failures, fail_at
        self.opens = self.failed_reads = 0

    def open_input_file(self, path: str) -> _FlakyFile:
        self.opens += 1
        if self.opens <= self.open_failures:
            raise self.error()
        return _FlakyFile(self, self.local.open_input_file(path))

    def open_input_stream(self, path: str, buffer_size: int | None = None) -> _FlakyFile:
        return self.open_input_file(path)


class _FlakyFile:
    """A file of `FlakyFileSystem`: positioned reads (what storage uses) and a Python file's read/seek/tell."""

    def __init__(self, fs: FlakyFileSystem, file) -> None:
        self.fs, self.file, self.pos, self.closed = fs, file, 0, False

    def read_at(self, nbytes: int, offset: int) -> bytes:
        if offset + nbytes > self.fs.fail_at and self.fs.failed_reads < self.fs.read_failures:
            self.fs.failed_reads += 1
            raise self.fs.error()
        return self.file.read_at(nbytes, offset)

    def read(self, nbytes: int = -1) -> bytes:
        nbytes = self.size() - self.pos if nbytes is None or nbytes < 0 else nbytes
        data = self.read_at(nbytes, self.pos)
        self.pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset + (0, self.pos, self.size())[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def size(self) -> int:
        return self.file.size()

    def close(self) -> None:
        self.closed = True
        self.file.close()

    def __enter__(self) -> _FlakyFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Outage:
    """A TCP forwarder to a local server that can be cut, as a network outage is (open connections reset, new
    ones refused), and restored on the same port: `url` is what clients are pointed at."""

    def __init__(self, target_url: str) -> None:
        import threading

        host_port = target_url.split("://", 1)[1]
        self.target = (host_port.rsplit(":", 1)[0], int(host_port.rsplit(":", 1)[1]))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._sockets: list = []
        self._listener = None
        self.restore()

    def restore(self) -> None:
        import socket
        import threading

        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source, sink) -> None:
        import socket

        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        import socket
        import struct

        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept loop
        self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


@pytest.fixture
def s3_outage(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Outage]:
    """The S3 emulator behind a forwarder that a test can cut; storage reaches S3 through it, and the SDK tries each
    request once (the tests look at clipdr's own retries)."""
    outage = Outage(s3_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", outage.url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    try:
        yield outage
    finally:
        outage.cut()
