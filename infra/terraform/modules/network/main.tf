data "aws_availability_zones" "available" {
  #checkov:skip=CKV_AWS_394:Only the first az_count zones are used (slice below); a zone added later sorts after them.
  filter {
    name   = "opt-in-status"
    values = ["opt-in-not-required"]
  }
}

locals {
  azs = slice(data.aws_availability_zones.available.names, 0, var.az_count)
}

module "vpc" {
  #checkov:skip=CKV_TF_1:Registry module pinned to an exact version; registry sources cannot name a commit hash.
  source  = "terraform-aws-modules/vpc/aws"
  version = "6.6.1"

  name = var.name
  cidr = var.cidr
  azs  = local.azs

  # /19 private subnets for nodes and pods; small public subnets hold only NAT gateways and load balancers.
  private_subnets              = [for i, _ in local.azs : cidrsubnet(var.cidr, 3, i)]
  public_subnets               = [for i, _ in local.azs : cidrsubnet(var.cidr, 8, 200 + i)]
  database_subnets             = [for i, _ in local.azs : cidrsubnet(var.cidr, 8, 210 + i)]
  create_database_subnet_group = true

  enable_nat_gateway     = true
  single_nat_gateway     = var.single_nat_gateway
  one_nat_gateway_per_az = !var.single_nat_gateway
  enable_dns_hostnames   = true
  enable_dns_support     = true

  manage_default_security_group  = true
  default_security_group_ingress = []
  default_security_group_egress  = []

  enable_flow_log                                 = true
  create_flow_log_cloudwatch_log_group            = true
  create_flow_log_cloudwatch_iam_role             = true
  flow_log_cloudwatch_log_group_retention_in_days = var.flow_log_retention_days

  public_subnet_tags  = { "kubernetes.io/role/elb" = "1" }
  private_subnet_tags = { "kubernetes.io/role/internal-elb" = "1", "karpenter.sh/discovery" = var.name }

  tags = var.tags
}

module "endpoints" {
  #checkov:skip=CKV_TF_1:Registry module pinned to an exact version; registry sources cannot name a commit hash.
  source  = "terraform-aws-modules/vpc/aws//modules/vpc-endpoints"
  version = "6.6.1"

  vpc_id                     = module.vpc.vpc_id
  create_security_group      = length(var.interface_endpoints) > 0
  security_group_name_prefix = "${var.name}-endpoints-"
  security_group_description = "HTTPS from the VPC to interface endpoints"
  security_group_rules = {
    https_from_vpc = {
      description = "HTTPS from the VPC"
      cidr_blocks = [module.vpc.vpc_cidr_block]
    }
  }

  endpoints = merge(
    {
      # Reinforced shards and checkpoints are terabytes: keep S3 traffic off NAT data processing charges.
      s3 = {
        service         = "s3"
        service_type    = "Gateway"
        route_table_ids = module.vpc.private_route_table_ids
        tags            = { Name = "${var.name}-s3" }
      }
    },
    {
      for service in var.interface_endpoints : replace(service, ".", "_") => {
        service             = service
        private_dns_enabled = true
        subnet_ids          = module.vpc.private_subnets
        tags                = { Name = "${var.name}-${service}" }
      }
    },
  )

  tags = var.tags
}
