data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

locals {
  prefix = "${var.name}-${data.aws_caller_identity.current.account_id}"
  # One bucket per lifecycle: data holds source/, reinforced/ and eval/ prefixes; checkpoints are transient;
  # mlflow holds run artifacts and registered models.
  buckets = {
    data        = { noncurrent_days = var.noncurrent_version_expiration_days, expiration_days = 0 }
    checkpoints = { noncurrent_days = 1, expiration_days = var.checkpoint_expiration_days }
    mlflow      = { noncurrent_days = var.noncurrent_version_expiration_days, expiration_days = 0 }
  }
  # Objects above this size expire after expiration_days; smaller ones (run state, checkpoint metadata) never do.
  expire_above_bytes = 1048576
}

module "kms" {
  #checkov:skip=CKV_TF_1:Registry module pinned to an exact version; registry sources cannot name a commit hash.
  source  = "terraform-aws-modules/kms/aws"
  version = "4.2.2"

  description             = "${var.name}: S3 data, checkpoints and MLflow artifacts"
  aliases                 = ["${var.name}/s3"]
  enable_key_rotation     = true
  deletion_window_in_days = 30

  tags = var.tags
}

module "bucket" {
  #checkov:skip=CKV_TF_1:Registry module pinned to an exact version; registry sources cannot name a commit hash.
  source   = "terraform-aws-modules/s3-bucket/aws"
  version  = "5.16.1"
  for_each = local.buckets

  bucket        = "${local.prefix}-${each.key}"
  force_destroy = var.force_destroy

  versioning = { enabled = true }
  server_side_encryption_configuration = {
    rule = {
      apply_server_side_encryption_by_default = {
        sse_algorithm     = "aws:kms"
        kms_master_key_id = module.kms.key_arn
      }
      # A bucket key cuts KMS requests (and their cost) by orders of magnitude for millions of shard objects.
      bucket_key_enabled = true
    }
  }
  attach_deny_incorrect_kms_key_sse = true
  allowed_kms_key_arn               = module.kms.key_arn

  block_public_acls        = true
  block_public_policy      = true
  ignore_public_acls       = true
  restrict_public_buckets  = true
  control_object_ownership = true
  object_ownership         = "BucketOwnerEnforced"

  attach_deny_insecure_transport_policy = true
  attach_require_latest_tls_policy      = true

  logging = {
    target_bucket = module.access_logs.s3_bucket_id
    target_prefix = "${each.key}/"
  }

  lifecycle_rule = [
    {
      id                                     = "housekeeping"
      enabled                                = true
      abort_incomplete_multipart_upload_days = 7
      noncurrent_version_expiration          = { days = each.value.noncurrent_days }
    },
    # Expiry of current objects (checkpoints only). The run state a resubmission needs (clipdr_run.json,
    # clipdr_result.json: a few KiB, clipdr.runstate) lives beside the checkpoints under runs/<run_name>/, and S3
    # filters cannot exclude a key: the size filter expires the weights and optimiser state (megabytes and up)
    # and keeps every small file. Disabled where expiration_days is 0.
    {
      id         = "expire-checkpoint-payloads"
      enabled    = each.value.expiration_days > 0
      filter     = { object_size_greater_than = local.expire_above_bytes }
      expiration = { days = max(each.value.expiration_days, 1) }
    },
  ]

  tags = var.tags
}

module "access_logs" {
  #checkov:skip=CKV_TF_1:Registry module pinned to an exact version; registry sources cannot name a commit hash.
  source  = "terraform-aws-modules/s3-bucket/aws"
  version = "5.16.1"

  bucket        = "${local.prefix}-access-logs"
  force_destroy = var.force_destroy

  # S3 server access logging cannot deliver to buckets encrypted with SSE-KMS.
  server_side_encryption_configuration = {
    rule = {
      apply_server_side_encryption_by_default = { sse_algorithm = "AES256" }
    }
  }
  versioning = { enabled = true }

  block_public_acls        = true
  block_public_policy      = true
  ignore_public_acls       = true
  restrict_public_buckets  = true
  control_object_ownership = true
  object_ownership         = "BucketOwnerEnforced"

  attach_deny_insecure_transport_policy      = true
  attach_require_latest_tls_policy           = true
  attach_access_log_delivery_policy          = true
  access_log_delivery_policy_source_accounts = [data.aws_caller_identity.current.account_id]
  access_log_delivery_policy_source_buckets  = [for purpose in keys(local.buckets) : "arn:${data.aws_partition.current.partition}:s3:::${local.prefix}-${purpose}"]

  lifecycle_rule = [
    {
      id                                     = "expire-logs"
      enabled                                = true
      abort_incomplete_multipart_upload_days = 1
      expiration                             = { days = var.access_log_retention_days }
      noncurrent_version_expiration          = { days = 1 }
    }
  ]

  tags = var.tags
}

# Images of the Ray pods and the MLflow server: immutable tags (the deployments pin them), scanned on push.
resource "aws_ecr_repository" "image" {
  for_each = toset(["clipdr", "clipdr-mlflow"])

  name                 = "${var.name}/${each.key}"
  image_tag_mutability = "IMMUTABLE"
  force_delete         = var.force_destroy

  image_scanning_configuration {
    scan_on_push = true
  }
  encryption_configuration {
    encryption_type = "KMS"
    kms_key         = module.kms.key_arn
  }

  tags = var.tags
}

resource "aws_ecr_lifecycle_policy" "image" {
  for_each   = aws_ecr_repository.image
  repository = each.value.name

  policy = jsonencode({
    rules = [{
      rulePriority = 1
      description  = "Keep the newest ${var.images_kept} images"
      selection    = { tagStatus = "any", countType = "imageCountMoreThan", countNumber = var.images_kept }
      action       = { type = "expire" }
    }]
  })
}
