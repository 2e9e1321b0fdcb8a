"""Experiment tracking behind one small interface; the only module that imports mlflow.

Runs are driven through ``MlflowClient`` with explicit run ids (no fluent global state), so a job
can reopen the same run after a restart and Ray workers never share a hidden active run. Call it from
one process (the driver, or rank 0).

Where runs go: ``MLFLOW_TRACKING_URI`` if set, else the URI given by the config, else a SQLite file
``mlflow.db`` in the working directory with artifacts beside it in ``mlartifacts/``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus

if TYPE_CHECKING:
    from clipdr.models import ClipEmbedder

# Opens clipdr experiments on training runs and charts in the MLflow 3 UI instead of its GenAI overview.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
_PARAM_VALUE_LIMIT = 6000  # mlflow's limit on a parameter value's length
_BATCH = 100  # mlflow's limit on params per log_batch call
_METRICS_PER_BATCH = 1000  # mlflow's limit on metrics per log_batch call
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow nests a run under the run this tag names (the UI's run groups)
_LOGGED_DATA = "clipdr"  # a logged model's files (`ClipEmbedder.save`) go to data/clipdr/ of the MLflow model

log = logging.getLogger(__name__)


def tracking_uri(configured: str = "") -> str:
    """The tracking URI in force: the environment, then the config, then a local SQLite file."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _default_artifact_location(uri: str) -> str | None:
    # A local SQLite store would otherwise put artifacts relative to whatever cwd a process has.
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


