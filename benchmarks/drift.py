"""Drift check on two clusters with 1,000 managed objects each: seconds, and API calls beside objects.

Two in-thread sandbox API servers are filled through their in-process store (fast, and the objects
are served back over HTTP exactly as if created through the API), with the noise a real server adds
(defaults, quantity spellings, reordered env lists, status). The desired state is a real bare git
repo rendered by kustomize, as the flow renders it. The goal from issue 8: the whole check < 3 s.

    .venv/bin/python benchmarks/drift.py [--per-namespace 33] [--namespaces 10]
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twincd.adapters import git
from twincd.adapters.cluster import ClusterRef
from twincd.adapters.kube_read import read_cluster
from twincd.config import load_environment
from twincd.drift import compare_cluster, find_skew
from twincd.sandbox.apiserver import RESOURCES, create_app, serve_in_thread
from twincd.sandbox.contexts import write_kubeconfig
from twincd.validate import render_overlays

CLUSTERS = ("eks", "aks")
DIGEST = "sha256:" + "a" * 64


def objects(namespaces: int, per_kind: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    labels = {"app.kubernetes.io/name": "shop"}
    for n in range(namespaces):
        ns = f"shop-{n}"
        out.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        for i in range(per_kind):
            name = f"svc-{i}"
            out.append(
                {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "metadata": {"name": name, "namespace": ns, "labels": labels},
                    "spec": {
                        "replicas": 2,
                        "selector": {"matchLabels": {"c": name}},
                        "template": {
                            "metadata": {"labels": {"c": name, **labels}},
                            "spec": {
                                "containers": [
                                    {
                                        "name": name,
                                        "image": "shop",
                                        "ports": [{"containerPort": 8080}],
                                        "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                                        "resources": {"limits": {"cpu": "1", "memory": "1Gi"}},
                                    }
                                ]
                            },
                        },
                    },
                }
            )
            out.append(
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {"selector": {"c": name}, "ports": [{"port": 80, "targetPort": 8080}]},
                }
            )
            out.append(
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": name, "namespace": ns, "labels": labels},
                    "data": {"k": "v" * 64},
                }
            )
    return out


def served(obj: dict[str, Any]) -> dict[str, Any]:
    live = copy.deepcopy(obj)
    live["metadata"]["annotations"] = {"kubectl.kubernetes.io/last-applied-configuration": "{}"}
    if obj["kind"] == "Deployment":
        c = live["spec"]["template"]["spec"]["containers"][0]
        c.update(image=f"registry.example/shop@{DIGEST}", imagePullPolicy="IfNotPresent")
        c["ports"][0]["protocol"] = "TCP"
        c["env"].reverse()
        c["resources"] = {"limits": {"cpu": "1000m", "memory": "1024Mi"}}
        live["status"] = {"replicas": 2, "readyReplicas": 2}
    elif obj["kind"] == "Service":
        live["spec"].update(type="ClusterIP", clusterIP="10.0.0.1")
        live["spec"]["ports"][0].update(protocol="TCP", targetPort="8080")
    return live


def manifests_repo(root: Path, docs: list[dict[str, Any]]) -> Path:
    work, bare = root / "work", root / "manifests.git"
    (work / "base/shop").mkdir(parents=True)
    (work / "base/shop/all.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    (work / "base/shop/kustomization.yaml").write_text("resources: [all.yaml]\n")
    for c in CLUSTERS:
        (work / f"overlays/{c}/shop").mkdir(parents=True)
        (work / f"overlays/{c}/shop/kustomization.yaml").write_text(
            "resources: [../../../base/shop]\n"
            f"images: [{{name: shop, newName: registry.example/shop, digest: '{DIGEST}'}}]\n"
        )
    run = ["git", "-c", "user.name=b", "-c", "user.email=b@example.test"]
    subprocess.run([*run, "init", "-q", "-b", "main", str(work)], check=True)
    subprocess.run([*run, "-C", str(work), "add", "-A"], check=True)
    subprocess.run([*run, "-C", str(work), "commit", "-qm", "shop"], check=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    return bare


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument(
        "--per-namespace", type=int, default=33, help="objects of each of 3 kinds per namespace"
    )
    args = parser.parse_args()
    docs = objects(args.namespaces, args.per_namespace)
    by_kind = {rt.kind: rt for rt in RESOURCES}
    with tempfile.TemporaryDirectory(prefix="twincd-bench-") as tmp:
        root = Path(tmp)
        bare = manifests_repo(root, docs)
        apps = {c: create_app(c) for c in CLUSTERS}
        servers = {c: serve_in_thread(app) for c, app in apps.items()}
        t = time.perf_counter()
        for app in apps.values():
            store = app.state.store
            for obj in docs:
                live = served(obj)
                store.create(by_kind[obj["kind"]], obj["metadata"].get("namespace"), live)
        fill = time.perf_counter() - t
        kubeconfig = write_kubeconfig(root / "kubeconfig", {f"bench-{c}": s.url for c, s in servers.items()})
        env_file = root / "env.yaml"
        env_file.write_text(
            yaml.safe_dump(
                {
                    "manifests": {"repo": str(bare)},
                    "forge": {"type": "local"},
                    "notifier": {"type": "console"},
                    "registries": {"r": {"url": "registry.example"}},
                    "clusters": {
                        c: {
                            "cloud": c,
                            "context": f"bench-{c}",
                            "kubeconfig": str(kubeconfig),
                            "overlay": f"overlays/{c}",
                            "sync": "apply",
                        }
                        for c in CLUSTERS
                    },
                    "apps": {
                        "shop": {
                            "repo": str(bare),
                            "image": "shop",
                            "registries": ["r"],
                            "workload": {"namespace": "shop-0", "name": "svc-0"},
                        }
                    },
                }
            )
        )
        env = load_environment(env_file)
        try:
            t0, cpu0, kids0 = time.perf_counter(), time.process_time(), _children_cpu()
            with git.checkout(str(bare), ref="main") as work:
                desired = render_overlays(
                    work,
                    {(c, "shop"): env.app_overlay("shop", c) for c in CLUSTERS},
                )
            t1, cpu1, kids1 = time.perf_counter(), time.process_time(), _children_cpu()

            def check(cluster: str) -> Any:
                ref = ClusterRef(cluster, f"bench-{cluster}", str(kubeconfig))
                return compare_cluster(read_cluster(ref, desired=desired[cluster]), env.applications(cluster))

            with ThreadPoolExecutor(len(CLUSTERS)) as pool:  # the flow submits one task per cluster
                checks = list(pool.map(check, CLUSTERS))
            skew = find_skew([w for c in checks for w in c.workloads], serving=set(CLUSTERS))
            t2, cpu2 = time.perf_counter(), time.process_time()
        finally:
            for s in servers.values():
                s.stop()
    print(f"clusters filled through the in-process store in {fill:.2f} s ({len(docs)} objects each)")
    print(f"render (clone + kustomize both overlays + parse): {t1 - t0:.2f} s")
    print(
        f"read + compare both clusters in parallel + skew:  {t2 - t1:.2f} s "
        "(render excluded: what a scheduled run pays while the commit's render is cached)"
    )
    # Wall time moves with the machine's load (other jobs share its 2 cores); CPU time does not.
    print(
        f"CPU: render {kids1 - kids0:.2f} s in kustomize + {cpu1 - cpu0:.2f} s here; "
        f"read + compare {cpu2 - cpu1:.2f} s (client and both in-thread API servers); "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"whole check, render included:                     {t2 - t0:.2f} s (goal < 3 s)")
    for c in checks:
        print(
            f"  {c.cluster}: {len(desired[c.cluster]['shop'])} managed objects, "
            f"{c.objects} live objects read, {c.calls} API calls "
            f"({c.lists} LISTs = {3} kinds x {args.namespaces} namespaces + 1 for Namespaces), "
            f"{len(c.items)} findings"
        )
    print(f"  skew findings: {len(skew)}")


if __name__ == "__main__":
    main()
