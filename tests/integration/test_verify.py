"""verify_rollout and apply_overlay against sandbox clusters, through kubeconfig contexts.

Two kinds of cluster: the processes of ``test_sandbox_cluster`` (API server, Deployment controller,
Argo-CD-like syncer; one Argo CD on aks for both) with a real registry and a bare manifests repo,
for whole releases; and in-thread API servers without controllers, where the test writes the
objects' status itself, for watch mechanics (a resumed watch, a 410) and the ``sync: apply`` path.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client as k8s

from tests.integration import test_sandbox_cluster as sandbox
from tests.integration.test_sandbox_cluster import (
    BASE,
    CLUSTERS,
    Cluster,
    Manifests,
    Registry,
    overlay,
    stop_process,
)
from twincd.adapters.cluster import ApplyRejected, ClusterRef, RolloutTarget, apply_overlay, verify_rollout
from twincd.domain import Phase, RolloutVerdict
from twincd.sandbox.apiserver import RunningServer, create_app, serve_in_thread
from twincd.sandbox.contexts import write_kubeconfig
from twincd.sandbox.controllers import DeploymentController, render_overlay

pytestmark = pytest.mark.integration

# The sandbox processes, the bare manifests repo and the registry of test_sandbox_cluster, as
# module-scoped fixtures of this module (own instances: tests here commit their own releases).
clusters, manifests, registry = sandbox.clusters, sandbox.manifests, sandbox.registry

MISSING = "sha256:" + hashlib.sha256(b"never pushed").hexdigest()


@pytest.fixture(scope="module")
def kubeconfig(clusters: dict[str, Cluster], tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("kube") / "config"
    return str(write_kubeconfig(path, {name: c.url for name, c in clusters.items()}))


def target(kubeconfig: str, name: str, revision: str, digest: str | None) -> RolloutTarget:
    return RolloutTarget(
        cluster=ClusterRef(name, name, kubeconfig),
        argocd=ClusterRef(f"Argo CD of {name}", "aks", kubeconfig),  # one Argo CD, on aks
        application=f"hello-{name}",
        argocd_namespace="argocd",
        kind="Deployment",
        namespace="hello",
        name="hello",
        revision=revision,
        digest=digest,
    )


def timed(verify: Callable[[], RolloutVerdict]) -> tuple[RolloutVerdict, float]:
    started = time.monotonic()
    verdict = verify()
    return verdict, time.monotonic() - started


def verify_all(targets: list[RolloutTarget], timeout: float) -> dict[str, tuple[RolloutVerdict, float]]:
    """In parallel, as the deploy flow fans out per cluster."""
    with ThreadPoolExecutor(len(targets)) as pool:
        futures = {
            t.cluster.name: pool.submit(timed, lambda t=t: verify_rollout(t, timeout=timeout))
            for t in targets
        }
        return {name: f.result() for name, f in futures.items()}


# --- whole releases on the sandbox cluster processes (in order: each commit builds on the last) ----


def test_release_verified_on_both_clusters(
    clusters: dict[str, Cluster], manifests: Manifests, registry: Registry, kubeconfig: str
) -> None:
    digest = registry.push("hello", "1.0.0")
    image = f"{registry.host}/hello"
    sha = manifests.commit(
        {**BASE, **{f"overlays/{c}/hello/kustomization.yaml": overlay(image, digest) for c in CLUSTERS}},
        "hello 1.0.0",
    )
    results = verify_all([target(kubeconfig, c, sha, digest) for c in CLUSTERS], timeout=60)
    for name, (verdict, elapsed) in results.items():
        print(f"{name}: {verdict.phase.value} in {elapsed:.2f}s: {verdict.message}")
        assert verdict.phase is Phase.SUCCEEDED, verdict
        assert f'Application "hello-{name}" Synced and Healthy at {sha[:7]}' in verdict.message
        assert 'deployment "hello" successfully rolled out' in verdict.message
        assert f"2 running pods carry {digest[7:19]}" in verdict.message
        assert elapsed < 30  # well before the 60 s deadline


def test_missing_image_fails_at_once_with_the_progress_deadline(
    clusters: dict[str, Cluster], manifests: Manifests, registry: Registry, kubeconfig: str
) -> None:
    sha = manifests.commit(
        {
            f"overlays/{c}/hello/kustomization.yaml": overlay(f"{registry.host}/hello", MISSING)
            for c in CLUSTERS
        },
        "hello: a digest that was never pushed",
    )
    verdict, elapsed = timed(lambda: verify_rollout(target(kubeconfig, "eks", sha, MISSING), timeout=60))
    print(f"missing image: {verdict.phase.value} in {elapsed:.2f}s: {verdict.message}")
    assert verdict.phase is Phase.FAILED
    # progressDeadlineSeconds is 3 in the base: the failure comes from the cluster, long before 60 s.
    assert re.search(r'ReplicaSet "hello-\w+" has timed out progressing\.', verdict.message), verdict.message
    assert elapsed < 30  # well before the 60 s deadline


def test_argocd_comparison_error_fails_at_once(
    clusters: dict[str, Cluster], manifests: Manifests, kubeconfig: str
) -> None:
    sha = manifests.commit(
        {"overlays/eks/hello/kustomization.yaml": "resources: [../../../base/nope]\n"}, "eks: broken overlay"
    )
    verdict, elapsed = timed(lambda: verify_rollout(target(kubeconfig, "eks", sha, MISSING), timeout=60))
    print(f"comparison error: {verdict.phase.value} in {elapsed:.2f}s: {verdict.message}")
    assert verdict.phase is Phase.FAILED
    assert verdict.message.startswith(
        f'Application "hello-eks" cannot reach {sha[:7]}: ComparisonError: Failed to load target state: '
    )
    assert (
        "`kustomize build overlays/eks/hello` failed exit status 1: accumulating resources" in verdict.message
    )
    # Only Argo CD's error: the workload still runs an older revision, its state is not this release's.
    assert "progress deadline" not in verdict.message
    assert elapsed < 30  # well before the 60 s deadline


WORKER = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: worker, namespace: hello}
spec:
  replicas: 1
  progressDeadlineSeconds: 2
  selector: {matchLabels: {app: worker}}
  template:
    metadata: {labels: {app: worker}}
    spec:
      containers: [{name: worker, image: "%s"}]
"""