class Tracker:
    """One MLflow run: params, metrics, artifacts. Use as a context manager or call `finish`."""

    def __init__(self, client: MlflowClient, run_id: str, experiment_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id

    @classmethod
    def start(
        cls,
        experiment: str,
        run_name: str | None = None,
        *,
        run_id: str | None = None,
        uri: str = "",
        tags: Mapping[str, str] | None = None,
        parent_run_id: str = "",
    ) -> Tracker:
        """Starts a new run (nested under ``parent_run_id`` when given), or reopens ``run_id`` (a resumed job
        continues its own run)."""
        resolved = tracking_uri(uri)
        client = MlflowClient(tracking_uri=resolved)
        if run_id:
            run = client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
            return cls(client, run_id, run.info.experiment_id)
        experiment_id = _experiment_id(client, experiment, resolved)
        nested = {PARENT_RUN_TAG: parent_run_id} if parent_run_id else {}
        run = client.create_run(experiment_id, run_name=run_name, tags={**dict(tags or {}), **nested})
        return cls(client, run.info.run_id, experiment_id)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish_failed()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), _BATCH * 10):
            self.client.log_batch(self.run_id, metrics=items[i : i + _BATCH * 10])

    def last_step(self, key: str) -> int | None:
        """The largest step metric ``key`` was logged at in this run; None when never."""
        return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=None)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        """Writes ``data`` as JSON under the run's artifacts (``artifact_file`` may include folders)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
            self.log_artifact(path, str(Path(artifact_file).parent) if "/" in artifact_file else None)

    def log_dataset(self, name: str, digest: str, source: str, profile: Mapping[str, Any], context: str) -> None:
        """Records a dataset this run used (MLflow's run inputs, the UI's Datasets column): its name, digest (the
        data's fingerprint), where it lives and a small profile (counts)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.exceptions import MlflowException

        dataset = Dataset(
            name=name,
            digest=digest.removeprefix("sha256:")[:36],  # MLflow keeps at most 36 characters of a digest
            source_type="clipdr",
            source=json.dumps({"uri": source}),
            profile=json.dumps(dict(profile)),
        )
        tags = [InputTag(key="mlflow.data.context", value=context)]
        # MLflow stores a dataset once per experiment, and its get-or-create is not atomic: two runs logging the same
        # dataset at once (the demo trains two jobs side by side) can both try to create it, and one fails on the
        # unique key. Its second try finds the row the other wrote.
        for attempt in range(3):
            try:
                self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset=dataset, tags=tags)])
                return
            except MlflowException as e:
                if "unique constraint" not in str(e).lower() or attempt == 2:
                    raise

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        """Logs the files under ``local_dir`` (recursively) under ``artifact_path``."""
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def start_system_metrics(self, interval_s: float = 10.0, node_id: str | None = None) -> SystemMetrics:
        """Samples CPU, memory, disk, network (and GPU where present) into the run every ``interval_s`` seconds
        until the returned monitor's ``finish()``; ``node_id`` prefixes the metrics when several processes log."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        with _fail_fast(_HTTP_TIMEOUT_S):  # it reads the run's last system step: one attempt, not minutes of retries
            monitor = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=interval_s,
                resume_logging=True,
                node_id=node_id,
                tracking_uri=self.client.tracking_uri,
            )
        monitor.start()
        return SystemMetrics(monitor)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=RunStatus.to_string(RunStatus.from_string(status)))

    def finish_failed(self) -> None:
        """Marks the run FAILED while an error is being raised: one quick attempt, never an error of its own.

        The job's error is the one to report; a tracking server that is down would otherwise replace it with its
        own, after MLflow's retries (minutes), and the run would stay RUNNING either way.
        """
        try:
            with _fail_fast(_HTTP_TIMEOUT_S):
                self.finish("FAILED")
        except Exception as e:  # the error being raised is the one that matters
            log.warning("could not mark MLflow run %s FAILED (%s): %s", self.run_id, self.client.tracking_uri, e)


class SystemMetrics:
    """MLflow's system-metrics sampler, stopped within a time limit.

    MLflow's ``finish`` joins the sampling thread, which may sit in MLflow's HTTP retries (minutes) while the
    tracking server is away; a job that ends or fails then must not wait for it.
    """

    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor

    def finish(self, timeout_s: float = 15.0) -> None:
        stopper = threading.Thread(target=self.monitor.finish, name="clipdr-system-metrics-stop", daemon=True)
        stopper.start()
        stopper.join(timeout_s)
        if stopper.is_alive():
            log.warning(
                "system metrics sampler still waiting on the tracking server after %g s; left behind", timeout_s
            )


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | tuple | dict) else str(value)
    return text if len(text) <= _PARAM_VALUE_LIMIT else text[: _PARAM_VALUE_LIMIT - 3] + "..."


# --------------------------------------------------------------------------- outages
# A training run must not die, nor wait, because its tracking server is away for a while. `MetricLogger` (rank 0's
# metrics) keeps what it could not send in a bounded buffer and sends it, in order and with the steps and times it
# was logged at, once the server answers again; only an outage longer than ``outage_limit_s`` fails the job, with
# the server's own error as the cause. MLflow's HTTP retries (7, with back-off: minutes of blocking per call) are
# turned off for the logger's own calls: the buffer is the retry.

_RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
_TIMEOUT_ENV = "MLFLOW_HTTP_REQUEST_TIMEOUT"
_HTTP_TIMEOUT_S = 10.0  # one request's time-out inside `_fail_fast`: long enough for a loaded server
_HTTP_ENV_LOCK = threading.Lock()


class TrackingOutage(RuntimeError):
    """The tracking server did not answer for longer than the configured limit; ``__cause__`` is its last error."""


@contextlib.contextmanager
def _fail_fast(timeout_s: float) -> Iterator[None]:
    """MLflow calls of this block make one attempt with a ``timeout_s`` time-out instead of MLflow's retries.

    MLflow reads both settings from the environment at each request; they are set for the block and restored.
    """
    with _HTTP_ENV_LOCK:
        saved = {k: os.environ.get(k) for k in (_RETRIES_ENV, _TIMEOUT_ENV)}
        os.environ[_RETRIES_ENV] = "0"
        os.environ[_TIMEOUT_ENV] = str(max(1, math.ceil(timeout_s)))
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` says the tracking server is unreachable or overloaded (connection refused or reset, a
    time-out, HTTP 5xx or 429), rather than that the request itself is wrong (HTTP 4xx)."""
    import requests
    from mlflow.exceptions import MlflowException

    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:  # MLflow wraps the requests error it caught
        seen.add(id(cause))
        if isinstance(cause, requests.ConnectionError | requests.Timeout | ConnectionError | TimeoutError):
            return True
        cause = cause.__cause__ or cause.__context__
    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return status >= 500 or status == 429
    return False


