# prod: three zones with a NAT gateway each, ECR/STS interface endpoints (image pulls stay off NAT), on-demand
# A100/H100 nodes (8 GPUs a pod), a Multi-AZ database with deletion protection. Cost note: infra/README.md.
locals {
  tags = { Project = "clipdr", Environment = "prod", ManagedBy = "terraform" }
}

module "stack" {
  source = "../../stack"

  name       = "clipdr-prod"
  aws_region = var.aws_region

  network = {
    az_count            = 3
    single_nat_gateway  = false
    interface_endpoints = ["ecr.api", "ecr.dkr", "sts"]
  }

  cluster = {
    endpoint_public_access_cidrs = var.api_allowed_cidrs
    admin_principal_arns         = var.admin_principal_arns
    system_instance_types        = ["m7i.xlarge", "m6i.xlarge"]
    system_node_count            = { min = 3, max = 4, desired = 3 }
    gpu_instance_families        = ["p4d", "p5"]
    gpu_capacity_types           = ["on-demand"]
    gpu_limit                    = 32
    cpu_limit                    = 512
  }

  storage = {
    force_destroy                      = false
    noncurrent_version_expiration_days = 30
    checkpoint_expiration_days         = 90
    access_log_retention_days          = 365
  }

  mlflow = {
    image                    = var.mlflow_image
    replicas                 = 2
    workers                  = 4
    db_instance_class        = "db.m7g.large"
    db_allocated_storage     = 50
    db_max_allocated_storage = 500
    db_multi_az              = true
    db_deletion_protection   = true
    db_backup_retention_days = 14
  }

  ray = {
    image       = var.image
    head        = { cpu = "7", memory = "28Gi" }
    cpu_workers = { min = 0, max = 16, cpu = "31", memory = "120Gi" }           # m7i.8xlarge-sized
    gpu_workers = { min = 0, max = 4, gpus = 8, cpu = "90", memory = "1000Gi" } # p4d.24xlarge / p5.48xlarge-sized
  }

  tags = local.tags
}
