"""The sandbox controllers' pure transitions: rollout steps, pulls, health and sync status."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from twincd.kustomize import kustomize_inputs, touches
from twincd.sandbox.controllers import (
    Comparison,
    Health,
    PullResult,
    ResourceKey,
    SyncOutcome,
    application_health,
    application_status,
    check_image_pull,
    deployment_health,
    is_in_sync,
    kubectl_message,
    next_rollout_step,
    parse_image,
    rollout_settled,
    template_hash,
)
from twincd.sandbox.controllers.health import sync_error
from twincd.sandbox.controllers.rollout_steps import pod_status

Obj = dict[str, Any]
T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
GOOD = "127.0.0.1:5000/hello@sha256:" + "a" * 64
BAD = "127.0.0.1:5000/hello@sha256:" + "b" * 64
GOOD_PULL = {GOOD: PullResult(ok=True, image_id=GOOD)}
BAD_PULL = {BAD: PullResult(ok=False, message=f"failed to resolve reference {BAD!r}: not found")}


def deployment(image: str = GOOD, replicas: int = 2, generation: int = 1, deadline: int | None = None) -> Obj:
    spec: Obj = {
        "replicas": replicas,
        "selector": {"matchLabels": {"app": "hello"}},
        "template": {
            "metadata": {"labels": {"app": "hello"}},
            "spec": {"containers": [{"name": "hello", "image": image}]},
        },
    }
    if deadline is not None:
        spec["progressDeadlineSeconds"] = deadline
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "hello", "namespace": "hello", "uid": "u-1", "generation": generation},
        "spec": spec,
    }


def with_spec(d: Obj, image: str | None = None, replicas: int | None = None) -> Obj:
    """The Deployment after a spec change: the API server bumps the generation."""
    new = copy.deepcopy(d)
    if image is not None:
        new["spec"]["template"]["spec"]["containers"][0]["image"] = image
    if replicas is not None:
        new["spec"]["replicas"] = replicas
    new["metadata"]["generation"] += 1
    return new


class Cluster:
    """Applies steps the way the controller does, so tests can watch a rollout tick by tick."""

    def __init__(self, d: Obj, pods: list[Obj] | None = None, now: datetime = T0) -> None:
        self.d = d
        self.pods: list[Obj] = pods or []
        self.now = now
        self.history: list[Obj] = []
        self.counter = 0

    def tick(self, pulls: dict[str, PullResult], dt: float = 0.2) -> Obj:
        self.counter += 1
        suffix = "bcdfghjklm"[self.counter % 10] * 5
        step = next_rollout_step(self.d, self.pods, pulls, self.now, suffix)
        updated = {p["metadata"]["name"]: p for p in step.update}
        self.pods = [
            updated.get(p["metadata"]["name"], p)
            for p in self.pods
            if p["metadata"]["name"] not in step.delete
        ]
        self.pods += list(step.create)
        self.d = {**self.d, "status": step.status}
        self.history.append(step.status)
        self.now += timedelta(seconds=dt)
        return step.status

    def run(self, pulls: dict[str, PullResult], ticks: int = 50) -> Obj:
        for _ in range(ticks):
            if rollout_settled(self.d):
                break
            self.tick(pulls)
        return self.d["status"]


def condition(status: Obj, kind: str) -> Obj:
    return next(c for c in status["conditions"] if c["type"] == kind)


def rs_name(d: Obj) -> str:
    return f"hello-{template_hash(d['spec']['template'])}"


# --- images -------------------------------------------------------------------------------------


def test_parse_image_by_digest_tag_and_without_registry() -> None:
    by_digest = parse_image(GOOD)
    assert by_digest is not None
    assert by_digest.manifest_url == f"http://127.0.0.1:5000/v2/hello/manifests/sha256:{'a' * 64}"
    tagged = parse_image("registry.example.com/team/hello:1.2.3")
    assert tagged is not None and (tagged.repository, tagged.reference) == ("team/hello", "1.2.3")
    both = parse_image(f"localhost:5000/hello:1.0@sha256:{'c' * 64}")
    assert both is not None and (both.repository, both.reference) == ("hello", f"sha256:{'c' * 64}")
    assert parse_image("127.0.0.1:5000/hello") is not None
    assert parse_image("127.0.0.1:5000/hello").reference == "latest"  # type: ignore[union-attr]
    assert parse_image("nginx:1.27") is None
    assert parse_image("library/nginx") is None


def test_only_the_stacks_own_registries_are_pulled_from() -> None:
    """A real cluster pulls third-party images; the sandbox checks only the registries it serves."""
    for foreign in (
        "ghcr.io/org/exporter:v1",
        "prom/statsd-exporter:v0.27.1",
        "quay.io/a/b@sha256:" + "d" * 64,
    ):
        assert check_image_pull(foreign) == PullResult(ok=True, image_id=foreign)
    refused = check_image_pull("127.0.0.1:1/hello:v1")  # the stack's kind of address: really asked
    assert not refused.ok and "127.0.0.1:1/hello:v1" in refused.message


def test_template_hash_is_stable_and_changes_with_the_template() -> None:
    d = deployment()
    assert template_hash(d["spec"]["template"]) == template_hash(copy.deepcopy(d["spec"]["template"]))
    assert template_hash(d["spec"]["template"]) != template_hash(with_spec(d, image=BAD)["spec"]["template"])
    assert set(template_hash(d["spec"]["template"])) <= set("bcdfghjklmnpqrstvwxz2456789")


# --- rollouts -----------------------------------------------------------------------------------


def test_first_rollout_announces_the_replicaset_then_adds_a_replica_per_tick() -> None:
    c = Cluster(deployment(replicas=3))
    first = c.tick(GOOD_PULL)
    assert first["observedGeneration"] == 1
    assert condition(first, "Progressing")["reason"] == "NewReplicaSetCreated"
    assert condition(first, "Progressing")["message"] == f'Created new replica set "{rs_name(c.d)}"'
    assert first["updatedReplicas"] == 0 and c.pods == []

    status = c.run(GOOD_PULL)
    assert [s["updatedReplicas"] for s in c.history] == [0, 1, 2, 3]
    assert status["replicas"] == status["readyReplicas"] == status["availableReplicas"] == 3
    assert status["unavailableReplicas"] == 0
    assert condition(status, "Available")["reason"] == "MinimumReplicasAvailable"
    progressing = condition(status, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("True", "NewReplicaSetAvailable")
    assert progressing["message"] == f'ReplicaSet "{rs_name(c.d)}" has successfully progressed.'
    assert rollout_settled(c.d)


def test_pods_carry_labels_owner_and_the_pulled_digest() -> None:
    c = Cluster(deployment(replicas=1))
    c.run(GOOD_PULL)
    (pod,) = c.pods
    pod_hash = template_hash(c.d["spec"]["template"])
    assert pod["metadata"]["name"].startswith(f"hello-{pod_hash}-")
    assert pod["metadata"]["labels"] == {"app": "hello", "pod-template-hash": pod_hash}
    assert pod["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert pod["status"]["phase"] == "Running"
    (container,) = pod["status"]["containerStatuses"]
    assert (container["image"], container["imageID"], container["ready"]) == (GOOD, GOOD, True)


def test_init_containers_complete_before_the_containers_start() -> None:
    """As the kubelet reports it: init containers terminated Completed, then containers running;
    an init image that cannot be pulled keeps the pod Pending, its containers PodInitializing."""
    sidecar = "docker.io/prom/statsd-exporter:v0.27.1"
    template = {
        "spec": {
            "initContainers": [{"name": "migrate", "image": "busybox:1.36"}],
            "containers": [{"name": "hello", "image": GOOD}, {"name": "metrics", "image": sidecar}],
        }
    }
    ok = pod_status(template, GOOD_PULL, T0)
    (init,) = ok["initContainerStatuses"]
    assert init["state"]["terminated"]["reason"] == "Completed" and init["ready"] is True
    assert ok["phase"] == "Running" and [s["ready"] for s in ok["containerStatuses"]] == [True, True]
    stuck = pod_status(template, {**GOOD_PULL, "busybox:1.36": PullResult(ok=False, message="not found")}, T0)
    assert stuck["phase"] == "Pending"
    assert stuck["initContainerStatuses"][0]["state"]["waiting"]["reason"] == "ImagePullBackOff"
    initialized = next(c for c in stuck["conditions"] if c["type"] == "Initialized")
    assert (initialized["status"], initialized["reason"]) == ("False", "ContainersNotInitialized")
    assert {s["state"]["waiting"]["reason"] for s in stuck["containerStatuses"]} == {"PodInitializing"}


def test_rolling_update_keeps_availability_and_removes_old_pods() -> None:
    c = Cluster(deployment(replicas=2))
    c.run(GOOD_PULL)
    old_pods = {p["metadata"]["name"] for p in c.pods}
    newer = "127.0.0.1:5000/hello@sha256:" + "d" * 64
    c.d = with_spec(c.d, image=newer)
    pulls = {newer: PullResult(ok=True, image_id=newer)}
    before = len(c.history)
    status = c.run(pulls)
    during = c.history[before:]
    assert min(s["availableReplicas"] for s in during) == 2  # maxUnavailable 0: never below desired
    assert max(s["replicas"] for s in during) == 3  # one surge pod at a time
    assert status["observedGeneration"] == 2 and status["updatedReplicas"] == 2 and status["replicas"] == 2
    assert not old_pods & {p["metadata"]["name"] for p in c.pods}
    assert {p["status"]["containerStatuses"][0]["imageID"] for p in c.pods} == {newer}
    assert condition(status, "Progressing")["reason"] == "NewReplicaSetAvailable"
    reasons = [condition(s, "Progressing")["reason"] for s in during]
    assert "NewReplicaSetCreated" in reasons and "ReplicaSetUpdated" in reasons


def test_scale_to_zero_is_complete_at_once() -> None:
    c = Cluster(deployment(replicas=2))
    c.run(GOOD_PULL)
    c.d = with_spec(c.d, replicas=0)
    status = c.tick(GOOD_PULL)
    assert c.pods == []
    assert status["replicas"] == status["updatedReplicas"] == status["availableReplicas"] == 0
    assert condition(status, "Available")["status"] == "True"
    assert condition(status, "Progressing")["reason"] == "NewReplicaSetAvailable"
    assert rollout_settled(c.d)
    assert deployment_health(c.d) == Health("Healthy")


def test_pull_failure_times_out_exactly_like_kubernetes() -> None:
    c = Cluster(deployment(replicas=2))
    c.run(GOOD_PULL)
    c.d = with_spec(c.d, image=BAD)
    c.d["spec"]["progressDeadlineSeconds"] = 3
    for _ in range(5):
        status = c.tick(BAD_PULL)
    # One surge pod stuck in ImagePullBackOff; the old pods keep serving.
    stuck = [p for p in c.pods if p["status"]["phase"] == "Pending"]
    assert len(stuck) == 1
    waiting = stuck[0]["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting["reason"] == "ImagePullBackOff"
    assert waiting["message"].startswith(f'Back-off pulling image "{BAD}"')
    assert status["updatedReplicas"] == 1 and status["availableReplicas"] == 2 and status["replicas"] == 3
    assert condition(status, "Progressing")["reason"] == "ReplicaSetUpdated"
    assert condition(status, "Available")["status"] == "True"
    assert deployment_health(c.d).status == "Progressing"

    c.now += timedelta(seconds=3)
    status = c.tick(BAD_PULL)
    progressing = condition(status, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("False", "ProgressDeadlineExceeded")
    assert progressing["message"] == f'ReplicaSet "{rs_name(c.d)}" has timed out progressing.'
    assert deployment_health(c.d) == Health("Degraded", progressing["message"])
    assert not rollout_settled(c.d)  # still watched: the image may be pushed later

    # Pushed late: the kubelet's retry succeeds and the rollout completes.
    status = c.run({BAD: PullResult(ok=True, image_id=BAD)})
    assert condition(status, "Progressing")["reason"] == "NewReplicaSetAvailable"
    assert {p["status"]["containerStatuses"][0]["imageID"] for p in c.pods} == {BAD}


def test_first_rollout_with_a_missing_image_is_unavailable_and_uses_the_default_deadline() -> None:
    c = Cluster(deployment(image=BAD, replicas=1))
    for _ in range(4):
        status = c.tick(BAD_PULL)
    assert (condition(status, "Available")["status"], status["unavailableReplicas"]) == ("False", 1)
    c.now += timedelta(seconds=599)
    assert condition(c.tick(BAD_PULL), "Progressing")["reason"] == "ReplicaSetUpdated"
    c.now += timedelta(seconds=2)
    assert condition(c.tick(BAD_PULL), "Progressing")["reason"] == "ProgressDeadlineExceeded"


# --- health and sync ----------------------------------------------------------------------------


def test_deployment_health_follows_gitops_engine() -> None:
    d = deployment()
    assert deployment_health(None).status == "Missing"
    assert deployment_health(d).message.endswith(
        "observed deployment generation less than desired generation"
    )
    d["status"] = {"observedGeneration": 1, "updatedReplicas": 1, "replicas": 2, "availableReplicas": 1}
    assert (
        deployment_health(d).message
        == "Waiting for rollout to finish: 1 out of 2 new replicas have been updated..."
    )
    d["status"] = {"observedGeneration": 1, "updatedReplicas": 2, "replicas": 3, "availableReplicas": 3}
    assert (
        deployment_health(d).message
        == "Waiting for rollout to finish: 1 old replicas are pending termination..."
    )
    d["status"] = {"observedGeneration": 1, "updatedReplicas": 2, "replicas": 2, "availableReplicas": 2}
    assert deployment_health(d) == Health("Healthy")
    d["spec"]["paused"] = True
    assert deployment_health(d).status == "Suspended"


def test_application_health_is_the_worst_resource() -> None:
    assert application_health([]) == Health("Healthy")
    assert application_health([Health("Healthy"), Health("Progressing", "p")]) == Health("Progressing", "p")
    assert application_health([Health("Degraded", "d"), Health("Missing")]) == Health("Degraded", "d")
    assert application_health([Health("Progressing"), Health("Missing")]).status == "Missing"


def test_is_in_sync_ignores_server_fields_and_extra_live_metadata() -> None:
    desired = deployment()
    live = copy.deepcopy(desired)
    live["metadata"].update(resourceVersion="7", labels={"extra": "x"})
    live["status"] = {"replicas": 2}
    assert is_in_sync(desired, live)
    assert not is_in_sync(desired, None)
    assert not is_in_sync(with_spec(desired, replicas=3), live)
    desired["metadata"]["annotations"] = {"a": "1"}
    assert not is_in_sync(desired, live)


SOURCE = {"repoURL": "repo.git", "path": "overlays/eks/hello", "targetRevision": "main"}


def test_application_status_of_a_failed_render_is_unknown_with_a_comparison_error() -> None:
    message = (
        "Failed to load target state: ... `kustomize build overlays/eks/hello` failed exit status 1: boom"
    )
    comparison = Comparison("abc123", "Unknown", error=message)
    conditions = (("ComparisonError", message),)
    status = application_status(comparison, None, Health("Missing"), {}, SOURCE, conditions, "t2")
    assert status["sync"] == {"status": "Unknown", "revision": "abc123", "comparedTo": {"source": SOURCE}}
    assert status["conditions"] == [
        {"type": "ComparisonError", "message": message, "lastTransitionTime": "t2"}
    ]
    assert "operationState" not in status  # nothing was synced
    assert status["reconciledAt"] == "t2"


def test_application_status_of_a_failed_automated_sync_carries_argo_cds_sync_error() -> None:
    failed = SyncOutcome("abc123", "Failed", "one or more objects failed to apply, reason: bad", "t0", "t1")
    conditions = (("SyncError", sync_error(failed)),)
    status = application_status(
        Comparison("abc123", "OutOfSync"), failed, Health("Healthy"), {}, SOURCE, conditions, "t2"
    )
    state = status["operationState"]
    assert (state["phase"], state["syncResult"]["revision"], state["finishedAt"]) == (
        "Failed",
        "abc123",
        "t1",
    )
    assert state["operation"] == {"sync": {"revision": "abc123"}, "initiatedBy": {"automated": True}}
    assert status["conditions"][0]["message"] == (
        "Failed last sync attempt to [abc123]: one or more objects failed to apply, reason: bad"
    )


def test_a_requested_sync_names_who_requested_it() -> None:
    manual = SyncOutcome("abc123", "Running", "one or more tasks are running", "t0", "", "twincd")
    status = application_status(
        Comparison("abc123", "OutOfSync"), manual, Health("Healthy"), {}, SOURCE, (), "t2"
    )
    assert status["operationState"]["operation"]["initiatedBy"] == {"username": "twincd"}
    assert "finishedAt" not in status["operationState"] and "conditions" not in status


def test_application_status_lists_resources_with_their_health() -> None:
    key = ResourceKey("apps/v1", "Deployment", "hello", "hello")
    comparison = Comparison("abc", "Synced", (key,), (GOOD,))
    outcome = SyncOutcome("abc", "Succeeded", "ok", "t0", "t1")
    status = application_status(
        comparison, outcome, Health("Healthy"), {key: Health("Healthy")}, SOURCE, (), "t2"
    )
    assert status["sync"]["status"] == "Synced"
    assert status["resources"] == [
        {
            "group": "apps",
            "version": "v1",
            "kind": "Deployment",
            "namespace": "hello",
            "name": "hello",
            "status": "Synced",
            "health": {"status": "Healthy", "message": ""},
        }
    ]
    assert status["summary"] == {"images": [GOOD]}


def test_kustomize_inputs_follow_resources_components_and_generator_files(tmp_path: Path) -> None:
    files = {
        "services/hello/base/kustomization.yaml": "resources: [deployment.yaml]\n",
        "services/hello/base/deployment.yaml": "kind: Deployment\n",
        "components/active/kustomization.yaml": "kind: Component\n",
        "config/shared.env": "A=1\n",
        "deploy/eks/hello/kustomization.yaml": (
            "resources: [../../../services/hello/base]\n"
            "components: [../../../components/active]\n"
            "configMapGenerator: [{name: c, envs: [../../../config/shared.env]}]\n"
            "patches: [{path: replicas.yaml}]\n"
            "images: [{name: hello, newName: registry.example/hello}]\n"
        ),
        "deploy/eks/other/kustomization.yaml": "resources: [../../../services/other]\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    inputs = kustomize_inputs(tmp_path, "deploy/eks/hello")
    assert inputs == {
        "deploy/eks/hello",
        "services/hello/base",
        "services/hello/base/deployment.yaml",
        "components/active",
        "config/shared.env",
    }
    assert touches(["services/hello/base/deployment.yaml"], inputs)
    assert touches(["config/shared.env"], inputs)
    assert not touches(["deploy/eks/other/kustomization.yaml", "services/other/x.yaml"], inputs)
    assert not touches(["deploy/eks/hello-two/kustomization.yaml"], inputs)  # a sibling with a longer name


def test_kubectl_message_drops_the_klog_header_and_the_export_dir() -> None:
    stderr = (
        'E1126 02:23:23.020304    9071 run.go:72] "command failed" err="accumulating resources: '
        "accumulation err='accumulating resources from '../../../base/nope': "
        "'/tmp/x/tree/base/nope' must resolve to a file'\"\n"
    )
    assert kubectl_message(stderr, Path("/tmp/x/tree")) == (
        "accumulating resources: accumulation err='accumulating resources from '../../../base/nope': "
        "'base/nope' must resolve to a file'"
    )
    assert kubectl_message("error: plain\n", Path("/r")) == "error: plain"