def _until_answered(call: Callable[[], Any], what: str, limit_s: float, retry_interval_s: float) -> Any:
    """``call()``, repeated while the server is away for up to ``limit_s`` seconds; raises `TrackingOutage` after."""
    since = None
    while True:
        try:
            with _fail_fast(_HTTP_TIMEOUT_S):
                return call()
        except Exception as e:
            if not is_transient(e):
                raise
            now = time.monotonic()
            if since is None:
                since = now
                log.warning("tracking server did not answer (%s: %s); retrying for up to %g s", what, e, limit_s)
            if now - since > limit_s:
                raise TrackingOutage(
                    f"the tracking server has not answered for {now - since:.0f} s ({what}; limit "
                    f"tracking.outage_limit_s = {limit_s:g} s): {e}"
                ) from e
            time.sleep(retry_interval_s)


class MetricLogger:
    """Rank 0's metrics of one run, sent by a background thread so that training never waits on the server.

    `log_metrics` stamps the metrics with the time it is called and queues them; the thread sends the queue in
    order. While the server is away (`is_transient` errors) the metrics stay queued and are retried every
    ``retry_interval_s``; when it answers again they are sent with their original steps and timestamps. An outage
    longer than ``outage_limit_s``, more than ``max_buffered`` metrics queued, or an error that is not transient
    makes the next `log_metrics`, `flush` or `close` raise (`TrackingOutage`, its cause the server's last error).
    Checkpoints do not go through here, so they never wait on the server.
    """

    def __init__(
        self,
        tracker: Tracker,
        *,
        outage_limit_s: float = 600.0,
        max_buffered: int = 100_000,
        retry_interval_s: float = 5.0,
    ) -> None:
        self.tracker = tracker
        self.outage_limit_s = outage_limit_s
        self.max_buffered = max_buffered
        self.retry_interval_s = retry_interval_s
        self._queue: list[Metric] = []
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._outage_since: float | None = None
        self._last_error: BaseException | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._send_loop, name="clipdr-metrics", daemon=True)
        self._thread.start()

    @classmethod
    def open(
        cls, run_id: str, *, uri: str = "", outage_limit_s: float = 600.0, retry_interval_s: float = 5.0
    ) -> MetricLogger:
        """A logger on run ``run_id``, reopened (status RUNNING) once the server answers, within ``outage_limit_s``."""
        tracker = _until_answered(
            lambda: Tracker.start("", run_id=run_id, uri=uri),
            f"reopening run {run_id}",
            outage_limit_s,
            retry_interval_s,
        )
        return cls(tracker, outage_limit_s=outage_limit_s, retry_interval_s=retry_interval_s)

    @property
    def run_id(self) -> str:
        return self.tracker.run_id

    @property
    def pending(self) -> int:
        """Metrics queued and not yet acknowledged by the server."""
        with self._cond:
            return len(self._queue)

    def last_step(self, key: str) -> int | None:
        """`Tracker.last_step`, waiting out an outage within the limit. Metrics still queued are not counted."""
        return _until_answered(
            lambda: self.tracker.last_step(key), f"reading {key}", self.outage_limit_s, self.retry_interval_s
        )

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Queues ``metrics`` at ``step``, stamped now; returns at once. Raises what made sending fail for good."""
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        with self._cond:
            self._raise_if_failed()
            if len(self._queue) + len(items) > self.max_buffered:
                self._fail_locked(
                    f"{len(self._queue)} metrics are waiting for the tracking server and at most {self.max_buffered} "
                    "are kept"
                )
                self._raise_if_failed()
            self._queue.extend(items)
            self._cond.notify_all()

    def flush(self) -> None:
        """Waits until every queued metric is sent; raises `TrackingOutage` if the outage outlasts the limit."""
        with self._cond:
            while self._queue and self._error is None:
                self._cond.wait()
            self._raise_if_failed()

    def close(self, *, raise_errors: bool = True) -> None:
        """`flush`, then stops the thread. With ``raise_errors=False`` (a job already failing) a failure is logged."""
        try:
            self.flush()
        except Exception as e:
            if raise_errors:
                raise
            log.warning("metrics of MLflow run %s not sent: %s", self.run_id, e)
        finally:
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            self._thread.join()

    # The sending thread and its bookkeeping (under self._cond).

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _fail_locked(self, why: str, cause: BaseException | None = None) -> None:
        if self._error is not None:
            return
        cause = cause or self._last_error
        steps = sorted({m.step for m in self._queue})
        span = f"; {len(self._queue)} metrics unsent, steps {steps[0]}..{steps[-1]}" if steps else ""
        error = TrackingOutage(
            f"MLflow run {self.run_id} at {self.tracker.client.tracking_uri}: {why}{span}"
            + (f": {cause}" if cause is not None else "")
        )
        error.__cause__ = cause
        self._error = error
        self._cond.notify_all()

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue or self._error is not None:
                    return
                chunk = self._queue[:_METRICS_PER_BATCH]
            try:
                with _fail_fast(_HTTP_TIMEOUT_S):
                    self.tracker.client.log_batch(self.run_id, metrics=chunk)
            except Exception as e:
                with self._cond:
                    if not is_transient(e):
                        self._fail_locked("the tracking server refused metrics", e)
                        return
                    now = time.monotonic()
                    self._last_error = e
                    if self._outage_since is None:
                        self._outage_since = now
                        log.warning(
                            "tracking server unreachable (%s); keeping metrics for up to %g s", e, self.outage_limit_s
                        )
                    if now - self._outage_since > self.outage_limit_s:
                        self._fail_locked(
                            f"the tracking server has not answered for {now - self._outage_since:.0f} s (limit "
                            f"tracking.outage_limit_s = {self.outage_limit_s:g} s)",
                            e,
                        )
                        return
                    retry_at = now + self.retry_interval_s
                    while not self._closing and (left := retry_at - time.monotonic()) > 0:
                        self._cond.wait(left)
                continue
            with self._cond:
                del self._queue[: len(chunk)]
                if self._outage_since is not None:
                    log.warning(
                        "tracking server answers again after %.0f s; sending the metrics kept meanwhile",
                        time.monotonic() - self._outage_since,
                    )
                    self._outage_since = None
                self._cond.notify_all()


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class LoggedModel:
    """Where a logged model went: its ``runs:/`` URI, and its registry name and version when registered."""

    uri: str
    registered_name: str = ""
    version: str = ""


def _experiment_id(client: MlflowClient, experiment: str, uri: str) -> str:
    """The id of ``experiment``, created if missing; jobs that start at once may race to create it."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(
            experiment, artifact_location=_default_artifact_location(uri), tags=dict([EXPERIMENT_KIND_TAG])
        )
    except MlflowException:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


