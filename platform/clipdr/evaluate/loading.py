"""Load a model named the ways evaluation and export accept, and find the MLflow run it comes from.

A model is named by:

- an MLflow model URI: ``runs:/<run id>/model``, ``models:/<name>@<alias>``, ``models:/<name>/<version>``,
  ``models:/m-<id>`` (a model logged by `clipdr.tracking.log_model`: metadata ``clipdr_model`` names it; one
  logged as a pickle before clipdr logged safetensors loads only with ``allow_pickle``);
- a training checkpoint folder (path or ``s3://``, `clipdr.checkpoint`), or a folder whose sub-folders are
  checkpoints (a training run's storage folder: the complete one with the most steps is taken);
- an open_clip / clipdr model name, with ``pretrained`` an open_clip tag, an hf-hub id, a local file, or empty
  for random initialisation.

`with_wise_ft` then replaces a fine-tuned model's weights by WiSE-FT with the start its training run recorded
(``evaluate.wise_alpha``, ``export.wise_alpha``; `clipdr.wiseft`).
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from clipdr import checkpoint, models, storage, wiseft
from clipdr.config import WISE_OFF

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
        meta: The checkpoint's `checkpoint.CheckpointMeta` as a dict, or the logged model's metadata.
        wise_ft: With `with_wise_ft`: its alpha, the start (the run's ``train.pretrained``) and where the fine-tuned
            weights came from; None for the model as named.
    """

    model: nn.Module
    name: str
    source: str
    kind: str
    run_id: str = ""
    samples_seen: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    wise_ft: dict[str, Any] | None = None


def is_mlflow_uri(spec: str) -> bool:
    return spec.startswith(_MLFLOW_SCHEMES)


def load_checkpoint(uri: str, device: str | torch.device = "cpu") -> LoadedModel:
    """The model of the training checkpoint folder ``uri``."""
    try:
        meta = checkpoint.CheckpointMeta.read(uri)
    except (ValueError, TypeError) as e:
        raise ValueError(f"checkpoint {uri}: unreadable {checkpoint.META_FILE} ({e})") from None
    model = models.create_model(meta.model)
    try:
        model.load_state_dict(checkpoint.published_weights(uri))
    except RuntimeError as e:
        raise ValueError(f"checkpoint {uri}: {checkpoint.MODEL_FILE} does not fit model {meta.model!r}: {e}") from None
    return LoadedModel(
        model=model.to(device).eval(),
        name=meta.model,
        source=uri,
        kind="checkpoint",
        run_id=meta.mlflow_run_id,
        samples_seen=meta.samples_seen,
        meta=dataclasses.asdict(meta),
    )


def load_mlflow(
    uri: str, device: str | torch.device = "cpu", tracking_uri: str = "", allow_pickle: bool = False
) -> LoadedModel:
    """A model logged by `clipdr.tracking.log_model`, by its MLflow URI (pickled ones only with ``allow_pickle``)."""
    from clipdr import tracking

    logged, metadata = tracking.load_model(uri, device=str(device), tracking=tracking_uri, allow_pickle=allow_pickle)
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


def load(
    spec: str,
    pretrained: str = "",
    device: str | torch.device = "cpu",
    tracking_uri: str = "",
    allow_pickle: bool = False,
) -> LoadedModel:
    """Loads the model ``spec`` names (see the module docstring).

    Args:
        spec: MLflow model URI, checkpoint folder, or model name.
        pretrained: With a model name: its weights (empty: random initialisation). Refused with the other forms.
        device: Where the model goes.
        tracking_uri: MLflow tracking URI of the config (``MLFLOW_TRACKING_URI`` wins).
        allow_pickle: Also load MLflow models logged as pickles (before clipdr logged safetensors); unpickling
            runs any code the model holds.

    Raises:
        ValueError: ``spec`` is empty or none of the accepted forms, or ``pretrained`` is given with a URI/folder.
        clipdr.tracking.PickledModelError: A pickled MLflow model without ``allow_pickle``.
    """
    if not spec:
        raise ValueError("no model given: set it to an MLflow model URI, a checkpoint folder or a model name")
    if is_mlflow_uri(spec):
        _no_pretrained(spec, pretrained)
        return load_mlflow(spec, device, tracking_uri, allow_pickle)
    if "://" in spec or storage.exists(spec):
        found = checkpoint.latest(spec) if storage.exists(spec) else None
        if found is None:
            raise ValueError(
                f"{spec!r} is not a training checkpoint: expected a complete one ({checkpoint.MODEL_FILE}, "
                f"{checkpoint.META_FILE}) in it or in its sub-folders"
            )
        _no_pretrained(spec, pretrained)
        return load_checkpoint(found[0], device)
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


