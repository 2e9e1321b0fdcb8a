"""Logged models: safetensors that load back embedding as they did, loading that never unpickles, and registration
that is idempotent per run (a resubmitted job registers its model once).

Real MLflow (one SQLite store for the module), real tiny models. Unpickling is watched through Python's audit event
``pickle.find_class``, which every unpickler (C or pure Python) raises for each class or function a pickle names:
a pickle that runs code must name something.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import mlflow.pyfunc
import mlflow.pytorch
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from torch import nn

from clipdr import lifecycle, models, tracking
from clipdr.cli import main
from clipdr.evaluate import preprocess_of
from clipdr.models.embedder import INFO_FILE

NAME = "clipdr-tiny-vit"
_unpickled: list[tuple[str, str]] | None = None  # the classes and functions unpickled while recording


def _audit(event: str, args: tuple) -> None:
    if _unpickled is not None and event == "pickle.find_class":
        _unpickled.append(args)


@functools.cache
def _install_audit_hook() -> None:
    sys.addaudithook(_audit)  # an audit hook cannot be removed: installed once, it records only when asked


@contextlib.contextmanager
def unpickling_recorded() -> Iterator[list[tuple[str, str]]]:
    """Records what any unpickling in this process resolves while the block runs."""
    global _unpickled
    _install_audit_hook()
    _unpickled = found = []
    try:
        yield found
    finally:
        _unpickled = None


def _plant(marker: str) -> nn.Module:
    Path(marker).write_text("unpickled")
    return nn.Identity()


class Planting(nn.Module):
    """A module whose unpickling writes ``marker``: what any code in a pickled model could do instead."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def __reduce__(self):
        return _plant, (self.marker,)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        patch.chdir(folder)
        yield folder


@pytest.fixture(scope="module")
def logged(store):
    """A tiny student logged the way training logs it, unregistered: a job that died before registering it."""
    torch.manual_seed(0)
    embedder = models.ClipEmbedder(models.create_model(NAME), NAME).eval()
    tracker = tracking.Tracker.start("clipdr-train", "student")
    first = tracking.log_model(
        tracker,
        embedder,
        metadata={"clipdr_model": NAME, "samples_seen": 64},
    )
    return tracker, embedder, first


def test_a_logged_model_loads_back_from_safetensors_and_embeds_as_it_did(store, logged):
    _, embedder, first = logged
    with unpickling_recorded() as unpickled:
        loaded, metadata = tracking.load_model(first.uri)
    assert unpickled == []
    assert metadata["clipdr_model"] == NAME and loaded.model_name == NAME and not loaded.training
    stored = {p.relative_to(store) for p in (store / "mlartifacts").rglob("*") if p.is_file()}
    assert not [p for p in stored if p.suffix in (".pkl", ".pth", ".pt")], stored
    images = torch.randn(3, 3, 32, 32)
    tokens = models.get_tokenizer(NAME)(["a red square", "a blue circle"])
    with torch.no_grad():  # the same kernels on both sides (no_grad takes attention's fast path)
        assert torch.equal(loaded(images), embedder(images))
        assert torch.equal(loaded.encode_text(tokens), embedder.encode_text(tokens))
    # Servable: MLflow's python_function flavour (what `mlflow models serve` loads) embeds raw images (bytes or
    # base64) and captions as the model does after its own preprocessing and tokenizer.
    pngs = [png(size, colour) for size, colour in (((32, 32), (200, 30, 30)), ((50, 20), (10, 90, 250)))]
    request = pd.DataFrame({"image": [pngs[0], base64.b64encode(pngs[1]).decode(), None], "text": ["a dog", None, "x"]})
    served = mlflow.pyfunc.load_model(first.uri).predict(request)
    want_images, want_texts = direct_embeddings(embedder, pngs, ["a dog", "x"])
    assert served["image_embedding"][2] is None and served["text_embedding"][1] is None
    np.testing.assert_array_equal(np.array(list(served["image_embedding"][:2]), dtype=np.float32), want_images)
    np.testing.assert_array_equal(np.array(list(served["text_embedding"][[0, 2]]), dtype=np.float32), want_texts)
    with pytest.raises(ValueError, match="row 0: 'image' is not a readable"):
        mlflow.pyfunc.load_model(first.uri).predict(pd.DataFrame({"image": [b"not an image"]}))


