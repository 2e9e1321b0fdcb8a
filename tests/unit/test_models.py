"""MobileCLIP architectures: registry, parameter counts, MCt, re-parameterisation, checkpoints, one training step.

The default run builds only the tiny variants and MobileCLIP-S0; forward and parity tests of the other paper
variants are marked slow and run with ``CLIPDR_SLOW=1 pytest -m slow tests/unit/test_models.py``.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import open_clip
import open_clip.model
import pytest
import torch
from open_clip.convert import convert_mobile_clip_state_dict
from open_clip.transform import PreprocessCfg
from timm.models.fastvit import MobileOneBlock, ReparamLargeKernelConv, RepConditionalPosEnc, RepMixer

from clipdr import models
from clipdr.benchmarks import latency
from clipdr.cli import main as cli_main
from clipdr.models.captioners import init_coca_decoder
from clipdr.models.mct import MCt, TextRepMixer, TextRepMixerBlock
from clipdr.models.registry import CONFIG_DIR

slow = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("CLIPDR_SLOW"), reason="slow: set CLIPDR_SLOW=1 to build the big variants"),
]
TINY = models.list_variants("debug")  # every tiny and demo twin: students, teachers, captioners
PAPER = models.list_variants(size="paper")
DEFAULT_RUN = {*TINY, "MobileCLIP-S0"}  # built in the default (CI) run; the rest are slow
EVERY_VARIANT = [pytest.param(n, marks=[] if n in DEFAULT_RUN else slow) for n in models.list_variants()]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Two OpenMP threads on a 2-core machine shared with other jobs run 10-40x slower than one.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _inputs(name: str, batch_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    size = models.image_size(name)
    images = torch.rand(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    captions = ["a photo of a cat on a red sofa", "two dogs running on the beach", "a bowl of soup"]
    return images, models.get_tokenizer(name)(captions[:batch_size])


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.create_model(name)
    if models.get_variant(name).kind == "coca":
        init_coca_decoder(model)  # open_clip leaves its projection uninitialised (captioners.init_coca_decoder)
    return model.eval()


def _features(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(image features, text features, logit scale) as a CLIP's forward returns them; CoCa's forward is a dict."""
    out = model(images, tokens)
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"]
    return out[:3]


@pytest.fixture(scope="module")
def s0() -> torch.nn.Module:
    return _build("MobileCLIP-S0")


def _get(name: str, s0: torch.nn.Module | None = None) -> torch.nn.Module:
    return s0 if name == "MobileCLIP-S0" and s0 is not None else _build(name)


# ----------------------------------------------------------------------------------------------- registry


def test_every_paper_variant_is_registered_with_open_clip():
    expected = {"MobileCLIP-S0", "MobileCLIP-S1", "MobileCLIP-S2", "MobileCLIP-B"}
    expected |= {f"MobileCLIP2-{s}" for s in ("S0", "S2", "B", "S3", "S4", "L-14")}
    assert set(PAPER) == expected
    assert set(models.list_variants()) <= set(open_clip.list_models())


def test_every_shipped_config_is_a_listed_variant():
    shipped = {path.stem for path in CONFIG_DIR.glob("*.json")}
    assert {v.name for v in models.VARIANTS if v.config_source == "clipdr"} == shipped
    assert shipped - {"MobileCLIP-S0"} == set(TINY)
    assert set(models.list_variants(size="tiny")) | set(models.list_variants(size="demo")) == set(TINY)
    assert models.list_variants(kind="coca") == ["clipdr-tiny-coca", "clipdr-demo-coca"]
    assert {"clipdr-tiny-vit", "clipdr-demo-vit", "clipdr-demo-mci"} <= set(models.list_variants("debug"))


def test_unknown_names_fail_loudly_listing_valid_ones():
    with pytest.raises(ValueError, match=r"MobileCLIP-S0.*MobileCLIP2-L-14"):
        models.get_variant("MobileCLIP-S9")
    with pytest.raises(ValueError, match="MobileCLIP-S0"):
        models.create_model("MobileCLIP-S9")
    with pytest.raises(ValueError, match="debug"):
        models.list_variants("tiny")
    with pytest.raises(ValueError, match="paper, tiny, demo"):
        models.list_variants(size="small")
    with pytest.raises(ValueError, match="clip, coca"):
        models.list_variants(kind="vit")


def test_register_is_idempotent():
    paths = list(open_clip.factory._MODEL_CONFIG_PATHS)
    hook = open_clip.model._build_text_tower
    models.register()
    models.register()
    assert paths == open_clip.factory._MODEL_CONFIG_PATHS
    assert open_clip.model._build_text_tower is hook and hook.clipdr_mct_hook


