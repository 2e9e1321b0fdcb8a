data "aws_partition" "current" {}

locals {
  partition = data.aws_partition.current.partition
  charts = {
    karpenter            = "1.14.1"
    nvidia_device_plugin = "0.17.1"
    external_secrets     = "1.2.1"
  }
  system_selector = { "clipdr.io/pool" = "system" }

  # Karpenter node pools for Ray: the head and Ray Data workers on CPU capacity, training and teachers on GPUs.
  # The GPU taint keeps everything but pods that tolerate it (Ray GPU workers, the device plugin) off GPU nodes.
  node_pools = {
    ray-cpu = {
      families       = var.cpu_instance_families
      capacity_types = var.cpu_capacity_types
      limits         = { cpu = var.cpu_limit }
      taints         = []
      root_volume    = "100Gi"
    }
    gpu = {
      families       = var.gpu_instance_families
      capacity_types = var.gpu_capacity_types
      limits         = { "nvidia.com/gpu" = var.gpu_limit }
      taints         = [{ key = "nvidia.com/gpu", value = "true", effect = "NoSchedule" }]
      root_volume    = "300Gi" # the CUDA image, model weights, Ray object spilling
    }
  }
}

module "eks" {
  #checkov:skip=CKV_TF_1:Registry module pinned to an exact version; registry sources cannot name a commit hash.
  source  = "terraform-aws-modules/eks/aws"
  version = "21.26.0"

  name               = var.name
  kubernetes_version = var.kubernetes_version
  vpc_id             = var.vpc_id
  subnet_ids         = var.subnet_ids

  endpoint_private_access      = true
  endpoint_public_access       = length(var.endpoint_public_access_cidrs) > 0
  endpoint_public_access_cidrs = var.endpoint_public_access_cidrs
  enabled_log_types            = ["api", "audit", "authenticator"]
  enable_irsa                  = true

  enable_cluster_creator_admin_permissions = true
  access_entries = {
    for i, arn in var.admin_principal_arns : "admin-${i}" => {
      principal_arn = arn
      policy_associations = {
        admin = {
          policy_arn   = "arn:${local.partition}:eks::aws:cluster-access-policy/AmazonEKSClusterAdminPolicy"
          access_scope = { type = "cluster" }
        }
      }
    }
  }

  addons = {
    vpc-cni                = { before_compute = true }
    eks-pod-identity-agent = { before_compute = true }
    kube-proxy             = {}
    coredns                = {}
  }

  eks_managed_node_groups = {
    system = {
      ami_type       = "AL2023_x86_64_STANDARD"
      instance_types = var.system_instance_types
      min_size       = var.system_node_count.min
      max_size       = var.system_node_count.max
      desired_size   = var.system_node_count.desired
      labels         = local.system_selector
      # Hop limit 1: containers cannot reach the node role through IMDS; workloads get their own roles (IRSA).
      metadata_options = {
        http_endpoint               = "enabled"
        http_tokens                 = "required"
        http_put_response_hop_limit = 1
      }
    }
  }

  node_security_group_tags = { "karpenter.sh/discovery" = var.name }
  tags                     = var.tags
}

module "karpenter" {
  #checkov:skip=CKV_TF_1:Registry module pinned to an exact version; registry sources cannot name a commit hash.
  source  = "terraform-aws-modules/eks/aws//modules/karpenter"
  version = "21.26.0"

  cluster_name                    = module.eks.cluster_name
  namespace                       = "kube-system"
  create_pod_identity_association = true
  enable_spot_termination         = true
  # The Karpenter v1 controller policy exceeds the 6,144-byte limit of a managed policy.
  enable_inline_policy = true

  node_iam_role_use_name_prefix = false
  node_iam_role_name            = "${var.name}-karpenter-node"
  node_iam_role_additional_policies = {
    AmazonSSMManagedInstanceCore = "arn:${local.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
  }

  tags = var.tags
}

