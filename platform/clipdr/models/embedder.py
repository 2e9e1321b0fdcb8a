"""The form in which a trained model is logged and served: a CLIP model whose forward embeds images.

MLflow's pytorch flavour serves a module as one tensor in, one tensor out. `ClipEmbedder` keeps the whole
open_clip model (``.clip``, for `encode_text`, zero-shot evaluation and export) and maps a batch of
preprocessed images to L2-normalised image embeddings when called, so the registered model is servable.

This module owns the files of a logged model (`clipdr.tracking.log_model` puts them in the MLflow model's
``data`` folder): the weights as safetensors (``model.safetensors``) and ``clipdr_model.json`` naming the
architecture. Loading builds the architecture by name and fills it from the safetensors file: nothing is
unpickled, so a logged model cannot run code when it is loaded. MLflow's ``python_function`` flavour loads it
through `_load_pyfunc` (``mlflow models serve`` in an environment where clipdr is installed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "clipdr_model.json"
FORMAT_VERSION = 1


class ClipEmbedder(nn.Module):
    """An open_clip CLIP model with ``forward(image_BCHW) -> image_emb_BD`` (L2-normalised).

    Args:
        clip: The open_clip model (CLIP, CustomTextCLIP or CoCa).
        model_name: Its open_clip / clipdr name, so the tokenizer and preprocessing can be rebuilt.
    """

    def __init__(self, clip: nn.Module, model_name: str) -> None:
        super().__init__()
        self.clip = clip
        self.model_name = model_name

    def forward(self, image_BCHW: Tensor) -> Tensor:
        return self.encode_image(image_BCHW)

    def encode_image(self, image_BCHW: Tensor) -> Tensor:
        return F.normalize(self.clip.encode_image(image_BCHW).float(), dim=-1)

    def encode_text(self, tokens_BT: Tensor) -> Tensor:
        return F.normalize(self.clip.encode_text(tokens_BT).float(), dim=-1)

    @torch.no_grad()
    def example(self, batch_size: int = 2) -> tuple[Tensor, Tensor]:
        """A zero input batch of the model's image size and its embeddings (for an MLflow signature)."""
        size = self.clip.visual.image_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        image_BCHW = torch.zeros(batch_size, 3, *size)
        return image_BCHW, self(image_BCHW)

    def save(self, folder: str | Path) -> None:
        """Writes the logged form into ``folder`` (created): the weights of ``.clip`` and the architecture's name."""
        from safetensors.torch import save_model

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_model(self.clip, str(folder / WEIGHTS_FILE))  # keeps one copy of tensors that share storage
        info = {"format_version": FORMAT_VERSION, "model": self.model_name}
        (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")

    @staticmethod
    def is_saved(folder: str | Path) -> bool:
        """Whether ``folder`` holds a model written by `save`."""
        return (Path(folder) / INFO_FILE).is_file()

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> ClipEmbedder:
        """The model `save` wrote to ``folder``, in eval mode on ``device``; unpickles nothing.

        Raises:
            ValueError: The folder is not in this form, names an unknown architecture or one with a scheme
                (``hf-hub:``, ``local-dir:``: building it would read weights from elsewhere), or its weights do
                not fit the architecture.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        from clipdr.models.factory import create_model

        folder = Path(folder)
        try:
            info = json.loads((folder / INFO_FILE).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{folder}: no readable {INFO_FILE} ({e})") from None
        info = info if isinstance(info, dict) else {}
        version, name = info.get("format_version"), info.get("model")
        if version != FORMAT_VERSION or not isinstance(name, str) or ":" in name:
            raise ValueError(
                f"{folder / INFO_FILE}: expected format_version {FORMAT_VERSION} and a model name without a "
                f"scheme, got format_version={version!r}, model={name!r}"
            )
        clip = create_model(name)
        try:
            load_model(clip, str(folder / WEIGHTS_FILE), strict=True)
        except (OSError, SafetensorError, RuntimeError) as e:  # missing, a bad header, keys or shapes that do not fit
            raise ValueError(f"{folder / WEIGHTS_FILE} does not fit model {name!r}: {e}") from None
        return cls(clip, name).to(device).eval()


class _Served:
    """What MLflow's ``python_function`` flavour serves: a batch of preprocessed images -> their embeddings."""

    def __init__(self, embedder: ClipEmbedder) -> None:
        self.embedder = embedder

    @torch.no_grad()
    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        image_BCHW = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        return self.embedder(image_BCHW).numpy()


def _load_pyfunc(data_path: str) -> _Served:
    """MLflow's ``python_function`` loader (the logged model's ``loader_module`` is this module)."""
    return _Served(ClipEmbedder.load(data_path))