def test_needs_clipdr_names_the_architectures_open_clip_cannot_build_alone():
    # open_clip's own configs on stock timm towers; clipdr-tiny-vit is open_clip parts in a clipdr config.
    assert not any(
        models.needs_clipdr(models.model_config(n)) for n in ("MobileCLIP2-S0", "MobileCLIP-B", "clipdr-tiny-vit")
    )
    # clipdr's timm tower (tiny MCi), and the MCt text tower.
    assert all(
        models.needs_clipdr(models.model_config(n)) for n in ("clipdr-demo-mci", "clipdr-tiny-mct", "MobileCLIP-S0")
    )
    assert models.is_clipdr_config("clipdr-tiny-vit") and not models.is_clipdr_config("MobileCLIP2-S0")


@pytest.mark.parametrize("fused", [False, True], ids=["train-time", "fused"])
@pytest.mark.parametrize("name", PAPER)
def test_param_counts_match_the_paper_within_1_percent(name, fused):
    image, text = models.count_params(name, fused=fused)
    paper_image, paper_text = models.get_variant(name).paper_params_m
    assert image / 1e6 == pytest.approx(paper_image, rel=0.01)
    assert text / 1e6 == pytest.approx(paper_text, rel=0.01)


@pytest.mark.parametrize("name", PAPER)
def test_preprocessing_matches_open_clip_pretrained_configs(name):
    # open_clip keeps preprocessing with pretrained tags; the registry must agree with them where a tag exists.
    preprocess = models.get_variant(name).preprocess
    for tag in open_clip.list_pretrained_tags_by_model(name):
        tag_cfg = open_clip.get_pretrained_cfg(name, tag)
        assert tuple(tag_cfg["mean"]) == pytest.approx(preprocess.mean)
        assert tuple(tag_cfg["std"]) == pytest.approx(preprocess.std)
        assert (tag_cfg["interpolation"], tag_cfg["resize_mode"]) == (preprocess.interpolation, preprocess.resize_mode)


OPEN_CLIP_BUILT_TWINS = ["clipdr-tiny-vit", "clipdr-demo-vit", "clipdr-tiny-coca", "clipdr-demo-coca"]


@pytest.mark.parametrize("name", OPEN_CLIP_BUILT_TWINS)
def test_open_clip_built_twins_keep_open_clips_default_preprocessing(name):
    # The ViT and CoCa twins were trained, and their teacher specs recorded, with what open_clip attaches to a model
    # without a pretrained tag; registering them must not change it.
    defaults = dataclasses.asdict(PreprocessCfg())
    expected = {key: defaults[key] for key in ("mean", "std", "interpolation", "resize_mode")}
    assert models.get_variant(name).preprocess.as_dict() == expected
    assert models.Preprocess.from_open_clip({}) == models.get_variant(name).preprocess


def test_models_stage_lists_every_variant_with_paper_counts(capsys):
    assert cli_main(["models"]) == 0
    out = capsys.readouterr().out
    for name in models.list_variants():
        assert f"| {name} |" in out
    assert "| 11.36 / 11.41 | 11.4 | 42.44 / 42.44 | 42.4 |" in out  # MobileCLIP-S0


# ----------------------------------------------------------------------------------------------- MCt


def test_open_clip_factory_builds_mct_for_s0_configs():
    model = open_clip.create_model("clipdr-tiny-mct")  # open_clip's own factory, no clipdr wrapper
    assert isinstance(model.text, MCt)
    assert not isinstance(open_clip.create_model("clipdr-tiny-mci").text, MCt)


def test_s0_text_tower_is_mct_with_conv_mixers(s0):
    blocks = s0.text.transformer.resblocks
    assert isinstance(blocks[0], TextRepMixerBlock) and isinstance(blocks[-1], TextRepMixerBlock)
    assert len(blocks) == 6  # RepMixer, 4 transformer layers, RepMixer
    assert all(isinstance(b, open_clip.transformer.ResidualAttentionBlock) for b in blocks[1:-1])
    conv = blocks[0].token_mixer.mixer.rbr_conv[0].conv
    assert (conv.kernel_size, conv.groups, conv.in_channels) == ((1, 11), 512, 512)  # depthwise, kernel 11
    assert s0.text.text_projection.shape == (512, 512) and s0.text.context_length == 77
    assert s0.visual.preprocess_cfg["mean"] == (0.0, 0.0, 0.0)  # MobileCLIP: no normalisation, even unpretrained


@torch.no_grad()
def test_mct_is_non_causal():
    text_tower = _build("clipdr-tiny-mct").text
    tokens = models.get_tokenizer("clipdr-tiny-mct")(["a photo of a cat"])
    edited = tokens.clone()
    edited[0, 3] = 1000  # a token after position 1, before end-of-text
    before, after = text_tower.forward_tokens(tokens), text_tower.forward_tokens(edited)
    assert not torch.allclose(before[0, 1], after[0, 1])  # an earlier token sees a later one
    padded = tokens.clone()
    padded[0, -1] = 1000  # after end-of-text: a causal encoder pooled at end-of-text would not notice
    assert not torch.allclose(text_tower(tokens), text_tower(padded))


