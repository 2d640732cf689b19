"""The drift check on sandbox clusters: two in-thread API servers, a real bare manifests repo rendered
by kustomize, drift and noise injected through the Kubernetes API with the official client.

The sandbox API server defaults nothing, so the objects are created the way a real server would
serve them back: defaults filled in, quantities respelled, lists reordered, ports as strings, status
written through /status. That is the noise that must stay silent.
"""

from __future__ import annotations

import copy
import http.server
import json
import re
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from prefect.artifacts import Artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.drift import DriftReport, drift_check
from twincd.adapters.cluster import ClusterError, ClusterRef
from twincd.adapters.kube_read import BUILTIN_KINDS, LiveReader, read_cluster
from twincd.config import Environment, load_environment
from twincd.drift import Drift, DriftItem, ListScope, compare_cluster, find_skew, state_slug
from twincd.sandbox.apiserver import RunningServer, create_app, serve_in_thread
from twincd.sandbox.contexts import write_kubeconfig
from twincd.sandbox.procs import free_port
from twincd.validate import parse_documents, render_overlay

pytestmark = pytest.mark.integration

CLUSTERS = ("eks", "aks")
OLD = "sha256:" + "0" * 64
NEW = "sha256:" + "1" * 64
IMAGE = "registry.example/web"
NAMESPACES = ("web", "web-batch")
KINDS = ("ConfigMap", "Deployment", "SealedSecret", "Service")  # namespaced kinds in each namespace

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {ns}, labels: {{app.kubernetes.io/name: web}}}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app.kubernetes.io/name: web, component: {name}}}}}
  template:
    metadata: {{labels: {{app.kubernetes.io/name: web, component: {name}}}}}
    spec:
      containers:
        - name: {name}
          image: web
          ports: [{{containerPort: 8080}}]
          env:
            - {{name: MODE, value: {name}}}
            - {{name: LOG_LEVEL, value: info}}
            - {{name: WORKERS, value: "4"}}
          resources:
            limits: {{cpu: "1", memory: 1Gi}}
            requests: {{cpu: 500m, memory: 256Mi}}
