"""Another monorepo layout, deployed end to end: ``deploy/<cluster>/<app>`` overlays over
``services/<app>/base``, components under ``deploy/components``, several images per overlay (the
app's, pinned by twincd, and an unmanaged proxy pinned by tag by hand, with comments around its
entry), and Applications named ``<cluster>-<app>``.

It uses the session stack's git server, registry, build API and Prefect server, with a manifests
repo and two sandbox clusters of its own: their Argo CD reads the layout the environment file
names, as a real Argo CD's Applications would.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import twincd
from tests.e2e.test_deploy import kubectl_json
from twincd.config import Environment, load_environment
from twincd.sandbox import registry_auth, seed
from twincd.sandbox.contexts import write_kubeconfig
from twincd.sandbox.procs import free_port, wait_until
from twincd.sandbox.stack import git_root, healthy, local_repo_path

BASE = {
    "services/shop/base/kustomization.yaml": """\
resources:
  - namespace.yaml
  - deployment.yaml
""",
    "services/shop/base/namespace.yaml": "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
    "services/shop/base/deployment.yaml": """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: shop, namespace: shop}
spec:
  replicas: 2
  progressDeadlineSeconds: 60
  selector: {matchLabels: {app: shop}}
  template:
    metadata: {labels: {app: shop}}
    spec:
      containers:
        - name: shop
          image: shop
        - name: proxy
          image: envoy
""",
    "deploy/components/serving/kustomization.yaml": """\
apiVersion: kustomize.config.k8s.io/v1alpha1
kind: Component
commonAnnotations: {example.com/serving: "true"}
""",
}

OVERLAY = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../../services/shop/base
components:
  - ../../components/serving
images:
  # The proxy is the platform team's: pinned by tag, bumped by hand.
  - name: envoy
    newName: docker.io/envoyproxy/envoy
    newTag: v1.31.0  # keep in step with the mesh
  # shop's image is pinned by twincd below.
"""


@pytest.fixture(scope="module")
def layout_env(stack_env: Environment) -> Iterator[Environment]:
    env = stack_env
    seed._publish(
        git_root(env) / "layout.git",
        {**BASE, **{f"deploy/{c}/shop/kustomization.yaml": OVERLAY for c in ("eks", "aks")}},
        "another layout",
    )
    seed.seed_app(git_root(env) / "shop.git", app="shop")
    git = env.manifests.repo.rsplit("/", 1)[0]
    ports = {c: free_port() for c in ("eks", "aks")}
    kubeconfig = env.state_path / "layout-kubeconfig"
    write_kubeconfig(kubeconfig, {f"layout-{c}": f"http://127.0.0.1:{p}" for c, p in ports.items()})
    procs = []
    logs = Path(env.source).parent
    for cluster, port in sorted(ports.items()):  # aks first: it holds Argo CD for both
        argv = [
            sys.executable, "-m", "twincd.sandbox.cluster", "--name", cluster, "--port", str(port),
            "--manifests", str(local_repo_path(env, f"{git}/layout.git")),
            "--argocd-api", f"http://127.0.0.1:{ports['aks']}",
            "--overlay", f"deploy/{cluster}", "--application", "{cluster}-{app}",
            "--pull-secret", str(registry_auth.auth_dir(env.state_path) / "pull-secret.json"),
        ]  # fmt: skip
        with (logs / f"layout-{cluster}.log").open("wb") as out:
            procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT))
    data = yaml.safe_load(Path(env.source).read_text())
    data["manifests"]["repo"] = f"{git}/layout.git"
    data["apps"] = {
        "shop": {
            "repo": f"{git}/shop.git",
            "image": "shop",
            "registries": ["local"],
            "workload": {"kind": "Deployment", "namespace": "shop", "name": "shop"},
        }
    }
    argocd = {"context": "layout-aks", "kubeconfig": str(kubeconfig), "application": "{cluster}-{app}"}
    for cluster in ("eks", "aks"):
        data["clusters"][cluster].update(
            context=f"layout-{cluster}",
            kubeconfig=str(kubeconfig),
            overlay=f"deploy/{cluster}",
            argocd=argocd,
        )
    path = Path(env.source).with_name("layout.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    try:
        for port in ports.values():
            wait_until(healthy(f"http://127.0.0.1:{port}/readyz"), 30, f"the layout cluster on port {port}")
        yield load_environment(path)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


def _main_file(env: Environment, path: str) -> str:
    repo = local_repo_path(env, env.manifests.repo)
    return subprocess.run(
        ["git", "-C", str(repo), "show", f"main:{path}"], check=True, capture_output=True, text=True
    ).stdout


def test_another_layout_deploys_with_an_unmanaged_tagged_sidecar(layout_env: Environment) -> None:
    env = layout_env
    result = twincd(env, "deploy", "shop", "v1.0.0", "--auto-approve")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    # The hand-pinned proxy passes validation with a warning on the MR; only shop's image is twincd's.
    record = json.loads((env.state_path / "forge" / "twincd_shop_v1.0.0.json").read_text())
    assert "warning(s):" in record["validation"], record["validation"]
    assert "docker.io/envoyproxy/envoy:v1.31.0" in record["validation"]
    for cluster in ("eks", "aks"):
        overlay = _main_file(env, f"deploy/{cluster}/shop/kustomization.yaml")
        # A minimal diff: the proxy's entry and every comment as they were, shop's entry added.
        assert overlay.startswith(OVERLAY), overlay
        pinned = yaml.safe_load(overlay)["images"][1]
        assert pinned["name"] == "shop" and pinned["newName"] == f"{env.registries['local'].url}/shop"
        digest = pinned["digest"]
        kubeconfig = env.state_path / "layout-kubeconfig"
        application = kubectl_json(
            env, "layout-aks", "applications", "-n", "argocd", f"{cluster}-shop", kubeconfig=kubeconfig
        )
        assert application["spec"]["source"]["path"] == f"deploy/{cluster}/shop"
        assert application["status"]["health"]["status"] == "Healthy"
        deployment = kubectl_json(
            env, f"layout-{cluster}", "deployment", "-n", "shop", "shop", kubeconfig=kubeconfig
        )
        images = {c["name"]: c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]}
        assert images == {
            "shop": f"{env.registries['local'].url}/shop@{digest}",
            "proxy": "docker.io/envoyproxy/envoy:v1.31.0",
        }
        assert deployment["metadata"]["annotations"]["example.com/serving"] == "true"  # the component
        assert deployment["status"]["availableReplicas"] == 2
        assert f'Application "{cluster}-shop" Synced and Healthy' in out, out
