terraform {
  required_version = ">= 1.11, < 2.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 6.21"
    }
    helm = {
      source  = "hashicorp/helm"
      version = "~> 3.1"
    }
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = "~> 2.38"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.7"
    }
  }

  # Remote state in S3 with native locking; bucket, key and region come from backend.hcl
  # (terraform init -backend-config=backend.hcl), so no account-specific name lives in code.
  backend "s3" {
    encrypt      = true
    use_lockfile = true
  }
}
