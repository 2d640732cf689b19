"""Merge → both clusters verified, with twincd's Argo CD refresh request and without it.

Two sandbox clusters run as processes (``python -m twincd.sandbox.cluster``; Argo CD on aks for
both) with the sandbox Argo CD's default timing: each Application compared with git every 180 s
plus up to 60 s of jitter (Argo CD 2.x's timeout.reconciliation and its jitter), at once when
asked. A manifests repo holds ``--apps`` apps on both clusters. Each sample is one "merge": a
commit that pins a new digest in one app's overlays on both clusters; the clock runs from the
push to ``verify_rollout`` returning SUCCEEDED on both clusters, verified in parallel as the deploy
flow does.

- refresh: one merge at a time; ``verify_rollout`` asks Argo CD to refresh (what twincd does);
- poll: every app merged at once, then verified with ``refresh=False``: Argo CD notices each at
  its own next poll.

    .venv/bin/python benchmarks/argocd_refresh.py [--apps 6] [--samples 6]

With ``--apps 100`` the refresh samples show that a commit to a monorepo of 100 apps renders and
syncs one app, not a hundred.

The last line reads ``merge to verified: refresh X s, poll Y s`` (medians).
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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

from twincd.adapters.cluster import ClusterRef, RolloutTarget, verify_rollout
from twincd.domain import Phase
from twincd.sandbox.contexts import write_kubeconfig
from twincd.sandbox.procs import free_port, wait_until
from twincd.sandbox.stack import healthy

CLUSTERS = ("eks", "aks")
# A registry the sandbox does not serve: its kubelet treats the image as present, as a real cluster
# pulling from a real registry would.
IMAGE = "registry.example/app"

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {app}, namespace: {app}}}
spec:
  replicas: 1
  progressDeadlineSeconds: 60
  selector: {{matchLabels: {{app: {app}}}}}
  template:
    metadata: {{labels: {{app: {app}}}}}
    spec:
      containers: [{{name: {app}, image: {image}}}]
"""


def digest_of(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


class Repo:
    def __init__(self, root: Path) -> None:
        self.bare, self.work = root / "manifests.git", root / "work"
        self._lock = threading.Lock()  # one work tree: merges are pushed one at a time
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(self.bare)], check=True)
        subprocess.run(["git", "init", "-q", "-b", "main", str(self.work)], check=True)

    def _git(self, *args: str) -> str:
        git = ["git", "-C", str(self.work), "-c", "user.name=bench", "-c", "user.email=bench@example.test"]
        return subprocess.run([*git, *args], check=True, capture_output=True, text=True).stdout.strip()

    def pin(self, app: str, release: str) -> str:
        """One merge: ``app`` at a new digest on both clusters. Returns the pushed commit."""
        with self._lock:
            return self._pin(app, release)

    def _pin(self, app: str, release: str) -> str:
        for cluster in CLUSTERS:
            path = self.work / "overlays" / cluster / app / "kustomization.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(
                f"resources: [../../../base/{app}]\n"
                f"images: [{{name: {app}, newName: {IMAGE}, digest: '{digest_of(app + release)}'}}]\n"
            )
        self._git("add", "-A")
        self._git("commit", "-q", "-m", f"{app} {release}")
        self._git("push", "-q", str(self.bare), "HEAD:main")
        return self._git("rev-parse", "HEAD")

    def seed(self, apps: list[str]) -> str:
        for app in apps:
            base = self.work / "base" / app
            base.mkdir(parents=True)
            (base / "kustomization.yaml").write_text("resources: [namespace.yaml, deployment.yaml]\n")
            (base / "namespace.yaml").write_text(
                f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {app}}}\n"
            )
            (base / "deployment.yaml").write_text(DEPLOYMENT.format(app=app, image=app))
        head = ""
        for app in apps:
            head = self.pin(app, "0")
        return head

    def contains(self, revision: str) -> object:
        def check(later: str) -> bool:
            done = subprocess.run(
                ["git", "--git-dir", str(self.bare), "merge-base", "--is-ancestor", revision, later],
                capture_output=True,
                check=False,
            )
            return done.returncode == 0

        return check