def test_degraded_application_fails_with_argos_message(
    clusters: dict[str, Cluster], manifests: Manifests, registry: Registry, kubeconfig: str
) -> None:
    """hello itself rolls out fine; another Deployment of the same Application never does."""
    digest = registry.push("hello", "1.0.1")
    kustomization = overlay(f"{registry.host}/hello", digest).replace(
        "resources: [../../../base/hello]", "resources: [../../../base/hello, worker.yaml]"
    )
    sha = manifests.commit(
        {
            "overlays/aks/hello/kustomization.yaml": kustomization,
            "overlays/aks/hello/worker.yaml": WORKER % f"{registry.host}/worker@{MISSING}",
        },
        "aks: hello 1.0.1 with a broken worker",
    )
    verdict, elapsed = timed(lambda: verify_rollout(target(kubeconfig, "aks", sha, digest), timeout=60))
    print(f"degraded: {verdict.phase.value} in {elapsed:.2f}s: {verdict.message}")
    assert verdict.phase is Phase.FAILED
    assert re.match(
        rf'Application "hello-aks" is Degraded at {sha[:7]}: ReplicaSet "worker-\w+" has timed out '
        r"progressing\.",
        verdict.message,
    ), verdict.message
    assert elapsed < 30  # well before the 60 s deadline


def test_argo_cd_waits_for_its_poll_unless_asked_and_twincd_syncs_a_manual_application(
    clusters: dict[str, Cluster], manifests: Manifests, registry: Registry, kubeconfig: str
) -> None:
    api = k8s.CustomObjectsApi(clusters["aks"].api)
    hello_eks = ("argoproj.io", "v1alpha1", "argocd", "applications", "hello-eks")
    # Argo CD's other way of saying manual: automated, but not enabled (IsAutomatedSyncEnabled).
    api.patch_namespaced_custom_object(
        *hello_eks, {"spec": {"syncPolicy": {"automated": {"enabled": False}}}}
    )
    try:
        digest = registry.push("hello", "1.1.0")
        sha = manifests.commit(
            {"overlays/eks/hello/kustomization.yaml": overlay(f"{registry.host}/hello", digest)},
            "eks: hello 1.1.0",
        )
        eks = target(kubeconfig, "eks", sha, digest)
        # Not asked, Argo CD looks at git at its next poll (180 s and jitter): nothing within 3 s, and
        # the ComparisonError of the broken commit before is not taken for this release's.
        unasked = verify_rollout(eks, timeout=3, refresh=False)
        assert unasked.phase is Phase.FAILED
        assert (
            unasked.message.startswith("not rolled out after 3s: ")
            and f"waiting for {sha[:7]}" in unasked.message
        )

        verdict, elapsed = timed(lambda: verify_rollout(eks, timeout=60))
        print(f"manual sync: {verdict.phase.value} in {elapsed:.2f}s: {verdict.message}")
        assert verdict.phase is Phase.SUCCEEDED, verdict
        operation = api.get_namespaced_custom_object(*hello_eks)["status"]["operationState"]
        assert operation["operation"] == {"sync": {"revision": sha}, "initiatedBy": {"username": "twincd"}}
        assert operation["phase"] == "Succeeded"
    finally:
        api.patch_namespaced_custom_object(
            *hello_eks, {"spec": {"syncPolicy": {"automated": {"enabled": True}}}}
        )


