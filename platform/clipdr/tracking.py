"""Experiment tracking behind one small interface; the only module that imports mlflow.

Runs are driven through ``MlflowClient`` with explicit run ids (no fluent global state), so a job
can reopen the same run after a restart and Ray workers never share a hidden active run. Call it from
one process (the driver, or rank 0).

Where runs go: ``MLFLOW_TRACKING_URI`` if set, else the URI given by the config, else a SQLite file
``mlflow.db`` in the working directory with artifacts beside it in ``mlartifacts/``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus

# Opens clipdr experiments on training runs and charts in the MLflow 3 UI instead of its GenAI overview.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
_PARAM_VALUE_LIMIT = 6000  # mlflow's limit on a parameter value's length
_BATCH = 100  # mlflow's limit on params per log_batch call


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
    ) -> Tracker:
        """Starts a new run, or reopens ``run_id`` (a resumed job continues its own run)."""
        resolved = tracking_uri(uri)
        client = MlflowClient(tracking_uri=resolved)
        if run_id:
            run = client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
            return cls(client, run_id, run.info.experiment_id)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            experiment_id = client.create_experiment(
                experiment, artifact_location=_default_artifact_location(resolved), tags=dict([EXPERIMENT_KIND_TAG])
            )
        else:
            experiment_id = found.experiment_id
        run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
        return cls(client, run.info.run_id, experiment_id)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.finish("FINISHED" if exc_type is None else "FAILED")

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), _BATCH * 10):
            self.client.log_batch(self.run_id, metrics=items[i : i + _BATCH * 10])

    def log_dict(self, data: Any, artifact_file: str) -> None:
        """Writes ``data`` as JSON under the run's artifacts (``artifact_file`` may include folders)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
            self.log_artifact(path, str(Path(artifact_file).parent) if "/" in artifact_file else None)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=RunStatus.to_string(RunStatus.from_string(status)))


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | tuple | dict) else str(value)
    return text if len(text) <= _PARAM_VALUE_LIMIT else text[: _PARAM_VALUE_LIMIT - 3] + "..."


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class LoggedModel:
    """Where a logged model went: its ``runs:/`` URI, and its registry name and version when registered."""

    uri: str
    registered_name: str = ""
    version: str = ""


def log_model(
    tracker: Tracker,
    model: Any,
    *,
    name: str = "model",
    input_example: Any = None,
    output_example: Any = None,
    metadata: Mapping[str, Any] | None = None,
    registered_model_name: str = "",
    version_tags: Mapping[str, str] | None = None,
) -> LoggedModel:
    """Logs a torch module with ``mlflow.pytorch`` (pickled with cloudpickle) under ``tracker``'s run.

    The signature is inferred from ``input_example`` -> ``output_example`` (numpy arrays; a batch of at least 2
    so the batch dimension stays free). With ``registered_model_name`` the model is registered as a new version
    and ``version_tags`` are set on it.
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    signature = infer_signature(input_example, output_example) if input_example is not None else None
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracker.client.tracking_uri)
    try:
        # log_model attaches to the active run of the fluent API: open ours without touching its status.
        with mlflow.start_run(run_id=tracker.run_id, nested=mlflow.active_run() is not None):
            info = mlflow.pytorch.log_model(
                model,
                name=name,
                signature=signature,
                input_example=input_example,
                metadata=dict(metadata or {}),
                serialization_format="pickle",
                registered_model_name=registered_model_name or None,
            )
        tracker.client.update_run(tracker.run_id, status="RUNNING")
    finally:
        mlflow.set_tracking_uri(previous)
    uri = f"runs:/{tracker.run_id}/{name}"
    if not registered_model_name:
        return LoggedModel(uri)
    version = str(info.registered_model_version)
    for key, value in (version_tags or {}).items():
        tracker.client.set_model_version_tag(registered_model_name, version, key, str(value))
    return LoggedModel(uri, registered_model_name, version)


def load_model(uri: str, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """A model logged by `log_model` (``runs:/...``, ``models:/name/3``, ``models:/name@alias``) and its metadata.

    The tracking URI in force (`tracking_uri`) resolves the URI. clipdr's training logs a
    `clipdr.models.ClipEmbedder`: its ``.clip`` is the open_clip model, ``metadata["clipdr_model"]`` its name.
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.models import get_model_info

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri())
    try:
        metadata = dict(get_model_info(uri).metadata or {})
        return mlflow.pytorch.load_model(uri, map_location=device), metadata
    finally:
        mlflow.set_tracking_uri(previous)