def _clipdr_to_apple_text_key(key: str) -> str:
    """Inverse of open_clip's Apple -> open_clip text-key conversion (the mapping in docs/models.md)."""
    renames = [
        ("transformer.resblocks.", "transformer."),
        ("ln_1.", "pre_norm_mha.0."),
        ("attn.in_proj_weight", "pre_norm_mha.1.qkv_proj.weight"),
        ("attn.in_proj_bias", "pre_norm_mha.1.qkv_proj.bias"),
        ("attn.out_proj.", "pre_norm_mha.1.out_proj."),
        ("ln_2.", "pre_norm_ffn.0."),
        ("mlp.c_fc.", "pre_norm_ffn.1."),
        ("mlp.c_proj.", "pre_norm_ffn.4."),
        ("ln_final.", "final_layer_norm."),
        ("token_embedding.", "embedding_layer."),
        ("text_projection", "projection_layer"),
        ("positional_embedding", "positional_embedding.pos_embed.pos_embed"),
    ]
    for ours, apple in renames:
        key = key.replace(ours, apple)
    return "text_encoder." + key


@torch.no_grad()
def test_apple_s0_text_checkpoint_layout_loads_through_open_clip_conversion():
    model = _build("clipdr-tiny-mct")
    apple = {}
    for key, value in model.text.state_dict().items():
        apple_key = _clipdr_to_apple_text_key(key)
        apple[apple_key] = value.reshape(1, 1, *value.shape) if "pos_embed" in apple_key else value
    # The RepMixer block of Apple's mobileclip/modules/text/repmixer.py (S0 checkpoint keys, read from its code).
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    block0 = {"transformer.0.layer_scale", "transformer.0.token_mixer.layer_scale"}
    block0 |= {f"transformer.0.token_mixer.{b}.rbr_skip.{p}" for b in ("norm", "mixer") for p in bn}
    block0 |= {"transformer.0.token_mixer.mixer.rbr_conv.0.conv.weight", "transformer.0.convffn.conv.conv.weight"}
    block0 |= {f"transformer.0.token_mixer.mixer.rbr_conv.0.bn.{p}" for p in bn}
    block0 |= {f"transformer.0.convffn.conv.bn.{p}" for p in bn}
    block0 |= {f"transformer.0.convffn.fc{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    assert {k.removeprefix("text_encoder.") for k in apple if ".transformer.0." in k} == block0
    assert "text_encoder.transformer.1.pre_norm_mha.1.qkv_proj.weight" in apple
    assert apple["text_encoder.positional_embedding.pos_embed.pos_embed"].shape == (1, 1, 77, 64)

    # open_clip converts Apple checkpoints on load; the stem key makes its timm image filter pass through.
    apple["stem.0.conv_kxk.0.conv.weight"] = torch.zeros(1)
    apple["logit_scale"] = model.logit_scale
    converted = {k: v for k, v in convert_mobile_clip_state_dict(model, apple).items() if k.startswith("text.")}
    fresh = _build("clipdr-tiny-mct")
    fresh.text.load_state_dict({k.removeprefix("text."): v for k, v in converted.items()}, strict=True)
    _, tokens = _inputs("clipdr-tiny-mct")
    torch.testing.assert_close(fresh.encode_text(tokens), model.encode_text(tokens))


@pytest.mark.parametrize("name", [pytest.param("clipdr-tiny-mct"), pytest.param("MobileCLIP-S0", marks=slow)])
@torch.no_grad()
def test_pretrained_local_file_loads_strictly_with_the_variants_preprocessing(name, tmp_path):
    model = _build(name)
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)  # a DDP checkpoint
    loaded = models.create_model(name, pretrained=str(path)).eval()
    images, tokens = _inputs(name)
    torch.testing.assert_close(loaded(images, tokens)[:2], model(images, tokens)[:2])
    assert loaded.visual.preprocess_cfg["std"] == models.get_variant(name).preprocess.std


def test_transforms_use_the_variants_preprocessing():
    _, _, preprocess_val = models.create_model_and_transforms("clipdr-tiny-mct")
    resize, crop, *_, normalize = preprocess_val.transforms
    assert (resize.size, resize.interpolation.value, crop.size) == (64, "bilinear", (64, 64))
    assert (tuple(normalize.mean), tuple(normalize.std)) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


# ----------------------------------------------------------------------------------------------- every variant