resource "helm_release" "karpenter" {
  name       = "karpenter"
  namespace  = "kube-system"
  repository = "oci://public.ecr.aws/karpenter"
  chart      = "karpenter"
  version    = local.charts.karpenter

  values = [yamlencode({
    settings = {
      clusterName       = module.eks.cluster_name
      clusterEndpoint   = module.eks.cluster_endpoint
      interruptionQueue = module.karpenter.queue_name
    }
    nodeSelector = local.system_selector
    dnsPolicy    = "Default"
  })]
}

resource "helm_release" "node_pools" {
  name       = "karpenter-node-pools"
  namespace  = "kube-system"
  chart      = "${path.module}/../../charts/manifests"
  depends_on = [helm_release.karpenter]

  values = [yamlencode({
    manifests = flatten([
      for pool, cfg in local.node_pools : [
        {
          apiVersion = "karpenter.k8s.aws/v1"
          kind       = "EC2NodeClass"
          metadata   = { name = pool }
          spec = {
            role                       = module.karpenter.node_iam_role_name
            amiSelectorTerms           = [{ alias = var.node_ami_alias }]
            subnetSelectorTerms        = [{ tags = { "karpenter.sh/discovery" = var.name } }]
            securityGroupSelectorTerms = [{ tags = { "karpenter.sh/discovery" = var.name } }]
            metadataOptions            = { httpEndpoint = "enabled", httpTokens = "required", httpPutResponseHopLimit = 1 }
            blockDeviceMappings = [{
              deviceName = "/dev/xvda"
              ebs        = { volumeSize = cfg.root_volume, volumeType = "gp3", encrypted = true, deleteOnTermination = true }
            }]
            # NVMe instance stores (g6e, p4d, p5) become the node's ephemeral storage.
            instanceStorePolicy = "RAID0"
            tags                = merge(var.tags, { "karpenter.sh/discovery" = var.name })
          }
        },
        {
          apiVersion = "karpenter.sh/v1"
          kind       = "NodePool"
          metadata   = { name = pool }
          spec = {
            template = {
              metadata = { labels = { "clipdr.io/pool" = pool } }
              spec = {
                nodeClassRef = { group = "karpenter.k8s.aws", kind = "EC2NodeClass", name = pool }
                taints       = cfg.taints
                expireAfter  = "720h"
                requirements = [
                  { key = "karpenter.k8s.aws/instance-family", operator = "In", values = cfg.families },
                  { key = "karpenter.sh/capacity-type", operator = "In", values = cfg.capacity_types },
                  { key = "kubernetes.io/arch", operator = "In", values = ["amd64"] },
                ]
              }
            }
            limits = cfg.limits
            # Only empty nodes are reclaimed: consolidation must never evict a running reinforcement or training.
            disruption = { consolidationPolicy = "WhenEmpty", consolidateAfter = "5m" }
          }
        },
      ]
    ])
  })]
}

resource "helm_release" "nvidia_device_plugin" {
  name       = "nvidia-device-plugin"
  namespace  = "kube-system"
  repository = "https://nvidia.github.io/k8s-device-plugin"
  chart      = "nvidia-device-plugin"
  version    = local.charts.nvidia_device_plugin

  values = [yamlencode({
    nodeSelector = { "clipdr.io/pool" = "gpu" }
    # The chart's default affinity wants node-feature-discovery labels, which these nodes do not carry.
    affinity    = null
    tolerations = [{ key = "nvidia.com/gpu", operator = "Exists", effect = "NoSchedule" }]
  })]
}

# External Secrets syncs credentials from Secrets Manager into namespaced Secrets. The controller itself holds no
# AWS permissions: each namespace's SecretStore authenticates as its own IRSA service account.
resource "helm_release" "external_secrets" {
  name             = "external-secrets"
  namespace        = "external-secrets"
  create_namespace = true
  repository       = "https://charts.external-secrets.io"
  chart            = "external-secrets"
  version          = local.charts.external_secrets

  values = [yamlencode({
    installCRDs    = true
    nodeSelector   = local.system_selector
    webhook        = { nodeSelector = local.system_selector }
    certController = { nodeSelector = local.system_selector }
  })]

  depends_on = [module.eks]
}
