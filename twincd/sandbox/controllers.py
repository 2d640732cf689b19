"""Controllers that make a sandbox API server behave like a cluster with Argo CD.

Two loops, both plain HTTP clients of the standard Kubernetes API (so they run against
``twincd.sandbox.apiserver`` and would run against a real API server):

- :class:`DeploymentController`: a simplified kube-controller-manager Deployment controller. It
  "pulls" images with a HEAD on the registry's manifest endpoint, keeps Pods named
  ``<deployment>-<pod-template-hash>-<suffix>`` and moves ``status`` through the ``/status``
  subresource with the conditions and messages Kubernetes uses, including
  ``ProgressDeadlineExceeded``.
- :class:`ManifestsSyncer`: an Argo-CD-like syncer. It polls the manifests repo's ``main``, renders
  ``overlays/<cluster>/<app>`` with ``kubectl kustomize``, applies by GET + PUT of whole objects, and
  publishes one ``argoproj.io/v1alpha1`` ``Application`` per app in the Argo CD cluster.

The state transitions are pure functions (:func:`next_rollout_step`, :func:`deployment_health`,
:func:`application_health`, :func:`is_in_sync`, :func:`application_status`) so unit tests drive
them with plain dicts and a clock.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml

from twincd.errors import PermanentError, TransientError

log = logging.getLogger(__name__)

Obj = dict[str, Any]

# ---------------------------------------------------------------------------------------------
# Images and pulls
# ---------------------------------------------------------------------------------------------

# The Accept list a container runtime sends. A Docker-only Accept gets MANIFEST_UNKNOWN for an
# OCI manifest (PLATFORM-NOTES), and podman pushes OCI manifests.
MANIFEST_ACCEPT = (
    "application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.oci.image.index.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json"
)


@dataclass(frozen=True)
class ImageLocation:
    """Where a runtime would pull an image from: ``http://<host>/v2/<repository>/manifests/<reference>``."""

    host: str  # "127.0.0.1:5000"
    repository: str  # "hello" or "team/hello"
    reference: str  # a digest "sha256:..." or a tag

    @property
    def manifest_url(self) -> str:
        # Plain HTTP: the sandbox registries are "insecure" local ones (deployments/local.yaml).
        return f"http://{self.host}/v2/{self.repository}/manifests/{self.reference}"


def parse_image(image: str) -> ImageLocation | None:
    """Split an image reference; ``None`` when it names no registry host (Docker Hub short names).

    As in the Docker reference grammar, the first path component is a host when it contains a
    ``.`` or a ``:`` or is ``localhost``. A digest wins over a tag; no tag means ``latest``.
    """
    first, sep, rest = image.partition("/")
    if not sep or not ("." in first or ":" in first or first == "localhost"):
        return None
    name, at, digest = rest.partition("@")
    if at:
        repository = name.rsplit(":", 1)[0] if ":" in name else name
        return ImageLocation(first, repository, digest)
    if ":" in name:
        repository, tag = name.rsplit(":", 1)
        return ImageLocation(first, repository, tag)
    return ImageLocation(first, name, "latest")


@dataclass(frozen=True)
class PullResult:
    """The outcome of "pulling" one image: ``image_id`` is ``host/repo@sha256:...`` when it worked."""

    ok: bool
    image_id: str = ""
    message: str = ""


def check_image_pull(client: httpx.Client, image: str) -> PullResult:
    """HEAD the image's manifest the way a runtime resolves it before pulling layers."""
    where = parse_image(image)
    if where is None:
        # The sandbox has no route to Docker Hub, so short names (``nginx:1.27``) cannot be
        # checked; treat them as pullable rather than failing every third-party image.
        return PullResult(ok=True, image_id=image)
    try:
        response = client.head(where.manifest_url, headers={"Accept": MANIFEST_ACCEPT})
    except httpx.HTTPError as e:
        return PullResult(ok=False, message=f"failed to resolve reference {image!r}: {type(e).__name__}: {e}")
    if response.status_code == 200:
        digest = response.headers.get("Docker-Content-Digest") or where.reference
        return PullResult(ok=True, image_id=f"{where.host}/{where.repository}@{digest}")
    if response.status_code == 404:
        return PullResult(ok=False, message=f"failed to resolve reference {image!r}: {image}: not found")
    return PullResult(
        ok=False, message=f"failed to resolve reference {image!r}: unexpected status {response.status_code}"
    )


# ---------------------------------------------------------------------------------------------
# Deployment rollout: pure transitions
# ---------------------------------------------------------------------------------------------

# k8s.io/apimachinery/pkg/util/rand: the alphabet without vowels and look-alikes, used both for
# the pod-template-hash encoding and for the random pod name suffix.
_ALPHANUMS = "bcdfghjklmnpqrstvwxz2456789"
POD_TEMPLATE_HASH = "pod-template-hash"
DEFAULT_PROGRESS_DEADLINE_SECONDS = 600


def template_hash(template: Mapping[str, Any]) -> str:
    """The pod-template-hash: FNV-32a of the template, encoded like Kubernetes' ``SafeEncodeString``.

    Kubernetes hashes a spew dump of the Go struct; canonical JSON plays that role here. The value
    differs from a real cluster's but has the same properties: stable, and new on template changes.
    """
    h = 0x811C9DC5
    for byte in json.dumps(template, sort_keys=True, separators=(",", ":")).encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return "".join(_ALPHANUMS[b % len(_ALPHANUMS)] for b in str(h).encode())


