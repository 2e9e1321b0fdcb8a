"""The tracking URI a process's MLflow fluent API uses (log_model, load_model): pointed per call, or pinned."""

import os

import mlflow

from clipdr import tracking


def test_a_pinned_uri_is_left_in_force_by_every_call(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, other = f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
    with tracking.pinned_uri(uri) as pinned:
        assert pinned == uri == mlflow.get_tracking_uri() == os.environ["MLFLOW_TRACKING_URI"]
        with tracking._fluent_tracking_uri(uri):  # what a job's log_model does: the pin is already in force
            assert mlflow.get_tracking_uri() == uri
        assert os.environ["MLFLOW_TRACKING_URI"] == uri  # not restored under another job's feet
        with tracking._fluent_tracking_uri(other):  # another store: pointed at for the call, then back
            assert mlflow.get_tracking_uri() == other
        assert mlflow.get_tracking_uri() == uri == os.environ["MLFLOW_TRACKING_URI"]
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the process is left as it was
