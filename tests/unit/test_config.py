import dataclasses
import tomllib
from pathlib import Path

import pytest

from clipdr.config import (
    MOVED,
    AugmentConfig,
    Config,
    ConfigError,
    describe,
    flatten,
    from_dict,
    load_config,
    replace,
    to_dict,
    upgrade,
)

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_defaults_are_frozen_and_complete():
    cfg = load_config()
    assert cfg == Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.synth.seed = 1  # type: ignore[misc]


def test_file_then_overrides(tmp_path):
    path = write(tmp_path, '[synth]\nseed = 3\nformats = ["parquet"]\n[synth.noise]\nwrong_rate = 0.5\n')
    cfg = load_config(path, ["synth.seed=7", "augment.scale=[0.5, 1]", "synth.output=s3://bucket/world"])
    assert cfg.synth.seed == 7
    assert cfg.synth.formats == ("parquet",)
    assert cfg.synth.noise.wrong_rate == 0.5
    assert cfg.augment.scale == (0.5, 1.0)  # ints are accepted where floats are expected
    assert cfg.synth.output == "s3://bucket/world"  # bare strings need no TOML quoting


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["synth.num_teachr=5"],
            r"unknown config key 'synth.num_teachr' \(--set synth.num_teachr=5\) "
            r"\(did you mean 'num_teacher'\?\); allowed: output, seed",
        ),
        (["nope.x=1"], r"unknown config key 'nope'.*allowed: synth, augment"),
        (["synth.seed=abc"], r"synth.seed: expected an integer, got str 'abc' \(--set synth.seed=abc\)"),
        (["synth.seed=true"], r"synth.seed: expected an integer, got bool"),
        (["augment.scale=[1]"], r"augment.scale: expected a list of 2 items"),
        (["augment.hflip=yes"], r"augment.hflip: expected a number"),
        (["synth=3"], r"synth: expected a table of SynthConfig keys"),
        (["synth.formats=webdataset"], r"synth.formats: expected a list"),
        (["synth.formats=[1]"], r"synth.formats\[0\]: expected a string"),
        (["synth.seed"], r"expected section.key=value"),
        (["synth.seed.x=1"], r"'seed' is a value, not a section|synth.seed: expected an integer"),
        (
            ["train.mode=clp"],
            r"train.mode: expected one of 'reinforced', 'clip', 'online_distill' \(did you mean 'clip'\?\), "
            r"got str 'clp' \(--set train.mode=clp\)",
        ),
        (["train.precision=fp16"], r"train.precision: expected one of 'auto', 'fp32', 'bf16'"),
        (["evaluate.device=gpu"], r"evaluate.device: expected one of 'auto', 'cuda', 'cpu'"),
        (["export.onnx_exporter=tflite"], r"export.onnx_exporter: expected one of 'dynamo', 'torchscript'"),
        (['demo.modes=["clip", "online"]'], r"demo.modes\[1\]: expected one of 'reinforced'"),
        (['study.modes=["clip", "plain"]'], r"study.modes\[1\]: expected one of 'reinforced'"),
        (["study.seeds=3"], r"study.seeds: expected a list"),
        (["sweep.search=bayes"], r"sweep.search: expected one of 'grid', 'random'"),
        (["sweep.params=train.optimizer.lr=[1]"], r"sweep.params: expected a list"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_file_keys_name_the_file(tmp_path):
    path = write(tmp_path, "[augment]\nmagnitud = 9\n")
    with pytest.raises(ConfigError, match=rf"unknown config key 'augment.magnitud' \(in {path}\).*'magnitude'"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[synth\n"))


def test_a_key_of_the_flat_train_section_names_where_it_moved(tmp_path):
    path = write(tmp_path, '[train]\nmodel = "m"\nlr = 1e-3\n')
    with pytest.raises(
        ConfigError,
        match=rf"config key 'train.lr' \(in {path}\) has moved: it is now 'train.optimizer.lr' "
        r"\(lr in \[train.optimizer\]\)",
    ):
        load_config(path)
    with pytest.raises(ConfigError, match=r"'train.checkpoint_every' \(--set train.checkpoint_every=5\) has moved: "):
        load_config(None, ["train.checkpoint_every=5"])
    for old, new in MOVED.items():
        with pytest.raises(ConfigError, match=rf"'{old}' .*has moved: it is now '{new}'"):
            load_config(None, [f"{old}=1"])
    assert load_config(None, ["train.optimizer.lr=0.5"]).train.optimizer.lr == 0.5


def test_upgrade_moves_stored_flat_keys_and_keeps_current_ones():
    flat = {"train": {"model": "m", "lr": 0.5, "checkpoint_every": 3, "resources": {"workers": 2}}, "augment": {}}
    assert upgrade(flat) == {
        "train": {"model": "m", "optimizer": {"lr": 0.5}, "checkpoint": {"every": 3}, "resources": {"workers": 2}},
        "augment": {},
    }
    assert flat["train"]["lr"] == 0.5  # a copy
    current = to_dict(Config())
    assert upgrade(current) == current
    assert from_dict(Config, upgrade(flat)).train.optimizer.lr == 0.5


def test_replace_takes_dotted_keys_below_the_config():
    cfg = replace(Config(), {"train.mode": "clip", "train.loss.kd_weight": 0.0, "train.loss.local_loss": True})
    assert (cfg.train.mode, cfg.train.loss.kd_weight, cfg.train.loss.local_loss) == ("clip", 0.0, True)
    assert cfg.train.loss.caption_loss_weight == Config().train.loss.caption_loss_weight
    assert replace(cfg.train, {"schedule.samples": 7}).schedule.samples == 7


def test_round_trips_and_flatten():
    cfg = load_config(None, ["augment.hflip=0.5"])
    assert from_dict(Config, to_dict(cfg)) == cfg
    assert from_dict(AugmentConfig, tomllib.loads("scale = [0.1, 1.0]")).scale == (0.1, 1.0)
    flat = flatten(cfg)
    assert flat["augment.hflip"] == 0.5
    assert flat["synth.noise.wrong_rate"] == cfg.synth.noise.wrong_rate
    assert all(not isinstance(v, dict) for v in flat.values())


def test_every_field_is_documented():
    rows = describe(Config)
    assert {key for key, _, _ in rows} == set(flatten(Config()))
    assert all(help_text for _, _, help_text in rows)


def test_shipped_configs_load():
    configs = sorted((REPO / "jobs" / "configs").glob("*.toml"))
    assert configs, "jobs/configs/ holds the run files"
    for path in configs:
        load_config(path)
