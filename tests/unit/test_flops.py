"""Analytic FLOP counts (`clipdr.models.flops`) equal FlopCounterMode's count of the same open_clip modules.

The models are built on the ``meta`` device: nothing is allocated or computed, so each count takes milliseconds.
"""

import open_clip
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from clipdr import models
from clipdr.models import flops


def counted(fn, *args) -> int:
    with FlopCounterMode(display=False) as count:
        fn(*args)
    return count.get_total_flops()


@pytest.mark.parametrize("name", ["clipdr-tiny-vit", "clipdr-demo-vit"])
def test_vit_and_text_towers_match_the_flop_counter(name):
    model = open_clip.create_model(name, pretrained=None, device="meta")
    analytic = flops.clip_flops(name)
    size = analytic.image_size
    assert analytic.how == "analytic"
    assert analytic.image == counted(model.encode_image, torch.empty(1, 3, size, size, device="meta"))
    tokens = torch.zeros(1, model.context_length, dtype=torch.long, device="meta")
    assert analytic.text == counted(model.encode_text, tokens)


def test_a_timm_tower_is_counted_on_the_meta_device():
    assert flops.clip_flops("clipdr-tiny-mci").how == "meta-device count"


def test_coca_image_tower_and_cached_decoding_match_the_flop_counter():
    """The image tower (attentional pooler included) exactly; the cached caption against the uncached forward over
    the same tokens, which differs only in attention: each of T tokens attends to all T (4 T^2 w a layer) instead of
    to the i tokens up to it (sum 4 i w = 2 T (T + 1) w)."""
    name, num_tokens = "clipdr-tiny-coca", 9
    model = open_clip.create_model(name, pretrained=None, device="meta")
    cfg = models.model_config(name)
    size = cfg["vision_cfg"]["image_size"]
    assert flops.coca_image_flops(name) == counted(model.encode_image, torch.empty(1, 3, size, size, device="meta"))

    text, decoder = model.text, model.text_decoder
    num_image_tokens = cfg["vision_cfg"]["attn_pooler_queries"] - 1

    def uncached(text_embs, image_embs):
        x = text.transformer(text_embs, attn_mask=text.attn_mask[:num_tokens, :num_tokens])
        return decoder(image_embs, x)

    text_width, decoder_width = cfg["text_cfg"]["width"], cfg["multimodal_cfg"]["width"]
    full = counted(
        uncached,
        torch.empty(1, num_tokens, text_width, device="meta"),
        torch.empty(1, num_image_tokens, cfg["embed_dim"], device="meta"),
    )
    attention_widths = cfg["text_cfg"]["layers"] * text_width + cfg["multimodal_cfg"]["layers"] * decoder_width
    cached = flops.coca_caption_flops(name, num_tokens) + flops.coca_image_kv_flops(name)
    assert full - cached == attention_widths * 2 * num_tokens * (num_tokens - 1)


def test_vit_l_14_as_measured():
    """STACK_NOTES.md measured ViT-L-14's image forward at ~162 GFLOP with FlopCounterMode."""
    assert flops.clip_flops("ViT-L-14").image == pytest.approx(162.0e9, rel=0.001)
