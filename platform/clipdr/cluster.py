"""Joining a Ray cluster, and what every Ray process of a job needs from the submitting one.

Used by the jobs that run on Ray (reinforcement, training); neither imports the other.
"""

from __future__ import annotations

import os
import socket

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

    Ray Train's placement-group cleaner (an actor of every fit) finds its cluster's State API through the address
    Ray last recorded (/tmp/ray/ray_current_cluster, written by `ray start`), not through the cluster it runs in.
    A recorded node that is gone (or another one that still runs) makes each of its checks time out and every fit
    stall ~12 s at its end. The local cluster's processes inherit the environment of this call, so they are told
    their own dashboard; the calling process's environment is left as it was.
    """
    dashboard_port = free_port()
    saved = os.environ.get(_API_SERVER_ENV)
    os.environ[_API_SERVER_ENV] = f"http://127.0.0.1:{dashboard_port}"
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
        if saved is None:
            os.environ.pop(_API_SERVER_ENV)
        else:
            os.environ[_API_SERVER_ENV] = saved


_API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Storage and tracking settings of the submitting process that Ray workers need to reach the same buckets and
# the same MLflow server. On a cloud cluster the AWS ones usually come from the nodes' own identity (IRSA) and
# none is set; locally they point at an endpoint.
_FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_S3_ENDPOINT_URL",
    *storage.ENVIRONMENT,  # retry settings: every worker rides out the same outages
)


def storage_runtime_env() -> dict:
    """A Ray runtime_env that gives every worker the driver's storage and tracking settings."""
    env_vars = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    return {"env_vars": env_vars} if env_vars else {}
