"""Load a model named the ways evaluation and export accept, and find the MLflow run it comes from.

A model is named by:

- an MLflow model URI: ``runs:/<run id>/model``, ``models:/<name>@<alias>``, ``models:/<name>/<version>``,
  ``models:/m-<id>`` (a model logged by `clipdr.tracking.log_model`: metadata ``clipdr_model`` names it);
- a training checkpoint folder (path or ``s3://``): ``model.pt`` (a plain open_clip state dict) and
  ``meta.json`` (``model``, ``step``, ``samples_seen``, ``mlflow_run_id``, ...), or a folder whose
  sub-folders are such checkpoints (a training run's storage folder: the one with the most steps is taken);
- an open_clip / clipdr model name, with ``pretrained`` an open_clip tag, an hf-hub id, a local file, or empty
  for random initialisation.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from clipdr import models, storage

# The checkpoint contract with the training job (clipdr.train.loop writes these two files).
MODEL_FILE = "model.pt"
META_FILE = "meta.json"
_MLFLOW_SCHEMES = ("runs:/", "models:/")


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for evaluation or export.

    Attributes:
        model: The open_clip model, in eval mode, on the requested device.
        name: Its open_clip / clipdr name (tokenizer, config, preprocessing).
        source: How it was named (the spec given).
        kind: ``mlflow``, ``checkpoint`` or ``name``.
        run_id: The MLflow run that trained it ("" when unknown).
        samples_seen: Training samples seen when it was saved, when known (training logs metrics at this step).
        meta: The checkpoint's ``meta.json`` or the logged model's metadata.
    """

    model: nn.Module
    name: str
    source: str
    kind: str
    run_id: str = ""
    samples_seen: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def is_mlflow_uri(spec: str) -> bool:
    return spec.startswith(_MLFLOW_SCHEMES)


def _is_checkpoint(uri: str) -> bool:
    return storage.exists(storage.join(uri, MODEL_FILE)) and storage.exists(storage.join(uri, META_FILE))


def latest_checkpoint(uri: str) -> str | None:
    """``uri`` when it is a checkpoint folder, else its checkpoint sub-folder with the most steps, else None."""
    if _is_checkpoint(uri):
        return uri
    prefix = storage.join(uri, "")
    best: tuple[int, str] | None = None
    for found in storage.list_files(uri, suffixes=(META_FILE,), recursive=True):
        rel = found[len(prefix) :].replace("\\", "/")
        if rel.count("/") != 1 or storage.basename(found) != META_FILE:
            continue
        folder = storage.join(uri, rel.split("/")[0])
        if not storage.exists(storage.join(folder, MODEL_FILE)):
            continue
        try:
            step = int(json.loads(storage.read_bytes(found)).get("step", -1))
        except (ValueError, AttributeError):
            continue
        if best is None or step > best[0]:
            best = (step, folder)
    return best[1] if best else None


def load_checkpoint(uri: str, device: str | torch.device = "cpu") -> LoadedModel:
    """The model of a training checkpoint folder (see the module docstring)."""
    meta_uri = storage.join(uri, META_FILE)
    try:
        meta = json.loads(storage.read_bytes(meta_uri))
        name = meta["model"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {uri}: {META_FILE} must be JSON with a 'model' name ({e})") from None
    model = models.create_model(name)
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(uri, MODEL_FILE))), map_location="cpu")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {uri}: {MODEL_FILE} does not fit model {name!r}: {e}") from None
    samples = meta.get("samples_seen")
    return LoadedModel(
        model=model.to(device).eval(),
        name=name,
        source=uri,
        kind="checkpoint",
        run_id=str(meta.get("mlflow_run_id") or ""),
        samples_seen=int(samples) if samples is not None else None,
        meta=meta,
    )


def load_mlflow(uri: str, device: str | torch.device = "cpu", tracking_uri: str = "") -> LoadedModel:
    """A model logged by `clipdr.tracking.log_model`, by its MLflow URI."""
    from clipdr import tracking

    logged, metadata = tracking.load_model(uri, device=str(device), tracking=tracking_uri)
    inner = getattr(logged, "clip", None)  # clipdr.models.ClipEmbedder: the open_clip model is .clip
    model = inner if isinstance(inner, nn.Module) else logged
    name = metadata.get("clipdr_model") or getattr(logged, "model_name", "")
    if not name:
        raise ValueError(
            f"model {uri} has no 'clipdr_model' metadata naming its architecture; was it logged by clipdr?"
        )
    samples = metadata.get("samples_seen")
    return LoadedModel(
        model=model.to(device).eval(),
        name=str(name),
        source=uri,
        kind="mlflow",
        run_id=tracking.model_run_id(uri, uri=tracking_uri),
        samples_seen=int(samples) if samples is not None else None,
        meta=metadata,
    )


def load(spec: str, pretrained: str = "", device: str | torch.device = "cpu", tracking_uri: str = "") -> LoadedModel:
    """Loads the model ``spec`` names (see the module docstring).

    Args:
        spec: MLflow model URI, checkpoint folder, or model name.
        pretrained: With a model name: its weights (empty: random initialisation). Refused with the other forms.
        device: Where the model goes.
        tracking_uri: MLflow tracking URI of the config (``MLFLOW_TRACKING_URI`` wins).

    Raises:
        ValueError: ``spec`` is empty or none of the accepted forms, or ``pretrained`` is given with a URI/folder.
    """
    if not spec:
        raise ValueError("no model given: set it to an MLflow model URI, a checkpoint folder or a model name")
    if is_mlflow_uri(spec):
        _no_pretrained(spec, pretrained)
        return load_mlflow(spec, device, tracking_uri)
    if "://" in spec or storage.exists(spec):
        checkpoint = latest_checkpoint(spec) if storage.exists(spec) else None
        if checkpoint is None:
            raise ValueError(
                f"{spec!r} is not a training checkpoint: expected {MODEL_FILE} and {META_FILE} in it or in its "
                "sub-folders"
            )
        _no_pretrained(spec, pretrained)
        return load_checkpoint(checkpoint, device)
    try:
        model = models.create_model(spec, pretrained=pretrained or None)
    except ValueError as e:
        raise ValueError(
            f"{spec!r} is not an MLflow model URI (runs:/..., models:/...), an existing checkpoint folder, or a "
            f"known model name: {e}"
        ) from None
    return LoadedModel(model=model.to(device).eval(), name=spec, source=spec, kind="name")


def _no_pretrained(spec: str, pretrained: str) -> None:
    if pretrained:
        raise ValueError(f"pretrained={pretrained!r} only applies to a model name, not to {spec!r}")
