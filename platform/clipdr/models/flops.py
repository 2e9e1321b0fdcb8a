"""Forward FLOPs of teachers and captioners, from their open_clip configs alone (no weights, no compute).

Counted as `torch.utils.flop_counter.FlopCounterMode` counts them, so the two can be compared exactly: 2 FLOPs a
multiply-add of every matrix product, convolution and attention (scores and weighted sum); norms, activations and
softmax are left out (under 1% of a ViT). The formulas follow open_clip 3.3's modules:

- a transformer block over n tokens of width w, MLP width m, attending to k keys:
  ``2n(4w^2 + 2wm) + 4nkw`` (q/k/v and output projections, MLP, attention);
- a ViT image tower (``VisionTransformer``): the patch convolution, blocks over patches + 1 class token, then the
  projection of the pooled token, or CoCa's attentional pooler (queries cross-attending to the tokens) and then it;
- a text tower (``TextTransformer``): blocks over the whole context (the tokenizer pads every text to it), then the
  projection of the pooled token;
- CoCa decoding with a KV cache (`coca_caption_flops`): every token of a caption passes the text tower's blocks and
  the multimodal decoder's self- and cross-attention blocks once, attending to the tokens up to it and to the
  image tokens, and is projected onto the vocabulary; the image tokens' keys and values are projected once an image.

Towers the formulas do not cover (timm image towers such as MobileCLIP's MCi, Hugging Face text towers) are counted
by running FlopCounterMode over the model built on the ``meta`` device: no memory, no weights, under a second.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from clipdr import models


@dataclass(frozen=True)
class ModelFlops:
    """Forward FLOPs of one model's encoders, one input each."""

    image: int  # one image at the model's own input size
    text: int  # one text (padded to the context length)
    image_size: int
    how: str  # "analytic" (from the config) or "meta-device count" (FlopCounterMode over a weightless model)


def block_flops(num_tokens: int, width: int, mlp_width: int, num_keys: int | None = None) -> int:
    """One pre-norm transformer block (self-attention + MLP) over ``num_tokens`` attending to ``num_keys``."""
    keys = num_tokens if num_keys is None else num_keys
    return 2 * num_tokens * (4 * width * width + 2 * width * mlp_width) + 4 * num_tokens * keys * width


def _mlp_width(cfg: dict[str, Any]) -> int:
    return int(cfg["width"] * cfg.get("mlp_ratio", 4.0))


def _size(value: int | list[int] | tuple[int, ...]) -> int:
    return int(value if isinstance(value, int) else value[0])


def _is_plain_vit(vision: dict[str, Any]) -> bool:
    return (
        not vision.get("timm_model_name")
        and isinstance(vision.get("layers"), int)
        and vision.get("attentional_pool", False) in (False, True)
        and vision.get("pool_type", "tok") in ("tok", "avg")
        and not vision.get("patch_dropout")
        and _size(vision["image_size"]) % vision["patch_size"] == 0
    )


