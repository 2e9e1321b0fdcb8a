"""`ray job submit --working-dir . -- python jobs/reinforce.py ...` against a local head node the test starts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from clipdr import models, records
from clipdr.cluster import free_port
from clipdr.config import SynthConfig
from clipdr.data import synthetic
from clipdr.models.captioners import TINY_COCA, build_coca

from ..conftest import wait_http

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture
def head_node(tmp_path):
    """A `ray start --head --block` process group; terminating it stops the whole node."""
    port, dashboard = free_port(), free_port()
    # Token auth stays on (Ray 2.60 default for new clusters); the CLI finds the token the head node wrote.
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
    }
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "head.log").open("wb")
    proc = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--num-cpus=4",
            "--include-dashboard=true",
            # The agents' default ports are taken when another Ray (the suite's ray_local) runs on this machine.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_http(f"{address}/api/version", proc, timeout_s=120)
        yield address, env
    finally:
        # The job is over and its output checked: the whole group goes at once. (A graceful `ray start --block`
        # shutdown took ~30 s, a twentieth of the suite; a 5 s grace before SIGKILL never sufficed and only waited.)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
        # `ray start` recorded this node as the machine's current cluster; a record of a node that is gone
        # misleads every later Ray process that looks the cluster up (Ray Train's placement-group cleaner).
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def test_ray_job_submit_reinforce_round_trip(head_node, tmp_path):
    address, env = head_node
    synthetic.generate(
        SynthConfig(output=str(tmp_path / "world"), num_teacher=0, num_student=8, num_zeroshot=0, num_retrieval=0)
    )
    torch.manual_seed(0)
    torch.save(models.create_model("clipdr-tiny-vit").state_dict(), tmp_path / "vit.pt")
    torch.save(build_coca(TINY_COCA)[0].state_dict(), tmp_path / "coca.pt")
    run_file = tmp_path / "run.toml"
    run_file.write_text(
        f"""
[reinforce]
source = "{tmp_path}/world/student"
output = "{tmp_path}/reinforced"
num_augmentations = 1
num_syn_captions = 1
[[reinforce.teachers]]
name = "vit"
model = "clipdr-tiny-vit"
pretrained = "{tmp_path}/vit.pt"
[reinforce.captioner]
model = "{TINY_COCA}"
pretrained = "{tmp_path}/coca.pt"
max_len = 8
[tracking]
uri = "sqlite:///{tmp_path}/mlflow.db"
"""
    )
    result = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            ".",
            "--",
            "python",
            "jobs/reinforce.py",
            "--config",
            str(run_file),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "succeeded" in result.stdout
    assert "reinforced 8 samples (0 skipped)" in result.stdout
    progress = r"reinforce: shard student-00000\.parquet 1/1 \(100\.0%\) \| 8 rows \| [\d.]+ samples/s \| ETA 0 s"
    assert re.search(progress, result.stdout), result.stdout[-4000:]  # the progress line, in the job's log
    manifest = records.open_dataset(str(tmp_path / "reinforced"), require_teachers=["vit"]).manifest
    assert manifest.num_rows == 8
