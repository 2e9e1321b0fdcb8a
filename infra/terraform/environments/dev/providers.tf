provider "aws" {
  region = var.aws_region

  default_tags {
    tags = local.tags
  }
}

locals {
  cluster_auth = {
    host                   = module.stack.cluster_endpoint
    cluster_ca_certificate = base64decode(module.stack.cluster_certificate_authority_data)
    exec = {
      api_version = "client.authentication.k8s.io/v1beta1"
      command     = "aws"
      args        = ["eks", "get-token", "--cluster-name", module.stack.cluster_name, "--region", var.aws_region]
    }
  }
}

provider "kubernetes" {
  host                   = local.cluster_auth.host
  cluster_ca_certificate = local.cluster_auth.cluster_ca_certificate

  exec {
    api_version = local.cluster_auth.exec.api_version
    command     = local.cluster_auth.exec.command
    args        = local.cluster_auth.exec.args
  }
}

provider "helm" {
  kubernetes = local.cluster_auth
}