def random_suffix(length: int = 5) -> str:
    return "".join(secrets.choice(_ALPHANUMS) for _ in range(length))


def format_time(t: datetime) -> str:
    """RFC 3339 at second precision, like every metav1.Time on the wire."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def pod_ready(pod: Mapping[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _containers(template: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    spec = template.get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def template_images(deployment: Mapping[str, Any]) -> list[str]:
    return [str(c["image"]) for c in _containers(deployment["spec"]["template"]) if c.get("image")]


def _max_unavailable(deployment: Mapping[str, Any], desired: int) -> int:
    """``spec.strategy.rollingUpdate.maxUnavailable`` (default 25%, rounded down as Kubernetes does)."""
    rolling = deployment["spec"].get("strategy", {}).get("rollingUpdate", {})
    value = rolling.get("maxUnavailable", "25%")
    if isinstance(value, str) and value.endswith("%"):
        return desired * int(value[:-1]) // 100
    return int(value)


@dataclass(frozen=True)
class RolloutStep:
    """What one controller tick does to one Deployment: pods to create, pods whose status to replace
    (an image became pullable), pod names to delete, and the Deployment status to write."""

    status: Obj
    create: tuple[Obj, ...] = ()
    update: tuple[Obj, ...] = ()
    delete: tuple[str, ...] = ()

    @property
    def progressed(self) -> bool:
        return bool(self.create or self.update or self.delete)


def _container_status(container: Mapping[str, Any], pull: PullResult, started: str) -> Obj:
    image = str(container["image"])
    if pull.ok:
        return {
            "name": container["name"],
            "image": image,
            "imageID": pull.image_id,
            "ready": True,
            "started": True,
            "restartCount": 0,
            "state": {"running": {"startedAt": started}},
        }
    return {
        "name": container["name"],
        "image": image,
        "imageID": "",
        "ready": False,
        "started": False,
        "restartCount": 0,
        # The kubelet's wording since Kubernetes 1.30 (the pull error is appended).
        "state": {
            "waiting": {
                "reason": "ImagePullBackOff",
                "message": f'Back-off pulling image "{image}": ErrImagePull: {pull.message}',
            }
        },
    }


def pod_status(template: Mapping[str, Any], pulls: Mapping[str, PullResult], now: datetime) -> Obj:
    """A Pod's status as the kubelet would report it once its images are (or are not) pulled."""
    stamp = format_time(now)
    statuses = [
        _container_status(c, pulls.get(str(c["image"]), PullResult(ok=True, image_id=str(c["image"]))), stamp)
        for c in template.get("spec", {}).get("containers", [])
    ]
    ready = all(s["ready"] for s in statuses)
    flag = "True" if ready else "False"
    conditions = [
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": stamp},
        {"type": "Initialized", "status": "True", "lastTransitionTime": stamp},
        {"type": "ContainersReady", "status": flag, "lastTransitionTime": stamp},
        {"type": "Ready", "status": flag, "lastTransitionTime": stamp},
    ]
    if not ready:
        waiting = [s["name"] for s in statuses if not s["ready"]]
        for c in conditions[2:]:
            c["reason"] = "ContainersNotReady"
            c["message"] = f"containers with unready status: [{' '.join(waiting)}]"
    return {
        "phase": "Running" if ready else "Pending",
        "conditions": conditions,
        "hostIP": "127.0.0.1",
        "podIP": "127.0.0.1",
        "startTime": stamp,
        "containerStatuses": statuses,
    }


