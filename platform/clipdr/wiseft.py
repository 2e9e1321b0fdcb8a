"""WiSE-FT and the start it interpolates with: where a fine-tuning run starts, what the run records about it, and
``start + alpha * (finetuned - start)`` (Wortsman et al., CVPR 2022).

Training (`clipdr.train`) builds its student from the start and publishes WiSE-FT at ``train.finetune.wise_alpha``;
evaluation and export interpolate a fine-tuned model with the start its run recorded at any alpha afterwards
(``evaluate.wise_alpha``, ``export.wise_alpha``: `clipdr.evaluate.loading.with_wise_ft`). Plain torch, no Ray.

- **Start points** (`is_start_folder`, `load_start`, `create_start`): ``train.pretrained`` names an open_clip tag,
  ``hf-hub:`` id or weights file (open_clip loads those), a clipdr training checkpoint or run storage folder (its
  newest complete checkpoint, `clipdr.checkpoint`), or an MLflow model (``runs:/<id>/model``,
  ``models:/<name>/<version>``) logged by clipdr, read as safetensors (`clipdr.tracking.load_model`, never
  unpickled).
- **What a run records** (`recorded_start`): the training run's MLflow params `START_PARAM` and `MODEL_PARAM` (its
  config, as it logs every key), and in its logged model's metadata `LOGGED_ALPHA`, the alpha those weights are
  already interpolated at: the fine-tuned weights themselves are the run's checkpoint's (`clipdr.checkpoint`).
- **WiSE-FT** (`wise_ft`): alpha 1 is the fine-tuned model, 0 the start, both exact copies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from clipdr import checkpoint, storage

_MLFLOW_SCHEMES = ("runs:/", "models:/")
# A training run's MLflow params (`clipdr.config.flatten` of its [train] section, as `clipdr.train.run` logs it).
START_PARAM = "train.pretrained"
MODEL_PARAM = "train.model"
# Metadata of a run's logged model: the WiSE-FT alpha its weights are (train.finetune.wise_alpha), its EMA decay.
LOGGED_ALPHA = "wise_alpha"
LOGGED_EMA_DECAY = "ema_decay"


# --------------------------------------------------------------------------- start points


def is_mlflow_start(pretrained: str) -> bool:
    """Whether ``train.pretrained`` is an MLflow model URI."""
    return pretrained.startswith(_MLFLOW_SCHEMES)


def is_start_folder(pretrained: str) -> bool:
    """Whether ``train.pretrained`` is a folder holding a clipdr checkpoint (a checkpoint, or a run's storage)."""
    return (
        bool(pretrained) and not is_mlflow_start(pretrained) and storage.exists(pretrained) and not _is_file(pretrained)
    )


def _is_file(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = storage.resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def load_start(pretrained: str, model_name: str, tracking_uri: str = "") -> dict[str, Tensor] | None:
    """The start weights ``train.pretrained`` names when clipdr reads them (a checkpoint folder or an MLflow model),
    checked against ``model_name``; None for what open_clip loads itself (tag, hf-hub id, weights file) or nothing.

    Raises:
        ValueError: A folder without a complete checkpoint, or a start of another architecture.
    """
    if is_mlflow_start(pretrained):
        from clipdr import tracking

        logged, metadata = tracking.load_model(pretrained, tracking=tracking_uri, allow_pickle=False)
        name = metadata.get("clipdr_model") or logged.model_name
        _same_model(pretrained, str(name), model_name)
        return {k: v.detach().cpu() for k, v in logged.clip.state_dict().items()}
    if is_start_folder(pretrained):
        found = checkpoint.latest(pretrained)
        if found is None:
            raise ValueError(
                f"train.pretrained {pretrained!r} is a folder without a complete clipdr checkpoint "
                f"({checkpoint.MODEL_FILE}, {checkpoint.META_FILE}) in it or in its sub-folders"
            )
        folder, meta = found
        _same_model(folder, meta.model, model_name)
        return checkpoint.published_weights(folder)  # a run with EMA published its average
    return None


def create_start(
    model_name: str, pretrained: str, seed: int, device: torch.device | str = "cpu", tracking_uri: str = ""
) -> nn.Module:
    """The model a run starts from (train mode, on ``device``): ``pretrained``'s weights, or a random init seeded
    with ``seed`` when it is empty."""
    from clipdr import models

    torch.manual_seed(seed)
    start = load_start(pretrained, model_name, tracking_uri) if pretrained else None
    by_open_clip = pretrained if pretrained and start is None else None
    model = models.create_model(model_name, pretrained=by_open_clip, device=device)
    if start is not None:
        model.load_state_dict(start)
    return model


def _same_model(where: str, found: str, wanted: str) -> None:
    if found != wanted:
        raise ValueError(f"train.pretrained {where!r} holds model {found!r}, but train.model is {wanted!r}")


# --------------------------------------------------------------------------- what a run records


@dataclass(frozen=True)
class RecordedStart:
    """The start a fine-tuning run recorded: its student's architecture and its ``train.pretrained``."""

    model: str
    pretrained: str


def recorded_start(params: Mapping[str, str], run: str) -> RecordedStart:
    """The start the training run ``run`` recorded in its MLflow ``params``.

    Raises:
        ValueError: The run started from a random init (or is no training run): there is no start to interpolate
            with.
    """
    pretrained, model = params.get(START_PARAM, ""), params.get(MODEL_PARAM, "")
    if not pretrained or not model:
        raise ValueError(
            f"training run {run} records no start ({START_PARAM} is {pretrained or 'empty'}): WiSE-FT interpolates "
            "a fine-tuned model with the model its run started from, so it needs a run with train.pretrained set"
        )
    return RecordedStart(model=model, pretrained=pretrained)


def logged_alpha(metadata: Mapping[str, object]) -> float:
    """The WiSE-FT alpha a run's logged model holds (its metadata); 1 (the fine-tuned weights) when not recorded."""
    value = metadata.get(LOGGED_ALPHA)
    return 1.0 if value is None else float(value)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- WiSE-FT


def check_alpha(alpha: float, key: str = "WiSE-FT alpha") -> None:
    """Raises `ValueError` naming ``key`` unless ``alpha`` is in [0, 1]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{key} must be in [0, 1], got {alpha}")


def wise_ft(start: Mapping[str, Tensor], finetuned: Mapping[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """WiSE-FT: ``start + alpha * (finetuned - start)`` for floating tensors (``torch.lerp``); alpha 1 returns the
    fine-tuned tensors and 0 the start's, exactly. Non-floating buffers (counters) are the fine-tuned model's.

    Raises:
        ValueError: ``alpha`` outside [0, 1], or the two state dicts are not of one architecture (other tensors or
            other shapes).
    """
    check_alpha(alpha)
    if set(start) != set(finetuned):
        only = sorted(set(start) ^ set(finetuned))
        raise ValueError(
            f"WiSE-FT needs the start and the fine-tuned model to be one architecture: {len(only)} tensors are in "
            f"one only ({', '.join(only[:3])}{', ...' if len(only) > 3 else ''})"
        )
    shapes = [k for k, v in finetuned.items() if start[k].shape != v.shape]
    if shapes:
        k = shapes[0]
        raise ValueError(
            f"WiSE-FT needs the start and the fine-tuned model to be one architecture: {k} is "
            f"{tuple(start[k].shape)} in the start and {tuple(finetuned[k].shape)} fine-tuned ({len(shapes)} differ)"
        )
    out = {}
    for name, tuned in finetuned.items():
        origin = start[name].to(tuned.device)
        if alpha == 1.0 or not tuned.is_floating_point():
            out[name] = tuned.detach().clone()
        elif alpha == 0.0:
            out[name] = origin.detach().clone()
        else:
            out[name] = torch.lerp(origin.to(tuned.dtype), tuned.detach(), alpha)
    return out


def alpha_label(alpha: float) -> str:
    """The metric prefix of an evaluation at WiSE-FT ``alpha`` (``wise_ft/alpha_0.50``)."""
    return f"wise_ft/alpha_{alpha:.2f}"
