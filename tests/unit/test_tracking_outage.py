"""A tracking server that goes away mid-run: metrics are kept and sent later, errors are not masked.

Against a real ``mlflow server`` (SQLite backend in a temporary folder) that the test stops and starts again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from clipdr import tracking
from clipdr.cluster import free_port
from tests.conftest import wait_http


class Server:
    """``mlflow server`` on 127.0.0.1 with a SQLite backend; `stop` and `start` keep the port and the store."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with (self.folder / "server.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("mlflow")),
                    "server",
                    "--backend-store-uri",
                    f"sqlite:///{self.folder / 'mlflow.db'}",
                    "--default-artifact-root",
                    (self.folder / "artifacts").as_uri(),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    "1",
                ],
                cwd=self.folder,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its worker processes are stopped with it
            )
        wait_http(f"{self.uri}/health", self.proc)

    def stop(self) -> None:
        """The server and its workers go at once, as in a crash or a lost node: SIGKILL to its process group. (A
        graceful SIGTERM stop waited ~7 s for uvicorn, twice a test; the store is SQLite, safe against a kill.)"""
        if self.proc is None:
            return
        os.killpg(self.proc.pid, 9)
        self.proc.wait()
        self.proc = None


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    # The environment's tracking URI wins over a configured one (`tracking.tracking_uri`); one left by an earlier
    # test would send the metrics to a store that never goes away.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    s = Server(tmp_path)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def test_metrics_logged_while_the_server_is_down_arrive_in_order_after_it_returns(server):
    tracker = tracking.Tracker.start("outage", "run", uri=server.uri)
    logger = tracking.MetricLogger(tracker, outage_limit_s=120, retry_interval_s=0.2)
    stamps = {}
    for step in range(3):
        logger.log_metrics({"train/loss": 1.0 / (step + 1), "train/lr": 0.1}, step=step * 64)
        stamps[step * 64] = int(time.time() * 1000)
    logger.flush()

    server.stop()

    def log_while_down() -> None:  # while nothing answers: neither raises nor waits
        for step in range(3, 8):
            logger.log_metrics({"train/loss": 1.0 / (step + 1), "train/lr": 0.1}, step=step * 64)
            stamps[step * 64] = int(time.time() * 1000)
            time.sleep(0.1)

    # A log_metrics that waited for the server would wait until it returns, below: forever here. The join's bound
    # is that, not a speed (the loop sleeps 0.5 s in all).
    caller = threading.Thread(target=log_while_down)
    caller.start()
    caller.join(timeout=60)
    assert not caller.is_alive(), "log_metrics waited for the server"
    assert logger.pending == 10  # held back, not dropped

    server.start()  # the same port and store
    logger.flush()
    logger.close()
    tracker.finish()

    history = MlflowClient(server.uri).get_metric_history(tracker.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(s * 64, 1.0 / (s + 1)) for s in range(8)]
    for m in history:  # the time each was logged at, not the time it was sent
        assert stamps[m.step] - 1000 <= m.timestamp <= stamps[m.step]
    assert len(MlflowClient(server.uri).get_metric_history(tracker.run_id, "train/lr")) == 8


def test_an_outage_longer_than_the_limit_fails_with_the_servers_error():
    from mlflow.exceptions import MlflowException

    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    logger = tracking.MetricLogger(
        tracking.Tracker(MlflowClient(nowhere), "0" * 32, "0"), outage_limit_s=0.5, retry_interval_s=0.1
    )
    logger.log_metrics({"train/loss": 1.0}, step=64)
    with pytest.raises(tracking.TrackingOutage, match=r"limit tracking.outage_limit_s = 0.5 s.*steps 64..64") as e:
        logger.flush()
    assert isinstance(e.value.__cause__, MlflowException) and "Connection refused" in str(e.value.__cause__)
    with pytest.raises(tracking.TrackingOutage):  # training's next log fails the same way
        logger.log_metrics({"train/loss": 0.5}, step=128)
    logger.close(raise_errors=False)


def test_a_failing_job_keeps_its_own_error_when_the_server_is_down(monkeypatch):
    # Before the fix: the run's FAILED status was sent after MLflow's retries, and its error replaced the job's.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # keeps the unfixed code's failure quick
    tracker = tracking.Tracker(MlflowClient(f"http://127.0.0.1:{free_port()}"), "0" * 32, "0")
    with pytest.raises(RuntimeError, match="the job's own error"), tracker:
        raise RuntimeError("the job's own error")


def test_stopping_system_metrics_does_not_wait_for_the_server(monkeypatch):
    # MLflow's sampler asks the server for the run's status after each sample, with MLflow's retries (7 by default,
    # minutes) in its own thread, and its finish() waited for that thread. Here 3 retries, 20 s and 40 s apart
    # (urllib3's backoff, factor 10: the first retry is at once): a finish() that waited would take 60 s or more.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "10")
    tracker = tracking.Tracker(MlflowClient(f"http://127.0.0.1:{free_port()}"), "0" * 32, "0")
    started = time.monotonic()
    monitor = tracker.start_system_metrics(interval_s=0.1)
    time.sleep(1.0)  # its thread is now inside those retries
    monitor.finish(timeout_s=1.0)
    assert time.monotonic() - started < 30  # half the retries' 60 s: not a speed, whether it waited for them
