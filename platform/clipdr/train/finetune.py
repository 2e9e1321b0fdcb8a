"""Fine-tuning without forgetting: what keeps the start's abilities (``[train.finetune]``).

Plain torch, no Ray: the worker loop (`clipdr.train.loop`), the driver (`clipdr.train.run`) and the forgetting
benchmark (`clipdr.benchmarks.finetune`) call the same functions. Where a run starts (``train.pretrained``) and
WiSE-FT with that start are `clipdr.wiseft`'s, which evaluation and export share.

- **LiT** (`lock_towers`): open_clip's ``lock_image_tower`` / ``lock_text_tower``, the last N groups left unlocked.
- **Layer-wise lr decay** (`layer_depths`, `param_groups`): a parameter at depth d of a tower of top depth T trains
  at ``lr * layer_decay ** (T - d)``. Depth: 0 for the input side (patch/token/position embeddings, stem,
  ``conv1``, ``ln_pre``); ``1 + i`` inside the i-th block (the first numbered module under ``resblocks``,
  ``blocks``, ``stages``, ``layers`` or ``layer``: a transformer layer of a ViT or text tower, a stage of a
  hierarchical trunk such as MCi); T = the number of blocks + 1 for everything after them (final norm, projection,
  head). The image tower is everything under ``visual.``, the text tower the rest; ``logit_scale`` and
  ``logit_bias`` keep the full lr.
- **Weight EMA** (`WeightEma`): ``ema = decay * ema + (1 - decay) * weights`` after every optimiser step.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

_BLOCK = re.compile(r"(?:^|\.)(?:resblocks|blocks|stages|layers|layer)\.(\d+)(?:\.|$)")
_INPUT_SIDE = ("embed", "conv1", "stem", "ln_pre", "patch", "cls_token", "class_embedding", "positional")
_SHARED = ("logit_scale", "logit_bias")


# --------------------------------------------------------------------------- LiT


def lock_towers(model: nn.Module, model_name: str, image: bool, image_unlocked: int, text: bool, text_unlocked: int):
    """Freezes the image and/or text tower with open_clip's own lock methods, the last ``*_unlocked`` groups left
    trainable (for a ViT tower a group is a transformer block, with the embeddings first and the projection last;
    timm trunks use timm's groups). Raises `ValueError` naming the model when it has no such method."""
    for wanted, tower, call in (
        (image, "image", lambda: model.lock_image_tower(unlocked_groups=image_unlocked, freeze_bn_stats=False)),
        (text, "text", lambda: model.lock_text_tower(unlocked_layers=text_unlocked, freeze_layer_norm=True)),
    ):
        if not wanted:
            continue
        try:
            call()
        except (AttributeError, NotImplementedError, AssertionError) as e:
            raise ValueError(
                f"train.finetune.lock_{tower}: model {model_name!r} ({type(model).__name__}) cannot lock its "
                f"{tower} tower through open_clip ({type(e).__name__}: {e})"
            ) from None


# --------------------------------------------------------------------------- layer-wise lr decay


def _tower(name: str) -> str | None:
    if name in _SHARED:
        return None
    return "image" if name.startswith("visual.") else "text"


def layer_depths(model: nn.Module) -> dict[str, tuple[str | None, int, int]]:
    """``{parameter name: (tower, depth, top depth of its tower)}`` for every parameter (module docstring); the
    tower is None for the logit scale and bias."""
    names = [n for n, _ in model.named_parameters()]
    blocks: dict[str, int] = {}
    depth: dict[str, int | None] = {}
    for name in names:
        tower = _tower(name)
        if tower is None:
            continue
        match = _BLOCK.search(name)
        if match:
            depth[name] = 1 + int(match.group(1))
            blocks[tower] = max(blocks.get(tower, 0), int(match.group(1)) + 1)
        else:
            leaf = name.lower()
            depth[name] = 0 if any(part in leaf for part in _INPUT_SIDE) else None  # None: after the blocks
    out: dict[str, tuple[str | None, int, int]] = {}
    for name in names:
        tower = _tower(name)
        if tower is None:
            out[name] = (None, 0, 0)
            continue
        top = blocks.get(tower, 0) + 1
        d = depth[name]
        out[name] = (tower, top if d is None else d, top)
    return out


def lr_scales(model: nn.Module, layer_decay: float) -> dict[str, float]:
    """``{parameter name: lr multiplier}``: ``layer_decay ** (top - depth)`` (`layer_depths`); 1 for the logit scale."""
    return {
        name: 1.0 if tower is None else layer_decay ** (top - depth)
        for name, (tower, depth, top) in layer_depths(model).items()
    }


def param_groups(
    named: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    decays: Mapping[str, bool],
    scales: Mapping[str, float],
) -> list[dict]:
    """AdamW groups by (weight decay or not, lr multiplier): each group's ``lr_scale`` multiplies the schedule's lr."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in named:
        groups.setdefault((decays[name], scales[name]), []).append(param)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
        for (decay, scale), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], -kv[0][1]))
    ]


# --------------------------------------------------------------------------- EMA


class WeightEma:
    """An exponential moving average of a model's state: floating tensors (weights and BN statistics) averaged,
    other buffers (counters) copied.

    Args:
        model: The model whose state is averaged; the average starts at its current state.
        decay: The weight of the previous average at each update.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``ema = decay * ema + (1 - decay) * current`` for every floating tensor of ``model``'s state."""
        for name, value in model.state_dict().items():
            average = self.state[name]
            if average.is_floating_point():
                average.mul_(self.decay).add_(value.detach(), alpha=1.0 - self.decay)
            else:
                average.copy_(value)

    def load(self, state: Mapping[str, Tensor]) -> None:
        """Restores a checkpoint's average (`clipdr.checkpoint.load_ema`) onto this average's devices."""
        if set(state) != set(self.state):
            raise ValueError("the checkpoint's EMA does not hold this model's tensors")
        for name, value in state.items():
            self.state[name].copy_(value)
