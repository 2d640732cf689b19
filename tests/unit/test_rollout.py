"""Rollout verdicts on objects shaped as `kubectl get -o json` prints them."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from twincd.domain import Phase, RolloutVerdict
from twincd.rollout import (
    application_verdict,
    combine,
    daemonset_verdict,
    deployment_verdict,
    label_selector,
    pods_verdict,
    statefulset_verdict,
    synced_at,
    workload_verdict,
)

NEW = "sha256:" + "b" * 64
OLD = "sha256:" + "a" * 64
IMAGE = "127.0.0.1:5000/hello"
MERGE = "3f2c9e1d0b8a7f6e5d4c3b2a190817263544abcd"
PREVIOUS = "0c1d2e3f405162738495a6b7c8d9e0f1a2b3c4d5"

# A Deployment mid-rollout as the API server returns it (fields trimmed to what a real one has).
DEPLOYMENT: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {
        "annotations": {"deployment.kubernetes.io/revision": "4"},
        "creationTimestamp": "2026-11-20T09:12:44Z",
        "generation": 4,
        "labels": {"app.kubernetes.io/instance": "hello-eks", "app.kubernetes.io/name": "hello"},
        "name": "hello",
        "namespace": "hello",
        "resourceVersion": "981245",
        "uid": "6f1c0a55-2b7e-4f6e-9c1d-0d4b3f6a8e21",
    },
    "spec": {
        "progressDeadlineSeconds": 600,
        "replicas": 3,
        "revisionHistoryLimit": 10,
        "selector": {"matchLabels": {"app.kubernetes.io/name": "hello"}},
        "strategy": {"rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}, "type": "RollingUpdate"},
        "template": {
            "metadata": {"creationTimestamp": None, "labels": {"app.kubernetes.io/name": "hello"}},
            "spec": {
                "containers": [
                    {
                        "image": f"{IMAGE}@{NEW}",
                        "imagePullPolicy": "IfNotPresent",
                        "name": "hello",
                        "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                        "resources": {},
                        "terminationMessagePath": "/dev/termination-log",
                        "terminationMessagePolicy": "File",
                    }
                ],
                "dnsPolicy": "ClusterFirst",
                "restartPolicy": "Always",
                "schedulerName": "default-scheduler",
                "securityContext": {},
                "terminationGracePeriodSeconds": 30,
            },
        },
    },
    "status": {
        "availableReplicas": 3,
        "conditions": [
            {
                "lastTransitionTime": "2026-11-20T09:12:50Z",
                "lastUpdateTime": "2026-11-20T09:12:50Z",
                "message": "Deployment has minimum availability.",
                "reason": "MinimumReplicasAvailable",
                "status": "True",
                "type": "Available",
            },
            {
                "lastTransitionTime": "2026-11-20T09:12:44Z",
                "lastUpdateTime": "2026-11-26T10:01:12Z",
                "message": 'ReplicaSet "hello-7d9c6b5f4d" has successfully progressed.',
                "reason": "NewReplicaSetAvailable",
                "status": "True",
                "type": "Progressing",
            },
        ],
        "observedGeneration": 4,
        "readyReplicas": 3,
        "replicas": 3,
        "updatedReplicas": 3,
    },
}


def deployment(**status: Any) -> dict[str, Any]:
    obj = copy.deepcopy(DEPLOYMENT)
    obj["status"].update(status)
    return obj


def test_rolled_out_deployment_succeeds() -> None:
    v = deployment_verdict(DEPLOYMENT, cluster="eks", digest=NEW)
    assert v == RolloutVerdict(
        "eks",
        Phase.SUCCEEDED,
        'deployment "hello" successfully rolled out',
        ("replicas 3 desired, 3 current, 3 updated, 3 available",),
    )


def test_template_still_at_old_image_is_progressing() -> None:
    obj = copy.deepcopy(DEPLOYMENT)
    obj["spec"]["template"]["spec"]["containers"][0]["image"] = f"{IMAGE}@{OLD}"
    v = deployment_verdict(obj, cluster="aks", digest=NEW)
    assert v.phase is Phase.PROGRESSING
    assert "template still at old image" in v.message
    assert v.details == (f"image {IMAGE}@{OLD}",)
    # Without a digest to look for, the same object is judged on its status alone.
    assert deployment_verdict(obj, cluster="aks", digest=None).phase is Phase.SUCCEEDED


def test_init_container_at_old_image_is_progressing() -> None:
    obj = copy.deepcopy(DEPLOYMENT)
    obj["spec"]["template"]["spec"]["initContainers"] = [{"name": "migrate", "image": f"{IMAGE}:v1.0.0"}]
    assert deployment_verdict(obj, cluster="eks", digest=NEW).phase is Phase.PROGRESSING


def test_sidecars_and_init_containers_of_other_images_are_not_the_release() -> None:
    """With the app's repository named, only its containers must carry the digest: a mesh proxy
    pinned by tag and a migration init container from another image do not hold the rollout."""
    obj = copy.deepcopy(DEPLOYMENT)
    spec = obj["spec"]["template"]["spec"]
    spec["containers"].append({"name": "envoy", "image": "docker.io/envoyproxy/envoy:v1.31.0"})
    spec["initContainers"] = [{"name": "migrate", "image": "ghcr.io/acme/migrate:2024.11"}]
    assert deployment_verdict(obj, cluster="eks", digest=NEW, repository=IMAGE).phase is Phase.SUCCEEDED
    # Without the repository every container counts, as before: the sidecar holds it forever.
    assert deployment_verdict(obj, cluster="eks", digest=NEW).phase is Phase.PROGRESSING
    spec["containers"][0]["image"] = f"{IMAGE}@{OLD}"
    stale = deployment_verdict(obj, cluster="eks", digest=NEW, repository=IMAGE)
    assert stale.phase is Phase.PROGRESSING and stale.details == (f"image {IMAGE}@{OLD}",)
    # A template that does not run the app's image at all (not synced yet) waits, saying so.
    spec["containers"] = [{"name": "envoy", "image": "docker.io/envoyproxy/envoy:v1.31.0"}]
    missing = workload_verdict(obj, cluster="eks", digest=NEW, repository=IMAGE)
    assert missing.phase is Phase.PROGRESSING and f"runs no {IMAGE} image" in missing.message


def test_spec_update_not_observed_yet() -> None:
    obj = deployment(observedGeneration=3)
    obj["metadata"]["generation"] = 4
    v = deployment_verdict(obj, cluster="eks", digest=NEW)
    assert (v.phase, v.message) == (Phase.PROGRESSING, "Waiting for deployment spec update to be observed...")


def test_new_replicas_being_updated() -> None:
    v = deployment_verdict(
        deployment(replicas=4, updatedReplicas=1, availableReplicas=3), cluster="eks", digest=NEW
    )
    assert v.phase is Phase.PROGRESSING
    assert (
        v.message
        == 'Waiting for deployment "hello" rollout to finish: 1 out of 3 new replicas have been updated...'
    )


def test_old_replicas_pending_termination() -> None:
    v = deployment_verdict(deployment(replicas=4, updatedReplicas=3), cluster="eks", digest=NEW)
    assert (
        v.message
        == 'Waiting for deployment "hello" rollout to finish: 1 old replicas are pending termination...'
    )
    assert v.phase is Phase.PROGRESSING


def test_updated_replicas_not_available_yet() -> None:
    v = deployment_verdict(deployment(availableReplicas=2, readyReplicas=2), cluster="eks", digest=NEW)
    assert (
        v.message
        == 'Waiting for deployment "hello" rollout to finish: 2 of 3 updated replicas are available...'
    )


def test_progress_deadline_exceeded_fails_at_once() -> None:
    obj = deployment(availableReplicas=3, updatedReplicas=1, replicas=4, unavailableReplicas=1)
    obj["status"]["conditions"][1] = {
        "lastTransitionTime": "2026-11-26T10:11:12Z",
        "lastUpdateTime": "2026-11-26T10:11:12Z",
        "message": 'ReplicaSet "hello-5f8d7c9b6a" has timed out progressing.',
        "reason": "ProgressDeadlineExceeded",
        "status": "False",
        "type": "Progressing",
    }
    v = deployment_verdict(obj, cluster="aks", digest=NEW)
    assert v.phase is Phase.FAILED
    assert v.message == (
        'deployment "hello" exceeded its progress deadline: '
        'ReplicaSet "hello-5f8d7c9b6a" has timed out progressing.'
    )


def test_standby_deployment_scaled_to_zero_succeeds() -> None:
    obj = copy.deepcopy(DEPLOYMENT)
    obj["spec"]["replicas"] = 0
    # The API server omits zero counters: a scaled-down status has only observedGeneration and conditions.
    obj["status"] = {"conditions": DEPLOYMENT["status"]["conditions"], "observedGeneration": 4}
    v = deployment_verdict(obj, cluster="aks", digest=NEW)
    assert v.phase is Phase.SUCCEEDED
    assert "scaled to zero (standby)" in v.message


def test_scaling_to_zero_waits_for_old_pods_to_go() -> None:
    obj = deployment(replicas=2, updatedReplicas=0, availableReplicas=2)
    obj["spec"]["replicas"] = 0
    v = deployment_verdict(obj, cluster="aks", digest=NEW)
    assert v.phase is Phase.PROGRESSING and "2 old replicas are pending termination" in v.message


STATEFULSET: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "StatefulSet",
    "metadata": {
        "generation": 2,
        "name": "db",
        "namespace": "hello",
        "uid": "0a5e7c4e-1f1b-4c43-9d0e-5a1c9b2d7e11",
    },
    "spec": {
        "podManagementPolicy": "OrderedReady",
        "replicas": 3,
        "selector": {"matchLabels": {"app": "db"}},
        "serviceName": "db",
        "template": {
            "metadata": {"labels": {"app": "db"}},
            "spec": {"containers": [{"image": f"{IMAGE}@{NEW}", "name": "db"}]},
        },
        "updateStrategy": {"rollingUpdate": {"partition": 0}, "type": "RollingUpdate"},
    },
    "status": {
        "availableReplicas": 3,
        "collisionCount": 0,
        "currentReplicas": 3,
        "currentRevision": "db-6c8f9d7b5c",
        "observedGeneration": 2,
        "readyReplicas": 3,
        "replicas": 3,
        "updateRevision": "db-6c8f9d7b5c",
        "updatedReplicas": 3,
    },
}


def test_statefulset_verdicts() -> None:
    done = statefulset_verdict(STATEFULSET, cluster="eks", digest=NEW)
    assert (done.phase, done.message) == (
        Phase.SUCCEEDED,
        "partitioned roll out complete: 3 new pods have been updated...",
    )

    waiting = copy.deepcopy(STATEFULSET)
    waiting["status"].update(readyReplicas=1)
    assert (
        statefulset_verdict(waiting, cluster="eks", digest=NEW).message == "Waiting for 2 pods to be ready..."
    )

    partitioned = copy.deepcopy(STATEFULSET)
    partitioned["spec"]["updateStrategy"]["rollingUpdate"]["partition"] = 1
    partitioned["status"].update(updatedReplicas=1)
    assert statefulset_verdict(partitioned, cluster="eks", digest=NEW).message == (
        "Waiting for partitioned roll out to finish: 1 out of 2 new pods have been updated..."
    )

    no_partition = copy.deepcopy(STATEFULSET)
    del no_partition["spec"]["updateStrategy"]["rollingUpdate"]
    no_partition["status"].update(updateRevision="db-7d9e8f6a4b", updatedReplicas=1)
    v = statefulset_verdict(no_partition, cluster="eks", digest=NEW)
    assert (v.phase, v.message) == (
        Phase.PROGRESSING,
        "waiting for statefulset rolling update to complete 1 pods at revision db-7d9e8f6a4b...",
    )

    unobserved = copy.deepcopy(STATEFULSET)
    unobserved["status"]["observedGeneration"] = 1
    assert statefulset_verdict(unobserved, cluster="eks", digest=NEW).message == (
        "Waiting for statefulset spec update to be observed..."
    )

    on_delete = copy.deepcopy(STATEFULSET)
    on_delete["spec"]["updateStrategy"] = {"type": "OnDelete"}
    assert statefulset_verdict(on_delete, cluster="eks", digest=NEW).phase is Phase.FAILED


DAEMONSET: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "DaemonSet",
    "metadata": {"generation": 5, "name": "agent", "namespace": "hello"},
    "spec": {
        "selector": {"matchLabels": {"app": "agent"}},
        "template": {
            "metadata": {"labels": {"app": "agent"}},
            "spec": {"containers": [{"image": f"{IMAGE}@{NEW}", "name": "agent"}]},
        },
        "updateStrategy": {"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}, "type": "RollingUpdate"},
    },
    "status": {
        "currentNumberScheduled": 2,
        "desiredNumberScheduled": 2,
        "numberAvailable": 2,
        "numberMisscheduled": 0,
        "numberReady": 2,
        "observedGeneration": 5,
        "updatedNumberScheduled": 2,
    },
}


def test_daemonset_verdicts() -> None:
    assert (
        daemonset_verdict(DAEMONSET, cluster="eks", digest=NEW).message
        == 'daemon set "agent" successfully rolled out'
    )
    rolling = copy.deepcopy(DAEMONSET)
    rolling["status"].update(updatedNumberScheduled=1, numberAvailable=1)
    v = daemonset_verdict(rolling, cluster="eks", digest=NEW)
    assert (v.phase, v.message) == (
        Phase.PROGRESSING,
        'Waiting for daemon set "agent" rollout to finish: 1 out of 2 new pods have been updated...',
    )
    unavailable = copy.deepcopy(DAEMONSET)
    unavailable["status"].update(numberAvailable=1)
    assert daemonset_verdict(unavailable, cluster="eks", digest=NEW).message == (
        'Waiting for daemon set "agent" rollout to finish: 1 of 2 updated pods are available...'
    )


def test_workload_verdict_dispatches_on_kind() -> None:
    assert workload_verdict(STATEFULSET, cluster="eks", digest=NEW).message.startswith(
        "partitioned roll out complete"
    )
    assert workload_verdict(DAEMONSET, cluster="eks", digest=NEW).phase is Phase.SUCCEEDED
    assert workload_verdict({"kind": "CronJob"}, cluster="eks", digest=NEW).phase is Phase.FAILED


# An Argo CD Application as `kubectl get application -o json` prints it (trimmed).
APPLICATION: dict[str, Any] = {
    "apiVersion": "argoproj.io/v1alpha1",
    "kind": "Application",
    "metadata": {"name": "hello-eks", "namespace": "argocd", "generation": 812},
    "spec": {
        "destination": {"name": "eks", "namespace": "hello"},
        "project": "default",
        "source": {
            "path": "overlays/eks/hello",
            "repoURL": "git://127.0.0.1:9418/manifests.git",
            "targetRevision": "main",
        },
        "syncPolicy": {"automated": {"prune": True, "selfHeal": True}},
    },
    "status": {
        "health": {"status": "Healthy"},
        "operationState": {
            "finishedAt": "2026-11-26T10:02:03Z",
            "message": "successfully synced (all tasks run)",
            "operation": {"initiatedBy": {"automated": True}, "sync": {"revision": MERGE}},
            "phase": "Succeeded",
            "startedAt": "2026-11-26T10:02:01Z",
            "syncResult": {"revision": MERGE, "source": {"path": "overlays/eks/hello"}},
        },
        "reconciledAt": "2026-11-26T10:02:03Z",
        "sync": {
            "comparedTo": {"source": {"path": "overlays/eks/hello"}},
            "revision": MERGE,
            "status": "Synced",
        },
    },
}


def application(**status: Any) -> dict[str, Any]:
    obj = copy.deepcopy(APPLICATION)
    for key, value in status.items():
        obj["status"][key] = value
    return obj


def test_application_synced_and_healthy_succeeds() -> None:
    v = application_verdict(APPLICATION, cluster="eks", revision=MERGE)
    assert (v.phase, v.message) == (Phase.SUCCEEDED, 'Application "hello-eks" Synced and Healthy at 3f2c9e1')
    # An abbreviated revision names the same commit.
    assert application_verdict(APPLICATION, cluster="eks", revision=MERGE[:7]).phase is Phase.SUCCEEDED


def test_application_still_at_previous_revision_is_progressing() -> None:
    obj = application(sync={"revision": PREVIOUS, "status": "OutOfSync"})
    v = application_verdict(obj, cluster="eks", revision=MERGE)
    assert v.phase is Phase.PROGRESSING
    assert v.message == 'Application "hello-eks" synced to 0c1d2e3, waiting for 3f2c9e1'


def test_application_synced_but_progressing_health_waits() -> None:
    v = application_verdict(application(health={"status": "Progressing"}), cluster="eks", revision=MERGE)
    assert v.phase is Phase.PROGRESSING and "waiting for Healthy" in v.message


def test_application_degraded_at_revision_fails() -> None:
    obj = application(
        health={"status": "Degraded", "message": 'Deployment "hello" exceeded its progress deadline'}
    )
    v = application_verdict(obj, cluster="aks", revision=MERGE)
    assert v.phase is Phase.FAILED
    assert v.message.endswith('Deployment "hello" exceeded its progress deadline')


def test_application_degraded_at_older_revision_keeps_waiting() -> None:
    obj = application(health={"status": "Degraded"}, sync={"revision": PREVIOUS, "status": "OutOfSync"})
    assert application_verdict(obj, cluster="aks", revision=MERGE).phase is Phase.PROGRESSING


def test_application_degraded_while_its_sync_runs_keeps_waiting() -> None:
    """The health is still the previous revision's objects' until the sync of this one is done."""
    op = {
        "phase": "Running",
        "message": "one or more tasks are running",
        "operation": {"sync": {"revision": MERGE}},
    }
    obj = application(
        health={"status": "Degraded", "message": 'ReplicaSet "hello-5f8d7c9b6a" has timed out'},
        sync={"revision": MERGE, "status": "OutOfSync"},
        operationState=op,
    )
    v = application_verdict(obj, cluster="eks", revision=MERGE)
    assert v.phase is Phase.PROGRESSING and "waiting for Synced" in v.message


def test_application_failed_sync_operation_fails_with_argo_message() -> None:
    op = copy.deepcopy(APPLICATION["status"]["operationState"])
    op.update(
        phase="Failed",
        message='one or more objects failed to apply, reason: Deployment.apps "hello" is invalid',
    )
    obj = application(
        operationState=op,
        sync={"revision": PREVIOUS, "status": "OutOfSync"},
        conditions=[
            {
                "type": "SyncError",
                "message": "Failed sync attempt to 3f2c9e1d: one or more objects failed to apply",
                "lastTransitionTime": "2026-11-26T10:02:03Z",
            }
        ],
    )
    v = application_verdict(obj, cluster="aks", revision=MERGE)
    assert v.phase is Phase.FAILED
    assert v.message == (
        'Application "hello-eks" sync of 3f2c9e1 failed: one or more objects failed to apply, '
        'reason: Deployment.apps "hello" is invalid'
    )
    assert "SyncError: Failed sync attempt to 3f2c9e1d: one or more objects failed to apply" in v.details


def test_application_running_operation_is_progressing() -> None:
    op = {
        "phase": "Running",
        "message": "waiting for healthy state of apps/Deployment/hello",
        "operation": {"sync": {"revision": MERGE}},
    }
    obj = application(operationState=op, sync={"revision": PREVIOUS, "status": "OutOfSync"})
    v = application_verdict(obj, cluster="eks", revision=MERGE)
    assert v.phase is Phase.PROGRESSING and "sync operation running" in v.message


def test_application_without_status_yet() -> None:
    obj = copy.deepcopy(APPLICATION)
    del obj["status"]
    v = application_verdict(obj, cluster="eks", revision=MERGE)
    assert (v.phase, v.message) == (
        Phase.PROGRESSING,
        'Application "hello-eks" not synced yet, waiting for 3f2c9e1',
    )


@pytest.mark.parametrize(
    ("app", "workload", "expected"),
    [
        (Phase.SUCCEEDED, Phase.SUCCEEDED, Phase.SUCCEEDED),
        (Phase.SUCCEEDED, Phase.PROGRESSING, Phase.PROGRESSING),
        (Phase.PROGRESSING, Phase.SUCCEEDED, Phase.PROGRESSING),
        (Phase.PROGRESSING, Phase.FAILED, Phase.FAILED),
        (Phase.FAILED, Phase.SUCCEEDED, Phase.FAILED),
    ],
)
def test_combine(app: Phase, workload: Phase, expected: Phase) -> None:
    v = combine(
        RolloutVerdict("eks", app, "app says", ("a",)),
        RolloutVerdict("eks", workload, "workload says", ("w",)),
    )
    assert v.phase is expected and v.cluster == "eks" and v.details == ("a", "w")
    if expected is Phase.FAILED:
        assert v.message == ("app says" if app is Phase.FAILED else "workload says")


def pod(name: str, image_id: str, *, ready: bool = True, **meta: Any) -> dict[str, Any]:
    """A Pod as `kubectl get pod -o json` prints it (trimmed), running or stuck pulling."""
    flag = "True" if ready else "False"
    state = (
        {"running": {"startedAt": "2026-11-26T10:01:02Z"}}
        if ready
        else {"waiting": {"reason": "ImagePullBackOff", "message": f'Back-off pulling image "{IMAGE}@{NEW}"'}}
    )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "hello",
            "labels": {"app.kubernetes.io/name": "hello"},
            **meta,
        },
        "spec": {"containers": [{"name": "hello", "image": f"{IMAGE}@{NEW}"}]},
        "status": {
            "phase": "Running" if ready else "Pending",
            "conditions": [{"type": "Ready", "status": flag}, {"type": "ContainersReady", "status": flag}],
            "containerStatuses": [
                {
                    "name": "hello",
                    "image": f"{IMAGE}@{NEW}",
                    "imageID": image_id,
                    "ready": ready,
                    "restartCount": 0,
                    "started": ready,
                    "state": state,
                }
            ],
        },
    }


def test_pods_carrying_the_digest_succeed() -> None:
    pods = [pod(f"hello-7d9c6b5f4d-{s}", f"{IMAGE}@{NEW}") for s in ("x2b4c", "q9z8k", "m3n4p")]
    v = pods_verdict(DEPLOYMENT, pods, cluster="eks", digest=NEW)
    assert (v.phase, v.message) == (Phase.SUCCEEDED, "3 running pods carry bbbbbbbbbbbb")
    # Docker-based nodes prefix the repo digest; the digest is what matters.
    docker = [pod(f"hello-7d9c6b5f4d-{i}", f"docker-pullable://{IMAGE}@{NEW}") for i in range(3)]
    assert pods_verdict(DEPLOYMENT, docker, cluster="eks", digest=NEW).phase is Phase.SUCCEEDED


def test_pods_still_on_the_old_digest_keep_waiting() -> None:
    pods = [
        pod("hello-7d9c6b5f4d-a", f"{IMAGE}@{NEW}"),
        pod("hello-5f8d7c9b6a-b", f"{IMAGE}@{OLD}"),
        pod("hello-7d9c6b5f4d-c", "", ready=False),
    ]
    v = pods_verdict(DEPLOYMENT, pods, cluster="aks", digest=NEW)
    assert v.phase is Phase.PROGRESSING
    assert v.message == '1 of 3 available pods of deployment "hello" run bbbbbbbbbbbb so far'
    assert f"pod hello-5f8d7c9b6a-b Running: hello={IMAGE}@{OLD}" in v.details
    assert "pod hello-7d9c6b5f4d-c Pending: hello=" + f"{IMAGE}@{NEW} (ImagePullBackOff)" in v.details


def test_image_is_the_fallback_only_without_a_repo_digest() -> None:
    local_id = pod("hello-7d9c6b5f4d-a", "sha256:" + "c" * 64)  # a runtime reporting the config digest
    assert pods_verdict(DEPLOYMENT, [local_id] * 3, cluster="eks", digest=NEW).phase is Phase.SUCCEEDED
    moved = pod("hello-7d9c6b5f4d-b", f"{IMAGE}@{OLD}")  # the image field says NEW, the runtime OLD
    assert pods_verdict(DEPLOYMENT, [moved] * 3, cluster="eks", digest=NEW).phase is Phase.PROGRESSING


def test_terminating_pods_do_not_count() -> None:
    pods = [
        pod(f"hello-7d9c6b5f4d-{i}", f"{IMAGE}@{NEW}", deletionTimestamp="2026-11-26T10:03:00Z")
        for i in range(3)
    ]
    assert pods_verdict(DEPLOYMENT, pods, cluster="eks", digest=NEW).phase is Phase.PROGRESSING


def test_standby_has_no_pods_to_check() -> None:
    obj = copy.deepcopy(DEPLOYMENT)
    obj["spec"]["replicas"] = 0
    obj["status"] = {"conditions": DEPLOYMENT["status"]["conditions"], "observedGeneration": 4}
    v = pods_verdict(obj, [], cluster="aks", digest=NEW)
    assert (v.phase, v.message) == (
        Phase.SUCCEEDED,
        'deployment "hello" scaled to zero (standby): no pods to check',
    )


def test_partitioned_statefulset_needs_only_its_updated_pods() -> None:
    obj = copy.deepcopy(STATEFULSET)
    obj["spec"]["updateStrategy"]["rollingUpdate"]["partition"] = 2
    obj["status"].update(updatedReplicas=1)
    pods = [pod("db-2", f"{IMAGE}@{NEW}"), pod("db-1", f"{IMAGE}@{OLD}"), pod("db-0", f"{IMAGE}@{OLD}")]
    assert pods_verdict(obj, pods, cluster="eks", digest=NEW).phase is Phase.SUCCEEDED
    daemons = [pod("agent-a", f"{IMAGE}@{NEW}"), pod("agent-b", f"{IMAGE}@{NEW}")]
    assert (
        pods_verdict(DAEMONSET, daemons, cluster="eks", digest=NEW).message
        == "2 running pods carry bbbbbbbbbbbb"
    )


def test_label_selector_formats_like_kubectl() -> None:
    assert label_selector({"matchLabels": {"b": "2", "a": "1"}}) == "a=1,b=2"
    selector = {
        "matchLabels": {"app": "hello"},
        "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["web", "api"]},
            {"key": "track", "operator": "NotIn", "values": ["canary"]},
            {"key": "owner", "operator": "Exists"},
            {"key": "legacy", "operator": "DoesNotExist"},
        ],
    }
    assert label_selector(selector) == "app=hello,tier in (api,web),track notin (canary),owner,!legacy"
    assert label_selector({}) == ""


def test_synced_at_the_merge_commit_only() -> None:
    assert synced_at(APPLICATION, MERGE) and synced_at(APPLICATION, MERGE[:7])
    assert not synced_at(application(sync={"revision": PREVIOUS, "status": "Synced"}), MERGE)
    # A failed sync of the revision names it but did not apply it.
    assert not synced_at(application(sync={"revision": MERGE, "status": "OutOfSync"}), MERGE)
    assert not synced_at({"metadata": {"name": "hello-eks"}}, MERGE)


COMPARISON_ERROR = {
    "type": "ComparisonError",
    "message": "Failed to load target state: failed to generate manifest for source 1 of 1: rpc error: "
    "code = Unknown desc = `kustomize build overlays/eks/hello` failed exit status 1: boom",
    "lastTransitionTime": "2026-11-26T10:05:00Z",
}


def test_a_comparison_error_after_the_refresh_fails_at_once_with_argo_message() -> None:
    # While manifests fail to load, Argo CD shows the unresolved targetRevision as the revision.
    obj = application(sync={"revision": "main", "status": "Unknown"}, conditions=[COMPARISON_ERROR])
    v = application_verdict(obj, cluster="eks", revision=MERGE, errors_current=True)
    assert v.phase is Phase.FAILED
    assert v.message.startswith(
        'Application "hello-eks" cannot reach 3f2c9e1: ComparisonError: Failed to load'
    )
    assert v.message.endswith("failed exit status 1: boom")


def test_a_comparison_error_at_the_revision_fails_without_a_refresh() -> None:
    obj = application(sync={"revision": MERGE, "status": "Unknown"}, conditions=[COMPARISON_ERROR])
    assert application_verdict(obj, cluster="eks", revision=MERGE).phase is Phase.FAILED


def test_an_error_from_before_the_refresh_is_waited_out() -> None:
    """Main was broken before this release (which may be the fix): Argo CD has not reconciled the
    refresh request yet."""
    obj = application(sync={"revision": "main", "status": "Unknown"}, conditions=[COMPARISON_ERROR])
    v = application_verdict(obj, cluster="eks", revision=MERGE)
    assert v.phase is Phase.PROGRESSING and "waiting for 3f2c9e1" in v.message


def test_warning_conditions_never_fail() -> None:
    warning = {"type": "OrphanedResourceWarning", "message": "Application has 1 orphaned resources"}
    obj = application(conditions=[warning])
    v = application_verdict(obj, cluster="eks", revision=MERGE, errors_current=True)
    assert v.phase is Phase.SUCCEEDED
    assert "OrphanedResourceWarning: Application has 1 orphaned resources" in v.details
