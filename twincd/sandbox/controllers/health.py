"""Health and sync status, derived as Argo CD's gitops-engine derives them, for the Applications the
syncer publishes."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twincd.domain import Phase
from twincd.rollout import deployment_verdict
from twincd.sandbox.controllers.rollout_steps import Obj, condition

HEALTHY, PROGRESSING, DEGRADED, MISSING, SUSPENDED = (
    "Healthy",
    "Progressing",
    "Degraded",
    "Missing",
    "Suspended",
)
# gitops-engine's health order: the worst resource decides the application's health.
_HEALTH_ORDER = (HEALTHY, SUSPENDED, PROGRESSING, MISSING, DEGRADED)


@dataclass(frozen=True)
class Health:
    status: str
    message: str = ""


# gitops-engine's messages are kubectl's without the Deployment's name, and one of its own for an
# unobserved spec change.
_KUBECTL_WAITING = re.compile(r'^Waiting for deployment "[^"]*" rollout to finish: ')
_KUBECTL_UNOBSERVED = "Waiting for deployment spec update to be observed..."
_WAITING = "Waiting for rollout to finish: "


def deployment_health(deployment: Mapping[str, Any] | None) -> Health:
    """Argo CD's health of a Deployment: gitops-engine's ``getAppsv1DeploymentHealth``.

    gitops-engine took its checks from ``kubectl rollout status``, in the same order, so the
    judgement is the core's :func:`twincd.rollout.deployment_verdict`: rolled out is Healthy, a
    progress deadline exceeded is Degraded, anything else is Progressing. What stays here is Argo
    CD's own, because the sandbox plays Argo CD and the core only reads its verdict back from the
    Application: a paused Deployment is Suspended, and the messages are Argo CD's wording (except
    that ProgressDeadlineExceeded reports the Deployment's own condition message, which names the
    stuck ReplicaSet, instead of a generic one).
    """
    if deployment is None:
        return Health(MISSING, "resource is missing")
    spec = deployment.get("spec") or {}
    if spec.get("paused"):
        return Health(SUSPENDED, "Deployment is paused")
    # A real API server defaults spec.replicas to 1; the sandbox's does no defaulting.
    verdict = deployment_verdict({**deployment, "spec": {"replicas": 1, **spec}}, cluster="", digest=None)
    if verdict.phase is Phase.SUCCEEDED:
        return Health(HEALTHY)
    if verdict.phase is Phase.FAILED:
        progressing = condition(deployment.get("status") or {}, "Progressing") or {}
        return Health(DEGRADED, str(progressing.get("message", "")))
    if verdict.message == _KUBECTL_UNOBSERVED:
        return Health(PROGRESSING, _WAITING + "observed deployment generation less than desired generation")
    return Health(PROGRESSING, _KUBECTL_WAITING.sub(_WAITING, verdict.message))


def application_health(resources: Sequence[Health]) -> Health:
    """The worst resource health wins; an application with no health-bearing resource is Healthy."""
    worst = Health(HEALTHY)
    for h in resources:
        if _HEALTH_ORDER.index(h.status) > _HEALTH_ORDER.index(worst.status):
            worst = h
    return worst


def is_in_sync(desired: Mapping[str, Any], live: Mapping[str, Any] | None) -> bool:
    """Whether applying ``desired`` would change ``live``: every top-level field but metadata and
    status equal, and the desired labels and annotations present with the same values."""
    if live is None:
        return False
    for key, value in desired.items():
        if key in ("metadata", "status"):
            continue
        if live.get(key) != value:
            return False
    for part in ("labels", "annotations"):
        want = desired.get("metadata", {}).get(part) or {}
        have = live.get("metadata", {}).get(part) or {}
        if any(have.get(k) != v for k, v in want.items()):
            return False
    return True


@dataclass(frozen=True)
class ResourceKey:
    api_version: str
    kind: str
    namespace: str  # "" for cluster-scoped objects
    name: str

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> ResourceKey:
        meta = obj.get("metadata", {})
        return cls(
            str(obj["apiVersion"]), str(obj["kind"]), str(meta.get("namespace", "")), str(meta["name"])
        )

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]

    def __str__(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind}/{where}{self.name}"


@dataclass(frozen=True)
class SyncOutcome:
    """The last sync operation of one application."""

    revision: str
    phase: str  # Running, Succeeded, Failed
    message: str
    started_at: str
    finished_at: str = ""
    resources: tuple[ResourceKey, ...] = ()  # from the last successful render: what health looks at
    images: tuple[str, ...] = ()


def application_status(
    outcome: SyncOutcome,
    health: Health,
    resource_health: Mapping[ResourceKey, Health],
    repo_url: str,
    path: str,
    reconciled_at: str,
) -> Obj:
    """An Argo CD Application ``status`` for one sync outcome and the current health."""
    synced = "Synced" if outcome.phase == "Succeeded" else "OutOfSync"
    source = {"repoURL": repo_url, "path": path, "targetRevision": "main"}
    resources = [
        {
            "group": key.group,
            "version": key.version,
            "kind": key.kind,
            **({"namespace": key.namespace} if key.namespace else {}),
            "name": key.name,
            "status": synced,
            **(
                {"health": {"status": resource_health[key].status, "message": resource_health[key].message}}
                if key in resource_health
                else {}
            ),
        }
        for key in outcome.resources
    ]
    operation: Obj = {
        "operation": {"sync": {"revision": outcome.revision}, "initiatedBy": {"automated": True}},
        "phase": outcome.phase,
        "message": outcome.message,
        "syncResult": {"revision": outcome.revision, "source": source},
        "startedAt": outcome.started_at,
    }
    if outcome.finished_at:
        operation["finishedAt"] = outcome.finished_at
    return {
        "sync": {"status": synced, "revision": outcome.revision, "comparedTo": {"source": source}},
        "health": {"status": health.status, "message": health.message},
        "operationState": operation,
        "reconciledAt": reconciled_at,
        "sourceType": "Kustomize",
        "resources": resources,
        "summary": {"images": list(outcome.images)},
    }
