"""Deployment rollout math: what one tick of a Deployment controller does, as pure functions.

The sandbox has no ReplicaSet objects: pods are owned by the Deployment and carry the
pod-template-hash label, and the Progressing condition names the current "ReplicaSet", with the
conditions and messages Kubernetes uses, including ``ProgressDeadlineExceeded``.
"""

from __future__ import annotations

import copy
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from twincd.sandbox.controllers.pulls import PullResult

Obj = dict[str, Any]

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
    """The kubelet's Ready condition. (The core checks it only inside its digest check of running
    pods, ``twincd.rollout.pods_verdict``, which asks more: the release's digest.)"""
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


def _init_status(container: Mapping[str, Any], pull: PullResult, started: str) -> Obj:
    """An init container that ran to completion (the kubelet reports it terminated, Completed)."""
    if not pull.ok:
        return _container_status(container, pull, started)
    return {
        "name": container["name"],
        "image": str(container["image"]),
        "imageID": pull.image_id,
        "ready": True,
        "started": False,
        "restartCount": 0,
        "state": {
            "terminated": {"exitCode": 0, "reason": "Completed", "startedAt": started, "finishedAt": started}
        },
    }


def _initializing(container: Mapping[str, Any]) -> Obj:
    """A container waiting for the pod's init containers."""
    return {
        "name": container["name"],
        "image": str(container["image"]),
        "imageID": "",
        "ready": False,
        "started": False,
        "restartCount": 0,
        "state": {"waiting": {"reason": "PodInitializing"}},
    }


def pod_status(template: Mapping[str, Any], pulls: Mapping[str, PullResult], now: datetime) -> Obj:
    """A Pod's status as the kubelet would report it once its images are (or are not) pulled.

    Init containers run first, in order, to completion (``initContainerStatuses``, terminated
    Completed); until they have, the pod is Pending, ``Initialized`` is False and its containers
    wait in ``PodInitializing`` (kubelet, pkg/kubelet/status/generate.go wording).
    """
    stamp = format_time(now)
    spec = template.get("spec", {})

    def pull(c: Mapping[str, Any]) -> PullResult:
        return pulls.get(str(c["image"]), PullResult(ok=True, image_id=str(c["image"])))

    inits = [_init_status(c, pull(c), stamp) for c in spec.get("initContainers", [])]
    initialized = all(s["ready"] for s in inits)
    statuses = [
        _container_status(c, pull(c), stamp) if initialized else _initializing(c)
        for c in spec.get("containers", [])
    ]
    ready = initialized and all(s["ready"] for s in statuses)
    flag = "True" if ready else "False"
    init_condition: Obj = {"type": "Initialized", "status": "True", "lastTransitionTime": stamp}
    if not initialized:
        pending = " ".join(s["name"] for s in inits if not s["ready"])
        init_condition.update(
            status="False",
            reason="ContainersNotInitialized",
            message=f"containers with incomplete status: [{pending}]",
        )
    conditions = [
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": stamp},
        init_condition,
        {"type": "ContainersReady", "status": flag, "lastTransitionTime": stamp},
        {"type": "Ready", "status": flag, "lastTransitionTime": stamp},
    ]
    if not ready:
        waiting = [s["name"] for s in statuses if not s["ready"]]
        for c in conditions[2:]:
            c["reason"] = "ContainersNotReady"
            c["message"] = f"containers with unready status: [{' '.join(waiting)}]"
    status: Obj = {
        "phase": "Running" if ready else "Pending",
        "conditions": conditions,
        "hostIP": "127.0.0.1",
        "podIP": "127.0.0.1",
        "startTime": stamp,
        "containerStatuses": statuses,
    }
    if inits:
        status["initContainerStatuses"] = inits
    return status


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


def condition(status: Mapping[str, Any], kind: str) -> Obj | None:
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
    previous = condition(previous_status, "Progressing")
    new_rs = previous is None or f'"{rs}"' not in str(previous.get("message", ""))

    live = [p for p in pods if not p.get("metadata", {}).get("deletionTimestamp")]
    create, update, delete = _pod_changes(deployment, live, pod_hash, pulls, now, suffix, new_rs=new_rs)

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
    complete = len(after_current) == desired and len(after) == desired and available == desired
    deadline = timedelta(seconds=int(spec.get("progressDeadlineSeconds", DEFAULT_PROGRESS_DEADLINE_SECONDS)))
    status["conditions"] = [
        _available_condition(deployment, available, now),
        _progressing_condition(
            previous,
            rs,
            complete=complete and not (new_rs and desired > 0),
            new_rs=new_rs,
            progressed=bool(create or update or delete),
            deadline=deadline,
            now=now,
        ),
    ]
    return RolloutStep(
        status=status,
        create=tuple(create),
        update=tuple(update),
        delete=tuple(p["metadata"]["name"] for p in delete),
    )


