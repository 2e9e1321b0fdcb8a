"""``clipdr export`` of a training checkpoint with the default (dynamo) ONNX exporter, logged to its MLflow run."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow import MlflowClient

from clipdr import checkpoint, export, models, tracking
from clipdr.cli import main

pytestmark = pytest.mark.integration


def test_export_checkpoint_to_its_training_run(tmp_path, monkeypatch):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.chdir(tmp_path)
    with tracking.Tracker.start("clipdr-train", "student", tags={"clipdr.mode": "reinforced"}) as tracker:
        tracker.log_params({"train.data": "data/demo/reinforced"})
        tracker.log_metrics({"zeroshot/mean_top1": 0.25}, step=96)

    # A checkpoint as training writes it (without the optimiser state, which export does not read).
    folder = tmp_path / "runs" / "student" / "checkpoint_000001"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = models.create_model("clipdr-tiny-mci")
    meta = checkpoint.CheckpointMeta("clipdr-tiny-mci", "reinforced", "student", tracker.run_id, 3, 96, 3, 3)
    checkpoint.save(folder, model.state_dict(), meta)

    out = tmp_path / "export"
    assert (
        main(["export", "--set", f"export.model={tmp_path / 'runs' / 'student'}", "--set", f"export.output={out}"]) == 0
    )

    manifest = json.loads((out / export.MANIFEST).read_text())
    assert manifest["onnx"]["exporter"] == "dynamo" and manifest["mlflow_run_id"] == tracker.run_id
    assert max(manifest["parity"]["onnx"].values()) < 1e-4
    assert max(manifest["parity"]["fused"].values()) < 1e-4
    assert manifest["training"]["samples seen"] == 96 and manifest["training"]["mode"] == "reinforced"
    assert "| zeroshot/mean_top1 | 0.2500 |" in (out / export.MODEL_CARD).read_text()

    # The ONNX graphs come from the fused model and match the trained one.
    import onnxruntime

    image, tokens = export.example_inputs(model.eval(), "clipdr-tiny-mci", batch_size=3, seed=7)
    ref_image, _ = export.embeddings(model, image, tokens)
    session = onnxruntime.InferenceSession(str(out / export.IMAGE_ONNX), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"image": image.numpy()})
    assert abs(got - ref_image.numpy()).max() < 1e-4

    logged = {a.path for a in MlflowClient(store).list_artifacts(tracker.run_id, "export")}
    assert {f"export/{name}" for name in (export.MANIFEST, export.IMAGE_ONNX, export.OPEN_CLIP_WEIGHTS)} <= logged
    assert MlflowClient(store).get_run(tracker.run_id).info.status == "FINISHED"