"""
SERVICE = """\
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {ns}}}
spec:
  selector: {{app.kubernetes.io/name: web, component: {name}}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
"""
CONFIGMAP = """\
apiVersion: v1
kind: ConfigMap
metadata: {{name: {name}-config, namespace: {ns}, labels: {{app.kubernetes.io/name: web}}}}
data: {{greeting: hello from {name}}}
"""
SEALED = """\
apiVersion: bitnami.com/v1alpha1
kind: SealedSecret
metadata: {{name: {name}-credentials, namespace: {ns}}}
spec:
  encryptedData: {{TOKEN: AgBy3i4OJSWK+PiTySYZZA9rO43cGDEq}}
"""


def manifests_files(digest: str) -> dict[str, str]:
    files = {
        "base/web/kustomization.yaml": yaml.safe_dump(
            {
                "resources": [
                    "namespaces.yaml",
                    *(f"{w}-{k}.yaml" for w in ("web", "worker") for k in ("deploy", "svc", "cm", "sealed")),
                ]
            }
        )
    }
    files["base/web/namespaces.yaml"] = "---\n".join(
        f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n" for ns in NAMESPACES
    )
    for name, ns in (("web", "web"), ("worker", "web-batch")):
        for suffix, text in (("deploy", DEPLOYMENT), ("svc", SERVICE), ("cm", CONFIGMAP), ("sealed", SEALED)):
            files[f"base/web/{name}-{suffix}.yaml"] = text.format(name=name, ns=ns)
    for cluster in CLUSTERS:
        files[f"overlays/{cluster}/web/kustomization.yaml"] = yaml.safe_dump(
            {
                "resources": ["../../../base/web"],
                "images": [{"name": "web", "newName": IMAGE, "digest": digest}],
            }
        )
    return files


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.test", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("manifests")
    work, bare = root / "work", root / "manifests.git"
    for rel, text in manifests_files(NEW).items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(text)
    git("init", "-q", "-b", "main", str(work))
    git("-C", str(work), "add", "-A")
    git("-C", str(work), "commit", "-qm", "web")
    git("clone", "-q", "--bare", str(work), str(bare))
    return bare


def rendered(manifests: Path, cluster: str) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        git("clone", "-q", str(manifests), tmp)
        return parse_documents(render_overlay(Path(tmp), f"overlays/{cluster}/web"))


# --- the API, through the official client ---------------------------------------------------------


def call(
    api: k8s.ApiClient, method: str, path: str, body: Any = None, content_type: str = "application/json"
) -> dict[str, Any]:
    request = api.param_serialize(
        method=method,
        resource_path=path,
        body=body,
        header_params={"Content-Type": content_type, "Accept": "application/json"},
    )
    response = api.call_api(*request)
    data = response.read()
    assert 200 <= response.status < 300, data
    result: dict[str, Any] = json.loads(data)
    return result


def path_of(obj: dict[str, Any], *, name: bool = False) -> str:
    av, kind, meta = obj["apiVersion"], obj["kind"], obj["metadata"]
    info = BUILTIN_KINDS.get((av, kind))
    plural, namespaced = (info.plural, info.namespaced) if info else (kind.lower() + "s", True)
    prefix = f"/apis/{av}" if "/" in av else f"/api/{av}"
    where = f"/namespaces/{meta['namespace']}" if namespaced else ""
    return f"{prefix}{where}/{plural}" + (f"/{meta['name']}" if name else "")


def served(obj: dict[str, Any]) -> dict[str, Any]:
    """What a real API server (and Argo CD) would make of ``obj``: the noise that must stay silent."""
    live = copy.deepcopy(obj)
    live["metadata"].setdefault("annotations", {}).update(
        {
            "kubectl.kubernetes.io/last-applied-configuration": json.dumps(obj),
            "argocd.argoproj.io/tracking-id": "web-x:apps/Deployment:web/web",
        }
    )
    if obj["kind"] == "Deployment":
        spec = live["spec"]
        spec.update(revisionHistoryLimit=10, progressDeadlineSeconds=600)
        pod = spec["template"]["spec"]
        pod.update(restartPolicy="Always", dnsPolicy="ClusterFirst", terminationGracePeriodSeconds=30)
        c = pod["containers"][0]
        c.update(imagePullPolicy="IfNotPresent", terminationMessagePath="/dev/termination-log")
        c["ports"][0]["protocol"] = "TCP"
        c["env"] = list(reversed(c["env"]))
        c["resources"] = {
            "limits": {"cpu": "1000m", "memory": "1024Mi"},
            "requests": {"cpu": "0.5", "memory": "268435456"},
        }
    elif obj["kind"] == "Service":
        live["spec"].update(type="ClusterIP", sessionAffinity="None", clusterIP="10.96.0.10")
        live["spec"]["ports"] = [
            {**p, "protocol": "TCP", "targetPort": str(p["targetPort"])} for p in live["spec"]["ports"]
        ]
    elif obj["kind"] == "Namespace":
        live["metadata"]["labels"] = {"kubernetes.io/metadata.name": obj["metadata"]["name"]}
    return live


def apply_served(api: k8s.ApiClient, desired: list[dict[str, Any]]) -> None:
    for obj in sorted(desired, key=lambda o: o["kind"] != "Namespace"):
        if obj["kind"] == "Namespace" and obj["metadata"]["name"] == "default":
            continue
        call(api, "POST", path_of(obj), served(obj))
        if obj["kind"] == "Deployment":  # status through /status, as the controller writes it
            call(
                api,
                "PATCH",
                path_of(obj, name=True) + "/status",
                {"status": {"replicas": 2, "readyReplicas": 2, "observedGeneration": 1}},
                "application/merge-patch+json",
            )


def json_patch(api: k8s.ApiClient, obj_path: str, *ops: dict[str, Any]) -> None:
    call(api, "PATCH", obj_path, list(ops), "application/json-patch+json")


@pytest.fixture()
def clusters(tmp_path: Path, manifests: Path) -> Iterator[dict[str, tuple[RunningServer, k8s.ApiClient]]]:
    servers = {name: serve_in_thread(create_app(name), port=0) for name in CLUSTERS}
    write_kubeconfig(tmp_path / "kubeconfig", {f"sandbox-{n}": s.url for n, s in servers.items()})
    apis = {n: k8s.ApiClient(k8s.Configuration(host=s.url)) for n, s in servers.items()}
    for name in CLUSTERS:
        apply_served(apis[name], rendered(manifests, name))
    try:
        yield {n: (servers[n], apis[n]) for n in CLUSTERS}
    finally:
        for n in CLUSTERS:
            apis[n].close()
            servers[n].stop()


def write_env(tmp_path: Path, manifests: Path) -> Environment:
    clusters = {
        n: {
            "cloud": c,
            "context": f"sandbox-{n}",
            "kubeconfig": str(tmp_path / "kubeconfig"),
            "overlay": f"overlays/{n}",
            "sync": "apply",
        }
        for n, c in zip(CLUSTERS, ("aws", "azure"), strict=True)
    }
    env = {
        "state_dir": str(tmp_path / "state"),
        "manifests": {"repo": str(manifests), "branch": "main"},
        "forge": {"type": "local"},
        "notifier": {"type": "console"},
        "registries": {"local": {"url": "registry.example"}},
        "clusters": clusters,
        "apps": {
            "web": {
                "repo": str(tmp_path / "web.git"),
                "image": "web",
                "registries": ["local"],
                "workload": {"kind": "Deployment", "namespace": "web", "name": "web"},
            }
        },
    }
    path = tmp_path / "env.yaml"
    path.write_text(yaml.safe_dump(env))
    return load_environment(path)


def check(env: Environment, manifests: Path) -> tuple[set[DriftItem], dict[str, tuple[int, int, int]]]:
    """The drift check without Prefect: adapters and pure functions, as the tasks compose them."""
    checks = []
    for name in CLUSTERS:
        read = read_cluster(
            ClusterRef(name, f"sandbox-{name}", str(env.path(env.clusters[name].kubeconfig or ""))),
            desired={"web": rendered(manifests, name)},
        )
        checks.append(compare_cluster(read, env.applications(name)))
    items = {i for c in checks for i in c.items} | set(
        find_skew([w for c in checks for w in c.workloads], serving=set(CLUSTERS))
    )
    return items, {c.cluster: (c.lists, c.calls, c.objects) for c in checks}


# --- tests -------------------------------------------------------------------------------------------


def test_noise_gives_no_findings_and_one_list_per_kind_and_namespace(
    clusters: dict[str, Any], manifests: Path, tmp_path: Path
) -> None:
    env = write_env(tmp_path, manifests)
    # Noise that piles up on a live cluster: more objects of the same kinds that are not the app's.
    for name in CLUSTERS:
        api = clusters[name][1]
        for i in range(30):
            call(
                api,
                "POST",
                "/api/v1/namespaces/web/configmaps",
                {"metadata": {"name": f"other-{i}", "labels": {"app.kubernetes.io/name": "other"}}},
            )
    items, counts = check(env, manifests)
    assert items == set()
    lists = len(KINDS) * len(NAMESPACES) + 1  # + Namespaces, cluster-scoped: one list
    for name in CLUSTERS:
        assert counts[name][:2] == (lists, lists + 1)  # + one discovery GET for bitnami.com/v1alpha1
        # Every Namespace (the app's 2 and the 4 a cluster starts with) and the app's 8 objects; the
        # ConfigMap list is label-selected, so the 30 objects of another app are never read.
        assert counts[name][2] == len(NAMESPACES) + 4 + len(KINDS) * len(NAMESPACES)


def test_injected_drift_gives_exactly_these_findings(
    clusters: dict[str, Any], manifests: Path, tmp_path: Path
) -> None:
    env = write_env(tmp_path, manifests)
    eks, aks = clusters["eks"][1], clusters["aks"][1]
    deploy = "/apis/apps/v1/namespaces/web/deployments/web"
    # eks: on an older digest; aks: scaled by hand, its Service deleted, and a debug pod-runner added.
    json_patch(
        eks,
        deploy,
        {"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": f"{IMAGE}@{OLD}"},
    )
    json_patch(aks, deploy, {"op": "replace", "path": "/spec/replicas", "value": 5})
    call(aks, "DELETE", "/api/v1/namespaces/web/services/web")
    call(
        aks,
        "POST",
        "/apis/apps/v1/namespaces/web/deployments",
        {
            "metadata": {"name": "web-debug", "labels": {"app.kubernetes.io/name": "web"}},
            "spec": {"selector": {"matchLabels": {"x": "y"}}, "template": {"spec": {"containers": []}}},
        },
    )
    items, _ = check(env, manifests)
    container = "spec.template.spec.containers[name=web].image"
    assert items == {
        DriftItem(
            "web",
            "eks",
            "Deployment",
            "web",
            "web",
            Drift.MODIFIED,
            container,
            f"{IMAGE}@{NEW}",
            f"{IMAGE}@{OLD}",
        ),
        DriftItem("web", "aks", "Deployment", "web", "web", Drift.MODIFIED, "spec.replicas", "2", "5"),
        DriftItem("web", "aks", "Service", "web", "web", Drift.MISSING),
        DriftItem("web", "aks", "Deployment", "web", "web-debug", Drift.UNEXPECTED),
        DriftItem(
            "web",
            "aks,eks",
            "Deployment",
            "web",
            "web",
            Drift.SKEW,
            container,
            "the same digest on every cluster",
            f"aks={NEW}; eks={OLD}",
        ),
        DriftItem(
            "web",
            "aks,eks",
            "Deployment",
            "web",
            "web",
            Drift.SKEW,
            "spec.replicas",
            "the same replicas on every serving cluster",
            "aks=5; eks=2",
        ),
    }


def test_unreachable_cluster_is_a_transient_error_naming_it(manifests: Path, tmp_path: Path) -> None:
    write_kubeconfig(tmp_path / "kubeconfig", {"sandbox-eks": f"http://127.0.0.1:{free_port()}"})
    with pytest.raises(ClusterError, match="^cluster eks: .*: API server unreachable"):
        read_cluster(
            ClusterRef("eks", "sandbox-eks", str(tmp_path / "kubeconfig")),
            desired={"web": rendered(manifests, "eks")},
        )


@pytest.fixture
def plain_http_server() -> Iterator[int]:
    """A plain-HTTP server: its port, to be addressed as https:// (a TLS handshake it cannot answer)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize(
    "retries", [0, False]
)  # False: urllib3 raises SSLError, the client's ApiException(0)
def test_tls_failure_is_a_cluster_error_not_an_sdk_error(
    plain_http_server: int, tmp_path: Path, retries: int | bool
) -> None:
    url = f"https://127.0.0.1:{plain_http_server}"
    cfg = k8s.Configuration(host=url)
    cfg.retries = retries
    with k8s.ApiClient(cfg) as api, LiveReader(ClusterRef("eks", "sandbox-eks"), api=api) as reader:
        with pytest.raises(
            ClusterError, match="^cluster eks: discover bitnami.com/v1alpha1: API server unreachable"
        ):
            reader.kind("bitnami.com/v1alpha1", "SealedSecret")
        with pytest.raises(ClusterError, match="^cluster eks: list ConfigMap in web: API server unreachable"):
            reader.list(ListScope("v1", "ConfigMap", "web", ""))