def _pod_changes(
    deployment: Mapping[str, Any],
    live: Sequence[Mapping[str, Any]],
    pod_hash: str,
    pulls: Mapping[str, PullResult],
    now: datetime,
    suffix: str,
    *,
    new_rs: bool,
) -> tuple[list[Obj], list[Obj], list[Mapping[str, Any]]]:
    """The one change this tick makes to the pods: (pods to create, pods whose status to replace,
    pods to delete), at most one pod in all."""
    desired = int(deployment["spec"].get("replicas", 1))
    failed = [image for image in template_images(deployment) if not pulls.get(image, PullResult(True)).ok]
    current = [p for p in live if p["metadata"].get("labels", {}).get(POD_TEMPLATE_HASH) == pod_hash]
    old = [p for p in live if p not in current]
    unready_current = [p for p in current if not pod_ready(p)]
    ready_current = [p for p in current if pod_ready(p)]
    unready_old = [p for p in old if not pod_ready(p)]

    if desired == 0:
        # Scaling to zero needs no new pod to become ready: done in one step.
        return [], [], list(live)
    if new_rs:
        # The tick that "creates the ReplicaSet" only announces it (NewReplicaSetCreated).
        return [], [], []
    if len(current) > desired:
        return [], [], [(unready_current or current)[-1]]
    if unready_current and not failed:
        # The image became pullable (pushed late): the kubelet's back-off retry now succeeds.
        pod = copy.deepcopy(dict(unready_current[0]))
        pod["status"] = pod_status(deployment["spec"]["template"], pulls, now)
        return [], [pod], []
    if unready_old:
        # Old pods that never became ready serve nothing: no availability is lost removing them.
        return [], [], [unready_old[0]]
    if old and len(old) + len(ready_current) > desired:
        return [], [], [old[0]]
    if len(current) < desired and not unready_current and len(old) + len(current) < desired + 1:
        return [new_pod(deployment, pod_hash, suffix, pulls, now)], [], []
    return [], [], []


def _available_condition(deployment: Mapping[str, Any], available: int, now: datetime) -> Obj:
    previous = condition(deployment.get("status") or {}, "Available")
    desired = int(deployment["spec"].get("replicas", 1))
    if available >= desired - _max_unavailable(deployment, desired):
        return _set_condition(
            previous, "Available", "True", "MinimumReplicasAvailable",
            "Deployment has minimum availability.", now, touch=False,
        )  # fmt: skip
    return _set_condition(
        previous, "Available", "False", "MinimumReplicasUnavailable",
        "Deployment does not have minimum availability.", now, touch=False,
    )  # fmt: skip


def _progressing_condition(
    previous: Obj | None,
    rs: str,
    *,
    complete: bool,
    new_rs: bool,
    progressed: bool,
    deadline: timedelta,
    now: datetime,
) -> Obj:
    """The Progressing condition after this tick; ``complete`` means the current ReplicaSet has every
    replica updated and available (and was announced already)."""
    if complete:
        return _set_condition(
            previous, "Progressing", "True", "NewReplicaSetAvailable",
            f'ReplicaSet "{rs}" has successfully progressed.', now, touch=False,
        )  # fmt: skip
    if new_rs:
        return _set_condition(
            previous, "Progressing", "True", "NewReplicaSetCreated",
            f'Created new replica set "{rs}"', now, touch=True,
        )  # fmt: skip
    if progressed:
        return _set_condition(
            previous, "Progressing", "True", "ReplicaSetUpdated",
            f'ReplicaSet "{rs}" is progressing.', now, touch=True,
        )  # fmt: skip
    assert previous is not None  # new_rs covers a missing condition
    if (
        previous.get("reason") != "ProgressDeadlineExceeded"
        and parse_time(str(previous["lastUpdateTime"])) + deadline < now
    ):
        # Kubernetes' DeploymentTimedOut: no progress since the condition's last update.
        return _set_condition(
            previous, "Progressing", "False", "ProgressDeadlineExceeded",
            f'ReplicaSet "{rs}" has timed out progressing.', now, touch=False,
        )  # fmt: skip
    return previous


def rollout_settled(deployment: Mapping[str, Any]) -> bool:
    """True when the controller has nothing to do until the Deployment's spec changes again.

    Not the core's ``deployment_verdict``: rolled out is not the same as nothing to do. A rollout
    whose deadline passed (Failed there) is still stepped, because its image may be pushed late,
    and counts that are complete before the new ReplicaSet was announced (a rollback to a template
    whose pods all exist) still need the tick that writes NewReplicaSetAvailable.
    """
    status = deployment.get("status") or {}
    if status.get("observedGeneration") != deployment["metadata"].get("generation", 1):
        return False
    progressing = condition(status, "Progressing")
    return progressing is not None and progressing.get("reason") == "NewReplicaSetAvailable"