def new_pod(
    deployment: Mapping[str, Any], pod_hash: str, suffix: str, pulls: Mapping[str, PullResult], now: datetime
) -> Obj:
    """A Pod of the Deployment's current template, with the status the kubelet would give it."""
    meta = deployment["metadata"]
    template = deployment["spec"]["template"]
    labels = {**template.get("metadata", {}).get("labels", {}), POD_TEMPLATE_HASH: pod_hash}
    pod_meta: Obj = {
        "name": f"{meta['name']}-{pod_hash}-{suffix}",
        "namespace": meta.get("namespace", "default"),
        "labels": labels,
        # Owned by the Deployment itself: the sandbox has no ReplicaSet objects.
        "ownerReferences": [
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": meta["name"],
                "uid": meta.get("uid", ""),
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    annotations = template.get("metadata", {}).get("annotations")
    if annotations:
        pod_meta["annotations"] = dict(annotations)
    spec = {**copy.deepcopy(template.get("spec", {})), "nodeName": "sandbox"}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": pod_meta,
        "spec": spec,
        "status": pod_status(template, pulls, now),
    }


def _condition(status: Mapping[str, Any], kind: str) -> Obj | None:
    for c in status.get("conditions", []):
        if c.get("type") == kind:
            return dict(c)
    return None


def _set_condition(
    previous: Obj | None, kind: str, flag: str, reason: str, message: str, now: datetime, touch: bool
) -> Obj:
    """A condition as ``SetDeploymentCondition`` leaves it: the transition time moves only when the
    status flips; the update time moves when something changed (or when ``touch`` says progress)."""
    stamp = format_time(now)
    same = previous is not None and previous.get("status") == flag and previous.get("reason") == reason
    if same and not touch and previous is not None and previous.get("message") == message:
        return previous
    transition = (
        previous["lastTransitionTime"]
        if previous is not None and previous.get("status") == flag and "lastTransitionTime" in previous
        else stamp
    )
    return {
        "type": kind,
        "status": flag,
        "lastUpdateTime": stamp,
        "lastTransitionTime": transition,
        "reason": reason,
        "message": message,
    }


def next_rollout_step(
    deployment: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]],
    pulls: Mapping[str, PullResult],
    now: datetime,
    suffix: str = "xxxxx",
) -> RolloutStep:
    """One tick of the Deployment controller, as a pure function of what it observes.

    ``pods`` are the Deployment's live pods; ``pulls`` the pull outcome per template image (a
    missing entry means pullable). A rollout surges one pod at a time and removes an old pod only
    when a new one is ready (maxSurge 1, maxUnavailable 0): one step per tick, so callers ticking
    every 0.2 s move ``updatedReplicas`` up a replica every 0.2 s or so. All rollout state lives in
    the status (the Progressing condition names the current ReplicaSet and its lastUpdateTime is
    the deadline's clock, as in Kubernetes), so the controller can restart at any time.
    """
    meta = deployment["metadata"]
    spec = deployment["spec"]
    previous_status: Mapping[str, Any] = deployment.get("status") or {}
    desired = int(spec.get("replicas", 1))
    pod_hash = template_hash(spec["template"])
    rs = f"{meta['name']}-{pod_hash}"
    previous = _condition(previous_status, "Progressing")
    new_rs = previous is None or f'"{rs}"' not in str(previous.get("message", ""))
    failed = [image for image in template_images(deployment) if not pulls.get(image, PullResult(True)).ok]

    live = [p for p in pods if not p.get("metadata", {}).get("deletionTimestamp")]
    current = [p for p in live if p["metadata"].get("labels", {}).get(POD_TEMPLATE_HASH) == pod_hash]
    old = [p for p in live if p not in current]
    unready_current = [p for p in current if not pod_ready(p)]
    ready_current = [p for p in current if pod_ready(p)]
    unready_old = [p for p in old if not pod_ready(p)]

    create: list[Obj] = []
    update: list[Obj] = []
    delete: list[Mapping[str, Any]] = []
    if desired == 0:
        # Scaling to zero needs no new pod to become ready: done in one step.
        delete = list(live)
    elif new_rs:
        # The tick that "creates the ReplicaSet" only announces it (NewReplicaSetCreated).
        pass
    elif len(current) > desired:
        delete = [(unready_current or current)[-1]]
    elif unready_current and not failed:
        # The image became pullable (pushed late): the kubelet's back-off retry now succeeds.
        pod = copy.deepcopy(dict(unready_current[0]))
        pod["status"] = pod_status(deployment["spec"]["template"], pulls, now)
        update = [pod]
    elif unready_old:
        # Old pods that never became ready serve nothing: no availability is lost removing them.
        delete = [unready_old[0]]
    elif old and len(old) + len(ready_current) > desired:
        delete = [old[0]]
    elif len(current) < desired and not unready_current and len(old) + len(current) < desired + 1:
        create = [new_pod(deployment, pod_hash, suffix, pulls, now)]

    gone = {id(p) for p in delete}
    updated_names = {p["metadata"]["name"]: p for p in update}
    after = [updated_names.get(p["metadata"]["name"], p) for p in live if id(p) not in gone] + create
    after_current = [p for p in after if p["metadata"].get("labels", {}).get(POD_TEMPLATE_HASH) == pod_hash]
    available = sum(1 for p in after if pod_ready(p))
    status: Obj = {
        "observedGeneration": meta.get("generation", 1),
        "replicas": len(after),
        "updatedReplicas": len(after_current),
        "readyReplicas": available,
        "availableReplicas": available,
        "unavailableReplicas": max(0, desired - available),
    }
    progressed = bool(create or update or delete)

    available_cond = _condition(previous_status, "Available")
    if available >= desired - _max_unavailable(deployment, desired):
        available_cond = _set_condition(
            available_cond, "Available", "True", "MinimumReplicasAvailable",
            "Deployment has minimum availability.", now, touch=False,
        )  # fmt: skip
    else:
        available_cond = _set_condition(
            available_cond, "Available", "False", "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.", now, touch=False,
        )  # fmt: skip

    complete = len(after_current) == desired and len(after) == desired and available == desired
    deadline = timedelta(seconds=int(spec.get("progressDeadlineSeconds", DEFAULT_PROGRESS_DEADLINE_SECONDS)))
    if complete and not (new_rs and desired > 0):
        progressing = _set_condition(
            previous, "Progressing", "True", "NewReplicaSetAvailable",
            f'ReplicaSet "{rs}" has successfully progressed.', now, touch=False,
        )  # fmt: skip
    elif new_rs:
        progressing = _set_condition(
            previous,
            "Progressing",
            "True",
            "NewReplicaSetCreated",
            f'Created new replica set "{rs}"',
            now,
            touch=True,
        )
    elif progressed:
        progressing = _set_condition(
            previous,
            "Progressing",
            "True",
            "ReplicaSetUpdated",
            f'ReplicaSet "{rs}" is progressing.',
            now,
            touch=True,
        )
    elif (
        previous is not None
        and previous.get("reason") != "ProgressDeadlineExceeded"
        and (parse_time(str(previous["lastUpdateTime"])) + deadline < now)
    ):
        # Kubernetes' DeploymentTimedOut: no progress since the condition's last update.
        progressing = _set_condition(
            previous, "Progressing", "False", "ProgressDeadlineExceeded",
            f'ReplicaSet "{rs}" has timed out progressing.', now, touch=False,
        )  # fmt: skip
    else:
        assert previous is not None  # new_rs covers a missing condition
        progressing = previous
    status["conditions"] = [available_cond, progressing]
    return RolloutStep(
        status=status,
        create=tuple(create),
        update=tuple(update),
        delete=tuple(p["metadata"]["name"] for p in delete),
    )