def test_tls_url_of_a_kubeconfig_served_by_plain_http_is_a_cluster_error(
    plain_http_server: int, manifests: Path, tmp_path: Path
) -> None:
    write_kubeconfig(tmp_path / "kubeconfig", {"sandbox-eks": f"https://127.0.0.1:{plain_http_server}"})
    with pytest.raises(ClusterError, match="^cluster eks: .*: API server unreachable"):
        read_cluster(
            ClusterRef("eks", "sandbox-eks", str(tmp_path / "kubeconfig")),
            desired={"web": rendered(manifests, "eks")},
        )


# --- the flow ---------------------------------------------------------------------------------------


def run(env: Environment, **kwargs: Any) -> tuple[Any, DriftReport | None]:
    state = drift_check(env=env.source, return_state=True, **kwargs)
    return state, (state.result() if state.is_completed() else None)


def task_states(flow_state: Any) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id]))
        )
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs if r.state is not None}


def test_flow_notifies_on_change_only_and_reports_what_cleared(
    prefect_harness: None, clusters: dict[str, Any], manifests: Path, tmp_path: Path
) -> None:
    env = write_env(tmp_path, manifests)
    eks = clusters["eks"][1]
    deploy = "/apis/apps/v1/namespaces/web/deployments/web"
    image = "/spec/template/spec/containers/0/image"
    json_patch(eks, deploy, {"op": "replace", "path": image, "value": f"{IMAGE}@{OLD}"})

    state, first = run(env)
    assert state.is_completed() and first is not None
    assert state.name == "Completed" and "2 drift finding(s)" in (state.message or "")
    assert {(i.finding, i.cluster) for i in first.items} == {(Drift.MODIFIED, "eks"), (Drift.SKEW, "aks,eks")}
    assert first.notified and set(first.appeared) == set(first.items) and first.cleared == ()

    state, _ = run(env, fail_on_drift=True)
    assert state.is_failed() and "2 drift finding(s)" in (state.message or "")

    state, third = run(env)
    assert third is not None and not third.notified and third.fingerprint == first.fingerprint
    assert task_states(state)["render-desired"] == "Cached"  # the commit did not change: no kustomize

    json_patch(eks, deploy, {"op": "replace", "path": image, "value": f"{IMAGE}@{NEW}"})
    state, repaired = run(env)
    assert repaired is not None and repaired.items == () and repaired.notified
    assert repaired.appeared == () and set(repaired.cleared) == set(first.items)
    assert state.message == f"no drift at {repaired.revision[:12]}"

    changes = Artifact.get(f"drift-changes-{state_slug(env.source)}")
    assert (
        changes is not None
        and "## Appeared (0)" in str(changes.data)
        and "## Cleared (2)" in str(changes.data)
    )
    assert Artifact.get(f"drift-findings-{state_slug(env.source)}") is not None
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
    assert re.fullmatch(r"drift-check-\d{8}-\d{6}", flow_run.name)


def test_a_scope_without_a_selector_is_listed_once_for_every_app(
    clusters: dict[str, Any], manifests: Path, tmp_path: Path
) -> None:
    """Two apps that both declare the (cluster-scoped, unlabelled) Namespaces: one LIST of them, so
    API calls stay kinds x namespaces however many apps a monorepo holds."""
    for name in CLUSTERS:
        web = rendered(manifests, name)
        namespaces = tuple(d for d in web if d["kind"] == "Namespace")
        assert namespaces and all(not d["metadata"].get("labels") for d in namespaces)
        env = write_env(tmp_path, manifests)
        ref = ClusterRef(name, f"sandbox-{name}", str(env.path(env.clusters[name].kubeconfig or "")))
        alone = read_cluster(ref, desired={"web": web})
        both = read_cluster(ref, desired={"web": web, "platform": namespaces})
        assert both.lists == alone.lists
        assert [a.live for a in both.apps if a.app == "platform"] == [
            tuple(o for o in alone.apps[0].live if o["kind"] == "Namespace")
        ]
