"""What every twincd task shares: retry only transient failures, with backoff."""

from __future__ import annotations

from typing import Any

from prefect.tasks import exponential_backoff

from twincd.adapters import cluster
from twincd.config import Environment
from twincd.errors import TransientError


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry network trouble, 5xx and 429; never a permanent error."""
    try:
        state.result()
    except TransientError:
        return True
    except Exception:  # noqa: BLE001 - any other failure is permanent: do not retry
        return False
    return False


IO_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": transient_only,
}


def cluster_ref(env: Environment, cluster_name: str) -> cluster.ClusterRef:
    """How to reach a cluster: its kubeconfig context (and file, relative to the repository)."""
    c = env.clusters[cluster_name]
    return cluster.ClusterRef(cluster_name, c.context, str(env.path(c.kubeconfig)) if c.kubeconfig else None)


def rollout_target(
    env: Environment, cluster_name: str, app: str, revision: str, digest: str | None = None
) -> cluster.RolloutTarget:
    """What a cluster must show for ``app`` at ``revision``; with Argo CD, where its Application lives."""
    c = env.clusters[cluster_name]
    w = env.app(app).workload
    ref = cluster_ref(env, cluster_name)
    argocd = c.argocd if c.sync == "argocd" else None
    return cluster.RolloutTarget(
        cluster=ref,
        argocd=cluster.ClusterRef(
            f"Argo CD of {cluster_name}",
            argocd.context,
            str(env.path(argocd.kubeconfig)) if argocd.kubeconfig else ref.kubeconfig,
        )
        if argocd
        else None,
        application=argocd.application.format(app=app, cluster=cluster_name) if argocd else None,
        argocd_namespace=argocd.namespace if argocd else "argocd",
        kind=w.kind,
        namespace=w.namespace,
        name=w.name,
        revision=revision,
        digest=digest,
    )
