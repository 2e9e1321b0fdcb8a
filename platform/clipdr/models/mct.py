"""MCt: the MobileCLIP-S0 text encoder (a transformer with convolutional RepMixer blocks at both ends).

Layout, after Vasu et al. (MobileCLIP, CVPR 2024) and Apple's released ``mobileclip_s0`` checkpoint::

    token embedding + learned positional embedding
    RepMixerBlock     (depthwise (1, k) conv token mixer with MobileOne branches, ConvFFN, layer scale)
    N x pre-norm transformer layer (non-causal self-attention)
    RepMixerBlock
    final LayerNorm -> end-of-text pooling (argmax token id) -> projection

The conv mixer sees both neighbours of every token and no attention mask is used, so MCt is non-causal.
The mixer is a 1-D depthwise convolution over the token axis, written as a ``Conv2d`` over a ``(1, L)`` map so
its weights keep the 4-D shapes of Apple's checkpoint.

Parameter names follow the keys open_clip's ``convert_mobile_clip_state_dict`` produces from Apple's checkpoint
(``text_encoder.*`` -> ``text.*``): open_clip names for embeddings, transformer layers, final norm and projection,
Apple's names inside the RepMixer blocks. So ``open_clip.load_checkpoint`` (and ``pretrained=<file>``) loads
Apple's ``mobileclip_s0.pt`` as well as this project's own checkpoints. docs/models.md has the full key mapping.

Tensor legend: B batch, L tokens, D width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from open_clip.transformer import LayerNorm, LayerNormFp32, ResidualAttentionBlock, lock_text_tower
from torch import nn
from torch.utils.checkpoint import checkpoint

# Value of ``text_cfg["clipdr_text_tower"]`` in an open_clip JSON config that selects MCt (see registry.py).
MCT_TOWER = "mct"


@dataclass(frozen=True)
class MCtCfg:
    """Shape of an MCt text tower (the ``text_cfg`` of an open_clip config, minus ``clipdr_text_tower``).

    Attributes:
        context_length: Tokens per caption (77 for the open_clip tokenizer).
        vocab_size: Token vocabulary (49408 for the open_clip tokenizer).
        width: Model width D.
        heads: Attention heads of each transformer layer.
        layers: Transformer layers between the two RepMixer blocks (4 in MobileCLIP-S0).
        mlp_ratio: Hidden width of the transformer MLPs, as a multiple of D.
        mixer_kernel_size: Kernel of the depthwise token-mixing convolutions (11 in MobileCLIP-S0).
        mixer_mlp_ratio: Hidden width of the RepMixer blocks' ConvFFN, as a multiple of D.
        layer_scale_init: Initial value of the RepMixer layer scales.
    """

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 4
    mlp_ratio: float = 4.0
    mixer_kernel_size: int = 11
    mixer_mlp_ratio: float = 4.0
    layer_scale_init: float = 1e-5

    def __post_init__(self) -> None:
        if self.mixer_kernel_size % 2 != 1:
            raise ValueError(f"mixer_kernel_size must be odd (same-length padding), got {self.mixer_kernel_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

    @classmethod
    def from_text_cfg(cls, text_cfg: dict[str, Any]) -> MCtCfg:
        """Builds the config from an open_clip ``text_cfg`` dict; unknown keys raise ``ValueError``."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in text_cfg.items() if k != "clipdr_text_tower"}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"unknown MCt text_cfg keys {unknown}; valid keys: {sorted(fields)}")
        return cls(**values)