def vit_image_flops(vision: dict[str, Any], embed_dim: int) -> int:
    """One image through an open_clip ``VisionTransformer`` described by ``vision`` (a config's ``vision_cfg``)."""
    size, patch, width = _size(vision["image_size"]), vision["patch_size"], vision["width"]
    num_patches = (size // patch) ** 2
    num_tokens = num_patches + 1  # + the class token
    flops = 2 * num_patches * (3 * patch * patch) * width  # patch embedding (a stride-p convolution)
    flops += vision["layers"] * block_flops(num_tokens, width, _mlp_width(vision))
    if vision.get("attentional_pool"):
        # open_clip's CoCa: queries (width embed_dim) cross-attend to the tokens; the first query is the pooled one.
        queries = vision.get("attn_pooler_queries", 256)
        flops += 2 * queries * embed_dim * embed_dim * 2  # query and output projections
        flops += 2 * num_tokens * width * embed_dim * 2  # key and value projections of the tokens
        flops += 4 * queries * num_tokens * embed_dim  # attention
        return flops + 2 * embed_dim * embed_dim  # projection of the pooled token
    return flops + 2 * width * embed_dim  # projection of the pooled token


def text_flops(text: dict[str, Any], embed_dim: int) -> int:
    """One text through an open_clip ``TextTransformer`` (``text_cfg``), padded to its context length."""
    num_tokens = text.get("context_length", 77) + (1 if text.get("embed_cls") else 0)
    flops = text["layers"] * block_flops(num_tokens, text["width"], _mlp_width(text))
    return flops + 2 * text["width"] * embed_dim  # projection of the pooled token


def _is_plain_text(text: dict[str, Any]) -> bool:
    return not text.get("hf_model_name") and text.get("proj_type", "linear") == "linear" and "layers" in text


@functools.lru_cache(maxsize=4)
def meta_model(name: str) -> Any:
    """An open_clip model by name, built on the ``meta`` device: shapes without memory or weights. Built under the
    meta device's context, so nothing is allocated or initialised on the CPU first (seconds for a timm tower)."""
    import open_clip
    import torch

    models.register()
    with torch.device("meta"):
        return open_clip.create_model(name, pretrained=None, device="meta")


def meta_device_flops(name: str) -> ModelFlops:
    """FLOPs of any open_clip model, counted over the model built on the ``meta`` device (nothing is allocated)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = meta_model(name)
    size = _size(models.model_config(name)["vision_cfg"].get("image_size", 224))
    with FlopCounterMode(display=False) as image_count:
        model.encode_image(torch.empty(1, 3, size, size, device="meta"))
    with FlopCounterMode(display=False) as text_count:
        model.encode_text(torch.zeros(1, model.context_length, dtype=torch.long, device="meta"))
    return ModelFlops(image_count.get_total_flops(), text_count.get_total_flops(), size, "meta-device count")


def clip_flops(name: str) -> ModelFlops:
    """Image and text forward FLOPs of an open_clip model by name: analytic when its towers are a plain ViT and
    text transformer, else counted on the meta device."""
    cfg = models.model_config(name)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    if not (_is_plain_vit(vision) and _is_plain_text(text)):
        return meta_device_flops(name)
    embed_dim = cfg["embed_dim"]
    return ModelFlops(
        vit_image_flops(vision, embed_dim), text_flops(text, embed_dim), _size(vision["image_size"]), "analytic"
    )


def decoder_step_flops(cfg: dict[str, Any], position: int) -> int:
    """One new token at ``position`` (1-based: the tokens before it and it are cached) through a CoCa's text tower
    and multimodal decoder, and its projection onto the vocabulary; the image tokens' keys and values excluded."""
    text, multimodal = cfg["text_cfg"], cfg["multimodal_cfg"]
    num_image_tokens = cfg["vision_cfg"].get("attn_pooler_queries", 256) - 1  # the first query is the pooled one
    flops = text["layers"] * block_flops(1, text["width"], _mlp_width(text), num_keys=position)
    width, mlp_width = multimodal["width"], _mlp_width(multimodal)
    cross = 2 * (2 * width * width + 2 * width * mlp_width) + 4 * num_image_tokens * width  # q, out, MLP, attention
    flops += multimodal["layers"] * (block_flops(1, width, mlp_width, num_keys=position) + cross)
    return flops + 2 * width * multimodal.get("vocab_size", 49408)


def coca_caption_flops(name: str, max_len: int) -> int:
    """One caption of ``max_len`` tokens from a CoCa with a KV cache: every token decoded once, attending to the
    cache. The image's share, common to all its captions, is apart: `coca_image_flops`, `coca_image_kv_flops`."""
    cfg = models.model_config(name)
    return sum(decoder_step_flops(cfg, position) for position in range(1, max_len + 1))


def coca_image_kv_flops(name: str) -> int:
    """Projecting a CoCa's image tokens to every cross-attention layer's keys and values, once an image."""
    cfg = models.model_config(name)
    multimodal = cfg["multimodal_cfg"]
    num_image_tokens = cfg["vision_cfg"].get("attn_pooler_queries", 256) - 1
    return multimodal["layers"] * 2 * num_image_tokens * cfg["embed_dim"] * multimodal["width"] * 2


def coca_image_flops(name: str) -> int:
    """One image through a CoCa's image tower (its attentional pooler included)."""
    cfg = models.model_config(name)
    if not _is_plain_vit(cfg["vision_cfg"]):
        return meta_device_flops(name).image
    return vit_image_flops(cfg["vision_cfg"], cfg["embed_dim"])
