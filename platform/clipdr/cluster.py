"""Joining a Ray cluster, and what every Ray process of a job needs from the submitting one.

Used by the jobs that run on Ray (reinforcement, training); neither imports the other.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import shutil
import socket
import tempfile

import ray

from clipdr import storage


def ensure_ray() -> None:
    """Joins the cluster of ``RAY_ADDRESS`` (as under ``ray job submit``) or starts a local Ray."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        # More logical CPUs than cores, so that model actors, Train workers and read tasks cannot starve each other
        # on a laptop.
        start_local(num_cpus=max(4, 2 * (os.cpu_count() or 1)))


def start_local(num_cpus: int, **init_kwargs: object) -> None:
    """Starts a Ray on this machine (with its dashboard) for this process; ``init_kwargs`` go to ``ray.init``.

    The local cluster's processes inherit the environment of this call, which sets two things for them only (the
    calling process's environment is left as it was):

    - Ray Train's placement-group cleaner (an actor of every fit) finds its cluster's State API through the address
      Ray last recorded (/tmp/ray/ray_current_cluster, written by `ray start`), not through the cluster it runs in.
      A recorded node that is gone (or another one that still runs) makes each of its checks time out and every fit
      stall ~12 s at its end. They are told their own dashboard.
    - Ray Train starts a preemption watcher (one more process) per fit, which polls for nodes being drained: one
      machine's Ray is never drained, so it is off.
    """
    dashboard_port = free_port()
    local_env = {_API_SERVER_ENV: f"http://127.0.0.1:{dashboard_port}", _PREEMPTION_WATCHER_ENV: "0"}
    saved = {name: os.environ.get(name) for name in local_env}
    os.environ.update(local_env)
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=dashboard_port,
            **init_kwargs,
        )
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


_API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
_PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Storage and tracking settings of the submitting process that Ray workers need to reach the same buckets and
# the same MLflow server. On a cloud cluster the AWS ones usually come from the nodes' own identity (IRSA) and
# none is set; locally they point at an endpoint. Settings travel as runtime_env env_vars, which Ray writes in
# plain text to its logs (runtime_env_agent.log), so none of these may be a secret.
_FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_S3_ENDPOINT_URL",
    *storage.ENVIRONMENT,  # retry settings: every worker rides out the same outages
)
# Credentials never travel in a runtime_env: they go into a file only this user can read, and a worker process
# loads it when it starts (Ray's worker setup hook); the runtime_env names only the file. A worker on another
# machine finds no file and keeps the credentials of its own environment (a cluster's pods get them from the
# Kubernetes Secret), which is also where `ray job submit` drivers get theirs.
_FORWARDED_SECRETS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
SECRETS_FILE_ENV = "CLIPDR_SECRETS_FILE"


def storage_runtime_env() -> dict:
    """A Ray runtime_env that gives every worker the driver's storage and tracking settings and credentials,
    without writing a credential where Ray logs it."""
    env_vars = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    secrets = {k: os.environ[k] for k in _FORWARDED_SECRETS if k in os.environ}
    if secrets:
        # Task-level runtime_envs ignore the `worker_process_setup_hook` field (Ray applies it only in
        # `ray.init`); what it sets is this environment variable, read by every worker process at start-up.
        from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

        env_vars[SECRETS_FILE_ENV] = _secrets_file(secrets)
        env_vars[WORKER_PROCESS_SETUP_HOOK_ENV_VAR] = f"{__name__}.{load_secrets.__name__}"
    return {"env_vars": env_vars} if env_vars else {}


def load_secrets() -> None:
    """Ray worker setup hook: puts the credentials of the file named by ``CLIPDR_SECRETS_FILE`` into this
    process's environment. A missing file (a worker on another machine) leaves the environment as it is."""
    path = os.environ.get(SECRETS_FILE_ENV)
    if not path:
        return
    try:
        with open(path) as f:
            secrets = json.load(f)
    except FileNotFoundError:
        return
    os.environ.update({k: v for k, v in secrets.items() if k in _FORWARDED_SECRETS})


@functools.cache
def _secrets_dir() -> str:
    path = tempfile.mkdtemp(prefix="clipdr-secrets-")  # mode 0700
    atexit.register(shutil.rmtree, path, True)
    return path


def _secrets_file(secrets: dict[str, str]) -> str:
    """A file of ``secrets`` readable by this user only, named after its content: new credentials make a new
    runtime_env (so Ray starts workers that load them), equal ones reuse the file and the workers."""
    text = json.dumps(secrets, sort_keys=True)
    path = os.path.join(_secrets_dir(), f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.json")
    if not os.path.exists(path):
        fd = os.open(f"{path}.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(f"{path}.tmp", path)
    return path
