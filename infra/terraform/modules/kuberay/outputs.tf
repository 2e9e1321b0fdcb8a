output "namespace" {
  description = "Namespace of the Ray clusters and jobs."
  value       = var.namespace
}

output "service_account" {
  description = "Service account (IRSA role with the jobs' bucket access) that RayCluster and RayJob pods use."
  value       = local.service_account
}

output "dashboard_url" {
  description = "Ray dashboard and job submission endpoint inside the cluster."
  value       = "http://${var.ray_cluster_name}-head-svc.${var.namespace}.svc.cluster.local:8265"
}

output "head_service" {
  description = "Head service of the long-lived RayCluster (port-forward 8265 to submit jobs from a workstation)."
  value       = "${var.ray_cluster_name}-head-svc"
}

output "auth_token_secret" {
  description = "Kubernetes Secret (key auth_token) holding the RayCluster's token; `ray job submit` needs it as RAY_AUTH_TOKEN."
  value       = var.ray_cluster_name
}

output "jobs_role_arn" {
  description = "IAM role of the Ray pods."
  value       = module.jobs_role.arn
}
