"""The training job refuses bad settings and unfit data before any Ray or model work, saying what and where."""

from __future__ import annotations

import dataclasses
import json
import pickle
import typing

import pytest

from clipdr import runstate
from clipdr.config import Config, SynthConfig, TrainConfig, TrainMode, TrainSchedule, replace
from clipdr.data import synthetic
from clipdr.train.plan import Mode, TrainError, TrainPlan, check_config, default_run_name, make_plan
from clipdr.train.run import _recipe, open_data, recorded_recipe
from tests.unit.test_train_data import teacher, write_dataset

GOOD = TrainConfig(data="somewhere", model="clipdr-tiny-mci", schedule=TrainSchedule(samples=1024, batch_size=64))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"data": ""}, r"train.data is empty"),
        ({"model": ""}, r"train.model is empty: name the student, or start from a recipe: mobileclip_s0.toml"),
        ({"mode": "distill"}, r"train.mode 'distill' is not one of reinforced, clip, online_distill"),
        ({"loss.kd_weight": 1.5}, r"train.loss.kd_weight \(lambda\) must be in \[0, 1\]"),
        ({"loss.kd_weight": 0.0}, r"mode 'reinforced' distils: train.loss.kd_weight must be > 0"),
        ({"schedule.batch_size": 1}, r"train.schedule.batch_size must be >= 2"),
        ({"schedule.batch_size": 63, "resources.workers": 2}, r"train.schedule.batch_size 63 must divide evenly"),
        ({"schedule.samples": 10}, r"train.schedule.samples is less than one optimiser step"),
        ({"precision": "fp16"}, r"train.precision must be auto, fp32 or bf16"),
        ({"checkpoint.every": 0}, r"train.checkpoint.every must be >= 1"),
        ({"checkpoint.keep": 0}, r"train.checkpoint.keep must be >= 1"),
        ({"run_name": "a b/c"}, r"train.run_name"),
        ({"schedule.accum_steps": 0}, r"train.schedule.accum_steps must be >= 1"),
        ({"optimizer.lr": 0.0}, r"train.optimizer.lr must be > 0"),
        ({"loss.max_logit_scale": 1.0}, r"train.loss.max_logit_scale must be > 1"),
    ],
)
def test_bad_settings_are_refused_by_key(changes, message):
    with pytest.raises(TrainError, match=message):
        check_config(replace(GOOD, changes))


def test_clip_mode_accepts_lambda_zero():
    check_config(replace(GOOD, {"mode": "clip", "loss.kd_weight": 0.0}))


def test_reinforced_dataset_must_hold_the_teachers_the_run_distils_from(tmp_path):
    uri, _ = write_dataset(tmp_path / "ds")
    _, dataset, files = open_data(dataclasses.replace(GOOD, data=uri, teachers=("alpha",)))
    assert dataset is not None and len(files) == len(dataset.shard_uris) >= 1
    with pytest.raises(TrainError, match=r"cannot train in mode 'reinforced'.*'openai'"):
        open_data(dataclasses.replace(GOOD, data=uri, teachers=("openai",)))


def test_synthetic_captions_are_required_only_when_asked_for_by_number(tmp_path):
    """A dataset without synthetic captions (an embeddings-only pass) trains on real ones only by default
    (tests/unit/test_train_choices.py); a run that asks for n of them refuses it."""
    uri, _ = write_dataset(tmp_path / "ds", num_syn_captions=0)
    with pytest.raises(TrainError, match=r"synthetic caption"):
        open_data(replace(GOOD, {"data": uri, "num_syn_captions": 1}))
    open_data(dataclasses.replace(GOOD, data=uri))
    open_data(replace(GOOD, {"data": uri, "loss.use_syn_captions": False}))
    open_data(replace(GOOD, {"data": uri, "mode": "clip", "loss.kd_weight": 0.0}))  # clip never reads them


def test_raw_source_shards_train_only_plain_clip(tmp_path):
    synthetic.generate(
        SynthConfig(
            output=str(tmp_path / "w"),
            image_size=16,
            num_teacher=8,
            num_student=0,
            num_zeroshot=0,
            num_retrieval=0,
            shard_size=4,
        )
    )
    raw = str(tmp_path / "w" / "teacher")
    _, dataset, files = open_data(replace(GOOD, {"data": raw, "mode": "clip", "loss.kd_weight": 0.0}))
    assert dataset is None and len(files) == 2
    with pytest.raises(TrainError, match=r"raw source shards.*only mode 'clip'.*clipdr reinforce"):
        open_data(dataclasses.replace(GOOD, data=raw))
    with pytest.raises(TrainError, match=r"no manifest.json"):
        open_data(dataclasses.replace(GOOD, data=str(tmp_path / "nothing")))


def test_default_run_name_names_student_mode_data_and_length():
    cfg = dataclasses.replace(GOOD, data="s3://bucket/reinforced/", model="MobileCLIP2-S0", mode="clip")
    assert default_run_name(cfg) == "MobileCLIP2-S0-clip-reinforced-1024"