def test_a_sync_requested_while_another_operation_runs_is_asked_again_once_it_ended(
    clusters: dict[str, Cluster], manifests: Manifests, registry: Registry, kubeconfig: str
) -> None:
    """A colleague's sync of an older revision is requested when twincd verifies: twincd does not
    overwrite it (SetAppOperation refuses), and asks for its own once it has ended. (The sandbox may
    run bob's sync before verification starts; then twincd asks at once. The decision itself is
    unit-tested in tests/unit/test_argocd_requests.py.)"""
    api = k8s.CustomObjectsApi(clusters["aks"].api)
    hello_aks = ("argoproj.io", "v1alpha1", "argocd", "applications", "hello-aks")
    api.patch_namespaced_custom_object(*hello_aks, {"spec": {"syncPolicy": {"automated": None}}})
    try:
        older = manifests.commit({"overlays/aks/hello/note.txt": "older\n"}, "aks: an older change")
        digest = registry.push("hello", "1.1.1")
        sha = manifests.commit(
            {"overlays/aks/hello/kustomization.yaml": overlay(f"{registry.host}/hello", digest)},
            "aks: hello 1.1.1",
        )
        app = api.get_namespaced_custom_object(*hello_aks)
        app["operation"] = {"sync": {"revision": older}, "initiatedBy": {"username": "bob"}}
        api.replace_namespaced_custom_object(*hello_aks, app)  # bob's sync, not yet picked up
        verdict = verify_rollout(target(kubeconfig, "aks", sha, digest), timeout=60)
        assert verdict.phase is Phase.SUCCEEDED, verdict
        operation = api.get_namespaced_custom_object(*hello_aks)["status"]["operationState"]
        assert operation["operation"]["initiatedBy"] == {"username": "twincd"}
        assert operation["syncResult"]["revision"] == sha
    finally:
        api.patch_namespaced_custom_object(*hello_aks, {"spec": {"syncPolicy": {"automated": {}}}})


def test_permanent_errors_fail_at_once(kubeconfig: str) -> None:
    bad = RolloutTarget(
        ClusterRef("gke", "no-such-context", kubeconfig),
        None,
        None,
        "argocd",
        "Deployment",
        "hello",
        "hello",
        "0" * 40,
        None,
    )
    verdict, elapsed = timed(lambda: verify_rollout(bad, timeout=30))
    assert (
        verdict.phase is Phase.FAILED
        and "cannot load kubeconfig context 'no-such-context'" in verdict.message
    )
    assert elapsed < 15  # not retried until the 30 s deadline


def test_one_cluster_down_fails_with_the_reason_while_the_other_verifies(
    clusters: dict[str, Cluster], manifests: Manifests, registry: Registry, kubeconfig: str
) -> None:
    """Last in the module: it stops the eks process."""
    digest = registry.push("hello", "1.0.2")
    # aks's overlay drops worker.yaml (the syncer does not prune it, but health no longer counts it).
    sha = manifests.commit(
        {
            f"overlays/{c}/hello/kustomization.yaml": overlay(f"{registry.host}/hello", digest)
            for c in CLUSTERS
        },
        "hello 1.0.2 on both",
    )
    healthy = verify_all([target(kubeconfig, c, sha, digest) for c in CLUSTERS], timeout=60)
    assert {name: v.phase for name, (v, _) in healthy.items()} == {c: Phase.SUCCEEDED for c in CLUSTERS}, (
        healthy
    )

    assert stop_process(clusters["eks"].proc) == 0
    results = verify_all([target(kubeconfig, c, sha, digest) for c in CLUSTERS], timeout=10)
    for name, (verdict, elapsed) in results.items():
        print(f"{name}: {verdict.phase.value} in {elapsed:.2f}s: {verdict.message}")
    aks, aks_elapsed = results["aks"]
    assert aks.phase is Phase.SUCCEEDED and aks_elapsed < 5  # not held back by eks: well before the deadline
    eks, eks_elapsed = results["eks"]
    assert eks.phase is Phase.FAILED
    assert eks.message.startswith("cluster eks: ") and "API server unreachable" in eks.message, eks.message
    assert "(still failing at the 10s deadline)" in eks.message
    assert 10 <= eks_elapsed < 20  # retried until the deadline, then stopped


