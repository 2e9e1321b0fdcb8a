"""Tiny MCi image towers, registered with timm so open_clip JSON configs can name them.

open_clip 3.3's vision config does not forward extra kwargs to timm, so a small MCi has to be a timm model of its
own. ``clipdr_fastvit_mci_tiny`` keeps every block type of MCi0 (MobileOne stem, RepMixer stages, SE downsampling,
a RepCPE + attention last stage, the MobileOne ``conv_exp`` head) at depths 1-1-1-1 and widths 16..128, so CPU
tests exercise the real layers and their re-parameterisation in milliseconds.
"""

from __future__ import annotations

from functools import partial

from timm.models import generate_default_cfgs, register_model
from timm.models.fastvit import FastVit, RepConditionalPosEnc, _cfg, _create_fastvit

TINY_MCI = "clipdr_fastvit_mci_tiny"
# Every timm model this module registers: a config naming one builds only after ``import clipdr.models``.
TIMM_MODELS = (TINY_MCI,)

# timm's register_model reads this module-level name; without it timm warns on every creation. No weights (url "").
default_cfgs = generate_default_cfgs(
    {TINY_MCI: _cfg(input_size=(3, 64, 64), pool_size=(2, 2), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))}
)


@register_model
def clipdr_fastvit_mci_tiny(pretrained: bool = False, **kwargs) -> FastVit:
    """MCi0-shaped debug tower: depths 1-1-1-1, widths 16-32-64-128 (no pretrained weights exist)."""
    if pretrained:
        raise ValueError(f"{TINY_MCI} is a debug architecture; it has no pretrained weights")
    model_args = dict(
        layers=(1, 1, 1, 1),
        embed_dims=(16, 32, 64, 128),
        mlp_ratios=(3, 3, 3, 3),
        se_downsamples=(False, False, True, True),
        pos_embs=(None, None, None, partial(RepConditionalPosEnc, spatial_shape=(7, 7))),
        token_mixers=("repmixer", "repmixer", "repmixer", "attention"),
        lkc_use_act=True,
    )
    return _create_fastvit(TINY_MCI, pretrained=False, **dict(model_args, **kwargs))
