variable "name" {
  description = "Name of the VPC and prefix of its resources; also the Karpenter discovery tag value (the EKS cluster name)."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}[a-z0-9]$", var.name))
    error_message = "name must be 3-32 lowercase letters, digits or hyphens, starting with a letter."
  }
}

variable "cidr" {
  description = "IPv4 CIDR of the VPC. A /16: private subnets are /19s so that pods (VPC CNI) get enough addresses."
  type        = string
  default     = "10.0.0.0/16"

  validation {
    condition     = can(cidrhost(var.cidr, 0)) && endswith(var.cidr, "/16")
    error_message = "cidr must be a valid IPv4 /16 block, e.g. 10.0.0.0/16."
  }
}

variable "az_count" {
  description = "Number of availability zones to spread subnets over."
  type        = number
  default     = 3

  validation {
    condition     = var.az_count >= 2 && var.az_count <= 4
    error_message = "az_count must be between 2 and 4 (EKS and RDS need at least two zones)."
  }
}

variable "single_nat_gateway" {
  description = "One NAT gateway for all zones (cheaper, one zone's outage cuts egress) instead of one per zone."
  type        = bool
  default     = false
}

variable "interface_endpoints" {
  description = "AWS services reached through interface VPC endpoints instead of the NAT gateway (S3 always has a free gateway endpoint). ECR endpoints keep multi-GB image pulls off NAT data processing."
  type        = set(string)
  default     = []

  validation {
    condition     = alltrue([for s in var.interface_endpoints : contains(["ecr.api", "ecr.dkr", "sts", "secretsmanager", "logs", "ec2", "sqs"], s)])
    error_message = "interface_endpoints may contain: ecr.api, ecr.dkr, sts, secretsmanager, logs, ec2, sqs."
  }
}

variable "flow_log_retention_days" {
  description = "Retention of the VPC flow logs in CloudWatch Logs, in days."
  type        = number
  default     = 30

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 3653], var.flow_log_retention_days)
    error_message = "flow_log_retention_days must be a retention period CloudWatch Logs accepts (1, 3, 5, 7, 14, 30, 60, 90, ...)."
  }
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