def rollout_settled(deployment: Mapping[str, Any]) -> bool:
    """True when the controller has nothing to do until the Deployment's spec changes again."""
    status = deployment.get("status") or {}
    if status.get("observedGeneration") != deployment["metadata"].get("generation", 1):
        return False
    progressing = _condition(status, "Progressing")
    return progressing is not None and progressing.get("reason") == "NewReplicaSetAvailable"


# ---------------------------------------------------------------------------------------------
# Health and sync: pure derivations, as Argo CD's gitops-engine does them
# ---------------------------------------------------------------------------------------------

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


def deployment_health(deployment: Mapping[str, Any] | None) -> Health:
    """gitops-engine's ``getAppsv1DeploymentHealth``, except that ProgressDeadlineExceeded reports the
    Deployment's own condition message (it names the stuck ReplicaSet) instead of a generic one."""
    if deployment is None:
        return Health(MISSING, "resource is missing")
    spec = deployment.get("spec", {})
    status = deployment.get("status") or {}
    if spec.get("paused"):
        return Health(SUSPENDED, "Deployment is paused")
    if deployment["metadata"].get("generation", 1) > status.get("observedGeneration", 0):
        return Health(
            PROGRESSING,
            "Waiting for rollout to finish: observed deployment generation less than desired generation",
        )
    progressing = _condition(status, "Progressing")
    if progressing is not None and progressing.get("reason") == "ProgressDeadlineExceeded":
        return Health(DEGRADED, str(progressing.get("message", "")))
    desired = int(spec.get("replicas", 1))
    updated = int(status.get("updatedReplicas", 0))
    replicas = int(status.get("replicas", 0))
    available = int(status.get("availableReplicas", 0))
    if updated < desired:
        return Health(
            PROGRESSING,
            f"Waiting for rollout to finish: {updated} out of {desired} new replicas have been updated...",
        )
    if replicas > updated:
        return Health(
            PROGRESSING,
            f"Waiting for rollout to finish: {replicas - updated} old replicas are pending termination...",
        )
    if available < updated:
        return Health(
            PROGRESSING,
            f"Waiting for rollout to finish: {available} of {updated} updated replicas are available...",
        )
    return Health(HEALTHY)


def application_health(resources: Sequence[Health]) -> Health:
    """The worst resource health wins; an application with no health-bearing resource is Healthy."""
    worst = Health(HEALTHY)
    for h in resources:
        if _HEALTH_ORDER.index(h.status) > _HEALTH_ORDER.index(worst.status):
            worst = h
    return worst


_SERVER_OWNED_METADATA = ("resourceVersion", "uid", "generation", "creationTimestamp", "managedFields")


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


# ---------------------------------------------------------------------------------------------
# A small Kubernetes REST client (plain JSON over httpx)
# ---------------------------------------------------------------------------------------------