def test_relative_paths_are_resolved_for_workers_and_eval_data_checked_up_front(tmp_path, monkeypatch):
    from clipdr.config import Config, EvaluateConfig
    from clipdr.train.plan import check_evaluation
    from clipdr.train.run import resolve_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "zs").mkdir()
    cfg = Config(
        train=dataclasses.replace(GOOD, data="data/x", output="runs", evaluate=True),
        evaluate=EvaluateConfig(zeroshot=("zs",), retrieval=("s3://bucket/retrieval",)),
    )
    resolved = resolve_paths(cfg)
    assert resolved.train.data == str(tmp_path / "data" / "x") and resolved.train.output == str(tmp_path / "runs")
    assert resolved.evaluate.zeroshot == (str(tmp_path / "zs"),)
    assert resolved.evaluate.retrieval == ("s3://bucket/retrieval",)
    check_evaluation(dataclasses.replace(resolved, evaluate=EvaluateConfig(zeroshot=(str(tmp_path / "zs"),))))
    with pytest.raises(TrainError, match=r"evaluate.zeroshot: .*missing does not exist"):
        check_evaluation(dataclasses.replace(resolved, evaluate=EvaluateConfig(zeroshot=(str(tmp_path / "missing"),))))
    with pytest.raises(TrainError, match=r"names no zeroshot/retrieval data"):
        check_evaluation(dataclasses.replace(resolved, evaluate=EvaluateConfig()))


@pytest.mark.parametrize(
    ("mode", "distils", "reads_embeddings", "needs_manifest", "runs_teachers_online"),
    [
        (Mode.REINFORCED, True, True, True, False),
        (Mode.CLIP, False, False, False, False),
        (Mode.ONLINE_DISTILL, True, False, True, True),
    ],
)
def test_a_mode_says_what_it_means(mode, distils, reads_embeddings, needs_manifest, runs_teachers_online):
    assert Mode(str(mode)) is mode and mode == mode.value  # the config spelling
    assert (mode.distils, mode.reads_embeddings, mode.needs_manifest) == (distils, reads_embeddings, needs_manifest)
    assert mode.runs_teachers_online == runs_teachers_online
    assert mode.trains_syn_captions == distils  # synthetic captions come with the reinforcement


def test_the_plan_is_built_once_and_travels_as_plain_data():
    spec = teacher("alpha", 16)
    cfg = Config(
        train=replace(GOOD, {"schedule.accum_steps": 2, "schedule.warmup_samples": 300, "loss.local_loss": True})
    )
    plan = make_plan(cfg, [spec], run_name="r", start_batches=3)
    assert plan.mode is Mode.REINFORCED and plan.teacher_specs == (spec,) and plan.teacher_names == ["alpha"]
    assert (plan.total_steps, plan.warmup_steps, plan.samples_per_step) == (8, 2, 128)
    assert plan.precision == "fp32" and plan.use_syn_captions and plan.train.loss.local_loss
    shipped = plan.to_dict()
    blob = pickle.dumps(shipped)
    assert b"clipdr." not in blob  # plain data: unpickling it imports no clipdr module (and so no torch)
    assert TrainPlan.from_dict(pickle.loads(blob)) == plan

    clip = make_plan(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mode="clip")), [spec])
    assert (clip.kd_weight, clip.teacher_specs, clip.use_syn_captions) == (0.0, (), False)


def test_a_setting_added_later_enters_the_recipe_only_when_set():
    """Runs recorded before ``train.schedule.kind`` existed must still resume (their recipe lacks it)."""
    assert "kind" not in _recipe(Config(train=GOOD))["train"]["schedule"]
    assert _recipe(Config(train=replace(GOOD, {"schedule.kind": "const"})))["train"]["schedule"]["kind"] == "const"


@pytest.mark.parametrize("recorded", [None, False, True])
def test_local_loss_is_a_memory_knob_a_resubmission_may_change(recorded):
    """Which rows of the loss a rank computes changes memory, not the gradients (tests/unit/test_losses.py): it is
    in no recipe, and a run recorded with either value, or before the key existed, resumes with the default."""
    for local_loss in (False, True):
        train = replace(GOOD, {"loss.local_loss": local_loss})
        assert "local_loss" not in _recipe(Config(train=train))["train"]["loss"]
    recipe = _recipe(Config(train=GOOD))
    if recorded is not None:
        recipe = json.loads(json.dumps(recipe))
        recipe["train"]["loss"]["local_loss"] = recorded
    state = runstate.RunState("0" * 32, "data", recipe, {"rows_per_epoch": 128})
    assert recorded_recipe(state) == _recipe(Config(train=GOOD))


def test_the_config_spells_exactly_the_modes():
    assert typing.get_args(TrainMode) == tuple(Mode)
