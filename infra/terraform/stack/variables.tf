variable "name" {
  description = "Name of the deployment: EKS cluster, VPC, and the prefix of every resource (e.g. clipdr-dev)."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,18}[a-z0-9]$", var.name))
    error_message = "name must be 3-20 lowercase letters, digits or hyphens, starting with a letter."
  }
}

variable "aws_region" {
  description = "AWS region of the deployment (the provider's region)."
  type        = string

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.aws_region))
    error_message = "aws_region must be an AWS region name such as us-east-1."
  }
}

variable "network" {
  description = "VPC layout: /16 CIDR, zones, NAT gateways, interface endpoints."
  type = object({
    cidr                = optional(string, "10.0.0.0/16")
    az_count            = optional(number, 3)
    single_nat_gateway  = optional(bool, false)
    interface_endpoints = optional(set(string), [])
  })
  default = {}
}

variable "cluster" {
  description = "EKS control plane, system nodes and the Karpenter node pools for Ray (see modules/eks for each field)."
  type = object({
    kubernetes_version           = optional(string, "1.34")
    endpoint_public_access_cidrs = list(string)
    admin_principal_arns         = optional(list(string), [])
    system_instance_types        = optional(list(string), ["m7i.large", "m6i.large"])
    system_node_count            = optional(object({ min = number, max = number, desired = number }), { min = 2, max = 3, desired = 2 })
    gpu_instance_families        = list(string)
    gpu_capacity_types           = optional(list(string), ["on-demand"])
    gpu_limit                    = number
    cpu_instance_families        = optional(list(string), ["m7i", "m6i", "c7i", "r7i"])
    cpu_capacity_types           = optional(list(string), ["spot", "on-demand"])
    cpu_limit                    = optional(number, 256)
    node_ami_alias               = optional(string, "al2023@latest")
  })
}

variable "storage" {
  description = "Bucket lifecycle: force_destroy, how long old versions, checkpoints and access logs are kept."
  type = object({
    force_destroy                      = optional(bool, false)
    noncurrent_version_expiration_days = optional(number, 30)
    checkpoint_expiration_days         = optional(number, 90)
    access_log_retention_days          = optional(number, 90)
  })
  default = {}
}

variable "mlflow" {
  description = "MLflow server image and size, and its PostgreSQL instance (see modules/mlflow for each field)."
  type = object({
    image                    = string
    replicas                 = optional(number, 1)
    workers                  = optional(number, 2)
    credentials_version      = optional(number, 1)
    postgres_version         = optional(string, "17")
    db_instance_class        = optional(string, "db.t4g.small")
    db_allocated_storage     = optional(number, 20)
    db_max_allocated_storage = optional(number, 100)
    db_multi_az              = optional(bool, false)
    db_deletion_protection   = optional(bool, true)
    db_backup_retention_days = optional(number, 7)
  })
}

variable "ray" {
  description = "The clipdr image and the long-lived RayCluster's head and worker groups (see modules/kuberay)."
  type = object({
    image       = string
    head        = optional(object({ cpu = string, memory = string }), { cpu = "4", memory = "16Gi" })
    cpu_workers = optional(object({ min = number, max = number, cpu = string, memory = string }), { min = 0, max = 8, cpu = "15", memory = "56Gi" })
    gpu_workers = object({ min = number, max = number, gpus = number, cpu = string, memory = string })
  })
}

variable "tags" {
  description = "Tags added to every AWS resource (the environment adds Project, Environment and ManagedBy)."
  type        = map(string)
  default     = {}
}