class KubeApiError(PermanentError):
    """The API server refused a request (4xx). ``reason`` and ``message`` come from its Status."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class KubeUnavailable(TransientError):
    """The API server could not be reached or answered 5xx."""


@dataclass(frozen=True)
class _ResourceInfo:
    plural: str
    namespaced: bool


class KubeClient:
    """Just enough of the Kubernetes REST API for the controllers, resolved through discovery."""

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout)
        self._discovery: dict[str, dict[str, _ResourceInfo]] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Obj:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise KubeUnavailable(f"{method} {self.base_url}{path}: {type(e).__name__}: {e}") from e
        if response.status_code >= 500:
            raise KubeUnavailable(f"{method} {self.base_url}{path}: HTTP {response.status_code}")
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {}
            raise KubeApiError(
                response.status_code,
                str(body.get("reason", "")),
                str(body.get("message") or f"{method} {path}: HTTP {response.status_code}"),
            )
        result: Obj = response.json()
        return result

    def _resources(self, api_version: str) -> dict[str, _ResourceInfo]:
        with self._lock:
            if api_version not in self._discovery:
                path = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
                listing = self._request("GET", path)
                self._discovery[api_version] = {
                    r["kind"]: _ResourceInfo(r["name"], bool(r.get("namespaced")))
                    for r in listing.get("resources", [])
                    if "/" not in r["name"]  # subresources such as deployments/status
                }
            return self._discovery[api_version]

    def info(self, api_version: str, kind: str) -> _ResourceInfo:
        try:
            return self._resources(api_version)[kind]
        except KeyError:
            raise KubeApiError(
                404, "NotFound", f'no matches for kind "{kind}" in version "{api_version}"'
            ) from None

    def path(self, api_version: str, kind: str, namespace: str = "", name: str = "") -> str:
        info = self.info(api_version, kind)
        root = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        where = f"/namespaces/{namespace}" if info.namespaced and namespace else ""
        return f"{root}{where}/{info.plural}" + (f"/{name}" if name else "")

    def get(self, key: ResourceKey) -> Obj | None:
        try:
            return self._request("GET", self.path(key.api_version, key.kind, key.namespace, key.name))
        except KubeApiError as e:
            if e.code == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str = "", **params: str) -> Obj:
        return self._request("GET", self.path(api_version, kind, namespace), params=params)

    def create(self, obj: Mapping[str, Any]) -> Obj:
        key = ResourceKey.of(obj)
        return self._request("POST", self.path(key.api_version, key.kind, key.namespace), json=obj)

    def replace(self, obj: Mapping[str, Any], subresource: str = "") -> Obj:
        key = ResourceKey.of(obj)
        suffix = f"/{subresource}" if subresource else ""
        return self._request(
            "PUT", self.path(key.api_version, key.kind, key.namespace, key.name) + suffix, json=obj
        )

    def delete(self, key: ResourceKey) -> None:
        try:
            self._request("DELETE", self.path(key.api_version, key.kind, key.namespace, key.name))
        except KubeApiError as e:
            if e.code != 404:
                raise

    def watch(
        self,
        api_version: str,
        kind: str,
        resource_version: str,
        stop: threading.Event,
        timeout_seconds: int = 30,
    ) -> Iterator[Obj]:
        """Watch events from ``resource_version`` until the server ends the stream or ``stop`` is set.

        Raises :class:`KubeApiError` with code 410 when the version is too old (relist)."""
        params = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        url = self.path(api_version, kind)
        try:
            with self._http.stream(
                "GET", url, params=params, timeout=httpx.Timeout(10.0, read=timeout_seconds + 10.0)
            ) as response:
                if response.status_code == 410:
                    raise KubeApiError(410, "Expired", "too old resource version")
                if response.status_code >= 400:
                    raise KubeUnavailable(f"watch {url}: HTTP {response.status_code}")
                for line in response.iter_lines():
                    if stop.is_set():
                        return
                    if line.strip():
                        yield json.loads(line)
        except httpx.HTTPError as e:
            raise KubeUnavailable(f"watch {self.base_url}{url}: {type(e).__name__}: {e}") from e


def apply_object(client: KubeClient, obj: Mapping[str, Any], attempts: int = 5) -> Obj:
    """Create ``obj`` or replace the live one by PUT of the whole object at the live resourceVersion.

    Returns the live object; an object already in sync is left alone. A 409 (someone wrote in between) is
    retried with the new resourceVersion, as ``kubectl replace`` users do by hand.
    """
    key = ResourceKey.of(obj)
    for _ in range(attempts):
        live = client.get(key)
        if live is None:
            try:
                return client.create(obj)
            except KubeApiError as e:
                if e.code == 409:  # created in between: replace it on the next attempt
                    continue
                raise
        if is_in_sync(obj, live):
            return live
        body = copy.deepcopy(dict(obj))
        body.setdefault("metadata", {})["resourceVersion"] = live["metadata"]["resourceVersion"]
        try:
            return client.replace(body)
        except KubeApiError as e:
            if e.code != 409:
                raise
    raise KubeApiError(409, "Conflict", f"{key}: still conflicting after {attempts} attempts")


# ---------------------------------------------------------------------------------------------
# The Deployment controller
# ---------------------------------------------------------------------------------------------


def _rv(obj: Mapping[str, Any]) -> int:
    value = str(obj.get("metadata", {}).get("resourceVersion") or "0")
    return int(value) if value.isdigit() else 0


class DeploymentController:
    """Reconciles every Deployment of one cluster: a watch thread keeps a cache, a tick loop steps
    each unsettled rollout every ``tick`` seconds."""

    def __init__(self, api_url: str, stop: threading.Event, tick: float = 0.2) -> None:
        self.api = KubeClient(api_url)
        self._watch_api = KubeClient(api_url)
        self.stop = stop
        self.tick = tick
        self._cache: dict[tuple[str, str], Obj] = {}
        self._lock = threading.Lock()
        self._registry = httpx.Client(timeout=3.0)
        # Pull results per image. Digests are immutable, so a success is kept; failures are
        # retried after a back-off, as the kubelet does.
        self._pulls: dict[str, tuple[PullResult, float]] = {}

    def run(self) -> None:
        # The watch has its own client: one blocking stream must not hold up the tick loop's calls.
        watcher = threading.Thread(target=self._watch_loop, name="deployment-watch", daemon=True)
        watcher.start()
        try:
            while not self.stop.wait(self.tick):
                with self._lock:
                    deployments = list(self._cache.values())
                for d in deployments:
                    if rollout_settled(d):
                        continue
                    try:
                        self._reconcile(d)
                    except Exception as e:  # noqa: BLE001 - one bad object must not stop the controller
                        log.warning(
                            "deployment %s/%s: %s", d["metadata"].get("namespace"), d["metadata"]["name"], e
                        )
        finally:
            self.api.close()
            self._registry.close()

    def _store(self, obj: Obj) -> None:
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        with self._lock:
            # The tick loop stores what its writes return while the watch thread stores events: an
            # older copy must never replace a newer one, or a spec change that arrived in between is
            # lost and the rollout is never stepped. (The sandbox's resourceVersions are a counter.)
            cached = self._cache.get(key)
            if cached is None or _rv(obj) >= _rv(cached):
                self._cache[key] = obj

    def _watch_loop(self) -> None:
        resource_version = ""
        while not self.stop.is_set():
            try:
                if not resource_version:
                    listing = self._watch_api.list("apps/v1", "Deployment")
                    with self._lock:
                        self._cache = {
                            (d["metadata"].get("namespace", ""), d["metadata"]["name"]): d
                            for d in listing.get("items", [])
                        }
                    resource_version = str(listing["metadata"]["resourceVersion"])
                for event in self._watch_api.watch("apps/v1", "Deployment", resource_version, self.stop):
                    kind, obj = event.get("type"), event.get("object", {})
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            resource_version = ""  # too old: relist
                            break
                        raise KubeUnavailable(str(obj.get("message", "watch error")))
                    resource_version = str(obj["metadata"]["resourceVersion"])
                    if kind == "DELETED":
                        self._forget(obj)
                    elif kind in ("ADDED", "MODIFIED"):
                        self._store(obj)
            except KubeApiError as e:
                if e.code == 410:
                    resource_version = ""
                    continue
                log.warning("deployment watch: %s", e)
                self.stop.wait(1.0)
            except KubeUnavailable as e:
                log.warning("deployment watch: %s", e)
                self.stop.wait(1.0)

    def _forget(self, deployment: Obj) -> None:
        # Its pods go with it: the API server's owner-reference garbage collection removes them.
        meta = deployment["metadata"]
        with self._lock:
            self._cache.pop((meta.get("namespace", ""), meta["name"]), None)

    def _owned_pods(self, deployment: Mapping[str, Any]) -> list[Obj]:
        meta = deployment["metadata"]
        match = deployment["spec"].get("selector", {}).get("matchLabels", {})
        selector = ",".join(f"{k}={v}" for k, v in match.items())
        params = {"labelSelector": selector} if selector else {}
        listing = self.api.list("v1", "Pod", meta.get("namespace", "default"), **params)
        return [
            p
            for p in listing.get("items", [])
            if any(o.get("uid") == meta.get("uid") for o in p["metadata"].get("ownerReferences", []))
        ]

    def _pull(self, image: str) -> PullResult:
        cached = self._pulls.get(image)
        if cached is not None and (cached[0].ok or time.monotonic() - cached[1] < 2.0):
            return cached[0]
        result = check_image_pull(self._registry, image)
        self._pulls[image] = (result, time.monotonic())
        return result

    def _reconcile(self, deployment: Obj) -> None:
        pulls = {image: self._pull(image) for image in template_images(deployment)}
        pods = self._owned_pods(deployment)
        step = next_rollout_step(deployment, pods, pulls, datetime.now(UTC), random_suffix())
        for name in step.delete:
            self.api.delete(
                ResourceKey("v1", "Pod", deployment["metadata"].get("namespace", "default"), name)
            )
        for pod in step.create:
            created = self.api.create(pod)
            # A POSTed Pod's status is reset by the API server; the kubelet reports it via /status.
            self.api.replace({**created, "status": pod["status"]}, subresource="status")
        for pod in step.update:
            self.api.replace(pod, subresource="status")
        if step.status != deployment.get("status") or step.progressed:
            try:
                written = self.api.replace({**deployment, "status": step.status}, subresource="status")
            except KubeApiError as e:
                if e.code != 409:
                    raise
                # The spec (or status) moved under us: take the fresh object and retry next tick.
                fresh = self.api.get(
                    ResourceKey.of({**deployment, "apiVersion": "apps/v1", "kind": "Deployment"})
                )
                if fresh is not None:
                    self._store(fresh)
                return
            self._store(written)


# ---------------------------------------------------------------------------------------------
# The Argo-CD-like syncer
# ---------------------------------------------------------------------------------------------


def _git(*args: str, cwd: str | None = None) -> bytes:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=False)
    if result.returncode != 0:
        raise TransientError(f"git {' '.join(args)}: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout


def remote_head(repo: str, branch: str = "main") -> str:
    """The commit ``branch`` points at, without fetching anything (``git ls-remote``)."""
    out = _git("ls-remote", repo, f"refs/heads/{branch}").decode().split()
    if not out:
        raise TransientError(f"{repo}: branch {branch!r} not found")
    return out[0]


# kubectl 1.32 reports through klog: `E1126 02:23:23.020304 9071 run.go:72] "command failed" err="..."`.
_KLOG_ERR = re.compile(r'err=(".*")\s*$')


def kubectl_message(stderr: str, root: Path) -> str:
    """kubectl's own error text, without the klog header and with paths relative to the repo."""
    text = stderr.strip()
    match = _KLOG_ERR.search(text)
    if match:
        try:
            text = str(json.loads(match.group(1)))  # Go's %q quoting is JSON-compatible here
        except ValueError:
            pass
    return text.replace(f"{root}/", "")


