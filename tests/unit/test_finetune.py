"""Fine-tuning (`clipdr.train.finetune`, `clipdr.wiseft` and their use in `clipdr.train.loop`): start points, LiT
locks, layer-wise lr decay, weight EMA, WiSE-FT and the const / const-cooldown schedules, on the tiny models in plain
torch (no Ray)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from clipdr import checkpoint, models, wiseft
from clipdr.config import Config, TrainConfig, TrainFinetune, TrainOptimizer, TrainSchedule
from clipdr.train import finetune, loop
from clipdr.train.plan import TrainError, check_config, make_plan

EPS32 = torch.finfo(torch.float32).eps


def plan_of(model="clipdr-tiny-vit", samples=40, batch=4, warmup=0, kind="cosine", cooldown=0, **ft):
    train = TrainConfig(
        data="unused",
        model=model,
        mode="clip",
        schedule=TrainSchedule(
            samples=samples, batch_size=batch, warmup_samples=warmup, kind=kind, cooldown_samples=cooldown
        ),
        optimizer=TrainOptimizer(lr=1e-2, weight_decay=0.1, grad_clip=0.0),
        finetune=TrainFinetune(**ft),
    )
    return make_plan(Config(train=train), [])


def one_step(model, plan, step=0, optimizer=None):
    """One optimiser step of the plain CLIP loss on a random batch (`loop.apply_update`)."""
    optimizer = optimizer or loop.make_optimizer(model, plan, torch.device("cpu"))
    image = torch.randn(4, 3, 32, 32)
    text = torch.randint(1, 512, (4, 77))
    img, txt, scale = model(image, text)
    logits = scale * img @ txt.T
    labels = torch.arange(4)
    ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2).backward()
    loop.apply_update(model, optimizer, plan, step)
    return optimizer


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def small_vit():
    """The tiny ViT with a 512-token vocabulary (its 49,408 would be 95% of the parameters, and of the time)."""
    text_cfg = {**models.model_config("clipdr-tiny-vit")["text_cfg"], "vocab_size": 512}
    return models.create_model("clipdr-tiny-vit", text_cfg=text_cfg)


@pytest.fixture(scope="module")
def vit_state():
    torch.manual_seed(0)
    return snapshot(small_vit())


def vit(state):
    model = small_vit()
    model.load_state_dict(state)
    return model.train()


# --------------------------------------------------------------------------- LiT


def test_a_locked_image_tower_gets_no_gradient_and_no_update(vit_state):
    model = vit(vit_state)
    finetune.lock_towers(model, "clipdr-tiny-vit", True, 0, False, 0)
    plan = plan_of()
    one_step(model, plan)
    after = model.state_dict()
    for name, param in model.named_parameters():
        if name.startswith("visual."):
            assert not param.requires_grad and param.grad is None, name
            assert torch.equal(after[name], vit_state[name]), name
    assert not torch.equal(after["text_projection"], vit_state["text_projection"])  # the text tower trained


def test_the_last_groups_stay_unlocked(vit_state):
    """open_clip's ViT groups: [embeddings, ln_pre], each block, the last block with ln_post, then proj."""
    model = vit(vit_state)
    finetune.lock_towers(model, "clipdr-tiny-vit", True, 2, True, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    image = {n for n in trainable if n.startswith("visual.")}
    assert image == {
        n
        for n, _ in model.named_parameters()
        if n.startswith(("visual.transformer.resblocks.1.", "visual.ln_post.", "visual.proj"))
    }
    text = trainable - image - {"logit_scale"}
    assert text and all(n.startswith(("transformer.resblocks.1.", "ln_final.", "text_projection")) for n in text)


def test_a_model_without_lock_methods_fails_naming_it():
    with pytest.raises(ValueError, match=r"model .plain-linear..*image tower"):
        finetune.lock_towers(torch.nn.Linear(2, 2), "plain-linear", True, 0, False, 0)


# --------------------------------------------------------------------------- layer-wise lr decay


def test_layer_decay_lrs_follow_the_documented_depths(vit_state):
    model = vit(vit_state)
    plan = plan_of(layer_decay=0.5, kind="const")
    optimizer = one_step(model, plan)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    lr = plan.train.optimizer.lr
    expected = {  # 2 blocks: input side depth 0, block i depth 1 + i, the rest depth 3 (top): lr x 0.5 ** (3 - depth)
        "visual.conv1.weight": lr / 8,
        "visual.class_embedding": lr / 8,
        "token_embedding.weight": lr / 8,
        "visual.transformer.resblocks.0.attn.in_proj_weight": lr / 4,
        "transformer.resblocks.1.mlp.c_fc.weight": lr / 2,
        "visual.ln_post.weight": lr,
        "text_projection": lr,
        "logit_scale": lr,
    }
    params = dict(model.named_parameters())
    assert {name: lr_of[id(params[name])] for name in expected} == expected
    assert len(lr_of) == len(params)  # every parameter in exactly one group


def test_without_layer_decay_the_two_groups_of_before_remain(vit_state):
    groups = loop.param_groups(vit(vit_state), 0.1)
    assert [(g["weight_decay"], g["lr_scale"]) for g in groups] == [(0.1, 1.0), (0.0, 1.0)]


# --------------------------------------------------------------------------- EMA


def test_ema_is_the_formula_after_a_few_steps_and_survives_a_checkpoint(vit_state, tmp_path):
    model = vit(vit_state)
    plan = plan_of(ema_decay=0.9)
    ema = finetune.WeightEma(model, 0.9)
    expected = {k: v.clone() for k, v in vit_state.items()}
    optimizer = None
    for step in range(3):
        optimizer = one_step(model, plan, step, optimizer)
        ema.update(model)
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                expected[name] = 0.9 * expected[name] + 0.1 * value
    for name, value in expected.items():
        # Three updates of two products and a sum, each rounded once in float32 (the kernel may fuse them).
        bound = 3 * 3 * EPS32 * value.abs().max().clamp_min(ema.state[name].abs().max()).item()
        torch.testing.assert_close(ema.state[name], value, rtol=0, atol=bound)
    assert not torch.equal(ema.state["text_projection"], model.state_dict()["text_projection"])

    meta = checkpoint.CheckpointMeta("clipdr-tiny-vit", "clip", "r", "", 3, 12, 3, 10)
    checkpoint.save(tmp_path, model.state_dict(), meta, optimizer.state_dict(), ema_state=ema.state)
    restored = finetune.WeightEma(model, 0.9)
    restored.load(checkpoint.load_ema(tmp_path))
    assert all(torch.equal(restored.state[k], v) for k, v in ema.state.items())
    assert checkpoint.latest(str(tmp_path))[1].files[checkpoint.EMA_FILE] > 0  # part of the commit record
    assert all(torch.equal(checkpoint.published_weights(tmp_path)[k], v) for k, v in ema.state.items())


# --------------------------------------------------------------------------- WiSE-FT


def test_wise_ft_alpha_0_and_1_are_the_start_and_the_finetuned_bytes(vit_state):
    model = vit(vit_state)
    plan = plan_of(ema_decay=0.5, wise_alpha=0.5, eval_alphas=(0.0, 1.0))
    published = loop.Published(model, plan)  # built before training: its start is the model's state now
    one_step(model, plan)
    published.ema.update(model)
    tuned = snapshot(model)
    # What the loop evaluates and checkpoints: WiSE-FT of the EMA with the start.
    assert all(torch.equal(published.weights(model, 0.0)[k], v) for k, v in vit_state.items())
    assert all(torch.equal(published.weights(model, 1.0)[k], v) for k, v in published.ema.state.items())
    for alpha, want in ((0.0, vit_state), (1.0, tuned)):
        mixed = wiseft.wise_ft(vit_state, tuned, alpha)
        assert all(mixed[k].numpy().tobytes() == v.numpy().tobytes() for k, v in want.items()), alpha
    half = wiseft.wise_ft(vit_state, tuned, 0.5)
    for name, value in tuned.items():
        midpoint = (vit_state[name].double() + value.double()) / 2
        # One float32 lerp: a rounding of the difference, of its product and of the sum.
        bound = 3 * EPS32 * midpoint.abs().max().clamp_min(value.abs().max()).item()
        torch.testing.assert_close(half[name].double(), midpoint, rtol=0, atol=bound)
    with pytest.raises(ValueError, match="alpha"):
        wiseft.wise_ft(vit_state, tuned, 1.5)


# --------------------------------------------------------------------------- schedules


def test_schedule_curves():
    lrs = {
        kind: [loop.lr_at(s, plan_of(samples=40, batch=4, warmup=8, kind=kind, cooldown=cd)) for s in range(10)]
        for kind, cd in (("const", 0), ("const-cooldown", 16), ("cosine", 0))
    }
    lr = 1e-2
    assert lrs["const"] == [lr / 2] + [lr] * 9
    assert lrs["const-cooldown"] == pytest.approx([lr / 2, lr, lr, lr, lr, lr, lr, lr * 0.75, lr * 0.5, lr * 0.25])
    assert lrs["cosine"][:2] == [lr / 2, lr] and lrs["cosine"][-1] < lrs["cosine"][5] < lr


def test_schedule_and_finetune_settings_are_checked():
    def check(**changes):
        plan = plan_of()
        check_config(dataclasses.replace(plan.train, **changes))

    with pytest.raises(TrainError, match="cooldown_samples"):
        check(schedule=TrainSchedule(samples=40, batch_size=4, kind="const-cooldown", cooldown_samples=0))
    with pytest.raises(TrainError, match="const-cooldown only"):
        check(schedule=TrainSchedule(samples=40, batch_size=4, cooldown_samples=8))
    with pytest.raises(TrainError, match=r"set train[.]pretrained"):
        check(finetune=TrainFinetune(wise_alpha=0.5))
    with pytest.raises(TrainError, match="layer_decay"):
        check(finetune=TrainFinetune(layer_decay=0.0))


# --------------------------------------------------------------------------- start points


def test_start_from_a_checkpoint_folder_and_from_an_mlflow_model(tmp_path, monkeypatch):
    torch.manual_seed(1)
    logged = models.create_model("clipdr-tiny-vit")  # the architecture by its name, as a start is built
    vit_state = snapshot(logged)
    meta = checkpoint.CheckpointMeta("clipdr-tiny-vit", "clip", "r", "", 1, 4, 1, 10)
    run = tmp_path / "run" / "checkpoint_000000"
    run.mkdir(parents=True)
    checkpoint.save(run, vit_state, meta)
    started = wiseft.create_start("clipdr-tiny-vit", str(tmp_path / "run"), seed=5)  # a run's storage folder
    assert all(torch.equal(started.state_dict()[k], v) for k, v in vit_state.items())
    with pytest.raises(ValueError, match=r"holds model .clipdr-tiny-vit., but train[.]model is .clipdr-tiny-mci."):
        wiseft.load_start(str(run), "clipdr-tiny-mci")

    from clipdr import tracking

    calls = []

    def fake_load_model(uri, device="cpu", *, tracking="", allow_pickle=False):
        calls.append((uri, tracking, allow_pickle))
        return models.ClipEmbedder(logged, "clipdr-tiny-vit"), {"clipdr_model": "clipdr-tiny-vit"}

    monkeypatch.setattr(tracking, "load_model", fake_load_model)
    started = wiseft.create_start("clipdr-tiny-vit", "models:/student/3", seed=5, tracking_uri="sqlite:///x.db")
    assert calls == [("models:/student/3", "sqlite:///x.db", False)]  # safetensors only, never a pickle
    assert all(torch.equal(started.state_dict()[k], v) for k, v in vit_state.items())
