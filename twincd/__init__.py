"""twincd: GitOps continuous delivery for apps on twin Kubernetes clusters, as Prefect 3 flows."""
