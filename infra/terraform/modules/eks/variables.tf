variable "name" {
  description = "EKS cluster name; also the Karpenter discovery tag on its subnets and node security group."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}[a-z0-9]$", var.name))
    error_message = "name must be 3-32 lowercase letters, digits or hyphens, starting with a letter."
  }
}

variable "kubernetes_version" {
  description = "Kubernetes <major>.<minor> of the control plane. Upgrade one minor version at a time."
  type        = string
  default     = "1.34"

  validation {
    condition     = can(regex("^1\\.[0-9]{2}$", var.kubernetes_version))
    error_message = "kubernetes_version must look like 1.34."
  }
}

variable "vpc_id" {
  description = "VPC of the cluster."
  type        = string

  validation {
    condition     = startswith(var.vpc_id, "vpc-")
    error_message = "vpc_id must be a VPC ID (vpc-...)."
  }
}

variable "subnet_ids" {
  description = "Private subnets for the control plane ENIs and all nodes (tagged for Karpenter discovery)."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) >= 2 && alltrue([for s in var.subnet_ids : startswith(s, "subnet-")])
    error_message = "subnet_ids must hold at least two subnet IDs (subnet-...)."
  }
}

variable "endpoint_public_access_cidrs" {
  description = "CIDRs allowed to reach the public Kubernetes API endpoint (operators, CI). Empty: private endpoint only, so Terraform and kubectl must run inside the VPC."
  type        = list(string)

  validation {
    condition     = alltrue([for c in var.endpoint_public_access_cidrs : can(cidrhost(c, 0)) && c != "0.0.0.0/0"])
    error_message = "endpoint_public_access_cidrs must be valid CIDRs and must not contain 0.0.0.0/0."
  }
}

variable "admin_principal_arns" {
  description = "IAM roles or users given cluster-admin through EKS access entries (the identity running Terraform is added too)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for a in var.admin_principal_arns : can(regex("^arn:aws[a-z-]*:iam::[0-9]{12}:(role|user)/.+$", a))])
    error_message = "admin_principal_arns must be IAM role or user ARNs."
  }
}

variable "system_instance_types" {
  description = "Instance types of the managed node group that runs the controllers (Karpenter, KubeRay operator, External Secrets, MLflow)."
  type        = list(string)
  default     = ["m7i.large", "m6i.large"]

  validation {
    condition     = length(var.system_instance_types) > 0
    error_message = "system_instance_types must name at least one instance type."
  }
}

variable "system_node_count" {
  description = "Size of the system node group."
  type = object({
    min     = number
    max     = number
    desired = number
  })
  default = { min = 2, max = 3, desired = 2 }

  validation {
    condition     = var.system_node_count.min >= 1 && var.system_node_count.min <= var.system_node_count.desired && var.system_node_count.desired <= var.system_node_count.max
    error_message = "system_node_count needs 1 <= min <= desired <= max."
  }
}

variable "gpu_instance_families" {
  description = "EC2 instance families Karpenter may launch for GPU workers, e.g. g5 (A10G), g6 (L4), g6e (L40S), p4d (A100), p5 (H100)."
  type        = list(string)

  validation {
    condition     = length(var.gpu_instance_families) > 0 && alltrue([for f in var.gpu_instance_families : contains(["g5", "g6", "g6e", "p4d", "p4de", "p5", "p5e", "p5en"], f)])
    error_message = "gpu_instance_families must be a non-empty subset of g5, g6, g6e, p4d, p4de, p5, p5e, p5en."
  }
}

variable "gpu_capacity_types" {
  description = "Capacity types for GPU nodes; with both, Karpenter prefers spot and falls back to on-demand."
  type        = list(string)
  default     = ["on-demand"]

  validation {
    condition     = length(var.gpu_capacity_types) > 0 && alltrue([for c in var.gpu_capacity_types : contains(["spot", "on-demand"], c)])
    error_message = "gpu_capacity_types must be a non-empty subset of spot, on-demand."
  }
}

variable "gpu_limit" {
  description = "Most GPUs the GPU node pool may hold at once (a cost ceiling)."
  type        = number

  validation {
    condition     = var.gpu_limit >= 1 && floor(var.gpu_limit) == var.gpu_limit
    error_message = "gpu_limit must be a positive whole number."
  }
}

variable "cpu_instance_families" {
  description = "EC2 instance families for the Ray head and the CPU workers (Ray Data decoding, augmentation rendering)."
  type        = list(string)
  default     = ["m7i", "m6i", "c7i", "r7i"]

  validation {
    condition     = length(var.cpu_instance_families) > 0 && alltrue([for f in var.cpu_instance_families : can(regex("^[a-z]+[0-9][a-z]*$", f))])
    error_message = "cpu_instance_families must be a non-empty list of instance families such as m7i."
  }
}

variable "cpu_capacity_types" {
  description = "Capacity types for CPU nodes. Must include on-demand: the Ray head is pinned to on-demand capacity."
  type        = list(string)
  default     = ["spot", "on-demand"]

  validation {
    condition     = contains(var.cpu_capacity_types, "on-demand") && alltrue([for c in var.cpu_capacity_types : contains(["spot", "on-demand"], c)])
    error_message = "cpu_capacity_types must be a subset of spot, on-demand that includes on-demand."
  }
}

variable "cpu_limit" {
  description = "Most vCPUs the CPU node pool may hold at once."
  type        = number
  default     = 256

  validation {
    condition     = var.cpu_limit >= 8
    error_message = "cpu_limit must be at least 8."
  }
}

variable "node_ami_alias" {
  description = "Karpenter AMI alias for Ray nodes. AL2023 resolves to the NVIDIA-accelerated variant on GPU instances. Pin a version (al2023@v20251120) in production so nodes change only when you say so."
  type        = string
  default     = "al2023@latest"

  validation {
    condition     = can(regex("^(al2023|bottlerocket)@(latest|v[0-9]+(\\.[0-9]+)*)$", var.node_ami_alias))
    error_message = "node_ami_alias must look like al2023@latest, al2023@v20251120 or bottlerocket@v1.40.0."
  }
}

variable "tags" {
  description = "Tags added to every AWS resource."
  type        = map(string)
  default     = {}
}
