"""Create any model by name: the registered MobileCLIP variants, and any other open_clip model (teachers).

Everything goes through open_clip's own factory; these wrappers only make sure the project's configs are
registered, fail loudly on unknown names, and attach each variant's own preprocessing (open_clip would take it
from a pretrained *tag*, so ``pretrained=None`` or a local checkpoint file would fall back to OpenAI mean/std).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import open_clip
import torch
from torch import nn

from clipdr.models.registry import get_variant, list_variants, register


class _NoWeightsNotice(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded" warning where random init is what was asked for."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_random_init() -> Iterator[None]:
    notice = _NoWeightsNotice()
    root = logging.getLogger()  # open_clip logs through the root logger
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


def _check_name(name: str) -> dict[str, Any] | None:
    """The registry's preprocessing for ``name`` (None for other open_clip models); unknown names raise."""
    register()
    if name in list_variants():
        return get_variant(name).preprocess.as_dict()
    if name.startswith(("hf-hub:", "local-dir:")) or name.replace("/", "-") in open_clip.list_models():
        return None
    raise ValueError(
        f"unknown model {name!r}; registered variants: {', '.join(list_variants())} "
        "(or any open_clip model, see open_clip.list_models())"
    )


def create_model(name: str, pretrained: str | None = None, **kwargs: Any) -> nn.Module:
    """Builds a model by name through ``open_clip.create_model``.

    Args:
        name: A registered variant (``clipdr.models.list_variants()``) or any other open_clip model name.
        pretrained: None (random init), an open_clip pretrained tag, or a local checkpoint file (strict load;
            Apple's original MobileCLIP checkpoints are converted by open_clip on load).
        **kwargs: Passed to ``open_clip.create_model`` (``device``, ``precision``, ``output_dict``, ...).

    Returns:
        The model (train mode, as open_clip returns it), with its preprocessing config attached.
    """
    preprocess = _check_name(name)
    if preprocess is not None:
        kwargs["force_preprocess_cfg"] = {**preprocess, **(kwargs.get("force_preprocess_cfg") or {})}
    with _quiet_random_init() if not pretrained else contextlib.nullcontext():
        return open_clip.create_model(name, pretrained=pretrained, **kwargs)


def create_model_and_transforms(
    name: str, pretrained: str | None = None, **kwargs: Any
) -> tuple[nn.Module, Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """``create_model`` plus open_clip's (train, val) image transforms built from the variant's preprocessing.

    Args:
        name: As for ``create_model``.
        pretrained: As for ``create_model``.
        **kwargs: Passed to ``open_clip.create_model_and_transforms`` (e.g. ``aug_cfg``, ``device``).

    Returns:
        ``(model, preprocess_train, preprocess_val)``.
    """
    preprocess = _check_name(name)
    if preprocess is not None:
        for key, arg in (("mean", "image_mean"), ("std", "image_std"), ("interpolation", "image_interpolation")):
            kwargs.setdefault(arg, preprocess[key])
        kwargs.setdefault("image_resize_mode", preprocess["resize_mode"])
    return open_clip.create_model_and_transforms(name, pretrained=pretrained, **kwargs)


def get_tokenizer(name: str, **kwargs: Any) -> Callable[..., torch.Tensor]:
    """open_clip's tokenizer for ``name`` (context length from the model's config)."""
    _check_name(name)
    return open_clip.get_tokenizer(name, **kwargs)


def model_config(name: str) -> dict[str, Any]:
    """A copy of the open_clip JSON config of ``name``."""
    _check_name(name)
    cfg = open_clip.get_model_config(name)
    assert cfg is not None, name
    return cfg


def image_size(name: str) -> int:
    """Native input resolution (square) of ``name``."""
    size = model_config(name)["vision_cfg"]["image_size"]
    return size if isinstance(size, int) else size[0]


@functools.cache
def count_params(name: str, fused: bool = False) -> tuple[int, int]:
    """(image, text) parameter counts of ``name``, counted on the meta device (nothing is allocated).

    Args:
        name: Model name.
        fused: Count the re-parameterised (inference) towers instead of the train-time ones. The papers' image
            counts are the fused ones (MCi's MobileOne branches fused); text towers barely change.

    Returns:
        Parameter counts of the image and the text tower; cached per (name, fused).
    """
    from clipdr.models.reparam import reparameterize

    _check_name(name)
    with torch.device("meta"):
        with _quiet_random_init():
            model = open_clip.create_model(name, device="meta")
        if fused:
            model = reparameterize(model, inplace=True)
    image = sum(p.numel() for p in model.visual.parameters())
    if hasattr(model, "text"):
        text = sum(p.numel() for p in model.text.parameters())
    else:  # open_clip's CLIP keeps the text tower's parts on the model itself
        text = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("visual.") and n != "logit_scale")
    return image, text


def describe_variants(names: list[str] | None = None) -> str:
    """A markdown table of variants: size, towers, resolution, and measured parameter counts beside the paper's."""
    from clipdr.models.registry import get_variant

    lines = [
        "Parameters in millions: fused (inference) / train-time, and the paper's count.",
        "",
        "| variant | size | image tower | text tower | res | image M | paper | text M | paper |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names or list_variants():
        variant = get_variant(name)
        fused, train = count_params(name, fused=True), count_params(name, fused=False)
        paper = variant.paper_params_m or ("-", "-")
        image, text = (f"{f / 1e6:.2f} / {t / 1e6:.2f}" for f, t in zip(fused, train, strict=True))
        lines.append(
            f"| {name} | {variant.size} | {variant.image_tower} | {variant.text_tower} | {image_size(name)} "
            f"| {image} | {paper[0]} | {text} | {paper[1]} |"
        )
    return "\n".join(lines)