@contextlib.contextmanager
def _fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Points mlflow's fluent API (which log_model/load_model use) at ``uri``, then restores it *and* the
    ``MLFLOW_TRACKING_URI`` environment variable that ``mlflow.set_tracking_uri`` also sets: left behind, it
    would redirect every later `Tracker` of the process (the environment wins over configured URIs).

    The fluent API's URI is one per process: when ``uri`` is already in force (`pinned_uri`) it is left alone,
    which is what lets several jobs of one process (threads) log models at the same time."""
    import mlflow

    if mlflow.get_tracking_uri() == uri:
        yield
        return
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)  # None unsets the variable and mlflow's global


@contextlib.contextmanager
def pinned_uri(configured: str = "") -> Iterator[str]:
    """Makes the tracking URI in force (`tracking_uri`) this process's for the block, and yields it.

    For a process that runs several jobs at once against one store: every job's `log_model` and `load_model`
    then find the URI in force instead of each pointing the process-wide fluent API and restoring it under the
    others' feet. The environment variable it sets also reaches the Ray workers the jobs start (`cluster`).
    """
    uri = tracking_uri(configured)
    with _fluent_tracking_uri(uri):
        yield uri


def log_model(
    tracker: Tracker,
    model: ClipEmbedder,
    *,
    name: str = "model",
    metadata: Mapping[str, Any] | None = None,
    registered_model_name: str = "",
    version_tags: Mapping[str, str] | None = None,
) -> LoggedModel:
    """Logs a `clipdr.models.ClipEmbedder` under ``tracker``'s run, its weights as safetensors (nothing pickled).

    The MLflow model's ``data`` folder holds what `ClipEmbedder.save` writes; its ``python_function`` flavour loads
    it through `clipdr.models.embedder` (so ``mlflow models serve`` works where clipdr is installed) and serves
    `clipdr.models.embedder.ServedModel`: raw images (bytes, base64 in JSON) and/or captions in, L2-normalised
    embeddings out, with that signature (`served_signature`) and a two-row input example. `load_model` reads it
    back without unpickling. With ``registered_model_name`` the model is registered as a version of it and
    ``version_tags`` are set on that version.

    Idempotent per run, so that a job resubmitted after a crash anywhere in here ends with one logged model and one
    registered version: a model this run already logged under ``name`` (complete, status READY) is not logged again,
    and a version of ``registered_model_name`` already registered from it is reused (`register_model_version`).
    """
    import mlflow
    import mlflow.pyfunc

    from clipdr.models import embedder

    model_id = _logged_model_id(tracker, name)
    if not model_id:
        input_example = embedder.ServedModel(model).example_request()
        with _fluent_tracking_uri(tracker.client.tracking_uri), tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / _LOGGED_DATA
            model.save(data)
            # log_model attaches to the active run of the fluent API: open ours without touching its status.
            with mlflow.start_run(run_id=tracker.run_id, nested=mlflow.active_run() is not None):
                info = mlflow.pyfunc.log_model(
                    name=name,
                    loader_module=embedder.__name__,
                    data_path=str(data),
                    signature=served_signature(),
                    input_example=input_example,
                    metadata=dict(metadata or {}),
                    pip_requirements=_requirements(),  # inferring them would load the model in a subprocess
                )
            tracker.client.update_run(tracker.run_id, status="RUNNING")
        model_id = info.model_id
    uri = f"runs:/{tracker.run_id}/{name}"
    if not registered_model_name:
        return LoggedModel(uri)
    version = register_model_version(
        f"models:/{model_id}", registered_model_name, tags=version_tags, uri=tracker.client.tracking_uri
    )
    return LoggedModel(uri, registered_model_name, version.version)


def served_signature() -> Any:
    """The MLflow signature of `clipdr.models.embedder.ServedModel`: optional ``image`` (binary: base64 in JSON) and
    ``text`` (string) columns in; optional ``image_embedding`` and ``text_embedding`` (float arrays) out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    from clipdr.models import embedder

    return ModelSignature(
        inputs=Schema(
            [
                ColSpec(DataType.binary, embedder.IMAGE, required=False),
                ColSpec(DataType.string, embedder.TEXT, required=False),
            ]
        ),
        outputs=Schema(
            [
                ColSpec(Array(DataType.float), embedder.IMAGE_EMBEDDING, required=False),
                ColSpec(Array(DataType.float), embedder.TEXT_EMBEDDING, required=False),
            ]
        ),
    )


