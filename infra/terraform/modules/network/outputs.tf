output "vpc_id" {
  description = "ID of the VPC."
  value       = module.vpc.vpc_id
}

output "vpc_cidr_block" {
  description = "IPv4 CIDR of the VPC."
  value       = module.vpc.vpc_cidr_block
}

output "private_subnet_ids" {
  description = "Private subnets, one per zone: EKS nodes and pods."
  value       = module.vpc.private_subnets
}

output "database_subnet_group_name" {
  description = "DB subnet group over the database subnets."
  value       = module.vpc.database_subnet_group_name
}

output "azs" {
  description = "Availability zones in use."
  value       = local.azs
}
