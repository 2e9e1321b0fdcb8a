import json
import subprocess
import sys
from pathlib import Path

import pytest

from clipdr.cli import main

CLIPDR = str(Path(sys.executable).with_name("clipdr"))


def test_console_script_help_lists_stages():
    out = subprocess.run([CLIPDR, "--help"], capture_output=True, text=True, check=True).stdout
    for stage in ("synth", "demo", "config"):
        assert stage in out


def test_stage_help_lists_its_config_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "synth.num_teacher" in out and "synth.noise.wrong_rate" in out
    assert "augment." not in out  # synth does not read the augment section


def test_config_errors_exit_2_and_name_the_key(capsys):
    assert main(["config", "--set", "augment.num_opps=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'augment.num_opps'" in err and "did you mean 'num_ops'" in err


def test_config_prints_resolved_values(capsys, tmp_path):
    run_file = tmp_path / "run.toml"
    run_file.write_text("[synth]\nseed = 5\n")
    assert main(["config", "--config", str(run_file), "--set", "augment.hflip=0.5"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["synth"]["seed"] == 5
    assert resolved["augment"]["hflip"] == 0.5


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("reinforce.captioner.max_len=0", "reinforce.captioner: captioner 'clipdr-tiny-coca': max_len must be >= 1"),
        ("reinforce.captioner.top_p=7", "reinforce.captioner: captioner 'clipdr-tiny-coca': top_p must be in (0, 1]"),
        (
            "reinforce.output=http://example.com/out",
            "reinforce.output: unsupported storage URI 'http://example.com/out'",
        ),
    ],
)
def test_bad_reinforce_settings_are_one_line_config_errors(capsys, tmp_path, setting, message):
    settings = [
        "reinforce.source=/nowhere",
        f"reinforce.output={tmp_path / 'out'}",
        "reinforce.teachers=[{name = 'vit', model = 'clipdr-tiny-vit'}]",
        "reinforce.captioner.model=clipdr-tiny-coca",
        "reinforce.captioner.pretrained=''",
        setting,
    ]
    assert main(["reinforce", *(arg for s in settings for arg in ("--set", s))]) == 2
    err = capsys.readouterr().err
    assert err == f"clipdr reinforce: {err.removeprefix('clipdr reinforce: ').strip()}\n"  # one line
    assert message in err and "Traceback" not in err