def _logged_model_id(tracker: Tracker, name: str) -> str:
    """The id of the complete model ``tracker``'s run logged under ``name``; "" when there is none."""
    return _ready_logged_model(tracker.client, tracker.experiment_id, tracker.run_id, name)


def _ready_logged_model(client: MlflowClient, experiment_id: str, run_id: str, name: str) -> str:
    """The id of the oldest complete (READY) model run ``run_id`` logged under ``name``; "" when none."""
    from mlflow.entities import LoggedModelStatus

    found = client.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{name}'",  # a status filter finds nothing (3.17)
        order_by=[{"field_name": "creation_timestamp", "ascending": True}],
    )
    ready = [m for m in found if m.status == LoggedModelStatus.READY]
    return ready[0].model_id if ready else ""


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("torch", "torchvision", "open_clip_torch", "timm", "numpy", "safetensors"):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pins


class PickledModelError(ValueError):
    """A logged model stored as a pickle (``mlflow.pytorch``), refused unless pickles are allowed."""


def load_model(
    uri: str, device: str = "cpu", *, tracking: str = "", allow_pickle: bool = False
) -> tuple[ClipEmbedder, dict[str, Any]]:
    """A model logged by `log_model` (``runs:/...``, ``models:/name/3``, ``models:/name@alias``) and its metadata.

    ``tracking`` (else the tracking URI in force, `tracking_uri`) resolves the URI. The model's files are
    downloaded and read as `clipdr.models.ClipEmbedder.load` reads them: the architecture built by name and its
    safetensors weights, the MLmodel file parsed as plain YAML; nothing is unpickled and no loader the files name
    is imported. Its ``.clip`` is the open_clip model, ``metadata["clipdr_model"]`` its name.

    Models logged before clipdr stored safetensors are pickles (``mlflow.pytorch``): unpickling one runs whatever
    code it holds, so they load only with ``allow_pickle`` (for models from a tracking server you trust).

    Raises:
        PickledModelError: A pickled model, and ``allow_pickle`` is not set.
        ValueError: The files are neither form of a clipdr model.
    """
    import mlflow.artifacts
    from mlflow.models import Model
    from mlflow.models.model import MLMODEL_FILE_NAME

    from clipdr.models import ClipEmbedder

    with _fluent_tracking_uri(tracking_uri(tracking)), tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        logged = Model.load(str(local / MLMODEL_FILE_NAME))  # yaml.safe_load
        metadata = dict(logged.metadata or {})
        data = _pyfunc_data(local, logged.flavors)
        if data is not None and ClipEmbedder.is_saved(data):
            try:
                return ClipEmbedder.load(data, device), metadata
            except ValueError as e:
                raise ValueError(f"model {uri}: {e}") from None
        if "pytorch" not in logged.flavors:
            raise ValueError(f"model {uri} was not logged by clipdr (flavours: {', '.join(logged.flavors)})")
        if not allow_pickle:
            raise PickledModelError(
                f"model {uri} is a pickle (mlflow.pytorch, logged before clipdr stored safetensors) and loading it "
                "can run any code it holds: allow pickles (evaluate.allow_pickle / export.allow_pickle) only for a "
                "tracking server you trust"
            )
        import mlflow.pytorch

        return mlflow.pytorch.load_model(str(local), map_location=device), metadata


