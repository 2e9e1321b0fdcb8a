output "tracking_uri" {
  description = "MLflow tracking URI inside the cluster (what the Ray jobs use)."
  value       = local.tracking_uri
}

output "namespace" {
  description = "Namespace of the MLflow server."
  value       = var.namespace
}

output "admin_credentials_secret_arn" {
  description = "Secrets Manager secret with the MLflow admin username and password."
  value       = aws_secretsmanager_secret.user["admin"].arn
}

output "jobs_credentials_secret_arn" {
  description = "Secrets Manager secret with the credentials of the MLflow user the Ray jobs log as."
  value       = aws_secretsmanager_secret.user["jobs"].arn
}

output "secrets_kms_key_arn" {
  description = "KMS key encrypting the MLflow secrets; readers of jobs_credentials_secret_arn need kms:Decrypt on it."
  value       = module.kms.key_arn
}

output "db_endpoint" {
  description = "PostgreSQL endpoint (private)."
  value       = module.db.db_instance_endpoint
}
