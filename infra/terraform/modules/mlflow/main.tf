data "aws_partition" "current" {}

locals {
  app           = { "app.kubernetes.io/name" = "mlflow" }
  port          = 5000
  tracking_uri  = "http://mlflow.${var.namespace}.svc.cluster.local:${local.port}"
  artifacts_arn = "arn:${data.aws_partition.current.partition}:s3:::${var.artifacts_bucket}"
  # MLflow's security middleware refuses other Host headers; probes use /health, which it exempts.
  allowed_hosts = join(",", flatten([
    for host in ["mlflow.${var.namespace}.svc.cluster.local", "mlflow.${var.namespace}.svc", "mlflow.${var.namespace}", "mlflow", "localhost", "127.0.0.1"] : [host, "${host}:*"]
  ]))
  users          = { admin = "admin", jobs = var.jobs_username }
  secret_store   = "aws-secrets-manager"
  server_secret  = "mlflow-server"
  jobs_secret    = "mlflow-jobs-user"
  pod_security   = { run_as_non_root = true, run_as_user = 1000, run_as_group = 1000 }
  system_pool    = { "clipdr.io/pool" = "system" }
  ensure_user_sh = file("${path.module}/files/ensure-user.sh")
  sync_py        = file("${path.module}/files/sync-credentials.py")
}

module "kms" {
  #checkov:skip=CKV_TF_1:Registry module pinned to an exact version; registry sources cannot name a commit hash.
  source  = "terraform-aws-modules/kms/aws"
  version = "4.2.2"

  description             = "${var.name}: MLflow database storage and credentials"
  aliases                 = ["${var.name}/mlflow"]
  enable_key_rotation     = true
  deletion_window_in_days = 30

  tags = var.tags
}

# ---------------------------------------------------------------------------------------------- PostgreSQL

module "db_security_group" {
  #checkov:skip=CKV_TF_1:Registry module pinned to an exact version; registry sources cannot name a commit hash.
  source  = "terraform-aws-modules/security-group/aws"
  version = "5.3.1"

  name        = "${var.name}-mlflow-db"
  description = "PostgreSQL for MLflow, reachable from the EKS nodes only"
  vpc_id      = var.vpc_id

  ingress_with_source_security_group_id = [{
    rule                     = "postgresql-tcp"
    source_security_group_id = var.node_security_group_id
    description              = "EKS nodes"
  }]

  tags = var.tags
}

module "db" {
  #checkov:skip=CKV_TF_1:Registry module pinned to an exact version; registry sources cannot name a commit hash.
  source  = "terraform-aws-modules/rds/aws"
  version = "7.2.2"

  identifier           = "${var.name}-mlflow"
  engine               = "postgres"
  engine_version       = var.postgres_version
  family               = "postgres${var.postgres_version}"
  major_engine_version = var.postgres_version
  instance_class       = var.db_instance_class

  allocated_storage     = var.db_allocated_storage
  max_allocated_storage = var.db_max_allocated_storage
  storage_type          = "gp3"
  storage_encrypted     = true
  kms_key_id            = module.kms.key_arn

  db_name  = "mlflow"
  username = "mlflow"
  port     = 5432
  # RDS generates and rotates the password in Secrets Manager: it never appears in code or state.
  manage_master_user_password   = true
  master_user_secret_kms_key_id = module.kms.key_arn

  db_subnet_group_name   = var.database_subnet_group_name
  vpc_security_group_ids = [module.db_security_group.security_group_id]
  publicly_accessible    = false
  multi_az               = var.db_multi_az

  parameters             = [{ name = "rds.force_ssl", value = "1" }]
  create_db_option_group = false

  backup_retention_period          = var.db_backup_retention_days
  copy_tags_to_snapshot            = true
  deletion_protection              = var.db_deletion_protection
  skip_final_snapshot              = !var.db_deletion_protection
  final_snapshot_identifier_prefix = "${var.name}-mlflow-final"
  auto_minor_version_upgrade       = true

  enabled_cloudwatch_logs_exports = ["postgresql", "upgrade"]
  create_cloudwatch_log_group     = true

  tags = var.tags
}

# ---------------------------------------------------------------------------------------------- credentials

