"""Structural re-parameterisation: fuse train-time branches into single convolutions for inference.

The one entry point used by training (evaluation copies), export and the benchmarks.
"""

from __future__ import annotations

from timm.models import reparameterize_model
from torch import nn


def reparameterize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fuses every re-parameterisable block of ``model`` (image and text towers) for inference.

    MCi image towers (timm FastViT: MobileOne stem and downsampling blocks, RepMixer, RepCPE, large-kernel convs)
    and the MCt text tower's RepMixers each expose ``reparameterize()``; timm's walker calls them all, so any
    open_clip model, a bare tower, or a model with nothing to fuse (ViT-L-14) is accepted.

    Fused weights fold in BatchNorm running statistics, so the result only matches the original model in eval
    mode and cannot be trained further as the same architecture: it is returned in eval mode.

    Args:
        model: An open_clip model or one of its towers.
        inplace: Fuse ``model`` itself instead of a deep copy.

    Returns:
        The fused model, in eval mode.
    """
    return reparameterize_model(model, inplace=inplace).eval()
