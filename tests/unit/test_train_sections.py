"""[train] in sections changed no behaviour: the plans the workers receive are those the flat [train] gave, and runs
recorded with the flat layout still resume.

``data/flat-train/`` was written by the code just before the sections (commit 820415b, `TrainConfig` flat): the
`TrainPlan.to_dict` of every demo training job built from ``jobs/configs/demo.toml`` and of a config that sets every
[train] key to a value other than its default (``plans.json``), and the run states (``clipdr_run.json``) of two of
those jobs as `train.run` wrote them. The tests rebuild the same jobs from today's config and compare.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from clipdr import demo, records, runstate
from clipdr.config import (
    MOVED,
    Config,
    TrainCheckpoint,
    TrainConfig,
    TrainCost,
    TrainFinetune,
    TrainLoss,
    TrainOptimizer,
    TrainResources,
    TrainSchedule,
    flatten,
    load_config,
    replace,
    upgrade,
)
from clipdr.train.plan import make_plan
from clipdr.train.run import _recipe, recorded_recipe

REPO = Path(__file__).resolve().parents[2]
PINNED = Path(__file__).parent / "data" / "flat-train"
DIGESTS = {  # the pinned files' bytes: regenerating them with today's code would make the tests compare it to itself
    "plans.json": "52bb7d54760b3cf9a78ec0804bb619f000d6d777e0fc00f5183f0eea232350c0",
    "clipdr_run-student-reinforced.json": "93254fa4063a8c0197381d89ba2ecb80b42b97d04075d0fa12e0d8dcb3672d92",
    "clipdr_run-every-field.json": "63b2efa2f5b87097c3c8517987891d6590b473c96aa56d02a9048d4ca9f88fb2",
}

# The pinned config that sets every key, in today's layout (written out, not derived from `MOVED`).
EVERY_FIELD = TrainConfig(
    data="s3://b/reinforced",
    output="s3://b/runs",
    run_name="every-field",
    experiment="exp",
    mode="online_distill",
    model="clipdr-demo-mci",
    pretrained="openai",
    teachers=("alpha",),
    teacher_scales=(42.0,),
    num_syn_captions=3,
    syn_caption_sets=("beam",),
    seed=11,
    precision="bf16",
    grad_checkpointing=True,
    channels_last=True,
    compile=True,
    log_every=7,
    evaluate=True,
    eval_every=2048,
    register="reg",
    dry_run=True,
    cost=TrainCost(device="a100", mfu=0.3),
    schedule=TrainSchedule(
        samples=12345,
        batch_size=96,
        accum_steps=3,
        warmup_samples=999,
        min_lr=1e-5,
        kind="const-cooldown",
        cooldown_samples=2880,
    ),
    optimizer=TrainOptimizer(lr=3e-4, beta1=0.8, beta2=0.98, eps=1e-8, weight_decay=0.05, grad_clip=0.25),
    loss=TrainLoss(
        kd_weight=0.75, use_syn_captions=False, caption_loss_weight=1.5, local_loss=True, max_logit_scale=50.0
    ),
    finetune=TrainFinetune(
        lock_image=True,
        image_unlocked_groups=2,
        lock_text=True,
        text_unlocked_groups=1,
        layer_decay=0.75,
        ema_decay=0.999,
        wise_alpha=0.5,
        eval_alphas=(0.25, 0.75),
    ),
    checkpoint=TrainCheckpoint(every=13, keep=4),
    resources=TrainResources(
        workers=3,
        use_gpu=True,
        cpus_per_worker=2.0,
        gpus_per_worker=0.5,
        loader_tasks=2,
        loader_batch_size=32,
        cpus_per_loader=0.5,
        max_failures=5,
    ),
)


# Plan sections, and keys of sections (dotted below the section), added after the pinned files were made; each is
# compared on its own in its feature's tests.
ADDED_SINCE = ("tracking", "num_syn_captions", "syn_caption_sets", "resume_from")
ADDED_KEYS = {
    "train": (
        *("dry_run", "cost", "teacher_scales", "num_syn_captions", "syn_caption_sets", "channels_last", "compile"),
        *("finetune", "schedule.kind", "schedule.cooldown_samples"),
    ),
    "evaluate": ("suite", "seed", "allow_pickle", "wise_alpha"),
}
# Keys of ADDED_KEYS that change the plan or the recipe when set (a_k, the synthetic captions drawn from, the schedule's
# curve, fine-tuning): the pinned jobs are rebuilt with them at their defaults (tests/unit/test_train_choices.py and
# tests/unit/test_finetune.py test them).
LATER_CHOICES = {
    "teacher_scales": (),
    "num_syn_captions": 0,
    "syn_caption_sets": (),
    "finetune": TrainFinetune(),
    "schedule.kind": "cosine",
    "schedule.cooldown_samples": 0,
}

# Keys whose default changed after the pinned files were made, with the default they had then: the pinned jobs are
# rebuilt with it (``loss.local_loss`` is now on, and changes nothing with the demo's one worker).
OLD_DEFAULTS = {"loss.local_loss": False}


def _without(table: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        table = table[part]
    table.pop(leaf)


def plan_dict(plan) -> dict:
    """``plan.to_dict()`` without the sections of ``ADDED_SINCE`` and the keys of ``ADDED_KEYS``."""
    plan = {k: v for k, v in plan.to_dict().items() if k not in ADDED_SINCE}
    for section, keys in ADDED_KEYS.items():
        for key in keys:
            _without(plan[section], key)
    return plan


def _is_added(key: str) -> bool:
    """Whether the dotted ``train.`` key is one of ``ADDED_KEYS["train"]`` or below one."""
    return any(key == f"train.{a}" or key.startswith(f"train.{a}.") for a in ADDED_KEYS["train"])


def pinned(name: str) -> bytes:
    raw = (PINNED / name).read_bytes()
    assert hashlib.sha256(raw).hexdigest() == DIGESTS[name], f"{name} changed: it pins what the flat layout wrote"
    return raw


def jobs() -> dict[str, Config]:
    """The jobs of ``plans.json``, built from today's config."""
    cfg = load_config(REPO / "jobs" / "configs" / "demo.toml")
    every_field = replace(EVERY_FIELD, LATER_CHOICES)
    demo_jobs = {**demo.pretraining_jobs(cfg), **demo.student_jobs(cfg)}
    pinned_defaults = {
        name: dataclasses.replace(job, train=replace(job.train, OLD_DEFAULTS)) for name, job in demo_jobs.items()
    }
    return {**pinned_defaults, "every-field": Config(train=every_field)}