ephemeral "random_password" "user" {
  for_each = local.users
  length   = 32
  special  = false # the values go into JSON, an INI file and a shell script unescaped
}

ephemeral "random_password" "flask_secret_key" {
  length  = 48
  special = false
}

resource "aws_secretsmanager_secret" "user" {
  #checkov:skip=CKV2_AWS_57:MLflow user passwords change through MLflow's API; rotate them by bumping credentials_version (no rotation Lambda can call MLflow).
  for_each = local.users

  name                    = "${var.name}/mlflow/${each.key}"
  description             = "MLflow ${each.key} user (${each.value})"
  kms_key_id              = module.kms.key_arn
  recovery_window_in_days = 7
  tags                    = var.tags
}

resource "aws_secretsmanager_secret_version" "user" {
  for_each = local.users

  secret_id = aws_secretsmanager_secret.user[each.key].id
  # Write-only: Terraform sends the value once per credentials_version and never stores it.
  secret_string_wo = jsonencode(merge(
    { username = each.value, password = ephemeral.random_password.user[each.key].result },
    each.key == "admin" ? { flask_secret_key = ephemeral.random_password.flask_secret_key.result } : {},
  ))
  secret_string_wo_version = var.credentials_version
}

# ---------------------------------------------------------------------------------------------- workload identities

data "aws_iam_policy_document" "server" {
  statement {
    sid       = "ListArtifacts"
    actions   = ["s3:ListBucket"]
    resources = [local.artifacts_arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = [var.artifacts_prefix, "${var.artifacts_prefix}/*"]
    }
  }
  statement {
    sid       = "ReadWriteArtifacts"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = ["${local.artifacts_arn}/${var.artifacts_prefix}/*"]
  }
  statement {
    sid       = "UseBucketKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [var.artifacts_kms_key_arn]
  }
}

data "aws_iam_policy_document" "secrets" {
  statement {
    sid       = "ReadMlflowSecrets"
    actions   = ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"]
    resources = concat([module.db.db_instance_master_user_secret_arn], [for s in aws_secretsmanager_secret.user : s.arn])
  }
  statement {
    sid       = "DecryptMlflowSecrets"
    actions   = ["kms:Decrypt"]
    resources = [module.kms.key_arn]
  }
}

module "server_role" {
  #checkov:skip=CKV_TF_1:Registry module pinned to an exact version; registry sources cannot name a commit hash.
  source  = "terraform-aws-modules/iam/aws//modules/iam-role-for-service-accounts"
  version = "6.8.0"

  name                    = "${var.name}-mlflow-server"
  policy_name             = "${var.name}-mlflow-artifacts"
  source_policy_documents = [data.aws_iam_policy_document.server.json]
  oidc_providers = {
    main = { provider_arn = var.oidc_provider_arn, namespace_service_accounts = ["${var.namespace}:mlflow"] }
  }

  tags = var.tags
}

module "secrets_role" {
  #checkov:skip=CKV_TF_1:Registry module pinned to an exact version; registry sources cannot name a commit hash.
  source  = "terraform-aws-modules/iam/aws//modules/iam-role-for-service-accounts"
  version = "6.8.0"

  name                    = "${var.name}-mlflow-secrets"
  policy_name             = "${var.name}-mlflow-secrets"
  source_policy_documents = [data.aws_iam_policy_document.secrets.json]
  oidc_providers = {
    main = { provider_arn = var.oidc_provider_arn, namespace_service_accounts = ["${var.namespace}:mlflow-secrets"] }
  }

  tags = var.tags
}

# ---------------------------------------------------------------------------------------------- Kubernetes

resource "kubernetes_namespace_v1" "this" {
  metadata {
    name   = var.namespace
    labels = { "pod-security.kubernetes.io/enforce" = "restricted" }
  }
}

resource "kubernetes_service_account_v1" "server" {
  metadata {
    name        = "mlflow"
    namespace   = kubernetes_namespace_v1.this.metadata[0].name
    annotations = { "eks.amazonaws.com/role-arn" = module.server_role.arn }
  }
  automount_service_account_token = false
}