@pytest.mark.parametrize("name", EVERY_VARIANT)
@torch.no_grad()
def test_forward_at_native_resolution(name, s0):
    model = _get(name, s0)
    images, tokens = _inputs(name)
    image_features, text_features, logit_scale = _features(model, images, tokens)
    embed_dim = models.model_config(name)["embed_dim"]
    assert image_features.shape == text_features.shape == (2, embed_dim)
    assert torch.isfinite(image_features).all() and torch.isfinite(text_features).all()
    assert logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-4)


def _randomize_fusable_state(model: torch.nn.Module) -> None:
    """Non-trivial BatchNorm statistics and layer scales, so a wrong fusion cannot hide behind 1e-5 scales."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
        for name, param in model.named_parameters():
            if name.endswith(("layer_scale", "gamma")):
                param.copy_(torch.rand(param.shape, generator=generator) * 0.2)


def _unfused(model: torch.nn.Module) -> list[str]:
    """Names of modules that still have train-time branches."""
    left = []
    for name, module in model.named_modules():
        if isinstance(module, TextRepMixer) and module.reparam_conv is None:
            left.append(name)
        fusable = (MobileOneBlock, RepMixer, ReparamLargeKernelConv, RepConditionalPosEnc)
        if isinstance(module, fusable) and getattr(module, "reparam_conv", None) is None:
            left.append(name)
    return left


# ViT image towers (MobileCLIP-B's conv stem is plain conv-BN-GELU) and transformer text towers have no branches.
NOTHING_TO_FUSE = {"MobileCLIP-B", "MobileCLIP2-B", "MobileCLIP2-L-14", *OPEN_CLIP_BUILT_TWINS}


@pytest.mark.parametrize("name", EVERY_VARIANT)
@torch.no_grad()
def test_reparameterize_keeps_outputs(name, s0):
    model = _get(name, s0)
    _randomize_fusable_state(model)
    images, tokens = _inputs(name)
    expected_image, expected_text, _ = _features(model, images, tokens)
    unfused = _unfused(model)
    assert bool(unfused) == (name not in NOTHING_TO_FUSE)
    fused = models.reparameterize(model)
    assert not fused.training and _unfused(fused) == []
    assert _unfused(model) == unfused  # the original is left alone (inplace=False)
    image_features, text_features, _ = _features(fused, images, tokens)
    torch.testing.assert_close(image_features, expected_image, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(text_features, expected_text, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("name", TINY)
def test_tiny_variant_trains(name):
    model = _build(name).train()
    images, tokens = _inputs(name, batch_size=3)
    coca = models.get_variant(name).kind == "coca"
    # A captioner trains on its contrastive and caption losses together, as open_clip trains CoCa.
    clip_loss = open_clip.CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=1.0) if coca else open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    losses = []
    for _ in range(5):  # the first Adam steps from random init may overshoot; five steps settle lower
        loss = sum(clip_loss(**model(images, tokens))) if coca else clip_loss(*model(images, tokens))
        optimizer.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    moved = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    # open_clip's plain CLIP (the ViT twins) keeps its text tower's parts on the model itself, not under ``text.``.
    assert any(k.startswith("visual.") for k in moved) and any(not k.startswith(("visual.", "logit_")) for k in moved)


# ----------------------------------------------------------------------------------------------- benchmark


def test_latency_benchmark_smoke(tmp_path):
    output = tmp_path / "latency.md"
    cfg = latency.LatencyCfg(
        variants=("clipdr-tiny-mct",),
        batch_sizes=(1, 2),
        warmup=0,
        iters=1,
        num_threads=1,
        reference="clipdr-tiny-mci",
        output=str(output),
    )
    report = latency.run(cfg, progress=lambda _: None)
    assert {(r.reparameterized, r.batch_size) for r in report.rows} == {(False, 1), (True, 1), (False, 2), (True, 2)}
    # Ratios are per round against the reference run in the same rounds: one round here, so no spread.
    assert all(r.image_ratio.low == r.image_ratio.median == r.image_ratio.high for r in report.rows)
    table = output.read_text()
    assert "| clipdr-tiny-mct | yes | 2 |" in table and "image / clipdr-tiny-mci" in table
    assert "cpu clock" in table  # one CPU thread: CPU time, immune to neighbours time-slicing the core
    with pytest.raises(ValueError, match="valid variants"):
        latency.LatencyCfg(variants=("MobileCLIP-S9",))
    with pytest.raises(ValueError, match="one thread"):
        latency.LatencyCfg(clock="cpu", num_threads=2)


def test_bench_stage_rejects_unknown_benchmarks(capsys):
    assert cli_main(["bench", "throughput-of-nothing"]) == 2
    assert "latency" in capsys.readouterr().err


def test_benchmark_job_lists_benchmarks_without_a_name():
    job = Path(__file__).resolve().parents[2] / "jobs" / "benchmark.py"
    result = subprocess.run([sys.executable, str(job)], capture_output=True, text=True)
    assert result.returncode == 2 and "latency" in result.stderr
