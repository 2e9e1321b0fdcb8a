"""The GPU check's code path (jobs/gpu_check.sh), in its CPU smoke mode, so it cannot rot where no GPU is.

The phases run in this process on the session's Ray (the script runs each in its own process under a time limit).
"""

import importlib.util
import json

import pytest
import torch

from clipdr import benchmarks
from clipdr.benchmarks import gpu_check, gpu_direct
from clipdr.reinforce import cost


def phase(name: str, out, *extra: str) -> int:
    """One phase as jobs/gpu_check.sh runs it (the benchmark entry point with these arguments), in this process."""
    return benchmarks.main(["gpu_check", "--phase", name, "--out", str(out), "--samples", "8", *extra])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_the_check_stops_at_once_saying_so(tmp_path, capsys):
    assert phase("env", tmp_path) == 1
    assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "env.json").exists()


def test_smoke_mode_reinforces_through_the_real_job_and_reports(tmp_path, ray_local):
    for name in gpu_check.PHASES:
        assert phase(name, tmp_path, "--smoke") == 0, name
    measured = cost.Measurement.read(tmp_path)
    assert measured.num_samples == 8 and measured.samples_per_s > 0 and measured.mfu is None
    assert measured.views_per_s == pytest.approx(measured.samples_per_s * 2 * 2)  # K=2 views x 2 teachers
    assert measured.flops_per_sample > 0 and "K=2, S=1" in measured.config
    report = (tmp_path / "gpu_check.md").read_text()
    assert "| teacher views/s |" in report and "| MFU (measured) | n/a (smoke) |" in report
    assert json.loads((tmp_path / cost.RESULT_NAME).read_text())["device"] == "cpu"
    # The direct phases ran the recipe's stages and training step (tiny twins) without Ray and reported them.
    stages = json.loads((tmp_path / "work" / gpu_direct.STAGES).read_text())
    assert stages["num_samples"] == 8 and stages["embed_samples_per_s"] > 0 and stages["caption_samples_per_s"] > 0
    assert stages["teacher_views_per_s"] == pytest.approx(stages["embed_samples_per_s"] * 2 * 2)
    assert stages["render_cpu_s_per_sample"] > 0 and stages["render_pool_processes"] >= 1
    train = json.loads((tmp_path / "work" / gpu_direct.TRAIN).read_text())
    assert train["samples_per_s"] > 0 and train["loader_samples_per_s_per_core"] > 0
    # Smoke: the recipe's step and the same step in mode clip; host syncs are counted on CUDA only.
    assert list(train["variants"]) == ["recipe (grad checkpointing)", "mode clip (no distillation)"]
    assert all(v["host_syncs_per_step"] is None and v["samples_per_s"] > 0 for v in train["variants"].values())
    assert "| host syncs a step |" in report
    assert "## Reinforcement stages on the device" in report and "## Training step" in report


def test_without_ray_the_direct_phases_still_report(tmp_path, monkeypatch):
    """A bare accelerator image has torch but no Ray or MLflow: the job phase records why it did not run, and the
    report and the measurement come from the direct phases."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "env.json").write_text(json.dumps({"device": "cpu", "device_name": "cpu (smoke)", "torch": "x"}))
    stages = {
        "config": "c",
        "num_samples": 8,
        "embed_samples_per_s": 4.0,
        "teacher_views_per_s": 16.0,
        "caption_samples_per_s": 4.0,
        "captions_per_s": 4.0,
        "device_samples_per_s": 2.0,
        "teacher_flops_per_sample": 10,
        "caption_flops_per_sample": 5,
        "flops_per_sample": 15,
        "render_cpu_s_per_sample": 0.1,
        "render_pool_samples_per_s": 9.0,
        "render_pool_processes": 1,
        "cores_per_device": 0.2,
        "embed_peak_bytes": None,
        "dataset_samples": 100,
        "teacher_precision_ab": {"auto: bf16 autocast (the recipe)": 5.0},
    }
    (work / gpu_direct.STAGES).write_text(json.dumps(stages))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real_find_spec(name, *a)
    )
    assert phase("reinforce", tmp_path, "--smoke") == 0
    assert phase("report", tmp_path, "--smoke") == 0
    measured = cost.Measurement.read(tmp_path)
    assert measured.samples_per_s == 2.0 and "without Ray" in measured.config
    assert "Not run: this Python lacks ray" in (tmp_path / "gpu_check.md").read_text()
