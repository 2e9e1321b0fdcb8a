"""The dry run prints FLOPs a sample, the floor in accelerator-hours and the projection, loading no weight."""

import re

import open_clip.factory
import open_clip.pretrained
import pytest

from clipdr import accelerators
from clipdr.config import CaptionerConfig, Config, ReinforceConfig, SynthConfig, TeacherConfig, load_config
from clipdr.data import synthetic
from clipdr.reinforce import cost
from clipdr.reinforce.run import ReinforceError, run

DRY_RUN = ["reinforce.dry_run=true"]


def dry_run(overrides=()) -> str:
    lines: list[str] = []
    run(load_config("jobs/configs/datacompdr12m.toml", [*DRY_RUN, *overrides]), log=lines.append)
    return "\n".join(lines)


@pytest.fixture
def no_downloads(monkeypatch):
    """Any weight download or checkpoint load fails the test: pretrained tags must stay names."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"the dry run tried to fetch or load weights: {args}")

    for module, name in [
        (open_clip.factory, "download_pretrained"),
        (open_clip.factory, "download_pretrained_from_hf"),
        (open_clip.factory, "load_checkpoint"),
        (open_clip.pretrained, "download_pretrained"),
    ]:
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def number(text: str, pattern: str) -> float:
    return float(re.search(pattern, text).group(1).replace(",", ""))


def test_datacompdr12m_dry_run_matches_the_issue_figures(no_downloads):
    """Issue 13: the floor is 1.265e20 FLOP for 30 views x 2 ViT-L-14 teachers (plus their 1 + 5 text encodes) on
    12.8M samples, ~35 H200-hours at peak and ~71 at 50% MFU; the captioner adds its share on top."""
    text = dry_run()
    teachers = re.findall(r"teacher \w+ ([\d.e+]+)", text)
    assert len(teachers) == 2 and sum(map(float, teachers)) == pytest.approx(1.265e20, rel=0.002)
    assert number(text, r"\): ([\d.e+]+) FLOP") == pytest.approx(1.265e20, rel=0.05)  # + the captioner's ~2.6%
    floor = number(text, r"floor +([\d,.]+) h200-hours")
    projected = number(text, r"projected +([\d,.]+) h200-hours at MFU 0\.50, assumed")
    assert floor == pytest.approx(35.5, rel=0.05) and projected == pytest.approx(2 * floor, rel=0.01)
    caption = number(text, r"5 captions x ([\d.]+) \(30 tokens, KV cache\)")
    assert 10 < caption < 30  # GFLOP a cached caption; uncached open_clip generate spends ~409 (STACK_NOTES.md)
    assert "dry run: the configuration is valid" in text


def test_a_measured_mfu_replaces_the_assumed_one(tmp_path, no_downloads):
    measured = cost.Measurement(
        device="h200",
        device_name="NVIDIA H200",
        mfu=0.25,
        views_per_s=1000.0,
        samples_per_s=10.0,
        busy_fraction=0.9,
        flops_per_sample=1e12,
        num_samples=384,
        measured_at="2026-12-04T00:00:00Z",
        config="2 x ViT-B-16, coca_ViT-L-14",
    )
    measured.write(tmp_path)
    text = dry_run([f"reinforce.cost.measured={tmp_path}"])
    floor = number(text, r"floor +([\d,.]+) h200-hours")
    assert number(text, r"projected +([\d,.]+) h200-hours at MFU 0\.25, measured by the GPU check") == pytest.approx(
        4 * floor, rel=0.01
    )
    assert cost.Measurement.read(tmp_path / cost.RESULT_NAME) == measured


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("reinforce.cost.device=tpu", r"unknown device 'tpu'; peaks are known for: h100-sxm, h200, a100, l4"),
        ("reinforce.cost.mfu=1.5", r"MFU must be in \(0, 1\]"),
        ("reinforce.cost.measured=/nonexistent/gpu_check.json", r"cannot read a GPU check result"),
    ],
)
def test_bad_projection_settings_fail_naming_the_key(override, message):
    with pytest.raises(ReinforceError, match=message):
        dry_run([override])


def test_without_a_sample_count_only_per_sample_figures_are_printed():
    text = dry_run(["reinforce.cost.samples=0"])
    assert "GFLOP a sample" in text and "set reinforce.cost.samples=N" in text and "floor" not in text


def test_device_names_map_to_peaks():
    assert [accelerators.device_of(n) for n in ("NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB")] == [
        "h200",
        "h100-sxm",
        "a100",
    ]


def test_a_parquet_source_is_counted_and_a_timm_tower_counted_on_the_meta_device(tmp_path):
    synthetic.generate(
        SynthConfig(
            output=str(tmp_path / "world"),
            formats=("parquet",),
            num_teacher=0,
            num_student=10,
            num_zeroshot=0,
            num_retrieval=0,
            shard_size=4,
        )
    )
    reinforce = ReinforceConfig(
        source=str(tmp_path / "world" / "student"),
        output=str(tmp_path / "out"),
        num_augmentations=2,
        num_syn_captions=1,
        teachers=(TeacherConfig(name="mci", model="clipdr-tiny-mci"),),
        captioner=CaptionerConfig(model="clipdr-tiny-coca", pretrained=""),
        dry_run=True,
    )
    estimate = cost.estimate(Config(reinforce=reinforce))
    assert estimate.num_samples == 10 and estimate.samples_from.startswith("counted")
    assert "meta-device count" in estimate.parts[0].detail and estimate.parts[0].flops > 0
    assert estimate.projected_hours == pytest.approx(estimate.floor_hours / 0.5)
