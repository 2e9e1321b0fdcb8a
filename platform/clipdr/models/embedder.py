"""The form in which a trained model is logged and served: a CLIP model, its preprocessing and tokenizer.

`ClipEmbedder` keeps the whole open_clip model (``.clip``, for `encode_text`, zero-shot evaluation and export) and
maps a batch of preprocessed images to L2-normalised image embeddings when called.

This module owns the files of a logged model (`clipdr.tracking.log_model` puts them in the MLflow model's
``data`` folder): the weights as safetensors (``model.safetensors``) and ``clipdr_model.json`` naming the
architecture. Loading builds the architecture by name and fills it from the safetensors file: nothing is
unpickled, so a logged model cannot run code when it is loaded.

It also owns what the logged model serves (MLflow's ``python_function`` flavour loads it through `_load_pyfunc`;
``mlflow models serve`` where clipdr is installed): `ServedModel` takes rows with a raw image (``image``: encoded
JPEG / PNG / WebP bytes, or the same base64-encoded, as JSON carries them) and/or a caption (``text``), decodes,
preprocesses and tokenises them as the model was trained, and returns per row ``image_embedding`` and
``text_embedding``, L2-normalised (None where the row had no image or no text). A row with neither, an image that
does not decode or a value of the wrong type is refused with a `ValueError` naming the row (HTTP 400 from the
MLflow server).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "clipdr_model.json"
FORMAT_VERSION = 1
# The served model's columns: inputs (both optional per row) and outputs (`ServedModel`).
IMAGE = "image"
TEXT = "text"
IMAGE_EMBEDDING = "image_embedding"
TEXT_EMBEDDING = "text_embedding"
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # a served image with more pixels is refused before it is decoded


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


class ServedModel:
    """What MLflow's ``python_function`` flavour serves: rows of raw images and/or captions -> embeddings.

    ``predict`` takes a pandas DataFrame (or a list of dicts, or a dict of lists) with an ``image`` column (bytes,
    or a base64 string) and/or a ``text`` column (str), either may be missing or None in a row; it returns a
    DataFrame with ``image_embedding`` and ``text_embedding`` per row (float32 lists, L2-normalised; None where
    the row had no such input). Images are decoded as the data readers decode them (`clipdr.data.sources`) and
    preprocessed with the model's own evaluation transform (its ``visual.preprocess_cfg``); captions go through the
    model's tokenizer. A float array of preprocessed images ``(B, 3, H, W)`` is still accepted and gives their
    embeddings as an array: models logged before this form had that signature, and their server loads this class.
    """

    def __init__(self, embedder: ClipEmbedder) -> None:
        from open_clip.transform import PreprocessCfg, image_transform_v2

        from clipdr.models.factory import get_tokenizer

        self.embedder = embedder.eval()
        known = set(PreprocessCfg.__dataclass_fields__)
        cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in embedder.clip.visual.preprocess_cfg.items()}
        self.preprocess = image_transform_v2(PreprocessCfg(**{k: v for k, v in cfg.items() if k in known}), False)
        self.tokenizer = get_tokenizer(embedder.model_name)

    @torch.no_grad()
    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        import pandas as pd

        if isinstance(model_input, np.ndarray) and model_input.ndim == 4:  # the earlier signature: preprocessed images
            return self.embedder(torch.as_tensor(model_input, dtype=torch.float32)).numpy()
        rows = pd.DataFrame(model_input) if not isinstance(model_input, pd.DataFrame) else model_input
        unknown = sorted(set(map(str, rows.columns)) - {IMAGE, TEXT})
        if unknown or not len(rows.columns):
            raise ValueError(f"expected columns {IMAGE!r} and/or {TEXT!r}, got {list(map(str, rows.columns))}")
        images = _column(rows, IMAGE)
        texts = _column(rows, TEXT)
        for i, (image, text) in enumerate(zip(images, texts, strict=True)):
            if image is None and text is None:
                raise ValueError(f"row {i}: neither {IMAGE!r} nor {TEXT!r} is set")
            if text is not None and not isinstance(text, str):
                raise ValueError(f"row {i}: {TEXT!r} must be a string, got {type(text).__name__}")
        image_rows = [i for i, image in enumerate(images) if image is not None]
        text_rows = [i for i, text in enumerate(texts) if text is not None]
        image_emb: list[Any] = [None] * len(rows)
        text_emb: list[Any] = [None] * len(rows)
        if image_rows:
            pixels_BCHW = torch.stack([self.preprocess(_decode_image(images[i], i)) for i in image_rows])
            for i, emb_D in zip(image_rows, self.embedder.encode_image(pixels_BCHW).numpy(), strict=True):
                image_emb[i] = emb_D.tolist()
        if text_rows:
            tokens_BL = self.tokenizer([texts[i] for i in text_rows])
            for i, emb_D in zip(text_rows, self.embedder.encode_text(tokens_BL).numpy(), strict=True):
                text_emb[i] = emb_D.tolist()
        return pd.DataFrame({IMAGE_EMBEDDING: image_emb, TEXT_EMBEDDING: text_emb})

    def example_request(self, captions: Sequence[str] = ("a photo of a dog", "a red square")) -> Any:
        """A request (DataFrame) of one PNG image per caption, for the logged model's input example."""
        import io

        import pandas as pd
        from PIL import Image

        size = self.embedder.clip.visual.image_size
        width, height = (size, size) if isinstance(size, int) else (size[1], size[0])
        images = []
        for i in range(len(captions)):
            buffer = io.BytesIO()
            Image.new("RGB", (width, height), (40 * i, 120, 200)).save(buffer, format="PNG")
            images.append(buffer.getvalue())
        return pd.DataFrame({IMAGE: images, TEXT: list(captions)})


def _column(rows: Any, name: str) -> list[Any]:
    if name not in rows.columns:
        return [None] * len(rows)
    return [None if value is None or (isinstance(value, float) and np.isnan(value)) else value for value in rows[name]]


def _decode_image(value: Any, row: int) -> Any:
    """An encoded image (bytes, or base64 text) decoded to RGB; `ValueError` naming ``row`` when it is not one."""
    from clipdr.data.sources import InvalidSampleError, decode_rgb

    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"row {row}: {IMAGE!r} is a string but not base64") from None
    if not isinstance(value, bytes | bytearray | memoryview):
        raise ValueError(f"row {row}: {IMAGE!r} must be encoded image bytes or base64, got {type(value).__name__}")
    try:
        return decode_rgb(bytes(value), MAX_IMAGE_PIXELS)
    except InvalidSampleError as e:
        raise ValueError(f"row {row}: {IMAGE!r} is not a readable JPEG, PNG or WebP image ({e})") from None


def _load_pyfunc(data_path: str) -> ServedModel:
    """MLflow's ``python_function`` loader (the logged model's ``loader_module`` is this module)."""
    return ServedModel(ClipEmbedder.load(data_path))
