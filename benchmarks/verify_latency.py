"""Latency of verify_rollout: from the write that makes a cluster's objects verified to its return.

Two sandbox API servers run as processes (``python -m twincd.sandbox.apiserver``): a workload
cluster and the cluster holding the Argo CD Application, both reached through a kubeconfig, as in
the reference setup. No controllers run: this script writes the objects' status itself, so it
knows the moment they reach the verified state. Each run:

1. a new release: the Deployment's template gets a new digest (generation bumps, status lags) and
   the Application is still at the previous revision;
2. ``verify_rollout`` starts in a thread and gets 0.3 s to list and start watching;
3. the pods of the new template are written, then the Application (Synced, Healthy at the new
   revision) and the Deployment status (rolled out) in alternating order; the clock starts just
   before the last of those writes is sent;
4. the clock stops when ``verify_rollout`` returns SUCCEEDED.

    .venv/bin/python benchmarks/verify_latency.py [--runs 20]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from kubernetes import client

from twincd.adapters.cluster import ClusterRef, RolloutTarget, verify_rollout
from twincd.domain import Phase, RolloutVerdict
from twincd.sandbox.contexts import write_kubeconfig
from twincd.sandbox.procs import free_port

IMAGE = "registry.test/hello"
REPLICAS = 2


@contextmanager
def api_server(name: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "twincd.sandbox.apiserver", "--name", name, "--port", str(port)]
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def digest_of(i: int) -> str:
    return "sha256:" + hashlib.sha256(f"release {i}".encode()).hexdigest()


def revision_of(i: int) -> str:
    return hashlib.sha1(f"merge {i}".encode()).hexdigest()


class Cluster:
    """Writes what the Deployment controller, the kubelet and Argo CD would write."""

    def __init__(self, url: str, argocd_url: str) -> None:
        self.core = client.CoreV1Api(client.ApiClient(client.Configuration(host=url)))
        self.apps = client.AppsV1Api(self.core.api_client)
        self.custom = client.CustomObjectsApi(client.ApiClient(client.Configuration(host=argocd_url)))
        self.core.create_namespace({"metadata": {"name": "hello"}})
        client.CoreV1Api(self.custom.api_client).create_namespace({"metadata": {"name": "argocd"}})
        self.apps.create_namespaced_deployment("hello", self._deployment(0))
        self.custom.create_namespaced_custom_object(
            "argoproj.io",
            "v1alpha1",
            "argocd",
            "applications",
            {
                "apiVersion": "argoproj.io/v1alpha1",
                "kind": "Application",
                "metadata": {"name": "hello-eks"},
                # Automated: verify_rollout asks it to refresh, and would request a sync of a
                # manual one (this script writes what Argo CD would).
                "spec": {"project": "default", "syncPolicy": {"automated": {}}},
            },
        )

    @staticmethod
    def _deployment(i: int) -> dict[str, Any]:
        return {
            "metadata": {"name": "hello"},
            "spec": {
                "replicas": REPLICAS,
                "selector": {"matchLabels": {"app": "hello"}},
                "template": {
                    "metadata": {"labels": {"app": "hello"}},
                    "spec": {"containers": [{"name": "hello", "image": f"{IMAGE}@{digest_of(i)}"}]},
                },
            },
        }

    def release(self, i: int) -> int:
        """The syncer's apply of release ``i``; returns the new generation."""
        written = self.apps.patch_namespaced_deployment("hello", "hello", self._deployment(i))
        return int(written.metadata.generation)

    def replace_pods(self, i: int) -> None:
        for pod in self.core.list_namespaced_pod("hello").items:
            self.core.delete_namespaced_pod(pod.metadata.name, "hello")
        for n in range(REPLICAS):
            name = f"hello-r{i}-{n}"
            self.core.create_namespaced_pod(
                "hello",
                {
                    "metadata": {"name": name, "labels": {"app": "hello"}},
                    "spec": {"containers": [{"name": "hello", "image": IMAGE}]},
                },
            )
            self.core.patch_namespaced_pod_status(
                name,
                "hello",
                {
                    "status": {
                        "phase": "Running",
                        "conditions": [{"type": "Ready", "status": "True"}],
                        "containerStatuses": [
                            {
                                "name": "hello",
                                "image": f"{IMAGE}@{digest_of(i)}",
                                "ready": True,
                                "imageID": f"{IMAGE}@{digest_of(i)}",
                                "restartCount": 0,
                            }
                        ],
                    }
                },
            )

    def deployment_rolled_out(self, generation: int) -> None:
        self.apps.patch_namespaced_deployment_status(
            "hello",
            "hello",
            {
                "status": {
                    "observedGeneration": generation,
                    "replicas": REPLICAS,
                    "updatedReplicas": REPLICAS,
                    "readyReplicas": REPLICAS,
                    "availableReplicas": REPLICAS,
                }
            },
        )

    def application_healthy(self, i: int) -> None:
        self.custom.patch_namespaced_custom_object(
            "argoproj.io",
            "v1alpha1",
            "argocd",
            "applications",
            "hello-eks",
            {
                "status": {
                    "sync": {"status": "Synced", "revision": revision_of(i)},
                    "health": {"status": "Healthy"},
                    "operationState": {"phase": "Succeeded", "syncResult": {"revision": revision_of(i)}},
                }
            },
        )


def run_once(cluster: Cluster, target: RolloutTarget, i: int) -> float:
    generation = cluster.release(i)
    result: dict[str, Any] = {}

    def verify() -> None:
        result["verdict"] = verify_rollout(target, timeout=30)
        result["at"] = time.monotonic()

    thread = threading.Thread(target=verify)
    thread.start()
    time.sleep(0.3)
    cluster.replace_pods(i)
    writes: list[Callable[[], None]] = [
        lambda: cluster.application_healthy(i),
        lambda: cluster.deployment_rolled_out(generation),
    ]
    if i % 2:
        writes.reverse()
    writes[0]()
    started = time.monotonic()
    writes[1]()
    thread.join(40)
    verdict: RolloutVerdict = result["verdict"]
    if verdict.phase is not Phase.SUCCEEDED:
        raise SystemExit(f"run {i}: {verdict}")
    return float(result["at"] - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    with api_server("eks") as url, api_server("aks") as argocd_url, tempfile.TemporaryDirectory() as tmp:
        config = str(write_kubeconfig(Path(tmp) / "config", {"eks": url, "aks": argocd_url}))
        cluster = Cluster(url, argocd_url)
        latencies = []
        for i in range(1, args.runs + 1):
            target = RolloutTarget(
                ClusterRef("eks", "eks", config),
                ClusterRef("Argo CD", "aks", config),
                "hello-eks",
                "argocd",
                "Deployment",
                "hello",
                "hello",
                revision_of(i),
                digest_of(i),
            )
            latencies.append(run_once(cluster, target, i))
            last = "Application" if i % 2 else "Deployment"
            print(f"run {i:2d}: {latencies[-1] * 1000:7.1f} ms (last write: {last})")
    ordered = sorted(latencies)
    p90 = ordered[max(0, round(0.9 * len(ordered)) - 1)]
    print(
        f"\nverify_rollout latency over {len(latencies)} runs: "
        f"median {statistics.median(latencies) * 1000:.1f} ms, "
        f"p90 {p90 * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms (goal: median under 1000 ms)"
    )


if __name__ == "__main__":
    main()
