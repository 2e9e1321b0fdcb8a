"""The form in which a trained model is logged and served: a CLIP model whose forward embeds images.

MLflow's pytorch flavour serves a module as one tensor in, one tensor out. `ClipEmbedder` keeps the whole
open_clip model (``.clip``, for `encode_text`, zero-shot evaluation and export) and maps a batch of
preprocessed images to L2-normalised image embeddings when called, so the registered model is servable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
