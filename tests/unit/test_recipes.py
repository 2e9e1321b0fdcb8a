"""The training recipes in jobs/configs load, pass the job's checks and name real models with the paper's settings."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest

from clipdr import config, models
from clipdr.train.plan import RECIPES, check_config

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"
PAPER_12M = [r for r in RECIPES if not r.startswith("finetune")]


def test_every_recipe_in_jobs_configs_is_listed():
    shipped = {p.name for p in CONFIGS.glob("*.toml")}
    reinforcement_and_demo = {
        "datacompdr12m.toml",
        "mobileclip2_reinforce.toml",
        "demo.toml",
        "demo_world2.toml",
        "gpu_check.toml",
    }
    assert shipped - reinforcement_and_demo == set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_passes_the_training_checks_and_names_a_known_model(recipe):
    tc = config.load_config(CONFIGS / recipe).train
    check_config(tc)
    known = set(open_clip.list_models()) | set(models.list_variants())
    assert tc.model in known, tc.model
    if tc.pretrained:
        assert tc.pretrained in open_clip.list_pretrained_tags_by_model(tc.model)
    assert tc.resources.use_gpu and tc.precision == "bf16"


@pytest.mark.parametrize("recipe", PAPER_12M)
def test_12m_recipes_have_the_papers_schedule(recipe):
    tc = config.load_config(CONFIGS / recipe).train
    sched, opt = tc.schedule, tc.optimizer
    assert (sched.batch_size, sched.samples // sched.batch_size, sched.warmup_samples // sched.batch_size) == (
        8192,
        30_000,
        1_000,
    )
    assert (opt.lr, opt.beta2, opt.weight_decay, opt.grad_clip) == (1e-3, 0.95, 0.2, 1.0)
    assert tc.loss.kd_weight == 1.0 and tc.loss.use_syn_captions and tc.grad_checkpointing


@pytest.mark.parametrize("recipe", RECIPES)
def test_dry_run_prints_the_plan_of_every_recipe_without_loading_weights(recipe, monkeypatch):
    import open_clip

    from clipdr.train import run

    def no_weights(*args, **kwargs):
        raise AssertionError("a dry run loads no weights")

    monkeypatch.setattr(open_clip, "load_checkpoint", no_weights)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", no_weights)
    cfg = config.load_config(CONFIGS / recipe, ["train.dry_run=true"])
    lines: list[str] = []
    assert run.run(cfg, log=lines.append) is None
    plan = "\n".join(lines)
    for field in ("student", "schedule", "data", "flops", "memory", "floor", "projected"):
        assert f"\n{field} " in f"\n{plan}", field
    tc = cfg.train
    assert f"{tc.schedule.samples:,} samples seen" in plan and "not read (object storage" in plan


def test_dry_run_figures_are_those_of_the_model():
    """Parameters equal the real model's; grad checkpointing keeps fewer activations; training FLOPs are 3 (4 with
    checkpointing) forwards of the image and each text trained on."""
    from clipdr import models
    from clipdr.models import flops
    from clipdr.train import estimate

    real = models.create_model("clipdr-tiny-vit")
    full, checkpointed = (estimate.student_size("clipdr-tiny-vit", ckpt) for ckpt in (False, True))
    assert full.image_params + full.text_params == sum(p.numel() for p in real.parameters())
    assert full.image_params == sum(p.numel() for p in real.visual.parameters())
    assert 0 < checkpointed.saved_bytes < full.saved_bytes
    cfg = config.Config(train=config.replace(config.TrainConfig(), {"model": "clipdr-tiny-vit", "data": "x"}))
    count = flops.clip_flops("clipdr-tiny-vit")
    figures = estimate.estimate(cfg, [], None, "not read")
    assert figures.student_flops == 3 * (count.image + 2 * count.text)


def test_a_recipe_that_cannot_split_its_batch_is_refused_before_planning():
    from clipdr.train import run
    from clipdr.train.plan import TrainError

    cfg = config.load_config(CONFIGS / "mobileclip_s0.toml", ["train.dry_run=true", "train.resources.workers=48"])
    with pytest.raises(TrainError, match=r"must divide evenly over train\.resources\.workers = 48"):
        run.run(cfg, log=lambda message: None)