# --- watch mechanics on a bare API server: the test writes status as the controllers would --------


@pytest.fixture
def bare(tmp_path: Path) -> Iterator[tuple[RunningServer, str]]:
    """An API server with no controllers and a 5-event watch buffer, and a kubeconfig for it."""
    server = serve_in_thread(create_app("bare", event_buffer=5))
    try:
        yield server, str(write_kubeconfig(tmp_path / "config", {"bare": server.url}))
    finally:
        server.stop()


def start_deployment(api: k8s.ApiClient) -> None:
    k8s.CoreV1Api(api).create_namespace({"metadata": {"name": "hello"}})
    k8s.AppsV1Api(api).create_namespaced_deployment(
        "hello",
        {
            "metadata": {"name": "hello"},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": {"app": "hello"}},
                "template": {
                    "metadata": {"labels": {"app": "hello"}},
                    "spec": {"containers": [{"name": "hello", "image": "registry.test/hello:1"}]},
                },
            },
        },
    )


def write_status(api: k8s.ApiClient, updated: int) -> str:
    """One step of a rollout, as the Deployment controller writes it; returns its resourceVersion."""
    status = {
        "observedGeneration": 1,
        "replicas": 3,
        "updatedReplicas": updated,
        "readyReplicas": updated,
        "availableReplicas": updated,
    }
    written = k8s.AppsV1Api(api).patch_namespaced_deployment_status("hello", "hello", {"status": status})
    return str(written.metadata.resource_version)


