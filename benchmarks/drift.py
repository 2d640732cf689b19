"""Drift check on two clusters with 1,000 managed objects each: seconds, and API calls beside objects.

Two in-thread sandbox API servers are filled through their in-process store (fast, and the objects
are served back over HTTP exactly as if created through the API), with the noise a real server adds
(defaults, quantity spellings, reordered env lists, status). The desired state is a real bare git
repo rendered by kustomize, as the flow renders it. The goal from issue 8: the whole check < 3 s.

    .venv/bin/python benchmarks/drift.py [--objects 1000] [--per-namespace 33]

One app per namespace (``base/<app>``, ``overlays/<cluster>/<app>``). Renders are kept by what each
overlay reads (twincd.validate.render_overlays with a cache dir): the script times a cold render,
the render of a next commit that changes one app, and the read + compare. The last line reads
``drift, 2 x N objects: cold X s, renders cached Y s``.
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


def app_of(obj: dict[str, Any]) -> str:
    """The app an object belongs to: its namespace (``shop-<n>``), or its own name for a Namespace."""
    return str(obj["metadata"].get("namespace") or obj["metadata"]["name"])


def manifests_repo(root: Path, docs: list[dict[str, Any]]) -> tuple[Path, Path]:
    """One app per namespace: ``base/<app>`` holds its objects, ``overlays/<cluster>/<app>`` pins
    the image. Returns the bare repo and the work tree it was pushed from."""
    work, bare = root / "work", root / "manifests.git"
    by_app: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_app.setdefault(app_of(doc), []).append(doc)
    for app, objs in by_app.items():
        (work / f"base/{app}").mkdir(parents=True)
        (work / f"base/{app}/all.yaml").write_text(yaml.safe_dump_all(objs, sort_keys=False))
        (work / f"base/{app}/kustomization.yaml").write_text("resources: [all.yaml]\n")
        for c in CLUSTERS:
            (work / f"overlays/{c}/{app}").mkdir(parents=True)
            (work / f"overlays/{c}/{app}/kustomization.yaml").write_text(
                f"resources: [../../../base/{app}]\n"
                f"images: [{{name: shop, newName: registry.example/shop, digest: '{DIGEST}'}}]\n"
            )
    run = ["git", "-c", "user.name=b", "-c", "user.email=b@example.test"]
    subprocess.run([*run, "init", "-q", "-b", "main", str(work)], check=True)
    subprocess.run([*run, "-C", str(work), "add", "-A"], check=True)
    subprocess.run([*run, "-C", str(work), "commit", "-qm", "shop"], check=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
    return bare, work


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def environment(root: Path, bare: Path, kubeconfig: Path, apps: list[str]) -> Path:
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
                    app: {
                        "repo": str(bare),
                        "image": "shop",
                        "registries": ["r"],
                        "workload": {"namespace": app, "name": "svc-0"},
                    }
                    for app in apps
                },
            }
        )
    )
    return env_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=1000, help="managed objects per cluster")
    parser.add_argument(
        "--per-namespace",
        type=int,
        default=33,
        help="objects of each of 3 kinds per namespace (one app each)",
    )
    args = parser.parse_args()
    namespaces = max(1, round(args.objects / (3 * args.per_namespace + 1)))
    docs = objects(namespaces, args.per_namespace)
    by_kind = {rt.kind: rt for rt in RESOURCES}
    with tempfile.TemporaryDirectory(prefix="twincd-bench-") as tmp:
        root = Path(tmp)
        bare, _ = manifests_repo(root, docs)
        apps = sorted({app_of(d) for d in docs})
        servers_apps = {c: create_app(c) for c in CLUSTERS}
        servers = {c: serve_in_thread(app) for c, app in servers_apps.items()}
        t = time.perf_counter()
        for app in servers_apps.values():
            store = app.state.store
            for obj in docs:
                store.create(by_kind[obj["kind"]], obj["metadata"].get("namespace"), served(obj))
        fill = time.perf_counter() - t
        kubeconfig = write_kubeconfig(root / "kubeconfig", {f"bench-{c}": s.url for c, s in servers.items()})
        env = load_environment(environment(root, bare, kubeconfig, apps))
        overlays = {(c, a): env.app_overlay(a, c) for c in CLUSTERS for a in apps}
        cache = root / "renders"
        try:
            with git.checkout(str(bare), ref="main") as work:
                t0, kids0 = time.perf_counter(), _children_cpu()
                desired = render_overlays(work, overlays, cache_dir=cache)  # cold: nothing kept yet
                t1, kids1 = time.perf_counter(), _children_cpu()
                # The next commit changes one app: only its overlays are rendered again.
                changed = work / f"overlays/eks/{apps[0]}/kustomization.yaml"
                changed.write_text(changed.read_text() + "commonAnnotations: {release: next}\n")
                again = render_overlays(work, overlays, cache_dir=cache)
                t2 = time.perf_counter()
            assert again["aks"] == desired["aks"] and again["eks"][apps[-1]] == desired["eks"][apps[-1]]

            def check(cluster: str) -> Any:
                ref = ClusterRef(cluster, f"bench-{cluster}", str(kubeconfig))
                return compare_cluster(read_cluster(ref, desired=desired[cluster]), env.applications(cluster))

            t3, cpu3 = time.perf_counter(), time.process_time()
            with ThreadPoolExecutor(len(CLUSTERS)) as pool:  # the flow submits one task per cluster
                checks = list(pool.map(check, CLUSTERS))
            skew = find_skew([w for c in checks for w in c.workloads], serving=set(CLUSTERS))
            t4, cpu4 = time.perf_counter(), time.process_time()
        finally:
            for s in servers.values():
                s.stop()
    managed = sum(len(objs) for objs in desired["eks"].values())
    compare = t4 - t3
    print(f"{len(apps)} apps on {len(CLUSTERS)} clusters, {managed} managed objects per cluster")
    print(f"clusters filled through the in-process store in {fill:.2f} s")
    print(
        f"render, cold (kustomize every overlay + parse):   {t1 - t0:.2f} s "
        f"({kids1 - kids0:.2f} s CPU in kustomize)"
    )
    print(f"render, next commit (one app changed, rest kept): {t2 - t1:.2f} s")
    # Wall time moves with the machine's load (other jobs share its 2 cores); CPU time does not.
    print(
        f"read + compare both clusters in parallel + skew:  {compare:.2f} s "
        f"({cpu4 - cpu3:.2f} s CPU: client and both in-thread API servers); "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    for c in checks:
        print(
            f"  {c.cluster}: {c.objects} live objects read in {c.calls} API calls ({c.lists} LISTs, "
            f"{namespaces} namespaces), {len(c.items)} findings"
        )
    print(f"  skew findings: {len(skew)}")
    cold, cached = t1 - t0 + compare, t2 - t1 + compare
    print(f"drift, {len(CLUSTERS)} x {managed} objects: cold {cold:.2f} s, renders cached {cached:.2f} s")


if __name__ == "__main__":
    main()
