output "buckets" {
  description = "Bucket name and ARN by purpose (data, checkpoints, mlflow)."
  value       = { for purpose, bucket in module.bucket : purpose => { name = bucket.s3_bucket_id, arn = bucket.s3_bucket_arn } }
}

output "kms_key_arn" {
  description = "KMS key encrypting the buckets; readers and writers need kms:Decrypt and kms:GenerateDataKey on it."
  value       = module.kms.key_arn
}

output "uris" {
  description = "Storage URIs the jobs take: source shards, reinforced datasets, evaluation sets, checkpoints, MLflow artifacts."
  value = {
    source           = "s3://${module.bucket["data"].s3_bucket_id}/source"
    reinforced       = "s3://${module.bucket["data"].s3_bucket_id}/reinforced"
    eval             = "s3://${module.bucket["data"].s3_bucket_id}/eval"
    checkpoints      = "s3://${module.bucket["checkpoints"].s3_bucket_id}/runs"
    mlflow_artifacts = "s3://${module.bucket["mlflow"].s3_bucket_id}/artifacts"
  }
}

output "image_repositories" {
  description = "ECR repository URLs of the clipdr (Ray) and clipdr-mlflow images."
  value       = { for name, repo in aws_ecr_repository.image : name => repo.repository_url }
}