def _pyfunc_data(local: Path, flavors: Mapping[str, Any]) -> Path | None:
    """The data folder the downloaded model's ``python_function`` flavour names, if it lies inside ``local``."""
    relative = (flavors.get("python_function") or {}).get("data")
    if not isinstance(relative, str):
        return None
    data = (local / relative).resolve()
    return data if data.is_relative_to(local.resolve()) else None


# --- registry
# Registered model versions, their aliases and the runs behind them, for `clipdr.lifecycle`, evaluation and
# export. Plain data comes back (`ModelVersion`, dicts), so callers never touch mlflow entities.


class RegistryError(ValueError):
    """A registered model, version, alias or run that does not exist, or a model URI that names none."""


@dataclass(frozen=True)
class ModelVersion:
    """One version of a registered model.

    Attributes:
        name: The registered model's name.
        version: Its version number, as MLflow spells it (a string).
        run_id: The run that produced it ("" when none is recorded).
        source: Where its files are (``models:/m-...`` for models logged with MLflow 3).
        aliases: Aliases pointing at it.
        tags: Its version tags.
    """

    name: str
    version: str
    run_id: str
    source: str
    aliases: tuple[str, ...]
    tags: Mapping[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class RunSummary:
    """What a run recorded: latest metric values, params and tags."""

    run_id: str
    run_name: str
    experiment_id: str
    status: str
    metrics: Mapping[str, float]
    params: Mapping[str, str]
    tags: Mapping[str, str]


def _client(uri: str = "") -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri(uri))


def _is_missing(error: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException) and error.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def _model_version(mv: Any) -> ModelVersion:
    return ModelVersion(
        name=mv.name,
        version=str(mv.version),
        run_id=mv.run_id or "",
        source=mv.source or "",
        aliases=tuple(mv.aliases or ()),
        tags=dict(mv.tags or {}),
    )


