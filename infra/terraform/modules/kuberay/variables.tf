variable "name" {
  description = "Prefix of the IAM roles."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}[a-z0-9]$", var.name))
    error_message = "name must be 3-32 lowercase letters, digits or hyphens, starting with a letter."
  }
}

variable "namespace" {
  description = "Namespace of the RayCluster, the RayJobs and their service account."
  type        = string
  default     = "ray"

  validation {
    condition     = can(regex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", var.namespace))
    error_message = "namespace must be a valid Kubernetes namespace name."
  }
}

variable "ray_cluster_name" {
  description = "Name of the long-lived RayCluster that `ray job submit` targets; its head service is <name>-head-svc."
  type        = string
  default     = "clipdr"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,30}[a-z0-9]$", var.ray_cluster_name))
    error_message = "ray_cluster_name must be 2-32 lowercase letters, digits or hyphens."
  }
}

variable "aws_region" {
  description = "Region the jobs' S3 and Secrets Manager clients use."
  type        = string

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.aws_region))
    error_message = "aws_region must be an AWS region name such as us-east-1."
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

variable "image" {
  description = "The clipdr image (docker/Dockerfile, target runtime) for every Ray container, by tag or digest."
  type        = string

  validation {
    condition     = !endswith(var.image, ":latest") && (strcontains(var.image, ":") || strcontains(var.image, "@sha256:"))
    error_message = "image must name a pinned tag or digest (not :latest)."
  }
}

variable "ray_version" {
  description = "Ray version inside the image (KubeRay needs it for token authentication and autoscaling)."
  type        = string
  default     = "2.60.0"

  validation {
    condition     = can(regex("^2\\.[0-9]+\\.[0-9]+$", var.ray_version))
    error_message = "ray_version must look like 2.60.0."
  }
}

variable "data_bucket" {
  description = "Bucket with the source/, eval/ (read) and reinforced/ (read-write) prefixes."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.data_bucket))
    error_message = "data_bucket must be an S3 bucket name."
  }
}

variable "checkpoints_bucket" {
  description = "Bucket whose runs/ prefix holds Ray Train checkpoints (read-write)."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.checkpoints_bucket))
    error_message = "checkpoints_bucket must be an S3 bucket name."
  }
}

variable "s3_kms_key_arn" {
  description = "KMS key encrypting both buckets."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:kms:", var.s3_kms_key_arn))
    error_message = "s3_kms_key_arn must be a KMS key ARN."
  }
}

variable "mlflow_tracking_uri" {
  description = "In-cluster MLflow URI the jobs log to."
  type        = string

  validation {
    condition     = can(regex("^https?://", var.mlflow_tracking_uri))
    error_message = "mlflow_tracking_uri must be an http(s) URL."
  }
}

variable "mlflow_credentials_secret_arn" {
  description = "Secrets Manager secret ({username, password}) of the MLflow user the jobs log as."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:secretsmanager:", var.mlflow_credentials_secret_arn))
    error_message = "mlflow_credentials_secret_arn must be a Secrets Manager ARN."
  }
}

variable "secrets_kms_key_arn" {
  description = "KMS key encrypting mlflow_credentials_secret_arn."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:kms:", var.secrets_kms_key_arn))
    error_message = "secrets_kms_key_arn must be a KMS key ARN."
  }
}

variable "job_env" {
  description = "Extra environment of every Ray container (storage URIs the jobs are pointed at)."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for k in keys(var.job_env) : can(regex("^[A-Z][A-Z0-9_]*$", k))])
    error_message = "job_env keys must be upper-case environment variable names."
  }
}

variable "head" {
  description = "Ray head pod (no Ray tasks run on it: num-cpus 0)."
  type = object({
    cpu    = string
    memory = string
  })
  default = { cpu = "4", memory = "16Gi" }

  validation {
    condition     = can(regex("^[0-9]+(\\.[0-9]+|m)?$", var.head.cpu)) && can(regex("^[0-9]+(Mi|Gi)$", var.head.memory))
    error_message = "head needs a Kubernetes CPU quantity (4, 3.5, 500m) and a memory quantity in Mi or Gi."
  }
}

variable "cpu_workers" {
  description = "CPU worker group (Ray Data: decoding, view rendering, tokenisation); the autoscaler moves between min and max."
  type = object({
    min    = number
    max    = number
    cpu    = string
    memory = string
  })
  default = { min = 0, max = 8, cpu = "15", memory = "56Gi" }

  validation {
    condition     = var.cpu_workers.min >= 0 && var.cpu_workers.min <= var.cpu_workers.max && can(regex("^[0-9]+(Mi|Gi)$", var.cpu_workers.memory))
    error_message = "cpu_workers needs 0 <= min <= max and a memory quantity in Mi or Gi."
  }
}

variable "gpu_workers" {
  description = "GPU worker group (teachers, captioner, Ray Train ranks): GPUs, CPUs and memory per pod; size them to fill a node of the chosen family."
  type = object({
    min    = number
    max    = number
    gpus   = number
    cpu    = string
    memory = string
  })

  validation {
    condition     = var.gpu_workers.min >= 0 && var.gpu_workers.min <= var.gpu_workers.max && contains([1, 2, 4, 8], var.gpu_workers.gpus) && can(regex("^[0-9]+(Mi|Gi)$", var.gpu_workers.memory))
    error_message = "gpu_workers needs 0 <= min <= max, gpus in 1, 2, 4, 8 and a memory quantity in Mi or Gi."
  }
}

variable "tags" {
  description = "Tags added to every AWS resource."
  type        = map(string)
  default     = {}
}
