"""The GPU check's code path (jobs/gpu_check.sh), in its CPU smoke mode, so it cannot rot where no GPU is.

The phases run in this process on the session's Ray (the script runs each in its own process under a time limit).
"""

import json

import pytest
import torch

from clipdr import benchmarks
from clipdr.benchmarks import gpu_check
from clipdr.reinforce import cost


def phase(name: str, out, *extra: str) -> int:
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
