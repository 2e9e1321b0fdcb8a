output "cluster_name" {
  description = "EKS cluster name (aws eks update-kubeconfig --name ...)."
  value       = module.eks.cluster_name
}

output "cluster_endpoint" {
  description = "Kubernetes API endpoint."
  value       = module.eks.cluster_endpoint
}

output "cluster_certificate_authority_data" {
  description = "Base64 CA bundle of the Kubernetes API."
  value       = module.eks.cluster_certificate_authority_data
}

output "ray_dashboard_url" {
  description = "Ray dashboard and jobs API inside the cluster; from a workstation: kubectl -n ray port-forward svc/<head service> 8265."
  value       = module.kuberay.dashboard_url
}

output "ray_head_service" {
  description = "Head service of the long-lived RayCluster."
  value       = module.kuberay.head_service
}

output "ray_auth_token_secret" {
  description = "Kubernetes Secret (namespace ray, key auth_token) with the token `ray job submit` needs as RAY_AUTH_TOKEN."
  value       = module.kuberay.auth_token_secret
}

output "mlflow_tracking_uri" {
  description = "MLflow URI inside the cluster; from a workstation: kubectl -n mlflow port-forward svc/mlflow 5000."
  value       = module.mlflow.tracking_uri
}

output "mlflow_admin_secret_arn" {
  description = "Secrets Manager secret with the MLflow admin's username and password."
  value       = module.mlflow.admin_credentials_secret_arn
}

output "bucket_uris" {
  description = "Storage URIs: source, reinforced, eval, checkpoints, mlflow_artifacts."
  value       = module.storage.uris
}

output "job_env" {
  description = "What infra/k8s/rayjob-*.yaml substitute: the Ray containers' environment (storage URIs, region, MLflow URI; credentials come from a Secret), the image and the pod sizes of this environment."
  value = merge(local.job_env, {
    AWS_REGION            = var.aws_region
    MLFLOW_TRACKING_URI   = module.mlflow.tracking_uri
    CLIPDR_IMAGE          = var.ray.image
    CLIPDR_CPU_POD_CPU    = var.ray.cpu_workers.cpu
    CLIPDR_CPU_POD_MEMORY = var.ray.cpu_workers.memory
    CLIPDR_GPU_POD_GPUS   = tostring(var.ray.gpu_workers.gpus)
    CLIPDR_GPU_POD_CPU    = var.ray.gpu_workers.cpu
    CLIPDR_GPU_POD_MEMORY = var.ray.gpu_workers.memory
  })
}

output "image_repositories" {
  description = "ECR repositories to push the images to (docker/Dockerfile targets runtime and mlflow-server)."
  value       = module.storage.image_repositories
}
