"""The benchmarks that need Ray, at toy size: they run and write their tables (their numbers are not judged)."""

from __future__ import annotations

import os

import pytest
import ray

from clipdr import benchmarks

pytestmark = pytest.mark.integration


def test_reinforce_benchmark_runs_at_toy_size(ray_local, tmp_path):
    """What `python jobs/benchmark.py reinforce` runs (the same `benchmarks.main`), at toy size."""
    output = tmp_path / "reinforce.md"
    toy = ["--shards", "2", "--shard-size", "4", "--bound-shards", "1", "--views", "1", "--captions", "1"]
    toy += ["--batch-size", "4", "--caption-len", "4", "--rounds", "1", "--warmup", "0", "--output", str(output)]
    assert benchmarks.main(["reinforce", *toy], prog="jobs/benchmark.py") == 0
    assert "bound" in output.read_text()
    assert ray.is_initialized()  # the suite's Ray, which the benchmark joined, is left running


# Slow tier (``CLIPDR_SLOW=1 pytest -m slow``, as tests/unit/test_models.py's big variants): three job runs and two
# extra driver processes (each imports torch and joins Ray), about 60 s on the 2-core machine at a load average of
# 6-14 (the reinforce toy above took 45 s in the same run), beyond what the default run's 12 minutes can give it.
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CLIPDR_SLOW"), reason="slow: set CLIPDR_SLOW=1")
def test_reinforce_scale_benchmark_runs_at_toy_size(ray_local, tmp_path):
    """What `python jobs/benchmark.py reinforce_scale` runs, at toy size (one layout): peak RSS by process kind, and
    a second driver killed mid-run whose job the benchmark resumes exactly once (the benchmark exits 1 if not)."""
    output = tmp_path / "scale.md"
    # 8 shards, killed after the first lands: under load the writers go on committing until Ray ends them.
    toy = ["--layouts", "8x4", "--image-size", "16", "--views", "1", "--batch-size", "2", "--writers", "1"]
    toy += ["--kill-after", "1", "--output", str(output)]
    assert benchmarks.main(["reinforce_scale", *toy], prog="jobs/benchmark.py") == 0
    text = output.read_text()
    for kind in ("| driver |", "| writer actors |", "| model actors (teachers) |", "| exactly once | True |"):
        assert kind in text, kind
    assert ray.is_initialized()  # the suite's Ray, which the benchmark joined, is left running