# --------------------------------------------------------------------------- WiSE-FT after training


def wise_ft_on(alpha: float, key: str) -> bool:
    """Whether ``key`` (``evaluate.wise_alpha``, ``export.wise_alpha``) asks for WiSE-FT; `ValueError` unless it is
    `clipdr.config.WISE_OFF` or in [0, 1]."""
    if alpha == WISE_OFF:
        return False
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{key} must be in [0, 1] ({WISE_OFF:g}: off), got {alpha}")
    return True


def with_wise_ft(loaded: LoadedModel, alpha: float, tracking_uri: str = "", key: str = "wise_alpha") -> LoadedModel:
    """``loaded`` with the weights ``start + alpha * (finetuned - start)`` (`clipdr.wiseft.wise_ft`).

    The start is what ``loaded``'s training run recorded (`clipdr.wiseft.recorded_start`), built as training built
    it (`clipdr.wiseft.create_start`). The fine-tuned weights are the run's own, before its
    ``train.finetune.wise_alpha``: a checkpoint's published weights (its EMA when it kept one), or for an MLflow
    model the logged weights when they are not interpolated, else the checkpoint the run logged beside them.

    Raises:
        ValueError: ``alpha`` outside [0, 1], a model without a training run or whose run recorded no start, a
            start of another architecture, or a logged model whose fine-tuned weights the run did not log.
    """
    from clipdr import tracking

    if not wise_ft_on(alpha, key):
        raise ValueError(f"{key}: WiSE-FT needs an alpha in [0, 1], got {alpha:g} (off)")
    if loaded.kind == "name" or not loaded.run_id:
        raise ValueError(
            f"{key}: {loaded.source} has no recorded start: WiSE-FT interpolates a fine-tuned model (a training "
            "checkpoint or a logged model of a run with train.pretrained set) with the start its run recorded"
        )
    try:
        params = tracking.run_summary(loaded.run_id, uri=tracking_uri).params
    except tracking.RegistryError as e:
        raise ValueError(f"{key}: {loaded.source}: no recorded start, its training run is not found ({e})") from None
    start_of = wiseft.recorded_start(params, loaded.run_id)
    if start_of.model != loaded.name:
        raise ValueError(
            f"{key}: {loaded.source} is a {loaded.name!r}, but its training run {loaded.run_id} trained "
            f"{start_of.model!r} ({wiseft.MODEL_PARAM}): not the same architecture"
        )
    finetuned, where = _finetuned_weights(loaded, tracking_uri, key)
    try:
        start = wiseft.create_start(start_of.model, start_of.pretrained, seed=0, tracking_uri=tracking_uri)
    except (RuntimeError, FileNotFoundError) as e:  # open_clip's missing file or unknown tag
        raise ValueError(f"{key}: the recorded start {start_of.pretrained!r} cannot be loaded: {e}") from None
    loaded.model.load_state_dict(wiseft.wise_ft(start.state_dict(), finetuned, alpha))
    record = {"alpha": alpha, "start": start_of.pretrained, "finetuned": where}
    return dataclasses.replace(loaded, wise_ft=record)


def _finetuned_weights(loaded: LoadedModel, tracking_uri: str, key: str) -> tuple[dict[str, Any], str]:
    """The fine-tuned weights of ``loaded`` (see `with_wise_ft`) and where they come from."""
    from clipdr import tracking

    own = {k: v.detach().to("cpu").clone() for k, v in loaded.model.state_dict().items()}
    if loaded.kind == "checkpoint":
        return own, loaded.source  # published weights, never interpolated
    logged_alpha = wiseft.logged_alpha(loaded.meta)
    if logged_alpha == 1.0:
        return own, loaded.source
    where = f"runs:/{loaded.run_id}/{checkpoint.ARTIFACT_PATH}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = tracking.download_run_artifacts(loaded.run_id, checkpoint.ARTIFACT_PATH, tmp, uri=tracking_uri)
        except tracking.RegistryError as e:
            raise ValueError(
                f"{key}: {loaded.source} holds WiSE-FT at alpha {logged_alpha:g} and its run logged no checkpoint "
                f"to take the fine-tuned weights from ({e}): name the run's checkpoint folder instead"
            ) from None
        ema_decay = float(loaded.meta.get(wiseft.LOGGED_EMA_DECAY) or 0.0)
        if ema_decay > 0 and not (folder / checkpoint.EMA_FILE).exists():
            raise ValueError(
                f"{key}: {loaded.source} holds WiSE-FT at alpha {logged_alpha:g} of an EMA, but its run logged no "
                f"{checkpoint.EMA_FILE} (runs before the EMA was logged): name the run's checkpoint folder instead"
            )
        return checkpoint.published_weights(folder), where