def test_every_key_of_the_pinned_config_differs_from_its_default():
    """So that a key moved to the wrong place, or read from the wrong one, cannot pass unnoticed."""
    defaults = flatten(TrainConfig())
    changed = set(OLD_DEFAULTS)
    assert all(value != defaults[key] for key, value in flatten(EVERY_FIELD).items() if key not in changed)
    added = {f"train.{key}" for key in defaults if _is_added(f"train.{key}")}
    assert (
        set(flatten(upgrade({"train": json.loads(pinned("plans.json"))["every-field"]["train"]})))
        == {f"train.{key}" for key in defaults} - added
    )


@pytest.mark.parametrize("name", ["teacher-vit", "teacher-mci", "captioner", "student-clip", "student-reinforced"])
def test_the_demo_jobs_plans_are_those_of_the_flat_layout(name):
    """The workers receive the same plan: every derived number equal, every setting equal at its new key."""
    old = json.loads(pinned("plans.json"))[name]
    teachers = [
        records.TeacherSpec(**t) for t in json.loads(pinned("plans.json"))["student-reinforced"]["teacher_specs"]
    ]
    new = plan_dict(make_plan(jobs()[name], teachers))
    assert new == old | {"train": upgrade({"train": old["train"]})["train"]}


def test_a_plan_of_every_key_set_is_that_of_the_flat_layout():
    old = json.loads(pinned("plans.json"))["every-field"]
    teachers = [records.TeacherSpec(**t) for t in old["teacher_specs"]]
    new = plan_dict(make_plan(jobs()["every-field"], teachers, start_batches=5))
    assert new == old | {"train": upgrade({"train": old["train"]})["train"]}
    assert (new["total_steps"], new["warmup_steps"], new["local_batch"], new["precision"]) == (43, 3, 32, "bf16")


@pytest.mark.parametrize("name", ["student-reinforced", "every-field"])
def test_a_run_recorded_with_the_flat_layout_resumes(name, tmp_path):
    """Its recipe is migrated when read: equal to today's recipe of the same job, key for key; its fingerprint is
    the data's, untouched by the config's layout."""
    (tmp_path / runstate.TRAIN_STATE).write_bytes(pinned(f"clipdr_run-{name}.json"))
    state = runstate.read(str(tmp_path), runstate.TRAIN_STATE)
    assert "lr" in state.recipe["train"] and "optimizer" not in state.recipe["train"]  # the flat layout
    job = jobs()[name]
    assert recorded_recipe(state) == _recipe(job)
    migrated = dataclasses.replace(state, recipe=recorded_recipe(state))
    assert migrated.changes(runstate.fingerprint("manifest"), _recipe(job)) == []

    changed = replace(job, {"train.optimizer.lr": 0.5, "train.checkpoint.every": 1, "train.log_every": 1})
    assert migrated.changes(runstate.fingerprint("manifest"), _recipe(changed)) == [
        f"train.optimizer.lr: {job.train.optimizer.lr!r} -> 0.5"  # cadence and logging may change on resume
    ]


def test_every_moved_key_lands_on_a_key_of_today():
    today = set(flatten(Config()))
    assert set(MOVED.values()) <= today and not set(MOVED) & today
