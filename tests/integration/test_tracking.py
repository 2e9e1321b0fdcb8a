"""The tracking interface against a real MLflow SQLite store."""

import pytest
from mlflow import MlflowClient

from clipdr.tracking import Tracker, tracking_uri

pytestmark = pytest.mark.integration


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return tracking_uri()


def test_default_store_is_local_sqlite(store, tmp_path):
    assert store == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_run_logs_params_metrics_artifacts_and_reopens(store, tmp_path):
    with Tracker.start("reinforce", "run-a", tags={"mode": "test"}) as tracker:
        tracker.log_params({"a.b": 1, "a.list": [1, 2], "long": "x" * 7000})
        tracker.log_metrics({"loss": 0.5}, step=1)
        tracker.log_dict({"k": 1}, "manifest/manifest.json")
        run_id = tracker.run_id

    # A restarted job reopens the same run instead of creating a duplicate.
    with Tracker.start("reinforce", run_id=run_id) as again:
        again.log_metrics({"loss": 0.25}, step=2)

    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["a.list"] == "[1, 2]"
    assert run.data.params["long"].endswith("...")
    assert run.data.tags["mode"] == "test"
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [0.5, 0.25]
    assert [a.path for a in client.list_artifacts(run_id, "manifest")] == ["manifest/manifest.json"]
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_failure_marks_run_failed(store):
    with pytest.raises(RuntimeError), Tracker.start("reinforce") as tracker:
        raise RuntimeError("job died")
    assert MlflowClient(store).get_run(tracker.run_id).info.status == "FAILED"


def test_runs_logging_one_dataset_at_once_all_record_it(store):
    """MLflow creates a dataset once per experiment, and not atomically: runs logging the same one side by side (the
    demo's two jobs at a time) race to create it. Every run must end up with it as its input."""
    import threading

    trackers = [Tracker.start("lineage", f"run-{i}") for i in range(6)]
    barrier = threading.Barrier(len(trackers))
    errors = []

    def log(tracker):
        barrier.wait()
        try:
            tracker.log_dataset("reinforced", "sha256:" + "ab" * 32, "/data/reinforced", {"rows": 8}, "training")
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=log, args=(t,)) for t in trackers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    client = MlflowClient(store)
    for tracker in trackers:
        (found,) = client.get_run(tracker.run_id).inputs.dataset_inputs
        assert (found.dataset.name, found.dataset.digest, found.tags[0].value) == ("reinforced", "ab" * 18, "training")
        tracker.finish()