def _conv_bn(dim: int, kernel_size: int) -> nn.Sequential:
    """Depthwise (1, k) conv without bias followed by BatchNorm (Apple's ``conv``/``bn`` names)."""
    branch = nn.Sequential()
    branch.add_module(
        "conv", nn.Conv2d(dim, dim, (1, kernel_size), padding=(0, kernel_size // 2), groups=dim, bias=False)
    )
    branch.add_module("bn", nn.BatchNorm2d(dim))
    return branch


def _fuse_bn(kernel: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Folds an inference-mode BatchNorm into the preceding (bias-free) conv kernel."""
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    return kernel * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


class MobileOneDWConv(nn.Module):
    """Depthwise (1, k) token conv with MobileOne train-time branches: a BatchNorm skip plus conv-BN branches.

    ``num_conv_branches=0`` leaves only the BatchNorm skip (the RepMixer's ``norm``). Apple's MobileOne block would
    also add a 1x1 "scale" branch, but it tests ``kernel_size[0] > 1``, which is false for ``(1, k)`` kernels, so
    the text mixer never has one; neither does this module.
    """

    def __init__(self, dim: int, kernel_size: int, num_conv_branches: int) -> None:
        super().__init__()
        self.dim = dim
        self.kernel_size = kernel_size
        self.rbr_skip = nn.BatchNorm2d(dim)
        self.rbr_conv = nn.ModuleList([_conv_bn(dim, kernel_size) for _ in range(num_conv_branches)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rbr_skip(x)
        for branch in self.rbr_conv:
            out = out + branch(x)
        return out

    def identity_kernel(self) -> torch.Tensor:
        """The (1, k) depthwise kernel that computes the identity."""
        weight = self.rbr_skip.weight
        kernel = torch.zeros(self.dim, 1, 1, self.kernel_size, dtype=weight.dtype, device=weight.device)
        kernel[:, 0, 0, self.kernel_size // 2] = 1.0
        return kernel

    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One depthwise (1, k) kernel and bias equal to the sum of all branches (BatchNorm in eval mode)."""
        kernel, bias = _fuse_bn(self.identity_kernel(), self.rbr_skip)
        for branch in self.rbr_conv:
            branch_kernel, branch_bias = _fuse_bn(branch.conv.weight, branch.bn)
            kernel, bias = kernel + branch_kernel, bias + branch_bias
        return kernel, bias


class TextRepMixer(nn.Module):
    """Re-parameterisable token mixer: ``x + layer_scale * (mixer(x) - norm(x))`` on a (B, D, 1, L) map.

    ``reparameterize()`` fuses it into one depthwise conv (``reparam_conv``), as in FastViT's RepMixer.
    """

    def __init__(self, dim: int, kernel_size: int, layer_scale_init: float) -> None:
        super().__init__()
        self.dim = dim
        self.kernel_size = kernel_size
        self.norm = MobileOneDWConv(dim, kernel_size, num_conv_branches=0)
        self.mixer = MobileOneDWConv(dim, kernel_size, num_conv_branches=1)
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), layer_scale_init))
        self.reparam_conv: nn.Conv2d | None = None

    def forward(self, x_BD1L: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.reparam_conv(x_BD1L)
        return x_BD1L + self.layer_scale * (self.mixer(x_BD1L) - self.norm(x_BD1L))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fuses the branches into one depthwise conv with the same eval-mode output (idempotent).

        Called by timm's ``reparameterize_model``, and so by ``clipdr.models.reparameterize``.
        """
        if self.reparam_conv is not None:
            return
        mixer_kernel, mixer_bias = self.mixer.fused_kernel_bias()
        norm_kernel, norm_bias = self.norm.fused_kernel_bias()
        scale = self.layer_scale.reshape(-1, 1, 1, 1)
        kernel = self.mixer.identity_kernel() + scale * (mixer_kernel - norm_kernel)
        bias = self.layer_scale.reshape(-1) * (mixer_bias - norm_bias)
        conv = nn.Conv2d(
            self.dim,
            self.dim,
            (1, self.kernel_size),
            padding=(0, self.kernel_size // 2),
            groups=self.dim,
            bias=True,
            device=kernel.device,
            dtype=kernel.dtype,
        )
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
        del self.norm, self.mixer, self.layer_scale
        self.reparam_conv = conv


class ConvFFN(nn.Module):
    """Depthwise (1, k) conv + BatchNorm, then a 1x1-conv MLP (the FFN of a RepMixer block)."""

    def __init__(self, dim: int, hidden_dim: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = _conv_bn(dim, kernel_size)
        self.fc1 = nn.Conv2d(dim, hidden_dim, kernel_size=1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden_dim, dim, kernel_size=1)

    def forward(self, x_BD1L: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.conv(x_BD1L))))


class TextRepMixerBlock(nn.Module):
    """MetaFormer block with the RepMixer as token mixer, on (B, L, D) token sequences."""

    def __init__(self, dim: int, kernel_size: int, mlp_ratio: float, layer_scale_init: float) -> None:
        super().__init__()
        self.token_mixer = TextRepMixer(dim, kernel_size, layer_scale_init)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio), kernel_size)
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), layer_scale_init))

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        x_BD1L = x_BLD.transpose(1, 2).unsqueeze(2)
        x_BD1L = self.token_mixer(x_BD1L)
        x_BD1L = x_BD1L + self.layer_scale * self.convffn(x_BD1L)
        return x_BD1L.squeeze(2).transpose(1, 2)


class MCtBlocks(nn.Module):
    """The block stack (``transformer.resblocks``): RepMixer, ``layers`` attention layers, RepMixer."""

    def __init__(self, cfg: MCtCfg, norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.width = cfg.width
        self.layers = cfg.layers
        self.grad_checkpointing = False

        def mixer_block() -> TextRepMixerBlock:
            return TextRepMixerBlock(cfg.width, cfg.mixer_kernel_size, cfg.mixer_mlp_ratio, cfg.layer_scale_init)

        attention_blocks = [
            ResidualAttentionBlock(cfg.width, cfg.heads, cfg.mlp_ratio, act_layer=nn.GELU, norm_layer=norm_layer)
            for _ in range(cfg.layers)
        ]
        self.resblocks = nn.ModuleList([mixer_block(), *attention_blocks, mixer_block()])

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x_BLD = checkpoint(block, x_BLD, use_reentrant=False)
            else:
                x_BLD = block(x_BLD)  # no attention mask: every token sees every other token
        return x_BLD


class MCt(nn.Module):
    """MobileCLIP-S0's text encoder, usable as the ``text`` tower of an open_clip ``CustomTextCLIP``.

    Args:
        cfg: Tower shape.
        output_dim: Joint embedding width (the projection's output).
        cast_dtype: Precision open_clip builds the model for; half precisions get fp32 LayerNorms.
    """

    def __init__(self, cfg: MCtCfg, output_dim: int, cast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.context_length = cfg.context_length
        self.vocab_size = cfg.vocab_size
        self.output_dim = output_dim
        norm_layer = LayerNormFp32 if cast_dtype in (torch.float16, torch.bfloat16) else LayerNorm

        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = MCtBlocks(cfg, norm_layer)
        self.ln_final = norm_layer(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, output_dim))
        self.init_parameters()

    def init_parameters(self) -> None:
        """open_clip's text-transformer initialisation for the shared parts; small truncated normals for convs."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width = self.cfg.width
        attn_std = width**-0.5
        proj_std = width**-0.5 * (2 * max(self.cfg.layers, 1)) ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            if isinstance(block, ResidualAttentionBlock):
                nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            else:
                for module in block.modules():
                    if isinstance(module, nn.Conv2d):
                        nn.init.trunc_normal_(module.weight, std=0.02)
                        if module.bias is not None:
                            nn.init.zeros_(module.bias)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def forward_tokens(self, text_BL: torch.Tensor) -> torch.Tensor:
        """Per-token features after the final norm, (B, L, D), before pooling and projection."""
        seq_len = text_BL.shape[1]
        if seq_len > self.context_length:
            raise ValueError(f"got {seq_len} tokens, MCt was built for context_length {self.context_length}")
        x_BLD = self.token_embedding(text_BL) + self.positional_embedding[:seq_len].to(self.token_embedding.weight)
        x_BLD = self.transformer(x_BLD)
        return self.ln_final(x_BLD)

    def forward(self, text_BL: torch.Tensor) -> torch.Tensor:
        """Text embeddings (B, output_dim), unnormalised, read at each caption's end-of-text token."""
        tokens_BLD = self.forward_tokens(text_BL)
        # End-of-text has the largest id of the open_clip vocabulary, so argmax finds it (as in CLIP).
        pooled_BD = tokens_BLD[torch.arange(tokens_BLD.shape[0], device=tokens_BLD.device), text_BL.argmax(dim=-1)]
        return pooled_BD @ self.text_projection

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def lock(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """Freezes the tower except its last ``unlocked_layers`` groups (open_clip's grouping)."""
        if not freeze_layer_norm:
            raise ValueError("unfreezing LayerNorms on their own is not supported (as in open_clip)")
        lock_text_tower(self, unlocked_layers)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"positional_embedding"}


def build_mct(
    embed_dim: int, text_cfg: dict[str, Any], quick_gelu: bool = False, cast_dtype: torch.dtype | None = None
) -> MCt:
    """Builds MCt from an open_clip ``text_cfg``, with the signature of open_clip's ``_build_text_tower``."""
    if quick_gelu:
        raise ValueError("MCt uses exact GELU as trained by Apple; quick_gelu is not supported")
    return MCt(MCtCfg.from_text_cfg(text_cfg), output_dim=embed_dim, cast_dtype=cast_dtype)


def is_mct_cfg(text_cfg: Any) -> bool:
    """True for an open_clip ``text_cfg`` dict that selects the MCt tower."""
    return isinstance(text_cfg, dict) and text_cfg.get("clipdr_text_tower") == MCT_TOWER


__all__ = ["MCT_TOWER", "MCt", "MCtCfg", "TextRepMixer", "TextRepMixerBlock", "build_mct", "is_mct_cfg"]
