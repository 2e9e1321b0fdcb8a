output "cluster_name" {
  description = "EKS cluster name."
  value       = module.stack.cluster_name
}

output "kubeconfig_command" {
  description = "Adds the cluster to ~/.kube/config."
  value       = "aws eks update-kubeconfig --region ${var.aws_region} --name ${module.stack.cluster_name}"
}

output "ray_dashboard_url" {
  description = "Ray dashboard / jobs API inside the cluster."
  value       = module.stack.ray_dashboard_url
}

output "ray_port_forward_command" {
  description = "Makes the Ray jobs API reachable at http://127.0.0.1:8265."
  value       = "kubectl -n ray port-forward svc/${module.stack.ray_head_service} 8265:8265"
}

output "ray_auth_token_command" {
  description = "Prints the RayCluster's token; export it as RAY_AUTH_TOKEN before `ray job submit`."
  value       = "kubectl -n ray get secret ${module.stack.ray_auth_token_secret} -o jsonpath='{.data.auth_token}' | base64 -d"
}

output "mlflow_tracking_uri" {
  description = "MLflow URI inside the cluster (set on every Ray pod)."
  value       = module.stack.mlflow_tracking_uri
}

output "mlflow_port_forward_command" {
  description = "Makes the MLflow UI reachable at http://127.0.0.1:5000."
  value       = "kubectl -n mlflow port-forward svc/mlflow 5000:5000"
}

output "mlflow_admin_secret_arn" {
  description = "Secrets Manager secret with the MLflow admin's credentials."
  value       = module.stack.mlflow_admin_secret_arn
}

output "bucket_uris" {
  description = "Storage URIs of source shards, reinforced datasets, evaluation sets, checkpoints and MLflow artifacts."
  value       = module.stack.bucket_uris
}

output "job_env" {
  description = "Environment variables the jobs read (and infra/k8s/rayjob-*.yaml substitute)."
  value       = module.stack.job_env
}

output "image_repositories" {
  description = "ECR repositories for the clipdr and clipdr-mlflow images."
  value       = module.stack.image_repositories
}
