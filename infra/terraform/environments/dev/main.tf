# dev: small and cheap. Two zones, one NAT gateway, spot GPUs (g5/g6, one GPU a node) that scale to zero,
# a burstable single-AZ database, buckets that `terraform destroy` may empty. Cost note: infra/README.md.
locals {
  tags = { Project = "clipdr", Environment = "dev", ManagedBy = "terraform" }
}

module "stack" {
  source = "../../stack"

  name       = "clipdr-dev"
  aws_region = var.aws_region

  network = {
    az_count           = 2
    single_nat_gateway = true
  }

  cluster = {
    endpoint_public_access_cidrs = var.api_allowed_cidrs
    admin_principal_arns         = var.admin_principal_arns
    system_node_count            = { min = 2, max = 2, desired = 2 }
    gpu_instance_families        = ["g5", "g6"]
    gpu_capacity_types           = ["spot", "on-demand"]
    gpu_limit                    = 4
    cpu_limit                    = 64
  }

  storage = {
    force_destroy                      = true
    noncurrent_version_expiration_days = 7
    checkpoint_expiration_days         = 14
    access_log_retention_days          = 14
  }

  mlflow = {
    image                    = var.mlflow_image
    db_instance_class        = "db.t4g.micro"
    db_deletion_protection   = false
    db_backup_retention_days = 1
  }

  ray = {
    image       = var.image
    head        = { cpu = "2", memory = "8Gi" }
    cpu_workers = { min = 0, max = 4, cpu = "7", memory = "28Gi" }           # m7i.2xlarge-sized
    gpu_workers = { min = 0, max = 4, gpus = 1, cpu = "3", memory = "12Gi" } # g5.xlarge / g6.xlarge-sized
  }

  tags = local.tags
}
