"""The production tracking stack, locally: PostgreSQL, an authenticated `mlflow server` (basic-auth app) backed by
it, and artifacts on an S3 emulator, configured as infra/terraform/modules/mlflow deploys it in the cluster.

Every process is started here and stopped by PID at module teardown. Credentials are throwaway values made per run.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import pwd
import runpy
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from clipdr.cluster import free_port

from .. import s3_policy
from ..conftest import wait_http

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ENSURE_USER = REPO / "infra/terraform/modules/mlflow/files/ensure-user.sh"
SYNC_CREDENTIALS = REPO / "infra/terraform/modules/mlflow/files/sync-credentials.py"
ADMIN = "admin"
JOBS_USER = "ray-jobs"
MODEL_NAME = "clipdr-production-stack"
INITDB = ["--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions"]
# TCP on loopback only; durability off: the database lives as long as the test module.
POSTGRES = ["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=", "-c", "fsync=off"]
POSTGRES += ["-c", "synchronous_commit=off"]


def _sync_credentials(env: dict[str, str]) -> str:
    """Runs files/sync-credentials.py with ``env`` as the Deployment's init container does, but in this process:
    MLflow's auth package costs ~10 s to import in a new process on two shared cores. Returns what it printed."""
    script = runpy.run_path(str(SYNC_CREDENTIALS), run_name="sync_credentials")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        for name in (
            "MLFLOW_AUTH_CONFIG_PATH",
            "MLFLOW_AUTH_ADMIN_PASSWORD",
            "MLFLOW_USER_NAME",
            "MLFLOW_USER_PASSWORD",
        ):
            patch.delenv(name, raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        assert script["main"]() == 0
    return printed.getvalue()


class MlflowServer:
    """`mlflow server --app-name basic-auth` as the cluster's Deployment runs it: its init container first writes the
    current secrets into the auth database (sync-credentials.py), then the server starts; restartable."""

    def __init__(self, dsn: str, bucket: str, server_dir: Path) -> None:
        self.dsn, self.bucket, self.server_dir = dsn, bucket, server_dir
        self.flask_secret = secrets.token_urlsafe(32)  # CSRF key of the auth app's UI forms
        self.proc: subprocess.Popen | None = None
        self.uri = ""
        self.admin_password = ""

    def start(self, admin_password: str, jobs_password: str | None = None) -> str:
        """Starts the server with this admin password (and jobs' user password, when given); returns what the
        credentials step printed."""
        # As in the cluster (modules/mlflow): the auth app keeps its users in the same database (its own alembic
        # table), the admin comes from the environment, and a verified password is cached for a minute (each check
        # is a deliberately slow hash: ~1 s per request on two shared cores without the cache).
        auth_config = self.server_dir / "basic_auth.ini"
        auth_config.write_text(
            f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {self.dsn}\nauth_cache_ttl_seconds = 60\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        env |= {
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_AUTH_CONFIG_PATH": str(auth_config),
            "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN,
            "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self.flask_secret,
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        users = {"MLFLOW_USER_NAME": JOBS_USER, "MLFLOW_USER_PASSWORD": jobs_password} if jobs_password else {}
        printed = _sync_credentials({k: env[k] for k in env if k.startswith("MLFLOW_AUTH_")} | users)
        port = free_port()
        command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        command += ["--app-name", "basic-auth", "--backend-store-uri", self.dsn]
        command += ["--artifacts-destination", f"s3://{self.bucket}/mlflow"]
        with (self.server_dir / "server.log").open("ab") as log:
            self.proc = subprocess.Popen(
                command, cwd=self.server_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.uri, self.admin_password = f"http://127.0.0.1:{port}", admin_password
        try:
            wait_http(f"{self.uri}/health", self.proc, timeout_s=120)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{(self.server_dir / 'server.log').read_text()[-3000:]}") from None
        return printed

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc, signal.SIGTERM, group=True)  # the server and its uvicorn worker


@dataclass(frozen=True)
class TrackingStack:
    server: MlflowServer
    bucket: str
    artifacts_prefix: str
    db_dsn: str
    server_dir: Path

    @property
    def uri(self) -> str:
        return self.server.uri

    @property
    def admin_password(self) -> str:
        return self.server.admin_password


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        message = f"{binary} is not on PATH (PostgreSQL server binaries are needed for this test)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def _unprivileged() -> dict:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` (or `nobody`) account."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        try:
            account = pwd.getpwnam(name)
        except KeyError:
            continue
        return {"user": account.pw_uid, "group": account.pw_gid}
    pytest.skip("running as root and no unprivileged account to run PostgreSQL as")


def _stop(proc: subprocess.Popen, sig: int, *, group: bool) -> None:
    if proc.poll() is not None:
        return
    kill = os.killpg if group else os.kill
    kill(proc.pid, sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        kill(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def _postgres(user: str, password: str) -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (password auth only); yields the DSN of a fresh database."""
    import psycopg

    initdb, postgres = _require("initdb"), _require("postgres")
    owner = _unprivileged()
    root = Path(tempfile.mkdtemp(prefix="clipdr-pg-"))
    proc = None
    try:
        (root / "pw").write_text(password)
        if owner:
            os.chown(root, owner["user"], owner["group"])
            os.chown(root / "pw", owner["user"], owner["group"])
        subprocess.run(
            [initdb, "-D", str(root / "data"), "-U", user, f"--pwfile={root / 'pw'}", "--auth=scram-sha-256", *INITDB],
            check=True,
            capture_output=True,
            **owner,
        )
        port = free_port()
        with (root / "postgres.log").open("wb") as log:
            proc = subprocess.Popen(
                [postgres, "-D", str(root / "data"), "-p", str(port), *POSTGRES],
                stdout=log,
                stderr=subprocess.STDOUT,
                **owner,
            )
        server = f"postgresql://{user}:{password}@127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {proc.returncode}: {(root / 'postgres.log').read_text()}")
            try:
                conn = psycopg.connect(f"{server}/postgres", connect_timeout=2, autocommit=True)
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with conn:
            conn.execute("CREATE DATABASE mlflow")
        yield f"{server}/mlflow"
    finally:
        if proc is not None:
            _stop(proc, signal.SIGINT, group=False)  # SIGINT: PostgreSQL's fast shutdown
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def tracking_stack(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingStack]:
    """PostgreSQL + `mlflow server --app-name basic-auth` with artifacts proxied to s3://<bucket>/mlflow."""
    import boto3

    bucket = f"clipdr-mlflow-{secrets.token_hex(6)}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    server_dir = tmp_path_factory.mktemp("mlflow-server")
    with _postgres("mlflow", secrets.token_urlsafe(18)) as dsn:
        server = MlflowServer(dsn, bucket, server_dir)
        try:
            server.start(secrets.token_urlsafe(18))
            yield TrackingStack(server, bucket, "mlflow/", dsn, server_dir)
        finally:
            server.stop()


def _get(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def _ensure_user(stack: TrackingStack, password: str) -> str:
    env = {
        "PATH": os.environ["PATH"],
        "MLFLOW_TRACKING_URI": stack.uri,
        "MLFLOW_TRACKING_USERNAME": ADMIN,
        "MLFLOW_TRACKING_PASSWORD": stack.admin_password,
        "MLFLOW_USER_NAME": JOBS_USER,
        "MLFLOW_USER_PASSWORD": password,
    }
    done = subprocess.run(["sh", str(ENSURE_USER)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_requests_without_valid_credentials_are_refused(tracking_stack):
    search = f"{tracking_stack.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _get(search) == 401
    assert _get(search, (ADMIN, "not-the-password")) == 401
    assert _get(search, (ADMIN, tracking_stack.admin_password)) == 200
    assert _get(f"{tracking_stack.uri}/health") == 200  # the Kubernetes probes need no credentials


def test_training_job_logs_to_the_stack_and_registers_its_model(
    tracking_stack, s3_server, monkeypatch, ray_local, tmp_path
):
    """`clipdr.train` for two steps as the jobs' (non-admin) user, reading and writing S3 as in the cluster (source
    shards under source/ of a data bucket, checkpoints under runs/ of a checkpoints bucket): the run, its metrics,
    its artifacts on S3 and the registered model all land in the production stack, and every S3 request the job
    made is one the jobs' IAM role may make."""
    import boto3
    import psycopg
    from mlflow import MlflowClient

    from clipdr.checkpoint import MODEL_FILE
    from clipdr.config import Config, SynthConfig, TrainCheckpoint, TrainConfig, TrainResources, TrainSchedule
    from clipdr.data import synthetic
    from clipdr.train.run import run as train

    # The cluster's bootstrap script creates the jobs' user; a second apply re-keys it.
    assert "created" in _ensure_user(tracking_stack, secrets.token_urlsafe(18))
    password = secrets.token_urlsafe(18)
    assert "password set" in _ensure_user(tracking_stack, password)

    # What the Ray pods get: the URI from the environment, the credentials from the synced Secret.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_stack.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", JOBS_USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    data, checkpoints = f"clipdr-data-{secrets.token_hex(6)}", f"clipdr-checkpoints-{secrets.token_hex(6)}"
    for bucket in (data, checkpoints):
        boto3.client("s3").create_bucket(Bucket=bucket)
    world = f"s3://{data}/source/world"
    synthetic.generate(
        SynthConfig(output=world, image_size=32, num_teacher=0, num_student=64, num_zeroshot=0, num_retrieval=0)
    )
    batch = 16
    cfg = Config(
        train=TrainConfig(
            data=f"{world}/student",
            output=f"s3://{checkpoints}/runs",  # the runbook's train.output=$CLIPDR_CHECKPOINTS_URI
            run_name="production-stack",
            experiment="clipdr-production-stack",
            mode="clip",
            model="clipdr-tiny-vit",
            log_every=1,
            register=MODEL_NAME,
            schedule=TrainSchedule(samples=2 * batch, batch_size=batch, warmup_samples=batch),
            checkpoint=TrainCheckpoint(every=2),
            resources=TrainResources(workers=1, cpus_per_worker=1.0, max_failures=0),
        )
    )
    with s3_policy.recorded_calls(s3_server.endpoint, s3_server.log) as calls:
        result = train(cfg, log=lambda message: None)
    run_id = result.mlflow_run_id
    assert not s3_policy.refused(calls, s3_policy.jobs_policy(data, checkpoints), {data, checkpoints})

    client = MlflowClient(tracking_stack.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert (run.data.params["train.mode"], run.data.tags["clipdr.job"]) == ("clip", "train")
    assert len(client.get_metric_history(run_id, "train/loss")) == result.steps == 2
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.json", "checkpoint"}
    version = client.get_model_version(MODEL_NAME, result.registered_version)
    assert (version.run_id, version.status) == (run_id, "READY")

    # Artifacts went through the server's proxy to the bucket, not to the server's disk.
    listing = boto3.client("s3").list_objects_v2(Bucket=tracking_stack.bucket, Prefix=tracking_stack.artifacts_prefix)
    keys = [obj["Key"] for obj in listing.get("Contents", [])]
    assert any(key.endswith(f"{run_id}/artifacts/config.json") for key in keys), keys
    assert any(key.endswith(f"{run_id}/artifacts/checkpoint/{MODEL_FILE}") for key in keys), keys
    assert any(key.endswith("/MLmodel") for key in keys), keys
    assert not (tracking_stack.server_dir / "mlartifacts").exists()

    # Runs, the registry and the auth app's users all live in PostgreSQL.
    with psycopg.connect(tracking_stack.db_dsn) as conn:
        assert conn.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,)).fetchall() == [("FINISHED",)]
        assert conn.execute("SELECT name FROM registered_models").fetchall() == [(MODEL_NAME,)]
        assert conn.execute("SELECT username FROM users ORDER BY username").fetchall() == [(ADMIN,), (JOBS_USER,)]


def test_rotated_credentials_replace_the_old_ones_at_restart(tracking_stack):
    """infra/README.md's rotation: new secrets (credentials_version), then the server restarts (Reloader, or
    `kubectl rollout restart`). The auth app keeps the admin it created on its first start and ignores a new
    password: the start-up step must write it, or the new password is refused and the old one still works."""
    search = f"{tracking_stack.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    old_admin, old_jobs = tracking_stack.admin_password, secrets.token_urlsafe(18)
    _ensure_user(tracking_stack, old_jobs)
    assert _get(search, (JOBS_USER, old_jobs)) == 200

    new_admin, new_jobs = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    tracking_stack.server.stop()
    printed = tracking_stack.server.start(new_admin, new_jobs)
    assert printed.splitlines() == [f"MLflow admin {ADMIN}: password set", f"MLflow user {JOBS_USER}: password set"]
    search = f"{tracking_stack.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _get(search, (ADMIN, new_admin)) == 200
    assert _get(search, (ADMIN, old_admin)) == 401
    assert _get(search, (JOBS_USER, new_jobs)) == 200
    assert _get(search, (JOBS_USER, old_jobs)) == 401
