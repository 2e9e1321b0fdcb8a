"""KV-cached next-token logits of an open_clip CoCa: one new token a step instead of the whole prefix.

A CoCa caption step runs the causal text tower (``model.text``, a ``TextTransformer``), then the multimodal decoder
(``model.text_decoder``: a causal self-attention block and a cross-attention block to the image tokens a layer),
then projects the last position onto the vocabulary. Recomputing all of it over the whole prefix for every token
(what ``CoCa.generate`` and clipdr's reference loop do) costs O(L^2) token passes a caption and re-projects the
image tokens into every cross-attention layer's keys and values at every step: about 400 GFLOP for a 30-token
caption of ``coca_ViT-L-14`` against about 23 GFLOP of necessary arithmetic (docs/reinforce.md). `CocaKVCache`
keeps, for every decoding row, the keys and values of every self-attention layer (text tower and decoder) for the
tokens so far, and the cross-attention keys and values of the image tokens, projected once; a step then runs the
new token alone through both towers.

It computes what open_clip's modules compute, with their own weights (no open_clip file is patched): the same
LayerNorms, MLPs and LayerScales (called as modules), ``nn.MultiheadAttention``'s packed in-projection and
out-projection, and the same masks. The text tower's mask is not only causal: open_clip masks *keys* of padding
tokens (``pad_id`` 0, which is also the BPE id of "!", a token a caption can contain), and with a CoCa's appended
class token in legacy mode (``correct_cls_mask=False``, every released CoCa) the pad mask is shifted by one
position: key j is masked when token j - 1 is ``pad_id``. `key_valid` reproduces that rule (tests compare logits
with the uncached forward on prefixes containing ``pad_id``).

Only the summation order differs from the uncached forward (one row's projections are computed in a matrix of A
rows instead of A * L, attention by ``scaled_dot_product_attention`` instead of ``nn.MultiheadAttention``'s
kernel), so logits agree to float rounding (a few units of the dtype's epsilon times the largest logit). A sampled
token can still differ: inverse-CDF sampling moves to a neighbouring token when the CDF shift lands the uniform
across a boundary, about (nucleus size) x (CDF rounding) a token. In float64 that never happens in practice, and
the tests check identical tokens there. In float32 the CDF rounding is ~1e-7: negligible for a trained captioner
(a nucleus of tens of tokens), but the random tiny CoCa's nucleus spans ~45k near-equal tokens, and a few tokens in
100 differ (``clipdr bench captioner`` reports the fraction). Each path on its own is deterministic and
independent of batching.

Shape suffixes: A rows held (decoding rows still active), H heads, E head width, T most tokens (``max_len``),
N image tokens, W width, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.coca_model import CoCa
from open_clip.transformer import ResidualAttentionBlock


def key_valid(model: CoCa, tokens_AL: torch.Tensor) -> torch.Tensor:
    """Which text-tower positions may be attended to, as open_clip's ``TextTransformer._build_additive_mask`` says.

    Args:
        model: The CoCa.
        tokens_AL: Token ids so far.

    Returns:
        Bool, shape (A, L): False where every query must ignore the key (on top of the causal mask).
    """
    text = model.text
    not_pad_AL = tokens_AL != text.pad_id
    if text.cls_emb is not None and not text.correct_cls_mask:  # legacy CoCa: validity shifted one position right
        return torch.cat([torch.ones_like(not_pad_AL[:, :1]), not_pad_AL[:, :-1]], dim=1)
    if text.cls_emb is not None or text.use_pad_mask:
        return not_pad_AL
    return torch.ones_like(not_pad_AL)


def uncached_next_token_logits(model: CoCa, image_embs_AND: torch.Tensor, tokens_AL: torch.Tensor) -> torch.Tensor:
    """Logits of the next token, recomputed over the whole prefix: the reference the cache is tested against.

    ``CoCa.forward(...)["logits"][:, -1]``, projecting only the last position: ``CoCa.forward`` projects every
    position onto the 49,408-token vocabulary, the bulk of a small decoder's step; this runs the same text tower and
    decoder blocks and projects one position (tests check parity).
    """
    _, token_embs_ALW = model.text(tokens_AL)
    decoder = model.text_decoder
    length = token_embs_ALW.shape[1]
    x_ALW = token_embs_ALW
    for self_attn, cross_attn in zip(decoder.resblocks, decoder.cross_attn, strict=True):
        x_ALW = self_attn(x_ALW, attn_mask=decoder.attn_mask[:length, :length])
        x_ALW = cross_attn(x_ALW, k_x=image_embs_AND, v_x=image_embs_AND)
    return decoder.ln_final(x_ALW[:, -1]) @ decoder.text_projection


def _heads(x_AXW: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(A, X, W) -> (A, H, X, E)."""
    num_rows, length, width = x_AXW.shape
    return x_AXW.view(num_rows, length, num_heads, width // num_heads).transpose(1, 2)


def _merge_heads(x_AHXE: torch.Tensor) -> torch.Tensor:
    """(A, H, X, E) -> (A, X, W)."""
    num_rows, num_heads, length, head_width = x_AHXE.shape
    return x_AHXE.transpose(1, 2).reshape(num_rows, length, num_heads * head_width)


def _check_block(block: torch.nn.Module) -> ResidualAttentionBlock:
    if not isinstance(block, ResidualAttentionBlock) or not block.attn.batch_first:
        raise ValueError(f"the KV cache supports open_clip's batch-first ResidualAttentionBlock, got {block!r}")
    return block


class CocaKVCache:
    """Keys and values of a batch of decoding rows; `step` feeds every row its next token and returns logits.

    All rows advance together (one position a step); `keep` drops finished rows. The cache tensors take the dtype
    the projections produce: the model's, or bf16 inside a bf16 autocast region.

    Args:
        model: The CoCa (eval mode; batch-first open_clip blocks).
        image_embs_AND: Each row's image tokens (``model._encode_image(...)[1]``).
        max_len: Most tokens a row will hold (sizes the self-attention caches).
    """

    def __init__(self, model: CoCa, image_embs_AND: torch.Tensor, max_len: int) -> None:
        self.model = model
        self.text_blocks = [_check_block(b) for b in model.text.transformer.resblocks]
        self.self_blocks = [_check_block(b) for b in model.text_decoder.resblocks]
        self.cross_blocks = [_check_block(b) for b in model.text_decoder.cross_attn]
        self.max_len = max_len
        self.length = 0  # tokens fed so far
        self.tokens_AT = torch.zeros(image_embs_AND.shape[0], max_len, dtype=torch.long, device=image_embs_AND.device)
        # self-attention keys/values of the text tower's layers then the decoder's, allocated at the first step
        self.keys_AHTE: list[torch.Tensor] = []
        self.values_AHTE: list[torch.Tensor] = []
        self.cross_keys_AHNE: list[torch.Tensor] = []
        self.cross_values_AHNE: list[torch.Tensor] = []
        for block in self.cross_blocks:
            attn, width = block.attn, block.attn.embed_dim
            kv_x_AND = block.ln_1_kv(image_embs_AND)
            weight, bias = attn.in_proj_weight, attn.in_proj_bias
            key_AND = F.linear(kv_x_AND, weight[width : 2 * width], bias[width : 2 * width])
            value_AND = F.linear(kv_x_AND, weight[2 * width :], bias[2 * width :])
            self.cross_keys_AHNE.append(_heads(key_AND, attn.num_heads))
            self.cross_values_AHNE.append(_heads(value_AND, attn.num_heads))

    @property
    def num_rows(self) -> int:
        return self.tokens_AT.shape[0]

    def keep(self, rows_A: torch.Tensor) -> None:
        """Keeps only the rows at positions ``rows_A`` (an index tensor into the rows held), in that order."""
        for caches in (self.keys_AHTE, self.values_AHTE, self.cross_keys_AHNE, self.cross_values_AHNE):
            caches[:] = [cache.index_select(0, rows_A) for cache in caches]
        self.tokens_AT = self.tokens_AT.index_select(0, rows_A)

    def step(self, token_A: torch.Tensor) -> torch.Tensor:
        """Feeds each row its token at position `length`; returns the logits of the token after it, shape (A, V)."""
        position = self.length
        if position >= self.max_len:
            raise ValueError(f"the cache holds {self.max_len} tokens; cannot feed token {position + 1}")
        self.tokens_AT[:, position] = token_A
        self.length = position + 1
        text = self.model.text
        cast_dtype = text.transformer.get_cast_dtype()
        x_A1W = (text.token_embedding(token_A).to(cast_dtype) + text.positional_embedding[position].to(cast_dtype))[
            :, None
        ]
        valid_A11L = key_valid(self.model, self.tokens_AT[:, : self.length])[:, None, None, :]
        for layer, block in enumerate(self.text_blocks):
            x_A1W = self._self_attention_block(block, layer, x_A1W, valid_A11L)
        if text.cls_emb is None:  # open_clip normalises the token outputs only without a class token
            x_A1W = text.ln_final(x_A1W)
        decoder = self.model.text_decoder
        for i, (self_block, cross_block) in enumerate(zip(self.self_blocks, self.cross_blocks, strict=True)):
            x_A1W = self._self_attention_block(self_block, len(self.text_blocks) + i, x_A1W, None)
            x_A1W = self._cross_attention_block(cross_block, i, x_A1W)
        return decoder.ln_final(x_A1W[:, 0]) @ decoder.text_projection

    def _self_attention_block(
        self, block: ResidualAttentionBlock, layer: int, x_A1W: torch.Tensor, valid_A11L: torch.Tensor | None
    ) -> torch.Tensor:
        """``block(x, attn_mask=causal)`` for the newest position, its key and value appended to the cache."""
        attn = block.attn
        query_A1W, key_A1W, value_A1W = F.linear(block.ln_1(x_A1W), attn.in_proj_weight, attn.in_proj_bias).chunk(
            3, dim=-1
        )
        key_AH1E, value_AH1E = _heads(key_A1W, attn.num_heads), _heads(value_A1W, attn.num_heads)
        if layer == len(self.keys_AHTE):  # first step: allocate in the dtype the projection produced
            shape = (*key_AH1E.shape[:2], self.max_len, key_AH1E.shape[3])
            self.keys_AHTE.append(key_AH1E.new_empty(shape))
            self.values_AHTE.append(value_AH1E.new_empty(shape))
        position = self.length - 1
        self.keys_AHTE[layer][:, :, position] = key_AH1E[:, :, 0]
        self.values_AHTE[layer][:, :, position] = value_AH1E[:, :, 0]
        out_AH1E = F.scaled_dot_product_attention(
            _heads(query_A1W, attn.num_heads),
            self.keys_AHTE[layer][:, :, : self.length],
            self.values_AHTE[layer][:, :, : self.length],
            attn_mask=valid_A11L,
        )
        x_A1W = x_A1W + block.ls_1(attn.out_proj(_merge_heads(out_AH1E)))
        return x_A1W + block.ls_2(block.mlp(block.ln_2(x_A1W)))

    def _cross_attention_block(self, block: ResidualAttentionBlock, layer: int, x_A1W: torch.Tensor) -> torch.Tensor:
        """``block(x, k_x=image_embs, v_x=image_embs)`` with the image tokens' keys and values from the cache."""
        attn, width = block.attn, block.attn.embed_dim
        query_A1W = F.linear(block.ln_1(x_A1W), attn.in_proj_weight[:width], attn.in_proj_bias[:width])
        out_AH1E = F.scaled_dot_product_attention(
            _heads(query_A1W, attn.num_heads), self.cross_keys_AHNE[layer], self.cross_values_AHNE[layer]
        )
        x_A1W = x_A1W + block.ls_1(attn.out_proj(_merge_heads(out_AH1E)))
        return x_A1W + block.ls_2(block.mlp(block.ln_2(x_A1W)))
