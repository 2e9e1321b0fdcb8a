variable "aws_region" {
  description = "AWS region to deploy into."
  type        = string
  default     = "us-east-1"

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.aws_region))
    error_message = "aws_region must be an AWS region name such as us-east-1."
  }
}

variable "admin_principal_arns" {
  description = "IAM roles or users that administer the cluster (kubectl, port-forwards)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for a in var.admin_principal_arns : can(regex("^arn:aws[a-z-]*:iam::[0-9]{12}:(role|user)/.+$", a))])
    error_message = "admin_principal_arns must be IAM role or user ARNs."
  }
}

variable "api_allowed_cidrs" {
  description = "CIDRs allowed to reach the public Kubernetes API (where Terraform and kubectl run). Empty: private endpoint only."
  type        = list(string)

  validation {
    condition     = alltrue([for c in var.api_allowed_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "api_allowed_cidrs must be valid CIDRs and must not contain 0.0.0.0/0."
  }
}

variable "image" {
  description = "clipdr image for the Ray pods (docker/Dockerfile, target runtime), e.g. <registry>/clipdr:<git sha>."
  type        = string

  validation {
    condition     = !endswith(var.image, ":latest") && (strcontains(var.image, ":") || strcontains(var.image, "@sha256:"))
    error_message = "image must name a pinned tag or digest (not :latest)."
  }
}

variable "mlflow_image" {
  description = "MLflow server image (docker/Dockerfile, target mlflow-server), e.g. <registry>/clipdr-mlflow:<git sha>."
  type        = string

  validation {
    condition     = !endswith(var.mlflow_image, ":latest") && (strcontains(var.mlflow_image, ":") || strcontains(var.mlflow_image, "@sha256:"))
    error_message = "mlflow_image must name a pinned tag or digest (not :latest)."
  }
}
