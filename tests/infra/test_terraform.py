"""Static checks of infra/ and docker/: formatting, a checkov scan, and what reviewers look for, read from the HCL.

Offline: providers and modules cannot be downloaded here, so there is no `terraform init/validate`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from .conftest import INFRA, REPO, TERRAFORM, blocks, require_tool, tool_venv_bin, typed_blocks

EXACT_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
ACCOUNT_ID = re.compile(r"(?<![\d.])\d{12}(?![\d.])")
ACCESS_KEY = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
LITERAL_SECRET = re.compile(r"(?i)(password|secret_key|token)\s*=\s*\"[^\"$<{]{6,}\"")
REGION = re.compile(r"\b(us|eu|ap|sa|ca|me|af|il|mx)-(gov-)?(east|west|north|south|central|northeast|southeast)-\d\b")
TEXT_SUFFIXES = {".tf", ".hcl", ".example", ".yaml", ".yml", ".sh", ".py", ".md", ".tpl", ""}


def _text_files() -> list[Path]:
    roots = [INFRA, REPO / "docker"]
    return [p for root in roots for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in TEXT_SUFFIXES]


def _strings(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


# ------------------------------------------------------------------------------------------------ tools


def test_terraform_fmt():
    terraform = require_tool("terraform")
    env = {**os.environ, "CHECKPOINT_DISABLE": "1"}  # no version check over the network
    done = subprocess.run(
        [terraform, "fmt", "-check", "-recursive", "-diff", str(TERRAFORM)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, f"terraform fmt would change:\n{done.stdout}{done.stderr}"


@pytest.fixture(scope="session")
def checkov_reports() -> list[dict]:
    """One checkov run over the Terraform, the Dockerfile and the Kubernetes templates (about 15 s)."""
    checkov = require_tool("checkov", *tool_venv_bin("checkov"))
    command = [checkov, "--quiet", "--compact", "--output", "json", "--skip-download"]
    command += ["--directory", str(TERRAFORM), "--directory", str(REPO / "docker"), "--directory", str(INFRA / "k8s")]
    command += ["--framework", "terraform", "dockerfile", "kubernetes"]
    env = {**os.environ, "LOG_LEVEL": "ERROR", "CHECKPOINT_DISABLE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode in (0, 1), f"checkov failed to run ({done.returncode}):\n{done.stderr[-3000:]}"
    # One JSON document per directory, each a report or a list of reports (one per framework).
    decoder, text, position, reports = json.JSONDecoder(), done.stdout, 0, []
    while text[position:].strip():
        value, position = decoder.raw_decode(text, len(text) - len(text[position:].lstrip()))
        reports += value if isinstance(value, list) else [value]
    return reports


def test_checkov_has_no_failed_checks(checkov_reports):
    kinds = {report["check_type"] for report in checkov_reports}
    assert {"terraform", "dockerfile"} <= kinds, kinds
    failed = [
        f"{r['check_id']} {r['resource']} ({r['file_path']}:{r['file_line_range'][0]}): {r['check_name']}"
        for report in checkov_reports
        for r in report["results"]["failed_checks"]
    ]
    assert not failed, "checkov failed checks:\n" + "\n".join(failed)
    for report in checkov_reports:
        assert report["summary"]["parsing_errors"] == 0, report["check_type"]
        assert report["summary"]["passed"] > 0, report["check_type"]


def test_every_checkov_skip_gives_its_reason():
    skips = [
        (path, line)
        for path in _text_files()
        for line in path.read_text().splitlines()
        if "checkov:skip" in line and "#checkov:skip=" in line.replace("# checkov", "#checkov")
    ]
    assert skips, "expected the deliberate skips to be present"
    for path, line in skips:
        match = re.search(r"checkov:skip=(CKV\w+):(.*)$", line)
        assert match and len(match.group(2).strip()) >= 20, f"{path}: skip without a reason: {line.strip()}"


# ------------------------------------------------------------------------------------------------ versions


def test_modules_and_charts_are_pinned(terraform_files):
    modules = list(blocks(terraform_files, "module"))
    assert modules
    for path, name, body in modules:
        source = body["source"]
        if source.startswith("../"):
            assert "version" not in body, f"{path}: local module {name} takes no version"
            assert (TERRAFORM / path).parent.joinpath(source).resolve().is_dir(), f"{path}: {source} is missing"
        else:
            assert source.startswith("terraform-aws-modules/"), f"{path}: module {name} from {source}"
            assert EXACT_VERSION.match(str(body.get("version", ""))), f"{path}: module {name} is not pinned exactly"
    releases = list(typed_blocks(terraform_files, "resource", "helm_release"))
    assert releases
    for path, name, body in releases:
        if body["chart"].startswith("${path.module}"):
            continue  # the repository's own chart
        version = body["version"]
        if version.startswith("${local.") or version.startswith("${var."):
            version = _resolve_local(terraform_files, path, version)
        assert EXACT_VERSION.match(version), f"{path}: helm_release {name} chart version {version!r} is not exact"


def _resolve_local(files: dict, path: Path, expression: str) -> str:
    """The literal value of ``${local.a.b}`` defined in the same directory."""
    keys = expression.removeprefix("${local.").removesuffix("}").split(".")
    for other, doc in files.items():
        if other.parent != path.parent:
            continue
        for entry in doc.get("locals", []):
            if keys[0] in entry:
                value = entry[keys[0]]
                for key in keys[1:]:
                    value = value[key]
                return str(value)
    raise AssertionError(f"{path}: cannot resolve {expression}")


def test_terraform_and_providers_are_constrained(terraform_files):
    settings = [(path, body) for path, doc in terraform_files.items() for body in doc.get("terraform", [])]
    assert settings
    for path, body in settings:
        assert body.get("required_version", "").startswith(">= 1.11"), f"{path}: required_version"
        for providers in body.get("required_providers", []):
            for name, spec in providers.items():
                assert spec["source"].startswith("hashicorp/"), f"{path}: provider {name} source"
                assert re.match(r"^~> \d+\.\d+$", spec["version"]), f"{path}: provider {name} is {spec['version']}"
    for path, doc in terraform_files.items():
        used = {key.split("_")[0] for entry in doc.get("resource", []) + doc.get("data", []) for key in entry}
        if used and path.parts[0] == "modules":
            versions = terraform_files[path.parent / "versions.tf"]["terraform"][0]["required_providers"][0]
            assert used <= set(versions) | {"terraform"}, f"{path}: providers {used - set(versions)} not required"


# ------------------------------------------------------------------------------------------------ variables


def test_every_variable_is_typed_and_described(terraform_files):
    variables = list(blocks(terraform_files, "variable"))
    assert len(variables) > 40
    for path, name, body in variables:
        assert body.get("type"), f"{path}: variable {name} has no type"
        assert len(body.get("description", "")) >= 10, f"{path}: variable {name} has no description"


def test_module_inputs_are_validated(terraform_files):
    for path, name, body in blocks(terraform_files, "variable"):
        if path.parts[0] == "stack" or body["type"] == "bool" or name == "tags":
            continue  # the stack only forwards to the modules, which validate
        assert body.get("validation"), f"{path}: variable {name} has no validation block"


# ------------------------------------------------------------------------------------------------ storage


def test_buckets_are_encrypted_versioned_and_not_public(terraform_files):
    buckets = [
        (path, name, body)
        for path, name, body in blocks(terraform_files, "module")
        if body["source"] == "terraform-aws-modules/s3-bucket/aws"
    ]
    assert len(buckets) >= 2
    assert not list(typed_blocks(terraform_files, "resource", "aws_s3_bucket")), "buckets go through the module"
    for path, name, body in buckets:
        where = f"{path}: bucket {name}"
        for flag in ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets"):
            assert body.get(flag) is True, f"{where}: {flag}"
        assert body.get("attach_deny_insecure_transport_policy") is True, f"{where}: TLS-only policy"
        assert body.get("object_ownership") == "BucketOwnerEnforced", f"{where}: ACLs must be disabled"
        sse = body["server_side_encryption_configuration"]["rule"]["apply_server_side_encryption_by_default"]
        assert sse["sse_algorithm"] in ("aws:kms", "AES256"), where
        if sse["sse_algorithm"] == "aws:kms":
            assert sse["kms_master_key_id"].startswith("${module.kms."), f"{where}: customer-managed key"
        assert body["versioning"] == {"enabled": True}, f"{where}: versioning"
        assert body.get("lifecycle_rule"), f"{where}: lifecycle rules"


def test_data_buckets_use_kms_and_log_access(terraform_files):
    data = next(body for _, name, body in blocks(terraform_files, "module") if name == "bucket")
    assert data["server_side_encryption_configuration"]["rule"]["bucket_key_enabled"] is True
    assert data["logging"]["target_bucket"] == "${module.access_logs.s3_bucket_id}"
    assert data["lifecycle_rule"][0]["abort_incomplete_multipart_upload_days"] == 7


def test_checkpoint_expiry_spares_the_run_state(terraform_files, tmp_path):
    """Dev checkpoints expire; the run state beside them (a resubmission's MLflow run id, recipe and completion
    marker, `clipdr.runstate`) must not go with them, or a resubmitted run starts a second MLflow run."""
    from clipdr import runstate
    from clipdr.config import load_config, to_dict

    storage = terraform_files[Path("modules/storage/main.tf")]
    rules = next(body for _, name, body in blocks(terraform_files, "module") if name == "bucket")["lifecycle_rule"]
    limit = storage["locals"][0]["expire_above_bytes"]
    expiring = [rule for rule in rules if "expiration" in rule]
    assert expiring, "checkpoints no longer expire: update this test"
    for rule in expiring:
        assert rule.get("filter") == {"object_size_greater_than": "${local.expire_above_bytes}"}, rule["id"]

    # The largest run state a run writes: the whole recipe of the longest shipped config, and a result.
    cfg = load_config("jobs/configs/demo.toml")
    recipe = {"train": to_dict(cfg.train), "augment": to_dict(cfg.augment)}
    state = runstate.RunState("0" * 32, runstate.fingerprint("data"), recipe, {"rows_per_epoch": 10**9})
    runstate.write(str(tmp_path), runstate.TRAIN_STATE, state)
    runstate.write_result(str(tmp_path), runstate.TRAIN_RESULT, {"run_name": "x" * 200, "model_uri": "y" * 200})
    sizes = {p.name: p.stat().st_size for p in tmp_path.iterdir()}
    assert set(sizes) == {runstate.TRAIN_STATE, runstate.TRAIN_RESULT}
    assert max(sizes.values()) * 50 < limit, sizes  # a wide margin: recipes grow


# ------------------------------------------------------------------------------------------------ compute


def test_gpu_nodes_are_tainted_and_only_ray_gpu_pods_tolerate_it(terraform_files):
    eks = terraform_files[Path("modules/eks/main.tf")]
    pools = eks["locals"][0]["node_pools"]
    taint = {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}
    assert pools["gpu"]["taints"] == [taint]
    assert pools["ray-cpu"]["taints"] == []
    assert pools["gpu"]["limits"] == {"nvidia.com/gpu": "${var.gpu_limit}"}
    releases = {name: body for _, name, body in typed_blocks(terraform_files, "resource", "helm_release")}
    assert re.search(r"taints\s*=\s*cfg\.taints", releases["node_pools"]["values"][0])
    assert "nvidia.com/gpu" in releases["nvidia_device_plugin"]["values"][0]
    # GPUs come only from the tainted Karpenter pool, never from a managed node group.
    for group in eks["module"][0]["eks"]["eks_managed_node_groups"].values():
        assert "NVIDIA" not in group["ami_type"]

    kuberay = terraform_files[Path("modules/kuberay/main.tf")]["locals"][0]["ray_cluster"]
    gpu_group = kuberay["spec"]["workerGroupSpecs"][1]
    assert gpu_group["groupName"] == "gpu"
    assert re.search(r'key\s*=\s*"nvidia.com/gpu",\s*operator\s*=\s*"Exists"', gpu_group["template"]["spec"])


def test_gpu_families_are_configurable_per_environment(terraform_files):
    for env in ("dev", "prod"):
        cluster = terraform_files[Path(f"environments/{env}/main.tf")]["module"][0]["stack"]["cluster"]
        assert cluster["gpu_instance_families"], env
        assert cluster["gpu_limit"] >= 1, env
    dev = terraform_files[Path("environments/dev/main.tf")]["module"][0]["stack"]["cluster"]
    assert "spot" in dev["gpu_capacity_types"]


# ------------------------------------------------------------------------------------------------ secrets, IAM


def test_no_secrets_account_ids_or_regions_in_code(terraform_files):
    for path in _text_files():
        text = path.read_text()
        assert not ACCOUNT_ID.search(text), f"{path}: looks like an AWS account id: {ACCOUNT_ID.search(text)[0]}"
        assert not ACCESS_KEY.search(text), f"{path}: looks like an AWS access key"
        assert not LITERAL_SECRET.search(text), f"{path}: a literal secret"
    # Regions only as variable defaults: everything else gets the region from a variable or the provider.
    for path, doc in terraform_files.items():
        for kind, entries in doc.items():
            if kind == "variable":
                continue
            for value in _strings(entries):
                assert not REGION.search(value), f"{path}: hard-coded region in {value!r}"
    # Generated credentials are ephemeral and written write-only: never in the state.
    assert not list(typed_blocks(terraform_files, "resource", "random_password"))
    versions = list(typed_blocks(terraform_files, "resource", "aws_secretsmanager_secret_version"))
    assert versions
    for path, name, body in versions:
        assert "secret_string" not in body and "secret_string_wo" in body, f"{path}: {name} must be write-only"


def test_database_is_encrypted_private_and_managed_by_secrets_manager(terraform_files):
    (db,) = [
        body for _, _, body in blocks(terraform_files, "module") if body["source"] == "terraform-aws-modules/rds/aws"
    ]
    assert db["storage_encrypted"] is True and db["kms_key_id"].startswith("${module.kms.")
    assert db["publicly_accessible"] is False
    assert db["manage_master_user_password"] is True and "password" not in db and "password_wo" not in db
    assert {"name": "rds.force_ssl", "value": "1"} in db["parameters"]
    (sg,) = [body for _, _, body in blocks(terraform_files, "module") if body["source"].endswith("security-group/aws")]
    assert [rule["source_security_group_id"] for rule in sg["ingress_with_source_security_group_id"]] == [
        "${var.node_security_group_id}"
    ]
    assert "ingress_cidr_blocks" not in sg


def test_iam_policies_are_scoped(terraform_files):
    documents = list(typed_blocks(terraform_files, "data", "aws_iam_policy_document"))
    assert len(documents) >= 4
    for path, name, body in documents:
        for statement in body["statement"]:
            where = f"{path}: policy {name}, statement {statement.get('sid')}"
            actions = statement["actions"]
            assert all(a != "*" and not a.endswith(":*") for a in actions), f"{where}: wildcard action"
            assert all(r != "*" and not r.endswith(":::*") for r in statement["resources"]), f"{where}: * resource"
            if any(a.startswith("s3:") and a != "s3:ListBucket" for a in actions):
                # Object actions name a prefix of one bucket, never the whole bucket.
                assert all(re.search(r"}/[a-z_{}$.]+/\*$", r) for r in statement["resources"]), where
            if "s3:ListBucket" in actions:
                assert statement["condition"][0]["variable"] == "s3:prefix", f"{where}: listing must be prefix-scoped"
    for path, text in ((p, p.read_text()) for p in TERRAFORM.rglob("*.tf")):
        assert '"Resource": "*"' not in text and 'Resource = "*"' not in text, f"{path}: inline * resource"


def test_workload_identities_are_bound_to_one_service_account(terraform_files):
    roles = [
        (path, name, body)
        for path, name, body in blocks(terraform_files, "module")
        if body["source"].endswith("//modules/iam-role-for-service-accounts")
    ]
    assert len(roles) == 4
    for path, name, body in roles:
        (provider,) = body["oidc_providers"].values()
        (account,) = provider["namespace_service_accounts"]
        assert "*" not in account, f"{path}: role {name} trusts {account}"
        assert body["source_policy_documents"] == [f"${{data.aws_iam_policy_document.{name.split('_')[0]}.json}}"]


def test_jobs_policy_check_refuses_what_the_jobs_must_not_do():
    """The evaluator behind tests/integration's checks of real jobs' S3 requests against the jobs' role
    (tests/s3_policy.py) is not vacuous: it lets through what the role grants and refuses the rest."""
    from .. import s3_policy

    policy = s3_policy.jobs_policy("data", "ckpt")

    def refused(request: str, status: int = 200) -> bool:
        (call,) = s3_policy.parse_log(f'127.0.0.1 - - [03/Dec/2026 20:00:00] "{request} HTTP/1.1" {status} -')
        return bool(s3_policy.refused([call], policy, {"data", "ckpt"}))

    allowed = ["GET /data?list-type=2&prefix=reinforced/x/", "HEAD /ckpt", "PUT /ckpt/runs/r/checkpoint/model.pt"]
    allowed += ["GET /data/source/shard.tar", "DELETE /data/reinforced/x/part.parquet", "POST /ckpt/runs/a?uploads"]
    assert not [r for r in allowed if refused(r)]
    assert not refused("HEAD /data/source/missing.tar", 404)
    forbidden = ["GET /data?list-type=2&prefix=other/", "PUT /data/source/shard.tar", "PUT /data/other/x"]
    forbidden += ["GET /ckpt/elsewhere/x", "DELETE /data/eval/x", "PUT /data", "HEAD /ckpt/runs"]
    assert not [r for r in forbidden if not refused(r)]
    assert refused("HEAD /data/other/missing", 404)


def test_mlflow_writes_the_current_credentials_before_it_starts(terraform_files):
    """Rotation (credentials_version) works only if every MLflow start first writes the secrets into the auth
    database (files/sync-credentials.py; tests/integration/test_production_stack.py runs it against a real server)."""
    ((_, _, deployment),) = [b for b in typed_blocks(terraform_files, "resource", "kubernetes_deployment_v1")]
    ((_, _, config_map),) = [
        b for b in typed_blocks(terraform_files, "resource", "kubernetes_config_map_v1") if b[1] == "sync_credentials"
    ]
    pod = deployment["spec"][0]["template"][0]["spec"][0]
    (init,) = pod["init_container"]
    assert init["command"] == ["python", "/scripts/sync-credentials.py"]
    assert config_map["data"] == {"sync-credentials.py": "${local.sync_py}"}
    secret_env = {k: v for block in init["dynamic"] for k, v in block["env"]["for_each"].items() if isinstance(v, list)}
    assert secret_env == {
        "MLFLOW_AUTH_ADMIN_USERNAME": ["${local.server_secret}", "MLFLOW_AUTH_ADMIN_USERNAME"],
        "MLFLOW_AUTH_ADMIN_PASSWORD": ["${local.server_secret}", "MLFLOW_AUTH_ADMIN_PASSWORD"],
        "MLFLOW_USER_NAME": ["${local.jobs_secret}", "MLFLOW_USER_NAME"],
        "MLFLOW_USER_PASSWORD": ["${local.jobs_secret}", "MLFLOW_USER_PASSWORD"],
    }
    mounts = {m["name"]: m["mount_path"] for m in init["volume_mount"]}
    assert mounts == {"auth-config": "/etc/mlflow", "scripts": "/scripts", "tmp": "/tmp"}
    volumes = {v["name"]: v for v in pod["volume"]}
    assert volumes["scripts"]["config_map"] == [
        {"name": "${kubernetes_config_map_v1.sync_credentials.metadata[0].name}"}
    ]
    reload = deployment["metadata"][0]["annotations"]["secret.reloader.stakater.com/reload"]
    assert reload == "${local.server_secret},${local.jobs_secret}"
