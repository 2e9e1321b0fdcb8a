data "aws_partition" "current" {}

locals {
  operator_chart  = "1.5.1" # first release with RayCluster/RayJob token authentication (authOptions)
  service_account = "ray-job"
  data_arn        = "arn:${data.aws_partition.current.partition}:s3:::${var.data_bucket}"
  checkpoints_arn = "arn:${data.aws_partition.current.partition}:s3:::${var.checkpoints_bucket}"
  secret_store    = "aws-secrets-manager"
  mlflow_secret   = "mlflow-credentials"

  env = [for k, v in merge(var.job_env, {
    AWS_REGION               = var.aws_region
    MLFLOW_TRACKING_URI      = var.mlflow_tracking_uri
    MLFLOW_DISABLE_TELEMETRY = "true"
    RAY_USAGE_STATS_ENABLED  = "0"
  }) : { name = k, value = v }]

  # Ray keeps its object store in /dev/shm; the container default (64 MiB) would push it to disk.
  shm = {
    volume = { name = "dshm", emptyDir = { medium = "Memory" } }
    mount  = { name = "dshm", mountPath = "/dev/shm" }
  }

  container_security = { allowPrivilegeEscalation = false, capabilities = { drop = ["ALL"] } }

  pod = {
    serviceAccountName = local.service_account
    securityContext    = { runAsNonRoot = true, runAsUser = 1000, runAsGroup = 1000, fsGroup = 1000 }
    volumes            = [local.shm.volume]
  }

  ray_container = {
    image           = var.image
    imagePullPolicy = "IfNotPresent"
    env             = local.env
    envFrom         = [{ secretRef = { name = local.mlflow_secret } }]
    volumeMounts    = [local.shm.mount]
    securityContext = local.container_security
  }

  ray_cluster = {
    apiVersion = "ray.io/v1"
    kind       = "RayCluster"
    metadata   = { name = var.ray_cluster_name, namespace = var.namespace }
    spec = {
      rayVersion              = var.ray_version
      authOptions             = { mode = "token" } # KubeRay generates the token into Secret <cluster name>
      enableInTreeAutoscaling = true
      autoscalerOptions       = { idleTimeoutSeconds = 300, upscalingMode = "Default" }
      headGroupSpec = {
        rayStartParams = { "num-cpus" = "0", "dashboard-host" = "0.0.0.0" }
        template = { spec = merge(local.pod, {
          # The head holds the cluster state: on-demand capacity only.
          nodeSelector = { "clipdr.io/pool" = "ray-cpu", "karpenter.sh/capacity-type" = "on-demand" }
          containers = [merge(local.ray_container, {
            name      = "ray-head"
            resources = { requests = var.head, limits = { memory = var.head.memory } }
            ports = [
              { name = "gcs-server", containerPort = 6379 },
              { name = "dashboard", containerPort = 8265 },
              { name = "client", containerPort = 10001 },
            ]
          })]
        }) }
      }
      workerGroupSpecs = [
        {
          groupName      = "cpu"
          replicas       = var.cpu_workers.min
          minReplicas    = var.cpu_workers.min
          maxReplicas    = var.cpu_workers.max
          rayStartParams = {}
          template = { spec = merge(local.pod, {
            nodeSelector = { "clipdr.io/pool" = "ray-cpu" }
            containers = [merge(local.ray_container, {
              name      = "ray-worker"
              resources = { requests = { cpu = var.cpu_workers.cpu, memory = var.cpu_workers.memory }, limits = { memory = var.cpu_workers.memory } }
            })]
          }) }
        },
        {
          groupName      = "gpu"
          replicas       = var.gpu_workers.min
          minReplicas    = var.gpu_workers.min
          maxReplicas    = var.gpu_workers.max
          rayStartParams = {}
          template = { spec = merge(local.pod, {
            nodeSelector = { "clipdr.io/pool" = "gpu" }
            tolerations  = [{ key = "nvidia.com/gpu", operator = "Exists", effect = "NoSchedule" }]
            containers = [merge(local.ray_container, {
              name = "ray-worker"
              resources = {
                requests = { cpu = var.gpu_workers.cpu, memory = var.gpu_workers.memory, "nvidia.com/gpu" = var.gpu_workers.gpus }
                limits   = { memory = var.gpu_workers.memory, "nvidia.com/gpu" = var.gpu_workers.gpus }
              }
            })]
          }) }
        },
      ]
    }
  }
}

resource "helm_release" "operator" {
  name             = "kuberay-operator"
  namespace        = "kuberay-system"
  create_namespace = true
  repository       = "https://ray-project.github.io/kuberay-helm/"
  chart            = "kuberay-operator"
  version          = local.operator_chart

  values = [yamlencode({ nodeSelector = { "clipdr.io/pool" = "system" } })]
}

resource "kubernetes_namespace_v1" "this" {
  metadata {
    name   = var.namespace
    labels = { "pod-security.kubernetes.io/enforce" = "baseline" }
  }
}

# ---------------------------------------------------------------------------------------------- workload identity