def png(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    """An encoded PNG with a gradient (so that resizing and cropping matter)."""
    array_HWC = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    array_HWC[...] = colour
    array_HWC[:, :, 1] = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :]
    buffer = io.BytesIO()
    Image.fromarray(array_HWC).save(buffer, format="PNG")
    return buffer.getvalue()


def direct_embeddings(embedder, pngs: list[bytes], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """What serving must give, computed without it: evaluation's preprocessing, the tokenizer, the embedder."""
    preprocess = preprocess_of(embedder.clip)
    pixels = [preprocess.to_pixels(Image.open(io.BytesIO(data)).convert("RGB")) for data in pngs]
    with torch.no_grad():
        images = embedder.encode_image(preprocess.batch(pixels, torch.device("cpu"))).numpy()
        texts_emb = embedder.encode_text(models.get_tokenizer(embedder.model_name)(texts)).numpy()
    return images, texts_emb


def test_a_resubmission_after_a_crash_between_logging_and_registering_registers_one_version(store, logged):
    tracker, embedder, first = logged
    # The resubmission runs the end of training again: log (and register) the model.
    again = tracking.log_model(tracker, embedder, registered_model_name="student", version_tags={"mode": "clip"})
    # ... and once more, as if it died after registering but before recording its result.
    third = tracking.log_model(tracker, embedder, registered_model_name="student", version_tags={"mode": "clip"})
    candidate = lifecycle.register_candidate(again.uri, "student")  # `clipdr promote`'s path, same model

    client = MlflowClient(tracking.tracking_uri())
    found = client.search_logged_models(experiment_ids=[tracker.experiment_id])
    assert [m.source_run_id for m in found].count(tracker.run_id) == 1  # logged once
    versions = client.search_model_versions("name = 'student'")
    assert [str(v.version) for v in versions] == ["1"]  # registered once
    assert first.uri == again.uri == third.uri == f"runs:/{tracker.run_id}/model"
    assert again.version == third.version == candidate.version == "1"
    assert versions[0].run_id == tracker.run_id and versions[0].tags["mode"] == "clip"
    assert "candidate" in candidate.aliases


def test_a_pickled_model_is_refused_unless_pickles_are_allowed(store, capsys):
    """A model logged with mlflow.pytorch before clipdr stored safetensors: refused, unpickled only when allowed."""
    marker = store / "unpickled"
    with tracking.Tracker.start("clipdr-train", "old") as tracker, mlflow.start_run(run_id=tracker.run_id):
        mlflow.pytorch.log_model(
            Planting(str(marker)), name="model", serialization_format="pickle", pip_requirements=["torch"]
        )
    uri = f"runs:/{tracker.run_id}/model"

    with unpickling_recorded() as unpickled, pytest.raises(tracking.PickledModelError, match="allow_pickle"):
        tracking.load_model(uri)
    assert main(["evaluate", "--set", f"evaluate.model={uri}"]) == 2
    assert main(["export", "--set", f"export.model={uri}", "--set", f"export.output={store / 'export'}"]) == 2
    assert unpickled == [] and not marker.exists()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("clipdr ")]
    assert len(errors) == 2 and all("is a pickle" in e and "allow_pickle" in e for e in errors), errors

    with unpickling_recorded() as unpickled:
        tracking.load_model(uri, allow_pickle=True)
    assert marker.exists() and ("tests.unit.test_logged_model", "_plant") in unpickled  # the check can fail


def test_logged_files_that_do_not_fit_are_refused(tmp_path):
    embedder = models.ClipEmbedder(models.create_model(NAME), NAME)
    embedder.save(tmp_path / "vit")
    info = (tmp_path / "vit" / INFO_FILE).read_text()
    (tmp_path / "vit" / INFO_FILE).write_text(info.replace(NAME, "clipdr-tiny-mci"))
    with pytest.raises(ValueError, match="does not fit model 'clipdr-tiny-mci'"):
        models.ClipEmbedder.load(tmp_path / "vit")
    (tmp_path / "vit" / INFO_FILE).write_text(info.replace(NAME, "hf-hub:someone/model"))
    with pytest.raises(ValueError, match="without a scheme"):
        models.ClipEmbedder.load(tmp_path / "vit")