def get_model_version(name: str, version: str, *, uri: str = "") -> ModelVersion:
    """Version ``version`` of registered model ``name``; raises `RegistryError` when there is none."""
    try:
        return _model_version(_client(uri).get_model_version(name, str(version)))
    except Exception as e:
        if _is_missing(e):
            raise RegistryError(f"registered model {name!r} has no version {version!r} ({tracking_uri(uri)})") from None
        raise


def get_model_version_by_alias(name: str, alias: str, *, uri: str = "") -> ModelVersion | None:
    """The version of ``name`` that ``alias`` points at; None when the alias is not set.

    Raises:
        RegistryError: No registered model is called ``name``.
    """
    client = _client(uri)
    try:
        registered = client.get_registered_model(name)
    except Exception as e:
        if _is_missing(e):
            raise RegistryError(f"no registered model {name!r} ({tracking_uri(uri)})") from None
        raise
    version = (registered.aliases or {}).get(alias)
    return None if version is None else _model_version(client.get_model_version(name, str(version)))


def set_model_alias(name: str, alias: str, version: str, *, uri: str = "") -> None:
    """Points ``alias`` of registered model ``name`` at ``version`` (moving it from any other version)."""
    get_model_version(name, version, uri=uri)  # a clear error for a missing version
    _client(uri).set_registered_model_alias(name, alias, str(version))


def set_model_version_tags(name: str, version: str, tags: Mapping[str, Any], *, uri: str = "") -> None:
    client = _client(uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))


def register_model_version(
    model_uri: str, name: str, *, tags: Mapping[str, str] | None = None, uri: str = ""
) -> ModelVersion:
    """Registers the model at ``model_uri`` (``runs:/<id>/model``, ``models:/m-<id>``) as a version of ``name``.

    The registered model is created on first use. Idempotent: when a version of ``name`` was already registered
    from the same model (the same run and source), that version is returned (with ``tags`` set on it) instead of
    a new one, so a job resubmitted after registering does not register its model twice.
    """
    import mlflow

    tracking = tracking_uri(uri)
    with _fluent_tracking_uri(tracking):
        source_run, source = _model_source(model_uri, tracking)
        existing = _versions_from(name, source_run, source, tracking) if source else []
        if existing:
            version = existing[0]
            set_model_version_tags(name, version.version, dict(tags or {}), uri=uri)
            return get_model_version(name, version.version, uri=uri)
        # The fluent call resolves runs:/ URIs of MLflow 3 logged models to their models:/m-<id> source.
        mv = mlflow.register_model(model_uri, name, tags=dict(tags or {}))
    return get_model_version(name, str(mv.version), uri=uri)


def _model_source(model_uri: str, uri: str) -> tuple[str, str]:
    """``(run id, models:/m-<id>)`` a registration of ``model_uri`` records; ``("", "")`` when it cannot be told."""
    kind, first, path = parse_model_uri(model_uri)
    client = _client(uri)
    if kind == "logged":
        return client.get_logged_model(first).source_run_id or "", f"models:/{first}"
    if kind == "run":
        model_id = _ready_logged_model(client, client.get_run(first).info.experiment_id, first, path)
        return (first, f"models:/{model_id}") if model_id else ("", "")
    return "", ""


def _versions_from(name: str, run_id: str, source: str, uri: str) -> list[ModelVersion]:
    """Versions of registered model ``name`` made from ``source`` (by run ``run_id``), oldest first."""
    client = _client(uri)
    if not client.search_registered_models(f"name = '{name}'"):
        return []
    found = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
    return sorted((_model_version(mv) for mv in found if mv.source == source), key=lambda v: int(v.version))


