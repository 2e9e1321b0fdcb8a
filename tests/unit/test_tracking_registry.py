"""Registration is idempotent per run: a resubmitted job registers its model once (real MLflow, SQLite store)."""

from __future__ import annotations

from mlflow import MlflowClient
from torch import nn

from clipdr import lifecycle, tracking


def test_a_resubmission_after_a_crash_between_logging_and_registering_registers_one_version(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    store = tracking.tracking_uri()
    tracker = tracking.Tracker.start("clipdr-train", "student")
    model = nn.Linear(2, 2)

    # The first submission logged the model, then died before registering it.
    first = tracking.log_model(tracker, model)
    # The resubmission runs the end of training again: log (and register) the model.
    again = tracking.log_model(tracker, model, registered_model_name="student", version_tags={"mode": "clip"})
    # ... and once more, as if it died after registering but before recording its result.
    third = tracking.log_model(tracker, model, registered_model_name="student", version_tags={"mode": "clip"})
    candidate = lifecycle.register_candidate(again.uri, "student")  # `clipdr promote`'s path, same model

    client = MlflowClient(store)
    logged = client.search_logged_models(experiment_ids=[tracker.experiment_id])
    assert len(logged) == 1  # logged once
    versions = client.search_model_versions("name = 'student'")
    assert [str(v.version) for v in versions] == ["1"]  # registered once
    assert first.uri == again.uri == third.uri == f"runs:/{tracker.run_id}/model"
    assert again.version == third.version == candidate.version == "1"
    assert versions[0].run_id == tracker.run_id and versions[0].tags["mode"] == "clip"
    assert "candidate" in candidate.aliases
