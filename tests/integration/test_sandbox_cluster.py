"""Two sandbox clusters as real processes, a real bare manifests repo and a real OCI registry.

``python -m twincd.sandbox.cluster`` runs twice (eks publishes its Applications to aks, where the
one Argo CD lives); assertions go through the official ``kubernetes`` client over HTTP.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from kubernetes import client as k8s

pytestmark = pytest.mark.integration

REGISTRY_BINARY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
CLUSTERS = ("eks", "aks")
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except (httpx.HTTPError, k8s.ApiException) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def stop_process(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


# --- registry -----------------------------------------------------------------------------------


@dataclass
class Registry:
    host: str  # "127.0.0.1:PORT"

    def _upload_blob(self, http: httpx.Client, repo: str, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        start = http.post(f"http://{self.host}/v2/{repo}/blobs/uploads/")
        assert start.status_code == 202, start.text
        location = start.headers["Location"]
        if location.startswith("/"):
            location = f"http://{self.host}{location}"
        # Append, not ``params=``: httpx would replace the ``_state`` query the registry put there.
        done = http.put(
            f"{location}{'&' if '?' in location else '?'}digest={digest}",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert done.status_code == 201, done.text
        return digest

    def push(self, repo: str, tag: str) -> str:
        """Push a minimal OCI image (one config blob, one layer) and return its manifest digest."""
        with httpx.Client(timeout=10) as http:
            config = json.dumps(
                {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}
            ).encode()
            layer = f"layer of {repo}:{tag}".encode()
            manifest = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {
                        "mediaType": "application/vnd.oci.image.config.v1+json",
                        "digest": self._upload_blob(http, repo, config),
                        "size": len(config),
                    },
                    "layers": [
                        {
                            "mediaType": "application/vnd.oci.image.layer.v1.tar",
                            "digest": self._upload_blob(http, repo, layer),
                            "size": len(layer),
                        }
                    ],
                }
            ).encode()
            put = http.put(
                f"http://{self.host}/v2/{repo}/manifests/{tag}",
                content=manifest,
                headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
            )
            assert put.status_code == 201, put.text
            digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
            assert put.headers["Docker-Content-Digest"] == digest
            return digest


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    root = tmp_path_factory.mktemp("registry")
    port = free_port()
    config = root / "config.yml"
    config.write_text(
        f"version: 0.1\nlog: {{level: warn}}\n"
        f"storage: {{filesystem: {{rootdirectory: {json.dumps(str(root / 'data'))}}}}}\n"
        f'http: {{addr: "127.0.0.1:{port}"}}\n'
    )
    log = (root / "registry.log").open("wb")
    proc = subprocess.Popen([REGISTRY_BINARY, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(
            lambda: httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 200, 20, "registry"
        )
        yield Registry(f"127.0.0.1:{port}")
    finally:
        stop_process(proc)
        log.close()


# --- manifests repo -----------------------------------------------------------------------------

BASE = {
    "base/hello/kustomization.yaml": "resources: [namespace.yaml, deployment.yaml, service.yaml]\n",
    "base/hello/namespace.yaml": "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: hello\n",
    "base/hello/deployment.yaml": """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: hello
  namespace: hello
  labels: {app: hello}
spec:
  replicas: 2
  progressDeadlineSeconds: 3
  selector:
    matchLabels: {app: hello}
  template:
    metadata:
      labels: {app: hello}
    spec:
      containers:
        - name: hello
          image: hello
          ports: [{containerPort: 8080}]
""",
    "base/hello/service.yaml": """\
apiVersion: v1
kind: Service
metadata:
  name: hello
  namespace: hello
spec:
  selector: {app: hello}
  ports: [{port: 80, targetPort: 8080}]
""",
    "components/active/kustomization.yaml": """\
apiVersion: kustomize.config.k8s.io/v1alpha1
kind: Component
commonAnnotations: {twincd.io/role: active}
""",
    "components/standby/kustomization.yaml": """\
apiVersion: kustomize.config.k8s.io/v1alpha1
kind: Component
commonAnnotations: {twincd.io/role: standby}
replicas: [{name: hello, count: 0}]
""",
}


def overlay(image: str, digest: str, component: str = "active") -> str:
    return f"""\
resources: [../../../base/hello]
components: [../../../components/{component}]
images:
  - name: hello
    newName: {image}
    digest: {digest}
