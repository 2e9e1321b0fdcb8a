"""The local Ray clipdr starts (`clipdr.cluster.start_local`, also the suite's ``ray_local``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import ray

from clipdr.cluster import storage_runtime_env

pytestmark = pytest.mark.integration


@ray.remote(num_cpus=0)
class _Pinger:
    def ping(self) -> bool:
        return True


@ray.remote(num_cpus=0)
def _state_seen_from_inside(actor_id: str) -> str:
    from ray.util.state import get_actor

    return get_actor(actor_id, timeout=10).state


def test_processes_of_a_local_ray_reach_its_own_state_api(ray_local):
    """Ray Train's placement-group cleaner checks from inside the cluster, through the State API, that its
    controller lives. Without being told its own dashboard it asks the cluster /tmp/ray/ray_current_cluster names
    (a gone `ray start` node: time-outs, a stall at every fit's end), or no dashboard at all."""
    actor = _Pinger.remote()
    assert ray.get(actor.ping.remote())
    assert ray.get(_state_seen_from_inside.remote(actor._actor_id.hex())) == "ALIVE"
    ray.kill(actor)


@ray.remote(num_cpus=0)
def _environment(names: list[str]) -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in names}


def test_credentials_reach_the_workers_but_not_the_ray_logs(ray_local, monkeypatch):
    """Jobs hand their workers the driver's credentials through `storage_runtime_env`; Ray writes a runtime_env's
    env_vars to its logs in plain text, so no credential may travel there. Set after the Ray started, as a test's
    (or a second run's) credentials are: only the forwarding can bring them to the worker."""
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    credentials = {"MLFLOW_TRACKING_PASSWORD": secret, "AWS_SECRET_ACCESS_KEY": f"aws-{secret}"}
    for name, value in credentials.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ray-jobs")

    seen = ray.get(
        _environment.options(runtime_env=storage_runtime_env()).remote([*credentials, "MLFLOW_TRACKING_USERNAME"])
    )
    assert seen == {**credentials, "MLFLOW_TRACKING_USERNAME": "ray-jobs"}

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert any(p.name.startswith("runtime_env_agent") for p in files), sorted(p.name for p in files)
    leaks = [str(p.relative_to(logs)) for p in files if secret.encode() in p.read_bytes()]
    assert not leaks, f"a credential is written in plain text to {leaks}"


_DRIVER = """
import sys, time
import ray
from clipdr.cluster import start_local

start_local(num_cpus=1, log_to_driver=False, configure_logging=False)


@ray.remote
def write(path):
    with open(path, "a") as f:
        while True:
            f.write("x\\n")
            f.flush()
            time.sleep(0.05)


ref = write.remote(sys.argv[1])
time.sleep(3600)
"""


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def test_a_killed_driver_takes_the_workers_of_its_local_ray_with_it(tmp_path):
    """A driver that started its own Ray (`start_local`, the embedded default) is SIGKILLed while a task of it
    writes: the writing stops and no worker of that Ray lives on (Ray's kernel fate sharing). Ray's dashboard and
    runtime-env agents do outlive it (docs/reliability.md#driver-death): they write nothing, and the test ends them."""
    out = tmp_path / "written"
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ray_processes: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while _size(out) < 20:  # the task writes
            assert driver.poll() is None and time.monotonic() < deadline, "the driver's task never wrote"
            time.sleep(0.1)
        ray_processes = psutil.Process(driver.pid).children(recursive=True)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 30
        while True:  # the writer's process ends with the raylet
            alive = [p for p in ray_processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            if all("Agent" in " ".join(p.cmdline()) for p in alive):
                break
            assert time.monotonic() < deadline, f"alive 30 s after the kill: {[p.cmdline()[:1] for p in alive]}"
            time.sleep(0.2)
        stopped_at = _size(out)
        time.sleep(1.0)
        assert _size(out) == stopped_at  # nothing writes any more
    finally:
        for p in [psutil.Process(driver.pid)] if driver.poll() is None else []:
            p.kill()
        for p in ray_processes:  # the orphaned agents, and anything a failure left
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