def parse_model_uri(model_uri: str) -> tuple[str, str, str]:
    """Splits an MLflow model URI into ``(kind, name_or_id, version_or_alias)``.

    ``runs:/<id>/<path>`` -> ``("run", id, path)``; ``models:/<name>/<version>`` -> ``("version", name, version)``;
    ``models:/<name>@<alias>`` -> ``("alias", name, alias)``; ``models:/m-<id>`` -> ``("logged", id, "")``.

    Raises:
        RegistryError: ``model_uri`` is none of these.
    """
    if model_uri.startswith("runs:/"):
        run_id, _, path = model_uri.removeprefix("runs:/").strip("/").partition("/")
        if run_id and path:
            return "run", run_id, path
    elif model_uri.startswith("models:/"):
        rest = model_uri.removeprefix("models:/").strip("/")
        if "@" in rest:
            name, _, alias = rest.rpartition("@")
            if name and alias:
                return "alias", name, alias
        elif "/" in rest:
            name, _, version = rest.rpartition("/")
            if name and version.isdigit():
                return "version", name, version
        elif rest:
            return "logged", rest, ""
    raise RegistryError(
        f"model URI {model_uri!r} is none of runs:/<run id>/<path>, models:/<name>/<version>, "
        "models:/<name>@<alias>, models:/<model id>"
    )


def model_version_of(model_uri: str, *, uri: str = "") -> ModelVersion | None:
    """The registered version a ``models:/<name>/<version>`` or ``models:/<name>@<alias>`` URI names, else None."""
    kind, name, which = parse_model_uri(model_uri)
    if kind == "version":
        return get_model_version(name, which, uri=uri)
    if kind == "alias":
        version = get_model_version_by_alias(name, which, uri=uri)
        if version is None:
            raise RegistryError(f"registered model {name!r} has no alias {which!r} ({tracking_uri(uri)})")
        return version
    return None


def model_run_id(model_uri: str, *, uri: str = "") -> str:
    """The run that produced the model at ``model_uri`` ("" when the registry records none)."""
    kind, name, _ = parse_model_uri(model_uri)
    if kind == "run":
        return name
    if kind == "logged":
        return _client(uri).get_logged_model(name).source_run_id or ""
    version = model_version_of(model_uri, uri=uri)
    return version.run_id if version is not None else ""


def run_summary(run_id: str, *, uri: str = "") -> RunSummary:
    """Latest metrics, params and tags of run ``run_id``; raises `RegistryError` when there is no such run."""
    try:
        run = _client(uri).get_run(run_id)
    except Exception as e:
        if _is_missing(e):
            raise RegistryError(f"no MLflow run {run_id!r} ({tracking_uri(uri)})") from None
        raise
    return RunSummary(
        run_id=run.info.run_id,
        run_name=run.info.run_name or "",
        experiment_id=run.info.experiment_id,
        status=run.info.status,
        metrics=dict(run.data.metrics),
        params=dict(run.data.params),
        tags=dict(run.data.tags),
    )


def download_run_artifacts(run_id: str, path: str, dst: str | Path, *, uri: str = "") -> Path:
    """The artifacts run ``run_id`` logged under ``path``, downloaded into the local folder ``dst``.

    Raises:
        RegistryError: The run logged nothing under ``path``.
    """
    client = _client(uri)
    if not client.list_artifacts(run_id, path):
        raise RegistryError(f"MLflow run {run_id} has no artifacts under {path!r} ({tracking_uri(uri)})")
    return Path(client.download_artifacts(run_id, path, str(dst)))


def open_run(run_id: str, *, uri: str = "") -> Tracker:
    """A `Tracker` on an existing run that leaves its status alone (do not `finish` it): evaluation results
    go to a training run that may be running, finished or failed, and must stay so."""
    summary = run_summary(run_id, uri=uri)
    return Tracker(_client(uri), run_id, summary.experiment_id)


def metric_history(run_id: str, key: str, *, uri: str = "") -> list[tuple[int, float]]:
    """Every ``(step, value)`` of metric ``key`` in run ``run_id``, sorted."""
    return sorted((m.step, m.value) for m in _client(uri).get_metric_history(run_id, key))


def experiment_id(name: str, *, uri: str = "") -> str | None:
    """The id of experiment ``name``; None when there is none."""
    found = _client(uri).get_experiment_by_name(name)
    return found.experiment_id if found is not None else None


def last_step(run_id: str, *, uri: str = "") -> int | None:
    """The largest step any metric of ``run_id`` was logged at; None when it has no metrics."""
    client = _client(uri)
    steps = [m.step for key in client.get_run(run_id).data.metrics for m in client.get_metric_history(run_id, key)]
    return max(steps) if steps else None
