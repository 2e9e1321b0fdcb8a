output "cluster_name" {
  description = "EKS cluster name."
  value       = module.eks.cluster_name
}

output "cluster_endpoint" {
  description = "Kubernetes API endpoint."
  value       = module.eks.cluster_endpoint
}

output "cluster_certificate_authority_data" {
  description = "Base64 CA bundle of the API endpoint."
  value       = module.eks.cluster_certificate_authority_data
}

output "oidc_provider_arn" {
  description = "IAM OIDC provider of the cluster, for IRSA roles."
  value       = module.eks.oidc_provider_arn
}

output "node_security_group_id" {
  description = "Security group of every node (managed and Karpenter-launched)."
  value       = module.eks.node_security_group_id
}

output "addons_ready" {
  description = "Release names of the controllers and CRDs later modules rely on; depend on this output to order after them."
  value       = [helm_release.karpenter.name, helm_release.node_pools.name, helm_release.nvidia_device_plugin.name, helm_release.external_secrets.name]
}