"""


@dataclass
class Manifests:
    bare: Path
    work: Path

    def commit(self, files: dict[str, str], message: str) -> str:
        for name, text in files.items():
            path = self.work / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        git = ["git", "-C", str(self.work), "-c", "user.name=test", "-c", "user.email=test@example.test"]
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run([*git, "commit", "-q", "-m", message], check=True)
        subprocess.run([*git, "push", "-q", "origin", "HEAD:main"], check=True)
        return subprocess.run(
            [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
        ).stdout.strip()


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> Manifests:
    root = tmp_path_factory.mktemp("git")
    bare, work = root / "manifests.git", root / "work"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    subprocess.run(["git", "-C", str(work), "remote", "add", "origin", str(bare)], check=True)
    return Manifests(bare, work)


# --- clusters -----------------------------------------------------------------------------------


@dataclass
class Cluster:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def api(self) -> k8s.ApiClient:
        return k8s.ApiClient(k8s.Configuration(host=self.url))


@pytest.fixture(scope="module")
def clusters(manifests: Manifests, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Cluster]]:
    root = tmp_path_factory.mktemp("clusters")
    ports = {name: free_port() for name in CLUSTERS}
    argocd = f"http://127.0.0.1:{ports['aks']}"  # one Argo CD, on the AKS side, for both clusters
    started: dict[str, Cluster] = {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    repo_root = Path(__file__).resolve().parents[2]
    try:
        for name in CLUSTERS:
            log = root / f"{name}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [
                        sys.executable, "-m", "twincd.sandbox.cluster", "--name", name,
                        "--port", str(ports[name]), "--manifests", str(manifests.bare),
                        "--argocd-api", argocd,  # Argo CD's own 180 s poll: tests ask it to refresh
                    ],
                    stdout=out, stderr=subprocess.STDOUT, cwd=repo_root, env=env,
                )  # fmt: skip
            started[name] = Cluster(name, f"http://127.0.0.1:{ports[name]}", proc, log)
        for c in started.values():
            wait_for(
                lambda c=c: httpx.get(f"{c.url}/readyz", timeout=1).status_code == 200, 20, f"{c.name} up"
            )
        yield started
    finally:
        codes = {name: stop_process(c.proc) for name, c in started.items()}
        for c in started.values():
            sys.stderr.write(f"--- {c.name} log (tail) ---\n{c.log.read_text()[-3000:]}\n")
    assert codes == {name: 0 for name in started}, f"SIGTERM did not stop cleanly: {codes}"


def application(clusters: dict[str, Cluster], name: str) -> dict[str, Any]:
    api = k8s.CustomObjectsApi(clusters["aks"].api)
    app: dict[str, Any] = api.get_namespaced_custom_object(
        "argoproj.io", "v1alpha1", "argocd", "applications", name
    )
    return app


def wait_application(
    clusters: dict[str, Cluster], name: str, revision: str, health: str, timeout: float = 30
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        app = application(clusters, name)
        status = app.get("status", {})
        done = (
            status.get("sync", {}).get("revision") == revision
            and status.get("operationState", {}).get("phase") == "Succeeded"
            and status.get("health", {}).get("status") == health
        )
        return app if done else None

    return wait_for(probe, timeout, f"{name} synced at {revision[:12]} and {health}")


def refresh(clusters: dict[str, Cluster], *names: str) -> None:
    """Click "Refresh" in Argo CD: the annotations its application controller acts on at once
    (util/argo RefreshApp: the refresh type and a unique timestamp)."""
    api = k8s.CustomObjectsApi(clusters["aks"].api)
    for name in names:
        stamp = f"{time.time_ns()}"
        annotations = {"argocd.argoproj.io/refresh": "normal", "argocd.argoproj.io/refresh-timestamp": stamp}
        body = {"metadata": {"annotations": annotations}}
        api.patch_namespaced_custom_object("argoproj.io", "v1alpha1", "argocd", "applications", name, body)


def deployment_status(cluster: Cluster) -> k8s.V1DeploymentStatus:
    return k8s.AppsV1Api(cluster.api).read_namespaced_deployment("hello", "hello").status


def pods(cluster: Cluster) -> list[k8s.V1Pod]:
    return list(k8s.CoreV1Api(cluster.api).list_namespaced_pod("hello", label_selector="app=hello").items)


def condition(status: k8s.V1DeploymentStatus, kind: str) -> k8s.V1DeploymentCondition:
    return next(c for c in status.conditions if c.type == kind)


# --- tests (in order: each commit builds on the previous one) -------------------------------------


def test_commit_rolls_out_on_both_clusters_and_turns_the_applications_healthy(
    clusters: dict[str, Cluster], manifests: Manifests, registry: Registry
) -> None:
    digest = registry.push("hello", "1.0.0")
    image = f"{registry.host}/hello"
    started = time.monotonic()
    sha = manifests.commit(
        {**BASE, **{f"overlays/{c}/hello/kustomization.yaml": overlay(image, digest) for c in CLUSTERS}},
        "hello 1.0.0",
    )
    for name in CLUSTERS:
        app = wait_application(clusters, f"hello-{name}", sha, "Healthy")
        status = app["status"]
        assert status["sync"]["status"] == "Synced"
        assert status["operationState"]["phase"] == "Succeeded"
        assert status["operationState"]["syncResult"]["revision"] == sha
        assert app["spec"]["source"]["path"] == f"overlays/{name}/hello"
        assert app["spec"]["destination"]["name"] == name
        assert status["summary"]["images"] == [f"{image}@{digest}"]
    elapsed = time.monotonic() - started
    print(f"commit to both Applications Healthy: {elapsed:.2f}s")
    assert elapsed < 20

    for cluster in clusters.values():
        status = deployment_status(cluster)
        assert (status.updated_replicas, status.available_replicas, status.ready_replicas) == (2, 2, 2)
        assert condition(status, "Available").status == "True"
        assert condition(status, "Progressing").reason == "NewReplicaSetAvailable"
        running = pods(cluster)
        assert len(running) == 2
        for pod in running:
            assert pod.status.phase == "Running"
            assert pod.status.container_statuses[0].image_id == f"{image}@{digest}"
        service = k8s.CoreV1Api(cluster.api).read_namespaced_service("hello", "hello")
        assert service.spec.ports[0].port == 80


def test_missing_digest_ends_in_progress_deadline_exceeded_and_degraded(
    clusters: dict[str, Cluster], manifests: Manifests, registry: Registry
) -> None:
    missing = "sha256:" + hashlib.sha256(b"never pushed").hexdigest()
    image = f"{registry.host}/hello"
    sha = manifests.commit(
        {f"overlays/{c}/hello/kustomization.yaml": overlay(image, missing) for c in CLUSTERS},
        "hello: bad digest",
    )
    refresh(clusters, *(f"hello-{c}" for c in CLUSTERS))
    for name, cluster in clusters.items():
        app = wait_application(clusters, f"hello-{name}", sha, "Degraded", timeout=30)
        assert app["status"]["sync"]["status"] == "Synced"
        progressing = condition(deployment_status(cluster), "Progressing")
        assert (progressing.status, progressing.reason) == ("False", "ProgressDeadlineExceeded")
        assert progressing.message.startswith('ReplicaSet "hello-') and progressing.message.endswith(
            '" has timed out progressing.'
        )
        assert app["status"]["health"]["message"] == progressing.message
        # The old pods keep serving; the surge pod is stuck pulling.
        stuck = [p for p in pods(cluster) if p.status.phase == "Pending"]
        assert len(stuck) == 1
        waiting = stuck[0].status.container_statuses[0].state.waiting
        assert waiting.reason == "ImagePullBackOff"
        assert f"{image}@{missing}" in waiting.message
        assert deployment_status(cluster).available_replicas == 2


def test_a_commit_waits_for_argo_cds_poll_until_someone_asks_for_a_refresh(
    clusters: dict[str, Cluster], manifests: Manifests, registry: Registry
) -> None:
    digest = registry.push("hello", "1.0.1")
    image = f"{registry.host}/hello"
    before = application(clusters, "hello-eks")["status"]
    sha = manifests.commit({"overlays/eks/hello/kustomization.yaml": overlay(image, digest)}, "eks: 1.0.1")
    time.sleep(3)  # Argo CD looks at git every 180 s (plus jitter): nothing happens in 3 s
    waited = application(clusters, "hello-eks")["status"]
    assert (waited["sync"]["revision"], waited["reconciledAt"]) == (
        before["sync"]["revision"],
        before["reconciledAt"],
    )

    started = time.monotonic()
    refresh(clusters, "hello-eks")
    app = wait_application(clusters, "hello-eks", sha, "Healthy")
    print(f"refresh to Synced and Healthy: {time.monotonic() - started:.2f}s")
    annotations = app["metadata"].get("annotations") or {}
    assert not {"argocd.argoproj.io/refresh", "argocd.argoproj.io/refresh-timestamp"} & set(annotations)
    assert app["status"]["operationState"]["operation"]["initiatedBy"] == {"automated": True}
    assert app["status"]["reconciledAt"] > waited["reconciledAt"]  # RFC 3339 to the second, 3 s later


def test_a_manual_application_syncs_only_when_an_operation_asks(
    clusters: dict[str, Cluster], manifests: Manifests, registry: Registry
) -> None:
    api = k8s.CustomObjectsApi(clusters["aks"].api)
    hello_aks = ("argoproj.io", "v1alpha1", "argocd", "applications", "hello-aks")
    api.patch_namespaced_custom_object(
        *hello_aks, {"spec": {"syncPolicy": {"automated": None}}}
    )  # null: removed
    try:
        digest = registry.push("hello", "1.0.2")
        image = f"{registry.host}/hello"
        sha = manifests.commit(
            {"overlays/aks/hello/kustomization.yaml": overlay(image, digest)}, "aks: 1.0.2"
        )
        refresh(clusters, "hello-aks")

        def compared() -> dict[str, Any] | None:
            app = application(clusters, "hello-aks")
            consumed = "argocd.argoproj.io/refresh" not in (app["metadata"].get("annotations") or {})
            return app if consumed and app["status"]["sync"]["revision"] == sha else None

        app = wait_for(compared, 15, "hello-aks compared with the new commit")
        assert app["status"]["sync"]["status"] == "OutOfSync"  # a manual Application waits for a person
        assert app["status"]["operationState"]["syncResult"]["revision"] != sha

        # What `argocd app sync hello-aks --revision <sha>` writes (util/argo SetAppOperation).
        app["operation"] = {"sync": {"revision": sha}, "initiatedBy": {"username": "alice"}}
        del app["status"]["operationState"]
        api.replace_namespaced_custom_object(*hello_aks, app)
        synced = wait_application(clusters, "hello-aks", sha, "Healthy")
        assert synced["status"]["operationState"]["operation"]["initiatedBy"] == {"username": "alice"}
        assert "operation" not in synced  # removed once it ran
        assert synced["status"]["sync"]["status"] == "Synced"
    finally:
        automated = {"spec": {"syncPolicy": {"automated": {"prune": False, "selfHeal": False}}}}
        api.patch_namespaced_custom_object(*hello_aks, automated)


def test_broken_overlay_is_a_comparison_error_with_kubectls_message(
    clusters: dict[str, Cluster], manifests: Manifests
) -> None:
    sha = manifests.commit(
        {"overlays/eks/hello/kustomization.yaml": "resources: [../../../base/nope]\n"}, "eks: broken overlay"
    )
    refresh(clusters, "hello-eks", "hello-aks")

    def failed() -> dict[str, Any] | None:
        app = application(clusters, "hello-eks")
        return app if app["status"].get("conditions") else None

    app = wait_for(failed, 15, "hello-eks ComparisonError")
    status = app["status"]
    # Argo CD shows the unresolved targetRevision while manifests fail to load (controller/state.go).
    assert (status["sync"]["status"], status["sync"]["revision"]) == ("Unknown", "main")
    (condition_,) = status["conditions"]
    assert condition_["type"] == "ComparisonError"
    assert condition_["message"].startswith(
        "Failed to load target state: failed to generate manifest for source 1 of 1: rpc error: "
        "code = Unknown desc = `kustomize build overlays/eks/hello` failed exit status 1: "
        "accumulating resources:"
    )
    assert "base/nope" in condition_["message"]
    assert status["operationState"]["syncResult"]["revision"] != sha  # nothing was synced
    # aks's overlay did not change: its manifests are not rendered again, it is synced at the new
    # revision (Argo CD's manifest-generate-paths) and healthy.
    other = wait_application(clusters, "hello-aks", sha, "Healthy")
    assert other["status"]["sync"]["status"] == "Synced"
    assert "rendered hello-aks at " + sha[:12] not in (clusters["aks"].log.read_text())

    # The fix adds the missing base: the failed render is tried again, though no path it read changed.
    fixed = manifests.commit({"base/nope/kustomization.yaml": "resources: [../hello]\n"}, "add base/nope")
    refresh(clusters, "hello-eks")
    repaired = wait_application(clusters, "hello-eks", fixed, "Healthy")
    assert "conditions" not in repaired["status"]
