variable "name" {
  description = "Prefix of the bucket names (<name>-<account id>-<purpose>) and of the KMS alias."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,18}[a-z0-9]$", var.name))
    error_message = "name must be 3-20 lowercase letters, digits or hyphens (bucket names are at most 63 characters)."
  }
}

variable "force_destroy" {
  description = "Let `terraform destroy` delete non-empty buckets. Leave false wherever the data matters."
  type        = bool
  default     = false
}

variable "noncurrent_version_expiration_days" {
  description = "Days an overwritten or deleted object version of the data and MLflow buckets stays recoverable."
  type        = number
  default     = 30

  validation {
    condition     = var.noncurrent_version_expiration_days >= 1 && var.noncurrent_version_expiration_days <= 365
    error_message = "noncurrent_version_expiration_days must be between 1 and 365."
  }
}

variable "checkpoint_expiration_days" {
  description = "Days after which checkpoint weights and optimiser state (objects over 1 MiB) expire; run state and other small files stay (registered models live in the MLflow bucket); 0 keeps them."
  type        = number
  default     = 90

  validation {
    condition     = var.checkpoint_expiration_days == 0 || var.checkpoint_expiration_days >= 7
    error_message = "checkpoint_expiration_days must be 0 (keep) or at least 7."
  }
}

variable "access_log_retention_days" {
  description = "Days S3 server access logs are kept."
  type        = number
  default     = 90

  validation {
    condition     = var.access_log_retention_days >= 1
    error_message = "access_log_retention_days must be at least 1."
  }
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}

variable "images_kept" {
  description = "Images kept per ECR repository; older ones expire."
  type        = number
  default     = 30

  validation {
    condition     = var.images_kept >= 5
    error_message = "images_kept must be at least 5 (a rollback needs the previous images)."
  }
}