resource "kubernetes_service_account_v1" "secrets" {
  metadata {
    name        = "mlflow-secrets"
    namespace   = kubernetes_namespace_v1.this.metadata[0].name
    annotations = { "eks.amazonaws.com/role-arn" = module.secrets_role.arn }
  }
  automount_service_account_token = false
}

locals {
  db_url = "postgresql://%s:%s@${module.db.db_instance_address}:${module.db.db_instance_port}/mlflow?sslmode=require"
  remote = {
    db_username      = { key = module.db.db_instance_master_user_secret_arn, property = "username" }
    db_password      = { key = module.db.db_instance_master_user_secret_arn, property = "password" }
    admin_username   = { key = aws_secretsmanager_secret.user["admin"].arn, property = "username" }
    admin_password   = { key = aws_secretsmanager_secret.user["admin"].arn, property = "password" }
    flask_secret_key = { key = aws_secretsmanager_secret.user["admin"].arn, property = "flask_secret_key" }
  }
}

resource "helm_release" "secrets" {
  name      = "mlflow-secrets"
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
        metadata   = { name = local.server_secret, namespace = var.namespace }
        spec = {
          refreshInterval = "1h"
          secretStoreRef  = { kind = "SecretStore", name = local.secret_store }
          target = {
            name = local.server_secret
            template = {
              engineVersion = "v2"
              data = {
                MLFLOW_BACKEND_STORE_URI       = format(local.db_url, "{{ .db_username | urlquery }}", "{{ .db_password | urlquery }}")
                MLFLOW_AUTH_ADMIN_USERNAME     = "{{ .admin_username }}"
                MLFLOW_AUTH_ADMIN_PASSWORD     = "{{ .admin_password }}"
                MLFLOW_FLASK_SERVER_SECRET_KEY = "{{ .flask_secret_key }}"
                # The auth app reads its database only from this file; configparser needs % doubled.
                "basic_auth.ini" = join("\n", [
                  "[mlflow]",
                  "default_permission = READ",
                  "database_uri = ${format(local.db_url, "{{ .db_username | urlquery | replace \"%\" \"%%\" }}", "{{ .db_password | urlquery | replace \"%\" \"%%\" }}")}",
                  "auth_cache_ttl_seconds = 60",
                  "",
                ])
              }
            }
          }
          data = [for key, ref in local.remote : { secretKey = key, remoteRef = ref }]
        }
      },
      {
        apiVersion = "external-secrets.io/v1"
        kind       = "ExternalSecret"
        metadata   = { name = local.jobs_secret, namespace = var.namespace }
        spec = {
          refreshInterval = "1h"
          secretStoreRef  = { kind = "SecretStore", name = local.secret_store }
          target = {
            name     = local.jobs_secret
            template = { engineVersion = "v2", data = { MLFLOW_USER_NAME = "{{ .username }}", MLFLOW_USER_PASSWORD = "{{ .password }}" } }
          }
          dataFrom = [{ extract = { key = aws_secretsmanager_secret.user["jobs"].arn } }]
        }
      },
    ]
  })]

  depends_on = [aws_secretsmanager_secret_version.user]
}