@contextmanager
def clusters(repo: Repo, root: Path) -> Iterator[str]:
    """Both cluster processes; yields the kubeconfig path."""
    ports = {c: free_port() for c in CLUSTERS}
    with ExitStack() as stack:
        for name in ("aks", "eks"):  # aks holds Argo CD for both
            log = (root / f"{name}.log").open("wb")
            stack.callback(log.close)
            argv = [
                sys.executable, "-m", "twincd.sandbox.cluster", "--name", name, "--port", str(ports[name]),
                "--manifests", str(repo.bare), "--argocd-api", f"http://127.0.0.1:{ports['aks']}",
            ]  # fmt: skip
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
            stack.callback(proc.wait, 15)
            stack.callback(proc.terminate)
        for port in ports.values():
            wait_until(healthy(f"http://127.0.0.1:{port}/readyz"), 30, f"the cluster on port {port}")
        kubeconfig = root / "kubeconfig"
        write_kubeconfig(kubeconfig, {c: f"http://127.0.0.1:{p}" for c, p in ports.items()})
        yield str(kubeconfig)


def target(kubeconfig: str, repo: Repo, app: str, cluster: str, revision: str, release: str) -> RolloutTarget:
    return RolloutTarget(
        cluster=ClusterRef(cluster, cluster, kubeconfig),
        argocd=ClusterRef(f"Argo CD of {cluster}", "aks", kubeconfig),
        application=f"{app}-{cluster}",
        argocd_namespace="argocd",
        kind="Deployment",
        namespace=app,
        name=app,
        revision=revision,
        digest=digest_of(app + release),
        repository=IMAGE,
        contains=repo.contains(revision),  # type: ignore[arg-type]
    )


def merge_to_verified(
    pool: ThreadPoolExecutor, kubeconfig: str, repo: Repo, app: str, release: str, *, refresh: bool
) -> tuple[float, str]:
    """Push one merge and verify it on both clusters in parallel; seconds from push to both verified."""
    started = time.monotonic()
    revision = repo.pin(app, release)
    futures = [
        pool.submit(
            verify_rollout,
            target(kubeconfig, repo, app, c, revision, release),
            timeout=400,
            refresh=refresh,
        )
        for c in CLUSTERS
    ]
    verdicts = [f.result() for f in futures]
    failed = [v for v in verdicts if v.phase is not Phase.SUCCEEDED]
    return time.monotonic() - started, "; ".join(v.message for v in failed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--apps", type=int, default=6, help="apps in the monorepo (each on both clusters)")
    parser.add_argument("--samples", type=int, default=6, help="merges of each kind (at most --apps)")
    args = parser.parse_args()
    apps = [f"app{i}" for i in range(args.apps)]
    sampled = apps[: args.samples]
    with tempfile.TemporaryDirectory(prefix="twincd-bench-argocd-") as tmp:
        root = Path(tmp)
        repo = Repo(root)
        head = repo.seed(apps)
        with clusters(repo, root) as kubeconfig, ThreadPoolExecutor(4 * len(sampled) + 4) as pool:
            # A new Application is compared with git at once: wait until every one is synced.
            started = time.monotonic()
            for app in apps:
                for c in CLUSTERS:
                    v = verify_rollout(
                        target(kubeconfig, repo, app, c, head, "0"), timeout=600, refresh=False
                    )
                    assert v.phase is Phase.SUCCEEDED, v.message
            print(
                f"{len(apps)} apps × {len(CLUSTERS)} clusters created and synced in "
                f"{time.monotonic() - started:.1f} s; from now on Argo CD polls every 180 s + jitter"
            )

            with_refresh = []
            for app in sampled:
                seconds, failed = merge_to_verified(pool, kubeconfig, repo, app, "1", refresh=True)
                assert not failed, failed
                with_refresh.append(seconds)
                print(f"  refresh: {app} merged → verified on both clusters in {seconds:.2f} s")

            polled = [
                pool.submit(merge_to_verified, pool, kubeconfig, repo, a, "2", refresh=False) for a in sampled
            ]
            by_poll = []
            for app, future in zip(sampled, polled, strict=True):
                seconds, failed = future.result()
                assert not failed, failed
                by_poll.append(seconds)
                print(f"  poll:    {app} merged → verified on both clusters in {seconds:.2f} s")
    refresh, poll = statistics.median(with_refresh), statistics.median(by_poll)
    print(
        f"refresh: median {refresh:.2f} s, max {max(with_refresh):.2f} s; "
        f"poll: median {poll:.2f} s, max {max(by_poll):.2f} s; ratio {poll / refresh:.0f}x"
    )
    print(f"merge to verified: refresh {refresh:.2f} s, poll {poll:.2f} s")


if __name__ == "__main__":
    main()