def render_overlay(directory: Path, root: Path) -> list[Obj]:
    """``kubectl kustomize`` the directory; a failure raises with kubectl's own message."""
    result = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise PermanentError(
            kubectl_message(result.stderr, root) or f"kubectl kustomize exited {result.returncode}"
        )
    return [d for d in yaml.safe_load_all(result.stdout) if isinstance(d, dict)]


def apply_order(objects: Sequence[Obj]) -> list[Obj]:
    """Namespaces (and CRDs) first, then everything in kustomize's output order."""
    first = ("Namespace", "CustomResourceDefinition")
    return [o for o in objects if o.get("kind") in first] + [o for o in objects if o.get("kind") not in first]


_OVERLAY_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")


class ManifestsSyncer:
    """Polls ``main`` of the manifests repo and syncs ``overlays/<cluster>/*`` to one cluster,
    publishing an Application ``<app>-<cluster>`` per app in the Argo CD cluster.

    Like Argo CD with automated sync and no retry policy, a revision is synced once: a failed sync
    stays Failed until the next commit. It does not prune objects that left the manifests, nor
    Applications whose overlay was removed.
    """

    def __init__(
        self,
        *,
        cluster: str,
        repo: str,
        api_url: str,
        argocd_api_url: str,
        stop: threading.Event,
        interval: float = 1.0,
        branch: str = "main",
        argocd_namespace: str = "argocd",
    ) -> None:
        self.cluster = cluster
        self.repo = repo
        self.branch = branch
        self.target = KubeClient(api_url)
        self.argocd = KubeClient(argocd_api_url)
        self.namespace = argocd_namespace
        self.stop = stop
        self.interval = interval
        self._head = ""
        self._repo_error = ""
        self._outcomes: dict[str, SyncOutcome] = {}
        self._published: dict[str, Obj] = {}  # app -> last status written (without reconciledAt)

    def run(self) -> None:
        with tempfile.TemporaryDirectory(prefix=f"twincd-syncer-{self.cluster}-") as work:
            cache = os.path.join(work, "cache.git")
            _git("init", "--bare", "-q", cache)
            try:
                while True:
                    self.poll_once(work, cache)
                    if self.stop.wait(self.interval):
                        break
            finally:
                self.target.close()
                self.argocd.close()

    def poll_once(self, work: str, cache: str) -> None:
        try:
            head = remote_head(self.repo, self.branch)
            self._repo_error = ""
        except TransientError as e:
            # Said once, not every interval: an empty repo before its first push is normal.
            if str(e) != self._repo_error:
                log.warning("syncer %s: %s", self.cluster, e)
            self._repo_error = str(e)
            head = self._head
        if head and head != self._head:
            try:
                self._sync(head, work, cache)
                self._head = head
            except TransientError as e:  # the repo moved or vanished mid-fetch: try again next poll
                log.warning("syncer %s: %s", self.cluster, e)
        for app in list(self._outcomes):
            try:
                self._publish(app)
            except (KubeApiError, KubeUnavailable) as e:
                log.warning("application %s-%s: %s", app, self.cluster, e)

    def _export(self, head: str, work: str, cache: str) -> Path:
        _git("--git-dir", cache, "fetch", "-q", self.repo, f"+{head}:refs/heads/synced")
        tree = Path(work) / "tree"
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir()
        archive = _git("--git-dir", cache, "archive", "--format=tar", head)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tree, filter="data")
        return tree

    def _sync(self, head: str, work: str, cache: str) -> None:
        tree = self._export(head, work, cache)
        overlay_root = tree / "overlays" / self.cluster
        apps = sorted(
            d.name
            for d in (overlay_root.iterdir() if overlay_root.is_dir() else ())
            if d.is_dir() and any((d / f).is_file() for f in _OVERLAY_FILES)
        )
        for app in apps:
            started = format_time(datetime.now(UTC))
            previous = self._outcomes.get(app)
            self._outcomes[app] = SyncOutcome(
                revision=head,
                phase="Running",
                message="one or more tasks are running",
                started_at=started,
                resources=previous.resources if previous else (),
                images=previous.images if previous else (),
            )
            self._publish(app, quiet=True)
            self._outcomes[app] = self._sync_app(app, tree, head, started, previous)
            log.info("synced %s-%s at %s: %s", app, self.cluster, head[:12], self._outcomes[app].phase)

    def _sync_app(
        self, app: str, root: Path, head: str, started: str, previous: SyncOutcome | None
    ) -> SyncOutcome:
        path = f"overlays/{self.cluster}/{app}"
        directory = root / path
        keep = previous.resources if previous else ()
        keep_images = previous.images if previous else ()
        try:
            rendered = apply_order(render_overlay(directory, root))
        except PermanentError as e:
            # Argo CD's wording around the tool's own stderr, so people recognise both.
            message = f"`kustomize build {path}` failed: {e}"
            return SyncOutcome(
                head, "Failed", message, started, format_time(datetime.now(UTC)), keep, keep_images
            )
        images = tuple(
            sorted(
                {
                    str(c["image"])
                    for o in rendered
                    if o.get("kind") == "Deployment"
                    for c in _containers(o["spec"]["template"])
                }
            )
        )
        keys: tuple[ResourceKey, ...] = keep
        try:
            objects = [self._with_namespace(o) for o in rendered]
            keys = tuple(ResourceKey.of(o) for o in objects)
            for obj in objects:
                self._ensure_namespace(obj)
                apply_object(self.target, self._tracked(obj, app))
        except (KubeApiError, KubeUnavailable) as e:
            return SyncOutcome(
                head, "Failed", f"one or more objects failed to apply: {e}", started,
                format_time(datetime.now(UTC)), keys, images,
            )  # fmt: skip
        return SyncOutcome(
            head, "Succeeded", "successfully synced (all tasks run)", started,
            format_time(datetime.now(UTC)), keys, images,
        )  # fmt: skip

    def _with_namespace(self, obj: Obj) -> Obj:
        """Namespaced objects without a namespace go to ``default``, as with ``kubectl apply``."""
        if obj.get("metadata", {}).get("namespace"):
            return obj
        info = self.target.info(str(obj["apiVersion"]), str(obj["kind"]))
        if not info.namespaced:
            return obj
        return {**obj, "metadata": {**obj.get("metadata", {}), "namespace": "default"}}

    def _ensure_namespace(self, obj: Obj) -> None:
        """Create a missing destination namespace, like Argo CD's ``CreateNamespace=true`` option."""
        namespace = obj.get("metadata", {}).get("namespace")
        if namespace and self.target.get(ResourceKey("v1", "Namespace", "", namespace)) is None:
            try:
                self.target.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
            except KubeApiError as e:
                if e.code != 409:
                    raise

    def _tracked(self, obj: Obj, app: str) -> Obj:
        """Argo CD 3's default resource tracking: an annotation naming the owning Application."""
        key = ResourceKey.of(obj)
        meta = dict(obj.get("metadata", {}))
        meta["annotations"] = {
            **(meta.get("annotations") or {}),
            "argocd.argoproj.io/tracking-id": f"{app}-{self.cluster}:{key.group}/{key.kind}:{key.namespace}/{key.name}",
        }
        return {**obj, "metadata": meta}

    def _health(self, outcome: SyncOutcome) -> tuple[Health, dict[ResourceKey, Health]]:
        if not outcome.resources and outcome.phase != "Succeeded":
            # Nothing was ever rendered and applied: Argo CD shows such an app as Missing.
            return Health(MISSING, "no resources synced yet"), {}
        per: dict[ResourceKey, Health] = {}
        for key in outcome.resources:
            if key.kind == "Deployment":
                per[key] = deployment_health(self.target.get(key))
        return application_health(list(per.values())), per

    def _publish(self, app: str, quiet: bool = False) -> None:
        """Write the Application when its status changed (health is re-read on every call)."""
        outcome = self._outcomes[app]
        path = f"overlays/{self.cluster}/{app}"
        try:
            health, per = self._health(outcome)
        except (KubeApiError, KubeUnavailable) as e:
            health, per = Health("Unknown", str(e)), {}
        status = application_status(outcome, health, per, self.repo, path, "")
        if self._published.get(app) == status:
            return
        stamped = {**status, "reconciledAt": format_time(datetime.now(UTC))}
        try:
            self._write_application(app, path, stamped)
        except (KubeApiError, KubeUnavailable) as e:
            if not quiet:
                raise
            log.warning("application %s-%s: %s", app, self.cluster, e)
            return
        self._published[app] = status

    def _write_application(self, app: str, path: str, status: Obj) -> None:
        name = f"{app}-{self.cluster}"
        if self.argocd.get(ResourceKey("v1", "Namespace", "", self.namespace)) is None:
            try:
                self.argocd.create(
                    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.namespace}}
                )
            except KubeApiError as e:
                if e.code != 409:
                    raise
        desired: Obj = {
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "Application",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": {"twincd.io/app": app, "twincd.io/cluster": self.cluster},
            },
            "spec": {
                "project": "default",
                "source": {"repoURL": self.repo, "path": path, "targetRevision": self.branch},
                "destination": {"name": self.cluster},
                "syncPolicy": {"automated": {"prune": False, "selfHeal": False}},
            },
            "status": status,
        }
        key = ResourceKey.of(desired)
        for _ in range(5):
            live = self.argocd.get(key)
            try:
                if live is None:
                    written = self.argocd.create(desired)
                else:
                    body = copy.deepcopy(desired)
                    body["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"]
                    written = self.argocd.replace(body)
                # Argo CD's own CRD has no status subresource (status is written with the object),
                # but a server that splits it off ignores status on the main resource.
                if written.get("status") != status:
                    self.argocd.replace({**written, "status": status}, subresource="status")
                return
            except KubeApiError as e:
                if e.code != 409:
                    raise
        raise KubeApiError(409, "Conflict", f"Application {self.namespace}/{name}: still conflicting")


__all__ = [
    "DeploymentController",
    "Health",
    "ImageLocation",
    "KubeApiError",
    "KubeClient",
    "KubeUnavailable",
    "ManifestsSyncer",
    "PullResult",
    "ResourceKey",
    "RolloutStep",
    "SyncOutcome",
    "application_health",
    "application_status",
    "apply_object",
    "check_image_pull",
    "deployment_health",
    "is_in_sync",
    "next_rollout_step",
    "parse_image",
    "remote_head",
    "render_overlay",
    "rollout_settled",
    "template_hash",
]
