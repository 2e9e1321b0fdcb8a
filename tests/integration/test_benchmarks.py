"""The benchmarks that need Ray, at toy size: they run and write their tables (their numbers are not judged)."""

from __future__ import annotations

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


def test_quantized_benchmark_runs_at_toy_size(tmp_path):
    """What `python jobs/benchmark.py quantized` runs, at toy size: a tiny ViT on a tiny world. The ONNX fp32 row's
    deltas are zero by construction, and the trained torch model must evaluate as its fp32 ONNX encoders do."""
    from clipdr.config import SynthConfig
    from clipdr.data import synthetic

    world = SynthConfig(
        output=str(tmp_path / "world"), num_teacher=0, num_student=0, num_zeroshot=8, num_retrieval=8, image_size=32
    )
    synthetic.generate(world)
    output = tmp_path / "quantized.md"
    toy = ["--model", "clipdr-tiny-vit", "--zeroshot", f"{world.output}/zeroshot", "--retrieval"]
    toy += [f"{world.output}/retrieval", "--exporter", "torchscript", "--batch-sizes", "2", "--iters", "1"]
    toy += ["--warmup", "0", "--output", str(output)]
    assert benchmarks.main(["quantized", *toy], prog="jobs/benchmark.py") == 0
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in output.read_text().splitlines()[4:]}
    assert list(rows) == ["torch fp32 (trained)", "ONNX fp32", "ONNX fp16", "ONNX int8"]
    assert rows["ONNX fp32"][1].endswith("(+0.0000)") and rows["ONNX fp32"][2].endswith("(+0.0000)")
    assert rows["torch fp32 (trained)"][1].endswith("(+0.0000)")
    assert float(rows["ONNX fp16"][3]) < float(rows["ONNX fp32"][3])  # image MB