resource "kubernetes_deployment_v1" "server" {
  #checkov:skip=CKV_K8S_14:The image is a required variable, validated to be a pinned tag or digest (never latest).
  #checkov:skip=CKV_K8S_43:Digests are accepted and recommended (var.image); tags are allowed for dev builds.
  metadata {
    name      = "mlflow"
    namespace = kubernetes_namespace_v1.this.metadata[0].name
    labels    = local.app
    # RDS rotates the database password, credentials_version the users' ones; with Stakater Reloader installed the
    # pods restart on either synced Secret (and the init container writes the new passwords into the auth database).
    annotations = { "secret.reloader.stakater.com/reload" = "${local.server_secret},${local.jobs_secret}" }
  }

  spec {
    replicas = var.replicas
    selector {
      match_labels = local.app
    }

    template {
      metadata {
        labels      = local.app
        annotations = { "clipdr.io/sync-credentials" = substr(sha256(local.sync_py), 0, 8) } # a new script restarts
      }

      spec {
        service_account_name            = kubernetes_service_account_v1.server.metadata[0].name
        automount_service_account_token = false
        node_selector                   = local.system_pool

        security_context {
          run_as_non_root = local.pod_security.run_as_non_root
          run_as_user     = local.pod_security.run_as_user
          run_as_group    = local.pod_security.run_as_group
          seccomp_profile {
            type = "RuntimeDefault"
          }
        }

        # The auth app sets the admin's password on its first start only and ignores the secret afterwards: before
        # every start, write the current secrets (admin and jobs' user) into the auth database, so that bumping
        # credentials_version rotates them (files/sync-credentials.py; the local test runs it the same way).
        init_container {
          name              = "sync-credentials"
          image             = var.image
          image_pull_policy = "Always"
          command           = ["python", "/scripts/sync-credentials.py"]

          dynamic "env" {
            for_each = { HOME = "/tmp", MLFLOW_AUTH_CONFIG_PATH = "/etc/mlflow/basic_auth.ini", MLFLOW_DISABLE_TELEMETRY = "true" }
            content {
              name  = env.key
              value = env.value
            }
          }
          dynamic "env" {
            for_each = {
              MLFLOW_AUTH_ADMIN_USERNAME = [local.server_secret, "MLFLOW_AUTH_ADMIN_USERNAME"]
              MLFLOW_AUTH_ADMIN_PASSWORD = [local.server_secret, "MLFLOW_AUTH_ADMIN_PASSWORD"]
              MLFLOW_USER_NAME           = [local.jobs_secret, "MLFLOW_USER_NAME"]
              MLFLOW_USER_PASSWORD       = [local.jobs_secret, "MLFLOW_USER_PASSWORD"]
            }
            content {
              name = env.key
              value_from {
                secret_key_ref {
                  name = env.value[0]
                  key  = env.value[1]
                }
              }
            }
          }

          resources {
            requests = { cpu = "100m", memory = "256Mi" }
            limits   = { cpu = "1", memory = "512Mi" }
          }
          security_context {
            allow_privilege_escalation = false
            read_only_root_filesystem  = true
            capabilities {
              drop = ["ALL"]
            }
          }
          volume_mount {
            name       = "auth-config"
            mount_path = "/etc/mlflow"
            read_only  = true
          }
          volume_mount {
            name       = "scripts"
            mount_path = "/scripts"
            read_only  = true
          }
          volume_mount {
            name       = "tmp"
            mount_path = "/tmp"
          }
        }

        container {
          name              = "mlflow"
          image             = var.image
          image_pull_policy = "Always"
          args = [
            "server", "--host", "0.0.0.0", "--port", tostring(local.port), "--workers", tostring(var.workers),
            "--app-name", "basic-auth", "--serve-artifacts",
            "--artifacts-destination", "s3://${var.artifacts_bucket}/${var.artifacts_prefix}",
          ]

          dynamic "env" {
            for_each = {
              AWS_REGION                         = var.aws_region
              HOME                               = "/tmp"
              MLFLOW_AUTH_CONFIG_PATH            = "/etc/mlflow/basic_auth.ini"
              MLFLOW_DISABLE_TELEMETRY           = "true"
              MLFLOW_SERVER_ALLOWED_HOSTS        = local.allowed_hosts
              MLFLOW_SERVER_ENABLE_JOB_EXECUTION = "false"
            }
            content {
              name  = env.key
              value = env.value
            }
          }
          dynamic "env" {
            for_each = toset(["MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"])
            content {
              name = env.value
              value_from {
                secret_key_ref {
                  name = local.server_secret
                  key  = env.value
                }
              }
            }
          }

          port {
            name           = "http"
            container_port = local.port
          }
          readiness_probe {
            http_get {
              path = "/health"
              port = "http"
            }
            period_seconds = 10
          }
          liveness_probe {
            http_get {
              path = "/health"
              port = "http"
            }
            initial_delay_seconds = 60
            period_seconds        = 20
          }
          resources {
            requests = { cpu = "500m", memory = "1Gi" }
            limits   = { cpu = "2", memory = "2Gi" }
          }
          security_context {
            allow_privilege_escalation = false
            read_only_root_filesystem  = true
            capabilities {
              drop = ["ALL"]
            }
          }
          volume_mount {
            name       = "auth-config"
            mount_path = "/etc/mlflow"
            read_only  = true
          }
          volume_mount {
            name       = "tmp"
            mount_path = "/tmp"
          }
        }

        volume {
          name = "auth-config"
          secret {
            secret_name = local.server_secret
            items {
              key  = "basic_auth.ini"
              path = "basic_auth.ini"
            }
          }
        }
        volume {
          name = "scripts"
          config_map {
            name = kubernetes_config_map_v1.sync_credentials.metadata[0].name
          }
        }
        volume {
          name = "tmp"
          empty_dir {}
        }
      }
    }
  }

  depends_on = [helm_release.secrets]
}

