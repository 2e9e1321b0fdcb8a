"""Captioners: registry, fail-fast validation, top-p sampling, caption cutting, and batch-independent determinism.

A random tiny CoCa writes noise; these tests check the mechanics (counts, seeds, cuts, checkpoints), not quality.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipdr.benchmarks.captioner import count_flops
from clipdr.models import captioners
from clipdr.models.captioners import (
    EOT_TEXT,
    SOT_TEXT,
    TINY_COCA,
    Captioner,
    CocaCaptioner,
    autocast_dtype,
    build_captioner,
    build_coca,
    caption_seed,
    captioner_spec,
    clean_caption,
    decode_caption,
    register_captioner,
    sample_top_p,
    validate_captioner,
)
from clipdr.models.coca_decoding import CocaKVCache, key_valid, uncached_next_token_logits
from clipdr.records import CaptionerSpec

MAX_LEN = 12  # short sequences keep the random model's (never-ending) captions cheap


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread mostly waits on the shared cores
    yield
    torch.set_num_threads(saved)


def _spec(**overrides: object) -> CaptionerSpec:
    values: dict[str, object] = {"name": "tiny", "kind": "coca", "model": TINY_COCA, "pretrained": ""}
    values["max_len"] = MAX_LEN
    return CaptionerSpec(**{**values, **overrides})


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(64, 64), (80, 50), (40, 72)]  # the eval transform resizes and crops every one to 64 x 64
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 3][::-1], 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def captioner() -> CocaCaptioner:
    torch.manual_seed(0)
    built = build_captioner(_spec())
    assert isinstance(built, CocaCaptioner)
    return built


# --------------------------------------------------------------------------- registry and validation


def test_unknown_kind_fails_listing_valid_kinds() -> None:
    with pytest.raises(ValueError, match=r"unknown captioner kind 'blip'; valid kinds: coca"):
        build_captioner(_spec(kind="blip"))


def test_register_captioner_rejects_a_second_class_for_a_kind() -> None:
    with pytest.raises(ValueError, match="already registered"):

        @register_captioner("coca")
        class Other(Captioner):
            def generate(
                self, images: Sequence[Image.Image], keys: Sequence[str], num_captions: int
            ) -> list[list[str]]:
                return [[""] * num_captions for _ in images]

    assert captioners.list_captioners() == ["coca"]


def test_captioner_spec_from_a_config_section() -> None:
    @dataclasses.dataclass(frozen=True)
    class Section:  # the shape of the reinforce config's captioner section: spec fields + pipeline settings
        name: str = "tiny"
        kind: str = "coca"
        model: str = TINY_COCA
        pretrained: str = ""
        top_p: float = 0.8
        seed: int = 7
        batch_size: int = 32

    spec = captioner_spec(Section())
    assert spec == CaptionerSpec(name="tiny", kind="coca", model=TINY_COCA, pretrained="", top_p=0.8, seed=7)
    assert captioner_spec(spec) is spec

    @dataclasses.dataclass(frozen=True)
    class Incomplete:
        kind: str = "coca"

    with pytest.raises(ValueError, match="lack required field"):
        captioner_spec(Incomplete())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"generation_type": "beam_search"}, "generation_type 'beam_search' is not supported"),
        ({"model": "coca_nope"}, "unknown captioner model 'coca_nope'; CoCa architectures: .*clipdr-tiny-coca"),
        ({"model": "ViT-B-32"}, "not a CoCa architecture"),
        ({"pretrained": "/no/such/weights.pt"}, "neither an open_clip tag .* nor an existing local file"),
        ({"max_len": 77}, "max_len 77 exceeds 'clipdr-tiny-coca''s context of 76"),
        ({"max_len": 1}, "max_len must leave room"),
    ],
)
def test_validation_fails_fast_without_loading(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_captioner(_spec(**overrides))


def test_validation_accepts_the_datacompdr_captioner() -> None:
    spec = _spec(model="coca_ViT-L-14", pretrained="mscoco_finetuned_laion2b_s13b_b90k", max_len=30)
    assert validate_captioner(spec) is spec  # a known tag: nothing is downloaded by validation


# --------------------------------------------------------------------------- text


def test_clean_caption_cuts_at_end_of_text_start_of_text_and_first_full_stop() -> None:
    assert clean_caption(f"{SOT_TEXT}a red circle . a blue square {EOT_TEXT}!!!") == "a red circle"
    assert clean_caption(f"{SOT_TEXT}a red circle {EOT_TEXT}and more . text") == "a red circle"
    assert clean_caption(f"{SOT_TEXT}junk {SOT_TEXT} two cats  {EOT_TEXT}") == "two cats"
    assert clean_caption(f"{SOT_TEXT}. a dot first{EOT_TEXT}") == ""
    assert clean_caption("no markers at all") == "no markers at all"


def test_decode_caption_on_token_sequences() -> None:
    tokenizer = open_clip.get_tokenizer(TINY_COCA)
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    words = tokenizer.encode("a red circle. a blue square")
    assert decode_caption([sot, *words, eot, 0, 0], tokenizer) == "a red circle"
    no_stop = tokenizer.encode("two small cats on grass")
    assert decode_caption([sot, *no_stop, eot, *words], tokenizer) == "two small cats on grass"
    assert decode_caption([sot, *no_stop], tokenizer) == "two small cats on grass"  # cut at max_len, no end-of-text
    assert decode_caption([sot, eot], tokenizer) == ""


def test_caption_seed_is_stable_and_separates_its_inputs() -> None:
    seeds = {caption_seed(0, "k", 0), caption_seed(1, "k", 0), caption_seed(0, "k2", 0), caption_seed(0, "k", 1)}
    seeds.add(caption_seed(0, "k", 0, attempt=1))
    assert len(seeds) == 5
    assert caption_seed(0, "k", 0) == caption_seed(0, "k", 0) < 2**64
    assert caption_seed(0, "ab", 0) == 10392603232913183361  # fixed forever: changing it changes every dataset


# --------------------------------------------------------------------------- sampling


def test_sample_top_p_keeps_to_the_nucleus_and_its_distribution() -> None:
    probs = torch.tensor([0.05, 0.4, 0.0, 0.3, 0.15, 0.1])
    logits_RV = probs.log().expand(20000, -1)
    uniform_RU = torch.rand(20000, 9, generator=torch.Generator().manual_seed(0))
    tokens = sample_top_p(logits_RV, uniform_RU, top_p=0.8, temperature=1.0)
    # nucleus: 0.4 and 0.3 (mass above 0.15 is 0.7 < 0.8, so 0.15 too); renormalised 0.4/0.85, 0.3/0.85, 0.15/0.85
    frequencies = torch.bincount(tokens, minlength=6).double() / len(tokens)
    expected = torch.tensor([0.0, 0.4, 0.0, 0.3, 0.15, 0.0], dtype=torch.float64) / 0.85
    assert torch.allclose(frequencies, expected, atol=0.015), frequencies


def test_sample_top_p_edge_cases() -> None:
    logits_1V = torch.tensor([[0.0, 3.0, 1.0, -torch.inf]])
    # a dominant token (mass > top_p) is the whole nucleus; a banned (-inf) token is never drawn, even at u ~ 1
    for u in (0.0, 0.5, 0.999999):
        assert sample_top_p(logits_1V, torch.full((1, 3), u), top_p=0.5, temperature=1.0).item() == 1
    # every try rejected (u picks token 2, outside the nucleus {1}) -> the fallback's inverse CDF of the nucleus
    uniforms = torch.tensor([[0.99, 0.99, 0.3]])
    assert sample_top_p(logits_1V, uniforms, top_p=0.5, temperature=1.0).item() == 1
    # top_p = 1 keeps every token with mass; a low temperature sharpens towards the argmax
    assert sample_top_p(logits_1V, torch.tensor([[0.99, 0.5]]), top_p=1.0, temperature=1.0).item() == 2
    assert sample_top_p(logits_1V, torch.tensor([[0.99, 0.5]]), top_p=0.9, temperature=0.05).item() == 1


def test_sample_top_p_rows_are_independent() -> None:
    logits_RV = torch.randn(6, 49408, generator=torch.Generator().manual_seed(1))
    uniform_RU = torch.rand(6, 9, generator=torch.Generator().manual_seed(2))
    together = sample_top_p(logits_RV, uniform_RU, top_p=0.9, temperature=1.0)
    alone = [sample_top_p(logits_RV[r : r + 1], uniform_RU[r : r + 1], 0.9, 1.0).item() for r in range(6)]
    assert together.tolist() == alone


# --------------------------------------------------------------------------- CoCa


def test_build_coca_initialises_the_decoder_projection() -> None:
    torch.manual_seed(0)
    model, preprocess = build_coca(TINY_COCA)
    projection = model.text_decoder.text_projection
    assert projection.shape == (64, 49408)
    assert torch.isfinite(projection).all() and projection.abs().max() < 1.0
    assert 0.1 < projection.std().item() < 0.15  # width ** -0.5 = 0.125
    assert preprocess(_images(1)[0]).shape == (3, 64, 64)
    assert model.visual.preprocess_cfg["mean"] == open_clip.OPENAI_DATASET_MEAN


def test_uncached_next_token_logits_match_coca_forward(captioner: CocaCaptioner) -> None:
    images_BCHW = torch.stack([captioner.preprocess(image) for image in _images(2)])
    tokens_BL = torch.tensor([[49406, 320, 1929, 525], [49406, 5, 6, 0]])
    with torch.no_grad():
        latent_BD, embs_BND = captioner.model._encode_image(images_BCHW)
        expected_BV = captioner.model(
            images_BCHW, tokens_BL, image_latent=latent_BD, image_embs=embs_BND, output_labels=False
        )["logits"][:, -1]
        assert torch.allclose(uncached_next_token_logits(captioner.model, embs_BND, tokens_BL), expected_BV, atol=1e-5)


def test_generate_returns_s_captions_per_image(captioner: CocaCaptioner) -> None:
    captions = captioner.generate(_images(3), ["a", "b", "c"], num_captions=2)
    assert [len(per_image) for per_image in captions] == [2, 2, 2]
    assert all(isinstance(c, str) and c and c == c.strip() and "." not in c for per in captions for c in per)
    assert all(SOT_TEXT not in c and EOT_TEXT not in c for per in captions for c in per)
    assert captioner.generate([], [], num_captions=2) == []
    with pytest.raises(ValueError, match="2 images but 1 keys"):
        captioner.generate(_images(2), ["a"], num_captions=1)
    with pytest.raises(ValueError, match="num_captions must be >= 1"):
        captioner.generate(_images(1), ["a"], num_captions=0)


def test_generate_is_deterministic_and_independent_of_batching(captioner: CocaCaptioner) -> None:
    images = _images(4)
    keys = ["k0", "k1", "k2", "k3"]
    batch = captioner.generate(images, keys, num_captions=3)
    assert captioner.generate(images, keys, num_captions=3) == batch
    # the same image and key alone, at another position of another batch, or with fewer captions
    assert captioner.generate([images[2]], ["k2"], num_captions=3) == [batch[2]]
    reordered = captioner.generate([images[3], *_images(2, seed=9), images[1]], ["k3", "x", "y", "k1"], 3)
    assert reordered[0] == batch[3] and reordered[3] == batch[1]
    assert captioner.generate([images[0]], ["k0"], num_captions=1) == [batch[0][:1]]


def test_different_keys_and_seeds_give_different_captions(
    captioner: CocaCaptioner, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = _images(1)[0]
    captions = captioner.generate([image, image], ["k0", "k1"], num_captions=2)
    assert len({*captions[0], *captions[1]}) == 4  # one image: keys and caption indices alone tell them apart
    monkeypatch.setattr(captioner, "spec", dataclasses.replace(captioner.spec, seed=1))
    reseeded = captioner.generate([image], ["k0"], num_captions=2)[0]
    assert reseeded[0] != captions[0][0] and reseeded[1] != captions[0][1]


def test_empty_captions_are_resampled_with_the_next_attempts_seed(
    captioner: CocaCaptioner, monkeypatch: pytest.MonkeyPatch
) -> None:
    cat = captioner.tokenizer.encode("cat")

    def fake_sample(image_embs_RND: torch.Tensor, seeds: Sequence[int]) -> list[list[int]]:
        # a row is empty unless its seed is odd: which attempt succeeds depends only on (seed, key, index, attempt)
        return [[captioner.sot_id, *(cat if s % 2 else []), captioner.eot_id] for s in seeds]

    monkeypatch.setattr(captioner, "_sample", fake_sample)
    keys = [f"k{i}" for i in range(16)]
    captions = captioner.generate(_images(16), keys, num_captions=1)
    for key, (caption,) in zip(keys, captions, strict=True):
        attempts = [caption_seed(captioner.spec.seed, key, 0, a) % 2 for a in range(captioners.MAX_RESAMPLES + 1)]
        assert caption == ("cat" if any(attempts) else "")
    assert sum(c == ["cat"] for c in captions) >= 8


def test_local_checkpoint_round_trip(captioner: CocaCaptioner, tmp_path: Path) -> None:
    path = tmp_path / "tiny-coca.pt"
    torch.save(captioner.model.state_dict(), path)
    loaded = build_captioner(_spec(pretrained=str(path)))
    assert torch.equal(loaded.model.text_decoder.text_projection, captioner.model.text_decoder.text_projection)
    assert loaded.model.visual.preprocess_cfg == captioner.model.visual.preprocess_cfg
    images, keys = _images(2), ["a", "b"]
    assert loaded.generate(images, keys, num_captions=2) == captioner.generate(images, keys, num_captions=2)


# --------------------------------------------------------------------------- KV cache and precision


def _variant(captioner: CocaCaptioner, dtype: torch.dtype, eot_bias: float = 0.0) -> CocaCaptioner:
    """A copy of ``captioner`` whose model is in ``dtype``; ``eot_bias`` adds to every end-of-text logit.

    The random tiny decoder almost never samples end-of-text (1 of 49,408 tokens), so every row would run to
    max_len together; the bias (through a LayerNorm channel pinned to 1) ends rows at different steps, which
    exercises the cache dropping finished rows.
    """
    variant = copy.copy(captioner)
    variant.model = copy.deepcopy(captioner.model).to(dtype)
    if eot_bias:
        with torch.no_grad():
            decoder = variant.model.text_decoder
            decoder.ln_final.weight[0], decoder.ln_final.bias[0] = 0.0, 1.0
            decoder.text_projection[0] = 0.0
            decoder.text_projection[0, captioner.eot_id] = eot_bias
    return variant


def _image_embs(captioner: CocaCaptioner, num_images: int, num_captions: int) -> torch.Tensor:
    dtype = captioner.model.text_decoder.text_projection.dtype
    images_BCHW = torch.stack([captioner.preprocess(image) for image in _images(num_images)]).to(dtype)
    with torch.no_grad():
        return captioner.model._encode_image(images_BCHW)[1].repeat_interleave(num_captions, dim=0)


def _until_eot(token_rows: list[list[int]], eot_id: int) -> list[list[int]]:
    """Each row up to its end-of-text (a batch pads rows to its longest)."""
    return [tokens[: tokens.index(eot_id) + 1] if eot_id in tokens else tokens for tokens in token_rows]


def test_kv_cache_samples_the_same_tokens_as_the_uncached_loop(captioner: CocaCaptioner) -> None:
    # float64: the two summation orders agree to ~1e-16, so no uniform lands between them. In float32 they agree to
    # ~1e-7 (next test), but the random tiny decoder spreads its nucleus over ~45k tokens of ~2e-5 each, so a
    # CDF shift of 1e-7 moves a sampled token a few times in 100 (coca_decoding's docstring).
    variant = _variant(captioner, torch.float64, eot_bias=10.0)
    image_embs_RND = _image_embs(variant, 4, 3)
    seeds = [caption_seed(0, f"k{r // 3}", r % 3) for r in range(12)]
    with torch.inference_mode():
        cached = variant._sample(image_embs_RND, seeds)
        variant.kv_cache = False
        uncached = variant._sample(image_embs_RND, seeds)
    assert cached == uncached
    lengths = {tokens.index(variant.eot_id) for tokens in cached}
    assert len(lengths) >= 3 and min(lengths) >= captioners.MIN_LEN, lengths  # rows left the cache at many steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kv_cache_logits_follow_open_clips_pad_key_mask(captioner: CocaCaptioner, dtype: torch.dtype) -> None:
    variant = _variant(captioner, dtype)
    pad = variant.model.text.pad_id
    tokens_AL = torch.tensor([[variant.sot_id, 320, pad, 1929, pad, pad, 525], [variant.sot_id, 5, 6, 7, 8, 9, 10]])
    assert not key_valid(variant.model, tokens_AL)[0].all()  # the prefix exercises the mask
    image_embs_AND = _image_embs(variant, 2, 1)
    with torch.inference_mode():
        cache = CocaKVCache(variant.model, image_embs_AND, max_len=tokens_AL.shape[1])
        for length in range(1, tokens_AL.shape[1] + 1):
            cached_AV = cache.step(tokens_AL[:, length - 1])
            expected_AV = uncached_next_token_logits(variant.model, image_embs_AND, tokens_AL[:, :length])
            # a different summation order of dot products of width 64: a few rounding units times the width,
            # relative to the largest logit; a wrong mask changes logits by O(1)
            tolerance = torch.finfo(dtype).eps * 64 * expected_AV.abs().max().item()
            assert torch.allclose(cached_AV, expected_AV, rtol=0, atol=tolerance)
        with pytest.raises(ValueError, match="cannot feed token 8"):
            cache.step(tokens_AL[:, 0])


def test_batched_cached_sampling_is_independent_of_batch_and_neighbours(captioner: CocaCaptioner) -> None:
    # float64: a matrix product over another batch shape may round differently (CPUs pick kernels by shape), by
    # ~1e-16 relative here, far below what could move a top-p draw; in float32 (~1e-7) a draw near a boundary flipped
    # on one of CI's CPUs. The job never needs more: a chunk's rows are fixed by its shard (reinforce/stages.py).
    variant = _variant(captioner, torch.float64, eot_bias=10.0)  # rows finish at different steps
    image_embs_RND = _image_embs(variant, 4, 2)
    seeds = [caption_seed(0, f"k{r // 2}", r % 2) for r in range(8)]
    with torch.inference_mode():
        batch = _until_eot(variant._sample(image_embs_RND, seeds), variant.eot_id)
        alone = [variant._sample(image_embs_RND[r : r + 1], seeds[r : r + 1])[0] for r in range(8)]
        assert _until_eot(alone, variant.eot_id) == batch
        pair = variant._sample(image_embs_RND[[5, 2]], [seeds[5], seeds[2]])
        assert _until_eot(pair, variant.eot_id) == [batch[5], batch[2]]
        assert len({len(tokens) for tokens in batch}) > 1  # rows finished at different steps


def test_precision_picks_bf16_autocast_on_cuda_only_by_default() -> None:
    assert autocast_dtype("auto", "cuda") is torch.bfloat16 and autocast_dtype("bf16", "cpu") is torch.bfloat16
    assert autocast_dtype("auto", "cpu") is None and autocast_dtype("fp32", "cuda") is None
    with pytest.raises(ValueError, match="unknown captioner precision 'fp16'; valid: auto, fp32, bf16"):
        CocaCaptioner(_spec(), precision="fp16")


def test_bf16_generation_caches_in_bf16_and_stays_near_fp32(captioner: CocaCaptioner) -> None:
    image_embs_AND = _image_embs(captioner, 2, 1)
    tokens_A = torch.full((2,), captioner.sot_id)
    with torch.inference_mode():
        reference_AV = CocaKVCache(captioner.model, image_embs_AND, max_len=2).step(tokens_A)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cache = CocaKVCache(captioner.model, image_embs_AND, max_len=2)
            logits_AV = cache.step(tokens_A)
    assert {t.dtype for t in (*cache.keys_AHTE, *cache.values_AHTE, *cache.cross_keys_AHNE)} == {torch.bfloat16}
    # bf16 keeps 8 significant bits (relative rounding 2^-9); a handful of roundings in 4 layers and the projection
    assert torch.allclose(logits_AV.float(), reference_AV, rtol=0, atol=16 * 2**-9 * reference_AV.abs().max().item())
    bf16 = copy.copy(captioner)
    bf16.autocast_dtype = torch.bfloat16
    captions = bf16.generate(_images(2), ["a", "b"], num_captions=2)
    assert [len(c) for c in captions] == [2, 2] and all(c for per in captions for c in per)


def test_cached_generation_does_only_the_cached_arithmetic() -> None:
    flops = count_flops(TINY_COCA, MAX_LEN)  # FlopCounterMode on a meta-device model: shapes only
    assert flops["cached"] == pytest.approx(flops["ideal"], rel=1e-9)
    # the uncached loop re-runs every prefix: sum over L of L token passes instead of one each
    assert flops["uncached"] > 1.5 * flops["cached"]