data "aws_iam_policy_document" "jobs" {
  statement {
    sid       = "ListData"
    actions   = ["s3:ListBucket"]
    resources = [local.data_arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["source", "source/*", "eval", "eval/*", "reinforced", "reinforced/*"] # literals: tests/s3_policy.py reads them
    }
  }
  statement {
    sid       = "ReadSources"
    actions   = ["s3:GetObject"]
    resources = ["${local.data_arn}/source/*", "${local.data_arn}/eval/*"]
  }
  statement {
    sid       = "WriteReinforced"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = ["${local.data_arn}/reinforced/*"]
  }
  statement {
    sid       = "ListCheckpoints"
    actions   = ["s3:ListBucket"]
    resources = [local.checkpoints_arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["runs", "runs/*"]
    }
  }
  statement {
    sid       = "ReadWriteCheckpoints"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = ["${local.checkpoints_arn}/runs/*"]
  }
  statement {
    # Two requests without a prefix that the jobs make: pyarrow's create_dir (Ray Train's checkpoint upload calls it)
    # asks HeadBucket, and a HeadObject of a missing key (every "does it exist yet?") answers 404 only to a role that
    # may list the bucket, 403 otherwise, which pyarrow raises (apache/arrow#49949). Both need s3:ListBucket with no
    # s3:prefix; IAM cannot tell them from a listing of the whole bucket, which this allows too (key names only: the
    # buckets hold nothing but the prefixes above). tests/integration checks the calls of real jobs against this.
    sid       = "FindBucketsAndMissingKeys"
    actions   = ["s3:ListBucket"]
    resources = [local.data_arn, local.checkpoints_arn]
    condition {
      test     = "Null"
      variable = "s3:prefix"
      values   = ["true"]
    }
  }
  statement {
    sid       = "UseBucketKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [var.s3_kms_key_arn]
  }
}

data "aws_iam_policy_document" "secrets" {
  statement {
    sid       = "ReadJobsMlflowCredentials"
    actions   = ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"]
    resources = [var.mlflow_credentials_secret_arn]
  }
  statement {
    sid       = "DecryptJobsMlflowCredentials"
    actions   = ["kms:Decrypt"]
    resources = [var.secrets_kms_key_arn]
  }
}

module "jobs_role" {
  #checkov:skip=CKV_TF_1:Registry module pinned to an exact version; registry sources cannot name a commit hash.
  source  = "terraform-aws-modules/iam/aws//modules/iam-role-for-service-accounts"
  version = "6.8.0"

  name                    = "${var.name}-ray-jobs"
  policy_name             = "${var.name}-ray-jobs-storage"
  source_policy_documents = [data.aws_iam_policy_document.jobs.json]
  oidc_providers = {
    main = { provider_arn = var.oidc_provider_arn, namespace_service_accounts = ["${var.namespace}:${local.service_account}"] }
  }

  tags = var.tags
}

module "secrets_role" {
  #checkov:skip=CKV_TF_1:Registry module pinned to an exact version; registry sources cannot name a commit hash.
  source  = "terraform-aws-modules/iam/aws//modules/iam-role-for-service-accounts"
  version = "6.8.0"

  name                    = "${var.name}-ray-secrets"
  policy_name             = "${var.name}-ray-secrets"
  source_policy_documents = [data.aws_iam_policy_document.secrets.json]
  oidc_providers = {
    main = { provider_arn = var.oidc_provider_arn, namespace_service_accounts = ["${var.namespace}:ray-secrets"] }
  }

  tags = var.tags
}

resource "kubernetes_service_account_v1" "jobs" {
  metadata {
    name        = local.service_account
    namespace   = kubernetes_namespace_v1.this.metadata[0].name
    annotations = { "eks.amazonaws.com/role-arn" = module.jobs_role.arn }
  }
}

resource "kubernetes_service_account_v1" "secrets" {
  metadata {
    name        = "ray-secrets"
    namespace   = kubernetes_namespace_v1.this.metadata[0].name
    annotations = { "eks.amazonaws.com/role-arn" = module.secrets_role.arn }
  }
  automount_service_account_token = false
}

# ---------------------------------------------------------------------------------------------- Ray

resource "helm_release" "ray" {
  name      = "ray"
  namespace = kubernetes_namespace_v1.this.metadata[0].name
  chart     = "${path.module}/../../charts/manifests"

  values = [yamlencode({
    manifests = [
      {
        apiVersion = "external-secrets.io/v1"
        kind       = "SecretStore"
        metadata   = { name = local.secret_store, namespace = var.namespace }
        spec = {
          provider = { aws = {
            service = "SecretsManager"
            region  = var.aws_region
            auth    = { jwt = { serviceAccountRef = { name = kubernetes_service_account_v1.secrets.metadata[0].name } } }
          } }
        }
      },
      {
        apiVersion = "external-secrets.io/v1"
        kind       = "ExternalSecret"
        metadata   = { name = local.mlflow_secret, namespace = var.namespace }
        spec = {
          refreshInterval = "1h"
          secretStoreRef  = { kind = "SecretStore", name = local.secret_store }
          target = {
            name     = local.mlflow_secret
            template = { engineVersion = "v2", data = { MLFLOW_TRACKING_USERNAME = "{{ .username }}", MLFLOW_TRACKING_PASSWORD = "{{ .password }}" } }
          }
          dataFrom = [{ extract = { key = var.mlflow_credentials_secret_arn } }]
        }
      },
      local.ray_cluster,
    ]
  })]

  depends_on = [helm_release.operator, kubernetes_service_account_v1.jobs]
}