resource "kubernetes_config_map_v1" "sync_credentials" {
  metadata {
    name      = "mlflow-sync-credentials"
    namespace = kubernetes_namespace_v1.this.metadata[0].name
  }
  data = { "sync-credentials.py" = local.sync_py }
}

resource "kubernetes_service_v1" "server" {
  metadata {
    name      = "mlflow"
    namespace = kubernetes_namespace_v1.this.metadata[0].name
    labels    = local.app
  }
  spec {
    selector = local.app
    port {
      name        = "http"
      port        = local.port
      target_port = "http"
    }
  }
}

# Creates the jobs' MLflow user (or resets its password) with the admin credentials, after every credential change.
resource "kubernetes_config_map_v1" "ensure_user" {
  metadata {
    name      = "mlflow-ensure-user"
    namespace = kubernetes_namespace_v1.this.metadata[0].name
  }
  data = { "ensure-user.sh" = local.ensure_user_sh }
}

resource "kubernetes_job_v1" "ensure_jobs_user" {
  metadata {
    name      = "mlflow-ensure-user-${var.credentials_version}-${substr(sha256(local.ensure_user_sh), 0, 8)}"
    namespace = kubernetes_namespace_v1.this.metadata[0].name
  }

  spec {
    backoff_limit = 10
    template {
      metadata {
        labels = { "app.kubernetes.io/name" = "mlflow-ensure-user" }
      }
      spec {
        restart_policy                  = "OnFailure"
        automount_service_account_token = false
        node_selector                   = local.system_pool

        security_context {
          run_as_non_root = local.pod_security.run_as_non_root
          run_as_user     = local.pod_security.run_as_user
          run_as_group    = local.pod_security.run_as_group
          seccomp_profile {
            type = "RuntimeDefault"
          }
        }

        container {
          name    = "ensure-user"
          image   = var.image
          command = ["sh", "/scripts/ensure-user.sh"]

          env {
            name  = "MLFLOW_TRACKING_URI"
            value = local.tracking_uri
          }
          dynamic "env" {
            for_each = {
              MLFLOW_TRACKING_USERNAME = [local.server_secret, "MLFLOW_AUTH_ADMIN_USERNAME"]
              MLFLOW_TRACKING_PASSWORD = [local.server_secret, "MLFLOW_AUTH_ADMIN_PASSWORD"]
              MLFLOW_USER_NAME         = [local.jobs_secret, "MLFLOW_USER_NAME"]
              MLFLOW_USER_PASSWORD     = [local.jobs_secret, "MLFLOW_USER_PASSWORD"]
            }
            content {
              name = env.key
              value_from {
                secret_key_ref {
                  name = env.value[0]
                  key  = env.value[1]
                }
              }
            }
          }

          resources {
            requests = { cpu = "50m", memory = "64Mi" }
            limits   = { memory = "128Mi" }
          }
          security_context {
            allow_privilege_escalation = false
            read_only_root_filesystem  = true
            capabilities {
              drop = ["ALL"]
            }
          }
          volume_mount {
            name       = "scripts"
            mount_path = "/scripts"
            read_only  = true
          }
          volume_mount {
            name       = "tmp"
            mount_path = "/tmp"
          }
        }

        volume {
          name = "scripts"
          config_map {
            name = kubernetes_config_map_v1.ensure_user.metadata[0].name
          }
        }
        volume {
          name = "tmp"
          empty_dir {}
        }
      }
    }
  }

  wait_for_completion = true
  timeouts {
    create = "10m"
  }

  depends_on = [kubernetes_deployment_v1.server, kubernetes_service_v1.server]
}
