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
    reinforcement_and_demo = {"datacompdr12m.toml", "mobileclip2_reinforce.toml", "demo.toml", "gpu_check.toml"}
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
