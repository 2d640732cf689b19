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
class Comparison:
    """One comparison of an Application with git (Argo CD's ``CompareAppState``): ``status.sync``."""

    revision: str  # the commit compared with (the target revision resolved)
    status: str  # Synced, OutOfSync, or Unknown when the manifests could not be generated
    resources: tuple[ResourceKey, ...] = ()  # from the last successful render: what health looks at
    images: tuple[str, ...] = ()
    error: str = ""  # the ComparisonError condition's message


@dataclass(frozen=True)
class SyncOutcome:
    """One sync operation of an Application: ``status.operationState``."""

    revision: str
    phase: str  # Running, Succeeded, Failed
    message: str
    started_at: str
    finished_at: str = ""
    username: str = ""  # who requested it (``initiatedBy.username``); empty: automated


def sync_error(outcome: SyncOutcome) -> str:
    """Argo CD's SyncError condition after a failed automated sync, which it does not retry at the
    same revision (controller/appcontroller.go ``autoSync``: "Failed last sync attempt to ...")."""
    return f"Failed last sync attempt to [{outcome.revision}]: {outcome.message}"


def application_status(
    comparison: Comparison,
    operation: SyncOutcome | None,
    health: Health,
    resource_health: Mapping[ResourceKey, Health],
    source: Mapping[str, Any],
    conditions: Sequence[tuple[str, str]],
    reconciled_at: str,
) -> Obj:
    """An Argo CD Application ``status``, field for field as Argo CD writes it."""
    resources = [
        {
            "group": key.group,
            "version": key.version,
            "kind": key.kind,
            **({"namespace": key.namespace} if key.namespace else {}),
            "name": key.name,
            "status": comparison.status,
            **(
                {"health": {"status": resource_health[key].status, "message": resource_health[key].message}}
                if key in resource_health
                else {}
            ),
        }
        for key in comparison.resources
    ]
    status: Obj = {
        "sync": {
            "status": comparison.status,
            "revision": comparison.revision,
            "comparedTo": {"source": source},
        },
        "health": {"status": health.status, "message": health.message},
        "reconciledAt": reconciled_at,
        "sourceType": "Kustomize",
        "resources": resources,
        "summary": {"images": list(comparison.images)},
    }
    if conditions:
        status["conditions"] = [
            {"type": kind, "message": message, "lastTransitionTime": reconciled_at}
            for kind, message in conditions
        ]
    if operation is not None:
        state: Obj = {
            "operation": {
                "sync": {"revision": operation.revision},
                "initiatedBy": {"username": operation.username}
                if operation.username
                else {"automated": True},
            },
            "phase": operation.phase,
            "message": operation.message,
            "syncResult": {"revision": operation.revision, "source": dict(source)},
            "startedAt": operation.started_at,
        }
        if operation.finished_at:
            state["finishedAt"] = operation.finished_at
        status["operationState"] = state
    return status