def in_background(verify: Callable[[], RolloutVerdict]) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def run() -> None:
        result["verdict"] = verify()
        result["at"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def wait_until(condition: Callable[[], bool], timeout: float = 20) -> None:
    """Poll ``condition`` (a log line, a state) instead of sleeping for a guessed time."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_dropped_watch_resumes_from_its_resource_version_without_missing_an_event(
    bare: tuple[RunningServer, str], caplog: pytest.LogCaptureFixture
) -> None:
    """The server ends every watch after 1 s; each step of the rollout is still seen, in order."""
    server, config = bare
    caplog.set_level(logging.DEBUG, logger="twincd.adapters.cluster")
    api = k8s.ApiClient(k8s.Configuration(host=server.url))
    start_deployment(api)
    t = RolloutTarget(
        ClusterRef("bare", "bare", config),
        None,
        None,
        "argocd",
        "Deployment",
        "hello",
        "hello",
        "0" * 40,
        None,
    )
    thread, result = in_background(lambda: verify_rollout(t, timeout=30, watch_seconds=1))

    def ended() -> int:
        return caplog.text.count("Deployment hello/hello: watch ended by the server")

    versions = []
    for updated in (1, 2, 3):
        seen = ended()
        wait_until(
            lambda seen=seen: ended() > seen
        )  # past a watch's end: the next event travels on a resumed watch
        written_at = time.monotonic()
        versions.append(write_status(api, updated))
    thread.join(30)
    verdict = result["verdict"]
    assert verdict.phase is Phase.SUCCEEDED, verdict
    latency = result["at"] - written_at
    print(f"resumed watch: success noticed {latency * 1000:.0f} ms after the last write")
    assert latency < 15  # seen on the watch, well before the 30 s deadline
    log = caplog.text
    assert log.count("Deployment hello/hello: watch ended by the server") >= 3
    for version in versions:  # every step arrived, whichever watch request carried it
        assert f"Deployment hello/hello: MODIFIED at resourceVersion {version}" in log
    assert "relisting" not in log


def test_expired_resource_version_relists(
    bare: tuple[RunningServer, str], caplog: pytest.LogCaptureFixture
) -> None:
    """More writes than the server's 5-event buffer while the watch sees none: its resume gets 410."""
    server, config = bare
    caplog.set_level(logging.DEBUG, logger="twincd.adapters.cluster")
    api = k8s.ApiClient(k8s.Configuration(host=server.url))
    start_deployment(api)
    t = RolloutTarget(
        ClusterRef("bare", "bare", config),
        None,
        None,
        "argocd",
        "Deployment",
        "hello",
        "hello",
        "0" * 40,
        None,
    )
    thread, result = in_background(lambda: verify_rollout(t, timeout=30, watch_seconds=1))
    wait_until(lambda: "Deployment hello/hello: watching from resourceVersion" in caplog.text)
    for i in range(10):
        k8s.CoreV1Api(api).create_namespaced_config_map("hello", {"metadata": {"name": f"noise-{i}"}})
    # The watch ends after 1 s; its resume finds its resourceVersion gone from the buffer.
    wait_until(
        lambda: (
            "Deployment hello/hello: watch from resourceVersion" in caplog.text
            and "expired (410): relisting" in caplog.text
        )
    )
    written_at = time.monotonic()
    write_status(api, 3)
    thread.join(30)
    assert result["verdict"].phase is Phase.SUCCEEDED, result["verdict"]
    assert result["at"] - written_at < 15  # seen after the relist, well before the 30 s deadline


# --- sync: apply -----------------------------------------------------------------------------------


@pytest.fixture
def plain_cluster(tmp_path: Path) -> Iterator[tuple[RunningServer, str]]:
    """A cluster without Argo CD: an API server and the Deployment controller, no syncer."""
    server = serve_in_thread(create_app("plain"))
    stop = threading.Event()
    controller = threading.Thread(target=DeploymentController(server.url, stop).run, daemon=True)
    controller.start()
    try:
        yield server, str(write_kubeconfig(tmp_path / "config", {"plain": server.url}))
    finally:
        stop.set()
        controller.join(10)
        server.stop()


def test_sync_apply_applies_the_overlay_and_verifies_it(
    plain_cluster: tuple[RunningServer, str], registry: Registry, tmp_path: Path
) -> None:
    server, config = plain_cluster
    digest = registry.push("hello", "2.0.0")
    tree = tmp_path / "manifests"
    for name, text in {
        **BASE,
        "overlays/plain/hello/kustomization.yaml": overlay(f"{registry.host}/hello", digest),
    }.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text)
    objects = render_overlay(tree / "overlays/plain/hello", tree)  # what the deploy flow renders at the merge
    ref = ClusterRef("plain", "plain", config)

    started = time.monotonic()
    result = apply_overlay(ref, objects)
    assert [str(o) for o in result.objects] == [
        "Namespace/hello",
        "Service/hello/hello",
        "Deployment/hello/hello",
    ]
    assert result.created == result.objects
    t = RolloutTarget(
        ref, None, None, "argocd", "Deployment", "hello", "hello", "unused-without-argocd", digest
    )
    verdict = verify_rollout(t, timeout=30)
    elapsed = time.monotonic() - started
    print(f"sync apply: applied and {verdict.phase.value} in {elapsed:.2f}s: {verdict.message}")
    assert verdict.phase is Phase.SUCCEEDED, verdict
    assert f"2 running pods carry {digest[7:19]}" in verdict.message

    api = k8s.ApiClient(k8s.Configuration(host=server.url))
    live = k8s.AppsV1Api(api).read_namespaced_deployment("hello", "hello")
    assert [(m.manager, m.operation) for m in live.metadata.managed_fields] == [("twincd", "Apply")]
    # Applying the same overlay again is a no-op: nothing created, no new resourceVersion.
    again = apply_overlay(ref, objects)
    assert not again.created
    assert (
        k8s.AppsV1Api(api).read_namespaced_deployment("hello", "hello").metadata.resource_version
        == live.metadata.resource_version
    )
    # The sandbox refuses an apply without a field manager, as the real server does.
    refused = httpx.patch(
        f"{server.url}/apis/apps/v1/namespaces/hello/deployments/hello",
        content=b"{}",
        headers={"Content-Type": "application/apply-patch+yaml"},
    )
    assert refused.status_code == 422 and "fieldManager: Required value" in refused.json()["message"]


def test_sync_apply_refusals_are_permanent_and_name_the_object(
    plain_cluster: tuple[RunningServer, str],
) -> None:
    ref = ClusterRef("plain", "plain", plain_cluster[1])
    invalid = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"replicas": "two"},
    }
    with pytest.raises(
        ApplyRejected, match=r"apply Deployment default/web: HTTP 400 .*cannot unmarshal string"
    ):
        apply_overlay(ref, [invalid])
    unknown = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "web"},
    }
    with pytest.raises(ApplyRejected, match="kind ServiceMonitor of monitoring.coreos.com/v1 is not served"):
        apply_overlay(ref, [unknown])
