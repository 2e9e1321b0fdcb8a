"""Joining a Ray cluster, and what every Ray process of a job needs from the submitting one.

Used by the jobs that run on Ray (reinforcement, training); neither imports the other.
"""

from __future__ import annotations

import os

import ray


def ensure_ray() -> None:
    """Joins the cluster of ``RAY_ADDRESS`` (as under ``ray job submit``) or starts a local Ray."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        # More logical CPUs than cores, so that model actors, Train workers and read tasks cannot starve each other
        # on a laptop.
        ray.init(address="local", num_cpus=max(4, 2 * (os.cpu_count() or 1)))


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
)


def storage_runtime_env() -> dict:
    """A Ray runtime_env that gives every worker the driver's storage and tracking settings."""
    env_vars = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    return {"env_vars": env_vars} if env_vars else {}
