"""A shard that kills its worker, on a real local Ray, through the reinforcement stream's own settings.

The model stages are stand-ins defined here (the real ones load models, which costs tens of seconds); what is under
test is `clipdr.reinforce.pipeline`'s fault handling, which `run_pipeline` applies to every stage: the stream's
context (`configure_stream`), the retry limits (`task_fault_args`, `actor_fault_args`), the model actor pool
(`model_pool`) and `drain`.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import ray

from clipdr.reinforce import pipeline
from clipdr.reinforce.chunks import ShardTask

pytestmark = pytest.mark.integration


@pytest.mark.timeout(900)  # retried without end, the drain would never return: a hang guard, not a speed bound
def test_a_shard_that_kills_its_worker_fails_alone_after_a_bounded_number_of_tries(ray_local, tmp_path):
    crash_retries = 1
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    tasks = [ShardTask(f"src/{name}.tar", f"{name}.parquet") for name in ("a", "hostile", "b")]

    def read(batch: dict[str, np.ndarray]):  # one chunk row per shard, like ReadShards for a small shard
        for source, output in zip(batch["source"], batch["output"], strict=True):
            yield {"source": np.array([source]), "output": np.array([output])}

    class Model:  # a model stage: the hostile shard's chunk kills the process, as the kernel's OOM killer would
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            if "hostile" in str(batch["source"][0]):
                with open(attempts / f"{time.monotonic_ns()}", "w"):
                    pass
                os._exit(137)
            return batch

    class Write:
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            names = [str(o) for o in batch["output"]]
            for name in names:
                (out / name).write_bytes(b"")
            return {
                "shard": np.array(names, dtype=object),
                "num_rows": np.ones(len(names), dtype=np.int64),
                "written_at": np.full(len(names), time.time()),
            }

    ds = ray.data.from_items([{"source": t.source, "output": t.output} for t in tasks], override_num_blocks=len(tasks))
    pipeline.configure_stream(ds.context)
    ds = ds.map_batches(read, batch_size=1, num_cpus=0.5, **pipeline.task_fault_args(crash_retries))
    ds = ds.map_batches(
        Model, batch_size=1, num_cpus=0.5, compute=pipeline.model_pool(1), **pipeline.actor_fault_args(crash_retries)
    )
    ds = ds.map_batches(
        Write, batch_size=1, num_cpus=0.5, compute=ray.data.ActorPoolStrategy(size=1), **pipeline.actor_fault_args(0)
    )
    landed = []
    failed = pipeline.drain(ds, tasks, str(out), lambda name, rows, at: landed.append(name))

    assert sorted(landed) == ["a.parquet", "b.parquet"]  # the other shards are complete
    assert sorted(p.name for p in out.iterdir()) == ["a.parquet", "b.parquet"]  # nothing for the failed one
    assert list(failed) == ["src/hostile.tar"]
    assert "a stage failed on it" in failed["src/hostile.tar"]
    assert len(list(attempts.iterdir())) == 1 + crash_retries  # Ray Data's default retried it without end
