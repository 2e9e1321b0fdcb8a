variable "name" {
  description = "Prefix of the AWS resources (database identifier, secrets, roles)."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}[a-z0-9]$", var.name))
    error_message = "name must be 3-32 lowercase letters, digits or hyphens, starting with a letter."
  }
}

variable "namespace" {
  description = "Kubernetes namespace of the MLflow server."
  type        = string
  default     = "mlflow"

  validation {
    condition     = can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", var.namespace))
    error_message = "namespace must be a valid Kubernetes namespace name."
  }
}

variable "aws_region" {
  description = "Region of the Secrets Manager secrets and the artifact bucket."
  type        = string

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.aws_region))
    error_message = "aws_region must be an AWS region name such as us-east-1."
  }
}

variable "vpc_id" {
  description = "VPC of the database."
  type        = string

  validation {
    condition     = startswith(var.vpc_id, "vpc-")
    error_message = "vpc_id must be a VPC ID (vpc-...)."
  }
}

variable "database_subnet_group_name" {
  description = "DB subnet group (private database subnets) for the RDS instance."
  type        = string

  validation {
    condition     = length(var.database_subnet_group_name) > 0
    error_message = "database_subnet_group_name must not be empty."
  }
}

variable "node_security_group_id" {
  description = "Security group of the EKS nodes; the only source allowed to reach PostgreSQL."
  type        = string

  validation {
    condition     = startswith(var.node_security_group_id, "sg-")
    error_message = "node_security_group_id must be a security group ID (sg-...)."
  }
}

variable "oidc_provider_arn" {
  description = "IAM OIDC provider of the EKS cluster, for IRSA."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:iam::[0-9]{12}:oidc-provider/.+$", var.oidc_provider_arn))
    error_message = "oidc_provider_arn must be an IAM OIDC provider ARN."
  }
}

variable "artifacts_bucket" {
  description = "Name of the bucket holding MLflow artifacts and registered models."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.artifacts_bucket))
    error_message = "artifacts_bucket must be an S3 bucket name."
  }
}

variable "artifacts_prefix" {
  description = "Key prefix of the artifacts inside the bucket (no slashes at either end)."
  type        = string
  default     = "artifacts"

  validation {
    condition     = can(regex("^[a-zA-Z0-9_-]+(/[a-zA-Z0-9_-]+)*$", var.artifacts_prefix))
    error_message = "artifacts_prefix must be a key prefix like artifacts or mlflow/artifacts."
  }
}

variable "artifacts_kms_key_arn" {
  description = "KMS key encrypting the artifact bucket."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:kms:", var.artifacts_kms_key_arn))
    error_message = "artifacts_kms_key_arn must be a KMS key ARN."
  }
}

variable "image" {
  description = "MLflow server image (docker/Dockerfile, target mlflow-server: mlflow, psycopg, boto3, curl), by tag or digest."
  type        = string

  validation {
    condition     = can(regex("^[^:@]+(:[A-Za-z0-9_.-]+)?(@sha256:[a-f0-9]{64})?$", var.image)) && !endswith(var.image, ":latest") && (strcontains(var.image, ":") || strcontains(var.image, "@"))
    error_message = "image must name a pinned tag or digest (not :latest)."
  }
}

variable "replicas" {
  description = "MLflow server pods."
  type        = number
  default     = 1

  validation {
    condition     = var.replicas >= 1 && var.replicas <= 5
    error_message = "replicas must be between 1 and 5."
  }
}

variable "workers" {
  description = "uvicorn worker processes per MLflow pod."
  type        = number
  default     = 2

  validation {
    condition     = var.workers >= 1 && var.workers <= 16
    error_message = "workers must be between 1 and 16."
  }
}

variable "jobs_username" {
  description = "MLflow user the Ray jobs log as (created by a bootstrap Job; not an admin)."
  type        = string
  default     = "ray-jobs"

  validation {
    condition     = can(regex("^[a-z][a-z0-9_-]{2,31}$", var.jobs_username))
    error_message = "jobs_username must be 3-32 lowercase letters, digits, underscores or hyphens."
  }
}

variable "credentials_version" {
  description = "Bump to generate and store new MLflow admin/jobs passwords (they are written to Secrets Manager, never to the state)."
  type        = number
  default     = 1

  validation {
    condition     = var.credentials_version >= 1 && floor(var.credentials_version) == var.credentials_version
    error_message = "credentials_version must be a positive whole number."
  }
}

variable "postgres_version" {
  description = "Major PostgreSQL version of the RDS instance."
  type        = string
  default     = "17"

  validation {
    condition     = contains(["15", "16", "17"], var.postgres_version)
    error_message = "postgres_version must be 15, 16 or 17."
  }
}

variable "db_instance_class" {
  description = "RDS instance class."
  type        = string
  default     = "db.t4g.small"

  validation {
    condition     = startswith(var.db_instance_class, "db.")
    error_message = "db_instance_class must be an RDS instance class (db.*)."
  }
}

variable "db_allocated_storage" {
  description = "Initial storage of the database in GiB."
  type        = number
  default     = 20

  validation {
    condition     = var.db_allocated_storage >= 20 && var.db_allocated_storage <= 1000
    error_message = "db_allocated_storage must be between 20 and 1000 GiB."
  }
}

variable "db_max_allocated_storage" {
  description = "Storage autoscaling ceiling in GiB."
  type        = number
  default     = 100

  validation {
    condition     = var.db_max_allocated_storage >= 20
    error_message = "db_max_allocated_storage must be at least 20 GiB."
  }
}

variable "db_multi_az" {
  description = "Synchronous standby in a second zone."
  type        = bool
  default     = false
}

variable "db_deletion_protection" {
  description = "Refuse to delete the database; also takes a final snapshot on deletion when true."
  type        = bool
  default     = true
}

variable "db_backup_retention_days" {
  description = "Days of automated backups (point-in-time recovery window)."
  type        = number
  default     = 7

  validation {
    condition     = var.db_backup_retention_days >= 1 && var.db_backup_retention_days <= 35
    error_message = "db_backup_retention_days must be between 1 and 35."
  }
}

variable "tags" {
  description = "Tags added to every AWS resource."
  type        = map(string)
  default     = {}
}
