"""The RayJob templates and the Dockerfile agree with the Terraform outputs, the jobs and the pinned stack."""

from __future__ import annotations

import re
import string
from pathlib import Path

import pytest
import yaml

from .conftest import INFRA, REPO, TERRAFORM, blocks

TEMPLATES = sorted((INFRA / "k8s").glob("rayjob-*.yaml"))
# Chosen per submission (the runbook shows them); everything else comes from `terraform output job_env`.
PER_RUN = {"CLIPDR_RUN", "CLIPDR_CONFIG", "CLIPDR_SOURCE", "CLIPDR_DATASET", "CLIPDR_GPU_WORKERS", "CLIPDR_MODEL"}
PER_RUN |= {"CLIPDR_ARGS", "CLIPDR_TRAIN_WORKERS"}


def _job_env_keys(files: dict) -> set[str]:
    (output,) = [
        body for path, name, body in blocks(files, "output") if path == Path("stack/outputs.tf") and name == "job_env"
    ]
    (stack_locals,) = files[Path("stack/main.tf")]["locals"]
    return set(stack_locals["job_env"]) | set(re.findall(r"\b([A-Z][A-Z0-9_]+)\s*=", output["value"]))


def _render(template: Path, env: dict[str, str]) -> dict:
    text = template.read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)\}", text))
    missing = used - set(env)
    assert not missing, f"{template.name} uses {sorted(missing)}, which neither Terraform nor the runbook provides"
    return yaml.safe_load(string.Template(text).substitute(env))


def _pod_specs(job: dict) -> list[tuple[str, dict]]:
    cluster = job["spec"]["rayClusterSpec"]
    specs = [("head", cluster["headGroupSpec"]["template"]["spec"])]
    return specs + [(group["groupName"], group["template"]["spec"]) for group in cluster["workerGroupSpecs"]]


@pytest.fixture(scope="module")
def sample_env(terraform_files) -> dict[str, str]:
    env = {key: f"value-of-{key.lower()}" for key in _job_env_keys(terraform_files) | PER_RUN}
    env |= {"CLIPDR_GPU_POD_GPUS": "8", "CLIPDR_GPU_WORKERS": "2", "CLIPDR_ARGS": ""}
    return env


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.stem)
def test_rayjob_template_renders_to_a_secure_token_authenticated_job(template, sample_env):
    job = _render(template, sample_env)
    assert (job["apiVersion"], job["kind"], job["metadata"]["namespace"]) == ("ray.io/v1", "RayJob", "ray")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert spec["rayClusterSpec"]["rayVersion"] == "2.60.0"

    script = re.match(r"python /app/(jobs/\w+\.py) ", spec["entrypoint"]).group(1)
    assert (REPO / script).is_file(), f"{template.name} runs {script}, which does not exist"
    assert template.stem.removeprefix("rayjob-") in script

    for group, pod in _pod_specs(job):
        where = f"{template.name} {group}"
        assert pod["serviceAccountName"] == "ray-job", where  # the IRSA role with the bucket prefixes
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        (container,) = pod["containers"]
        assert container["image"] == sample_env["CLIPDR_IMAGE"], where
        assert {"secretRef": {"name": "mlflow-credentials"}} in container["envFrom"], where
        assert {e["name"] for e in container["env"]} >= {"AWS_REGION", "MLFLOW_TRACKING_URI"}, where
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        if gpus:
            assert pod["nodeSelector"] == {"clipdr.io/pool": "gpu"}, where
            assert toleration in pod["tolerations"], f"{where}: GPU pods must tolerate the GPU taint"
        else:
            assert "tolerations" not in pod, f"{where}: CPU pods must stay off GPU nodes"
            assert pod["nodeSelector"]["clipdr.io/pool"] == "ray-cpu", where


def test_templates_cover_the_three_jobs():
    assert [t.stem for t in TEMPLATES] == ["rayjob-evaluate", "rayjob-reinforce", "rayjob-train"]


def test_dockerfile_installs_the_pinned_stack():
    dockerfile = (REPO / "docker/Dockerfile").read_text()
    constraints = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line)
    for name, version in {"torch": "2.14.1", "torchvision": "0.29.1", "ray": "2.60.0", "mlflow": "3.17.2"}.items():
        assert constraints[name] == version
    assert constraints["open_clip_torch"] == "3.3.0"
    assert "pip install -c constraints.txt ." in dockerfile
    assert '"mlflow[auth]==3.17.2"' in dockerfile and "-c /tmp/constraints.txt" in dockerfile
    for image in re.findall(r"^FROM (\S+)", dockerfile, flags=re.M):
        assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), image
    assert dockerfile.count("\nUSER 1000") == 2


def test_mlflow_bootstrap_script_is_what_terraform_ships():
    main = (TERRAFORM / "modules/mlflow/main.tf").read_text()
    assert 'file("${path.module}/files/ensure-user.sh")' in main
    assert (TERRAFORM / "modules/mlflow/files/ensure-user.sh").is_file()
