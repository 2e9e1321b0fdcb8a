module "network" {
  source = "../modules/network"

  name                = var.name
  cidr                = var.network.cidr
  az_count            = var.network.az_count
  single_nat_gateway  = var.network.single_nat_gateway
  interface_endpoints = var.network.interface_endpoints
  tags                = var.tags
}

module "storage" {
  source = "../modules/storage"

  name                               = var.name
  force_destroy                      = var.storage.force_destroy
  noncurrent_version_expiration_days = var.storage.noncurrent_version_expiration_days
  checkpoint_expiration_days         = var.storage.checkpoint_expiration_days
  access_log_retention_days          = var.storage.access_log_retention_days
  tags                               = var.tags
}

module "eks" {
  source = "../modules/eks"

  name                         = var.name
  vpc_id                       = module.network.vpc_id
  subnet_ids                   = module.network.private_subnet_ids
  kubernetes_version           = var.cluster.kubernetes_version
  endpoint_public_access_cidrs = var.cluster.endpoint_public_access_cidrs
  admin_principal_arns         = var.cluster.admin_principal_arns
  system_instance_types        = var.cluster.system_instance_types
  system_node_count            = var.cluster.system_node_count
  gpu_instance_families        = var.cluster.gpu_instance_families
  gpu_capacity_types           = var.cluster.gpu_capacity_types
  gpu_limit                    = var.cluster.gpu_limit
  cpu_instance_families        = var.cluster.cpu_instance_families
  cpu_capacity_types           = var.cluster.cpu_capacity_types
  cpu_limit                    = var.cluster.cpu_limit
  node_ami_alias               = var.cluster.node_ami_alias
  tags                         = var.tags
}

module "mlflow" {
  source = "../modules/mlflow"

  name                       = var.name
  aws_region                 = var.aws_region
  vpc_id                     = module.network.vpc_id
  database_subnet_group_name = module.network.database_subnet_group_name
  node_security_group_id     = module.eks.node_security_group_id
  oidc_provider_arn          = module.eks.oidc_provider_arn
  artifacts_bucket           = module.storage.buckets["mlflow"].name
  artifacts_kms_key_arn      = module.storage.kms_key_arn
  image                      = var.mlflow.image
  replicas                   = var.mlflow.replicas
  workers                    = var.mlflow.workers
  credentials_version        = var.mlflow.credentials_version
  postgres_version           = var.mlflow.postgres_version
  db_instance_class          = var.mlflow.db_instance_class
  db_allocated_storage       = var.mlflow.db_allocated_storage
  db_max_allocated_storage   = var.mlflow.db_max_allocated_storage
  db_multi_az                = var.mlflow.db_multi_az
  db_deletion_protection     = var.mlflow.db_deletion_protection
  db_backup_retention_days   = var.mlflow.db_backup_retention_days
  tags                       = var.tags

  depends_on = [module.eks] # External Secrets CRDs and the system nodes
}

module "kuberay" {
  source = "../modules/kuberay"

  name                          = var.name
  aws_region                    = var.aws_region
  oidc_provider_arn             = module.eks.oidc_provider_arn
  image                         = var.ray.image
  data_bucket                   = module.storage.buckets["data"].name
  checkpoints_bucket            = module.storage.buckets["checkpoints"].name
  s3_kms_key_arn                = module.storage.kms_key_arn
  mlflow_tracking_uri           = module.mlflow.tracking_uri
  mlflow_credentials_secret_arn = module.mlflow.jobs_credentials_secret_arn
  secrets_kms_key_arn           = module.mlflow.secrets_kms_key_arn
  job_env                       = local.job_env
  head                          = var.ray.head
  cpu_workers                   = var.ray.cpu_workers
  gpu_workers                   = var.ray.gpu_workers
  tags                          = var.tags

  depends_on = [module.eks] # Karpenter node pools, External Secrets CRDs
}

locals {
  # What the jobs read from their environment; also what infra/k8s/rayjob-*.yaml expect when rendered with envsubst.
  job_env = {
    CLIPDR_SOURCE_URI      = module.storage.uris.source
    CLIPDR_REINFORCED_URI  = module.storage.uris.reinforced
    CLIPDR_EVAL_URI        = module.storage.uris.eval
    CLIPDR_CHECKPOINTS_URI = module.storage.uris.checkpoints
  }
}
